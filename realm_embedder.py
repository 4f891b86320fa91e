"""REALM's embedder as a trainable TF2 model: built from a module's variables, exported back.

A TF1 Hub module loaded in TF2 (`hub.load`) runs but cannot be fine-tuned, so
`load` reads the module's variables from its checkpoint and recognises the
architecture by their names; `RealmEmbedder` computes what the module's
`projected` signature computes, from those variables, as trainable
`tf.Variable`s. Architectures:

- `orqa_bert`: ORQA's `ict_model` around Google's BERT (REALM's public
  embedder), its variables named as in Google's TF1 BERT checkpoints inside
  the module: `module/bert/embeddings/{word,position,token_type}_embeddings`
  and `LayerNorm/{gamma,beta}`; per layer i,
  `module/bert/encoder/layer_{i}/attention/self/{query,key,value}/*`,
  `attention/output/dense/*`, `attention/output/LayerNorm/*`,
  `intermediate/dense/*`, `output/dense/*`, `output/LayerNorm/*`; BERT's
  pooler `module/bert/pooler/dense/*` (tanh of `[CLS]`'s row); then
  `ict_model`'s projection `dense/*` and layer normalisation
  `layer_normalization/*` (epsilon 1e-3). The layers are counted from the
  variable names; the heads are hidden / 64 (BERT's convention, not stored in
  the checkpoint: every released BERT, Tiny 128/2 to Large 1024/16, has heads
  of 64); BERT's layer norms have epsilon 1e-12; GELU is exact (erf, as
  transformers' `gelu` and the first release of Google's `modeling.py`; its
  later tanh approximation differs by 4e-4 on the test's 2-layer BERT); keys
  where `input_mask` is 0 get -10000 added to their scores. Tested against
  transformers' `TFBertModel` under Google's variable names.
- `orqa_standin_bert`: the same head around the fixture's stand-in BERT
  (`../shared/fixtures/realm_tf1_hub/`): `module/bert/embeddings/*` (word,
  token type, position), one self-attention `module/bert/encoder/w` [H, H]
  (scores `x W x^T / sqrt(H)`, keys masked by -10000), tanh, BERT's pooler,
  as the module's graph computes it.
- `bag_of_wordpieces`: the demo world's toy embedder
  (`util_scripts/demo_world.py`): `module/token_weights` [V] and
  `module/projection` [V, D]; the weighted sum of the wordpieces' rows,
  L2-normalised, times `EMBEDDING_NORM`.

Dropout, as ORQA's `ict_model` in training: on the projected embedding, rate
`dropout_rate`. Its noise is a hash of (the example's seed, the element's
index) (`example_uniform`), not of a random state: an example's mask depends
on its seed alone, so the gradient cache's re-forward of a chunk, or the same
examples in another chunking or on another replica, see the same mask.
BERT's own dropout (on its embeddings, attention probabilities and layer
outputs, 0.1 where ORQA trains the module with its "train" tags) is off:
`orqa_bert` computes the inference graph in training too.

`export` writes the embedder in the format `query_embedder.QueryEmbedder`
(and so the cacher, live retrieval and the index refresher) loads: a TF2
SavedModel with `projected(input_ids, input_mask, segment_ids) -> {"default":
[B, D]}` and `tokenization_info() -> {"vocab_file", "do_lower_case"}`, the
vocabulary in `assets/vocab.txt`. `load` reads such an export back (its
`architecture` and `weights`).
"""

import functools
import math
import os
import re

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import query_embedder
import utils

# ORQA's ict_model: dropout on the projected embedding in training.
ORQA_DROPOUT_RATE = 0.1
# demo_world.EMBEDDING_NORM: the toy embedder's output norm.
EMBEDDING_NORM = 4.0
_LAYER_NORM_EPSILON = 1e-3  # Keras LayerNormalization's default, ict_model's.
_BERT_LAYER_NORM_EPSILON = 1e-12  # Google BERT's.
_BERT_HEAD_SIZE = 64  # Google BERT's: heads = hidden / 64.
_ATTENTION_MASK_PENALTY = -10000.0  # BERT's.
_VOCAB_ASSET_NAME = "vocab.txt"

# ict_model's head: BERT's pooler, the projection and its layer norm.
_ICT_HEAD = (
    "module/bert/pooler/dense/kernel", "module/bert/pooler/dense/bias",
    "dense/kernel", "dense/bias",
    "layer_normalization/gamma", "layer_normalization/beta")
