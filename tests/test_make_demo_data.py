"""The demo world: every artefact loads with the real loader and is deterministic."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import transformers

from util_scripts import make_demo_data
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "util_scripts", "make_demo_data.py")
TINY = dict(num_train=48, num_validation=8, num_test=4,
            num_distractor_blocks=20, gpt2_vocab_size=400)
SEED = 3


def _cli_flags(sizes):
  return [f"--{name}={value}" for name, value in sizes.items()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny world written by the command line, as `make demo` runs it."""
  output_dir = tmp_path_factory.mktemp("world")
  result = subprocess.run(
      [sys.executable, SCRIPT, f"--output_dir={output_dir}", f"--seed={SEED}",
       *_cli_flags(TINY)],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  return output_dir, result.stdout


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _kilt(output_dir, split):
  return _read_jsonl(os.path.join(output_dir, "kilt",
                                  make_demo_data.SPLIT_FILES[split]))


def _blocks(config):
  return [record.numpy().decode("utf-8")
          for record in tf.data.TFRecordDataset(config["text_records"])]


def _retriever_config(output_dir):
  return utils.read_json(os.path.join(output_dir, "retriever_config.json"))


def _block_emb(config):
  return tf.train.load_variable(
      os.path.join(config["query_embedder_path"], "encoded", "encoded.ckpt"),
      "block_emb")


def _answer_words(answer):
  """The words of an answer such as "1553." or "by Ann Bel, in 1553, city of Cor."."""
  return re.findall(r"\w+", answer)


def test_kilt_files_have_kilt_format_and_sizes(world):
  output_dir, _ = world
  train, dev, test = (_kilt(output_dir, split)
                      for split in ("train", "validation", "test"))
  assert (len(train), len(dev), len(test)) == (
      TINY["num_train"], TINY["num_validation"], TINY["num_test"])
  for record in train + dev:
    assert isinstance(record["input"], str) and record["input"].endswith("?")
    [output] = record["output"]
    assert isinstance(output["answer"], str) and output["answer"]
    [provenance] = output["provenance"]
    assert set(provenance) == {"wikipedia_id", "title"}
  # KILT's test file carries questions only.
  assert all(set(record) == {"id", "input"} for record in test)
  ids = [record["id"] for record in train + dev + test]
  assert len(set(ids)) == len(ids)


def test_gold_blocks_state_the_fact_and_held_out_facts_are_only_there(world):
  output_dir, _ = world
  config = _retriever_config(output_dir)
  blocks = _blocks(config)
  assert len(blocks) == config["num_block_records"] == (
      TINY["num_train"] + TINY["num_validation"] + TINY["num_test"] +
      TINY["num_distractor_blocks"])
  train, dev = _kilt(output_dir, "train"), _kilt(output_dir, "validation")
  gold_ids = []
  for record in train + dev:
    [output] = record["output"]
    [provenance] = output["provenance"]
    block = blocks[int(provenance["wikipedia_id"])]
    title, text = block.split("\n\n")
    assert title == provenance["title"]
    assert title in record["input"] and title in text
    assert all(word in text for word in _answer_words(output["answer"]))
    gold_ids.append(provenance["wikipedia_id"])
  assert len(set(gold_ids)) == len(gold_ids)
  # Held-out questions are about entities no training question mentions.
  train_text = json.dumps(train)
  for record in dev:
    assert record["output"][0]["provenance"][0]["title"] not in train_text


def test_embedder_has_the_realm_signatures_and_matches_block_emb(world):
  output_dir, _ = world
  config = _retriever_config(output_dir)
  embedder = hub.load(config["query_embedder_path"])
  info = embedder.signatures["tokenization_info"]()
  vocab_file = info["vocab_file"].numpy().decode()
  assert vocab_file == os.path.join(config["query_embedder_path"], "assets",
                                    "vocab.txt")
  assert bool(info["do_lower_case"].numpy())

  block_emb = _block_emb(config)
  assert block_emb.shape == (config["num_block_records"], 128)
  assert block_emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(block_emb, axis=1),
                             make_demo_data.EMBEDDING_NORM, rtol=1e-5)

  # The stored block embeddings are the SavedModel applied to each block.
  wordpieces = make_demo_data.load_wordpiece_tokenizer(vocab_file)
  blocks = [tuple(block.split("\n\n")) for block in _blocks(config)]
  projected = embedder.signatures["projected"]
  recomputed = make_demo_data.embed(
      projected, make_demo_data.block_features(wordpieces, blocks))
  np.testing.assert_allclose(recomputed, block_emb, atol=1e-5)


