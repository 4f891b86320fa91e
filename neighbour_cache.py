"""The neighbour cache: the format `query_cacher_tfrecord.py` writes and training reads.

A cache is a directory holding `manifest.json` and, per split, shards named
`{split}-{i:05d}-of-{n:05d}.tfrecord` of `tf.train.Example`s, one per question.
Every feature is a plain bytes/int64/float list, so any tool can read it; the
raggedness of answers and neighbour blocks is carried by explicit lengths
(no EOS-as-padding tricks):

  id                   bytes [1]    KILT id of the question
  question             bytes [1]    question text (KILT `input`)
  question_ids         int64 [Q]    GPT-2 ids of the question
  answer_ids           int64 [sum]  GPT-2 ids of every answer, concatenated
  answer_lengths       int64 [A]    length of each answer (A = 0 on the test split)
  neighbour_block_ids  int64 [N]    block ids, best first
  neighbour_scores     float [N]    inner products, descending
  neighbour_ids        int64 [sum]  GPT-2 ids of every neighbour block, concatenated
  neighbour_lengths    int64 [N]    length of each block's ids (truncated at
                                    `max_block_tokens` when cached)

The manifest (written last, so a directory without it is not a finished cache):

  {"format_version": 1,
   "embedder_path": str, "blocks_path": str, "num_blocks": int,
   "titles_path": str | null,     titles.tfr of the blocks (record i: the
                                  title of block i); null without one
   "max_query_length": int,       wordpieces per question (0: no cut)
   "context_with_title": bool,    neighbour_ids are of `title: text`
   "tokenizer": str, "vocab_size": int, "tokenizer_fingerprint": str,
   "search": {"kind": "exact"} | {"kind": "scann", ...the ScaNN config...}
             | {"kind": "none"} (a question-only cache),
   "num_neighbours": int,         0: questions and answers only (no
                                  retriever: embedder_path, blocks_path,
                                  titles_path and num_blocks are null,
                                  max_block_tokens 0), for live retrieval
                                  or naked_lm
   "max_block_tokens": int,
   "splits": {"train": {"shards": [names], "num_records": int}, ...}}

Manifests written before titles were read lack `titles_path`,
`max_query_length` and `context_with_title`; `read_manifest` gives them
`titles_path` None (no titles). The block text and titles behind a cache are
`block_store.BlockStore(manifest["blocks_path"], manifest["num_blocks"],
titles_path=manifest.get("titles_path"))`.
"""

import contextlib
import hashlib
import json
import os

from absl import logging
import tensorflow as tf

import tf_utils
import utils

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation", "test")

_FEATURES = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "question": tf.io.FixedLenFeature([], tf.string),
    "question_ids": tf.io.VarLenFeature(tf.int64),
    "answer_ids": tf.io.VarLenFeature(tf.int64),
    "answer_lengths": tf.io.VarLenFeature(tf.int64),
    "neighbour_block_ids": tf.io.VarLenFeature(tf.int64),
    "neighbour_scores": tf.io.VarLenFeature(tf.float32),
    "neighbour_ids": tf.io.VarLenFeature(tf.int64),
    "neighbour_lengths": tf.io.VarLenFeature(tf.int64),
}


def shard_name(split, index, num_shards):
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def _int64s(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def encode_example(*, example_id, question, question_ids, answer_ids,
                   neighbour_block_ids, neighbour_scores, neighbour_ids):
  """Serialises one question's record.

  Args:
    example_id, question: strings.
    question_ids: GPT-2 ids of the question.
    answer_ids: a list of id lists, one per answer (empty on the test split).
    neighbour_block_ids, neighbour_scores: [N], best first.
    neighbour_ids: a list of N id lists, the GPT-2 ids of each block.
  """
  if len(neighbour_block_ids) != len(neighbour_scores) or len(
      neighbour_block_ids) != len(neighbour_ids):
    raise ValueError("neighbour_block_ids, neighbour_scores and neighbour_ids "
                     "must have one entry per neighbour")
  features = {
      "id": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[example_id.encode("utf-8")])),
      "question": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[question.encode("utf-8")])),
      "question_ids": _int64s(question_ids),
      "answer_ids": _int64s(i for answer in answer_ids for i in answer),
      "answer_lengths": _int64s(len(answer) for answer in answer_ids),
      "neighbour_block_ids": _int64s(neighbour_block_ids),
      "neighbour_scores": tf.train.Feature(float_list=tf.train.FloatList(
          value=list(neighbour_scores))),
      "neighbour_ids": _int64s(i for block in neighbour_ids for i in block),
      "neighbour_lengths": _int64s(len(block) for block in neighbour_ids),
  }
  # Deterministic: map fields in key order, so that the same record is always
  # the same bytes (a resumed cache equals an uninterrupted one).
  return tf.train.Example(features=tf.train.Features(
      feature=features)).SerializeToString(deterministic=True)


