"""The cacher (`caching.cache`) on a tiny demo world, in-process through the library.

The cache is checked against a NumPy brute force computed independently of
`retrievers.py`; REALM's own TF1 Hub export and real KILT lines
(`../shared/fixtures/`) go through it; bad settings and inputs are
`utils.UserError`s naming the flag or file. query_cacher_tfrecord.py runs as
a subprocess only for what the command line alone shows: exit 2 with one
line, a SIGKILLed run resumed to the uninterrupted cache byte for byte, and
a second cacher refused by the lock of the first.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import transformers

import cache_fixtures
import caching
from conftest import LOGICAL_CPUS
import context_draw
import kilt_files
import neighbour_cache
import retrieval_fixtures
import retrievers
import settings
import task_specific
import token_store
from util_scripts import demo_world
import utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHER = os.path.join(REPO_ROOT, "query_cacher_tfrecord.py")
NUM_NEIGHBOURS = 8
MAX_BLOCK_TOKENS = 24
# Small batches and several shards, so that a kill lands between shards.
CACHE_SETTINGS = {"num_neighbours": NUM_NEIGHBOURS, "num_shards": 4,
                  "batch_size": 4, "max_block_tokens": MAX_BLOCK_TOKENS}


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("world"))
  return demo_world.build_world(
      directory, num_train=160, num_validation=12, num_test=6,
      num_distractor_blocks=150, gpt2_vocab_size=300)


def world_settings(world, output_dir, dataset_root=None):
  """The flat settings of a cacher run on `world` into `output_dir`."""
  paths = world["paths"]
  return {"retriever_config_path": paths["retriever_config"],
          "dataset_root": dataset_root or paths["kilt_dir"],
          "output_dir": output_dir, "tokenizer": paths["tokenizer"],
          **CACHE_SETTINGS}


def cache(world, output_dir, /, **values):
  """`caching.cache` of the world's settings, `values` overriding them."""
  return caching.cache(settings.from_flat(caching.CacheConfig, {
      **world_settings(world, output_dir), **values}, "test"))


def cacher_command(world, output_dir, dataset_root=None):
  return [sys.executable, CACHER] + [
      f"--{name}={value}" for name, value in
      world_settings(world, output_dir, dataset_root).items()]


def run_command(command):
  return subprocess.run(
      command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)


@pytest.fixture(name="cache_dir", scope="module")
def fixture_cache_dir(world, tmp_path_factory):
  """An uninterrupted run."""
  output_dir = str(tmp_path_factory.mktemp("cache"))
  cache(world, output_dir)
  return output_dir


def read_split(cache_dir, split):
  manifest = neighbour_cache.read_manifest(cache_dir)
  dataset = tf.data.TFRecordDataset(
      neighbour_cache.split_files(cache_dir, manifest, split)).map(
          neighbour_cache.parse_example)
  return [{name: value.to_list() if isinstance(value, tf.RaggedTensor)
           else value.numpy() for name, value in record.items()}
          for record in dataset]


def kilt_records(kilt_dir, split):
  path = os.path.join(kilt_dir, kilt_files.ELI5_SPLIT_FILES[split])
  return [record for _, record in kilt_files.read_jsonl(path, "KILT file")]


def brute_force_neighbours(world, questions):
  """Top neighbours by NumPy, from the embedder's own signature and BERT's tokenizer."""
  embedder_dir = world["paths"]["embedder"]
  projected = hub.load(embedder_dir).signatures["projected"]
  bert = transformers.BertTokenizer(
      os.path.join(embedder_dir, "assets", "vocab.txt"), do_lower_case=True)
  queries = np.concatenate([projected(
      input_ids=tf.constant([ids]), input_mask=tf.ones([1, len(ids)], tf.int32),
      segment_ids=tf.zeros([1, len(ids)], tf.int32))["default"].numpy()
                            for ids in bert(questions)["input_ids"]])
  block_emb = tf.train.load_variable(
      os.path.join(embedder_dir, "encoded", "encoded.ckpt"), "block_emb")
  return retrieval_fixtures.brute_force_top_k(queries, block_emb,
                                              NUM_NEIGHBOURS)