_STANDIN_BERT = (
    "module/bert/embeddings/word_embeddings",
    "module/bert/embeddings/token_type_embeddings",
    "module/bert/embeddings/position_embeddings",
    "module/bert/encoder/w") + _ICT_HEAD
_BERT_EMBEDDINGS = tuple("module/bert/embeddings/" + name for name in (
    "word_embeddings", "token_type_embeddings", "position_embeddings",
    "LayerNorm/gamma", "LayerNorm/beta"))
# A BERT layer's variables, under module/bert/encoder/layer_{i}/.
_BERT_LAYER = tuple(
    f"{scope}/{kind}"
    for scope in ("attention/self/query", "attention/self/key",
                  "attention/self/value", "attention/output/dense",
                  "intermediate/dense", "output/dense")
    for kind in ("kernel", "bias")) + tuple(
        f"{scope}/LayerNorm/{kind}" for scope in ("attention/output", "output")
        for kind in ("gamma", "beta"))
_BERT_LAYER_SCOPE = re.compile(r"module/bert/encoder/layer_(\d+)/")
_BAG_OF_WORDPIECES = ("module/token_weights", "module/projection")
# orqa_bert_tanh_gelu: the same BERT whose GELU is the tanh approximation
# (google-research/bert's modeling.py after its first release; the module's
# graph says which, `_gelu_of_module`).
ARCHITECTURES = ("orqa_bert", "orqa_bert_tanh_gelu", "orqa_standin_bert",
                 "bag_of_wordpieces")
_BERT_ARCHITECTURES = ("orqa_bert", "orqa_bert_tanh_gelu")


def _bert_num_layers(names):
  """How many BERT layers `names` hold: 1 + the largest i of layer_{i}, or 0."""
  layers = [int(match.group(1))
            for match in map(_BERT_LAYER_SCOPE.match, names) if match]
  return max(layers) + 1 if layers else 0


def variables_of(architecture, names):
  """The variables `architecture` reads from a module with variables `names`.

  Fixed but for `orqa_bert`, whose layers are those `names` have.
  """
  if architecture in _BERT_ARCHITECTURES:
    return _BERT_EMBEDDINGS + tuple(
        f"module/bert/encoder/layer_{layer}/{name}"
        for layer in range(_bert_num_layers(names))
        for name in _BERT_LAYER) + _ICT_HEAD
  return {"orqa_standin_bert": _STANDIN_BERT,
          "bag_of_wordpieces": _BAG_OF_WORDPIECES}[architecture]


# ---------------------------------------------------------------------------
# Stateless dropout
# ---------------------------------------------------------------------------


def _hash32(x):
  """A bijective mixing of uint32 values (Wellons' lowbias32)."""
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
  x *= tf.constant(0x7feb352d, tf.uint32)
  x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
  x *= tf.constant(0x846ca68b, tf.uint32)
  return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def example_uniform(example_seeds, width):
  """float32 [B, width] in [0, 1): element (b, j) a hash of (example_seeds[b], j).

  Counter-based, so the values of an example do not depend on which other
  examples share its call.
  """
  seeds = _hash32(tf.bitcast(tf.cast(example_seeds, tf.int32), tf.uint32))
  counters = tf.cast(tf.range(width), tf.uint32) * tf.constant(0x9E3779B9,
                                                               tf.uint32)
  bits = _hash32(seeds[:, tf.newaxis] + counters[tf.newaxis, :])
  return tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * 2.0 ** -24


def example_dropout(values, example_seeds, rate):
  """Inverted dropout of [B, D] `values`, each row's mask from its seed."""
  keep = example_uniform(example_seeds, tf.shape(values)[1]) >= rate
  return tf.where(keep, values / (1.0 - rate), tf.zeros_like(values))


# ---------------------------------------------------------------------------
# The architectures' forward passes
# ---------------------------------------------------------------------------


