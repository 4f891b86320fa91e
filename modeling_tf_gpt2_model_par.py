"""GPT-2 in TensorFlow 2: blocks placed over devices, Hugging Face weights in and out, KV-cache decoding.

The model is a plain `tf.Module` holding `tf.Variable`s whose attribute paths
mirror the Hugging Face checkpoint (`transformer.h.0.attn.c_attn.weight`, ...),
so importing and exporting weights is a name map and `tf.train.Checkpoint`
tracks them. Conv1D weights are stored `[in, out]`, as Hugging Face stores them.

Numerics follow transformers' `TFGPT2LMHeadModel` (masked attention scores are
set to -1e4 and padded keys get -1e4 added), so logits agree to float32
round-off, padded rows included.

Model parallelism: with `devices=[d0, d1, ...]` consecutive blocks go to
consecutive devices (embeddings with the first block, final LayerNorm and the
tied head with the last); each block's variables, forward ops and backward ops
are placed on its device. Without `devices`, variables are created wherever the
caller's scope says (e.g. mirrored under `MirroredStrategy.scope()`).
"""

import functools
import math
import os
import tempfile

import numpy as np
import safetensors.numpy
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla
import transformers

import utils

# transformers' TF GPT-2 adds this to masked attention scores; using the same
# value keeps even the (ignored) rows of padding positions identical.
_MASK_VALUE = -1e4
# Score of an impossible beam; finite so that arithmetic on it stays finite.
_NEG_INF = -1e9
_SAFETENSORS_NAME = "model.safetensors"
_H5_NAME = "tf_model.h5"
_CONFIG_NAME = "config.json"
_ACTIVATIONS = {
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
    "relu": tf.nn.relu,
}
_COMPUTE_DTYPES = {None: tf.float32, "float32": tf.float32,
                   "bfloat16": tf.bfloat16, "bf16": tf.bfloat16}


# ---------------------------------------------------------------------------
# Names and shapes of the weights
# ---------------------------------------------------------------------------


def weight_shapes(config):
  """{Hugging Face weight name: shape} of a GPT-2 config, in checkpoint order."""
  embd, inner = config.n_embd, config.n_inner or 4 * config.n_embd
  shapes = {"transformer.wte.weight": (config.vocab_size, embd),
            "transformer.wpe.weight": (config.n_positions, embd)}
  for i in range(config.n_layer):
    prefix = f"transformer.h.{i}."
    shapes.update({
        prefix + "ln_1.weight": (embd,), prefix + "ln_1.bias": (embd,),
        prefix + "attn.c_attn.weight": (embd, 3 * embd),
        prefix + "attn.c_attn.bias": (3 * embd,),
        prefix + "attn.c_proj.weight": (embd, embd),
        prefix + "attn.c_proj.bias": (embd,),
        prefix + "ln_2.weight": (embd,), prefix + "ln_2.bias": (embd,),
        prefix + "mlp.c_fc.weight": (embd, inner),
        prefix + "mlp.c_fc.bias": (inner,),
        prefix + "mlp.c_proj.weight": (inner, embd),
        prefix + "mlp.c_proj.bias": (embd,),
    })
  shapes["transformer.ln_f.weight"] = (embd,)
  shapes["transformer.ln_f.bias"] = (embd,)
  return shapes


def hf_weight_name(stored_name):
  """Hugging Face name of a stored weight, or None for buffers and the tied head.

  Accepts PyTorch-style names (`transformer.h.0.ln_1.weight`, or `h.0...`
  from a bare GPT2Model) and TF-style names as transformers' TF models save
  them (`transformer/tfgpt2lm_head_model/transformer/h_._0/ln_1/gamma:0`).
  """
  name = stored_name
  if "/" in name:
    name = name.split(":")[0]
    name = name[name.rindex("transformer/") + len("transformer/"):]
    name = name.replace("h_._", "h.").replace("/", ".")
    leaf_renames = {"gamma": "weight", "beta": "bias", "embeddings": "weight"}
    head, _, leaf = name.rpartition(".")
    name = "transformer." + head + "." + leaf_renames.get(leaf, leaf)
  elif not name.startswith("transformer.") and not name.startswith("lm_head."):
    name = "transformer." + name
  # `attn.bias` / `attn.masked_bias` are PyTorch's causal-mask buffers, and the
  # LM head is tied to `wte`: neither is a weight of its own.
  if name == "lm_head.weight" or name.endswith((".attn.bias",
                                                ".attn.masked_bias")):
    return None
  return name


def tf_weight_name(hf_name):
  """The name transformers' TF GPT-2 gives a weight (`transformer/h_._0/ln_1/gamma:0`)."""
  head, _, leaf = hf_name.rpartition(".")
  if head.endswith(("wte", "wpe")):
    leaf = "embeddings"
  elif head.endswith(("ln_1", "ln_2", "ln_f")):
    leaf = {"weight": "gamma", "bias": "beta"}[leaf]
  parts = head.split(".")
  if len(parts) > 2 and parts[1] == "h":
    parts[1:3] = [f"h_._{parts[2]}"]
  return "/".join(parts + [leaf]) + ":0"


