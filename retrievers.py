"""REALM retrieval: query embedder, block store, exact and ScaNN search, context sampling.

Knows nothing about GPT-2: it maps question text to block ids, scores and text,
and chooses which cached neighbours an example sees.
"""

import array
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import os
import struct
import tempfile

import numpy as np
from scann.scann_ops.py import scann_ops_pybind
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text as tf_text
import tqdm

import utils


# ---------------------------------------------------------------------------
# Sampling contexts from cached neighbours
# ---------------------------------------------------------------------------


def example_seed(run_seed, epoch, example_id):
  """A stateless-RNG seed from (run seed, epoch, KILT id).

  The same example in the same epoch of the same run always draws the same
  contexts, so a resumed run sees what an uninterrupted one would.
  """
  id_hash = tf.strings.to_hash_bucket_fast(example_id, 2**31 - 1)
  seed = tf.stack([tf.cast(run_seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(seed, id_hash)


def sample_neighbours(neighbour_scores, num_samples, temperature, seed,
                      bank_size=None):
  """Indices of `num_samples` neighbours drawn without replacement.

  Gumbel-top-k: adding independent Gumbel noise to `scores / temperature` and
  keeping the k largest is an exact draw, without replacement, from the
  softmax over `scores / temperature` (the Plackett-Luce model).
  `temperature == 0` keeps the top k by score. Only the first `bank_size`
  neighbours (the best by score) are eligible when it is given.

  Args:
    neighbour_scores: float [N], one question's neighbour scores.
    num_samples: k; at most N (or bank_size).
    temperature: float scalar >= 0.
    seed: int [2], e.g. from `example_seed`.
    bank_size: optional int, restricts the draw to the first bank_size.

  Returns:
    int32 [k], indices into `neighbour_scores`, in the order drawn.
  """
  scores = tf.convert_to_tensor(neighbour_scores, tf.float32)
  if bank_size is not None:
    scores = scores[:bank_size]
  temperature = tf.convert_to_tensor(temperature, tf.float32)
  uniform = tf.random.stateless_uniform(
      tf.shape(scores), seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
  gumbel = -tf.math.log(-tf.math.log(uniform))
  keys = tf.cond(temperature > 0.0,
                 lambda: scores / temperature + gumbel,
                 lambda: scores)
  return tf.math.top_k(keys, k=num_samples, sorted=True).indices


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


def load_retriever_config(path):
  """Reads a retriever config: `query_embedder_path`, `text_records`, `num_block_records`.

  Optional: `title_records` (titles.tfr, record i the page title of block i;
  None when absent). Relative paths in the file are taken relative to the
  file's directory.
  """
  config = utils.read_json(path, "retriever config")
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
  return {
      "query_embedder_path": _resolve_beside(config["query_embedder_path"],
                                             path),
      "text_records": _resolve_beside(config["text_records"], path),
      "title_records": (None if title_records is None else
                        _resolve_beside(title_records, path)),
      "num_block_records": config["num_block_records"],
  }


_BLOCK_EMB_NAMES = ("block_emb", "block_emb/.ATTRIBUTES/VARIABLE_VALUE")


def load_block_embeddings(embedder_path, num_blocks):
  """The block embeddings of a REALM embedder, float32 [num_blocks, D].

  They live in `<embedder_path>/encoded/encoded.ckpt`, as variable `block_emb`
  (TF1 checkpoints) or `block_emb/.ATTRIBUTES/VARIABLE_VALUE` (TF2 ones).
  """
  checkpoint_path = os.path.join(embedder_path, "encoded", "encoded.ckpt")
  try:
    reader = tf.train.load_checkpoint(checkpoint_path)
  except (tf.errors.OpError, ValueError):
    raise utils.UserError(
        f"{checkpoint_path}: no readable checkpoint (expected the REALM block "
        "embeddings beside the embedder, in encoded/encoded.ckpt)") from None
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


def merge_top_k(scores, block_ids, k):
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
    return merge_top_k(np.concatenate([scores for scores, _ in partial], 1),
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
    builder = scann_ops_pybind.builder(
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
    block_ids, scores = self._searcher.search_batched_parallel(
        np.asarray(queries, dtype=np.float32), final_num_neighbors=k,
        leaves_to_search=leaves_to_search)
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
      return cls(scann_ops_pybind.load_searcher(directory), saved_config)
    with tempfile.TemporaryDirectory() as local_dir:
      for name in tf.io.gfile.listdir(directory):
        tf.io.gfile.copy(os.path.join(directory, name),
                         os.path.join(local_dir, name))
      return cls(scann_ops_pybind.load_searcher(local_dir), saved_config)


# ---------------------------------------------------------------------------
# REALM query embedder
# ---------------------------------------------------------------------------

# What a TF-Hub export writes for an asset's path inside the graph; TF1's
# hub.Module rewrites it to the module's assets/ at load, TF2's hub.load does
# not (tensorflow_hub's saved_model_lib).
HUB_ASSET_PLACEHOLDER = "SAVEDMODEL-ASSET"
_VOCAB_ASSET_NAME = "vocab.txt"
_REQUIRED_WORDPIECES = ("[CLS]", "[SEP]", "[UNK]")
# Where BERT keeps its position embeddings [max positions, hidden] in a TF1
# checkpoint (REALM's embedder: module/bert/embeddings/position_embeddings).
_POSITION_EMBEDDINGS_SUFFIX = "bert/embeddings/position_embeddings"


class Wordpieces:
  """BERT wordpieces exactly as ORQA makes them for REALM.

  `tensorflow_text.BertTokenizer` over the vocabulary file (ORQA's
  `bert_utils.get_tf_tokenizer`): with `do_lower_case`, case folding also
  NFKC-normalises and strips accents (`ﬁ` -> `fi`, full-width letters,
  `ß` -> `ss`); a word longer than 100 bytes is [UNK].
  """

  def __init__(self, vocab_file, do_lower_case):
    with tf.io.gfile.GFile(vocab_file, "r") as f:
      # The lookup table's keys are whole lines (TextFileIndex.WHOLE_LINE).
      vocab = {}
      for index, line in enumerate(f):
        vocab.setdefault(line.rstrip("\r\n"), index)
    missing = [token for token in _REQUIRED_WORDPIECES if token not in vocab]
    if missing:
      raise utils.UserError(f"{vocab_file}: no {', '.join(missing)} in the "
                            "wordpiece vocabulary, expected BERT's vocab.txt")
    self.vocab_file = vocab_file
    self.cls_id = vocab["[CLS]"]
    self.sep_id = vocab["[SEP]"]
    self._tokenizer = tf_text.BertTokenizer(
        vocab_file, lower_case=do_lower_case, token_out_type=tf.int64)

  def ids(self, texts):
    """The wordpiece ids of each text (a list of int lists), words merged."""
    texts = list(texts)
    if not texts:
      return []
    pieces = self._tokenizer.tokenize(tf.constant(texts, tf.string))
    return pieces.merge_dims(-2, -1).to_list()

  def query_ids(self, questions, max_length=None):
    """`[CLS] q [SEP]` ids of each question, cut to `max_length` ids if given."""
    keep = None if max_length is None else max_length - 2
    return [[self.cls_id] + ids[:keep] + [self.sep_id]
            for ids in self.ids(questions)]


def pad_features(sequences, segment_ids=None):
  """BERT inputs of id sequences: int32 [B, longest] `input_ids`, `input_mask`, `segment_ids`.

  Padding is id 0 with mask 0, as REALM pads; `segment_ids` (lists as long as
  the sequences) default to zeros.
  """
  length = max((len(ids) for ids in sequences), default=0)
  features = {name: np.zeros([len(sequences), length], np.int32)
              for name in ("input_ids", "input_mask", "segment_ids")}
  for row, ids in enumerate(sequences):
    features["input_ids"][row, :len(ids)] = ids
    features["input_mask"][row, :len(ids)] = 1
    if segment_ids is not None:
      features["segment_ids"][row, :len(ids)] = segment_ids[row]
  return features


def _vocabulary_file(embedder_path, vocab_file):
  """The embedder's vocabulary: `vocab_file` if it is a file, else the module's asset.

  A TF2 SavedModel's `tokenization_info()` names the file itself. A TF1 Hub
  module (REALM's export) names the placeholder `SAVEDMODEL-ASSET`, and the
  file is where TF1's hub.Module points it: `assets/vocab.txt`, or the one
  file in `assets/`.
  """
  if vocab_file != HUB_ASSET_PLACEHOLDER and tf.io.gfile.exists(vocab_file):
    return vocab_file
  assets_dir = os.path.join(embedder_path, "assets")
  names = []
  if tf.io.gfile.isdir(assets_dir):
    names = sorted(name for name in tf.io.gfile.listdir(assets_dir)
                   if not tf.io.gfile.isdir(os.path.join(assets_dir, name)))
  if _VOCAB_ASSET_NAME in names:
    return os.path.join(assets_dir, _VOCAB_ASSET_NAME)
  if len(names) == 1:
    return os.path.join(assets_dir, names[0])
  found = ", ".join(names) if names else "no file"
  raise utils.UserError(
      f"{embedder_path}: tokenization_info's vocab_file is {vocab_file!r} and "
      f"assets/ holds {found}, expected the wordpiece vocabulary in "
      f"assets/{_VOCAB_ASSET_NAME}")


def position_limit(embedder_path):
  """Positions the embedder's BERT embeds (rows of its position embeddings), or None.

  Read from the module's variables checkpoint; None when it has no BERT
  position-embedding variable (e.g. TF2 object-based names).
  """
  try:
    variables = tf.train.list_variables(
        os.path.join(embedder_path, "variables", "variables"))
  except (tf.errors.OpError, ValueError):
    return None
  for name, shape in variables:
    if name.endswith(_POSITION_EMBEDDINGS_SUFFIX) and len(shape) == 2:
      return int(shape[0])
  return None


def check_max_query_length(max_query_length, name="max_query_length"):
  """A UserError unless `max_query_length` is 0 (no cut) or leaves room for [CLS] q [SEP]."""
  if max_query_length != 0 and max_query_length < 2:
    raise utils.UserError(
        f"{name}={max_query_length}: expected 0 (no cut) or at least 2 (room "
        "for [CLS] and [SEP])")


class QueryEmbedder:
  """Question text -> REALM query embedding, through the embedder's signatures.

  The embedder is REALM's TF1 Hub module as exported (`tfhub_module.pb`,
  `saved_model.pb`, `variables/`, `assets/vocab.txt`) or a TF2 SavedModel,
  local or gs://, with signatures
  `projected(input_ids, input_mask, segment_ids) -> {"default": [B, D]}` and
  `tokenization_info() -> {"vocab_file", "do_lower_case"}`. Questions are laid
  out as ORQA's `retrieve()` does: `Wordpieces`, `[CLS] q [SEP]`, not cut
  (but at the embedder's position limit, or `max_query_length` when given),
  mask of ones, segment ids of zeros. A batch is padded to its longest
  question with mask 0.

  Args:
    embedder_path: the module's directory.
    max_query_length: 0 (ORQA: no cut) or the ids kept per question,
      [CLS] and [SEP] included (>= 2).
  """

  def __init__(self, embedder_path, max_query_length=0):
    check_max_query_length(max_query_length)
    if not tf.io.gfile.exists(embedder_path):
      raise utils.UserError(f"{embedder_path}: embedder does not exist")
    try:
      module = hub.load(embedder_path)
    except (OSError, ValueError, tf.errors.OpError) as error:
      reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
      raise utils.UserError(
          f"{embedder_path}: not a loadable TF-Hub module or SavedModel "
          f"({reason[:200]})") from None
    signatures = getattr(module, "signatures", {})
    for name in ("projected", "tokenization_info"):
      if name not in signatures:
        raise utils.UserError(
            f"{embedder_path}: no {name!r} signature (it has "
            f"{', '.join(sorted(signatures)) or 'none'}); expected a REALM "
            "embedder with projected(input_ids, input_mask, segment_ids) and "
            "tokenization_info()")
    self._module = module  # Keeps the signatures' variables alive.
    self._projected = signatures["projected"]
    self._input_dtypes = {
        name: spec.dtype
        for name, spec in self._projected.structured_input_signature[1].items()}
    if set(self._input_dtypes) != {"input_ids", "input_mask", "segment_ids"}:
      raise utils.UserError(
          f"{embedder_path}: 'projected' takes "
          f"{', '.join(sorted(self._input_dtypes))}, expected input_ids, "
          "input_mask, segment_ids")
    info = signatures["tokenization_info"]()
    self.wordpieces = Wordpieces(
        _vocabulary_file(embedder_path,
                         info["vocab_file"].numpy().decode("utf-8")),
        bool(info["do_lower_case"].numpy()))
    self.embedder_path = embedder_path
    limits = [limit for limit in (max_query_length,
                                  position_limit(embedder_path)) if limit]
    # Ids kept per question ([CLS] and [SEP] included); None: all.
    self.max_query_length = min(limits) if limits else None

  def token_ids(self, questions):
    """(input_ids, input_mask) int32 [Q, longest] of `[CLS] q [SEP]`, zero-padded."""
    features = pad_features(
        self.wordpieces.query_ids(questions, self.max_query_length))
    return features["input_ids"], features["input_mask"]

  def embed(self, questions, batch_size=128):
    """float32 [Q, D] query embeddings of `questions` (a list of str)."""
    embeddings = []
    for start in range(0, len(questions), batch_size):
      input_ids, input_mask = self.token_ids(questions[start:start + batch_size])
      outputs = self._projected(
          input_ids=tf.cast(input_ids, self._input_dtypes["input_ids"]),
          input_mask=tf.cast(input_mask, self._input_dtypes["input_mask"]),
          segment_ids=tf.zeros(input_ids.shape,
                               self._input_dtypes["segment_ids"]))
      if "default" not in outputs:
        raise utils.UserError(
            f"{self.embedder_path}: 'projected' returns "
            f"{', '.join(sorted(outputs))}, expected 'default'")
      embeddings.append(outputs["default"].numpy().astype(np.float32))
    if not embeddings:
      return np.zeros([0, 0], np.float32)
    return np.concatenate(embeddings)


# ---------------------------------------------------------------------------
# Block text and titles, by record offset
# ---------------------------------------------------------------------------

# A TFRecord is: uint64 length, uint32 masked CRC of the length, the data,
# uint32 masked CRC of the data.
_RECORD_HEADER_BYTES = 12
_RECORD_FOOTER_BYTES = 4
_SCAN_READ_BYTES = 16 << 20


def _scan_record_offsets(path):
  """int64 [R + 1]: byte offset of each record of a TFRecord file, then its length."""
  file_length = tf.io.gfile.stat(path).length
  offsets = array.array("q")
  position = 0
  buffer, buffer_start = b"", 0
  with tf.io.gfile.GFile(path, "rb") as f, tqdm.tqdm(
      total=file_length, unit="B", unit_scale=True,
      desc=f"indexing {os.path.basename(path)}") as progress:
    while position < file_length:
      if position + _RECORD_HEADER_BYTES > buffer_start + len(buffer):
        f.seek(position)
        buffer, buffer_start = f.read(_SCAN_READ_BYTES), position
        progress.update(position - progress.n)
        if len(buffer) < _RECORD_HEADER_BYTES:
          break
      (length,) = struct.unpack_from("<Q", buffer, position - buffer_start)
      offsets.append(position)
      position += _RECORD_HEADER_BYTES + length + _RECORD_FOOTER_BYTES
    progress.update(file_length - progress.n)
  if position != file_length:
    raise utils.UserError(
        f"{path}: truncated TFRecord file (record {len(offsets)} runs past "
        f"the end at byte {file_length})")
  offsets.append(file_length)
  return np.frombuffer(offsets, dtype=np.int64).copy()


def _local_offsets_path(records_path):
  cache_home = os.environ.get("XDG_CACHE_HOME",
                              os.path.join(os.path.expanduser("~"), ".cache"))
  digest = hashlib.sha1(records_path.encode("utf-8")).hexdigest()[:16]
  return os.path.join(cache_home, "eli5_retrieval", "block_offsets",
                      f"{digest}-{os.path.basename(records_path)}.offsets.npy")


def _read_offsets(path, file_length, num_records):
  """Saved offsets at `path` if they describe the current file, else None."""
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      offsets = np.load(io.BytesIO(f.read()))
  except (tf.errors.OpError, OSError, ValueError):
    return None  # Unreadable or not an offsets file: index again.
  if offsets.shape != (num_records + 1,) or offsets[-1] != file_length:
    return None
  return offsets


def _write_offsets(path, offsets):
  buffer = io.BytesIO()
  np.save(buffer, offsets)
  utils.makedirs(os.path.dirname(path))
  tmp = utils.temporary_path(path)
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)


class _RecordFile:
  """Random access to the records of a TFRecord file of raw UTF-8 records.

  Record offsets are found in one pass over the file and saved beside it
  (`<path>.offsets.npy`), or, when that directory is not writable (e.g. a
  public bucket), under `~/.cache/eli5_retrieval/block_offsets/`; later runs
  read them back. Records are then read with seeks, so only those asked for
  are ever in memory.

  Args:
    path: the TFRecord file.
    num_records: how many records it must hold.
    record_name: what a record is, for errors ("block", "title").
    count_error: fn(records found) -> the UserError message when the count
      differs from `num_records`.
  """

  def __init__(self, path, num_records, record_name, count_error):
    if not tf.io.gfile.exists(path):
      raise utils.UserError(f"{path}: {record_name}s file does not exist")
    self.path = path
    self._record_name = record_name
    file_length = tf.io.gfile.stat(path).length
    candidates = (f"{path}.offsets.npy", _local_offsets_path(path))
    offsets = None
    for offsets_path in candidates:
      offsets = _read_offsets(offsets_path, file_length, num_records)
      if offsets is not None:
        break
    if offsets is None:
      offsets = _scan_record_offsets(path)
      if len(offsets) - 1 != num_records:
        raise utils.UserError(count_error(len(offsets) - 1))
      self._save_offsets(candidates, offsets)
    self._offsets = offsets
    self._file = tf.io.gfile.GFile(path, "rb")

  @staticmethod
  def _save_offsets(candidates, offsets):
    for path in candidates:
      try:
        _write_offsets(path, offsets)
        return
      except (tf.errors.OpError, OSError):
        continue

  def read(self, index):
    """Record `index` as text."""
    start = int(self._offsets[index])
    length = (int(self._offsets[index + 1]) - start - _RECORD_HEADER_BYTES -
              _RECORD_FOOTER_BYTES)
    self._file.seek(start + _RECORD_HEADER_BYTES)
    data = self._file.read(length)
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError as error:
      raise utils.UserError(
          f"{self.path}: {self._record_name} {index} is not UTF-8 text "
          f"({error.reason} at byte {error.start})") from None

  def read_many(self, indices):
    """Records of `indices` (ints, repeats allowed), read in file order."""
    by_index = {index: self.read(index) for index in sorted(set(indices))}
    return [by_index[index] for index in indices]


class BlockStore:
  """Random access to the text and title of any block of a REALM corpus.

  As ORQA's preprocessing writes it: record i of `blocks.tfr` is the text of
  block i (raw UTF-8), record i of the optional `titles.tfr` the title of its
  Wikipedia page. Both are read by record offset (`_RecordFile`).
  """

  def __init__(self, blocks_path, num_blocks, titles_path=None):
    self.blocks_path = blocks_path
    self.titles_path = titles_path
    self.num_blocks = num_blocks
    self._texts = _RecordFile(
        blocks_path, num_blocks, "block", lambda found: (
            f"{blocks_path}: holds {found} records, but the retriever config "
            f"claims num_block_records={num_blocks}"))
    self._titles = None
    if titles_path is not None:
      self._titles = _RecordFile(
          titles_path, num_blocks, "title", lambda found: (
              f"{titles_path}: holds {found} titles, but {blocks_path} holds "
              f"{num_blocks} blocks, expected one title per block"))

  def _checked_ids(self, block_ids):
    block_ids = [int(block_id) for block_id in block_ids]
    for block_id in block_ids:
      if not 0 <= block_id < self.num_blocks:
        raise IndexError(f"block id {block_id} not in [0, {self.num_blocks})")
    return block_ids

  def text(self, block_id):
    """The text of `block_id` (its blocks.tfr record)."""
    return self.texts([block_id])[0]

  def texts(self, block_ids):
    """Texts of `block_ids` (any iterable of ints), read in file order."""
    return self._texts.read_many(self._checked_ids(block_ids))

  def title(self, block_id):
    """The page title of `block_id` (its titles.tfr record); None without titles."""
    return self.titles([block_id])[0]

  def titles(self, block_ids):
    """Titles of `block_ids`, as `texts`; Nones without a titles file."""
    block_ids = self._checked_ids(block_ids)
    if self._titles is None:
      return [None] * len(block_ids)
    return self._titles.read_many(block_ids)


# ---------------------------------------------------------------------------
# Live retrieval: question text -> block ids, scores, text
# ---------------------------------------------------------------------------

SEARCH_KINDS = ("exact", "scann")


@dataclasses.dataclass(frozen=True)
class Retrieval:
  block_ids: np.ndarray  # int64 [Q, k], best first
  scores: np.ndarray  # float32 [Q, k], descending
  texts: list  # [Q][k] str


class LiveRetriever:
  """REALM retrieval end to end: embed questions, search the blocks, read their text.

  Args:
    retriever_config: a dict from `load_retriever_config`.
    search: "exact" (brute force over every block) or "scann".
    scann_config: a dict from `load_scann_config` (search="scann").
    scann_index_dir: optional; a saved index is loaded from here, or the
      index built is saved here.
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
    self.config = retriever_config
    self.search_kind = search
    self.num_blocks = retriever_config["num_block_records"]
    self.embedder = QueryEmbedder(retriever_config["query_embedder_path"],
                                  max_query_length)
    self.blocks = BlockStore(retriever_config["text_records"], self.num_blocks,
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

  def retrieve(self, questions, k):
    """The k best blocks of each question: a `Retrieval`."""
    scores, block_ids = self.search(self.embedder.embed(list(questions)), k)
    flat_texts = self.blocks.texts(block_ids.reshape(-1))
    texts = [flat_texts[row * k:(row + 1) * k] for row in range(len(questions))]
    return Retrieval(block_ids=block_ids, scores=scores, texts=texts)
