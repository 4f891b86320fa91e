r"""A random subset of a REALM corpus, in the same formats, for debugging.

  python util_scripts/create_data_subset_realm.py \
      --retriever_config_path=configs/retriever_configs/realm_cc_news_pretrained.json \
      --num_blocks=100000 --output_dir=realm_subset [--seed=0]

Writes into `--output_dir`:
  blocks.tfr              the chosen blocks' records (raw UTF-8, unchanged)
  titles.tfr              their page titles, when the corpus has titles
                          (`title_records`)
  embedder/               a copy of the query embedder (SavedModel, assets),
    encoded/encoded.ckpt  with `block_emb` holding the chosen rows only
  original_block_ids.npy  int64 [num_blocks]: subset id i -> original id
  subset.json             the source, seed and sizes
  retriever_config.json   points at the files above; written last

The chosen blocks are drawn without replacement, deterministically from
`--seed`, and kept in their original order: block i of the subset is the
i-th smallest chosen original id, in the text, the titles, the embeddings and
the mapping.
The source's block embeddings are read whole (6.8 GB for the public corpus);
its text is read block by block.
"""

import io
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tqdm  # pylint: disable=g-import-not-at-top,wrong-import-position

import block_store  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrievers  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_RETRIEVER_CONFIG_PATH = flags.DEFINE_string(
    "retriever_config_path", None,
    "Required. Retriever config of the corpus to sample "
    "(configs/retriever_configs/*.json).")
_FLAG_NUM_BLOCKS = flags.DEFINE_integer(
    "num_blocks", None, "Required. Blocks in the subset.")
_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Required. Where to write the subset (local or gs://).")
_FLAG_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the random choice of blocks.")

RETRIEVER_CONFIG_NAME = "retriever_config.json"
BLOCKS_NAME = "blocks.tfr"
TITLES_NAME = "titles.tfr"
EMBEDDER_NAME = "embedder"
ORIGINAL_IDS_NAME = "original_block_ids.npy"
SUBSET_NAME = "subset.json"
# The source embedder's block embeddings are replaced, not copied.
_ENCODED_DIR = "encoded"


def choose_blocks(num_source_blocks, num_blocks, seed):
  """int64 [num_blocks]: sorted original ids, drawn without replacement."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_source_blocks, num_blocks,
                            replace=False)).astype(np.int64)


def copy_embedder(source, destination):
  """Copies the embedder SavedModel, all but `encoded/`, to `destination`."""
  source = source.rstrip("/")
  for directory, _, files in tf.io.gfile.walk(source):
    relative = os.path.relpath(directory, source)
    if relative.split(os.sep)[0] == _ENCODED_DIR:
      continue
    target_dir = destination if relative == "." else os.path.join(
        destination, relative)
    utils.makedirs(target_dir)
    for name in files:
      tf.io.gfile.copy(os.path.join(directory, name),
                       os.path.join(target_dir, name), overwrite=True)


def write_npy(path, array):
  buffer = io.BytesIO()
  np.save(buffer, array)
  tmp = utils.temporary_path(path)
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)


def create_subset(retriever_config_path, num_blocks, output_dir, seed):
  """Writes the subset (see the module docstring); returns the ids chosen."""
  config = retrievers.load_retriever_config(retriever_config_path)
  num_source_blocks = config["num_block_records"]
  if not 1 <= num_blocks <= num_source_blocks:
    raise utils.UserError(
        f"--num_blocks={num_blocks}: expected 1 to {num_source_blocks} (the "
        f"blocks of {retriever_config_path})")
  config_path = os.path.join(output_dir, RETRIEVER_CONFIG_NAME)
  if tf.io.gfile.exists(config_path):
    raise utils.UserError(
        f"--output_dir={output_dir}: already holds a finished subset "
        f"({RETRIEVER_CONFIG_NAME}); choose another directory or delete it")
  store = block_store.BlockStore(config["text_records"], num_source_blocks,
                                 titles_path=config["title_records"])
  block_emb = retrievers.load_block_embeddings(config["query_embedder_path"],
                                               num_source_blocks)
  chosen = choose_blocks(num_source_blocks, num_blocks, seed)
  subset_emb = block_emb[chosen]
  del block_emb
  utils.makedirs(output_dir)
  records = (store.text(block_id).encode("utf-8") for block_id in tqdm.tqdm(
      chosen, desc="blocks", unit="block"))
  tf_utils.write_tfrecords(os.path.join(output_dir, BLOCKS_NAME), records)
  subset_config = {"query_embedder_path": EMBEDDER_NAME,
                   "text_records": BLOCKS_NAME,
                   "num_block_records": num_blocks}
  if config["title_records"]:
    titles = (store.title(block_id).encode("utf-8") for block_id in tqdm.tqdm(
        chosen, desc="titles", unit="block"))
    tf_utils.write_tfrecords(os.path.join(output_dir, TITLES_NAME), titles)
    subset_config["title_records"] = TITLES_NAME
  embedder_dir = os.path.join(output_dir, EMBEDDER_NAME)
  copy_embedder(config["query_embedder_path"], embedder_dir)
  retrievers.write_block_embeddings(embedder_dir, subset_emb)
  write_npy(os.path.join(output_dir, ORIGINAL_IDS_NAME), chosen)
  utils.atomic_write_json(os.path.join(output_dir, SUBSET_NAME), {
      "source_retriever_config": retriever_config_path,
      "source_num_blocks": num_source_blocks, "num_blocks": num_blocks,
      "seed": seed, "original_block_ids": ORIGINAL_IDS_NAME})
  # Relative paths: the subset can be moved as a whole.
  utils.atomic_write_json(config_path, subset_config)
  return chosen


def main(argv):
  for name, value in (("retriever_config_path",
                       _FLAG_RETRIEVER_CONFIG_PATH.value),
                      ("num_blocks", _FLAG_NUM_BLOCKS.value),
                      ("output_dir", _FLAG_OUTPUT_DIR.value)):
    if value is None:
      raise utils.UserError(f"--{name} is required")
  utils.check_output_path(_FLAG_OUTPUT_DIR.value, "--output_dir",
                          directory=True)
  create_subset(_FLAG_RETRIEVER_CONFIG_PATH.value, _FLAG_NUM_BLOCKS.value,
                _FLAG_OUTPUT_DIR.value, _FLAG_SEED.value)
  print(f"wrote {_FLAG_NUM_BLOCKS.value:,} blocks to {_FLAG_OUTPUT_DIR.value} "
        f"({RETRIEVER_CONFIG_NAME})")


if __name__ == "__main__":
  cli.run(main)