def check_config(config, where):
  """Refuses a config this implementation would silently get wrong."""
  if config.n_embd % config.n_head:
    raise utils.UserError(
        f"{where}: n_embd={config.n_embd} is not a multiple of "
        f"n_head={config.n_head}")
  if config.activation_function not in _ACTIVATIONS:
    raise utils.UserError(
        f"{where}: activation_function={config.activation_function!r} is not "
        f"supported; expected one of {sorted(_ACTIVATIONS)}")
  if getattr(config, "add_cross_attention", False):
    raise utils.UserError(f"{where}: add_cross_attention=true is not supported")


# ---------------------------------------------------------------------------
# Reading and writing checkpoints
# ---------------------------------------------------------------------------


def _looks_like_path(name_or_dir):
  return (name_or_dir.startswith(("/", ".", "~", "gs://")) or
          name_or_dir.count("/") > 1 or tf.io.gfile.exists(name_or_dir))


def _resolve_checkpoint(name_or_dir):
  """(config path, weights path or None) of a local/gs:// dir or a hub key."""
  if _looks_like_path(name_or_dir):
    if not tf.io.gfile.isdir(name_or_dir):
      raise utils.UserError(
          f"{name_or_dir}: no such checkpoint directory (expected a directory "
          f"with {_CONFIG_NAME} and {_SAFETENSORS_NAME} or {_H5_NAME})")
    config_path = os.path.join(name_or_dir, _CONFIG_NAME)
    if not tf.io.gfile.exists(config_path):
      raise utils.UserError(f"{name_or_dir}: no {_CONFIG_NAME}")
    for weights_name in (_SAFETENSORS_NAME, _H5_NAME):
      weights_path = os.path.join(name_or_dir, weights_name)
      if tf.io.gfile.exists(weights_path):
        return config_path, weights_path
    return config_path, None
  try:
    config_path = transformers.utils.cached_file(name_or_dir, _CONFIG_NAME)
    for weights_name in (_SAFETENSORS_NAME, _H5_NAME):
      weights_path = transformers.utils.cached_file(
          name_or_dir, weights_name,
          _raise_exceptions_for_missing_entries=False)
      if weights_path:
        return config_path, weights_path
  except OSError as error:
    raise utils.UserError(
        f"{name_or_dir}: not a local directory and not fetchable from the "
        f"Hugging Face hub: {str(error).splitlines()[0]}") from None
  return config_path, None


def _read_stored_weights(weights_path):
  """{stored name: numpy array} of a safetensors or Keras h5 file (local or gs://)."""
  with tf.io.gfile.GFile(weights_path, "rb") as f:
    data = f.read()
  if weights_path.endswith(".safetensors"):
    try:
      return safetensors.numpy.load(data)
    except Exception as error:  # safetensors raises its own untyped errors.
      raise utils.UserError(
          f"{weights_path}: not a readable safetensors file: {error}") from None
  import h5py  # pylint: disable=g-import-not-at-top
  # h5py reads only local files, so a gs:// file goes through a local copy.
  with tempfile.NamedTemporaryFile(suffix=".h5") as local_copy:
    local_copy.write(data)
    local_copy.flush()
    weights = {}
    with h5py.File(local_copy.name, "r") as h5:
      h5.visititems(lambda name, item: weights.__setitem__(name, item[()])
                    if isinstance(item, h5py.Dataset) else None)
  return weights


