"""The demo world (demo_world.py, its command line make_demo_data.py): every
artefact loads with the real loader and is deterministic."""

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
from tensorflow.core.protobuf import saved_model_pb2
import tensorflow_hub as hub
import transformers

import kilt_files
import query_embedder
from util_scripts import demo_world
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "util_scripts", "make_demo_data.py")
TINY = dict(num_train=48, num_validation=8, num_test=4,
            num_distractor_blocks=20, gpt2_vocab_size=400)
SEED = 3


def _run_script(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  """The directory of a tiny world, written in-process, as `make demo` does."""
  directory = tmp_path_factory.mktemp("world")
  demo_world.build_world(directory, seed=SEED, **TINY)
  return directory


def _read_jsonl(path):
  return [record for _, record in kilt_files.read_jsonl(path, "demo file")]


def _kilt(output_dir, split):
  return _read_jsonl(os.path.join(output_dir, "kilt",
                                  kilt_files.ELI5_SPLIT_FILES[split]))


def _records(path):
  return [record.numpy().decode("utf-8")
          for record in tf.data.TFRecordDataset(path)]


def _blocks(config):
  return _records(config["text_records"])


def _titles(config):
  return _records(config["title_records"])


def _retriever_config(output_dir):
  return utils.read_json(os.path.join(output_dir, "retriever_config.json"))


def _block_emb(config):
  return tf.train.load_variable(
      os.path.join(config["query_embedder_path"], "encoded", "encoded.ckpt"),
      "block_emb")


def _answer_words(answer):
  """The words of an answer such as "1553." or "by Ann Bel, in 1553, city of Cor."."""
  return re.findall(r"\w+", answer)


def test_kilt_files_have_kilt_format_and_sizes(world_dir):
  train, dev, test = (_kilt(world_dir, split)
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


def test_gold_blocks_state_the_fact_and_held_out_facts_are_only_there(
    world_dir):
  config = _retriever_config(world_dir)
  blocks, titles = _blocks(config), _titles(config)
  assert len(blocks) == len(titles) == config["num_block_records"] == (
      TINY["num_train"] + TINY["num_validation"] + TINY["num_test"] +
      TINY["num_distractor_blocks"])
  train, dev = _kilt(world_dir, "train"), _kilt(world_dir, "validation")
  gold_ids = []
  for record in train + dev:
    [output] = record["output"]
    [provenance] = output["provenance"]
    # blocks.tfr holds the text alone, titles.tfr the title, as ORQA's.
    block_id = int(provenance["wikipedia_id"])
    title, text = titles[block_id], blocks[block_id]
    assert title == provenance["title"] and "\n" not in text
    assert title in record["input"] and title in text
    assert all(word in text for word in _answer_words(output["answer"]))
    gold_ids.append(provenance["wikipedia_id"])
  assert len(set(gold_ids)) == len(gold_ids)
  # Held-out questions are about entities no training question mentions.
  train_text = json.dumps(train)
  for record in dev:
    assert record["output"][0]["provenance"][0]["title"] not in train_text


def test_knowledge_source_maps_every_gold_title_to_its_wikipedia_id(
    world_dir):
  pages = _read_jsonl(os.path.join(world_dir, "kilt",
                                   kilt_files.KNOWLEDGE_SOURCE_FILE))
  titles = _titles(_retriever_config(world_dir))
  # KILT's format: one page per title, its paragraphs the title first.
  assert len(pages) == len(titles)
  for block_id, page in enumerate(pages):
    assert set(page) == {"_id", "wikipedia_id", "wikipedia_title", "text"}
    assert page["_id"] == page["wikipedia_id"] == str(block_id)
    assert page["wikipedia_title"] == titles[block_id]
    assert page["text"][0] == titles[block_id] + "\n"
  wikipedia_ids = {page["wikipedia_title"]: page["wikipedia_id"]
                   for page in pages}
  for record in _kilt(world_dir, "train") + _kilt(world_dir, "validation"):
    [provenance] = record["output"][0]["provenance"]
    assert wikipedia_ids[provenance["title"]] == provenance["wikipedia_id"]


def test_embedder_is_a_tf1_hub_module_in_realms_layout(world_dir):
  embedder_dir = _retriever_config(world_dir)["query_embedder_path"]
  fixture_dir = os.path.join(REPO, "..", "shared", "fixtures", "realm_tf1_hub",
                             "embedder")
  for directory in (embedder_dir, fixture_dir):
    with open(os.path.join(directory, "tfhub_module.pb"), "rb") as f:
      assert f.read() == b"\x08\x03"
  layouts = []
  for directory in (embedder_dir, fixture_dir):
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(directory, "saved_model.pb"), "rb") as f:
      saved_model.ParseFromString(f.read())
    layouts.append([
        (sorted(graph.meta_info_def.tags), sorted(graph.collection_def),
         {name: (sorted(signature.inputs), sorted(signature.outputs))
          for name, signature in graph.signature_def.items()})
        for graph in saved_model.meta_graphs])
  # Tag sets, collections and signatures are those of REALM/ORQA's export.
  assert layouts[0] == layouts[1]
  assert [tags for tags, _, _ in layouts[0]] == [["train"], []]
  assert sorted(os.listdir(embedder_dir)) == [
      "assets", "encoded", "saved_model.pb", "tfhub_module.pb", "variables"]
  assert os.listdir(os.path.join(embedder_dir, "assets")) == ["vocab.txt"]


def test_embedder_has_the_realm_signatures_and_matches_block_emb(world_dir):
  config = _retriever_config(world_dir)
  embedder = hub.load(config["query_embedder_path"])
  info = embedder.signatures["tokenization_info"]()
  # As in every Hub export: the placeholder that only TF1 hub.Module rewrites.
  assert info["vocab_file"].numpy() == b"SAVEDMODEL-ASSET"
  assert bool(info["do_lower_case"].numpy())
  projected = embedder.signatures["projected"]
  assert {name: (spec.dtype, spec.shape.as_list()) for name, spec in
          projected.structured_input_signature[1].items()} == {
              name: (tf.int32, [None, None])
              for name in ("input_ids", "input_mask", "segment_ids")}

  block_emb = _block_emb(config)
  assert block_emb.shape == (config["num_block_records"], 128)
  assert block_emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(block_emb, axis=1),
                             demo_world.EMBEDDING_NORM, rtol=1e-5)

  # The stored block embeddings are the module applied to `[CLS] title [SEP]
  # text [SEP]` of each block.
  wordpieces = query_embedder.QueryEmbedder(
      config["query_embedder_path"]).wordpieces
  blocks = list(zip(_titles(config), _blocks(config)))
  features = query_embedder.block_features(wordpieces, blocks)
  first = features["input_ids"][0, :features["input_mask"][0].sum()]
  assert (first == wordpieces.sep_id).sum() == 2
  assert first[0] == wordpieces.cls_id and first[-1] == wordpieces.sep_id
  recomputed = demo_world.embed(
      lambda batch: projected(**{name: tf.constant(value) for name, value
                                 in batch.items()})["default"].numpy(),
      features)
  np.testing.assert_allclose(recomputed, block_emb, atol=1e-5)


