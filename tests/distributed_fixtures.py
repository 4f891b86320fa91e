"""A small Keras regression model, a fixed global batch, free local ports,
local multi-worker clusters and a one-step multi-worker run, shared by the
distribution tests and the multi-worker worker processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import tensorflow as tf
import tf_keras

import tf_utils

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
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


def train_one_step(strategy, batch_split=1, jit_compile=False):
  """Builds the model under `strategy`, runs one step, returns the weights
  and the loss; `jit_compile`: the step compiled with XLA."""
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
      batch_split=batch_split, clip_norm=10.0, jit_compile=jit_compile)
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


def run_workers(command, num_workers=2, timeout=240):
  """Runs `command` once per worker of a local MultiWorkerMirroredStrategy
  cluster on 127.0.0.1 (each process its TF_CONFIG); asserts that every
  worker exits 0."""
  workers = [f"127.0.0.1:{port}" for port in free_ports(num_workers)]
  processes = []
  for index in range(num_workers):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]),
               TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
                   {"cluster": {"worker": workers},
                    "task": {"type": "worker", "index": index}}))
    processes.append(subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  logs = [p.communicate(timeout=timeout)[0] for p in processes]
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log[-3000:]


def multi_worker_weights(output_dir, num_workers=2, jit_compile=False):
  """Runs `train_one_step` under MultiWorkerMirroredStrategy in `num_workers`
  local processes (multiworker_train_step.py); the chief's weights and loss."""
  output = os.path.join(output_dir, "chief_weights.npz")
  run_workers([sys.executable, os.path.join(TESTS, "multiworker_train_step.py"),
               output] + (["--jit_compile"] if jit_compile else []),
              num_workers)
  saved = np.load(output)
  weights = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)]
  return weights, float(saved["loss"])
