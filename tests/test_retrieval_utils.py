"""Tests of the retrieval utilities: recall, record counts, corpus subsets."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import block_store
import cache_fixtures
import neighbour_cache
import query_embedder
import retrieval_fixtures
import retrieval_eval
import retrievers
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SCANN_CONFIG = {"num_neighbors": 10, "num_leaves": 20,
                     "num_leaves_to_search": 5, "training_sample_size": 2000,
                     "reordering_num_neighbors": 50}


def run_script(name, *args):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "util_scripts", name), *args],
      capture_output=True, text=True, cwd=REPO, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)


def assert_one_line_error(process, *fragments):
  assert process.returncode == utils.USER_ERROR_EXIT_CODE, process.stderr
  error_lines = [line for line in process.stderr.splitlines()
                 if line.startswith("error: ")]
  assert len(error_lines) == 1, process.stderr
  assert "Traceback" not in process.stderr
  for fragment in fragments:
    assert fragment in error_lines[0]


# ---------------------------------------------------------------------------
# Recall
# ---------------------------------------------------------------------------


def test_recall_at_k_by_hand():
  exact = np.array([[1, 2, 3], [4, 5, 6]])
  approx = np.array([[3, 2, 9], [7, -1, 4]])
  # Query 0 finds 2 of 3, query 1 finds 1 of 3 (-1 is "no neighbour").
  assert retrieval_eval.recall_at_k(exact, approx, 3) == pytest.approx(0.5)
  assert retrieval_eval.recall_at_k(exact, approx, 1) == pytest.approx(0.0)
  assert retrieval_eval.recall_at_k(exact, exact, 3) == 1.0


def test_recall_at_k_counts_ties_with_the_kth_score():
  exact_ids, exact_scores = np.array([[1, 2]]), np.array([[5.0, 3.0]])
  # Block 9 is a duplicate of block 2: same score, another id.
  approx_ids, approx_true = np.array([[1, 9]]), np.array([[5.0, 3.0]])
  assert retrieval_eval.recall_at_k(exact_ids, approx_ids, 2) == 0.5
  assert retrieval_eval.recall_at_k(
      exact_ids, approx_ids, 2, exact_scores=exact_scores,
      approx_true_scores=approx_true) == 1.0
  lower = np.array([[5.0, 2.9]])
  assert retrieval_eval.recall_at_k(
      exact_ids, approx_ids, 2, exact_scores=exact_scores,
      approx_true_scores=lower) == 0.5


def test_true_scores_and_synthetic_data():
  database, queries = retrieval_eval.synthetic_database_and_queries(
      300, 7, 16, seed=1)
  again, _ = retrieval_eval.synthetic_database_and_queries(300, 7, 16,
                                                              seed=1)
  assert database.shape == (300, 16) and queries.shape == (7, 16)
  assert database.dtype == np.float32
  np.testing.assert_array_equal(database, again)
  ids = np.array([[0, 5], [299, -1]] + [[1, 2]] * 5)
  scores = retrieval_eval.true_scores(queries, database, ids)
  assert scores[0, 1] == pytest.approx(float(queries[0] @ database[5]), 1e-5)
  assert scores[1, 1] == -np.inf


def test_compare_finds_exact_neighbours_when_searching_every_leaf():
  database, queries = retrieval_eval.synthetic_database_and_queries(
      2000, 50, 16, seed=0)
  config = retrievers.check_scann_config(dict(TINY_SCANN_CONFIG), "test")
  result = retrieval_eval.compare(database, queries, config, 10,
                                     leaves_to_search=[1, 20])
  by_leaves = {row["leaves_to_search"]: row for row in result["rows"]}
  assert by_leaves[20]["recall"] >= 0.97
  assert by_leaves[1]["recall"] < by_leaves[20]["recall"]
  assert result["num_blocks"] == 2000 and result["num_queries"] == 50


@pytest.mark.slow
def test_scann_test_recall_cli_writes_json(tmp_path):
  config_path = tmp_path / "scann.json"
  config_path.write_text(json.dumps(TINY_SCANN_CONFIG))
  output = tmp_path / "recall.json"
  process = run_script(
      "scann_test_recall.py", "--synthetic_num_blocks=2000",
      "--synthetic_dim=16", "--num_queries=40",
      f"--scann_config_path={config_path}",
      "--leaves_to_search=5,20", f"--output_path={output}")
  assert process.returncode == 0, process.stderr
  result = json.loads(output.read_text())
  assert [row["leaves_to_search"] for row in result["rows"]] == [5, 20]
  assert all(0.0 <= row["recall"] <= 1.0 for row in result["rows"])
  assert result["exact_queries_per_second"] > 0
  assert result["source"]["kind"] == "synthetic"
  assert result["scann_config"]["num_leaves"] == 20
  assert "recall@10" in process.stdout
  assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


@pytest.mark.slow
def test_scann_test_recall_on_kilt_questions_and_bad_inputs(tmp_path):
  files = retrieval_fixtures.write_retriever(str(tmp_path / "realm"),
                                             num_blocks=300, dim=8)
  config_path = tmp_path / "scann.json"
  config_path.write_text(json.dumps(dict(TINY_SCANN_CONFIG, num_leaves=10)))
  kilt_path = tmp_path / "eli5.jsonl"
  words = retrieval_fixtures.WORDS
  kilt_path.write_text("".join(
      json.dumps({"id": str(i), "input": f"why {words[i]} {words[-i]}",
                  "output": []}) + "\n" for i in range(1, 21)))
  output = tmp_path / "recall.json"
  common = [f"--retriever_config_path={files['config_path']}",
            f"--scann_config_path={config_path}", f"--output_path={output}"]
  process = run_script("scann_test_recall.py", *common,
                       f"--kilt_path={kilt_path}", "--num_queries=15")
  assert process.returncode == 0, process.stderr
  result = json.loads(output.read_text())
  assert result["num_queries"] == 15 and result["source"]["kind"] == "kilt"

  bad_kilt = tmp_path / "bad.jsonl"
  bad_kilt.write_text('{"id": "a", "input": "why"}\n{"id": "b"}\n')
  process = run_script("scann_test_recall.py", *common,
                       f"--kilt_path={bad_kilt}")
  assert_one_line_error(process, f"{bad_kilt}: line 2", "'input'")

  np.save(tmp_path / "wrong_dim.npy", np.zeros([4, 5], np.float32))
  process = run_script("scann_test_recall.py", *common,
                       f"--queries_npy={tmp_path / 'wrong_dim.npy'}")
  assert_one_line_error(process, "--queries_npy",
                        "expected float [num_queries, 8]")


# ---------------------------------------------------------------------------
# count_records
# ---------------------------------------------------------------------------


@pytest.fixture(name="cache_dir")
def fixture_cache_dir(tmp_path):
  records = {
      "train": cache_fixtures.random_records(7, num_neighbours=3,
                                             vocab_size=50, seed=0),
      "validation": cache_fixtures.random_records(4, num_neighbours=3,
                                                  vocab_size=50, seed=1),
  }
  cache_dir = str(tmp_path / "cache")
  cache_fixtures.write_cache(cache_dir, records, num_neighbours=3,
                             vocab_size=50, num_shards=2)
  return cache_dir


@pytest.mark.slow
def test_count_records_of_files_and_globs(cache_dir, tmp_path):
  output = tmp_path / "counts.json"
  train = os.path.join(cache_dir, "train-*.tfrecord")
  validation = os.path.join(cache_dir, "validation-00000-of-00002.tfrecord")
  process = run_script("count_records.py", f"--paths={train},{validation}",
                       f"--output_path={output}")
  assert process.returncode == 0, process.stderr
  counts = json.loads(output.read_text())
  assert {os.path.basename(path): count
          for path, count in counts["files"].items()} == {
              "train-00000-of-00002.tfrecord": 4,
              "train-00001-of-00002.tfrecord": 3,
              "validation-00000-of-00002.tfrecord": 2}
  assert counts["total"] == 9


@pytest.mark.slow
def test_count_records_checks_a_cache_against_its_manifest(cache_dir, tmp_path):
  output = tmp_path / "counts.json"
  process = run_script("count_records.py", f"--cache_dir={cache_dir}",
                       f"--output_path={output}")
  assert process.returncode == 0, process.stderr
  counts = json.loads(output.read_text())
  assert counts["total"] == 11
  assert counts["splits"]["validation"] == {"manifest": 4, "counted": 4,
                                            "missing_shards": []}

  manifest = neighbour_cache.read_manifest(cache_dir)
  manifest["splits"]["train"]["num_records"] = 8
  utils.atomic_write_json(os.path.join(cache_dir, "manifest.json"), manifest)
  os.remove(os.path.join(cache_dir, "validation-00001-of-00002.tfrecord"))
  process = run_script("count_records.py", f"--cache_dir={cache_dir}")
  assert_one_line_error(
      process, "train: 7 records counted, the manifest says 8",
      "validation: 1 shard(s) missing (validation-00001-of-00002.tfrecord)")
  assert "MISMATCH" in process.stdout


@pytest.mark.slow
def test_count_records_refuses_a_truncated_file(cache_dir):
  shard = os.path.join(cache_dir, "train-00000-of-00002.tfrecord")
  with open(shard, "rb") as f:
    data = f.read()
  with open(shard, "wb") as f:
    f.write(data[:-5])
  process = run_script("count_records.py", f"--paths={shard}")
  assert_one_line_error(process, shard, "corrupt or truncated")


# ---------------------------------------------------------------------------
# create_data_subset_realm
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_subset_loads_with_the_real_loaders_and_matches_the_source(tmp_path):
  files = retrieval_fixtures.write_retriever(str(tmp_path / "realm"),
                                             num_blocks=40, dim=8)
  output_dir = tmp_path / "subset"
  args = [f"--retriever_config_path={files['config_path']}", "--num_blocks=15",
          "--seed=3"]
  process = run_script("create_data_subset_realm.py", *args,
                       f"--output_dir={output_dir}")
  assert process.returncode == 0, process.stderr
  chosen = np.load(output_dir / "original_block_ids.npy")
  assert chosen.dtype == np.int64 and len(set(chosen.tolist())) == 15
  assert list(chosen) == sorted(chosen) and 0 <= chosen[0] and chosen[-1] < 40

  config = retrievers.load_retriever_config(
      str(output_dir / "retriever_config.json"))
  assert config["num_block_records"] == 15
  block_emb = retrievers.load_block_embeddings(
      config["query_embedder_path"], 15)
  np.testing.assert_array_equal(block_emb, files["block_emb"][chosen])
  store = block_store.BlockStore(config["text_records"], 15,
                                 titles_path=config["title_records"])
  assert store.texts(range(15)) == [files["texts"][i] for i in chosen]
  assert store.titles(range(15)) == [files["titles"][i] for i in chosen]
  questions = ["why is the sky blue", "ice floating"]
  subset_embedder = query_embedder.QueryEmbedder(config["query_embedder_path"])
  np.testing.assert_allclose(
      subset_embedder.embed(questions),
      query_embedder.QueryEmbedder(files["embedder"]).embed(questions))
  assert json.loads((output_dir / "subset.json").read_text())["seed"] == 3
  assert not [name for name in os.listdir(output_dir) if ".tmp-" in name]

  # Same seed, same blocks; a finished subset is not overwritten.
  again = tmp_path / "again"
  process = run_script("create_data_subset_realm.py", *args,
                       f"--output_dir={again}")
  assert process.returncode == 0, process.stderr
  np.testing.assert_array_equal(np.load(again / "original_block_ids.npy"),
                                chosen)
  process = run_script("create_data_subset_realm.py", *args,
                       f"--output_dir={output_dir}")
  assert_one_line_error(process, "already holds a finished subset")


@pytest.mark.slow
def test_subset_bad_inputs_are_one_line_errors(tmp_path):
  files = retrieval_fixtures.write_retriever(str(tmp_path / "realm"),
                                             num_blocks=10, dim=8)
  output_dir = tmp_path / "subset"
  process = run_script("create_data_subset_realm.py",
                       f"--retriever_config_path={files['config_path']}",
                       "--num_blocks=11", f"--output_dir={output_dir}")
  assert_one_line_error(process, "--num_blocks=11", "1 to 10")
  assert not output_dir.exists()
