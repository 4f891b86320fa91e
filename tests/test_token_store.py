"""The pre-tokenised block store (`token_store.pretokenize`, `open_store`) and `block_tokens`.

The store's ids are checked on every block of a fixture corpus against
`BlockTokenCache` (tokenizing on demand) and against the tokenizer itself,
with and without titles; a store cut at M serves shorter cuts; stores of
another tokenizer, titles setting, corpus or a shorter cut are refused with
one line naming the store. A run failed mid-way (in-process, at two points)
and one SIGKILLed as a subprocess resume to the uninterrupted run's bytes.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tokenizers
import transformers

import block_store
import cache_fixtures
import retrieval_fixtures
import task_specific
import token_store
import utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETOKENIZE = os.path.join(REPO_ROOT, "util_scripts", "pretokenize_blocks.py")
BATCH_SIZE = 7


def corpus_texts():
  """Blocks of every kind: empty, one word, long, non-ASCII, spaces."""
  texts = cache_fixtures.fixture_text(num_lines=40, seed=3)
  texts[3] = ""
  texts[5] = "sky"
  texts[8] = " ".join(cache_fixtures.fixture_text(num_lines=6, seed=4))
  texts[11] = "café über naïve — 水 boils"
  texts[13] = "  leading and  double  spaces "
  return texts


def write_corpus(directory, texts, titles=None):
  """blocks.tfr, titles.tfr and a retriever config naming them."""
  blocks_path = os.path.join(directory, "blocks.tfr")
  retrieval_fixtures.write_blocks(blocks_path, texts)
  config = {"query_embedder_path": "embedder", "text_records": "blocks.tfr",
            "num_block_records": len(texts)}
  if titles is not None:
    retrieval_fixtures.write_blocks(os.path.join(directory, "titles.tfr"),
                                    titles)
    config["title_records"] = "titles.tfr"
  config_path = os.path.join(directory, "retriever_config.json")
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f)
  return config_path


@pytest.fixture(name="corpus", scope="module")
def fixture_corpus(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("corpus"))
  texts = corpus_texts()
  titles = [f"Page {i % 9} ünïcode" for i in range(len(texts))]
  tokenizer_dir = os.path.join(directory, "tokenizer")
  cache_fixtures.write_tokenizer(tokenizer_dir)
  return {"dir": directory, "texts": texts, "titles": titles,
          "config": write_corpus(directory, texts, titles),
          "tokenizer_dir": tokenizer_dir,
          "tokenizer": transformers.GPT2TokenizerFast.from_pretrained(
              tokenizer_dir),
          "blocks": block_store.BlockStore(
              os.path.join(directory, "blocks.tfr"), len(texts),
              titles_path=os.path.join(directory, "titles.tfr"))}


def pretokenize(corpus, output_dir, **values):
  return token_store.pretokenize(token_store.PretokenizeConfig(**{
      "retriever_config_path": corpus["config"], "output_dir": output_dir,
      "tokenizer": corpus["tokenizer_dir"], "batch_size": BATCH_SIZE,
      **values}))


def open_store(corpus, store_dir, max_block_tokens, with_title=False,
               **overrides):
  return token_store.open_store(store_dir, **{
      "tokenizer": corpus["tokenizer"], "max_block_tokens": max_block_tokens,
      "with_title": with_title, "num_blocks": len(corpus["texts"]),
      **overrides})


@pytest.fixture(name="whole_store", scope="module")
def fixture_whole_store(corpus, tmp_path_factory):
  """Whole blocks, no titles: an uninterrupted run."""
  output_dir = str(tmp_path_factory.mktemp("whole"))
  pretokenize(corpus, output_dir)
  return output_dir


def expected_ids(corpus, max_block_tokens, with_title):
  """Straight from the tokenizer: ' ' + the text (or 'title: text'), cut."""
  tokenizer, cut = corpus["tokenizer"], max_block_tokens or None
  return [tokenizer(" " + (f"{title}: {text}" if with_title else text))[
      "input_ids"][:cut]
          for title, text in zip(corpus["titles"], corpus["texts"])]


@pytest.mark.parametrize("with_title", [False, True])
@pytest.mark.parametrize("stored_cut, served_cuts", [(0, (0, 1, 6, 500)),
                                                     (9, (9, 4, 1))])
def test_store_ids_are_the_tokenized_blocks_on_every_block(
    corpus, tmp_path, with_title, stored_cut, served_cuts):
  output_dir = str(tmp_path / "store")
  description = pretokenize(corpus, output_dir, max_block_tokens=stored_cut,
                            context_with_title=with_title)
  assert sorted(os.listdir(output_dir)) == [
      "ids.uint16", "offsets.int64", token_store.STORE_NAME]
  assert utils.read_json(os.path.join(output_dir, token_store.STORE_NAME)) == (
      description)
  assert description["with_title"] is with_title
  assert description["max_block_tokens"] == stored_cut
  assert description["num_blocks"] == len(corpus["texts"])
  assert description["blocks_path"] == os.path.join(corpus["dir"],
                                                    "blocks.tfr")
  assert description["titles_path"] == (
      os.path.join(corpus["dir"], "titles.tfr") if with_title else None)
  every_block = list(range(len(corpus["texts"])))
  for cut in served_cuts:
    store = open_store(corpus, output_dir, cut, with_title)
    tokenized = token_store.BlockTokenCache(
        corpus["tokenizer"], corpus["blocks"], cut, capacity=0,
        with_title=with_title).token_ids(every_block)
    assert store.token_ids(every_block) == tokenized
    assert tokenized == expected_ids(corpus, cut, with_title)
    # Any order, repeats, NumPy ids.
    shuffled = np.array([5, 0, 5, 39, 3], np.int64)
    assert store.token_ids(shuffled) == [tokenized[i] for i in shuffled]


def test_the_files_hold_offsets_and_ids_as_documented(corpus, whole_store):
  offsets = np.fromfile(os.path.join(whole_store, "offsets.int64"), "<i8")
  ids = np.fromfile(os.path.join(whole_store, "ids.uint16"), "<u2")
  blocks = expected_ids(corpus, 0, with_title=False)
  np.testing.assert_array_equal(offsets, np.cumsum([0] + [len(b) for b in
                                                          blocks]))
  assert ids.tolist() == [i for block in blocks for i in block]
  assert utils.read_json(os.path.join(
      whole_store, token_store.STORE_NAME))["num_ids"] == len(ids)


def test_block_tokens_is_the_store_when_given_else_tokenizes(corpus,
                                                             whole_store):
  store = token_store.block_tokens(corpus["tokenizer"], corpus["blocks"], 6,
                                   store_dir=whole_store)
  assert isinstance(store, token_store.TokenStore)
  tokenizing = token_store.block_tokens(corpus["tokenizer"], corpus["blocks"],
                                        6, capacity=3)
  assert isinstance(tokenizing, token_store.BlockTokenCache)
  assert store.token_ids(range(40)) == tokenizing.token_ids(range(40))
  with pytest.raises(IndexError, match=r"block id 40 not in \[0, 40\)"):
    store.token_ids([40])


def test_a_store_on_an_object_store_is_read_by_byte_ranges(corpus,
                                                           whole_store):
  remote = "ram://token_store_test/store"
  tf.io.gfile.makedirs(remote)
  for name in os.listdir(whole_store):
    tf.io.gfile.copy(os.path.join(whole_store, name), f"{remote}/{name}",
                     overwrite=True)
  store = open_store(corpus, remote, 5)
  assert not isinstance(store._ids, np.ndarray)  # pylint: disable=protected-access
  assert store.token_ids(range(40)) == expected_ids(corpus, 5, False)


def test_a_vocabulary_past_uint16_stores_int32_ids():
  assert token_store.ids_dtype(50257) == np.dtype("<u2")
  assert token_store.ids_dtype(1 << 16) == np.dtype("<u2")
  assert token_store.ids_dtype((1 << 16) + 1) == np.dtype("<i4")


def write_large_vocabulary_tokenizer(directory, vocab_size=70000):
  """A byte-level BPE whose merges make ' sky' the last of `vocab_size` ids."""
  alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
  merged = ["\u0120s", "\u0120sk", "\u0120sky"]
  fillers = [f"filler{i}" for i in range(
      vocab_size - len(alphabet) - 1 - len(merged))]
  vocab = {token: index for index, token in enumerate(
      sorted(alphabet) + [cache_fixtures.EOS] + fillers + merged)}
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=[("\u0120", "s"), ("\u0120s", "k"),
                           ("\u0120sk", "y")]))
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  eos = cache_fixtures.EOS
  transformers.GPT2TokenizerFast(
      tokenizer_object=bpe, bos_token=eos, eos_token=eos,
      unk_token=eos).save_pretrained(directory)


def test_ids_past_uint16_are_stored_as_int32_and_read_back(tmp_path):
  tokenizer_dir = str(tmp_path / "tokenizer")
  write_large_vocabulary_tokenizer(tokenizer_dir)
  texts = ["sky blue sky", "water", ""]
  config = write_corpus(str(tmp_path), texts)
  output_dir = str(tmp_path / "store")
  description = token_store.pretokenize(token_store.PretokenizeConfig(
      retriever_config_path=config, output_dir=output_dir,
      tokenizer=tokenizer_dir))
  assert description["ids_file"] == "ids.int32"
  tokenizer = task_specific.load_tokenizer(tokenizer_dir)
  store = token_store.open_store(output_dir, tokenizer=tokenizer,
                                 max_block_tokens=0, with_title=False,
                                 num_blocks=3)
  expected = task_specific.text_token_ids(tokenizer, texts)
  assert expected[0][0] == 69999
  assert store.token_ids([0, 1, 2]) == expected


def _refusal(corpus, store_dir, **overrides):
  with pytest.raises(utils.UserError) as error:
    open_store(corpus, store_dir, **{"max_block_tokens": 5, **overrides})
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"{store_dir}: ")
  return message


def test_stores_that_do_not_fit_are_refused_naming_the_store(
    corpus, whole_store, tmp_path):
  other_dir = str(tmp_path / "other_tokenizer")
  other = cache_fixtures.write_tokenizer(other_dir, vocab_size=280)
  assert "differs from this job's tokenizer" in _refusal(
      corpus, whole_store, tokenizer=other)
  assert ("holds blocks tokenized without titles, expected blocks tokenized "
          "as 'title: text' (--context_with_title=True)") in _refusal(
              corpus, whole_store, with_title=True)
  assert "holds 40 blocks, expected the 41 blocks" in _refusal(
      corpus, whole_store, num_blocks=41)
  cut_dir = str(tmp_path / "cut")
  pretokenize(corpus, cut_dir, max_block_tokens=4)
  assert ("holds the first 4 GPT-2 ids of each block, but the first 5 are "
          "asked for (--max_block_tokens=5)") in _refusal(corpus, cut_dir)
  assert "but whole blocks are asked for (--max_block_tokens=0)" in _refusal(
      corpus, cut_dir, max_block_tokens=0)
  assert f"no {token_store.STORE_NAME}; not a finished block token store" in (
      _refusal(corpus, str(tmp_path)))
  damaged = str(tmp_path / "damaged")
  shutil.copytree(whole_store, damaged)
  with open(os.path.join(damaged, "ids.uint16"), "r+b") as f:
    f.truncate(10)
  assert "ids.uint16 holds 10 bytes" in _refusal(corpus, damaged)


def test_a_complete_store_is_kept_and_other_settings_are_refused(
    corpus, whole_store, capsys):
  before = cache_fixtures.directory_contents(whole_store)
  pretokenize(corpus, whole_store, batch_size=3)
  assert "already complete" in capsys.readouterr().out
  assert cache_fixtures.directory_contents(whole_store) == before
  with pytest.raises(utils.UserError) as error:
    pretokenize(corpus, whole_store, max_block_tokens=8)
  assert (f"{whole_store}: holds a complete block token store made with other "
          "settings (max_block_tokens differ)") in str(error.value)
  assert cache_fixtures.directory_contents(whole_store) == before


@pytest.mark.parametrize("values, message", [
    ({"retriever_config_path": None}, "--retriever_config_path is required"),
    ({"output_dir": ""}, "--output_dir is required"),
    ({"output_dir": "gs://bucket/store"},
     "--output_dir=gs://bucket/store: expected a local directory"),
    ({"max_block_tokens": -1}, "--max_block_tokens=-1: must be >= 0"),
    ({"batch_size": 0}, "--batch_size=0: must be at least 1"),
])
def test_bad_settings_are_refused_naming_the_flag(corpus, tmp_path, values,
                                                  message):
  with pytest.raises(utils.UserError, match=message):
    pretokenize(corpus, **{"output_dir": str(tmp_path / "store"), **values})
  assert not os.path.exists(tmp_path / "store")


def test_titles_asked_of_a_corpus_without_them_are_refused(corpus, tmp_path):
  config = write_corpus(str(tmp_path), corpus["texts"])
  with pytest.raises(utils.UserError,
                     match=f"--context_with_title: {config} has no "
                     "title_records"):
    token_store.pretokenize(token_store.PretokenizeConfig(
        retriever_config_path=config, output_dir=str(tmp_path / "store"),
        tokenizer=corpus["tokenizer_dir"], context_with_title=True))


class _Killed(Exception):
  """Stands in for a kill at a chosen point of a run."""


def _failing_after(function, calls):
  """`function` that raises `_Killed` on its call number `calls`."""
  count = {"calls": 0}

  def failing(*args, **kwargs):
    count["calls"] += 1
    if count["calls"] == calls:
      raise _Killed()
    return function(*args, **kwargs)

  return failing


@pytest.mark.parametrize("where", ["tokenizing", "recording_progress"])
def test_a_failed_run_resumes_to_the_uninterrupted_bytes(
    corpus, whole_store, tmp_path, monkeypatch, where):
  """Killed while tokenizing the 4th batch, or after appending the 3rd
  batch's ids but before recording it (those ids are cut off and redone)."""
  output_dir = str(tmp_path / "store")
  target = {"tokenizing": (task_specific, "text_token_ids", 4),
            "recording_progress": (token_store, "_record_progress", 5)}[where]
  module, name, calls = target
  with monkeypatch.context() as patch:
    patch.setattr(module, name, _failing_after(getattr(module, name), calls))
    with pytest.raises(_Killed):
      pretokenize(corpus, output_dir)
  progress = utils.read_json(os.path.join(output_dir,
                                          token_store.PROGRESS_NAME))
  assert progress["blocks_done"] == 3 * BATCH_SIZE
  if where == "recording_progress":
    ids_bytes = os.path.getsize(os.path.join(output_dir, "ids.uint16"))
    assert ids_bytes > progress["ids_written"] * 2  # appended, not recorded
  assert token_store.STORE_NAME not in os.listdir(output_dir)
  with pytest.raises(utils.UserError,
                     match="holds an unfinished block token store made with "
                     "other settings"):
    pretokenize(corpus, output_dir, context_with_title=True)
  pretokenize(corpus, output_dir)
  assert cache_fixtures.directory_contents(output_dir) == cache_fixtures.directory_contents(whole_store)