def _layer_norm(x, gamma, beta, epsilon=_LAYER_NORM_EPSILON):
  mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
  return (x - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta


def _dense(x, w, scope):
  return tf.matmul(x, w[scope + "/kernel"]) + w[scope + "/bias"]


def _ict_head(pooled, w):
  """ict_model's projection of BERT's pooled output, layer-normalised."""
  return _layer_norm(_dense(pooled, w, "dense"), w["layer_normalization/gamma"],
                     w["layer_normalization/beta"])


def _standin_bert(w, input_ids, input_mask, segment_ids):
  """What the fixture module's `projected` computes (its graph, op by op)."""
  length = tf.shape(input_ids)[1]
  x = (tf.gather(w["module/bert/embeddings/word_embeddings"], input_ids) +
       tf.gather(w["module/bert/embeddings/token_type_embeddings"],
                 segment_ids) +
       w["module/bert/embeddings/position_embeddings"][tf.newaxis, :length])
  encoder = w["module/bert/encoder/w"]
  scores = tf.einsum("bih,hk,bjk->bij", x, encoder, x) / tf.sqrt(
      tf.cast(tf.shape(encoder)[0], tf.float32))
  key_mask = tf.cast(input_mask, tf.float32)[:, tf.newaxis, :]
  attention = tf.nn.softmax(scores + (1.0 - key_mask) * _ATTENTION_MASK_PENALTY)
  hidden = tf.tanh(tf.einsum("bij,bjh->bih", attention, x))
  return _ict_head(tf.tanh(_dense(hidden[:, 0], w, "module/bert/pooler/dense")),
                   w)


def _bert_layer_norm(x, w, scope):
  return _layer_norm(x, w[scope + "/LayerNorm/gamma"],
                     w[scope + "/LayerNorm/beta"], _BERT_LAYER_NORM_EPSILON)


def _gelu(x):
  """GELU, exact: x times the standard normal CDF of x."""
  return 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0)))


