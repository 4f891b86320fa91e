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


@pytest.mark.multiworker
@pytest.mark.slow
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
      "multi_worker_2_processes": distributed_fixtures.multi_worker_weights(
          str(tmp_path)),
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


def test_constant_schedule_without_warmup_starts_at_peak():
  """Issue 13: the learning rate was 0 at step 1 even with no warmup."""
  schedule = tf_utils.make_learning_rate_schedule("constant", 3e-4)
  assert float(schedule(0)) == pytest.approx(3e-4)
  warming = tf_utils.make_learning_rate_schedule("constant", 1.0,
                                                 warmup_steps=4)
  assert [float(warming(step)) for step in range(5)] == pytest.approx(
      [0.0, 0.25, 0.5, 0.75, 1.0])


def _saved_checkpoints(directory, steps):
  checkpoint = tf.train.Checkpoint(weight=tf.Variable(0.0))
  manager = tf_utils.make_checkpoint_manager(str(directory), checkpoint,
                                             max_to_keep=5)
  for step in steps:
    checkpoint.weight.assign(float(step))
    manager.save(checkpoint_number=step)
  return checkpoint


def _restored_weight(directory):
  checkpoint = tf.train.Checkpoint(weight=tf.Variable(-1.0))
  manager = tf_utils.make_checkpoint_manager(str(directory), checkpoint)
  assert tf_utils.restore_latest(manager)
  return float(checkpoint.weight)


@pytest.mark.parametrize("damage", ["deleted", "garbage", "names_a_lost_one"])
def test_a_damaged_pointer_resumes_from_the_latest_complete_checkpoint(
    tmp_path, damage):
  """Issue 13: a deleted or corrupt `checkpoint` file restarted from step 0."""
  _saved_checkpoints(tmp_path, [2, 4, 6])
  # ckpt-6 lost its data file: incomplete, so ckpt-4 is the latest complete.
  os.remove(tmp_path / "ckpt-6.data-00000-of-00001")
  pointer = tmp_path / "checkpoint"
  if damage == "deleted":
    os.remove(pointer)
  elif damage == "garbage":
    pointer.write_text("not { a checkpoint state")
  else:
    pointer.write_text('model_checkpoint_path: "ckpt-9"\n')
  assert tf_utils.latest_checkpoint(str(tmp_path)) == str(tmp_path / "ckpt-4")
  assert _restored_weight(tmp_path) == 4.0
  # The pointer is repaired, and the manager rotates the recovered ones.
  assert tf.train.get_checkpoint_state(str(tmp_path)).model_checkpoint_path \
      == str(tmp_path / "ckpt-4")
  checkpoint = tf.train.Checkpoint(weight=tf.Variable(8.0))
  manager = tf_utils.make_checkpoint_manager(str(tmp_path), checkpoint,
                                             max_to_keep=2)
  manager.save(checkpoint_number=8)
  # ckpt-2 rotated away; the incomplete ckpt-6 is not the manager's.
  assert sorted(p.name for p in tmp_path.glob("ckpt-*.index")) == [
      "ckpt-4.index", "ckpt-6.index", "ckpt-8.index"]


def test_a_pointer_whose_checkpoints_are_all_gone_is_refused(tmp_path):
  _saved_checkpoints(tmp_path, [2])
  for path in tmp_path.glob("ckpt-*"):
    os.remove(path)
  with pytest.raises(utils.UserError,
                     match="names no checkpoint that is present"):
    tf_utils.latest_checkpoint(str(tmp_path))
  os.remove(tmp_path / "checkpoint")
  assert tf_utils.latest_checkpoint(str(tmp_path)) is None


def test_a_truncated_checkpoint_is_one_line(tmp_path):
  """Issue 13: a truncated .data file gave an IndexError traceback."""
  checkpoint = tf.train.Checkpoint(weight=tf.Variable(tf.ones([1000])))
  tf_utils.make_checkpoint_manager(str(tmp_path), checkpoint).save(
      checkpoint_number=1)
  data = tmp_path / "ckpt-1.data-00000-of-00001"
  data.write_bytes(data.read_bytes()[:100])
  with pytest.raises(utils.UserError, match=r"ckpt-1: unreadable .*truncated"):
    tf_utils.restore(checkpoint, str(tmp_path / "ckpt-1"))


def test_finiteness_check_names_the_ruined_variables():
  good = tf.Variable(tf.ones([3]), name="good")
  ruined = tf.Variable([1.0, float("nan")], name="ruined")
  steps = tf.Variable(3, dtype=tf.int64, name="steps")
  check = tf_utils.make_finiteness_check([good, ruined, steps])
  assert check() == ["ruined:0"]
  ruined.assign([1.0, 2.0])
  assert check() == []


@pytest.mark.multiworker
@pytest.mark.slow
def test_a_missing_worker_is_one_line_within_the_timeout(tmp_path):
  """Issue 13, acceptance 5: a worker whose peer never starts waited
  silently for minutes; now it stops at --cluster_timeout_seconds with one
  line naming the peer that does not answer."""
  workers = [f"127.0.0.1:{port}"
             for port in distributed_fixtures.free_ports(2)]
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2",
             TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                   "task": {"type": "worker", "index": 0}}))
  script = ("import tf_utils; tf_utils.make_strategy("
            "'MultiWorkerMirroredStrategy', cluster_timeout_seconds=3)")
  result = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert f"not answering: worker 1 ({workers[1]})" in errors[0]
  assert "--cluster_timeout_seconds=3" in errors[0]
  assert "Traceback" not in result.stderr


def test_strategy_from_config_and_task_name(monkeypatch):
  """The strategy and run-lock task name every entry script derives from its
  StrategyConfig."""
  strategy = tf_utils.strategy_from_config(tf_utils.StrategyConfig())
  assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
  with pytest.raises(utils.UserError,
                     match="--num_cpu_devices=0: must be >= 1"):
    tf_utils.strategy_from_config(tf_utils.StrategyConfig(num_cpu_devices=0))
  monkeypatch.setenv("TF_CONFIG", json.dumps(
      {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
       "task": {"type": "worker", "index": 1}}))
  assert tf_utils.task_name("MultiWorkerMirroredStrategy") == "worker-1"
  assert tf_utils.task_name("OneDeviceStrategy") is None
  monkeypatch.delenv("TF_CONFIG")
  assert tf_utils.task_name("MultiWorkerMirroredStrategy") is None
