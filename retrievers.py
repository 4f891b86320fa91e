"""REALM retrieval: the retriever config, block embeddings, exact and ScaNN search.

Knows nothing about GPT-2: it maps question text to block ids and scores
(`LiveRetriever`, over `query_embedder.QueryEmbedder` and
`block_store.BlockStore`; which cached neighbours an example sees is
`context_draw`'s). ScaNN is imported only when a ScaNN index is built or
loaded.
"""

import concurrent.futures
import functools
import os
import tempfile

import numpy as np
import tensorflow as tf

import block_store
import query_embedder
import utils


# ---------------------------------------------------------------------------
# Retriever configuration and block embeddings
# ---------------------------------------------------------------------------

_RETRIEVER_CONFIG_KEYS = {
    "query_embedder_path": str,
    "text_records": str,
    "num_block_records": int,
}
# Optional keys, None when absent.
_RETRIEVER_CONFIG_OPTIONAL_KEYS = {
    "title_records": str,
}


def _resolve_beside(path, config_path):
  """`path` as written in a config, relative paths taken from the config's dir."""
  if "://" in path or os.path.isabs(path):
    return path
  return os.path.join(os.path.dirname(config_path), path)


def load_retriever_config(path, *, context_with_title=False):
  """Reads a retriever config: `query_embedder_path`, `text_records`, `num_block_records`.

  Optional: `title_records` (titles.tfr, record i the page title of block i;
  None when absent), which `context_with_title` (blocks read as
  `title: text`) needs. Relative paths in the file are taken relative to the
  file's directory.

  A config of the one key `index_root` points at an index root
  (refresh_index.py's): it reads as the config of the version the root's
  `CURRENT` names, with `index_root`, `index_name` (the version's name) and
  `scann_index_dir` (the version's ScaNN index, or None) added.
  """
  config = utils.read_json(path, "retriever config")
  if isinstance(config, dict) and INDEX_ROOT_KEY in config:
    return _load_index_root_config(path, config, context_with_title)
  all_keys = {**_RETRIEVER_CONFIG_KEYS, **_RETRIEVER_CONFIG_OPTIONAL_KEYS}
  if not isinstance(config, dict):
    raise utils.UserError(f"{path}: expected a JSON object with keys "
                          f"{', '.join(_RETRIEVER_CONFIG_KEYS)}")
  for key in _RETRIEVER_CONFIG_KEYS:
    if key not in config:
      raise utils.UserError(f"{path}: missing key {key!r} (expected "
                            f"{', '.join(_RETRIEVER_CONFIG_KEYS)})")
  for key, kind in all_keys.items():
    value = config.get(key)
    if key in config and (not isinstance(value, kind) or
                          isinstance(value, bool)):
      raise utils.UserError(f"{path}: {key} is {value!r}, expected a "
                            f"{kind.__name__}")
  if config["num_block_records"] < 1:
    raise utils.UserError(f"{path}: num_block_records is "
                          f"{config['num_block_records']}, expected >= 1")
  unknown = sorted(set(config) - set(all_keys))
  if unknown:
    raise utils.UserError(f"{path}: unknown key(s) {', '.join(unknown)} "
                          f"(expected {', '.join(all_keys)})")
  title_records = config.get("title_records")
  if context_with_title and title_records is None:
    raise utils.UserError(
        f"--context_with_title: {path} has no title_records, expected one "
        "naming the titles.tfr of the blocks")
  return {
      "query_embedder_path": _resolve_beside(config["query_embedder_path"],
                                             path),
      "text_records": _resolve_beside(config["text_records"], path),
      "title_records": (None if title_records is None else
                        _resolve_beside(title_records, path)),
      "num_block_records": config["num_block_records"],
  }


# ---------------------------------------------------------------------------
# Index roots: versions of the block embeddings, the served one named by a
# pointer file (refresh_index.py writes them)
# ---------------------------------------------------------------------------

INDEX_ROOT_KEY = "index_root"
# The file of an index root naming its served version, replaced atomically.
INDEX_POINTER_NAME = "CURRENT"
INDEX_VERSIONS_DIR = "versions"
# In a version's directory: a plain retriever config (its embedder beside
# it, the block embeddings in the embedder's encoded/) and the optional
# ScaNN index.
VERSION_CONFIG_NAME = "retriever_config.json"
VERSION_SCANN_DIR = "scann"


