"""Tiny REALM retriever files of the real formats, built in a test's tmp dir.

An embedder TF2 SavedModel with the REALM signatures (`projected`,
`tokenization_info`) and `assets/vocab.txt`, its block embeddings in
`encoded/encoded.ckpt`, a `blocks.tfr` and a `titles.tfr` of raw UTF-8
records (the text and the title of block i as record i) and a retriever
config. The embedder is the mean of a random table over the unmasked
wordpieces, so tests can recompute it with NumPy. REALM's own TF1 Hub export
is `../shared/fixtures/realm_tf1_hub/` (`REALM_TF1_HUB`).
"""

import json
import os

import numpy as np
import tensorflow as tf

import retrievers

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "fixtures")
# A toy retriever exported by REALM/ORQA's own code (its README).
REALM_TF1_HUB = os.path.join(FIXTURES, "realm_tf1_hub")
# Real KILT ELI5 lines, 5 per split, under KILT's file names.
KILT_ELI5_SAMPLE = os.path.join(FIXTURES, "kilt_eli5_sample")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["why", "is", "the", "sky", "blue", "water", "boil", "##s", "ice",
         "float", "##ing", "bird", "fly", "south", "winter", "light", "green",
         "plant", "grow", "moon", "tide", "salt", "sea", "cold", "hot"]
VOCAB = SPECIAL_TOKENS + WORDS


class TableEmbedder(tf.Module):
  """projected(...) = the mean of `table` rows over the unmasked input ids."""

  def __init__(self, vocab_file, table, with_projected=True):
    super().__init__()
    self._vocab_file = tf.saved_model.Asset(vocab_file)
    self._table = tf.Variable(table, trainable=False)
    self._with_projected = with_projected

  @tf.function(input_signature=[
      tf.TensorSpec([None, None], tf.int32, name="input_ids"),
      tf.TensorSpec([None, None], tf.int32, name="input_mask"),
      tf.TensorSpec([None, None], tf.int32, name="segment_ids")])
  def projected(self, input_ids, input_mask, segment_ids):
    mask = tf.cast(input_mask, tf.float32)[:, :, None]
    vectors = tf.gather(self._table, input_ids + segment_ids) * mask
    return {"default": tf.reduce_sum(vectors, 1) / tf.reduce_sum(mask, 1)}

  @tf.function(input_signature=[])
  def tokenization_info(self):
    return {"vocab_file": self._vocab_file.asset_path,
            "do_lower_case": tf.constant(True)}

  def signatures(self):
    signatures = {
        "tokenization_info": self.tokenization_info.get_concrete_function()}
    if self._with_projected:
      signatures["projected"] = self.projected.get_concrete_function()
    return signatures


def write_embedder(directory, *, dim=8, seed=0, with_projected=True):
  """Saves a TableEmbedder at `directory`; returns its table [V, dim]."""
  table = np.random.default_rng(seed).standard_normal(
      [len(VOCAB), dim]).astype(np.float32)
  os.makedirs(directory, exist_ok=True)
  vocab_file = os.path.join(os.path.dirname(directory), "vocab_source.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    f.write("".join(token + "\n" for token in VOCAB))
  module = TableEmbedder(vocab_file, table, with_projected)
  tf.saved_model.save(module, directory, signatures=module.signatures())
  return table


def write_tf2_block_embeddings(embedder_dir, block_emb):
  """encoded/encoded.ckpt written by tf.train.Checkpoint: the TF2 object name."""
  prefix = os.path.join(embedder_dir, "encoded", "encoded.ckpt")
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  tf.train.Checkpoint(block_emb=tf.Variable(block_emb)).write(prefix)


def block_texts(num_blocks, seed=0):
  """Records as in REALM's blocks.tfr: the block's text alone."""
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS[:-3], size=6)) for _ in range(num_blocks)]


def block_titles(num_blocks):
  """Records as in REALM's titles.tfr: the page title of each block (non-ASCII too)."""
  return [f"Title {index} é" for index in range(num_blocks)]


def write_blocks(path, records):
  """A TFRecord file of raw records (str are UTF-8 encoded, bytes kept)."""
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record.encode("utf-8") if isinstance(record, str)
                   else record)


def write_retriever(directory, *, num_blocks=50, dim=8, seed=0):
  """Embedder + block embeddings + blocks.tfr + titles.tfr + retriever config in `directory`.

  Returns a dict: config_path, embedder, blocks, texts, titles_path, titles,
  block_emb, table.
  """
  embedder = os.path.join(directory, "embedder")
  table = write_embedder(embedder, dim=dim, seed=seed)
  block_emb = np.random.default_rng(seed + 1).standard_normal(
      [num_blocks, dim]).astype(np.float32)
  retrievers.write_block_embeddings(embedder, block_emb)
  blocks = os.path.join(directory, "blocks.tfr")
  texts = block_texts(num_blocks, seed)
  write_blocks(blocks, texts)
  titles_path = os.path.join(directory, "titles.tfr")
  titles = block_titles(num_blocks)
  write_blocks(titles_path, titles)
  config_path = os.path.join(directory, "retriever_config.json")
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump({"query_embedder_path": "embedder", "text_records": "blocks.tfr",
               "title_records": "titles.tfr",
               "num_block_records": num_blocks}, f)
  return dict(config_path=config_path, embedder=embedder, blocks=blocks,
              texts=texts, titles_path=titles_path, titles=titles,
              block_emb=block_emb, table=table)


def brute_force_top_k(queries, block_emb, k):
  """(scores, ids) of the k largest inner products, in float64, ties by lower id."""
  scores = np.asarray(queries, np.float64) @ np.asarray(block_emb, np.float64).T
  ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
  order = np.lexsort((ids, -scores), axis=1)[:, :k]
  return np.take_along_axis(scores, order, axis=1), order