def read_texts(path):
  return [record.decode("utf-8")
          for record in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def test_cache_holds_every_question_with_brute_force_neighbours(world,
                                                                cache_dir):
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(
      world["paths"]["tokenizer"])
  block_texts = read_texts(world["paths"]["blocks"])
  manifest = neighbour_cache.read_manifest(cache_dir)
  assert manifest["num_neighbours"] == NUM_NEIGHBOURS
  assert manifest["num_blocks"] == world["num_blocks"]
  assert manifest["titles_path"] == world["paths"]["titles"]
  assert manifest["max_query_length"] == 0
  assert manifest["context_with_title"] is False
  assert manifest["search"] == {"kind": "exact"}
  assert manifest["tokenizer_fingerprint"] == (
      neighbour_cache.tokenizer_fingerprint(tokenizer))
  assert sorted(os.listdir(cache_dir)) == sorted(
      [neighbour_cache.MANIFEST_NAME] +
      [name for split in manifest["splits"].values()
       for name in split["shards"]])
  for split in neighbour_cache.SPLITS:
    records = read_split(cache_dir, split)
    kilt = kilt_records(world["paths"]["kilt_dir"], split)
    # Every question once, in file order: no duplicate, none missing.
    assert [r["id"].decode() for r in records] == [k["id"] for k in kilt]
    assert manifest["splits"][split]["num_records"] == len(kilt)
    questions = [k["input"] for k in kilt]
    expected_scores, expected_ids = brute_force_neighbours(world, questions)
    for record, kilt_record, scores, block_ids in zip(
        records, kilt, expected_scores, expected_ids):
      np.testing.assert_array_equal(record["neighbour_block_ids"], block_ids)
      np.testing.assert_allclose(record["neighbour_scores"], scores,
                                 rtol=1e-5, atol=1e-5)
      assert record["question"].decode() == kilt_record["input"]
      # Tokenized as they follow a helper word: with a leading space.
      assert record["question_ids"].tolist() == tokenizer(
          " " + kilt_record["input"])["input_ids"]
      answers = [output["answer"] for output in kilt_record.get("output", [])
                 if "answer" in output]
      assert record["answers"] == [
          tokenizer(" " + answer)["input_ids"] for answer in answers]
      assert record["neighbours"] == [
          tokenizer(" " + block_texts[i])["input_ids"][:MAX_BLOCK_TOKENS]
          for i in block_ids]
    if split == "test":
      assert all(r["answers"] == [] for r in records)


def test_a_complete_cache_is_kept_and_other_settings_are_refused(
    world, cache_dir, capsys):
  before = cache_fixtures.directory_contents(cache_dir)
  cache(world, cache_dir)
  assert "already complete" in capsys.readouterr().out
  assert cache_fixtures.directory_contents(cache_dir) == before
  with pytest.raises(utils.UserError) as error:
    cache(world, cache_dir, num_neighbours=NUM_NEIGHBOURS - 1)
  assert "complete cache made with other settings" in str(error.value)
  assert (f"num_neighbours is {NUM_NEIGHBOURS}, this run asks for "
          f"{NUM_NEIGHBOURS - 1}") in str(error.value)
  assert cache_fixtures.directory_contents(cache_dir) == before


@pytest.mark.slow  # A subprocess killed mid-run; acceptance of resumability.
def test_killed_run_resumes_to_the_uninterrupted_cache(world, cache_dir,
                                                       tmp_path):
  output_dir = str(tmp_path / "cache")
  first_shard = os.path.join(output_dir, "train-00000-of-00004.tfrecord")
  # The killed run splits its CPU (--num_cpu_devices, which only a fresh
  # process can do) and searches on the first device, as the resumed one.
  process = subprocess.Popen(
      cacher_command(world, output_dir) + ["--num_cpu_devices=2"],
      cwd=REPO_ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  deadline = time.time() + 240
  while not os.path.exists(first_shard) and process.poll() is None:
    assert time.time() < deadline, "the first shard never appeared"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "finished before the kill"
  left = os.listdir(output_dir)
  assert neighbour_cache.MANIFEST_NAME not in left
  assert caching.PENDING_MANIFEST_NAME in left

  cache(world, output_dir)
  assert cache_fixtures.directory_contents(output_dir) == cache_fixtures.directory_contents(cache_dir)


def _assert_one_line_error(result, *fragments):
  assert result.returncode == utils.USER_ERROR_EXIT_CODE, result.stderr
  error_lines = [line for line in result.stderr.splitlines()
                 if line.startswith("error: ")]
  assert len(error_lines) == 1, result.stderr
  assert result.stderr.rstrip().splitlines()[-1] == error_lines[0]
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in error_lines[0]


def _copy_kilt_dir(world, tmp_path):
  dataset_root = str(tmp_path / "kilt")
  shutil.copytree(world["paths"]["kilt_dir"], dataset_root)
  return dataset_root


def _drop_input_of_line_3(path):
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  broken = json.loads(lines[2])
  del broken["input"]
  lines[2] = json.dumps(broken) + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(lines)


@pytest.mark.slow
def test_command_line_bad_kilt_line_exits_2_with_one_line(world, tmp_path):
  dataset_root = _copy_kilt_dir(world, tmp_path)
  dev_path = os.path.join(dataset_root,
                          kilt_files.ELI5_SPLIT_FILES["validation"])
  _drop_input_of_line_3(dev_path)
  output_dir = str(tmp_path / "cache")
  result = run_command(cacher_command(world, output_dir, dataset_root))
  _assert_one_line_error(result, f"{dev_path}: line 3", "no string 'input'")
  assert not os.path.exists(output_dir)


def _write_empty(path):
  with open(path, "w", encoding="utf-8"):
    pass


def _make_directory(path):
  os.remove(path)
  os.mkdir(path)


def _write_latin1(path):
  with open(path, "ab") as f:
    f.write('{"id": "x", "input": "caf\xe9"}\n'.encode("latin-1"))


def _write_numeric_answer(path):
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "x", "input": "why?",
                        "output": [{"answer": 42}]}) + "\n")