def test_query_tokenisation_matches_bert_tokenizer_and_recall_is_high(
    world_dir):
  config = _retriever_config(world_dir)
  embedder = query_embedder.QueryEmbedder(config["query_embedder_path"])
  vocab_file = embedder.wordpieces.vocab_file
  assert vocab_file == os.path.join(config["query_embedder_path"], "assets",
                                    "vocab.txt")
  records = [r for split in ("train", "validation") for r in
             _kilt(world_dir, split)]
  questions = [r["input"] for r in records]

  input_ids, input_mask = embedder.token_ids(questions)
  bert = transformers.BertTokenizer(vocab_file, do_lower_case=True)
  for row, question in enumerate(questions):
    want = bert(question)["input_ids"]
    assert list(input_ids[row, :len(want)]) == want
    assert input_mask[row].sum() == len(want)
  assert "[UNK]" not in bert.convert_ids_to_tokens(input_ids.ravel().tolist())

  query_embeddings = embedder.embed(questions)
  gold = [int(r["output"][0]["provenance"][0]["wikipedia_id"])
          for r in records]
  recall = demo_world.recall_at_k(query_embeddings, _block_emb(config),
                                      gold, k=5)
  assert recall >= 0.9
  reported = utils.read_json(os.path.join(world_dir, "world.json"))
  assert reported["recall_at_5"] >= 0.9


def test_the_spelled_out_split_defeats_the_toy_embedder(world_dir,
                                                        tmp_path):
  """util_scripts/spelled_out_split.py's split: the same questions, their
  entity names spelled out by wordpieces; recall of the gold block falls."""
  written = demo_world.write_spelled_out_split(world_dir, str(tmp_path))
  config = _retriever_config(world_dir)
  embedder = query_embedder.QueryEmbedder(config["query_embedder_path"])
  records, spelled = _kilt(world_dir, "validation"), []
  for _, record in kilt_files.read_jsonl(written["validation"], "split"):
    spelled.append(record)
  assert [r["id"] for r in spelled] == [r["id"] for r in records]
  for original, record in zip(records, spelled):
    title = original["output"][0]["provenance"][0]["title"]
    assert title in original["input"] and title not in record["input"]
    assert record["output"] == original["output"]
  gold = [int(r["output"][0]["provenance"][0]["wikipedia_id"])
          for r in records]
  recall = {name: demo_world.recall_at_k(
      embedder.embed([r["input"] for r in rows]), _block_emb(config), gold,
      k=5) for name, rows in (("original", records), ("spelled", spelled))}
  assert recall["spelled"] < recall["original"], recall
  title_map = utils.read_json(written["title_map"])
  assert all(r["output"][0]["provenance"][0]["title"] in title_map
             for r in records)