def parse_example(serialized):
  """Parses one serialised record into tensors (usable inside `tf.data.map`).

  Returns a dict: `id`, `question` (string scalars), `question_ids` int32 [Q],
  `answers` int32 ragged [A, None], `neighbour_block_ids` int64 [N],
  `neighbour_scores` float32 [N], `neighbours` int32 ragged [N, None].
  """
  parsed = tf.io.parse_single_example(serialized, _FEATURES)
  dense = {name: tf.sparse.to_dense(value) if isinstance(
      value, tf.sparse.SparseTensor) else value for name, value in parsed.items()}
  return {
      "id": dense["id"],
      "question": dense["question"],
      "question_ids": tf.cast(dense["question_ids"], tf.int32),
      "answers": tf.RaggedTensor.from_row_lengths(
          tf.cast(dense["answer_ids"], tf.int32), dense["answer_lengths"]),
      "neighbour_block_ids": dense["neighbour_block_ids"],
      "neighbour_scores": dense["neighbour_scores"],
      "neighbours": tf.RaggedTensor.from_row_lengths(
          tf.cast(dense["neighbour_ids"], tf.int32),
          dense["neighbour_lengths"]),
  }


def answer_counts(serialized):
  """int64 [B]: how many answers each of a batch of serialised records has,
  parsing their answer lengths alone."""
  lengths = tf.io.parse_example(
      serialized, {"answer_lengths": _FEATURES["answer_lengths"]}
  )["answer_lengths"]
  return tf.math.bincount(tf.cast(lengths.indices[:, 0], tf.int32),
                          minlength=tf.size(serialized), dtype=tf.int64)


def read_manifest(cache_dir):
  """The cache's manifest; a directory without one is not a finished cache."""
  manifest = utils.read_finished_json(
      cache_dir, MANIFEST_NAME, "neighbour cache", FORMAT_VERSION,
      "run query_cacher_tfrecord.py, or let it finish")
  manifest.setdefault("titles_path", None)
  return manifest


def check_manifest(manifest, cache_dir, *, split=None, vocab_size=None,
                   tokenizer_fingerprint=None, num_neighbours=None):
  """Refuses, with one line, a cache that does not fit what is asked of it."""
  if split is not None and split not in manifest["splits"]:
    raise utils.UserError(
        f"{cache_dir}: no split {split!r} in the cache (it has "
        f"{', '.join(sorted(manifest['splits'])) or 'none'})")
  if vocab_size is not None and manifest["vocab_size"] != vocab_size:
    raise utils.UserError(
        f"{cache_dir}: cached with tokenizer {manifest['tokenizer']!r} "
        f"(vocabulary {manifest['vocab_size']}), but the model's vocabulary is "
        f"{vocab_size}")
  if tokenizer_fingerprint is not None and (
      manifest.get("tokenizer_fingerprint") is None):
    logging.warning(
        "%s: the manifest predates tokenizer fingerprints; only its "
        "vocabulary size is checked against the tokenizer", cache_dir)
  elif (tokenizer_fingerprint is not None and
        manifest["tokenizer_fingerprint"] != tokenizer_fingerprint):
    raise utils.UserError(
        f"{cache_dir}: cached with tokenizer {manifest['tokenizer']!r}, which "
        "differs from the tokenizer asked for (vocabulary/merges fingerprint)")
  if num_neighbours and not manifest["num_neighbours"]:
    raise utils.UserError(
        f"{cache_dir}: has no neighbours (made with --num_neighbours=0); use "
        "--approach_type=live_retrieval or naked_lm")
  if num_neighbours is not None and num_neighbours > manifest["num_neighbours"]:
    raise utils.UserError(
        f"{cache_dir}: {num_neighbours} neighbours asked for, but the cache "
        f"stores {manifest['num_neighbours']} per question")


def split_files(cache_dir, manifest, split):
  """Paths of a split's shards, in order."""
  return [os.path.join(cache_dir, name)
          for name in manifest["splits"][split]["shards"]]


def _shard_refusal(cache_dir, split, problem):
  return utils.UserError(
      f"{cache_dir}: split {split!r}: {problem}, expected the complete shards "
      "the cacher wrote (count them with util_scripts/count_records.py "
      f"--cache_dir={cache_dir}; rerun query_cacher_tfrecord.py)")


def check_shards_exist(cache_dir, files, split):
  """A UserError naming the first of a split's shards that is missing."""
  for path in files:
    if not tf.io.gfile.exists(path):
      raise _shard_refusal(cache_dir, split, f"shard {path} does not exist")


@contextlib.contextmanager
def reading_shards(cache_dir, files, split):
  """Turns a read error of a split's shards inside the block into a
  UserError naming the damaged shard.

  TensorFlow's error names the record's offset, not the file: on an error,
  the shards are read through until one fails.
  """
  try:
    yield
  except (tf.errors.DataLossError, tf.errors.NotFoundError) as error:
    for path in files:
      try:
        tf_utils.count_tfrecords(path)
      except utils.UserError as damage:
        raise _shard_refusal(cache_dir, split, str(damage)) from None
    raise _shard_refusal(
        cache_dir, split,
        f"a shard did not read ({utils.error_reason(error)})") from None


def tokenizer_fingerprint(tokenizer):
  """A stable hash of a GPT-2 tokenizer's vocabulary and merges.

  Two tokenizers with the same fingerprint turn text into the same ids, so a
  cache made with one can be read by a model trained with the other.
  """
  model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
  # tokenizers writes a merge as "a b" in older versions, ["a", "b"] in newer.
  merges = [merge.split(" ", 1) if isinstance(merge, str) else list(merge)
            for merge in model.get("merges", [])]
  content = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()),
                        "merges": merges}, ensure_ascii=True)
  return hashlib.sha256(content.encode("utf-8")).hexdigest()