def test_query_tokenisation_matches_bert_tokenizer_and_recall_is_high(world):
  output_dir, stdout = world
  config = _retriever_config(output_dir)
  embedder = hub.load(config["query_embedder_path"])
  info = embedder.signatures["tokenization_info"]()
  vocab_file = info["vocab_file"].numpy().decode()
  records = [r for split in ("train", "validation") for r in
             _kilt(output_dir, split)]
  questions = [r["input"] for r in records]

  features = make_demo_data.query_features(
      make_demo_data.load_wordpiece_tokenizer(vocab_file), questions)
  bert = transformers.BertTokenizer(
      vocab_file, do_lower_case=bool(info["do_lower_case"].numpy()))
  for row, question in enumerate(questions):
    want = bert(question)["input_ids"]
    assert list(features["input_ids"][row, :len(want)]) == want
    assert features["input_mask"][row].sum() == len(want)
  assert not features["segment_ids"].any()
  assert "[UNK]" not in bert.convert_ids_to_tokens(
      features["input_ids"].ravel().tolist())

  query_embeddings = make_demo_data.embed(embedder.signatures["projected"],
                                          features)
  gold = [int(r["output"][0]["provenance"][0]["wikipedia_id"])
          for r in records]
  recall = make_demo_data.recall_at_k(query_embeddings, _block_emb(config),
                                      gold, k=5)
  assert recall >= 0.9
  reported = utils.read_json(os.path.join(output_dir, "world.json"))
  assert reported["recall_at_5"] >= 0.9
  assert f"recall@5 of the embedder: {reported['recall_at_5']:.4f}" in stdout


def test_embedder_still_loads_after_the_directory_is_copied(world, tmp_path):
  output_dir, _ = world
  copied = tmp_path / "embedder_copy"
  shutil.copytree(_retriever_config(output_dir)["query_embedder_path"], copied)
  embedder = hub.load(str(copied))
  vocab_file = embedder.signatures["tokenization_info"]()["vocab_file"]
  assert vocab_file.numpy().decode() == str(copied / "assets" / "vocab.txt")
  ids = tf.constant([[2, 10, 3]], tf.int32)
  output = embedder.signatures["projected"](
      input_ids=ids, input_mask=tf.ones_like(ids),
      segment_ids=tf.zeros_like(ids))["default"]
  assert output.shape == (1, 128) and output.dtype == tf.float32


def test_gpt2_tokenizer_and_model_config_load(world):
  output_dir, _ = world
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(
      os.path.join(output_dir, "tokenizer"))
  assert (tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token ==
          "<|endoftext|>")
  config = transformers.GPT2Config.from_json_file(
      os.path.join(output_dir, "model_config", "config.json"))
  assert config.vocab_size == len(tokenizer) == TINY["gpt2_vocab_size"]
  assert config.eos_token_id == tokenizer.eos_token_id
  assert (config.n_layer, config.n_embd) == (2, 128)
  block = _blocks(_retriever_config(output_dir))[0]
  ids = tokenizer(block)["input_ids"]
  assert tokenizer.decode(ids) == block
  # A made-up name is several pieces, not one token a model could learn whole.
  title = block.split("\n\n")[0]
  assert len(tokenizer(" " + title.split()[0])["input_ids"]) >= 2


def _file_hashes(output_dir):
  names = [os.path.join("kilt", f) for f in make_demo_data.SPLIT_FILES.values()]
  names += [os.path.join("realm", "blocks.tfr"),
            os.path.join("realm", "embedder", "assets", "vocab.txt"),
            os.path.join("tokenizer", "tokenizer.json"),
            os.path.join("model_config", "config.json")]
  hashes = {}
  for name in names:
    with open(os.path.join(output_dir, name), "rb") as f:
      hashes[name] = hashlib.sha256(f.read()).hexdigest()
  return hashes


def test_same_seed_gives_identical_files(world, tmp_path):
  output_dir, _ = world
  again = tmp_path / "again"
  make_demo_data.build_world(again, seed=SEED, **TINY)
  assert _file_hashes(again) == _file_hashes(output_dir)
  np.testing.assert_array_equal(
      _block_emb(_retriever_config(again)),
      _block_emb(_retriever_config(output_dir)))

  other = tmp_path / "other"
  make_demo_data.build_world(other, seed=SEED + 1, **TINY)
  assert (_file_hashes(other)[os.path.join("realm", "blocks.tfr")] !=
          _file_hashes(output_dir)[os.path.join("realm", "blocks.tfr")])


def test_bad_sizes_and_missing_output_dir_are_one_line_errors(tmp_path):
  with pytest.raises(utils.UserError, match="--num_train=0"):
    make_demo_data.build_world(tmp_path / "w", num_train=0)
  with pytest.raises(utils.UserError, match="--gpt2_vocab_size=10"):
    make_demo_data.build_world(tmp_path / "w", gpt2_vocab_size=10)
  result = subprocess.run([sys.executable, SCRIPT], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == utils.USER_ERROR_EXIT_CODE
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --output_dir is required")