def _write_repeated_id(path):
  with open(path, encoding="utf-8") as f:
    first = f.readline()
  with open(path, "a", encoding="utf-8") as f:
    f.write(first)


@pytest.mark.parametrize("split, damage, message", [
    ("validation", _drop_input_of_line_3, "line 3: no string 'input'"),
    ("train", _write_empty, "no lines (an empty KILT ELI5 file)"),
    ("train", _make_directory, "is a directory, expected a jsonl file"),
    ("train", _write_latin1, "not UTF-8"),
    ("train", _write_numeric_answer, "an 'answer' is int, expected a string"),
    ("train", _write_repeated_id, "appears more than once"),
])
def test_bad_kilt_file_is_refused_before_anything_is_written(
    world, tmp_path, split, damage, message):
  dataset_root = _copy_kilt_dir(world, tmp_path)
  path = os.path.join(dataset_root, kilt_files.ELI5_SPLIT_FILES[split])
  damage(path)
  output_dir = str(tmp_path / "cache")
  with pytest.raises(utils.UserError) as error:
    cache(world, output_dir, dataset_root=dataset_root)
  assert path in str(error.value) and message in str(error.value)
  assert not os.path.exists(output_dir)


@pytest.mark.parametrize("values, message", [
    ({"retriever_config_path": None}, "--retriever_config_path is required"),
    ({"dataset_root": ""}, "--dataset_root is required"),
    ({"output_dir": None}, "--output_dir is required"),
    ({"num_neighbours": -1}, "--num_neighbours=-1: must be >= 0"),
    ({"num_shards": 0}, "--num_shards=0: must be at least 1"),
    ({"block_token_cache_size": -1},
     "--block_token_cache_size=-1: must be >= 0"),
    ({"splits": ["validation", "dev"]},
     "--splits=validation,dev: expected some of train, validation, test"),
    ({"splits": []}, "--splits=: expected some of"),
    ({"search": "annoy"}, "--search=annoy: expected one of exact, scann"),
    ({"search": "scann"}, "--search=scann needs --scann_config_path"),
    ({"max_query_length": 1},
     "--max_query_length=1: expected 0 (no cut) or at least 2"),
])
def test_bad_settings_are_refused_naming_the_flag(world, tmp_path, values,
                                                  message):
  output_dir = str(tmp_path / "cache")
  with pytest.raises(utils.UserError, match=re.escape(message)):
    cache(world, output_dir, **values)
  assert not os.path.exists(output_dir)