def _large_corpus(directory, num_blocks):
  words = np.array("why does the sky look blue when sun light passes air".split())
  rng = np.random.default_rng(0)
  texts = [" ".join(rng.choice(words, size=20)) for _ in range(num_blocks)]
  return write_corpus(directory, texts)


def _command(config, output_dir, tokenizer_dir, *extra):
  return [sys.executable, PRETOKENIZE, f"--retriever_config_path={config}",
          f"--output_dir={output_dir}", f"--tokenizer={tokenizer_dir}",
          "--batch_size=100", *extra]


@pytest.mark.slow  # A subprocess killed mid-run; acceptance of resumability.
def test_a_killed_command_resumes_to_the_uninterrupted_bytes(corpus,
                                                             tmp_path):
  config = _large_corpus(str(tmp_path), 30000)
  output_dir = str(tmp_path / "store")
  progress_path = os.path.join(output_dir, token_store.PROGRESS_NAME)
  process = subprocess.Popen(
      _command(config, output_dir, corpus["tokenizer_dir"]), cwd=REPO_ROOT,
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  deadline = time.time() + 240
  while process.poll() is None:
    assert time.time() < deadline, "no progress was recorded"
    try:
      if utils.read_json(progress_path)["blocks_done"] >= 1000:
        break
    except (utils.UserError, KeyError):
      pass  # Not written yet.
    time.sleep(0.005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "finished before the kill"
  assert token_store.STORE_NAME not in os.listdir(output_dir)
  store_config = token_store.PretokenizeConfig(
      retriever_config_path=config, output_dir=output_dir,
      tokenizer=corpus["tokenizer_dir"], batch_size=100)
  token_store.pretokenize(store_config)
  reference_dir = str(tmp_path / "reference")
  token_store.pretokenize(dataclasses.replace(store_config,
                                              output_dir=reference_dir))
  assert cache_fixtures.directory_contents(output_dir) == cache_fixtures.directory_contents(reference_dir)


@pytest.mark.slow  # The command line's one-line error.
def test_command_line_without_output_dir_exits_2_with_one_line(corpus):
  result = subprocess.run(
      [sys.executable, PRETOKENIZE,
       f"--retriever_config_path={corpus['config']}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == utils.USER_ERROR_EXIT_CODE, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --output_dir is required")
  assert "Traceback" not in result.stderr


def test_a_second_writer_of_one_store_fails_at_once_naming_the_holder(
    corpus, tmp_path):
  output_dir = str(tmp_path / "store")
  with utils.locked_directory(output_dir, token_store.LOCK_NAME,
                              "a test's hold"):
    with pytest.raises(utils.UserError) as error:
      pretokenize(corpus, output_dir)
    assert f"block token store {output_dir}" in str(error.value)
    assert os.listdir(output_dir) == [token_store.LOCK_NAME]
