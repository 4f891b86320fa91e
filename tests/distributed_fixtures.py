"""A small Keras regression model, a fixed global batch and free local ports,
shared by the distribution tests and the multi-worker worker processes."""

import socket

import numpy as np
import tensorflow as tf
import tf_keras

import tf_utils

GLOBAL_BATCH = 8
FEATURES = 5
LEARNING_RATE = 0.05


def global_batch():
  """Inputs, targets and a per-row token mask; rows count unequally on purpose,
  so only the global-token-count normalisation gives equal updates."""
  rng = np.random.RandomState(0)
  inputs = rng.randn(GLOBAL_BATCH, FEATURES).astype(np.float32)
  targets = rng.randn(GLOBAL_BATCH, 3).astype(np.float32)
  mask = (rng.rand(GLOBAL_BATCH, 3) > 0.4).astype(np.float32)
  mask[:, 0] = 1.0
  return {"inputs": inputs, "targets": targets, "mask": mask}


def build_model():
  model = tf_keras.Sequential([
      tf_keras.layers.Dense(8, activation="tanh", input_shape=(FEATURES,)),
      tf_keras.layers.Dense(3),
  ])
  rng = np.random.RandomState(1)
  model.set_weights([rng.randn(*w.shape).astype(np.float32) * 0.5
                     for w in model.get_weights()])
  return model


def train_one_step(strategy, batch_split=1):
  """Builds the model under `strategy`, runs one step, returns the weights."""
  with strategy.scope():
    model = build_model()
    optimizer = tf_utils.make_optimizer("adam", LEARNING_RATE)

  def loss_fn(batch):
    predictions = model(batch["inputs"])
    squared_error = tf.square(predictions - batch["targets"]) * batch["mask"]
    return tf.reduce_sum(squared_error), tf.reduce_sum(batch["mask"])

  data = global_batch()

  def worker_slice(input_context):
    # Called once per worker; yields one per-replica batch per local replica,
    # so replica r of the whole job takes rows [r * n, (r + 1) * n).
    per_replica = input_context.get_per_replica_batch_size(GLOBAL_BATCH)
    per_worker = GLOBAL_BATCH // input_context.num_input_pipelines
    start = input_context.input_pipeline_id * per_worker
    rows = {k: v[start:start + per_worker] for k, v in data.items()}
    return tf.data.Dataset.from_tensor_slices(rows).batch(per_replica)

  dataset = strategy.distribute_datasets_from_function(worker_slice)
  train_step = tf_utils.make_train_step(
      strategy, loss_fn, model.trainable_variables, optimizer,
      batch_split=batch_split, clip_norm=10.0)
  metrics = train_step(next(iter(dataset)))
  return [w for w in model.get_weights()], float(metrics["loss"])


def free_ports(count):
  """`count` TCP ports on 127.0.0.1 that were free a moment ago."""
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports
