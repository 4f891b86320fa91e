"""Strategies, the distributed train step, schedules, checkpoints, TFRecords."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import distributed_fixtures
import tf_utils
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def _multi_worker_weights(tmp_path, num_workers=2):
  """Runs one train step in `num_workers` local processes; the chief's weights."""
  workers = [f"127.0.0.1:{port}"
             for port in distributed_fixtures.free_ports(num_workers)]
  output = tmp_path / "chief_weights.npz"
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, TESTS]),
             TF_CPP_MIN_LOG_LEVEL="2")
  processes = []
  for index in range(num_workers):
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                   "task": {"type": "worker", "index": index}})
    processes.append(subprocess.Popen(
        [sys.executable, os.path.join(TESTS, "multiworker_train_step.py"),
         str(output)], env=dict(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  logs = [p.communicate(timeout=240)[0] for p in processes]
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log[-3000:]
  saved = np.load(output)
  weights = [saved[f"arr_{i}"] for i in range(len(saved.files) - 1)]
  return weights, float(saved["loss"])


@pytest.mark.multiworker
def test_one_step_gives_identical_weights_under_every_strategy(tmp_path):
  initial = distributed_fixtures.build_model().get_weights()
  reference, reference_loss = distributed_fixtures.train_one_step(
      tf_utils.make_strategy("OneDeviceStrategy"))
  runs = {
      "mirrored_2_cpus": distributed_fixtures.train_one_step(
          tf_utils.make_strategy("MirroredStrategy",
                                 devices=["/cpu:0", "/cpu:1"])),
      "one_device_batch_split_2": distributed_fixtures.train_one_step(
          tf_utils.make_strategy("OneDeviceStrategy"), batch_split=2),
      "mirrored_4_cpus_batch_split_2": distributed_fixtures.train_one_step(
          tf_utils.make_strategy("MirroredStrategy"), batch_split=2),
      "multi_worker_2_processes": _multi_worker_weights(tmp_path),
  }
  # The step did something: otherwise equality would prove nothing.
  assert max(np.abs(r - i).max() for r, i in zip(reference, initial)) > 1e-2
  for name, (weights, loss) in runs.items():
    assert loss == pytest.approx(reference_loss, rel=1e-6), name
    for got, want in zip(weights, reference):
      np.testing.assert_allclose(got, want, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind,expected", [
    ("constant", {0: 0.0, 10: 1.0, 100: 1.0, 200: 1.0}),
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0, 200: 0.0}),
    ("cosine", {0: 0.0, 10: 1.0, 55: 0.5, 100: 0.0, 200: 0.0}),
])
def test_schedule_values_at_warmup_start_end_and_decay_end(kind, expected):
  schedule = tf_utils.make_learning_rate_schedule(
      kind, 1.0, warmup_steps=10, total_steps=100)
  for step, value in expected.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-6), (kind, step)


def test_schedule_without_warmup_starts_at_peak():
  schedule = tf_utils.make_learning_rate_schedule("cosine", 3e-4,
                                                  total_steps=50)
  assert float(schedule(0)) == pytest.approx(3e-4)


def test_decaying_schedule_needs_total_steps():
  with pytest.raises(utils.UserError, match="needs a number of steps"):
    tf_utils.make_learning_rate_schedule("linear", 1.0, warmup_steps=10)


@pytest.mark.parametrize("name", ["adam", "adamw", "adafactor"])
def test_optimizers_update_variables(name):
  variable = tf.Variable(tf.ones([4, 3]), name="dense/kernel")
  optimizer = tf_utils.make_optimizer(name, 0.1, weight_decay=0.01)
  optimizer.apply_gradients([(tf.ones([4, 3]), variable)])
  assert float(tf.reduce_max(variable)) < 1.0


def test_unknown_optimizer_and_mode_are_refused():
  with pytest.raises(utils.UserError, match="'sgdx' is not one of adam"):
    tf_utils.make_optimizer("sgdx", 0.1)
  with pytest.raises(utils.UserError, match="--distribute_mode='Mirored'"):
    tf_utils.make_strategy("Mirored")


def test_missing_device_is_named():
  with pytest.raises(utils.UserError,
                     match=r"device '/gpu:0' not found; this host has: "
                     r"/device:CPU:0"):
    tf_utils.make_strategy("MirroredStrategy", devices=["/gpu:0"])


def test_tpu_strategy_without_tpu_is_one_line():
  with pytest.raises(utils.UserError) as error:
    tf_utils.make_strategy("TPUStrategy")
  message = str(error.value)
  assert "\n" not in message
  assert "no TPU reachable" in message and "/device:CPU:0" in message


def test_mirrored_defaults_to_all_logical_cpus():
  strategy = tf_utils.make_strategy("MirroredStrategy")
  assert strategy.num_replicas_in_sync == 4


def test_restore_latest_refuses_a_mismatched_checkpoint(tmp_path):
  saved = tf.train.Checkpoint(weight=tf.Variable(tf.zeros([3, 4])))
  tf_utils.make_checkpoint_manager(str(tmp_path), saved).save()
  other = tf.train.Checkpoint(weight=tf.Variable(tf.zeros([5, 4])))
  manager = tf_utils.make_checkpoint_manager(str(tmp_path), other)
  with pytest.raises(utils.UserError, match="does not match the model"):
    tf_utils.restore_latest(manager)
  same = tf.train.Checkpoint(weight=tf.Variable(tf.ones([3, 4])))
  assert tf_utils.restore_latest(
      tf_utils.make_checkpoint_manager(str(tmp_path), same))
  assert float(tf.reduce_sum(same.weight)) == 0.0


def test_restore_latest_without_checkpoint(tmp_path):
  checkpoint = tf.train.Checkpoint(weight=tf.Variable(1.0))
  assert not tf_utils.restore_latest(
      tf_utils.make_checkpoint_manager(str(tmp_path), checkpoint))


def test_write_tfrecords_leaves_only_the_finished_file(tmp_path):
  path = str(tmp_path / "records.tfrecord")
  assert tf_utils.write_tfrecords(path, [b"a", b"bc"]) == 2
  assert os.listdir(tmp_path) == ["records.tfrecord"]
  assert [r.numpy() for r in tf.data.TFRecordDataset(path)] == [b"a", b"bc"]