def index_version_dir(index_root, name):
  return os.path.join(index_root, INDEX_VERSIONS_DIR, name)


def current_index_name(index_root):
  """The version `index_root`'s pointer names, checked to be a finished one."""
  pointer = os.path.join(index_root, INDEX_POINTER_NAME)
  if not tf.io.gfile.exists(pointer):
    raise utils.UserError(
        f"{index_root}: no {INDEX_POINTER_NAME}, expected an index root that "
        "refresh_index.py has written a version into")
  with tf.io.gfile.GFile(pointer) as f:
    name = f.read().strip()
  version_config = os.path.join(index_version_dir(index_root, name),
                                VERSION_CONFIG_NAME)
  if not name or "/" in name or not tf.io.gfile.exists(version_config):
    raise utils.UserError(
        f"{pointer}: names version {name!r}, but there is no "
        f"{version_config}, expected a finished version of the index")
  return name


def _load_index_root_config(path, config, context_with_title):
  """`load_retriever_config` of a config {"index_root": ...}."""
  root = config[INDEX_ROOT_KEY]
  if set(config) != {INDEX_ROOT_KEY} or not isinstance(root, str):
    raise utils.UserError(
        f"{path}: an index root config holds one key, {INDEX_ROOT_KEY} (a "
        f"path), not {', '.join(sorted(config))}")
  root = _resolve_beside(root, path)
  if "://" not in root:
    root = os.path.normpath(root)
  name = current_index_name(root)
  version_dir = index_version_dir(root, name)
  version_config_path = os.path.join(version_dir, VERSION_CONFIG_NAME)
  if INDEX_ROOT_KEY in utils.read_json(version_config_path,
                                       "retriever config"):
    raise utils.UserError(f"{version_config_path}: a version's config names "
                          "its embedder and blocks, not another index root")
  scann_dir = os.path.join(version_dir, VERSION_SCANN_DIR)
  return dict(
      load_retriever_config(version_config_path,
                            context_with_title=context_with_title),
      index_root=root, index_name=name,
      scann_index_dir=(scann_dir if tf.io.gfile.exists(os.path.join(
          scann_dir, _SCANN_CONFIG_NAME)) else None))


_BLOCK_EMB_NAMES = ("block_emb", "block_emb/.ATTRIBUTES/VARIABLE_VALUE")


def load_block_embeddings(embedder_path, num_blocks):
  """The block embeddings of a REALM embedder, float32 [num_blocks, D].

  They live in `<embedder_path>/encoded/encoded.ckpt`, as variable `block_emb`
  (TF1 checkpoints) or `block_emb/.ATTRIBUTES/VARIABLE_VALUE` (TF2 ones).
  """
  checkpoint_path = os.path.join(embedder_path, "encoded", "encoded.ckpt")
  reader = utils.checkpoint_reader(
      checkpoint_path,
      f"{checkpoint_path}: no readable checkpoint (expected the REALM block "
      "embeddings beside the embedder, in encoded/encoded.ckpt)")
  shapes = reader.get_variable_to_shape_map()
  name = next((n for n in _BLOCK_EMB_NAMES if n in shapes), None)
  if name is None:
    raise utils.UserError(
        f"{checkpoint_path}: no variable {' or '.join(_BLOCK_EMB_NAMES)} "
        f"(it has {', '.join(sorted(shapes)[:5]) or 'none'})")
  shape = shapes[name]
  if len(shape) != 2 or shape[0] != num_blocks:
    raise utils.UserError(
        f"{checkpoint_path}: {name} has shape {shape}, expected "
        f"[{num_blocks}, dim] (num_block_records of the retriever config)")
  return np.asarray(reader.get_tensor(name), dtype=np.float32)


def write_block_embeddings(embedder_path, block_emb):
  """Writes `<embedder_path>/encoded/encoded.ckpt` with variable `block_emb`.

  The layout of REALM's public TF1 checkpoint, which `load_block_embeddings`
  reads; the checkpoint's index is renamed into place last.
  """
  prefix = os.path.join(embedder_path, "encoded", "encoded.ckpt")
  utils.makedirs(os.path.dirname(prefix))
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=["block_emb"],
                    shape_and_slices=[""],
                    tensors=[tf.convert_to_tensor(block_emb, tf.float32)])


# ---------------------------------------------------------------------------
# Exact maximum inner product search
# ---------------------------------------------------------------------------

