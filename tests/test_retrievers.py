"""REALM retrieval: config, block embeddings, exact and ScaNN search, embedder, block store, live retriever."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import retrieval_fixtures
import retrievers
import utils

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
# Query embedder
# ---------------------------------------------------------------------------


def test_query_embedder_layout_and_embedding(retriever_files):
  embedder = retrievers.QueryEmbedder(retriever_files["embedder"])
  # A TF2 SavedModel names its vocabulary file itself; it has no BERT
  # position embeddings, so nothing is cut.
  assert embedder.wordpieces.vocab_file.startswith(retriever_files["embedder"])
  assert embedder.max_query_length is None
  vocab = {token: i for i, token in enumerate(retrieval_fixtures.VOCAB)}
  input_ids, input_mask = embedder.token_ids(
      ["Why is the SKY blue?", "sky"])
  # Lower-cased wordpieces, [CLS] q [SEP]; "?" is not in the vocabulary; the
  # batch is padded to its longest question with id 0 and mask 0.
  expected = ["[CLS]", "why", "is", "the", "sky", "blue", "[UNK]", "[SEP]"]
  assert input_ids.tolist() == [
      [vocab[t] for t in expected],
      [vocab["[CLS]"], vocab["sky"], vocab["[SEP]"]] + [0] * 5]
  assert input_mask.tolist() == [[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]

  embeddings = embedder.embed(["sky", "Why is the SKY blue?"], batch_size=1)
  table = retriever_files["table"]
  expected_embeddings = np.stack([table[input_ids[1, :3]].mean(0),
                                  table[input_ids[0]].mean(0)])
  np.testing.assert_allclose(embeddings, expected_embeddings, rtol=1e-5,
                             atol=1e-6)
  cut = retrievers.QueryEmbedder(retriever_files["embedder"],
                                 max_query_length=5)
  long_ids, _ = cut.token_ids(["ice floating bird fly south winter"])
  assert long_ids.tolist() == [[vocab[t] for t in (
      "[CLS]", "ice", "float", "##ing", "[SEP]")]]


def _fixture_questions():
  with open(os.path.join(retrieval_fixtures.REALM_TF1_HUB, "questions.json"),
            encoding="utf-8") as f:
    questions = json.load(f)
  with open(os.path.join(retrieval_fixtures.REALM_TF1_HUB, "reference.json"),
            encoding="utf-8") as f:
    return questions, json.load(f)


def test_realm_tf1_hub_embedder_feeds_orqa_ids_and_gives_orqa_embeddings():
  config = retrievers.load_retriever_config(os.path.join(
      retrieval_fixtures.REALM_TF1_HUB, "retriever_config.json"))
  embedder = retrievers.QueryEmbedder(config["query_embedder_path"])
  # tokenization_info names SAVEDMODEL-ASSET: the vocabulary is the asset.
  assert embedder.wordpieces.vocab_file == os.path.join(
      config["query_embedder_path"], "assets", "vocab.txt")
  # Not cut but at BERT's 512 positions.
  assert embedder.max_query_length == 512
  questions, reference = _fixture_questions()
  input_ids, input_mask = embedder.token_ids(questions)
  for row, orqa_ids in enumerate(reference["orqa_ids"]):
    length = int(input_mask[row].sum())
    assert input_ids[row, :length].tolist() == orqa_ids, questions[row]
    assert not input_mask[row, length:].any()
    assert not input_ids[row, length:].any()
  # Padded batches of several sizes give each question's own embedding.
  for batch_size in (1, 3, len(questions)):
    np.testing.assert_allclose(
        embedder.embed(questions, batch_size=batch_size),
        np.array(reference["orqa_emb"], np.float32), rtol=0, atol=1e-5)


def test_max_query_length_cuts_and_is_checked():
  embedder_path = os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder")
  questions, reference = _fixture_questions()
  long_question = max(range(len(questions)),
                      key=lambda row: len(reference["orqa_ids"][row]))
  embedder = retrievers.QueryEmbedder(embedder_path, max_query_length=16)
  input_ids, input_mask = embedder.token_ids([questions[long_question]])
  orqa_ids = reference["orqa_ids"][long_question]
  assert input_ids.tolist() == [orqa_ids[:15] + orqa_ids[-1:]]
  assert input_mask.tolist() == [[1] * 16]
  for bad in (1, -4):
    with pytest.raises(utils.UserError, match=(
        f"max_query_length={bad}: expected 0 .* or at least 2")):
      retrievers.QueryEmbedder(embedder_path, max_query_length=bad)


def test_position_limit_read_from_the_variables_checkpoint(retriever_files):
  assert retrievers.position_limit(
      os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder")) == 512
  assert retrievers.position_limit(retriever_files["embedder"]) is None


def _copy_fixture_embedder(destination, *skipped_names):
  shutil.copytree(os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder"),
                  destination, copy_function=shutil.copyfile,
                  ignore=shutil.ignore_patterns(*skipped_names))
  return str(destination)


def test_hub_module_vocabulary_is_its_one_asset_or_an_error(tmp_path):
  # No vocab.txt, but one asset file: it is the vocabulary.
  renamed = _copy_fixture_embedder(tmp_path / "renamed", "vocab.txt")
  shutil.copyfile(
      os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder", "assets",
                   "vocab.txt"), os.path.join(renamed, "assets", "words.txt"))
  embedder = retrievers.QueryEmbedder(renamed)
  assert embedder.wordpieces.vocab_file == os.path.join(renamed, "assets",
                                                        "words.txt")
  # No asset at all.
  empty = _copy_fixture_embedder(tmp_path / "empty", "vocab.txt")
  with pytest.raises(utils.UserError) as error:
    retrievers.QueryEmbedder(empty)
  assert str(error.value) == (
      f"{empty}: tokenization_info's vocab_file is 'SAVEDMODEL-ASSET' and "
      "assets/ holds no file, expected the wordpiece vocabulary in "
      "assets/vocab.txt")
  # Several assets, none named vocab.txt.
  shutil.copyfile(os.path.join(renamed, "assets", "words.txt"),
                  os.path.join(empty, "assets", "a.txt"))
  shutil.copyfile(os.path.join(renamed, "assets", "words.txt"),
                  os.path.join(empty, "assets", "b.txt"))
  with pytest.raises(utils.UserError, match="assets/ holds a.txt, b.txt"):
    retrievers.QueryEmbedder(empty)
  # A vocabulary without BERT's special pieces.
  with open(os.path.join(empty, "assets", "a.txt"), "w",
            encoding="utf-8") as f:
    f.write("the\nsky\n")
  os.remove(os.path.join(empty, "assets", "b.txt"))
  with pytest.raises(utils.UserError,
                     match=r"a.txt: no \[CLS\], \[SEP\], \[UNK\]"):
    retrievers.QueryEmbedder(empty)


def test_query_embedder_without_projected_signature(tmp_path):
  retrieval_fixtures.write_embedder(str(tmp_path / "embedder"),
                                    with_projected=False)
  with pytest.raises(utils.UserError,
                     match="no 'projected' signature .*tokenization_info"):
    retrievers.QueryEmbedder(str(tmp_path / "embedder"))
  with pytest.raises(utils.UserError, match="does not exist"):
    retrievers.QueryEmbedder(str(tmp_path / "missing"))
  (tmp_path / "not_a_model").mkdir()
  with pytest.raises(utils.UserError, match="not a loadable"):
    retrievers.QueryEmbedder(str(tmp_path / "not_a_model"))


# ---------------------------------------------------------------------------
# Block store
# ---------------------------------------------------------------------------


def test_block_store_reads_by_offset_and_saves_offsets(tmp_path,
                                                       monkeypatch):
  texts = retrieval_fixtures.block_texts(30)
  texts[7] = "x" * 100000  # Longer than one read of the scan.
  path = str(tmp_path / "blocks.tfr")
  retrieval_fixtures.write_blocks(path, texts)
  store = retrievers.BlockStore(path, 30)
  assert store.text(5) == texts[5]
  # No titles file: no title is made up.
  assert store.title(5) is None and store.titles([5, 6]) == [None, None]
  assert store.texts([29, 7, 0, 7]) == [texts[29], texts[7], texts[0],
                                        texts[7]]
  offsets = np.load(path + ".offsets.npy")
  assert offsets.shape == (31,) and offsets[-1] == os.path.getsize(path)

  def no_scan(path):
    raise AssertionError(f"{path} scanned again")

  with monkeypatch.context() as patch:
    patch.setattr(retrievers, "_scan_record_offsets", no_scan)
    assert retrievers.BlockStore(path, 30).text(29) == texts[29]
  # A changed file is indexed again.
  retrieval_fixtures.write_blocks(path, texts[:29] + ["new last"])
  assert retrievers.BlockStore(path, 30).text(29) == "new last"


def test_block_store_titles_come_from_titles_tfr(tmp_path, monkeypatch):
  # The fixture's directory is read-only: offsets go to the cache dir.
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  config = retrievers.load_retriever_config(os.path.join(
      retrieval_fixtures.REALM_TF1_HUB, "retriever_config.json"))
  read = lambda path: [record.decode("utf-8") for record in
                       tf.data.TFRecordDataset(path).as_numpy_iterator()]
  titles, texts = read(config["title_records"]), read(config["text_records"])
  store = retrievers.BlockStore(config["text_records"], 8,
                                titles_path=config["title_records"])
  assert store.titles_path == config["title_records"]
  assert [store.title(i) for i in range(8)] == titles
  assert store.titles([6, 0, 6]) == [titles[6], titles[0], titles[6]]
  assert store.texts(range(8)) == texts
  assert titles[6] == "Café"  # Non-ASCII, as written by ORQA.
  without = retrievers.BlockStore(config["text_records"], 8)
  assert without.title(0) is None and without.text(0) == texts[0]
  with pytest.raises(IndexError):
    store.title(8)


def test_block_store_refuses_titles_of_another_count(tmp_path):
  blocks, titles = str(tmp_path / "blocks.tfr"), str(tmp_path / "titles.tfr")
  retrieval_fixtures.write_blocks(blocks, ["a", "b", "c"])
  retrieval_fixtures.write_blocks(titles, ["A", "B"])
  with pytest.raises(utils.UserError) as error:
    retrievers.BlockStore(blocks, 3, titles_path=titles)
  assert str(error.value) == (
      f"{titles}: holds 2 titles, but {blocks} holds 3 blocks, expected one "
      "title per block")
  with pytest.raises(utils.UserError, match="titles file does not exist"):
    retrievers.BlockStore(blocks, 3, titles_path=str(tmp_path / "none.tfr"))


def test_block_store_falls_back_to_a_local_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  path = str(tmp_path / "blocks.tfr")
  retrieval_fixtures.write_blocks(path, ["a b", "c d"])
  # A directory where the offsets file would go: beside the data is not
  # writable.
  os.makedirs(path + ".offsets.npy")
  assert retrievers.BlockStore(path, 2).texts([1, 0]) == ["c d", "a b"]
  saved = [name for _, _, names in os.walk(tmp_path / "cache")
           for name in names]
  assert saved == [next(n for n in saved if n.endswith(
      "blocks.tfr.offsets.npy"))]
  assert retrievers.BlockStore(path, 2).text(0) == "a b"


def test_block_store_bad_files(tmp_path):
  path = str(tmp_path / "blocks.tfr")
  retrieval_fixtures.write_blocks(path, ["a", b"\xff\xfe not utf-8", "c"])
  with pytest.raises(utils.UserError, match="holds 3 records, but .* claims "
                     "num_block_records=4"):
    retrievers.BlockStore(path, 4)
  assert not os.path.exists(path + ".offsets.npy")
  store = retrievers.BlockStore(path, 3)
  with pytest.raises(utils.UserError, match="block 1 is not UTF-8"):
    store.texts([0, 1])
  with open(path, "rb") as f:
    data = f.read()
  truncated = str(tmp_path / "truncated.tfr")
  with open(truncated, "wb") as f:
    f.write(data[:-3])
  with pytest.raises(utils.UserError, match="truncated TFRecord"):
    retrievers.BlockStore(truncated, 3)
  with pytest.raises(utils.UserError, match="does not exist"):
    retrievers.BlockStore(str(tmp_path / "missing.tfr"), 3)


# ---------------------------------------------------------------------------
# Live retriever
# ---------------------------------------------------------------------------


def test_live_retriever_exact_equals_brute_force(retriever_files):
  config = retrievers.load_retriever_config(retriever_files["config_path"])
  retriever = retrievers.LiveRetriever(config, "exact", chunk_size=16)
  questions = ["why is the sky blue", "ice floating south", "hot sea salt",
               "moon tide"]
  retrieval = retriever.retrieve(questions, 7)
  queries = retriever.embedder.embed(questions)
  expected_scores, expected_ids = retrieval_fixtures.brute_force_top_k(
      queries, retriever_files["block_emb"], 7)
  np.testing.assert_array_equal(retrieval.block_ids, expected_ids)
  np.testing.assert_allclose(retrieval.scores, expected_scores, rtol=1e-5,
                             atol=1e-5)
  assert retrieval.texts == [[retriever_files["texts"][i] for i in row]
                             for row in expected_ids]
  assert retriever.blocks.titles(expected_ids[0]) == [
      retriever_files["titles"][i] for i in expected_ids[0]]
  with pytest.raises(utils.UserError, match="51 neighbours"):
    retriever.retrieve(questions, 51)


def test_live_retriever_scann_builds_saves_and_reloads(retriever_files,
                                                       tmp_path):
  config = retrievers.load_retriever_config(retriever_files["config_path"])
  scann_config = retrievers.check_scann_config(
      dict(SCANN_CONFIG, num_leaves=5, num_leaves_to_search=5), "test")
  index_dir = str(tmp_path / "index")
  built = retrievers.LiveRetriever(config, "scann", scann_config=scann_config,
                                   scann_index_dir=index_dir)
  questions = ["why is the sky blue", "moon tide"]
  first = built.retrieve(questions, 5)
  exact = retrievers.LiveRetriever(config, "exact").retrieve(questions, 5)
  # Every leaf searched and candidates reordered: exact results.
  np.testing.assert_array_equal(first.block_ids, exact.block_ids)
  reloaded = retrievers.LiveRetriever(config, "scann",
                                      scann_config=scann_config,
                                      scann_index_dir=index_dir)
  np.testing.assert_array_equal(reloaded.retrieve(questions, 5).block_ids,
                                first.block_ids)


def test_live_retriever_checks_its_inputs(retriever_files, tmp_path):
  config = retrievers.load_retriever_config(retriever_files["config_path"])
  with pytest.raises(utils.UserError, match="search='faiss'"):
    retrievers.LiveRetriever(config, "faiss")
  with pytest.raises(utils.UserError, match="needs a ScaNN config"):
    retrievers.LiveRetriever(config, "scann")
  with pytest.raises(utils.UserError, match="claims num_block_records=49"):
    retrievers.LiveRetriever(dict(config, num_block_records=49), "exact")