def _tanh_gelu(x):
  """GELU's tanh approximation, as later versions of Google's modeling.py."""
  return 0.5 * x * (1.0 + tf.tanh(
      math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def _bert_self_attention(x, w, scope, key_penalty):
  """BERT's multi-head self-attention of x [B, L, H], heads of 64 -> [B, L, H].

  `key_penalty` [B, L]: 0 for a key attended to, -10000 for a padding one.
  """
  batch, length, hidden = tf.unstack(tf.shape(x))

  def heads(name):  # [B, L, heads, 64]
    return tf.reshape(_dense(x, w, f"{scope}/attention/self/{name}"),
                      [batch, length, -1, _BERT_HEAD_SIZE])

  scores = tf.einsum("bind,bjnd->bnij", heads("query"), heads("key")) / (
      math.sqrt(_BERT_HEAD_SIZE))
  attention = tf.nn.softmax(scores + key_penalty[:, tf.newaxis, tf.newaxis, :])
  context = tf.einsum("bnij,bjnd->bind", attention, heads("value"))
  return tf.reshape(context, [batch, length, hidden])


def _orqa_bert(w, input_ids, input_mask, segment_ids, gelu=_gelu):
  """ict_model around Google BERT's `modeling.BertModel`, its dropout off."""
  length = tf.shape(input_ids)[1]
  x = _bert_layer_norm(
      tf.gather(w["module/bert/embeddings/word_embeddings"], input_ids) +
      tf.gather(w["module/bert/embeddings/token_type_embeddings"],
                segment_ids) +
      w["module/bert/embeddings/position_embeddings"][tf.newaxis, :length],
      w, "module/bert/embeddings")
  key_penalty = _ATTENTION_MASK_PENALTY * (
      1.0 - tf.cast(input_mask, tf.float32))
  for layer in range(_bert_num_layers(w)):
    scope = f"module/bert/encoder/layer_{layer}"
    attended = _bert_layer_norm(
        x + _dense(_bert_self_attention(x, w, scope, key_penalty), w,
                   scope + "/attention/output/dense"),
        w, scope + "/attention/output")
    x = _bert_layer_norm(
        attended + _dense(gelu(_dense(attended, w,
                                       scope + "/intermediate/dense")),
                          w, scope + "/output/dense"),
        w, scope + "/output")
  return _ict_head(tf.tanh(_dense(x[:, 0], w, "module/bert/pooler/dense")), w)


def _bag_of_wordpieces(w, input_ids, input_mask, segment_ids):
  """demo_world's `_projected`: the module has no segments."""
  del segment_ids
  weights = (tf.gather(w["module/token_weights"], input_ids) *
             tf.cast(input_mask, tf.float32))
  vectors = tf.gather(w["module/projection"], input_ids)
  summed = tf.reduce_sum(weights[:, :, tf.newaxis] * vectors, axis=1)
  return EMBEDDING_NORM * tf.math.l2_normalize(summed, axis=-1)


_FORWARD = {"orqa_bert": _orqa_bert,
            "orqa_bert_tanh_gelu": functools.partial(_orqa_bert,
                                                     gelu=_tanh_gelu),
            "orqa_standin_bert": _standin_bert,
            "bag_of_wordpieces": _bag_of_wordpieces}


class RealmEmbedder(tf.Module):
  """A REALM embedder whose weights train: features -> embeddings [B, D].

  Attributes:
    architecture: one of ARCHITECTURES.
    weights: {the TF1 module's variable name: tf.Variable}.
    vocab_file, do_lower_case: its wordpieces (`query_embedder.Wordpieces`).
    dropout_rate: dropout on the embedding when called with seeds.
  """

  def __init__(self, architecture, values, vocab_file, do_lower_case,
               dropout_rate=ORQA_DROPOUT_RATE, name=None):
    super().__init__(name=name)
    self.architecture = architecture
    self.weights = {key: tf.Variable(value, name=key.replace("/", "_"))
                    for key, value in sorted(values.items())}
    self.vocab_file = vocab_file
    self.do_lower_case = do_lower_case
    self.dropout_rate = dropout_rate
    self.wordpieces = query_embedder.Wordpieces(vocab_file, do_lower_case)

  @property
  def embedding_size(self):
    output = ("module/projection" if self.architecture == "bag_of_wordpieces"
              else "dense/kernel")
    return int(self.weights[output].shape[1])

  def __call__(self, input_ids, input_mask, segment_ids, example_seeds=None):
    """float32 [B, D]; with `example_seeds` (int [B]), in training (dropout)."""
    embeddings = _FORWARD[self.architecture](self.weights, input_ids,
                                             input_mask, segment_ids)
    if example_seeds is not None and self.dropout_rate > 0:
      embeddings = example_dropout(embeddings, example_seeds, self.dropout_rate)
    return embeddings


# ---------------------------------------------------------------------------
# Loading and exporting
# ---------------------------------------------------------------------------


def _architecture_of(names, where):
  """The architecture whose variables are `names` (a set); a UserError if none."""
  for architecture in ARCHITECTURES:
    is_bert_without_layers = (architecture in _BERT_ARCHITECTURES and
                              not _bert_num_layers(names))
    if not is_bert_without_layers and set(variables_of(architecture,
                                                       names)) <= names:
      return architecture
  if _bert_num_layers(names):
    missing = [name for name in variables_of("orqa_bert", names)
               if name not in names]
    raise utils.UserError(
        f"{where}: a BERT encoder (module/bert/encoder/layer_{{i}}/...) "
        f"without {', '.join(missing[:3])} ({len(missing)} missing), expected "
        "ORQA's ict_model around Google BERT's variables (orqa_bert)")
  shown = ", ".join(sorted(names)[:6]) or "none"
  raise utils.UserError(
      f"{where}: variables {shown} are not those of an embedder this code "
      f"trains (expected one of {', '.join(ARCHITECTURES)})")


def _check_bert_hidden_size(values, where):
  """BERT's hidden size must be a multiple of its heads' size, 64."""
  shape = values["module/bert/embeddings/word_embeddings"].shape
  if len(shape) != 2 or shape[1] % _BERT_HEAD_SIZE:
    raise utils.UserError(
        f"{where}: module/bert/embeddings/word_embeddings has shape "
        f"{list(shape)}, expected [vocabulary, hidden] with hidden a multiple "
        f"of BERT's head size {_BERT_HEAD_SIZE}")


def _gelu_of_module(path):
  """orqa_bert or orqa_bert_tanh_gelu: the GELU the module's graph computes.

  The exact GELU is the graph's one Erf op kind; the tanh approximation its
  one Pow (x ** 3; the pooler's Tanh does not tell them apart).
  """
  saved_model = saved_model_pb2.SavedModel()
  with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
    saved_model.ParseFromString(f.read())
  ops = {node.op for graph in saved_model.meta_graphs
         for node in graph.graph_def.node}
  if "Erf" in ops:
    return "orqa_bert"
  if "Pow" in ops:
    return "orqa_bert_tanh_gelu"
  raise utils.UserError(
      f"{path}: its graph has neither an Erf nor a Pow op, expected Google "
      "BERT's GELU (exact, or its tanh approximation)")


def _from_tf1_module(path, dropout_rate, name):
  reader = utils.checkpoint_reader(
      os.path.join(path, "variables", "variables"),
      f"{path}: no readable variables/variables checkpoint, expected a "
      "TF1 Hub module's")
  names = set(reader.get_variable_to_shape_map())
  architecture = _architecture_of(names, path)
  values = {key: reader.get_tensor(key)
            for key in variables_of(architecture, names)}
  if architecture in _BERT_ARCHITECTURES:
    _check_bert_hidden_size(values, path)
    architecture = _gelu_of_module(path)
  # The module's vocabulary and case rule, as the query embedder reads them.
  wordpieces = query_embedder.QueryEmbedder(path).wordpieces
  return RealmEmbedder(architecture, values, wordpieces.vocab_file,
                       wordpieces.do_lower_case, dropout_rate, name=name)


def _from_export(path, dropout_rate, name):
  try:
    loaded = tf.saved_model.load(path)
  except (OSError, ValueError, tf.errors.OpError) as error:
    raise utils.UserError(f"{path}: not a loadable SavedModel "
                          f"({utils.error_reason(error)})") from None
  if not hasattr(loaded, "weights") or not hasattr(loaded, "architecture"):
    raise utils.UserError(
        f"{path}: a SavedModel without `architecture` and `weights`, expected "
        "a TF1 Hub module or an embedder exported by train_retriever.py")
  architecture = loaded.architecture.numpy().decode("utf-8")
  names = set(loaded.weights)
  if architecture not in ARCHITECTURES or set(
      variables_of(architecture, names)) != names:
    raise utils.UserError(
        f"{path}: architecture {architecture!r} with variables "
        f"{', '.join(sorted(names))}, expected one of {', '.join(ARCHITECTURES)}")
  info = loaded.tokenization_info()
  return RealmEmbedder(
      architecture, {key: loaded.weights[key].numpy() for key in names},
      info["vocab_file"].numpy().decode("utf-8"),
      bool(info["do_lower_case"].numpy()), dropout_rate, name=name)


def load(path, *, dropout_rate=ORQA_DROPOUT_RATE, name=None):
  """The trainable embedder of a REALM TF1 Hub module or of an `export`."""
  if not tf.io.gfile.exists(path):
    raise utils.UserError(f"{path}: embedder does not exist")
  if tf.io.gfile.exists(os.path.join(path, "tfhub_module.pb")):
    return _from_tf1_module(path, dropout_rate, name)
  return _from_export(path, dropout_rate, name)


class _Export(tf.Module):
  """What `export` saves: the signatures QueryEmbedder calls, and the weights."""

  def __init__(self, embedder, vocab_asset_path):
    super().__init__()
    self.architecture = tf.Variable(embedder.architecture, trainable=False)
    self.weights = {key: tf.Variable(variable)
                    for key, variable in embedder.weights.items()}
    self.vocab = tf.saved_model.Asset(vocab_asset_path)
    self._do_lower_case = embedder.do_lower_case
    self._forward = _FORWARD[embedder.architecture]

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32,
                                              name=name)
                                for name in ("input_ids", "input_mask",
                                             "segment_ids")])
  def projected(self, input_ids, input_mask, segment_ids):
    return {"default": self._forward(self.weights, input_ids, input_mask,
                                     segment_ids)}

  @tf.function(input_signature=[])
  def tokenization_info(self):
    return {"vocab_file": self.vocab.asset_path,
            "do_lower_case": tf.constant(self._do_lower_case)}