# The top k of a chunk is found in two steps: the best score of each group of
# `_GROUP_SIZE` consecutive blocks, the k best groups, then the k best blocks
# among those groups' members. A block in the chunk's top k always sits in one
# of the k best groups (every group ranked above its group holds a block ranked
# above it), and the first top-k only sees chunk/_GROUP_SIZE values: far less
# work than a top-k over every score, which would cost more than the matmul.
_GROUP_SIZE = 16
DEFAULT_CHUNK_SIZE = 32768


@functools.lru_cache(maxsize=None)
def _merge_chunk_top_k(k):
  """tf.function: merges the top k of one chunk of blocks into the running top k."""

  @tf.function(input_signature=[
      tf.TensorSpec([None, None], tf.float32),  # queries [Q, D]
      tf.TensorSpec([None, None], tf.float32),  # chunk of blocks [C, D]
      tf.TensorSpec([], tf.int64),  # block id of the chunk's first row
      tf.TensorSpec([None, k], tf.float32),  # running top-k scores
      tf.TensorSpec([None, k], tf.int64),  # their block ids
  ])
  def merge(queries, chunk, first_block_id, best_scores, best_ids):
    scores = tf.matmul(queries, chunk, transpose_b=True)
    padding = -tf.shape(scores)[1] % _GROUP_SIZE
    # Only a last, short chunk is padded: padding copies the scores.
    scores = tf.cond(
        padding > 0,
        lambda: tf.pad(scores, [[0, 0], [0, padding]], constant_values=-np.inf),
        lambda: scores)
    num_groups = tf.shape(scores)[1] // _GROUP_SIZE
    group_best = tf.reduce_max(
        tf.reshape(scores, [tf.shape(scores)[0], num_groups, _GROUP_SIZE]),
        axis=2)
    num_top_groups = tf.minimum(k, num_groups)
    _, top_groups = tf.math.top_k(group_best, k=num_top_groups, sorted=False)
    # Candidates in ascending block order, so that top_k's tie rule (lower
    # index first) is "lower block id first".
    top_groups = tf.sort(top_groups, axis=1)
    candidates = tf.reshape(
        top_groups[:, :, None] * _GROUP_SIZE + tf.range(_GROUP_SIZE),
        [tf.shape(scores)[0], num_top_groups * _GROUP_SIZE])
    candidate_scores = tf.gather(scores, candidates, batch_dims=1)
    candidate_ids = tf.cast(candidates, tf.int64) + first_block_id
    # The running top k holds lower block ids than this chunk: put it first.
    merged_scores = tf.concat([best_scores, candidate_scores], axis=1)
    merged_ids = tf.concat([best_ids, candidate_ids], axis=1)
    top_scores, top_positions = tf.math.top_k(merged_scores, k=k)
    return top_scores, tf.gather(merged_ids, top_positions, batch_dims=1)

  return merge


def exact_search(queries, block_emb, k, *, chunk_size=DEFAULT_CHUNK_SIZE,
                 device=None):
  """The k blocks of largest inner product with each query, by brute force.

  Streams over `block_emb` in chunks of `chunk_size` rows (a matmul, then the
  chunk's top k merged into the running top k), so memory stays at
  Q x chunk_size scores whatever the number of blocks.

  Args:
    queries: float32 [Q, D].
    block_emb: float32 [N, D], a NumPy array (each chunk is copied to the
      device in turn) or a tensor already on the device.
    k: neighbours per query, 1 <= k <= N.
    chunk_size: blocks scored at once.
    device: where to compute (e.g. "/device:GPU:0"); default TF's placement.

  Returns:
    (scores float32 [Q, k], block_ids int64 [Q, k]): scores descending, equal
    scores in increasing block id order.
  """
  num_blocks = int(block_emb.shape[0])
  if not 1 <= k <= num_blocks:
    raise utils.UserError(
        f"{k} neighbours asked for, but there are {num_blocks} blocks")
  queries = np.asarray(queries, dtype=np.float32)
  if queries.ndim != 2 or queries.shape[1] != block_emb.shape[1]:
    raise ValueError(f"queries of shape {queries.shape} do not match block "
                     f"embeddings of shape {tuple(block_emb.shape)}")
  merge = _merge_chunk_top_k(k)
  with tf.device(device):
    query_tensor = tf.constant(queries)
    best_scores = tf.fill([queries.shape[0], k], -np.inf)
    best_ids = tf.fill([queries.shape[0], k], tf.constant(-1, tf.int64))
    for start in range(0, num_blocks, chunk_size):
      best_scores, best_ids = merge(
          query_tensor, block_emb[start:start + chunk_size],
          tf.constant(start, tf.int64), best_scores, best_ids)
    return best_scores.numpy(), best_ids.numpy()


