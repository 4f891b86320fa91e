"""Tiny neighbour caches and GPT-2 tokenizers of the real formats, built in a test's tmp dir.

Used by the training tests before (and independently of) the demo world: a
byte-level BPE tokenizer trained on the fixture text and saved as a
`GPT2TokenizerFast`, and a cache directory (shards + manifest) written with
`neighbour_cache.encode_example`; and the settings of a tiny training run of
such a world, as a `training.TrainConfig` or as main.py's flags.
"""

import json
import os

import numpy as np
import safetensors.numpy
import tokenizers
import transformers

import neighbour_cache
import settings
import tf_utils
import training
import utils

EOS = "<|endoftext|>"

_WORDS = ("why does the sky look blue when sun light passes through air "
          "water boils at lower heat on a high mountain because pressure is "
          "less ice floats since it is lighter than liquid birds fly south in "
          "winter to find food plants need light to grow green leaves").split()


# The cheapest run of a training world that still learns: a batch of 4,
# 2 contexts and a short layout, two steps, no periodic evaluation, no
# samples, every step logged.
TINY_RUN = {
    "batch_size": 4, "num_retrievals": 2, "max_question_tokens": 8,
    "max_answer_tokens": 8, "max_context_tokens": 12, "learning_rate": 1e-3,
    "max_steps": 2, "batches_between_evals": 0, "log_samples": 0,
    "log_every_steps": 1, "shuffle_buffer_size": 16,
}


def fixture_text(num_lines=200, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, size=12)) for _ in range(num_lines)]


