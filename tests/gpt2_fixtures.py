"""A tiny random GPT-2 of transformers, ours with its weights, its checkpoints, and a left-padded batch.

Shared by the tests of the model, its weight I/O and decoding: transformers'
own TFGPT2LMHeadModel is the reference they are held against. Our copy of it
is built from its weights in memory (the checkpoint files are
test_gpt2_weights.py's concern) and shared, so that its compiled decoding
loops are too.
"""

import functools
import os

import numpy as np
import tensorflow as tf
import transformers

import gpt2_weights
import modeling_tf_gpt2_model_par as gpt2

VOCAB = 64


def config(**overrides):
  """A 4-layer, 32-wide GPT-2 config (4 layers: one per logical CPU)."""
  values = dict(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB,
                n_positions=32, initializer_range=0.1, bos_token_id=VOCAB - 1,
                eos_token_id=VOCAB - 1)
  values.update(overrides)
  return transformers.GPT2Config(**values)


@functools.cache
def hf_model():
  """transformers' TF GPT-2 of `config()`, with seeded random weights."""
  model = transformers.TFGPT2LMHeadModel(config())
  model(tf.constant([[1, 2, 3]]))
  # Weights from a seeded numpy stream: independent of TF's global RNG state,
  # which depends on whatever ran before in the session.
  rng = np.random.RandomState(1)
  for weight in model.weights:
    value = rng.normal(0.0, 0.1, weight.shape).astype(np.float32)
    weight.assign(value + 1.0 if "gamma" in weight.name else value)
  return model


def our_model(**options):
  """Our GPT2LMHeadModel holding `hf_model()`'s weights; `options`: devices,
  dtype, recompute."""
  weights = {gpt2_weights.hf_weight_name(variable.name): variable.numpy()
             for variable in hf_model().weights}
  # reshape: transformers' TF Conv1D biases are [1, n], ours [n].
  return gpt2.GPT2LMHeadModel(
      config(), lambda name, shape: weights[name].reshape(shape), **options)


@functools.cache
def shared_model():
  """One `our_model()` for every test module that only reads it."""
  return our_model()


def save_hf_checkpoints(root, formats=("safetensors", "h5")):
  """{format: directory} of `hf_model()` saved by transformers under `root`."""
  directories = {}
  for fmt in formats:
    directory = os.path.join(str(root), fmt)
    hf_model().save_pretrained(directory,
                               safe_serialization=fmt == "safetensors")
    directories[fmt] = directory
  return directories


def batch():
  """Three prompts of lengths 9, 6 and 3, left padded to 9."""
  ids = np.random.RandomState(0).randint(0, VOCAB - 1, size=(3, 9))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :6] = 0
  ids = np.where(mask == 1, ids, 0)
  return tf.constant(ids, tf.int32), tf.constant(mask, tf.int32)


def hf_positions(mask):
  """The position ids transformers' `generate` gives left-padded rows."""
  return tf.maximum(tf.cumsum(mask, axis=-1) - 1, 0)