@pytest.mark.slow
def test_a_second_cacher_on_one_output_fails_at_once_naming_the_holder(
    world, tmp_path):
  output_dir = str(tmp_path / "cache")
  with utils.locked_directory(output_dir, caching.LOCK_NAME, "a test's hold"):
    result = run_command(cacher_command(world, output_dir))
    _assert_one_line_error(result, f"neighbour cache {output_dir}",
                           f"pid {os.getpid()}")
    assert os.listdir(output_dir) == [caching.LOCK_NAME]
  # Released: the cacher runs.
  cache(world, output_dir, splits=["validation"])
  assert caching.LOCK_NAME not in os.listdir(output_dir)


def test_more_neighbours_than_blocks_is_refused(world, tmp_path):
  output_dir = str(tmp_path / "cache")
  with pytest.raises(utils.UserError,
                     match=f"there are only {world['num_blocks']} blocks"):
    cache(world, output_dir, num_neighbours=world["num_blocks"] + 1)
  assert not os.path.exists(output_dir)


def test_exact_search_split_over_devices_writes_the_same_shards(world,
                                                                cache_dir,
                                                                tmp_path):
  output_dir = str(tmp_path / "cache")
  cache(world, output_dir, splits=["validation"],
        distribute_mode="MirroredStrategy", devices=LOGICAL_CPUS[:2])
  manifest = neighbour_cache.read_manifest(output_dir)
  assert list(manifest["splits"]) == ["validation"]
  for name in manifest["splits"]["validation"]["shards"]:
    with open(os.path.join(output_dir, name), "rb") as mine, open(
        os.path.join(cache_dir, name), "rb") as reference:
      assert mine.read() == reference.read()


def test_scann_cache_saves_its_index_and_records_its_config(world, tmp_path):
  scann_config = {"num_neighbors": NUM_NEIGHBOURS, "num_leaves": 4,
                  "num_leaves_to_search": 4, "training_sample_size": 1000,
                  "reordering_num_neighbors": 40}
  scann_config_path = tmp_path / "scann.json"
  scann_config_path.write_text(json.dumps(scann_config))
  output_dir = str(tmp_path / "cache")
  index_dir = str(tmp_path / "index")
  cache(world, output_dir, splits=["test"], search="scann",
        scann_config_path=str(scann_config_path), scann_index_dir=index_dir)
  manifest = neighbour_cache.read_manifest(output_dir)
  assert manifest["search"] == dict(
      scann_config, kind="scann", dims_per_block=2,
      anisotropic_quantization_threshold=0.2)
  assert os.path.exists(os.path.join(index_dir, "scann_config.json"))
  # Every leaf searched and the candidates rescored: the exact neighbours.
  kilt = kilt_records(world["paths"]["kilt_dir"], "test")
  _, expected_ids = brute_force_neighbours(world, [k["input"] for k in kilt])
  records = read_split(output_dir, "test")
  np.testing.assert_array_equal(
      [r["neighbour_block_ids"] for r in records], expected_ids)