def test_embedder_still_loads_after_the_directory_is_copied(world_dir,
                                                           tmp_path):
  original = _retriever_config(world_dir)["query_embedder_path"]
  copied = tmp_path / "embedder_copy"
  shutil.copytree(original, copied)
  embedder = query_embedder.QueryEmbedder(str(copied))
  assert embedder.wordpieces.vocab_file == str(copied / "assets" / "vocab.txt")
  questions = [r["input"] for r in _kilt(world_dir, "validation")]
  embeddings = embedder.embed(questions)
  assert embeddings.shape == (len(questions), 128)
  np.testing.assert_array_equal(
      embeddings, query_embedder.QueryEmbedder(original).embed(questions))


def test_gpt2_tokenizer_and_model_config_load(world_dir):
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(
      os.path.join(world_dir, "tokenizer"))
  assert (tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token ==
          "<|endoftext|>")
  config = transformers.GPT2Config.from_json_file(
      os.path.join(world_dir, "model_config", "config.json"))
  assert config.vocab_size == len(tokenizer) == TINY["gpt2_vocab_size"]
  assert config.eos_token_id == tokenizer.eos_token_id
  assert (config.n_layer, config.n_embd) == (2, 128)
  block = _blocks(_retriever_config(world_dir))[0]
  ids = tokenizer(block)["input_ids"]
  assert tokenizer.decode(ids) == block
  # A made-up name is several pieces, not one token a model could learn whole.
  title = _titles(_retriever_config(world_dir))[0]
  assert len(tokenizer(" " + title.split()[0])["input_ids"]) >= 2


def _file_hashes(output_dir):
  """sha256 of every file of a world, its own directory written as "W"."""
  hashes = {}
  for directory, _, names in os.walk(output_dir):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        content = f.read().replace(str(output_dir).encode(), b"W")
      hashes[os.path.relpath(path, output_dir)] = hashlib.sha256(
          content).hexdigest()
  return hashes


@pytest.mark.slow
def test_same_seed_gives_identical_files_from_the_command_line_too(
    world_dir, tmp_path):
  again = tmp_path / "again"
  result = _run_script(f"--output_dir={again}", f"--seed={SEED}",
                       *[f"--{name}={value}" for name, value in TINY.items()])
  assert result.returncode == 0, result.stderr[-3000:]
  reported = utils.read_json(os.path.join(world_dir, "world.json"))
  assert (f"gold-block recall@5 of the embedder: "
          f"{reported['recall_at_5']:.4f}") in result.stdout
  hashes = _file_hashes(again)
  # Byte for byte, the embedder's graph and variables included.
  assert hashes == _file_hashes(world_dir)
  for name in ("saved_model.pb", "tfhub_module.pb",
               os.path.join("variables", "variables.index"),
               os.path.join("variables", "variables.data-00000-of-00001"),
               os.path.join("assets", "vocab.txt"),
               os.path.join("encoded", "encoded.ckpt.index")):
    assert os.path.join("realm", "embedder", name) in hashes
  assert {os.path.join("realm", "titles.tfr"),
          os.path.join("kilt", kilt_files.KNOWLEDGE_SOURCE_FILE),
          "retriever_config.json"} <= set(hashes)

  other = tmp_path / "other"
  demo_world.build_world(other, seed=SEED + 1, **TINY)
  assert (_file_hashes(other)[os.path.join("realm", "blocks.tfr")] !=
          _file_hashes(world_dir)[os.path.join("realm", "blocks.tfr")])


@pytest.mark.slow
def test_bad_sizes_and_missing_output_dir_are_one_line_errors(tmp_path):
  with pytest.raises(utils.UserError, match="--num_train=0"):
    demo_world.build_world(tmp_path / "w", num_train=0)
  with pytest.raises(utils.UserError, match="--gpt2_vocab_size=10"):
    demo_world.build_world(tmp_path / "w", gpt2_vocab_size=10)
  result = _run_script()
  assert result.returncode == utils.USER_ERROR_EXIT_CODE
  assert result.stderr.strip().splitlines()[-1].startswith(
      "error: --output_dir is required")
