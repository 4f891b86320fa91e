"""The train step compiled with XLA under every strategy (issue 14, acceptance
1): the same update as without XLA, for any number of replicas, workers and
micro-batches; and main.py's --experimental_compile with two replicas."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cache_fixtures
import distributed_fixtures
import tf_utils
import utils

# XLA compiles in another order than TensorFlow's kernels sum.
TOLERANCE = 1e-5


def _strategy(kind):
  if kind == "one_device":
    return tf_utils.make_strategy("OneDeviceStrategy")
  return tf_utils.make_strategy("MirroredStrategy",
                                devices=["/cpu:0", "/cpu:1"])


def _distributed_global_batch(strategy):
  return next(iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices(
          distributed_fixtures.global_batch()).batch(
              distributed_fixtures.GLOBAL_BATCH))))


def _assert_same_update(got, want, initial, name):
  (got_weights, got_loss), (want_weights, want_loss) = got, want
  # The step did something: otherwise equality would prove nothing.
  assert max(np.abs(w - i).max()
             for w, i in zip(want_weights, initial)) > 1e-2, name
  assert got_loss == pytest.approx(want_loss, abs=TOLERANCE), name
  for got_weight, want_weight in zip(got_weights, want_weights):
    np.testing.assert_allclose(got_weight, want_weight, atol=TOLERANCE,
                               err_msg=name)


@pytest.mark.parametrize("kind,batch_split", [
    ("one_device", 1), ("one_device", 2), ("mirrored_2_cpus", 1),
    ("mirrored_2_cpus", 2)])
@pytest.mark.slow
def test_xla_step_gives_the_update_of_the_plain_step(kind, batch_split):
  plain = distributed_fixtures.train_one_step(_strategy(kind),
                                              batch_split=batch_split)
  compiled = distributed_fixtures.train_one_step(
      _strategy(kind), batch_split=batch_split, jit_compile=True)
  _assert_same_update(compiled, plain,
                      distributed_fixtures.build_model().get_weights(),
                      f"{kind}, batch_split={batch_split}")


def test_xla_step_under_mirrored_compiles_the_replica_computation():
  """An op XLA cannot compile in the loss fails the step only when the
  replica's forward and backward passes are compiled: proof that
  jit_compile=True reaches them under two replicas."""
  strategy = _strategy("mirrored_2_cpus")
  with strategy.scope():
    model = distributed_fixtures.build_model()
    optimizer = tf_utils.make_optimizer("adam",
                                        distributed_fixtures.LEARNING_RATE)

  def loss_fn(batch):
    # A string round trip: no XLA kernel exists for string ops.
    mask = tf.strings.to_number(tf.strings.as_string(batch["mask"]))
    error = tf.square(model(batch["inputs"]) - batch["targets"]) * mask
    return tf.reduce_sum(error), tf.reduce_sum(mask)

  batch = _distributed_global_batch(strategy)
  plain = tf_utils.make_train_step(strategy, loss_fn,
                                   model.trainable_variables, optimizer)
  assert float(plain(batch)["num_tokens"]) > 0
  compiled = tf_utils.make_train_step(strategy, loss_fn,
                                      model.trainable_variables, optimizer,
                                      jit_compile=True)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="unsupported operations when trying to compile"):
    compiled(batch)


def test_compiled_replica_fn_gives_the_sums_of_the_plain_one():
  """What the eval step runs: a forward pass on each of two replicas,
  compiled with XLA, the sums reduced outside. (Handing the tf.function
  itself to `strategy.run` fails here: one computation for both replicas.)"""
  strategy = _strategy("mirrored_2_cpus")
  with strategy.scope():
    model = distributed_fixtures.build_model()
  batch = _distributed_global_batch(strategy)

  def loss_sum(replica_batch):
    error = tf.square(model(replica_batch["inputs"]) - replica_batch["targets"])
    return (tf.reduce_sum(error * replica_batch["mask"]),
            tf.reduce_sum(replica_batch["mask"]))

  def summed(replica_fn):
    @tf.function
    def step(distributed_batch):
      return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
              for value in strategy.run(replica_fn, args=(distributed_batch,))]
    return [float(value) for value in step(batch)]

  plain = summed(loss_sum)
  compiled = summed(tf_utils.compile_replica_fn(loss_sum, jit_compile=True))
  assert compiled[1] == plain[1] > 0
  assert compiled[0] == pytest.approx(plain[0], abs=TOLERANCE)


def test_xla_step_refuses_variables_spread_over_devices():
  """A model split over devices (--model_devices) cannot compile as one XLA
  computation: one line, not the runtime's cross-device error."""
  variables = []
  for device in ("/cpu:0", "/cpu:1"):
    with tf.device(device):
      variables.append(tf.Variable(1.0))
  optimizer = tf_utils.make_optimizer("adam", 0.1)
  with pytest.raises(utils.UserError) as error:
    tf_utils.make_train_step(
        tf.distribute.get_strategy(),
        lambda batch: (variables[0] * variables[1] * batch, batch), variables,
        optimizer, jit_compile=True)
  message = str(error.value)
  assert "\n" not in message and "2 devices" in message, message
  assert "--model_devices" in message, message


@pytest.mark.multiworker
@pytest.mark.slow
def test_xla_step_of_two_workers_gives_the_update_of_one_device(tmp_path):
  plain = distributed_fixtures.train_one_step(_strategy("one_device"))
  compiled = distributed_fixtures.multi_worker_weights(tmp_path,
                                                       jit_compile=True)
  _assert_same_update(compiled, plain,
                      distributed_fixtures.build_model().get_weights(),
                      "2 workers, XLA")


def _main_py_run(world, output_dir, run_name, **overrides):
  """Trains a run of `world` through main.py in a process of its own (its
  logical devices are fixed per process); its final weights and losses."""
  command = [sys.executable, os.path.join(distributed_fixtures.REPO,
                                          "main.py"), "--task=train"]
  command += cache_fixtures.training_flags(world, output_dir, run_name,
                                           **overrides)
  env = dict(os.environ, PYTHONPATH=distributed_fixtures.REPO,
             TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  run = os.path.join(output_dir, run_name)
  losses = [m["loss"] for m in cache_fixtures.read_metrics(run) if "loss" in m]
  return cache_fixtures.final_weights(run), losses


@pytest.mark.slow
def test_main_experimental_compile_with_two_replicas_trains_to_the_end(
    tmp_path):
  """The issue's reproduction (`--experimental_compile
  --distribute_mode=MirroredStrategy --num_cpu_devices=2`, 8 steps) on a tiny
  world: it runs to the end with the weights of the run without XLA."""
  world = cache_fixtures.write_training_world(tmp_path / "world")
  flags = dict(max_steps=8, distribute_mode="MirroredStrategy",
               num_cpu_devices=2)
  compiled_weights, compiled_losses = _main_py_run(
      world, tmp_path, "xla", experimental_compile=True, **flags)
  plain_weights, plain_losses = _main_py_run(world, tmp_path, "plain",
                                             **flags)
  assert len(compiled_losses) == 8
  np.testing.assert_allclose(compiled_losses, plain_losses, atol=TOLERANCE)
  assert compiled_weights.keys() == plain_weights.keys()
  for name, weight in plain_weights.items():
    np.testing.assert_allclose(compiled_weights[name], weight,
                               atol=TOLERANCE, err_msg=name)