def test_old_manifest_without_titles_path_reads_as_none(tmp_path):
  manifest = cache_fixtures.write_cache(
      str(tmp_path), {"validation": cache_fixtures.random_records(
          2, num_neighbours=2, vocab_size=50, seed=0)},
      num_neighbours=2, vocab_size=50)
  assert "titles_path" not in manifest
  assert neighbour_cache.read_manifest(str(tmp_path))["titles_path"] is None


def test_old_manifest_without_tokenizer_fingerprint_is_read_with_a_warning(
    tmp_path, caplog):
  """Caches made before the fingerprint stay readable: the vocabulary size
  alone is checked, and a warning says so; a fingerprint that differs is
  refused (issue 13: a manifest copied from another tokenizer's cache)."""
  manifest = cache_fixtures.write_cache(
      str(tmp_path), {"validation": cache_fixtures.random_records(
          2, num_neighbours=2, vocab_size=50, seed=0)},
      num_neighbours=2, vocab_size=50)
  del manifest["tokenizer_fingerprint"]
  neighbour_cache.check_manifest(manifest, str(tmp_path), vocab_size=50,
                                 tokenizer_fingerprint="any")
  assert "predates tokenizer fingerprints" in caplog.text
  with pytest.raises(utils.UserError, match="differs from the tokenizer"):
    neighbour_cache.check_manifest(
        {**manifest, "tokenizer_fingerprint": "another"}, str(tmp_path),
        vocab_size=50, tokenizer_fingerprint="any")


def _write_config(path, **config):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  return str(path)


def test_context_with_title_caches_title_and_text(world, tmp_path):
  output_dir = str(tmp_path / "cache")
  manifest = cache(world, output_dir, splits=["validation"],
                   context_with_title=True)
  assert manifest["context_with_title"] is True
  assert neighbour_cache.read_manifest(output_dir) == manifest
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(
      world["paths"]["tokenizer"])
  texts = read_texts(world["paths"]["blocks"])
  titles = read_texts(world["paths"]["titles"])
  for record in read_split(output_dir, "validation"):
    assert record["neighbours"] == [
        tokenizer(f" {titles[i]}: {texts[i]}")["input_ids"][:MAX_BLOCK_TOKENS]
        for i in record["neighbour_block_ids"]]


def test_context_with_title_without_titles_is_refused(world, tmp_path):
  paths = world["paths"]
  config = _write_config(tmp_path / "retriever.json",
                         query_embedder_path=paths["embedder"],
                         text_records=paths["blocks"],
                         num_block_records=world["num_blocks"])
  output_dir = str(tmp_path / "cache")
  with pytest.raises(utils.UserError) as error:
    cache(world, output_dir, retriever_config_path=config,
          context_with_title=True)
  assert f"--context_with_title: {config} has no title_records" in str(
      error.value)
  assert not os.path.exists(output_dir)


def test_titles_of_another_count_are_refused(world, tmp_path):
  paths = world["paths"]
  titles = str(tmp_path / "titles.tfr")
  retrieval_fixtures.write_blocks(titles, ["only", "two"])
  config = _write_config(tmp_path / "retriever.json",
                         query_embedder_path=paths["embedder"],
                         text_records=paths["blocks"], title_records=titles,
                         num_block_records=world["num_blocks"])
  output_dir = str(tmp_path / "cache")
  with pytest.raises(utils.UserError) as error:
    cache(world, output_dir, retriever_config_path=config)
  assert (f"{titles}: holds 2 titles, but {paths['blocks']} holds "
          f"{world['num_blocks']} blocks") in str(error.value)
  assert not os.path.exists(output_dir)