def _merge_top_k(scores, block_ids, k):
  """The k best of partial results given in increasing block-id order.

  Args:
    scores, block_ids: [Q, M], the concatenated top ks of consecutive block
      ranges, each sorted by descending score with ties by lower id.
    k: neighbours to keep.

  A stable sort by descending score keeps equal scores in their given order,
  which is increasing block id.
  """
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return (np.take_along_axis(scores, order, axis=1),
          np.take_along_axis(block_ids, order, axis=1))


class ExactSearcher:
  """Exact search with the block embeddings split over devices.

  Each device holds a contiguous range of blocks (a copy on accelerators, a
  view of the NumPy array on CPUs) and searches it with `exact_search`, all
  devices at once; the partial top ks are merged on the host.
  """

  def __init__(self, block_emb, devices=None, chunk_size=DEFAULT_CHUNK_SIZE):
    self.num_blocks = int(block_emb.shape[0])
    # No device is left without blocks.
    devices = (list(devices) if devices else [None])[:max(1, self.num_blocks)]
    bounds = np.linspace(0, self.num_blocks, len(devices) + 1).astype(int)
    self._shards = []
    for device, start, end in zip(devices, bounds[:-1], bounds[1:]):
      shard = block_emb[start:end]
      if device and tf.DeviceSpec.from_string(device).device_type != "CPU":
        with tf.device(device):
          shard = tf.constant(shard)
      self._shards.append((device, int(start), shard))
    self._chunk_size = chunk_size

  def _search_shard(self, queries, k, shard):
    device, start, block_emb = shard
    scores, block_ids = exact_search(
        queries, block_emb, min(k, int(block_emb.shape[0])),
        chunk_size=self._chunk_size, device=device)
    return scores, block_ids + start

  def search(self, queries, k):
    """(scores float32 [Q, k], block_ids int64 [Q, k]), as `exact_search`."""
    if not 1 <= k <= self.num_blocks:
      raise utils.UserError(
          f"{k} neighbours asked for, but there are {self.num_blocks} blocks")
    if len(self._shards) == 1:
      return self._search_shard(queries, k, self._shards[0])
    with concurrent.futures.ThreadPoolExecutor(len(self._shards)) as pool:
      partial = list(pool.map(
          lambda shard: self._search_shard(queries, k, shard), self._shards))
    return _merge_top_k(np.concatenate([scores for scores, _ in partial], 1),
                        np.concatenate([ids for _, ids in partial], 1), k)


# ---------------------------------------------------------------------------
# ScaNN search
# ---------------------------------------------------------------------------

# Key names follow the original project's configs/scann_configs/*.json.
_SCANN_REQUIRED_KEYS = ("num_neighbors", "num_leaves", "num_leaves_to_search",
                        "training_sample_size", "reordering_num_neighbors")
_SCANN_DEFAULTS = {"dims_per_block": 2,
                   "anisotropic_quantization_threshold": 0.2}
_SCANN_CONFIG_NAME = "scann_config.json"


def check_scann_config(config, source):
  """The ScaNN config `config` (from `source`) with defaults filled in.

  Keys: num_neighbors (default k of a search), num_leaves (partitions),
  num_leaves_to_search, training_sample_size (vectors the partitioner is
  trained on), reordering_num_neighbors (candidates rescored exactly; 0: no
  reordering), dims_per_block and anisotropic_quantization_threshold
  (asymmetric hashing; defaults 2 and 0.2).
  """
  if not isinstance(config, dict):
    raise utils.UserError(f"{source}: expected a JSON object")
  unknown = sorted(set(config) - set(_SCANN_REQUIRED_KEYS) -
                   set(_SCANN_DEFAULTS))
  if unknown:
    raise utils.UserError(
        f"{source}: unknown key(s) {', '.join(unknown)} (expected "
        f"{', '.join(_SCANN_REQUIRED_KEYS + tuple(_SCANN_DEFAULTS))})")
  checked = dict(_SCANN_DEFAULTS, **config)
  for key in _SCANN_REQUIRED_KEYS + ("dims_per_block",):
    if key not in checked:
      raise utils.UserError(f"{source}: missing key {key!r}")
    value = checked[key]
    minimum = 0 if key == "reordering_num_neighbors" else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise utils.UserError(
          f"{source}: {key} is {value!r}, expected an integer >= {minimum}")
  threshold = checked["anisotropic_quantization_threshold"]
  if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
    raise utils.UserError(
        f"{source}: anisotropic_quantization_threshold is {threshold!r}, "
        "expected a number")
  if checked["num_leaves_to_search"] > checked["num_leaves"]:
    raise utils.UserError(
        f"{source}: num_leaves_to_search ({checked['num_leaves_to_search']}) "
        f"exceeds num_leaves ({checked['num_leaves']})")
  return checked


