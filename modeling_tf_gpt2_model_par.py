"""GPT-2 in TensorFlow 2: the math, with blocks placed over devices and a KV-cache step for decoding.

The model is a plain `tf.Module` holding `tf.Variable`s whose attribute paths
mirror the Hugging Face checkpoint (`transformer.h.0.attn.c_attn.weight`, ...),
so `tf.train.Checkpoint` tracks them and `gpt2_weights` (the Hugging Face
files: names, shapes, reading, writing) is a name map. Conv1D weights are
stored `[in, out]`, as Hugging Face stores them. Decoding (greedy, sampling,
beam search) is `decoding.generate`, over `decode_step`.

Numerics follow transformers' `TFGPT2LMHeadModel` (masked attention scores are
set to -1e4 and padded keys get -1e4 added), so logits agree to float32
round-off, padded rows included.

Model parallelism: with `devices=[d0, d1, ...]` (or a placement of
`placement.py`) consecutive blocks go to consecutive stages
(`placement.stage_of_blocks`: embeddings with the first block, final
LayerNorm and the tied head with the last); each block's variables, forward
ops and backward ops are placed in its stage's scope. Without `devices`,
variables are created wherever the caller's scope says (e.g. mirrored under
`MirroredStrategy.scope()`).
"""

import contextlib
import functools
import math

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

import gpt2_weights
import placement as placement_lib
import utils

# transformers' TF GPT-2 adds this to masked attention scores; using the same
# value keeps even the (ignored) rows of padding positions identical.
_MASK_VALUE = -1e4
_ACTIVATIONS = {
    "gelu_new": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: tf.nn.gelu(x, approximate=True),
    "gelu": lambda x: tf.nn.gelu(x, approximate=False),
    "relu": tf.nn.relu,
}
_COMPUTE_DTYPES = {None: tf.float32, "float32": tf.float32,
                   "bfloat16": tf.bfloat16, "bf16": tf.bfloat16}


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
# The model
# ---------------------------------------------------------------------------


class _Node(tf.Module):
  """A named group of weights or sub-groups (attribute names mirror HF's)."""


class GPT2LMHeadModel(tf.Module):
  """GPT-2 with a tied LM head; see the module docstring.

  Attributes:
    config: the `transformers.GPT2Config`.
    devices: the names of the stages' devices (one replica split over
      devices), or None (no split, or stages that are not one device each).
    placement: None, or the `placement.py` placement of the stages.
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
    self.placement = placement_lib.make(devices)
    self.devices = None if self.placement is None else self.placement.devices
    self._block_stages = self._assign_block_stages(self.placement)

    def make(node, attribute, name):
      shape = gpt2_weights.weight_shapes(config)[name]
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
    """A freshly initialised model, as transformers initialises GPT-2
    (deterministic in `seed`)."""
    return cls(config, gpt2_weights.random_initializer(config, seed),
               devices=devices, dtype=dtype, recompute=recompute)

  @classmethod
  def from_pretrained(cls, name_or_dir, devices=None, dtype=None,
                      recompute=False):
    """Loads a Hugging Face GPT-2 checkpoint: a local/gs:// directory or a hub key."""
    config_path, weights_path = gpt2_weights.resolve_checkpoint(name_or_dir)
    config = gpt2_weights.read_config(config_path)
    # Before the weights are read: they may be gigabytes.
    check_config(config, config_path)
    weights = gpt2_weights.load_weights(weights_path, config)
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
    return {name: weights[name]
            for name in gpt2_weights.weight_shapes(self.config)}

  def save_pretrained(self, directory):
    """Writes config.json + model.safetensors (`gpt2_weights.write_pretrained`)."""
    gpt2_weights.write_pretrained(
        directory, self.config,
        {name: variable.numpy()
         for name, variable in self.named_weights().items()})

  @property
  def num_parameters(self):
    return sum(int(np.prod(shape))
               for shape in gpt2_weights.weight_shapes(self.config).values())

  # -- placement ----------------------------------------------------------

  def _assign_block_stages(self, placement):
    """Stage of each block (`placement.stage_of_blocks`), or None each."""
    n_layer = self.config.n_layer
    if placement is None:
      return (None,) * n_layer
    return placement_lib.stage_of_blocks(n_layer, placement.num_stages,
                                         placement.flag)

  def _on_device(self, layer):
    """The scope of the stage of block `layer` (variables and ops)."""
    stage = self._block_stages[layer]
    if stage is None:
      return contextlib.nullcontext()
    return self.placement.scope(stage)

  def _stage_boundary(self, x, layer):
    """x entering or leaving the stage of block `layer`."""
    stage = self._block_stages[layer]
    return x if stage is None else self.placement.boundary(x, stage)

  def _run_block(self, block_fn, layer, x):
    """Runs one block in its stage; with gradients placed there too."""
    if self._block_stages[layer] is None and not self.recompute:
      return block_fn(x)
    return _placed_block(
        lambda block_input: self._stage_boundary(
            block_fn(self._stage_boundary(block_input, layer)), layer),
        functools.partial(self._on_device, layer), self.recompute)(x)

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

  def check_length(self, length, what):
    """Refuses `length` tokens (of `what`) beyond the model's positions."""
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
      return self._stage_boundary(x, 0)

  def _head(self, x, score_positions=None):
    with self._on_device(self.config.n_layer - 1):
      x = self._stage_boundary(x, self.config.n_layer - 1)
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
          x, layer_cache = self._block(
              layer, self._stage_boundary(x, layer), keys_allowed, key_bias,
              cache[layer], cache_index, None)
          x = self._stage_boundary(x, layer)
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
      self.check_length(length, "input_ids")
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

  # -- decoding steps (the loops are decoding.py's) -------------------------

  def empty_cache(self, batch_size, length):
    """Zero keys and values for `decode_step`: per layer, on its device,
    each [batch_size, H, length, D]."""
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


def _placed_block(block_fn, scope, recompute):
  """block_fn(x) with forward and backward ops in `scope()` (a stage's).

  TF's tape puts gradient ops on the default device, not next to their
  forward ops; for a model split over devices the backward pass must stay on
  each block's device. With `recompute`, the block's activations are not kept:
  the backward pass runs the block again (made to depend on the incoming
  gradient, so XLA cannot hoist or merge the recomputation with the forward).
  """

  @tf.custom_gradient
  def placed(x):
    with scope():
      if recompute:
        y = tf.stop_gradient(block_fn(tf.stop_gradient(x)))
        tape = None
      else:
        with tf.GradientTape() as tape:
          tape.watch(x)
          y = block_fn(x)

    def grad(dy, variables=None):
      variables = list(variables or [])
      with scope():
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