def test_realm_tf1_hub_export_and_real_kilt_lines_are_cached(tmp_path,
                                                             monkeypatch):
  """Acceptance: the cacher runs to the end on REALM's own export format."""
  tokenizer_dir = str(tmp_path / "tokenizer")
  tokenizer = cache_fixtures.write_tokenizer(tokenizer_dir)
  config_path = os.path.join(retrieval_fixtures.REALM_TF1_HUB,
                             "retriever_config.json")
  output_dir = str(tmp_path / "cache")
  # The fixture is read-only: block offsets go to a cache dir of the test's.
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  manifest = caching.cache(caching.CacheConfig(
      retriever_config_path=config_path,
      dataset_root=retrieval_fixtures.KILT_ELI5_SAMPLE, output_dir=output_dir,
      tokenizer=tokenizer_dir, num_neighbours=8, num_shards=2, batch_size=3,
      max_block_tokens=16, context_with_title=True))
  config = utils.read_json(config_path)
  assert manifest["titles_path"] == os.path.join(
      retrieval_fixtures.REALM_TF1_HUB, config["title_records"])
  texts = read_texts(manifest["blocks_path"])
  titles = read_texts(manifest["titles_path"])
  for split in neighbour_cache.SPLITS:
    records = read_split(output_dir, split)
    kilt = kilt_records(retrieval_fixtures.KILT_ELI5_SAMPLE, split)
    assert [r["id"].decode() for r in records] == [k["id"] for k in kilt]
    for record in records:
      # All 8 blocks, best first.
      assert sorted(record["neighbour_block_ids"]) == list(range(8))
      assert np.all(np.diff(record["neighbour_scores"]) <= 0)
      assert record["neighbours"] == [
          tokenizer(f" {titles[i]}: {texts[i]}")["input_ids"][:16]
          for i in record["neighbour_block_ids"]]


# ---------------------------------------------------------------------------
# The pre-tokenised block store (token_store) and question-only caches
# ---------------------------------------------------------------------------


def _block_token_store(world, output_dir, **values):
  return token_store.pretokenize(token_store.PretokenizeConfig(
      retriever_config_path=world["paths"]["retriever_config"],
      output_dir=output_dir, tokenizer=world["paths"]["tokenizer"], **values))


