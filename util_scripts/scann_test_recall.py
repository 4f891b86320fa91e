r"""Recall@k of a ScaNN config against exact search, and the queries/s of both.

On the real corpus, with ELI5 questions embedded by the REALM query embedder:

  python util_scripts/scann_test_recall.py \
      --retriever_config_path=configs/retriever_configs/realm_cc_news_pretrained.json \
      --kilt_path=eli5-dev-kilt.jsonl --scann_config_path=configs/scann_configs/default.json \
      --leaves_to_search=50,100,200,400 --output_path=scann_recall.json

With query vectors given (`--queries_npy`, float32 [Q, D]) instead of
questions, or on a synthetic database of clustered Gaussian vectors
(`--synthetic_num_blocks=N`: no files needed). Exact search is
`retrievers.exact_search`; ScaNN is `retrievers.ScannSearcher`, built from the
config (or loaded from `--scann_index_dir`, where a built index is also saved).
Prints a table (one row per `leaves_to_search`) and writes it as JSON.
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

import kilt_files  # pylint: disable=g-import-not-at-top,wrong-import-position
import query_embedder  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrieval_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
import retrievers  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_SCANN_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
    "scann_configs", "default.json")

_FLAG_SCANN_CONFIG_PATH = flags.DEFINE_string(
    "scann_config_path", DEFAULT_SCANN_CONFIG,
    "The ScaNN config to test (configs/scann_configs/*.json).")
_FLAG_RETRIEVER_CONFIG_PATH = flags.DEFINE_string(
    "retriever_config_path", None,
    "Retriever config (configs/retriever_configs/*.json): the database is its "
    "block embeddings; the queries come from --kilt_path or --queries_npy. "
    "Either this or --synthetic_num_blocks is required.")
_FLAG_KILT_PATH = flags.DEFINE_string(
    "kilt_path", None, "KILT ELI5 jsonl whose questions, embedded by the "
    "retriever's query embedder, are the queries.")
_FLAG_QUERIES_NPY = flags.DEFINE_string(
    "queries_npy", None, "A .npy of float32 [Q, D] query embeddings, instead "
    "of --kilt_path.")
_FLAG_SYNTHETIC_NUM_BLOCKS = flags.DEFINE_integer(
    "synthetic_num_blocks", 0, "Instead of a retriever: a database of this "
    "many clustered Gaussian vectors, and queries from the same distribution.")
_FLAG_SYNTHETIC_DIM = flags.DEFINE_integer(
    "synthetic_dim", 128, "Dimension of the synthetic vectors.")
_FLAG_NUM_QUERIES = flags.DEFINE_integer(
    "num_queries", 1000, "Queries sampled (without replacement) to measure.")
_FLAG_K = flags.DEFINE_integer("k", 10, "Recall@k: neighbours compared.")
_FLAG_LEAVES_TO_SEARCH = flags.DEFINE_list(
    "leaves_to_search", [], "Values of leaves_to_search to sweep "
    "(comma-separated ints); default: the config's num_leaves_to_search.")
_FLAG_SCANN_INDEX_DIR = flags.DEFINE_string(
    "scann_index_dir", None, "Optional: if it exists, the saved ScaNN index "
    "to load (it must match the config); else where to save the one built.")
_FLAG_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the query sample and of the synthetic data.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Required. Where to write the results as JSON.")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def sample_rows(num_rows, num_samples, seed):
  """Sorted indices of min(num_samples, num_rows) rows, without replacement."""
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_rows, min(num_samples, num_rows),
                            replace=False))


def load_queries_npy(path, dim):
  """float32 [Q, dim] from a .npy file (local or gs://)."""
  if not tf.io.gfile.exists(path):
    raise utils.UserError(f"--queries_npy: {path} does not exist")
  with tf.io.gfile.GFile(path, "rb") as f:
    try:
      queries = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except ValueError as error:
      raise utils.UserError(f"--queries_npy: {path} is not a .npy array "
                            f"({error})") from None
  if queries.ndim != 2 or queries.shape[1] != dim or not np.issubdtype(
      queries.dtype, np.floating):
    raise utils.UserError(
        f"--queries_npy: {path} holds {queries.dtype} {list(queries.shape)}, "
        f"expected float [num_queries, {dim}] (the block embeddings' dim)")
  return queries.astype(np.float32)


def _positive(**values):
  for name, value in values.items():
    if value < 1:
      raise utils.UserError(f"--{name}={value}: expected an integer >= 1")


def _leaves_to_search(values, num_leaves):
  if not values:
    return [None]
  try:
    leaves = [int(value) for value in values]
  except ValueError:
    raise utils.UserError(f"--leaves_to_search={','.join(values)}: expected "
                          "comma-separated integers") from None
  for value in leaves:
    if not 1 <= value <= num_leaves:
      raise utils.UserError(
          f"--leaves_to_search: {value} not in [1, num_leaves={num_leaves}]")
  return leaves


def database_and_queries():
  """(database, queries, description) from the flags."""
  if bool(_FLAG_RETRIEVER_CONFIG_PATH.value) == bool(
      _FLAG_SYNTHETIC_NUM_BLOCKS.value):
    raise utils.UserError(
        "give exactly one of --retriever_config_path (real block embeddings) "
        "and --synthetic_num_blocks (clustered Gaussian vectors)")
  seed = _FLAG_SEED.value
  if _FLAG_SYNTHETIC_NUM_BLOCKS.value:
    _positive(synthetic_num_blocks=_FLAG_SYNTHETIC_NUM_BLOCKS.value,
              synthetic_dim=_FLAG_SYNTHETIC_DIM.value)
    database, queries = retrieval_eval.synthetic_database_and_queries(
        _FLAG_SYNTHETIC_NUM_BLOCKS.value, _FLAG_NUM_QUERIES.value,
        _FLAG_SYNTHETIC_DIM.value, seed)
    return database, queries, {"kind": "synthetic", "seed": seed}
  if bool(_FLAG_KILT_PATH.value) == bool(_FLAG_QUERIES_NPY.value):
    raise utils.UserError("with --retriever_config_path, give exactly one of "
                          "--kilt_path and --queries_npy")
  config = retrievers.load_retriever_config(_FLAG_RETRIEVER_CONFIG_PATH.value)
  database = retrievers.load_block_embeddings(
      config["query_embedder_path"], config["num_block_records"])
  if _FLAG_QUERIES_NPY.value:
    queries = load_queries_npy(_FLAG_QUERIES_NPY.value, database.shape[1])
    queries = queries[sample_rows(len(queries), _FLAG_NUM_QUERIES.value, seed)]
    return database, queries, {
        "kind": "queries_npy", "queries_npy": _FLAG_QUERIES_NPY.value,
        "retriever_config_path": _FLAG_RETRIEVER_CONFIG_PATH.value}
  questions = [question for _, question, _ in
               kilt_files.eli5_questions(_FLAG_KILT_PATH.value)]
  sample = sample_rows(len(questions), _FLAG_NUM_QUERIES.value, seed)
  embedder = query_embedder.QueryEmbedder(config["query_embedder_path"])
  queries = embedder.embed([questions[index] for index in sample])
  if queries.shape[1] != database.shape[1]:
    raise utils.UserError(
        f"{config['query_embedder_path']}: query embeddings have "
        f"{queries.shape[1]} dimensions, block embeddings {database.shape[1]}")
  return database, queries, {
      "kind": "kilt", "kilt_path": _FLAG_KILT_PATH.value,
      "retriever_config_path": _FLAG_RETRIEVER_CONFIG_PATH.value}


def main(argv):
  if not _FLAG_OUTPUT_PATH.value:
    raise utils.UserError("--output_path is required: where to write the "
                          "results as JSON")
  # Checked and made before the long work, so that a bad location fails at
  # once.
  utils.check_output_path(_FLAG_OUTPUT_PATH.value, "--output_path")
  utils.makedirs(os.path.dirname(_FLAG_OUTPUT_PATH.value) or ".")
  _positive(num_queries=_FLAG_NUM_QUERIES.value, k=_FLAG_K.value)
  scann_config = retrievers.load_scann_config(_FLAG_SCANN_CONFIG_PATH.value)
  leaves = _leaves_to_search(_FLAG_LEAVES_TO_SEARCH.value,
                             scann_config["num_leaves"])
  database, queries, source = database_and_queries()
  if _FLAG_K.value > database.shape[0]:
    raise utils.UserError(f"--k={_FLAG_K.value}: the database holds only "
                          f"{database.shape[0]} vectors")
  print(f"{len(queries):,} queries, {database.shape[0]:,} x "
        f"{database.shape[1]} database ({source['kind']}), ScaNN config "
        f"{_FLAG_SCANN_CONFIG_PATH.value}", flush=True)
  result = retrieval_eval.compare(
      database, queries, scann_config, _FLAG_K.value, leaves_to_search=leaves,
      scann_index_dir=_FLAG_SCANN_INDEX_DIR.value)
  result.update(source=source, scann_config=scann_config,
                scann_config_path=_FLAG_SCANN_CONFIG_PATH.value)
  print(retrieval_eval.format_table(result))
  utils.atomic_write_json(_FLAG_OUTPUT_PATH.value, result)


if __name__ == "__main__":
  cli.run(main)