def write_tokenizer(directory, vocab_size=300):
  """Trains a byte-level BPE on the fixture text; saves a GPT2TokenizerFast."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(fixture_text(), trainer=trainer)
  tokenizer = transformers.GPT2TokenizerFast(
      tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
  tokenizer.save_pretrained(directory)
  return tokenizer


def random_records(num_records, *, num_neighbours, vocab_size, seed,
                   max_block_tokens=12, num_answers=2, id_prefix="q",
                   answer_from_top_neighbour=False):
  """Keyword arguments for `encode_example`, with random ids and scores.

  With `answer_from_top_neighbour`, ids come from a small part of the
  vocabulary and each answer is the start of the best neighbour: a model can
  lower its answer loss by learning the unigrams, and more by copying.
  """
  rng = np.random.default_rng(seed)
  top_id = min(vocab_size, 40) if answer_from_top_neighbour else vocab_size
  records = []
  for index in range(num_records):
    scores = np.sort(rng.normal(size=num_neighbours))[::-1]
    neighbour_ids = [
        rng.integers(1, top_id, rng.integers(1, max_block_tokens + 1)).tolist()
        for _ in range(num_neighbours)]
    if answer_from_top_neighbour:
      answer_ids = [neighbour_ids[0][:6]] * num_answers
    else:
      answer_ids = [rng.integers(1, vocab_size, rng.integers(1, 10)).tolist()
                    for _ in range(num_answers)]
    records.append(dict(
        example_id=f"{id_prefix}{index}",
        question=f"question {index}",
        question_ids=rng.integers(1, top_id, rng.integers(1, 8)).tolist(),
        answer_ids=answer_ids,
        neighbour_block_ids=rng.choice(1000, num_neighbours,
                                       replace=False).tolist(),
        neighbour_scores=scores.tolist(),
        neighbour_ids=neighbour_ids,
    ))
  return records


def write_cache(cache_dir, split_records, *, num_neighbours, vocab_size,
                tokenizer_fingerprint="fixture", num_shards=2,
                max_block_tokens=12, tokenizer_name="fixture"):
  """Writes `{split: [encode_example kwargs]}` as a cache with its manifest."""
  utils.makedirs(cache_dir)
  splits = {}
  for split, records in split_records.items():
    names = [neighbour_cache.shard_name(split, i, num_shards)
             for i in range(num_shards)]
    for shard_index, name in enumerate(names):
      serialized = [neighbour_cache.encode_example(**record)
                    for record in records[shard_index::num_shards]]
      tf_utils.write_tfrecords(os.path.join(cache_dir, name), serialized)
    splits[split] = {"shards": names, "num_records": len(records)}
  manifest = {
      "format_version": neighbour_cache.FORMAT_VERSION,
      "embedder_path": "fixture", "blocks_path": "fixture", "num_blocks": 1000,
      "tokenizer": tokenizer_name, "vocab_size": vocab_size,
      "tokenizer_fingerprint": tokenizer_fingerprint,
      "search": {"kind": "exact"}, "num_neighbours": num_neighbours,
      "max_block_tokens": max_block_tokens, "splits": splits,
  }
  utils.atomic_write_json(
      os.path.join(cache_dir, neighbour_cache.MANIFEST_NAME), manifest)
  return manifest



def write_model_config(directory, tokenizer, *, n_positions=64, dropout=0.0):
  """A tiny GPT-2 `config.json` alone in `directory`: a fresh model for main.py."""
  utils.makedirs(directory)
  config = transformers.GPT2Config(
      vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32,
      n_layer=2, n_head=2, resid_pdrop=dropout, embd_pdrop=dropout,
      attn_pdrop=dropout,
      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
  utils.atomic_write_text(os.path.join(directory, "config.json"),
                          config.to_json_string())


def write_training_world(root, *, num_train=48, num_validation=12,
                         num_neighbours=4, n_positions=64, num_shards=2,
                         dropout=0.0):
  """A tokenizer, a fresh tiny GPT-2 config and a learnable cache under root.

  Returns {"tokenizer": dir, "model": dir (config.json only), "cache": dir}.
  """
  root = str(root)
  paths = {name: os.path.join(root, name)
           for name in ("tokenizer", "model", "cache")}
  tokenizer = write_tokenizer(paths["tokenizer"])
  write_model_config(paths["model"], tokenizer, n_positions=n_positions,
                     dropout=dropout)
  records = {
      "train": random_records(num_train, num_neighbours=num_neighbours,
                              vocab_size=len(tokenizer), seed=0,
                              answer_from_top_neighbour=True),
      "validation": random_records(num_validation,
                                   num_neighbours=num_neighbours,
                                   vocab_size=len(tokenizer), seed=1,
                                   id_prefix="v",
                                   answer_from_top_neighbour=True),
  }
  write_cache(paths["cache"], records, num_neighbours=num_neighbours,
              vocab_size=len(tokenizer), num_shards=num_shards,
              tokenizer_fingerprint=neighbour_cache.tokenizer_fingerprint(
                  tokenizer))
  return paths


def training_values(world, output_dir, run_name, **overrides):
  """{flag name: value} of a TINY_RUN of `world` (write_training_world) in
  OUTPUT_DIR/RUN_NAME; `overrides` by flag name."""
  return {"model_key": world["model"], "tokenizer": world["tokenizer"],
          "cache_dir": world["cache"], "output_dir": str(output_dir),
          "run_name": run_name, **TINY_RUN, **overrides}


def training_config(world, output_dir, run_name, **overrides):
  """The `training.TrainConfig` of `training_values`."""
  return settings.from_flat(
      training.TrainConfig,
      training_values(world, output_dir, run_name, **overrides), "test")


def training_flags(world, output_dir, run_name, **overrides):
  """main.py's command-line flags for the same run as `training_config`."""
  flags = []
  for name, value in training_values(world, output_dir, run_name,
                                     **overrides).items():
    if isinstance(value, (list, tuple)):
      value = ",".join(value)
    flags.append(f"--{name}={value}")
  return flags


def final_weights(run_dir):
  """{name: array} of a finished run's final_model/model.safetensors."""
  with open(os.path.join(run_dir, "final_model", "model.safetensors"),
            "rb") as f:
    return safetensors.numpy.load(f.read())


def read_metrics(run_dir):
  """The records of a run's metrics.jsonl."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def directory_contents(directory):
  """{file name: bytes} of a directory's files, to compare two outputs."""
  contents = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      contents[name] = f.read()
  return contents