class _NoTokenizing:
  """Stands in for `token_store.BlockTokenCache`: fails if a block is
  tokenized, so a test knows the store gave the ids."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def token_ids(self, block_ids):
    raise AssertionError(f"blocks {list(block_ids)[:3]}... were tokenized")


def test_a_cache_made_with_a_block_token_store_is_the_same_bytes(
    world, cache_dir, tmp_path, monkeypatch):
  store_dir = str(tmp_path / "block_tokens")
  _block_token_store(world, store_dir)  # Whole blocks serve any cut.
  monkeypatch.setattr(token_store, "BlockTokenCache", _NoTokenizing)
  output_dir = str(tmp_path / "cache")
  manifest = cache(world, output_dir, block_token_store=store_dir)
  assert manifest == neighbour_cache.read_manifest(cache_dir)
  assert cache_fixtures.directory_contents(output_dir) == cache_fixtures.directory_contents(cache_dir)


def test_a_titled_block_token_store_gives_the_titled_cache(world, tmp_path):
  store_dir = str(tmp_path / "block_tokens")
  _block_token_store(world, store_dir, context_with_title=True,
                     max_block_tokens=MAX_BLOCK_TOKENS + 10)
  with_store, without = str(tmp_path / "with"), str(tmp_path / "without")
  cache(world, with_store, splits=["validation"], context_with_title=True,
        block_token_store=store_dir)
  cache(world, without, splits=["validation"], context_with_title=True)
  assert cache_fixtures.directory_contents(with_store) == cache_fixtures.directory_contents(without)


def test_a_block_token_store_that_does_not_fit_is_refused_at_once(
    world, tmp_path, monkeypatch):
  store_dir = str(tmp_path / "block_tokens")
  _block_token_store(world, store_dir, max_block_tokens=MAX_BLOCK_TOKENS - 1)
  monkeypatch.setattr(retrievers, "LiveRetriever", _NoRetriever)
  output_dir = str(tmp_path / "cache")
  with pytest.raises(utils.UserError) as error:
    cache(world, output_dir, block_token_store=store_dir)
  assert str(error.value).startswith(
      f"{store_dir}: holds the first {MAX_BLOCK_TOKENS - 1} GPT-2 ids")
  with pytest.raises(utils.UserError, match="holds blocks tokenized without "
                     "titles"):
    cache(world, output_dir, block_token_store=store_dir,
          max_block_tokens=MAX_BLOCK_TOKENS - 1, context_with_title=True)
  assert not os.path.exists(output_dir)


class _NoRetriever:
  """Stands in for `retrievers.LiveRetriever`: fails if one is loaded."""

  def __init__(self, *args, **kwargs):
    raise AssertionError("a retriever was loaded")


@pytest.fixture(name="question_cache_dir", scope="module")
def fixture_question_cache_dir(world, tmp_path_factory):
  """A question-only cache, made without a retriever config."""
  output_dir = str(tmp_path_factory.mktemp("questions"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(retrievers, "LiveRetriever", _NoRetriever)
    cache(world, output_dir, num_neighbours=0, retriever_config_path=None)
  return output_dir


def test_a_question_only_cache_holds_questions_and_answers_only(
    world, cache_dir, question_cache_dir, capsys):
  manifest = neighbour_cache.read_manifest(question_cache_dir)
  full = neighbour_cache.read_manifest(cache_dir)
  assert manifest["search"] == {"kind": "none"}
  assert manifest["num_neighbours"] == 0
  for name in ("embedder_path", "blocks_path", "titles_path", "num_blocks"):
    assert manifest[name] is None, name
  assert (manifest["max_block_tokens"], manifest["max_query_length"],
          manifest["context_with_title"]) == (0, 0, False)
  for name in ("tokenizer", "tokenizer_fingerprint", "vocab_size", "splits"):
    assert manifest[name] == full[name], name
  for split in neighbour_cache.SPLITS:
    questions, neighbours = (read_split(question_cache_dir, split),
                             read_split(cache_dir, split))
    for record, reference in zip(questions, neighbours, strict=True):
      for name in ("id", "question", "question_ids", "answers"):
        np.testing.assert_array_equal(record[name], reference[name])
      assert record["neighbours"] == []
      assert record["neighbour_block_ids"].shape == (0,)
      assert record["neighbour_scores"].shape == (0,)
  # The retrieval settings are not used, so they do not tell it apart.
  before = cache_fixtures.directory_contents(question_cache_dir)
  cache(world, question_cache_dir, num_neighbours=0, search="scann",
        max_block_tokens=7, context_with_title=True)
  assert "already complete" in capsys.readouterr().out
  assert cache_fixtures.directory_contents(question_cache_dir) == before


def _validation_batches(cache_dir, tokenizer, approach):
  manifest = neighbour_cache.read_manifest(cache_dir)
  config = task_specific.DataConfig(approach=approach, num_retrievals=2)
  task_specific.check_data_config(config, manifest, cache_dir)
  layout = task_specific.make_layout(tokenizer, task_specific.LayoutConfig(
      max_question_tokens=8, max_answer_tokens=8, max_context_tokens=8), 64)
  dataset = task_specific.make_dataset(
      neighbour_cache.split_files(cache_dir, manifest, "validation"), config,
      layout, batch_size=4, training=False)
  return [{name: value.numpy() for name, value in batch.items()}
          for batch in dataset]


@pytest.mark.slow
def test_naked_lm_reads_a_question_only_cache_and_cached_pretok_is_refused(
    world, cache_dir, question_cache_dir):
  tokenizer = task_specific.load_tokenizer(world["paths"]["tokenizer"])
  naked = context_draw.Approach.NAKED_LM
  for found, expected in zip(
      _validation_batches(question_cache_dir, tokenizer, naked),
      _validation_batches(cache_dir, tokenizer, naked), strict=True):
    for name in expected:
      np.testing.assert_array_equal(found[name], expected[name])
  for approach in (context_draw.Approach.CACHED_PRETOK,
                   context_draw.Approach.RANDOM_CONTEXT):
    with pytest.raises(utils.UserError) as error:
      _validation_batches(question_cache_dir, tokenizer, approach)
    assert str(error.value).startswith(f"{question_cache_dir}: ")
