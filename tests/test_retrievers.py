"""REALM search: config, block embeddings, exact and ScaNN search, the live retriever, import costs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import retrieval_fixtures
import retrievers
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANN_CONFIG = {"num_neighbors": 10, "num_leaves": 20,
                "num_leaves_to_search": 10, "training_sample_size": 2000,
                "reordering_num_neighbors": 50}


@pytest.fixture(name="retriever_files", scope="module")
def fixture_retriever_files(tmp_path_factory):
  return retrieval_fixtures.write_retriever(
      str(tmp_path_factory.mktemp("retriever")), num_blocks=50)


# ---------------------------------------------------------------------------
# Exact search
# ---------------------------------------------------------------------------


def _random_blocks_with_ties(num_blocks=1000, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  block_emb = rng.standard_normal([num_blocks, dim]).astype(np.float32)
  # Identical blocks score identically: the lower id must come first.
  block_emb[900] = block_emb[3]
  block_emb[17] = block_emb[640]
  block_emb[641] = block_emb[640]
  queries = rng.standard_normal([23, dim]).astype(np.float32)
  queries[:5] = block_emb[[3, 640, 900, 17, 641]]
  return queries, block_emb


@pytest.mark.parametrize("chunk_size", [7, 100, 333, 4096])
def test_exact_search_equals_brute_force_with_ties_by_lower_id(chunk_size):
  queries, block_emb = _random_blocks_with_ties()
  scores, block_ids = retrievers.exact_search(queries, block_emb, 20,
                                              chunk_size=chunk_size)
  expected_scores, expected_ids = retrieval_fixtures.brute_force_top_k(
      queries, block_emb, 20)
  assert scores.dtype == np.float32 and block_ids.dtype == np.int64
  np.testing.assert_array_equal(block_ids, expected_ids)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(scores, axis=1) <= 0)
  # The tied pairs, lower id first.
  assert list(block_ids[0, :2]) == [3, 900]
  assert list(block_ids[1, :3]) == [17, 640, 641]


def test_exact_search_k_equal_to_blocks_and_on_another_device():
  queries, block_emb = _random_blocks_with_ties()
  block_emb = block_emb[:40]
  scores, block_ids = retrievers.exact_search(
      queries, block_emb, 40, chunk_size=16, device="/device:CPU:1")
  _, expected_ids = retrieval_fixtures.brute_force_top_k(queries, block_emb, 40)
  np.testing.assert_array_equal(block_ids, expected_ids)
  assert scores.shape == (23, 40)
  with tf.device("/device:CPU:2"):
    on_device = tf.constant(block_emb)
  _, ids_from_tensor = retrievers.exact_search(queries, on_device, 5,
                                               chunk_size=16)
  np.testing.assert_array_equal(ids_from_tensor, expected_ids[:, :5])


def test_exact_searcher_splits_blocks_over_devices_and_merges_ties():
  queries, block_emb = _random_blocks_with_ties()
  # Blocks [0, 333) [333, 666) [666, 1000): the tied pairs straddle devices.
  searcher = retrievers.ExactSearcher(
      block_emb, ["/device:CPU:0", "/device:CPU:1", "/device:CPU:3"],
      chunk_size=100)
  scores, block_ids = searcher.search(queries, 20)
  expected_scores, expected_ids = retrieval_fixtures.brute_force_top_k(
      queries, block_emb, 20)
  np.testing.assert_array_equal(block_ids, expected_ids)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  assert list(block_ids[0, :2]) == [3, 900]
  assert list(block_ids[1, :3]) == [17, 640, 641]
  with pytest.raises(utils.UserError, match="1001 neighbours"):
    searcher.search(queries, 1001)


def test_exact_search_refuses_more_neighbours_than_blocks():
  with pytest.raises(utils.UserError, match="11 neighbours .* 10 blocks"):
    retrievers.exact_search(np.zeros([2, 4], np.float32),
                            np.zeros([10, 4], np.float32), 11)


# ---------------------------------------------------------------------------
# Configs and block embeddings
# ---------------------------------------------------------------------------


def test_retriever_config_resolves_relative_paths(retriever_files, tmp_path):
  config = retrievers.load_retriever_config(retriever_files["config_path"])
  assert config == {"query_embedder_path": retriever_files["embedder"],
                    "text_records": retriever_files["blocks"],
                    "title_records": retriever_files["titles_path"],
                    "num_block_records": 50}
  # title_records is optional: no titles.
  path = tmp_path / "retriever.json"
  path.write_text(json.dumps({"query_embedder_path": "/e",
                              "text_records": "b.tfr",
                              "num_block_records": 3}))
  assert retrievers.load_retriever_config(str(path)) == {
      "query_embedder_path": "/e", "text_records": str(tmp_path / "b.tfr"),
      "title_records": None, "num_block_records": 3}


@pytest.mark.parametrize("content, message", [
    ({"text_records": "b", "num_block_records": 3}, "missing key 'query_embedder_path'"),
    ({"query_embedder_path": "e", "text_records": "b", "num_block_records": "3"},
     "num_block_records is '3', expected a int"),
    ({"query_embedder_path": "e", "text_records": "b", "num_block_records": 3,
      "extra": 1}, "unknown key"),
    ({"query_embedder_path": "e", "text_records": "b", "num_block_records": 3,
      "title_records": 7}, "title_records is 7, expected a str"),
])
def test_retriever_config_errors_name_file_and_key(tmp_path, content, message):
  path = tmp_path / "retriever.json"
  path.write_text(json.dumps(content))
  with pytest.raises(utils.UserError, match=message) as error:
    retrievers.load_retriever_config(str(path))
  assert str(path) in str(error.value)


@pytest.mark.parametrize("tf2_names", [False, True])
def test_block_embeddings_under_either_variable_name(tmp_path, tf2_names):
  block_emb = np.arange(24, dtype=np.float32).reshape(6, 4)
  if tf2_names:
    retrieval_fixtures.write_tf2_block_embeddings(str(tmp_path), block_emb)
  else:
    retrievers.write_block_embeddings(str(tmp_path), block_emb)
  loaded = retrievers.load_block_embeddings(str(tmp_path), 6)
  np.testing.assert_array_equal(loaded, block_emb)
  assert loaded.dtype == np.float32


def test_block_embeddings_shape_and_presence_checked(tmp_path):
  with pytest.raises(utils.UserError, match="no readable checkpoint"):
    retrievers.load_block_embeddings(str(tmp_path), 6)
  retrievers.write_block_embeddings(str(tmp_path), np.zeros([6, 4], np.float32))
  with pytest.raises(utils.UserError,
                     match=r"block_emb has shape \[6, 4\], expected \[7, dim\]"):
    retrievers.load_block_embeddings(str(tmp_path), 7)


@pytest.mark.parametrize("change, message", [
    ({"surprise": 1}, "unknown key"),
    ({"num_leaves": 0}, "num_leaves is 0"),
    ({"num_leaves_to_search": 30}, "exceeds num_leaves"),
    ({"anisotropic_quantization_threshold": "x"}, "expected a number"),
])
def test_scann_config_checked(tmp_path, change, message):
  path = tmp_path / "scann.json"
  path.write_text(json.dumps(dict(SCANN_CONFIG, **change)))
  with pytest.raises(utils.UserError, match=message):
    retrievers.load_scann_config(str(path))
  path.write_text(json.dumps({k: v for k, v in SCANN_CONFIG.items()
                              if k != "num_leaves"}))
  with pytest.raises(utils.UserError, match="missing key 'num_leaves'"):
    retrievers.load_scann_config(str(path))


# ---------------------------------------------------------------------------
# ScaNN
# ---------------------------------------------------------------------------


def _clustered(num_blocks=2000, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal([40, dim])
  block_emb = (centres[rng.integers(0, 40, num_blocks)] +
               0.3 * rng.standard_normal([num_blocks, dim])).astype(np.float32)
  queries = (centres[rng.integers(0, 40, 50)] +
             0.3 * rng.standard_normal([50, dim])).astype(np.float32)
  return queries, block_emb


def test_scann_recall_and_save_load_round_trip(tmp_path):
  queries, block_emb = _clustered()
  config = retrievers.check_scann_config(SCANN_CONFIG, "test")
  searcher = retrievers.ScannSearcher.build(block_emb, config)
  scores, block_ids = searcher.search(queries, 10)
  _, exact_ids = retrievers.exact_search(queries, block_emb, 10)
  recall = np.mean([len(set(a) & set(b)) / 10
                    for a, b in zip(block_ids, exact_ids)])
  assert recall >= 0.9
  assert scores.dtype == np.float32 and block_ids.dtype == np.int64
  assert np.all(np.diff(scores, axis=1) <= 1e-6)
  # Reordered scores are exact inner products.
  np.testing.assert_allclose(
      scores, np.take_along_axis(queries @ block_emb.T, block_ids, 1),
      rtol=1e-4, atol=1e-4)

  searcher.save(str(tmp_path / "index"))
  loaded = retrievers.ScannSearcher.load(str(tmp_path / "index"), config)
  loaded_scores, loaded_ids = loaded.search(queries, 10)
  np.testing.assert_array_equal(loaded_ids, block_ids)
  np.testing.assert_array_equal(loaded_scores, scores)
  with pytest.raises(utils.UserError, match="built with"):
    retrievers.ScannSearcher.load(str(tmp_path / "index"),
                                  dict(config, num_leaves=21))
  with pytest.raises(utils.UserError, match="not a saved ScaNN index"):
    retrievers.ScannSearcher.load(str(tmp_path))
  with pytest.raises(utils.UserError, match="reorders only"):
    searcher.search(queries, 51)



# ---------------------------------------------------------------------------
# Live retriever
# ---------------------------------------------------------------------------


def test_live_retriever_exact_equals_brute_force(retriever_files):
  config = retrievers.load_retriever_config(retriever_files["config_path"])
  retriever = retrievers.LiveRetriever(config, "exact", chunk_size=16)
  questions = ["why is the sky blue", "ice floating south", "hot sea salt",
               "moon tide"]
  queries = retriever.embedder.embed(questions)
  scores, block_ids = retriever.search(queries, 7)
  expected_scores, expected_ids = retrieval_fixtures.brute_force_top_k(
      queries, retriever_files["block_emb"], 7)
  np.testing.assert_array_equal(block_ids, expected_ids)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
  assert [retriever.blocks.texts(row) for row in block_ids] == [
      [retriever_files["texts"][i] for i in row] for row in expected_ids]
  assert retriever.blocks.titles(expected_ids[0]) == [
      retriever_files["titles"][i] for i in expected_ids[0]]
  with pytest.raises(utils.UserError, match="51 neighbours"):
    retriever.search(queries, 51)


def test_live_retriever_scann_builds_saves_and_reloads(retriever_files,
                                                       tmp_path):
  config = retrievers.load_retriever_config(retriever_files["config_path"])
  scann_config = retrievers.check_scann_config(
      dict(SCANN_CONFIG, num_leaves=5, num_leaves_to_search=5), "test")
  index_dir = str(tmp_path / "index")
  built = retrievers.LiveRetriever(config, "scann", scann_config=scann_config,
                                   scann_index_dir=index_dir)
  queries = built.embedder.embed(["why is the sky blue", "moon tide"])
  _, first_ids = built.search(queries, 5)
  _, exact_ids = retrievers.LiveRetriever(config, "exact").search(queries, 5)
  # Every leaf searched and candidates reordered: exact results.
  np.testing.assert_array_equal(first_ids, exact_ids)
  reloaded = retrievers.LiveRetriever(config, "scann",
                                      scann_config=scann_config,
                                      scann_index_dir=index_dir)
  np.testing.assert_array_equal(reloaded.search(queries, 5)[1], first_ids)


def test_live_retriever_checks_its_inputs(retriever_files, tmp_path):
  config = retrievers.load_retriever_config(retriever_files["config_path"])
  with pytest.raises(utils.UserError, match="search='faiss'"):
    retrievers.LiveRetriever(config, "faiss")
  with pytest.raises(utils.UserError, match="needs a ScaNN config"):
    retrievers.LiveRetriever(config, "scann")
  with pytest.raises(utils.UserError, match="claims num_block_records=49"):
    retrievers.LiveRetriever(dict(config, num_block_records=49), "exact")


@pytest.mark.slow
def test_imports_cost_what_they_use():
  # A fresh interpreter: this one has imported ScaNN and TF-Hub already.
  script = (
      "import sys\n"
      "def loaded():\n"
      "  return sorted(m for m in sys.modules if m.split('.')[0] in\n"
      "                ('scann', 'tensorflow_hub'))\n"
      "import block_store\n"
      "assert not loaded(), ('block_store', loaded())\n"
      "import retrievers\n"
      "assert not loaded(), ('retrievers', loaded())\n")
  process = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                           capture_output=True, text=True, check=False)
  assert process.returncode == 0, process.stderr[-2000:]