def load_scann_config(path):
  """Reads and checks a `configs/scann_configs/*.json` file (see `check_scann_config`)."""
  return check_scann_config(utils.read_json(path, "ScaNN config"), path)


def _scann_ops():
  """ScaNN's pybind ops, imported on first use: exact search needs none of it."""
  from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
  return scann_ops_pybind


def scann_batch_size(num_queries):
  """Queries per ScaNN thread batch: even batches, one per core, at most 256.

  ScaNN's threads take batches of 256 queries by default, so 300 queries on
  2 cores would run as 256 + 44.
  """
  return max(1, min(256, -(-num_queries // (os.cpu_count() or 1))))


class ScannSearcher:
  """Approximate inner-product search with ScaNN: partitions, AH scoring, reordering."""

  def __init__(self, searcher, config):
    """Use `build` or `load`."""
    self._searcher = searcher
    self.config = config

  @classmethod
  def build(cls, block_emb, config):
    """Trains and builds an index over `block_emb` float32 [N, D]."""
    num_blocks = block_emb.shape[0]
    if config["num_leaves"] > num_blocks:
      raise utils.UserError(
          f"ScaNN config: num_leaves ({config['num_leaves']}) exceeds the "
          f"number of blocks ({num_blocks})")
    builder = _scann_ops().builder(
        np.asarray(block_emb, dtype=np.float32), config["num_neighbors"],
        "dot_product")
    builder = builder.tree(
        num_leaves=config["num_leaves"],
        num_leaves_to_search=config["num_leaves_to_search"],
        training_sample_size=min(config["training_sample_size"], num_blocks))
    builder = builder.score_ah(
        config["dims_per_block"],
        anisotropic_quantization_threshold=config[
            "anisotropic_quantization_threshold"])
    if config["reordering_num_neighbors"]:
      builder = builder.reorder(config["reordering_num_neighbors"])
    return cls(builder.build(), config)

  def search(self, queries, k, *, leaves_to_search=None):
    """(scores float32 [Q, k], block_ids int64 [Q, k]), scores descending.

    `leaves_to_search` overrides the config's `num_leaves_to_search`.
    """
    reordering = self.config["reordering_num_neighbors"]
    if reordering and k > reordering:
      raise utils.UserError(
          f"{k} neighbours asked for, but the ScaNN config reorders only "
          f"reordering_num_neighbors={reordering}")
    queries = np.asarray(queries, dtype=np.float32)
    block_ids, scores = self._searcher.search_batched_parallel(
        queries, final_num_neighbors=k, leaves_to_search=leaves_to_search,
        batch_size=scann_batch_size(len(queries)))
    if block_ids.shape[1] < k:
      raise utils.UserError(
          f"ScaNN found only {block_ids.shape[1]} of {k} neighbours; search "
          "more leaves (num_leaves_to_search) or use fewer, larger leaves")
    return scores.astype(np.float32), block_ids.astype(np.int64)

  def save(self, directory):
    """Writes the index and its config to `directory` (local or gs://).

    The config is written last: a directory without it is not a saved index.
    """
    with tempfile.TemporaryDirectory() as local_dir:
      self._searcher.serialize(local_dir, relative_path=True)
      utils.makedirs(directory)
      for name in sorted(os.listdir(local_dir)):
        tf.io.gfile.copy(os.path.join(local_dir, name),
                         os.path.join(directory, name), overwrite=True)
    utils.atomic_write_json(os.path.join(directory, _SCANN_CONFIG_NAME),
                            self.config)

  @classmethod
  def load(cls, directory, config=None):
    """Loads an index saved by `save`; refuses one built with another `config`."""
    config_path = os.path.join(directory, _SCANN_CONFIG_NAME)
    if not tf.io.gfile.exists(config_path):
      raise utils.UserError(
          f"{directory}: not a saved ScaNN index (no {_SCANN_CONFIG_NAME})")
    saved_config = check_scann_config(
        utils.read_json(config_path, "ScaNN index config"), config_path)
    if config is not None and config != saved_config:
      raise utils.UserError(
          f"{directory}: the saved index was built with {saved_config}, not "
          f"the requested {config}")
    if "://" not in directory:
      return cls(_scann_ops().load_searcher(directory), saved_config)
    with tempfile.TemporaryDirectory() as local_dir:
      for name in tf.io.gfile.listdir(directory):
        tf.io.gfile.copy(os.path.join(directory, name),
                         os.path.join(local_dir, name))
      return cls(_scann_ops().load_searcher(local_dir), saved_config)


# ---------------------------------------------------------------------------
# Live retrieval: question text -> block ids and scores
# ---------------------------------------------------------------------------

SEARCH_KINDS = ("exact", "scann")


class LiveRetriever:
  """REALM retrieval end to end: the embedder, a searcher over the blocks, their text.

  `search(embedder.embed(questions), k)` gives the neighbours of questions;
  `blocks` reads their text and titles.

  Args:
    retriever_config: a dict from `load_retriever_config`.
    search: "exact" (brute force over every block) or "scann".
    scann_config: a dict from `load_scann_config` (search="scann").
    scann_index_dir: optional; a saved index is loaded from here, or the
      index built is saved here. A config of an index root brings its
      version's own (`load_retriever_config`), and refuses another.
    devices: where exact search runs, the blocks split over them (default:
      TF's placement).
    max_query_length: 0 (no cut, as ORQA) or the wordpieces kept per
      question, [CLS] and [SEP] included.
    chunk_size: blocks scored at once by exact search.
  """

  def __init__(self, retriever_config, search="exact", *, scann_config=None,
               scann_index_dir=None, devices=None, max_query_length=0,
               chunk_size=DEFAULT_CHUNK_SIZE):
    if search not in SEARCH_KINDS:
      raise utils.UserError(f"search={search!r}: expected one of "
                            f"{', '.join(SEARCH_KINDS)}")
    if search == "scann" and scann_config is None:
      raise utils.UserError("search=scann needs a ScaNN config "
                            "(--scann_config_path)")
    if retriever_config.get(INDEX_ROOT_KEY):
      if scann_index_dir:
        raise utils.UserError(
            f"--scann_index_dir={scann_index_dir}: the index root "
            f"{retriever_config[INDEX_ROOT_KEY]} keeps the ScaNN index of "
            "each version itself, expected no --scann_index_dir")
      scann_index_dir = retriever_config["scann_index_dir"]
    self.num_blocks = retriever_config["num_block_records"]
    self.embedder = query_embedder.QueryEmbedder(
        retriever_config["query_embedder_path"], max_query_length)
    self.blocks = block_store.BlockStore(
        retriever_config["text_records"], self.num_blocks,
        retriever_config.get("title_records"))
    if search == "scann" and scann_index_dir and tf.io.gfile.exists(
        os.path.join(scann_index_dir, _SCANN_CONFIG_NAME)):
      self._searcher = ScannSearcher.load(scann_index_dir, scann_config)
      return
    block_emb = load_block_embeddings(
        retriever_config["query_embedder_path"], self.num_blocks)
    query_dim = self.embedder.embed([""]).shape[1]
    if query_dim != block_emb.shape[1]:
      raise utils.UserError(
          f"{retriever_config['query_embedder_path']}: query embeddings have "
          f"{query_dim} dimensions, block embeddings {block_emb.shape[1]}")
    if search == "exact":
      self._searcher = ExactSearcher(block_emb, devices, chunk_size)
      return
    self._searcher = ScannSearcher.build(block_emb, scann_config)
    if scann_index_dir:
      self._searcher.save(scann_index_dir)

  def search(self, query_embeddings, k):
    """(scores float32 [Q, k], block_ids int64 [Q, k]) for query embeddings."""
    if k > self.num_blocks:
      raise utils.UserError(f"{k} neighbours asked for, but there are "
                            f"{self.num_blocks} blocks")
    return self._searcher.search(query_embeddings, k)