def load_weights(weights_path, config):
  """{HF weight name: float32 array}, checked against `config`'s names and shapes."""
  expected = weight_shapes(config)
  weights = {}
  for stored_name, value in _read_stored_weights(weights_path).items():
    name = hf_weight_name(stored_name)
    if name is None:
      continue
    if name not in expected:
      raise utils.UserError(
          f"{weights_path}: unexpected weight {stored_name} for a GPT-2 with "
          f"n_layer={config.n_layer}")
    if value.ndim == len(expected[name]) + 1 and value.shape[0] == 1:
      value = value[0]  # transformers' TF Conv1D stores biases as [1, n].
    if tuple(value.shape) != expected[name]:
      raise utils.UserError(
          f"{weights_path}: weight {name} has shape {list(value.shape)}, "
          f"expected {list(expected[name])} from the config")
    weights[name] = value.astype(np.float32)
  missing = [name for name in expected if name not in weights]
  if missing:
    raise utils.UserError(
        f"{weights_path}: missing weight {missing[0]}"
        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return weights


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class _Node(tf.Module):
  """A named group of weights or sub-groups (attribute names mirror HF's)."""


def _random_initializer(config, seed):
  """Initial value of each weight as transformers initialises GPT-2.

  Normal(0, 0.02) weights, zero biases, unit LayerNorm scales, and the
  residual projections scaled by 1/sqrt(2 * n_layer). Each weight draws from
  its own stateless stream, so the values do not depend on creation order
  or device.
  """
  names = list(weight_shapes(config))
  std = config.initializer_range

  def initial_value(name, shape):
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
      return tf.ones(shape)
    if name.endswith(".bias"):
      return tf.zeros(shape)
    scale = std
    if name.endswith("c_proj.weight"):
      scale = std / math.sqrt(2 * config.n_layer)
    return scale * tf.random.stateless_normal(
        shape, seed=[seed, names.index(name)])

  return initial_value


class GPT2LMHeadModel(tf.Module):
  """GPT-2 with a tied LM head; see the module docstring.

  Attributes:
    config: the `transformers.GPT2Config`.
    devices: None, or one device name per stage (consecutive blocks each).
    compute_dtype: tf.float32, or tf.bfloat16 for mixed precision (the
      variables stay float32; logits are returned as float32).
    recompute: recompute each block in the backward pass instead of keeping
      its activations.
  """

  def __init__(self, config, initial_value, devices=None, dtype=None,
               recompute=False):
    super().__init__(name="gpt2_lm_head_model")
    check_config(config, "config")
    self.config = config
    if dtype is not None and not isinstance(dtype, str):
      dtype = tf.as_dtype(dtype).name
    if dtype not in _COMPUTE_DTYPES:
      raise utils.UserError(
          f"dtype: {dtype!r} is not supported; expected float32 or bfloat16")
    self.compute_dtype = _COMPUTE_DTYPES[dtype]
    self.recompute = recompute
    self.devices = None if devices is None else tuple(devices)
    self._block_devices = self._assign_block_devices(self.devices)

    def make(node, attribute, name):
      shape = weight_shapes(config)[name]
      setattr(node, attribute, tf.Variable(
          lambda: initial_value(name, shape), name=name, dtype=tf.float32))

    def make_weight_and_bias(parent, attribute, prefix):
      node = _Node(name=attribute)
      make(node, "weight", prefix + ".weight")
      make(node, "bias", prefix + ".bias")
      setattr(parent, attribute, node)

    self.transformer = _Node(name="transformer")
    with self._on_device(0):
      for attribute in ("wte", "wpe"):
        node = _Node(name=attribute)
        make(node, "weight", f"transformer.{attribute}.weight")
        setattr(self.transformer, attribute, node)
    blocks = []
    for i in range(config.n_layer):
      prefix = f"transformer.h.{i}"
      block = _Node(name=f"h_{i}")
      with self._on_device(i):
        make_weight_and_bias(block, "ln_1", prefix + ".ln_1")
        block.attn = _Node(name="attn")
        make_weight_and_bias(block.attn, "c_attn", prefix + ".attn.c_attn")
        make_weight_and_bias(block.attn, "c_proj", prefix + ".attn.c_proj")
        make_weight_and_bias(block, "ln_2", prefix + ".ln_2")
        block.mlp = _Node(name="mlp")
        make_weight_and_bias(block.mlp, "c_fc", prefix + ".mlp.c_fc")
        make_weight_and_bias(block.mlp, "c_proj", prefix + ".mlp.c_proj")
      blocks.append(block)
    self.transformer.h = blocks
    with self._on_device(config.n_layer - 1):
      make_weight_and_bias(self.transformer, "ln_f", "transformer.ln_f")

  # -- construction -------------------------------------------------------

  @classmethod
  def from_config(cls, config, devices=None, dtype=None, seed=0,
                  recompute=False):
    """A freshly initialised model (deterministic in `seed`)."""
    return cls(config, _random_initializer(config, seed), devices=devices,
               dtype=dtype, recompute=recompute)

  @classmethod
  def from_pretrained(cls, name_or_dir, devices=None, dtype=None,
                      recompute=False):
    """Loads a Hugging Face GPT-2 checkpoint: a local/gs:// directory or a hub key."""
    config_path, weights_path = _resolve_checkpoint(name_or_dir)
    config = transformers.GPT2Config.from_dict(
        utils.read_json(config_path, "GPT-2 config"))
    check_config(config, config_path)
    if weights_path is None:
      raise utils.UserError(
          f"{name_or_dir}: no {_SAFETENSORS_NAME} or {_H5_NAME} (PyTorch .bin "
          f"checkpoints need torch; convert them to safetensors)")
    weights = load_weights(weights_path, config)
    return cls(config, lambda name, shape: weights[name], devices=devices,
               dtype=dtype, recompute=recompute)

  def named_weights(self):
    """{Hugging Face name: variable}, in checkpoint order."""
    weights = {}

    def collect(prefix, node):
      for attribute, value in vars(node).items():
        if isinstance(value, tf.Variable):
          weights[f"{prefix}.{attribute}"] = value
        elif isinstance(value, _Node):
          collect(f"{prefix}.{attribute}", value)

    collect("transformer", self.transformer)
    for i, block in enumerate(self.transformer.h):
      collect(f"transformer.h.{i}", block)
    return {name: weights[name] for name in weight_shapes(self.config)}

  def save_pretrained(self, directory):
    """Writes config.json + model.safetensors as transformers' TF GPT-2 saves them.

    The safetensors file is in transformers' TF layout (`format: tf`, TF
    weight names, Conv1D biases [1, n]): transformers 4.57 cannot load a
    PyTorch-layout safetensors file into a TF model with safetensors>=0.6
    (it iterates a `safe_open` handle). PyTorch's `from_pretrained` converts
    the TF layout through TensorFlow (not tested here: no torch).
    """
    utils.makedirs(directory)
    tensors = {}
    for name, variable in self.named_weights().items():
      value = variable.numpy()
      if ".c_" in name and name.endswith(".bias"):
        value = value[None]
      tensors[tf_weight_name(name)] = np.ascontiguousarray(value)
    weights_path = os.path.join(directory, _SAFETENSORS_NAME)
    tmp = utils.temporary_path(weights_path)
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(safetensors.numpy.save(tensors, metadata={"format": "tf"}))
    tf.io.gfile.rename(tmp, weights_path, overwrite=True)
    utils.atomic_write_text(os.path.join(directory, _CONFIG_NAME),
                            self.config.to_json_string())

  @property
  def num_parameters(self):
    return sum(int(np.prod(shape))
               for shape in weight_shapes(self.config).values())

  # -- placement ----------------------------------------------------------

  def _assign_block_devices(self, devices):
    """Device of each block: contiguous, near-equal runs over `devices`."""
    n_layer = self.config.n_layer
    if devices is None:
      return (None,) * n_layer
    if not devices or len(devices) > n_layer:
      raise utils.UserError(
          f"devices: {len(devices)} devices for {n_layer} layers; expected "
          f"between 1 and n_layer devices")

    def type_and_index(name):
      spec = tf.DeviceSpec.from_string(name)
      return (spec.device_type or "").upper(), spec.device_index or 0

    known = {type_and_index(d.name): d.name
             for d in tf.config.list_logical_devices()}
    for device in devices:
      if type_and_index(device) not in known:
        raise utils.UserError(
            f"devices: unknown device {device!r}; logical devices here are "
            f"{sorted(known.values())}")
    return tuple(devices[i * len(devices) // n_layer] for i in range(n_layer))

  def _on_device(self, layer):
    device = self._block_devices[layer]
    return tf.device(device) if device else _null_scope()

  def _run_block(self, block_fn, layer, x):
    """Runs one block on its device; with gradients placed there too."""
    device = self._block_devices[layer]
    if device is None and not self.recompute:
      return block_fn(x)
    return _placed_block(block_fn, device, self.recompute)(x)

  # -- forward ------------------------------------------------------------

  def _weight(self, variable):
    return tf.cast(variable, self.compute_dtype)

  def _layer_norm(self, node, x):
    # Statistics in float32 even under bf16: they are the fragile part.
    x32 = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
    normed = (x32 - mean) * tf.math.rsqrt(
        variance + self.config.layer_norm_epsilon)
    return tf.cast(normed * node.weight + node.bias, self.compute_dtype)

  def _linear(self, node, x):
    flat = tf.reshape(x, [-1, tf.shape(x)[-1]])
    # BiasAdd (not Add) lets grappler fuse it into the matmul on CPU/GPU.
    out = tf.nn.bias_add(tf.matmul(flat, self._weight(node.weight)),
                         self._weight(node.bias))
    return tf.reshape(out, tf.concat([tf.shape(x)[:-1], [-1]], axis=0))

  def _dropout(self, x, rate, dropout_seed, site):
    if dropout_seed is None or rate == 0.0:
      return x
    seed = tf.random.experimental.stateless_fold_in(dropout_seed, site)
    return tf.nn.experimental.stateless_dropout(x, rate=rate, seed=seed)

  def _attention(self, layer, node, x, keys_allowed, key_bias, layer_cache,
                 cache_index, dropout_seed):
    """Causal self-attention of x [B, T, E]; returns (output, new cache)."""
    config = self.config
    heads, head_dim = config.n_head, config.n_embd // config.n_head
    qkv = self._linear(node.c_attn, x)
    qkv = tf.reshape(qkv, tf.concat([tf.shape(x)[:2], [3, heads, head_dim]], 0))
    # One transpose to [3, B, H, T, D]: heads-major, so that the matmuls (and
    # the cache, read every decoding step) need no further transposes.
    query, key, value = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))
    if layer_cache is not None:
      start = [0, 0, cache_index, 0]
      key = xla.dynamic_update_slice(layer_cache[0], key, start)
      value = xla.dynamic_update_slice(layer_cache[1], value, start)
    scale = 1.0 / math.sqrt(head_dim)
    if config.scale_attn_by_inverse_layer_idx:
      scale /= layer + 1
    scores = tf.cast(tf.matmul(query, key, transpose_b=True), tf.float32)
    scores = tf.where(keys_allowed, scores * scale, _MASK_VALUE)
    if key_bias is not None:
      scores += key_bias
    probs = tf.nn.softmax(scores, axis=-1)
    probs = self._dropout(probs, config.attn_pdrop, dropout_seed, 0)
    out = tf.matmul(tf.cast(probs, self.compute_dtype), value)  # [B, H, T, D]
    out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), tf.shape(x))
    out = self._linear(node.c_proj, out)
    out = self._dropout(out, config.resid_pdrop, dropout_seed, 1)
    return out, (None if layer_cache is None else (key, value))

  def _block(self, layer, x, keys_allowed, key_bias, layer_cache, cache_index,
             dropout_seed):
    block = self.transformer.h[layer]
    if dropout_seed is not None:
      dropout_seed = tf.random.experimental.stateless_fold_in(
          dropout_seed, layer + 1)
    attn_out, new_cache = self._attention(
        layer, block.attn, self._layer_norm(block.ln_1, x), keys_allowed,
        key_bias, layer_cache, cache_index, dropout_seed)
    x = x + tf.cast(attn_out, tf.float32)
    activation = _ACTIVATIONS[self.config.activation_function]
    hidden = activation(self._linear(block.mlp.c_fc,
                                     self._layer_norm(block.ln_2, x)))
    mlp_out = self._dropout(self._linear(block.mlp.c_proj, hidden),
                            self.config.resid_pdrop, dropout_seed, 2)
    return x + tf.cast(mlp_out, tf.float32), new_cache

  def _block_output(self, layer, x, keys_allowed, key_bias, dropout_seed):
    return self._block(layer, x, keys_allowed, key_bias, None, None,
                       dropout_seed)[0]

  def _check_length(self, length, what):
    if length > self.config.n_positions:
      raise utils.UserError(
          f"{what}: {length} tokens is longer than the model's n_positions="
          f"{self.config.n_positions}")

  def _embed(self, input_ids, position_ids, dropout_seed):
    with self._on_device(0):
      # The residual stream stays float32 under bf16 (each block's matmuls
      # run in bf16): it carries the sum of every layer's small updates.
      x = (tf.gather(self.transformer.wte.weight, input_ids) +
           tf.gather(self.transformer.wpe.weight, position_ids))
      if dropout_seed is not None:
        x = self._dropout(x, self.config.embd_pdrop,
                          tf.random.experimental.stateless_fold_in(
                              dropout_seed, 0), 0)
      return x

  def _head(self, x, score_positions=None):
    with self._on_device(self.config.n_layer - 1):
      if score_positions is not None:
        x = tf.gather(x, score_positions, batch_dims=1)
      x = self._layer_norm(self.transformer.ln_f, x)
      logits = tf.einsum("bte,ve->btv", x,
                         self._weight(self.transformer.wte.weight))
      return tf.cast(logits, tf.float32)

  def _transform(self, input_ids, position_ids, keys_allowed, key_bias,
                 dropout_seed=None, cache=None, cache_index=None,
                 score_positions=None):
    """Embeddings, blocks and the tied head; returns (logits, new cache)."""
    x = self._embed(input_ids, position_ids, dropout_seed)
    new_cache = []
    for layer in range(self.config.n_layer):
      if cache is None:
        block_fn = functools.partial(
            self._block_output, layer, keys_allowed=keys_allowed,
            key_bias=key_bias, dropout_seed=dropout_seed)
        x = self._run_block(block_fn, layer, x)
      else:
        with self._on_device(layer):
          x, layer_cache = self._block(layer, x, keys_allowed, key_bias,
                                       cache[layer], cache_index, None)
        new_cache.append(layer_cache)
    return self._head(x, score_positions), new_cache

  # The model has no data-dependent Python control flow: autograph must not
  # rewrite it when a caller's tf.function converts its body.
  @tf.autograph.experimental.do_not_convert
  def __call__(self, input_ids, attention_mask=None, position_ids=None,
               training=False, dropout_seed=None, score_positions=None):
    """Logits [B, T, V] (float32) of input_ids [B, T].

    Args:
      input_ids: int [B, T].
      attention_mask: optional [B, T], 1 for tokens and 0 for padding
        (left or right). Padded keys are masked.
      position_ids: optional [B, T]; by default cumsum(mask) - 1 clipped at 0
        (left padding as in transformers' generate), else 0..T-1.
      training: apply dropout (needs dropout_seed).
      dropout_seed: int [2]; dropout is stateless in this seed, so a resumed
        run reproduces an uninterrupted one.
      score_positions: optional int [B, K]: return only the logits [B, K, V]
        at these positions. The tied head costs 2·T·E·V FLOPs, as much as
        the blocks of a small model; a loss on a few positions (the answer)
        need not pay it at every position.
    """
    input_ids = tf.convert_to_tensor(input_ids)
    length = input_ids.shape[1]
    if length is not None:
      self._check_length(length, "input_ids")
    if training and dropout_seed is None:
      raise utils.UserError("training=True needs a dropout_seed (int [2])")
    if position_ids is None:
      position_ids = default_position_ids(attention_mask, tf.shape(input_ids))
    seq = tf.range(tf.shape(input_ids)[1])
    keys_allowed = (seq[None, :] <= seq[:, None])[None, None]
    key_bias = padding_bias(attention_mask)
    logits, _ = self._transform(
        input_ids, position_ids, keys_allowed, key_bias,
        dropout_seed=dropout_seed if training else None,
        score_positions=score_positions)
    return logits

  # -- decoding -----------------------------------------------------------

  def _empty_cache(self, batch_size, length):
    heads = self.config.n_head
    shape = [batch_size, heads, length, self.config.n_embd // heads]
    cache = []
    for layer in range(self.config.n_layer):
      with self._on_device(layer):
        cache.append((tf.zeros(shape, self.compute_dtype),
                      tf.zeros(shape, self.compute_dtype)))
    return cache

  @tf.autograph.experimental.do_not_convert
  def decode_step(self, input_ids, position_ids, key_mask, cache, cache_index):
    """Runs input_ids [B, T] written at cache slots [cache_index, cache_index + T).

    Args:
      input_ids: int [B, T] new tokens.
      position_ids: int [B, T] their positions.
      key_mask: [B, L] 1 for the cache slots that hold real tokens (slots not
        yet written are masked by causality).
      cache: per layer (keys, values), each [B, H, L, D].
      cache_index: int scalar, the slot of input_ids[:, 0].

    Returns:
      (logits [B, T, V] float32, the updated cache).
    """
    queries = cache_index + tf.range(tf.shape(input_ids)[1])
    slots = tf.range(tf.shape(key_mask)[1])
    keys_allowed = (slots[None, :] <= queries[:, None])[None, None]
    return self._transform(input_ids, position_ids, keys_allowed,
                           padding_bias(key_mask), cache=cache,
                           cache_index=cache_index)

  @tf.autograph.experimental.do_not_convert
  def generate(self, input_ids, attention_mask=None, max_new_tokens=20,
               do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
               num_beams=1, repetition_penalty=1.0, length_penalty=1.0,
               eos_token_id=None, pad_token_id=None, seed=None):
    """New tokens int32 [B, max_new_tokens] after left-padded prompts.

    Greedy (default), sampling (`do_sample`, with temperature / top_k / top_p,
    reproducible for a given `seed`) or beam search (`num_beams` > 1,
    returning the beam with the best length-penalised log-probability, as
    transformers scores beams). `repetition_penalty` divides positive and
    multiplies negative logits of tokens already in the prompt or output (as
    in transformers, but padding tokens do not count). A row stops at
    `eos_token_id` and is padded with `pad_token_id` (default: eos, else 0).
    The whole loop is one XLA computation with a fixed-shape KV cache when the
    model is on one device; shapes (batch, prompt length, max_new_tokens)
    are compiled once each, so pad prompts to a few fixed lengths.
    """
    input_ids = tf.convert_to_tensor(input_ids, tf.int32)
    if attention_mask is None:
      attention_mask = tf.ones_like(input_ids)
    attention_mask = tf.cast(attention_mask, tf.int32)
    prompt_length = input_ids.shape[1]
    if prompt_length is None:
      raise utils.UserError("generate: the prompt length must be static (pad "
                            "prompts to a fixed length)")
    self._check_length(prompt_length, "input_ids (prompt)")
    self._check_length(prompt_length + max_new_tokens,
                       f"prompt + max_new_tokens={max_new_tokens}")
    if max_new_tokens < 1:
      raise utils.UserError(f"max_new_tokens: {max_new_tokens}; expected >= 1")
    if pad_token_id is None:
      pad_token_id = eos_token_id if eos_token_id is not None else 0
    settings = _DecodeSettings(
        max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        num_beams=int(num_beams), repetition_penalty=float(repetition_penalty),
        length_penalty=float(length_penalty),
        eos_token_id=-1 if eos_token_id is None else int(eos_token_id),
        pad_token_id=int(pad_token_id))
    if settings.num_beams > 1 and settings.do_sample:
      raise utils.UserError("generate: beam sampling is not supported; use "
                            "num_beams=1 with do_sample, or do_sample=False")
    seed = tf.cast(tf.stack([0, 0 if seed is None else seed]), tf.int64)
    return self._decoder(settings)(input_ids, attention_mask, seed)

  def _decoder(self, settings):
    """The compiled decoding loop for `settings` (cached per settings)."""
    if "_decoders" not in self.__dict__:
      # Set through __dict__ so tf.Module does not track (and checkpoint) it.
      self.__dict__["_decoders"] = {}
    if settings not in self._decoders:
      search = _beam_search if settings.num_beams > 1 else _sample_or_greedy
      one_device = self.devices is None or len(set(self.devices)) == 1
      self._decoders[settings] = tf.function(
          lambda ids, mask, seed: search(self, settings, ids, mask, seed),
          jit_compile=one_device, autograph=False)
    return self._decoders[settings]


class _null_scope:  # pylint: disable=invalid-name
  """A do-nothing context manager (tf.device(None) would reset the scope)."""

  def __enter__(self):
    return self

  def __exit__(self, *unused_exc_info):
    return False


def _placed_block(block_fn, device, recompute):
  """block_fn(x) with forward and backward ops on `device`.

  TF's tape puts gradient ops on the default device, not next to their
  forward ops; for a model split over devices the backward pass must stay on
  each block's device. With `recompute`, the block's activations are not kept:
  the backward pass runs the block again (made to depend on the incoming
  gradient, so XLA cannot hoist or merge the recomputation with the forward).
  """

  @tf.custom_gradient
  def placed(x):
    with tf.device(device) if device else _null_scope():
      if recompute:
        y = tf.stop_gradient(block_fn(tf.stop_gradient(x)))
        tape = None
      else:
        with tf.GradientTape() as tape:
          tape.watch(x)
          y = block_fn(x)

    def grad(dy, variables=None):
      variables = list(variables or [])
      with tf.device(device) if device else _null_scope():
        if recompute:
          first = tf.reshape(dy, [-1])[:1]
          dependency = tf.cast(tf.reduce_sum(first) * 0, x.dtype)
          with tf.GradientTape() as recompute_tape:
            x_again = x + dependency
            recompute_tape.watch(x_again)
            recompute_tape.watch(variables)
            y_again = block_fn(x_again)
          grads = recompute_tape.gradient(
              y_again, [x_again] + variables, output_gradients=dy,
              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        else:
          grads = tape.gradient(
              y, [x] + variables, output_gradients=dy,
              unconnected_gradients=tf.UnconnectedGradients.ZERO)
      return grads[0], grads[1:]

    return y, grad

  return placed


def default_position_ids(attention_mask, input_shape):
  """cumsum(mask) - 1 clipped at 0 (transformers' left-padding positions), else 0..T-1."""
  if attention_mask is None:
    return tf.broadcast_to(tf.range(input_shape[1])[None], input_shape)
  mask = tf.cast(attention_mask, tf.int32)
  return tf.maximum(tf.cumsum(mask, axis=-1) - 1, 0)


def padding_bias(attention_mask):
  """[B, 1, 1, S] additive bias: 0 for real keys, -1e4 for padding (or None)."""
  if attention_mask is None:
    return None
  mask = tf.cast(attention_mask, tf.float32)
  return ((1.0 - mask) * _MASK_VALUE)[:, None, None, :]


# ---------------------------------------------------------------------------
# Decoding loops (traced inside one tf.function per settings)
# ---------------------------------------------------------------------------


class _DecodeSettings(tuple):
  """Hashable decoding settings (the static part of a compiled decoder)."""
  _FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
             "num_beams", "repetition_penalty", "length_penalty",
             "eos_token_id", "pad_token_id")

  def __new__(cls, **values):
    return super().__new__(cls, tuple(values[f] for f in cls._FIELDS))

  def __getattr__(self, name):
    return self[self._FIELDS.index(name)]


def _apply_repetition_penalty(logits, seen, penalty):
  """transformers' rule: positive logits / penalty, negative * penalty, for seen tokens."""
  if penalty == 1.0:
    return logits
  penalised = tf.where(logits > 0, logits / penalty, logits * penalty)
  return tf.where(seen, penalised, logits)


def _filter_top_k_top_p(logits, top_k, top_p):
  """Masks logits outside the top_k and outside the top_p nucleus."""
  if top_k > 0:
    kth = tf.math.top_k(logits, k=min(top_k, logits.shape[-1])).values[:, -1:]
    logits = tf.where(logits < kth, _NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = tf.sort(logits, direction="DESCENDING", axis=-1)
    cumulative = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1, exclusive=True)
    # The smallest kept logit: the last one whose preceding mass is < top_p.
    kept = tf.cast(cumulative < top_p, tf.int32)
    threshold = tf.gather(sorted_logits, tf.reduce_sum(kept, -1) - 1,
                          batch_dims=1)[:, None]
    logits = tf.where(logits < threshold, _NEG_INF, logits)
  return logits


def _static_or_dynamic_batch(input_ids):
  """The batch size, static when known (beam bookkeeping needs fixed shapes)."""
  return input_ids.shape[0] or tf.shape(input_ids)[0]


def _prefill(model, input_ids, attention_mask, total_length):
  """Runs the prompt into a fresh cache; returns (last logits, cache, key mask)."""
  batch_size = _static_or_dynamic_batch(input_ids)
  prompt_length = input_ids.shape[1]
  key_mask = tf.concat(
      [attention_mask,
       tf.ones([batch_size, total_length - prompt_length], tf.int32)], axis=1)
  cache = model._empty_cache(batch_size, total_length)  # pylint: disable=protected-access
  logits, cache = model.decode_step(
      input_ids, default_position_ids(attention_mask, tf.shape(input_ids)),
      key_mask, cache, tf.constant(0))
  return logits[:, -1], cache, key_mask


def _seen_tokens(input_ids, attention_mask, vocab_size, penalty):
  """[B, V] bool: tokens present in the (unpadded) prompt.

  Without a repetition penalty nothing is tracked ([B, 0]), so the decoding
  loop carries no per-step vocabulary-sized work.
  """
  if penalty == 1.0:
    return tf.zeros([tf.shape(input_ids)[0], 0], tf.bool)
  counts = tf.reduce_sum(
      tf.one_hot(input_ids, vocab_size) *
      tf.cast(attention_mask, tf.float32)[:, :, None], axis=1)
  return counts > 0


def _mark_seen(seen, token, vocab_size):
  if seen.shape[-1] == 0:
    return seen
  return seen | tf.cast(tf.one_hot(token, vocab_size), tf.bool)


def _sample_or_greedy(model, settings, input_ids, attention_mask, seed):
  """Greedy or sampled decoding; one while_loop over a fixed-shape cache."""
  prompt_length = input_ids.shape[1]
  batch_size = _static_or_dynamic_batch(input_ids)
  vocab_size = model.config.vocab_size
  logits, cache, key_mask = _prefill(
      model, input_ids, attention_mask, prompt_length + settings.max_new_tokens)
  next_position = tf.reduce_sum(attention_mask, axis=1)

  def choose(step, logits, seen, output, done):
    """Picks the token of `step`; returns it with the updated state."""
    scores = _apply_repetition_penalty(logits, seen,
                                       settings.repetition_penalty)
    if settings.do_sample:
      scores = _filter_top_k_top_p(scores / settings.temperature,
                                   settings.top_k, settings.top_p)
      token = tf.random.stateless_categorical(
          scores, 1, seed=tf.random.experimental.stateless_fold_in(seed, step),
          dtype=tf.int32)[:, 0]
    else:
      token = tf.argmax(scores, axis=-1, output_type=tf.int32)
    token = tf.where(done, settings.pad_token_id, token)
    output = xla.dynamic_update_slice(output, token[:, None], [0, step])
    done = done | tf.equal(token, settings.eos_token_id)
    return token, _mark_seen(seen, token, vocab_size), output, done

  def body(step, logits, cache, seen, output, done):
    token, seen, output, done = choose(step, logits, seen, output, done)
    logits, cache = model.decode_step(
        token[:, None], (next_position + step)[:, None], key_mask, cache,
        prompt_length + step)
    return step + 1, logits[:, -1], cache, seen, output, done

  def cond(step, unused_logits, unused_cache, unused_seen, unused_output,
           done):
    return (step < settings.max_new_tokens - 1) & ~tf.reduce_all(done)

  state = (tf.constant(0), logits, cache,
           _seen_tokens(input_ids, attention_mask, vocab_size,
                        settings.repetition_penalty),
           tf.fill([batch_size, settings.max_new_tokens],
                   settings.pad_token_id),
           tf.zeros([batch_size], tf.bool))
  step, logits, _, seen, output, done = tf.while_loop(cond, body, state)
  # The last token needs no forward pass; rows already done keep their padding.
  return choose(step, logits, seen, output, done)[2]


def _beam_search(model, settings, input_ids, attention_mask, unused_seed):
  """Fixed-shape beam search with separate alive and finished beams.

  Each step extends the K alive beams of every row by every token, keeps the
  2K best candidates, moves those ending in EOS to the finished set (scored
  as transformers does: sum of log-probs / generated_length**length_penalty)
  and keeps the K best others alive. At the end, alive beams join the
  finished set and the best-scoring beam of each row is returned.
  """
  beams = settings.num_beams
  prompt_length = input_ids.shape[1]
  new_tokens = settings.max_new_tokens
  batch_size = _static_or_dynamic_batch(input_ids)
  vocab_size = model.config.vocab_size

  flat_ids = tf.repeat(input_ids, beams, axis=0)  # [B * K, T], row-major
  flat_mask = tf.repeat(attention_mask, beams, axis=0)
  logits, cache, key_mask = _prefill(model, flat_ids, flat_mask,
                                     prompt_length + new_tokens)
  next_position = tf.reduce_sum(flat_mask, axis=1)

  def gather_beams(t, indices):  # t [B, K', ...], indices [B, K] -> [B, K, ...]
    return tf.gather(t, indices, batch_dims=1)

  def extend(step, logits, seen, beam_state):
    """One beam step; returns (the new state, flat parents, flat tokens)."""
    alive_logprob, alive_tokens, finished_tokens, finished_score = beam_state
    scores = _apply_repetition_penalty(logits, seen,
                                       settings.repetition_penalty)
    logprobs = tf.reshape(tf.nn.log_softmax(scores),
                          [batch_size, beams, vocab_size])
    candidates = tf.reshape(alive_logprob[:, :, None] + logprobs,
                            [batch_size, beams * vocab_size])
    top_logprob, top_index = tf.math.top_k(candidates, k=2 * beams)
    parent = top_index // vocab_size
    token = top_index % vocab_size
    candidate_tokens = xla.dynamic_update_slice(
        gather_beams(alive_tokens, parent),
        tf.reshape(token, [batch_size, 2 * beams, 1]), [0, 0, step])
    is_eos = tf.equal(token, settings.eos_token_id)
    # Candidates ending in EOS are scored and merged with the finished set.
    length = tf.cast(step + 1, tf.float32)
    eos_score = tf.where(
        is_eos, top_logprob / length ** settings.length_penalty, _NEG_INF)
    finished_score, keep = tf.math.top_k(
        tf.concat([finished_score, eos_score], axis=1), k=beams)
    finished_tokens = gather_beams(
        tf.concat([finished_tokens, candidate_tokens], axis=1), keep)
    # The best K candidates that did not end in EOS stay alive.
    alive_logprob, keep = tf.math.top_k(
        tf.where(is_eos, _NEG_INF, top_logprob), k=beams)
    alive_tokens = gather_beams(candidate_tokens, keep)
    flat_parent = tf.reshape(
        gather_beams(parent, keep) + beams * tf.range(batch_size)[:, None],
        [-1])
    flat_token = tf.reshape(gather_beams(token, keep), [-1])
    return ((alive_logprob, alive_tokens, finished_tokens, finished_score),
            flat_parent, flat_token)

  def body(step, logits, cache, seen, beam_state):
    beam_state, flat_parent, flat_token = extend(step, logits, seen,
                                                 beam_state)
    cache = [(tf.gather(k, flat_parent), tf.gather(v, flat_parent))
             for k, v in cache]
    seen = _mark_seen(tf.gather(seen, flat_parent), flat_token, vocab_size)
    logits, cache = model.decode_step(
        flat_token[:, None], (next_position + step)[:, None], key_mask, cache,
        prompt_length + step)
    return step + 1, logits[:, -1], cache, seen, beam_state

  def cond(step, *unused_state):
    return step < new_tokens - 1

  # Only the first of each row's K identical beams is live at the start.
  beam_state = (
      tf.tile(tf.constant([0.0] + [_NEG_INF] * (beams - 1))[None],
              [batch_size, 1]),
      tf.fill([batch_size, beams, new_tokens], settings.pad_token_id),
      tf.fill([batch_size, beams, new_tokens], settings.pad_token_id),
      tf.fill([batch_size, beams], _NEG_INF))
  state = (tf.constant(0), logits, cache,
           _seen_tokens(flat_ids, flat_mask, vocab_size,
                        settings.repetition_penalty), beam_state)
  step, logits, _, seen, beam_state = tf.while_loop(cond, body, state)
  # The last step needs no forward pass.
  alive_logprob, alive_tokens, finished_tokens, finished_score = extend(
      step, logits, seen, beam_state)[0]
  alive_score = alive_logprob / float(new_tokens) ** settings.length_penalty
  pool_score = tf.concat([finished_score, alive_score], axis=1)
  pool_tokens = tf.concat([finished_tokens, alive_tokens], axis=1)
  best = tf.argmax(pool_score, axis=1, output_type=tf.int32)
  return tf.gather(pool_tokens, best, batch_dims=1)
