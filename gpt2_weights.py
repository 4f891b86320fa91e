"""GPT-2's weights in Hugging Face's formats: names, shapes, initial values, reading and writing.

The model (`modeling_tf_gpt2_model_par.GPT2LMHeadModel`) names its variables
by their Hugging Face names (`transformer.h.0.attn.c_attn.weight`, ...);
this module maps the names stored in a checkpoint (PyTorch-style, or the TF
names transformers' TF models save) to those, checks every weight against
the config's shapes, and writes a directory transformers loads. Conv1D
weights are `[in, out]`, as Hugging Face stores them. Knows nothing of the
model's math.
"""

import functools
import math
import os
import socket
import tempfile
import urllib.parse

import huggingface_hub
import numpy as np
import safetensors.numpy
import tensorflow as tf
import transformers

import utils

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
H5_NAME = "tf_model.h5"
# Recognised so that a directory holding one is not taken for a config-only
# one; not read (it needs torch's unpickler).
PYTORCH_NAME = "pytorch_model.bin"
# The weight files read, in order of preference.
_READABLE_NAMES = (SAFETENSORS_NAME, H5_NAME)
# A file of every GPT-2 tokenizer on the hub.
TOKENIZER_VOCAB_NAME = "vocab.json"
# How long the hub may take to accept a connection before it counts as
# unreachable (transformers itself retries for minutes).
_HUB_CONNECT_SECONDS = 3.0


# ---------------------------------------------------------------------------
# Names and shapes
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


def random_initializer(config, seed):
  """fn(name, shape) -> the weight's initial value, as transformers initialises GPT-2.

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


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _looks_like_path(name_or_dir):
  return (name_or_dir.startswith(("/", ".", "~", "gs://")) or
          name_or_dir.count("/") > 1 or tf.io.gfile.exists(name_or_dir))


def holds_config_only(model_key):
  """Whether `model_key` is a directory with a config.json and no weights
  (the project's way to ask for a freshly initialised model)."""
  return (tf.io.gfile.isdir(model_key) and
          tf.io.gfile.exists(os.path.join(model_key, CONFIG_NAME)) and
          not any(tf.io.gfile.exists(os.path.join(model_key, name))
                  for name in _READABLE_NAMES + (PYTORCH_NAME,)))


@functools.cache
def hub_reachable():
  """Whether the Hugging Face hub accepts a connection (HF_HUB_OFFLINE=1: no)."""
  if huggingface_hub.constants.HF_HUB_OFFLINE:
    return False
  endpoint = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
  port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
  try:
    socket.create_connection((endpoint.hostname, port),
                             timeout=_HUB_CONNECT_SECONDS).close()
  except OSError:
    return False
  return True


def check_hub_name(name, flag, file_name=CONFIG_NAME):
  """Refuses at once a hub name that cannot be fetched: the hub is
  unreachable and its local cache lacks `file_name` of it (transformers
  would retry for minutes, then fail with an unrelated error).

  A local or gs:// path is left to the loaders, which name what is wrong
  with it.

  Args:
    name: a hub name or a path.
    flag: the flag that gave it, for the message ("--model_key").
    file_name: a file every copy of it holds (a tokenizer: "vocab.json").
  """
  if not name or _looks_like_path(name) or hub_reachable():
    return
  try:
    transformers.utils.cached_file(name, file_name, local_files_only=True)
  except (OSError, ValueError):
    raise utils.UserError(
        f"{flag}={name}: not a local directory, and the Hugging Face hub "
        "cannot be reached and its local cache has no copy of it, expected a "
        "local directory saved with save_pretrained, or a hub name when "
        "online") from None


def resolve_checkpoint(name_or_dir):
  """(config path, weights path) of a local/gs:// directory or a hub key."""
  if _looks_like_path(name_or_dir):
    if not tf.io.gfile.isdir(name_or_dir):
      raise utils.UserError(
          f"{name_or_dir}: no such checkpoint directory (expected a directory "
          f"with {CONFIG_NAME} and {SAFETENSORS_NAME} or {H5_NAME})")
    config_path = os.path.join(name_or_dir, CONFIG_NAME)
    if not tf.io.gfile.exists(config_path):
      raise utils.UserError(f"{name_or_dir}: no {CONFIG_NAME}")
    weights_paths = [os.path.join(name_or_dir, name)
                     for name in _READABLE_NAMES]
    weights_paths = [path for path in weights_paths
                     if tf.io.gfile.exists(path)]
  else:
    check_hub_name(name_or_dir, "--model_key")
    offline = not hub_reachable()
    try:
      config_path = transformers.utils.cached_file(
          name_or_dir, CONFIG_NAME, local_files_only=offline)
      weights_paths = [
          transformers.utils.cached_file(
              name_or_dir, name, local_files_only=offline,
              _raise_exceptions_for_missing_entries=False)
          for name in _READABLE_NAMES]
    except OSError as error:
      raise utils.UserError(
          f"{name_or_dir}: not a local directory and not fetchable from the "
          f"Hugging Face hub: {str(error).splitlines()[0]}") from None
    weights_paths = [path for path in weights_paths if path]
  if not weights_paths:
    raise utils.UserError(
        f"{name_or_dir}: no {SAFETENSORS_NAME} or {H5_NAME} (PyTorch .bin "
        f"checkpoints need torch; convert them to safetensors)")
  return config_path, weights_paths[0]


def read_config(config_path):
  """The GPT2Config of a config.json (local or gs://)."""
  return transformers.GPT2Config.from_dict(
      utils.read_json(config_path, "GPT-2 config"))


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
# Writing
# ---------------------------------------------------------------------------


def write_pretrained(directory, config, named_weights):
  """Writes config.json + model.safetensors as transformers' TF GPT-2 saves them.

  `named_weights`: {HF name: numpy array}. The safetensors file is in
  transformers' TF layout (`format: tf`, TF weight names, Conv1D biases
  [1, n]): transformers 4.57 cannot load a PyTorch-layout safetensors file
  into a TF model with safetensors>=0.6 (it iterates a `safe_open` handle).
  PyTorch's `from_pretrained` converts the TF layout through TensorFlow.
  """
  utils.makedirs(directory)
  tensors = {}
  for name, value in named_weights.items():
    if ".c_" in name and name.endswith(".bias"):
      value = value[None]
    tensors[tf_weight_name(name)] = np.ascontiguousarray(value)
  weights_path = os.path.join(directory, SAFETENSORS_NAME)
  tmp = utils.temporary_path(weights_path)
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(safetensors.numpy.save(tensors, metadata={"format": "tf"}))
  tf.io.gfile.rename(tmp, weights_path, overwrite=True)
  utils.atomic_write_text(os.path.join(directory, CONFIG_NAME),
                          config.to_json_string())