def export(embedder, path):
  """Writes `embedder` to `path` (a new directory) as a TF2 SavedModel.

  Written under a temporary name and renamed when complete; an existing
  `path` is replaced.
  """
  staging = utils.temporary_path(path)
  utils.makedirs(staging)
  try:
    vocab_copy = os.path.join(staging, _VOCAB_ASSET_NAME)
    tf.io.gfile.copy(embedder.vocab_file, vocab_copy)
    module = _Export(embedder, vocab_copy)
    saved = os.path.join(staging, "saved")
    tf.saved_model.save(module, saved, signatures={
        "projected": module.projected,
        "tokenization_info": module.tokenization_info})
    if tf.io.gfile.exists(path):
      tf.io.gfile.rmtree(path)
    tf.io.gfile.rename(saved, path)
  finally:
    if tf.io.gfile.exists(staging):
      tf.io.gfile.rmtree(staging)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def query_features(wordpieces, questions, max_length):
  """int32 [Q, max_length] features of `[CLS] q [SEP]`, cut to `max_length`."""
  return query_embedder.pad_features(
      wordpieces.query_ids(questions, max_length), length=max_length)


def block_features(wordpieces, titles_and_texts,
                   max_length=query_embedder.BLOCK_MAX_LENGTH):
  """int32 [N, max_length] features of the blocks (`block_sequences`)."""
  sequences, segment_ids = query_embedder.block_sequences(
      wordpieces, titles_and_texts, max_length)
  return query_embedder.pad_features(sequences, segment_ids, length=max_length)
