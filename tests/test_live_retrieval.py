"""Live retrieval (`live_retrieval.py`, `--approach_type=live_retrieval`) on a tiny demo world.

What is retrieved as the pipeline runs must be what the exact cache holds
for the same questions, so that a `live_retrieval` run trains exactly as a
`cached_pretok` run over an exact cache of the same depth: the same
neighbours, the same draw, the same weights.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import cache_fixtures
import caching
import evaluation
import generation_lib
import live_retrieval
import neighbour_cache
import retrievers
import server_fixtures
import settings
import task_specific
import training
from util_scripts import demo_world
import utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO_ROOT, "main.py")
NUM_NEIGHBOURS = 6
RETRIEVAL_TIMEOUT_SECONDS = 4.0
CACHE_SETTINGS = {"num_neighbours": NUM_NEIGHBOURS, "num_shards": 2,
                  "batch_size": 8, "max_block_tokens": 16}
RUN = {"batch_size": 4, "num_retrievals": 2, "max_question_tokens": 8,
       "max_answer_tokens": 8, "max_context_tokens": 12, "learning_rate": 1e-3,
       "max_steps": 3, "batches_between_evals": 0, "log_samples": 0,
       "log_every_steps": 1, "shuffle_buffer_size": 16}


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("world"))
  world = demo_world.build_world(
      directory, num_train=24, num_validation=8, num_test=2,
      num_distractor_blocks=40, gpt2_vocab_size=300)
  paths = world["paths"]
  cache_dir = os.path.join(directory, "cache")
  caching.cache(settings.from_flat(caching.CacheConfig, {
      "retriever_config_path": paths["retriever_config"],
      "dataset_root": paths["kilt_dir"], "output_dir": cache_dir,
      "tokenizer": paths["tokenizer"], **CACHE_SETTINGS}, "test"))
  # The same questions, without neighbours: all a live run needs.
  questions_dir = os.path.join(directory, "questions")
  caching.cache(settings.from_flat(caching.CacheConfig, {
      "dataset_root": paths["kilt_dir"], "output_dir": questions_dir,
      "tokenizer": paths["tokenizer"],
      **dict(CACHE_SETTINGS, num_neighbours=0)}, "test"))
  return dict(paths, cache=cache_dir, questions=questions_dir, root=directory)


def retrieval_values(world):
  return {"retriever_config_path": world["retriever_config"],
          "live_num_neighbours": NUM_NEIGHBOURS,
          "max_block_tokens": CACHE_SETTINGS["max_block_tokens"],
          "retrieval_batch_size": 5}


def local_retrieval(world, **overrides):
  config = settings.from_flat(live_retrieval.RetrievalConfig, {
      **retrieval_values(world), **overrides}, "test")
  return live_retrieval.open_retrieval(
      config, task_specific.load_tokenizer(world["tokenizer"]))


def cached_records(cache_dir, split):
  manifest = neighbour_cache.read_manifest(cache_dir)
  files = neighbour_cache.split_files(cache_dir, manifest, split)
  return tf.data.TFRecordDataset(files)


def test_live_neighbours_equal_the_exact_cache(world):
  retrieval = local_retrieval(world)
  records = cached_records(world["cache"], "train")
  live = live_retrieval.with_live_neighbours(
      records.map(lambda record: (tf.constant(0, tf.int64), record)),
      retrieval, NUM_NEIGHBOURS, batch_size=5)
  count = 0
  for (_, example), record in zip(live, records):
    cached = neighbour_cache.parse_example(record)
    np.testing.assert_array_equal(example["neighbour_block_ids"],
                                  cached["neighbour_block_ids"])
    np.testing.assert_allclose(example["neighbour_scores"],
                               cached["neighbour_scores"], atol=1e-5)
    assert (example["neighbours"].to_list() ==
            cached["neighbours"].to_list())
    assert example["id"].numpy() == cached["id"].numpy()
    assert (example["answers"].to_list() == cached["answers"].to_list())
    count += 1
  assert count == 24


def _train(world, output_dir, run_name, **overrides):
  values = {"model_key": world["model_config"], "cache_dir": world["cache"],
            "output_dir": str(output_dir), "run_name": run_name, **RUN,
            **overrides}
  config = settings.from_flat(training.TrainConfig, values, "test")
  training.train(config)
  return os.path.join(str(output_dir), run_name)


def _evaluate(world, output_dir, run_name, **overrides):
  values = {"model_key": world["model_config"], "cache_dir": world["cache"],
            "output_dir": str(output_dir), "run_name": run_name, **RUN,
            **overrides}
  return evaluation.evaluate(
      settings.from_flat(training.TrainConfig, values, "test"))


@pytest.mark.slow
def test_a_live_run_trains_to_the_weights_of_a_cached_run(world, tmp_path):
  cached = _train(world, tmp_path, "cached")
  live = _train(world, tmp_path, "live", approach_type="live_retrieval",
                **retrieval_values(world))
  # Over a cache of the questions alone.
  questions_only = _train(world, tmp_path, "questions_only",
                          approach_type="live_retrieval",
                          cache_dir=world["questions"],
                          **retrieval_values(world))
  cached_weights = cache_fixtures.final_weights(cached)
  for run in (live, questions_only):
    live_weights = cache_fixtures.final_weights(run)
    assert cached_weights.keys() == live_weights.keys()
    for name, value in cached_weights.items():
      np.testing.assert_array_equal(live_weights[name], value, err_msg=name)
  recorded = utils.read_json(os.path.join(live, "config.json"), "run")
  assert recorded["retrieval"]["index_version"] == (
      local_retrieval(world).index_version)
  assert recorded["retrieval"]["search"] == {"kind": "exact"}
  # The grid's conditions draw from the live neighbours as from the cache's.
  grid = {"conditions": ["real", "random", "none", "distractor"],
          "number_eval_batches": 0}
  cached_table = _evaluate(world, tmp_path, "cached", **grid)
  live_table = _evaluate(world, tmp_path, "live", **grid,
                         approach_type="live_retrieval",
                         **retrieval_values(world))
  assert live_table.keys() == cached_table.keys() == set(grid["conditions"])
  for condition, row in cached_table.items():
    assert live_table[condition]["answer_ppl"] == row["answer_ppl"], condition


@pytest.mark.slow
def test_resuming_against_another_index_is_refused(world, tmp_path):
  run = _train(world, tmp_path, "live", approach_type="live_retrieval",
               **retrieval_values(world))
  # Another corpus encoding: the same files but one block embedding changed.
  other = os.path.join(str(tmp_path), "other_world")
  shutil.copytree(world["root"], other, ignore=shutil.ignore_patterns("cache"))
  embedder = os.path.join(other, "realm", "embedder")
  num_blocks = local_retrieval(world).num_blocks
  block_emb = retrievers.load_block_embeddings(embedder, num_blocks)
  block_emb[0] += 1.0
  retrievers.write_block_embeddings(embedder, block_emb)
  other_config = os.path.join(other, "retriever_config.json")
  with open(world["retriever_config"], encoding="utf-8") as f:
    config = json.load(f)
  utils.atomic_write_json(other_config,
                          dict(config, query_embedder_path=embedder))
  with pytest.raises(utils.UserError, match="index version"):
    _train(world, tmp_path, "live", approach_type="live_retrieval",
           **dict(retrieval_values(world), max_steps=4,
                  retriever_config_path=other_config))
  # A resume from the same index (another path to it) is taken.
  _train(world, tmp_path, "live", approach_type="live_retrieval",
         **dict(retrieval_values(world), max_steps=4))
  assert utils.read_json(os.path.join(run, "done.json"), "done")["step"] == 4


def _generate(output_path, **values):
  generation_lib.generate(settings.from_flat(generation_lib.GenerationConfig, {
      "output_path": str(output_path), "split": "validation",
      "batch_size": 4, "decoding": "greedy", "max_new_tokens": 6,
      **values}, "test"))
  with open(output_path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_live_generation_equals_the_cached_one(world, tmp_path):
  run = _train(world, tmp_path, "cached")
  cached = _generate(tmp_path / "cached" / "out.jsonl", run_dir=run)
  live = _generate(tmp_path / "live" / "out.jsonl", run_dir=run,
                   approach_type="live_retrieval", **retrieval_values(world))
  assert len(live) == len(cached) == 8
  assert live == cached
  record = utils.read_json(str(tmp_path / "live" / "generation_config.json"),
                           "generation config")
  assert record["approach_type"] == "live_retrieval"
  assert record["retrieval"]["index_version"] == (
      local_retrieval(world).index_version)


# ---------------------------------------------------------------------------
# Through retrieval_server.py
# ---------------------------------------------------------------------------


def _server_flags(world):
  return {"retriever_config_path": world["retriever_config"],
          "tokenizer": world["tokenizer"],
          "max_block_tokens": CACHE_SETTINGS["max_block_tokens"],
          # The search traced for the run's k before the server is ready.
          "warm_up_k": NUM_NEIGHBOURS}


def _trainer(world, output_dir, run_name, server_url, **overrides):
  values = {"model_key": world["model_config"], "cache_dir": world["cache"],
            "output_dir": str(output_dir), "run_name": run_name, **RUN,
            "approach_type": "live_retrieval", "retrieval_server": server_url,
            "live_num_neighbours": NUM_NEIGHBOURS, "retrieval_batch_size": 2,
            "retrieval_timeout_seconds": RETRIEVAL_TIMEOUT_SECONDS,
            **overrides}
  return subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, MAIN] + [f"--{name}={value}"
                                for name, value in values.items()],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _steps_done(run_dir):
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if '"loss"' in line)


@pytest.mark.slow
def test_a_killed_server_stops_the_trainer_and_both_resume(world, tmp_path):
  """The server dies mid-run: the trainer stops within its timeout with one
  line naming the server; both restarted, the run resumes to the weights of
  an uninterrupted one (here cached_pretok's, equal to live retrieval's)."""
  steps = 20
  overrides = dict(max_steps=steps, checkpoint_every_steps=2)
  uninterrupted = _train(world, tmp_path, "uninterrupted", **overrides)
  server = server_fixtures.start_server(_server_flags(world), str(tmp_path))
  trainer = _trainer(world, tmp_path, "live", server.url, **overrides)
  run_dir = os.path.join(str(tmp_path), "live")
  deadline = time.monotonic() + 300
  while _steps_done(run_dir) < 3 and trainer.poll() is None and (
      time.monotonic() < deadline):
    time.sleep(0.02)
  server.kill()
  killed_at = time.monotonic()
  _, stderr = trainer.communicate(timeout=300)
  stopped_after = time.monotonic() - killed_at
  assert trainer.returncode == 2, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and server.url in errors[0], stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
  assert _steps_done(run_dir) < steps
  # The timeout, then the process's exit (TensorFlow's teardown).
  assert stopped_after < RETRIEVAL_TIMEOUT_SECONDS + 30, stopped_after
  with server_fixtures.running_server(_server_flags(world),
                                      str(tmp_path)) as restarted:
    trainer = _trainer(world, tmp_path, "live", restarted.url, **overrides)
    _, stderr = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, stderr[-3000:]
  expected = cache_fixtures.final_weights(uninterrupted)
  resumed = cache_fixtures.final_weights(run_dir)
  for name, value in expected.items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)
