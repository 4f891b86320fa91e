"""Index refresh (refresh_index.py, index_refresh.py) and the service's hot swap.

A refresh re-embeds every block with a block embedder, ORQA's layout: on
REALM's own TF1 Hub export (`retrieval_fixtures.REALM_TF1_HUB`) it gives
back the block embeddings ORQA's encode_blocks.py wrote. A version is served
once `CURRENT` names it, by `live_retrieval.LocalRetrieval` and by
retrieval_server.py, which swaps it in without dropping a request. A refresh
killed mid-way (SIGKILL) leaves the old version serving; its rerun resumes
from the shards written and gives the uninterrupted run's embeddings, bit
for bit. Bad inputs are one-line `UserError`s.
"""

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

import cache_fixtures
import index_refresh
import live_retrieval
import retrieval_fixtures
import retrieval_service
import retrievers
import server_fixtures
import task_specific
import utils

NUM_BLOCKS = 40
DIM = 8
K = 5
MAX_BLOCK_TOKENS = 16
SHARD_SIZE = 4
QUESTIONS = ["why is the sky blue", "ice floating", "moon tide", "hot water"]
REFRESH = os.path.join(server_fixtures.REPO_ROOT, "refresh_index.py")


class SlowTableEmbedder(retrieval_fixtures.TableEmbedder):
  """TableEmbedder's embeddings, each call slowed by busy work that adds 0,
  so that a refresh runs long enough to be killed between two shards."""

  def __init__(self, vocab_file, table):
    super().__init__(vocab_file, table)
    self._busy = tf.Variable(np.random.default_rng(0).standard_normal(
        [128, 128]).astype(np.float32) * 0.1, trainable=False)

  @tf.function(input_signature=[
      tf.TensorSpec([None, None], tf.int32, name="input_ids"),
      tf.TensorSpec([None, None], tf.int32, name="input_mask"),
      tf.TensorSpec([None, None], tf.int32, name="segment_ids")])
  def projected(self, input_ids, input_mask, segment_ids):
    mask = tf.cast(input_mask, tf.float32)[:, :, None]
    vectors = tf.gather(self._table, input_ids + segment_ids) * mask
    mean = tf.reduce_sum(vectors, 1) / tf.reduce_sum(mask, 1)
    _, busy = tf.while_loop(
        lambda step, x: step < 150,
        lambda step, x: (step + 1, tf.tanh(tf.matmul(x, self._busy))),
        (tf.constant(0), self._busy))
    # tanh keeps it finite: 0 times it is 0.
    return {"default": mean + 0.0 * tf.reduce_sum(busy)}


def write_slow_embedder(directory, seed):
  table = np.random.default_rng(seed).standard_normal(
      [len(retrieval_fixtures.VOCAB), DIM]).astype(np.float32)
  os.makedirs(directory)
  vocab_file = os.path.join(os.path.dirname(directory), "slow_vocab.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    f.write("".join(token + "\n" for token in retrieval_fixtures.VOCAB))
  module = SlowTableEmbedder(vocab_file, table)
  tf.saved_model.save(module, directory, signatures=module.signatures())


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  """A corpus and its retriever (embedder A), embedders B, slow (width 8)
  and narrow (width 4), a GPT-2 tokenizer."""
  directory = str(tmp_path_factory.mktemp("refresh"))
  world = retrieval_fixtures.write_retriever(
      os.path.join(directory, "realm"), num_blocks=NUM_BLOCKS, dim=DIM)
  for name, seed, dim in (("b", 1, DIM), ("narrow", 2, 4)):
    world[name] = os.path.join(directory, name, "embedder")
    retrieval_fixtures.write_embedder(world[name], dim=dim, seed=seed)
  world["slow"] = os.path.join(directory, "slow", "embedder")
  write_slow_embedder(world["slow"], seed=3)
  world["tokenizer_dir"] = os.path.join(directory, "tokenizer")
  cache_fixtures.write_tokenizer(world["tokenizer_dir"])
  world["tokenizer"] = task_specific.load_tokenizer(world["tokenizer_dir"])
  world["root"] = directory
  return world


def refresh(index_root, block_embedder, **settings):
  return index_refresh.refresh(index_refresh.RefreshConfig(
      index_root=index_root, block_embedder=block_embedder,
      **{"shard_size": SHARD_SIZE, "batch_size": 3, **settings}))


def first_refresh(world, index_root):
  """The root's first version: the world's embedder A over its blocks."""
  return refresh(index_root, world["embedder"],
                 retriever_config_path=world["config_path"])


def root_config(index_root):
  return os.path.join(index_root, index_refresh.ROOT_CONFIG_NAME)


def served_block_emb(index_root):
  config = retrievers.load_retriever_config(root_config(index_root))
  return retrievers.load_block_embeddings(config["query_embedder_path"],
                                          config["num_block_records"])


def embedded_at_once(embedder_path, world):
  """Every block through the embedder in one batch (no shards)."""
  return index_refresh.BlockEmbedder(embedder_path, 288).embed(
      retrieval_fixtures.block_titles(NUM_BLOCKS), world["texts"])


def local_retrieval(index_root, world, **settings):
  return live_retrieval.LocalRetrieval(live_retrieval.RetrievalConfig(
      retriever_config_path=root_config(index_root),
      max_block_tokens=MAX_BLOCK_TOKENS, **settings), world["tokenizer"])


# ---------------------------------------------------------------------------
# Refreshing
# ---------------------------------------------------------------------------


def test_refresh_of_realms_tf1_export_gives_back_its_block_embeddings(
    tmp_path, capsys):
  # A copy: reading the blocks writes their offsets beside them.
  fixture = str(tmp_path / "realm_tf1_hub")
  shutil.copytree(retrieval_fixtures.REALM_TF1_HUB, fixture)
  index_root = str(tmp_path / "index")
  record = index_refresh.refresh(index_refresh.RefreshConfig(
      index_root=index_root,
      block_embedder=os.path.join(fixture, "embedder"),
      retriever_config_path=os.path.join(fixture, "retriever_config.json"),
      shard_size=3, batch_size=2))
  assert record["embedding_dim"] == 8 and record["num_blocks"] == 8
  expected = retrievers.load_block_embeddings(
      os.path.join(fixture, "embedder"), 8)
  np.testing.assert_allclose(served_block_emb(index_root), expected,
                             atol=1e-5)
  config = retrievers.load_retriever_config(root_config(index_root))
  assert config["index_name"] == record["name"]
  assert config["query_embedder_path"] == os.path.join(
      index_root, "versions", record["name"], "embedder")
  with open(os.path.join(index_root, "CURRENT"), encoding="utf-8") as f:
    assert f.read() == record["name"] + "\n"
  assert not os.listdir(os.path.join(index_root, "work"))
  # Rerun: the same version, nothing new.
  assert index_refresh.refresh(index_refresh.RefreshConfig(
      index_root=index_root,
      block_embedder=os.path.join(fixture, "embedder"), shard_size=3,
      batch_size=2))["name"] == record["name"]
  assert os.listdir(os.path.join(index_root, "versions")) == [record["name"]]
  assert f"serving version {record['name']}" in capsys.readouterr().out


def test_watching_a_training_run_refreshes_with_each_export(world, tmp_path):
  index_root = str(tmp_path / "index")
  first = first_refresh(world, index_root)
  exports = tmp_path / "exports"
  exports.mkdir()
  latest = str(exports / "latest.json")
  # A run that trains the query embedder alone, then one that trains both.
  utils.atomic_write_json(latest, {"step": 100, "query_embedder": world["b"],
                                   "block_embedder": None})
  pointer = os.path.join(index_root, "CURRENT")

  def export_again():
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      with open(pointer, encoding="utf-8") as f:
        if f.read().strip() != first["name"]:
          break
      time.sleep(0.02)
    utils.atomic_write_json(latest, {
        "step": 200, "query_embedder": world["b"],
        "block_embedder": world["b"]})

  exporter = threading.Thread(target=export_again)
  exporter.start()
  last = index_refresh.refresh(index_refresh.RefreshConfig(
      index_root=index_root, watch_exports=latest, poll_seconds=0.05,
      watch_until_step=200, shard_size=SHARD_SIZE, batch_size=3))
  exporter.join(timeout=120)
  names = sorted(os.listdir(os.path.join(index_root, "versions")))
  assert len(names) == 3 and names[0] == first["name"]
  assert names[2] == last["name"]
  kept = utils.read_json(os.path.join(index_root, "versions", names[1],
                                      "version.json"))
  assert kept["kept_block_embeddings"] and kept["previous"] == first["name"]
  assert kept["query_embedder"] == world["b"]
  np.testing.assert_array_equal(
      retrievers.load_block_embeddings(
          os.path.join(index_root, "versions", names[1], "embedder"),
          NUM_BLOCKS),
      retrievers.load_block_embeddings(
          os.path.join(index_root, "versions", names[0], "embedder"),
          NUM_BLOCKS))
  assert last["block_embedder"] == world["b"]
  assert not last["kept_block_embeddings"]
  np.testing.assert_allclose(served_block_emb(index_root),
                             embedded_at_once(world["b"], world), atol=1e-6)


# ---------------------------------------------------------------------------
# The service's hot swap
# ---------------------------------------------------------------------------


class NamedRetrieval:
  """Answers every question with block 0, under its index version `name`;
  a gate, when given, holds each search until it is set."""

  def __init__(self, name, gate=None):
    self.index_version = name
    self._gate = gate

  def embed(self, questions):
    return np.zeros([len(questions), 2], np.float32)

  def search_vectors(self, vectors, k, with_token_ids=True):
    if self._gate is not None:
      self._gate.wait(30)
    shape = (len(vectors), k)
    return live_retrieval.Neighbours(
        scores=np.zeros(shape, np.float32),
        block_ids=np.zeros(shape, np.int64), token_ids=None)


def question_request():
  return retrieval_service.SearchRequest(
      questions=["q"], query_vectors=None, k=1, with_token_ids=False,
      token_ids_format="lists", with_titles=False)


def test_a_swap_keeps_the_waiting_requests_and_answers_them_from_the_new():
  gate = threading.Event()
  batcher = retrieval_service.SearchBatcher(
      NamedRetrieval("old", gate), max_batch_questions=1,
      health={"index_version": "old"})
  first = batcher.submit(question_request())
  time.sleep(0.2)  # The worker holds `first` at the gate.
  waiting = [batcher.submit(question_request()) for _ in range(3)]
  batcher.swap(NamedRetrieval("new"), {"index_version": "new"})
  assert batcher.health == {"index_version": "new"}
  gate.set()
  assert first.result(timeout=30)["index_version"] == "old"
  assert [future.result(timeout=30)["index_version"]
          for future in waiting] == ["new"] * 3


def test_a_new_version_is_served_in_process_and_swapped_into_the_server(
    world, tmp_path, capsys):
  index_root = str(tmp_path / "index")
  first = first_refresh(world, index_root)
  # Batches padded to other lengths: equal but for float rounding.
  np.testing.assert_allclose(served_block_emb(index_root),
                             embedded_at_once(world["embedder"], world),
                             atol=1e-6)
  config = retrieval_service.ServerConfig(
      retrieval=live_retrieval.RetrievalConfig(
          retriever_config_path=root_config(index_root),
          max_block_tokens=MAX_BLOCK_TOKENS),
      tokenizer=world["tokenizer_dir"], warm_up_k=K)
  retrieval, health, limits = retrieval_service.load_index(
      config, world["tokenizer"])
  batcher = retrieval_service.SearchBatcher(retrieval, 8, health)
  reloader = retrieval_service.IndexReloader(
      config, world["tokenizer"], batcher, limits, health)
  assert not reloader.reload_if_changed()

  second = refresh(index_root, world["b"], query_embedder=world["b"])
  assert second["previous"] == first["name"] != second["name"]
  block_emb = served_block_emb(index_root)
  np.testing.assert_allclose(block_emb, embedded_at_once(world["b"], world),
                             atol=1e-6)
  new = local_retrieval(index_root, world)
  assert new.description["index_name"] == second["name"]
  assert live_retrieval.recorded(new)["index_name"] == second["name"]
  assert new.index_version != retrieval.index_version
  found = new.retrieve(QUESTIONS, K)
  _, expected_ids = retrieval_fixtures.brute_force_top_k(
      new.embed(QUESTIONS), block_emb, K)
  np.testing.assert_array_equal(found.block_ids, expected_ids)
  # The server's reloader swaps the new version in.
  assert reloader.reload_if_changed()
  assert batcher.health["index_name"] == second["name"]
  assert batcher.health["index_version"] == new.index_version
  answer = batcher.submit(question_request()).result(timeout=30)
  assert answer["index_version"] == new.index_version
  assert "now serving index version" in capsys.readouterr().out

  # A refresh back to the first version (still on disk) switches back.
  assert refresh(index_root, world["embedder"],
                 query_embedder=world["embedder"])["name"] == first["name"]
  assert sorted(os.listdir(os.path.join(index_root, "versions"))) == sorted(
      [first["name"], second["name"]])
  capsys.readouterr()
  # A pointer to a version that is not there: reported once, and the
  # served version goes on serving.
  utils.atomic_write_text(os.path.join(index_root, "CURRENT"), "9999-gone\n")
  assert not reloader.reload_if_changed()
  assert not reloader.reload_if_changed()
  reported = capsys.readouterr().out.splitlines()
  assert len(reported) == 1 and "names version '9999-gone'" in reported[0]
  assert f"still serving version {second['name']}" in reported[0]
  assert batcher.health["index_name"] == second["name"]


def _post_search(url):
  """(HTTP status, JSON answer) of a search for QUESTIONS."""
  request = urllib.request.Request(
      f"{url}/search", data=json.dumps({"questions": QUESTIONS, "k": K,
                                        "with_token_ids": False}).encode(),
      headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.status, json.load(response)
  except urllib.error.HTTPError as error:
    return error.code, json.load(error)


def _shards(index_root):
  return glob.glob(os.path.join(index_root, "work", "*", "shard-*.npy"))


@contextlib.contextmanager
def serving(config):
  """retrieval_server.py's service in this process: its URL while the block
  runs."""
  server, sock = retrieval_service.start(config)
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
  thread.start()
  try:
    while not server.started:
      time.sleep(0.01)
    yield retrieval_service.url_of(sock)
  finally:
    server.should_exit = True
    thread.join(timeout=30)


def _kill_at_the_first_shard(refresher, index_root, deadline):
  """SIGKILLs the refresher once it has written a shard (or at the deadline)."""
  while not _shards(index_root) and refresher.poll() is None and (
      time.monotonic() < deadline):
    time.sleep(0.01)
  refresher.send_signal(signal.SIGKILL)
  refresher.wait(timeout=30)


@pytest.mark.slow
def test_a_killed_refresh_leaves_the_old_version_serving_and_its_rerun_swaps(
    world, tmp_path, capsys):
  index_root = str(tmp_path / "index")
  first = first_refresh(world, index_root)
  deadline = time.monotonic() + 240
  # The refresher starts first (it takes seconds to import TensorFlow) and
  # is killed as soon as it has written a shard, whether the server is up
  # yet or not.
  refresher = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, REFRESH, f"--index_root={index_root}",
       f"--block_embedder={world['slow']}",
       f"--query_embedder={world['slow']}", f"--shard_size={SHARD_SIZE}",
       "--batch_size=3"],
      cwd=server_fixtures.REPO_ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  killer = threading.Thread(target=_kill_at_the_first_shard,
                            args=(refresher, index_root, deadline))
  killer.start()
  answers, stop = [], threading.Event()

  def keep_asking(url):
    # Paced: the server and this process have other work on a small machine.
    while not stop.wait(0.05):
      answers.append(_post_search(url))

  with serving(retrieval_service.ServerConfig(
      retrieval=live_retrieval.RetrievalConfig(
          retriever_config_path=root_config(index_root),
          max_block_tokens=MAX_BLOCK_TOKENS),
      tokenizer=world["tokenizer_dir"], port=0, reload_seconds=0.2,
      warm_up_k=K)) as url:
    old_version = server_fixtures.health(url)["index_version"]
    asker = threading.Thread(target=keep_asking, args=(url,))
    asker.start()
    killer.join(timeout=240)
    # Killed mid-way: some shards, no new version.
    assert 0 < len(_shards(index_root)) < NUM_BLOCKS // SHARD_SIZE
    assert os.listdir(os.path.join(index_root, "versions")) == [first["name"]]
    time.sleep(0.5)  # A few reload polls.
    status, answer = _post_search(url)
    assert status == 200 and answer["index_version"] == old_version
    # The rerun resumes and completes; the server swaps it in.
    second = refresh(index_root, world["slow"], query_embedder=world["slow"])
    assert "resuming" in capsys.readouterr().out
    new = local_retrieval(index_root, world)
    while server_fixtures.health(url)["index_name"] != second["name"]:
      assert time.monotonic() < deadline
      time.sleep(0.1)
    time.sleep(0.3)  # Answers from the new version too.
    stop.set()
    asker.join(timeout=60)
    status, answer = _post_search(url)
  assert status == 200 and answer["index_version"] == new.index_version
  assert answer["block_ids"] == new.retrieve(QUESTIONS, K).block_ids.tolist()
  # Every request answered, by the old version, then by the new one.
  versions = [answer["index_version"] for status, answer in answers]
  assert all(status == 200 for status, _ in answers)
  assert versions[0] == old_version != new.index_version == versions[-1]
  switch = versions.index(new.index_version)
  assert set(versions[:switch]) == {old_version}
  assert set(versions[switch:]) == {new.index_version}
  # The same embeddings as an uninterrupted refresh.
  uninterrupted = str(tmp_path / "uninterrupted")
  first_refresh(world, uninterrupted)
  refresh(uninterrupted, world["slow"], query_embedder=world["slow"])
  np.testing.assert_array_equal(served_block_emb(index_root),
                                served_block_emb(uninterrupted))


# ---------------------------------------------------------------------------
# Bad inputs: one line naming the culprit
# ---------------------------------------------------------------------------


@pytest.fixture(name="refreshed_root", scope="module")
def fixture_refreshed_root(world):
  index_root = os.path.join(world["root"], "bad-inputs-index")
  first_refresh(world, index_root)
  return index_root


def _one_line_error(run):
  with pytest.raises(utils.UserError) as error:
    run()
  message = str(error.value)
  assert "\n" not in message
  return message


def test_a_block_embedder_of_another_width_is_refused(world, refreshed_root):
  message = _one_line_error(lambda: refresh(refreshed_root, world["narrow"]))
  assert world["narrow"] in message and "4-dimensional" in message
  assert world["embedder"] not in message  # The version's copy is named.
  assert f"{refreshed_root}/versions/" in message and "gives 8" in message
  # Both embedders narrow: the index's width is the one that differs.
  message = _one_line_error(lambda: refresh(
      refreshed_root, world["narrow"], query_embedder=world["narrow"]))
  assert world["narrow"] in message and refreshed_root in message
  assert "4-dimensional" in message and "serves 8" in message
  assert len(os.listdir(os.path.join(refreshed_root, "versions"))) == 1


def _write_json(path, content):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(content, f)
  return str(path)


def test_bad_refresh_settings_are_refused(world, refreshed_root, tmp_path):
  cases = {
      "--block_embedder is required": lambda: refresh(
          str(tmp_path / "r"), None,
          retriever_config_path=world["config_path"]),
      "the embedders come from its exports": lambda: refresh(
          str(tmp_path / "r"), world["embedder"],
          watch_exports=str(tmp_path / "latest.json")),
      "expected train_retriever.py's latest.json": lambda: refresh(
          str(tmp_path / "r"), None, watch_exports=_write_json(
              tmp_path / "latest.json", {"step": 3})),
      "--retriever_config_path is required": lambda: refresh(
          str(tmp_path / "r"), world["embedder"]),
      "no title_records": lambda: refresh(
          str(tmp_path / "r"), world["embedder"],
          retriever_config_path=_write_json(tmp_path / "untitled.json", {
              "query_embedder_path": world["embedder"],
              "text_records": world["blocks"],
              "num_block_records": NUM_BLOCKS})),
      "its blocks are not those of": lambda: refresh(
          refreshed_root, world["embedder"],
          retriever_config_path=os.path.join(
              retrieval_fixtures.REALM_TF1_HUB, "retriever_config.json")),
      "--block_embedder=/nowhere: not a directory": lambda: refresh(
          refreshed_root, "/nowhere"),
      "--shard_size=0: must be at least 1": lambda: refresh(
          refreshed_root, world["embedder"], shard_size=0),
      "--index_root=gs://b/i: expected a local directory": lambda: refresh(
          "gs://b/i", world["embedder"]),
  }
  for expected, run in cases.items():
    assert expected in _one_line_error(run), expected
  assert not os.path.exists(tmp_path / "r")


def test_a_negative_reload_interval_is_refused():
  assert _one_line_error(lambda: retrieval_service.check_config(
      retrieval_service.ServerConfig(
          retrieval=live_retrieval.RetrievalConfig(
              retriever_config_path="index/retriever_config.json"),
          reload_seconds=-1))) == "--reload_seconds=-1: must be at least 0"


def test_bad_index_roots_are_refused(world, refreshed_root, tmp_path):
  broken = str(tmp_path / "broken")
  shutil.copytree(refreshed_root, broken)
  utils.atomic_write_text(os.path.join(broken, "CURRENT"), "0042-gone\n")
  message = _one_line_error(lambda: retrievers.load_retriever_config(
      root_config(broken)))
  assert "CURRENT: names version '0042-gone', but there is no" in message
  empty = tmp_path / "empty"
  empty.mkdir()
  message = _one_line_error(lambda: retrievers.load_retriever_config(
      _write_json(empty / "config.json", {"index_root": "."})))
  assert f"{empty}: no CURRENT" in message
  message = _one_line_error(lambda: retrievers.load_retriever_config(
      _write_json(tmp_path / "mixed.json", {"index_root": refreshed_root,
                                            "num_block_records": 3})))
  assert "holds one key, index_root" in message
  message = _one_line_error(lambda: local_retrieval(
      refreshed_root, world, search="scann",
      scann_config_path=os.path.join(server_fixtures.REPO_ROOT, "configs",
                                     "scann_configs", "small.json"),
      scann_index_dir=str(tmp_path / "scann")))
  assert "keeps the ScaNN index of each version itself" in message
