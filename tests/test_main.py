"""main.py: training, the ablation, distribution equivalence, resume, bad inputs.

On a tiny GPT-2 and a tiny learnable cache. Several runs share one process
(`tests/main_driver.py`, which keeps main's flags out of pytest's process);
the resume and multi-worker tests run main.py itself.
"""

import collections
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
import tensorflow as tf
import transformers

import cache_fixtures
import distributed_fixtures
import modeling_tf_gpt2_model_par as modeling
import neighbour_cache
import task_specific
import tf_utils
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return cache_fixtures.write_training_world(tmp_path_factory.mktemp("world"))


def common_flags(world, output_dir, run_name, **overrides):
  values = {
      "model_key": world["model"], "tokenizer": world["tokenizer"],
      "cache_dir": world["cache"], "output_dir": str(output_dir),
      "run_name": run_name, "batch_size": 4, "num_retrievals": 2,
      "max_question_tokens": 8, "max_answer_tokens": 8,
      "max_context_tokens": 12, "learning_rate": 1e-3, "max_steps": 2,
      "batches_between_evals": 0, "log_samples": 0, "log_every_steps": 1,
      "shuffle_buffer_size": 16,
  }
  values.update(overrides)
  return [f"--{name}={value}" for name, value in values.items()]


def run_cases(tmp_path, cases, with_log=False):
  """Runs main with each argument list in one driver process; the results
  (and, `with_log`, the process's stderr)."""
  cases_path, results_path = tmp_path / "cases.json", tmp_path / "results.json"
  cases_path.write_text(json.dumps(cases))
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "main_driver.py"),
       str(cases_path), str(results_path)],
      env=_environment(), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads(results_path.read_text())
  return (results, result.stderr) if with_log else results


def final_weights(run_dir):
  with open(os.path.join(run_dir, "final_model", "model.safetensors"),
            "rb") as f:
    return safetensors.numpy.load(f.read())


def read_metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_training_lowers_validation_loss_and_evaluate_writes_the_table(
    world, tmp_path):
  """Acceptance 1."""
  argv = common_flags(world, tmp_path, "learn", max_steps=60,
                      batches_between_evals=20, learning_rate=3e-3,
                      checkpoint_every_steps=30, log_samples=2)
  assert run_cases(tmp_path, [["--task=train"] + argv,
                              ["--task=evaluate"] + argv]) == [{"ok": True}] * 2
  run_dir = tmp_path / "learn"
  evals = [m for m in read_metrics(run_dir) if "eval_answer_loss" in m]
  assert [m["step"] for m in evals] == [20, 40, 60]
  vocabulary = transformers.GPT2Config.from_json_file(
      os.path.join(world["model"], "config.json")).vocab_size
  # A fresh model is near chance (log V); training must get well below it.
  assert evals[-1]["eval_answer_loss"] < evals[0]["eval_answer_loss"]
  assert evals[-1]["eval_answer_loss"] < math.log(vocabulary) - 1.0
  for name in ("config.json", "checkpoints/checkpoint", "train", "eval",
               "final_model/config.json", "done.json"):
    assert (run_dir / name).exists(), name
  config = json.loads((run_dir / "config.json").read_text())
  assert config["flags"]["approach_type"] == "cached_pretok"
  assert config["flags"]["distribute_mode"] == "OneDeviceStrategy"

  table = json.loads((run_dir / "ablation_validation.json").read_text())
  assert set(table) == {"real", "random", "none"}
  tokens = {row["answer_tokens"] for row in table.values()}
  assert len(tokens) == 1 and tokens.pop() > 0
  for row in table.values():
    assert math.isfinite(row["answer_ppl"]) and row["answer_ppl"] > 1
    assert row["checkpoint_step"] == 60
  # The real-context figure is the periodic evaluation's at the same step.
  assert table["real"]["answer_loss"] == pytest.approx(
      evals[-1]["eval_answer_loss"], rel=1e-5)


@pytest.mark.slow
def test_one_device_mirrored_micro_batches_and_model_split_agree(
    world, tmp_path):
  """Acceptance 2: the same global batches give the same weights (1e-5)."""
  variants = {
      "one_device": [],
      "mirrored": ["--distribute_mode=MirroredStrategy",
                   "--devices=/device:CPU:0,/device:CPU:1"],
      "batch_split": ["--batch_split=2"],
      "model_split": ["--model_devices=/device:CPU:2,/device:CPU:3"],
  }
  results = run_cases(tmp_path, [
      ["--task=train"] + common_flags(world, tmp_path, name, max_steps=3) +
      extra for name, extra in variants.items()])
  assert results == [{"ok": True}] * len(variants)
  weights = {name: final_weights(tmp_path / name) for name in variants}
  start = {name: variable.numpy() for name, variable in
           task_specific.load_model(world["model"]).named_weights().items()}
  reference = weights.pop("one_device")
  # The steps moved the weights (a comparison of untrained weights proves
  # nothing); final_model holds Hugging Face names, Conv1D biases as [1, n].
  moved = [np.abs(reference[modeling.tf_weight_name(name)].reshape(
      value.shape) - value).max() for name, value in start.items()]
  assert max(moved) > 1e-4
  for name, got in weights.items():
    for key, value in reference.items():
      np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=name)


def _command(world, output_dir, run_name, **overrides):
  return [sys.executable, os.path.join(ROOT, "main.py"), "--task=train"] + (
      common_flags(world, output_dir, run_name, **overrides))


def _environment():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(tmp_path):
  """Acceptance 3 (and 4: the resumed run sees the same contexts)."""
  world = cache_fixtures.write_training_world(tmp_path / "world", dropout=0.1)
  overrides = dict(max_steps=150, checkpoint_every_steps=10,
                   checkpoint_every_minutes=1000, log_every_steps=10,
                   approach_type="random_context", shuffle_buffer_size=8)
  env = _environment()
  subprocess.run(_command(world, tmp_path, "straight", **overrides), env=env,
                 check=True, capture_output=True)
  command = _command(world, tmp_path, "killed", **overrides)
  process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  index = tmp_path / "killed" / "checkpoints" / "checkpoint"
  deadline = time.time() + 300
  while not index.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (tmp_path / "killed" / "final_model").exists()
  subprocess.run(command, env=env, check=True, capture_output=True)
  straight = final_weights(tmp_path / "straight")
  resumed = final_weights(tmp_path / "killed")
  for key, value in straight.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
  # The metrics of the resumed run read as one run, the same as the other's.
  def losses(run_name):
    return [(m["step"], m["loss"], m["grad_norm"])
            for m in read_metrics(tmp_path / run_name)]
  assert [step for step, _, _ in losses("killed")] == list(range(10, 151, 10))
  assert losses("killed") == losses("straight")


def bad_input_cases(world, tmp_path):
  other_tokenizer = str(tmp_path / "other_tokenizer")
  cache_fixtures.write_tokenizer(other_tokenizer, vocab_size=280)
  bigger_model = str(tmp_path / "bigger_model")
  utils.makedirs(bigger_model)
  config = transformers.GPT2Config.from_json_file(
      os.path.join(world["model"], "config.json"))
  config.n_embd = 64
  utils.atomic_write_text(os.path.join(bigger_model, "config.json"),
                          config.to_json_string())
  empty_dir = str(tmp_path / "empty")
  utils.makedirs(empty_dir)
  return {
      "differs from the tokenizer": dict(tokenizer=other_tokenizer),
      "neighbours asked for": dict(num_retrievals=5),
      "retrieval_temperature=0.0": dict(retrieval_temperature=0.0),
      "retrieval_temperature=-1.0": dict(retrieval_temperature=-1.0),
      "not divisible by replicas": dict(batch_size=5, batch_split=2),
      "exceed the sequence length 64": dict(max_answer_tokens=60),
      "exceeds the model's n_positions": dict(sequence_length=65),
      "another model config": dict(run_name="resumable",
                                   model_key=bigger_model),
      "no manifest.json": dict(cache_dir=empty_dir),
  }


def test_bad_inputs_and_a_nan_loss_are_one_line_errors(world, tmp_path):
  """Acceptance 8: each bad input is a UserError naming it; and a loss that
  turns NaN stops the run, leaving the last good checkpoint."""
  bad = bad_input_cases(world, tmp_path)
  cases = [["--task=train"] + common_flags(world, tmp_path, "resumable",
                                           max_steps=1)]
  cases += [["--task=train"] + common_flags(
      world, tmp_path, **{"run_name": "bad", **overrides})
            for overrides in bad.values()]
  # The first step at the huge learning rate is finite but wrecks the
  # weights; the next loss is not finite, and the run stops before saving.
  cases += [
      ["--task=train"] + common_flags(world, tmp_path, "nan", max_steps=4,
                                      checkpoint_every_steps=2),
      ["--task=train"] + common_flags(world, tmp_path, "nan", max_steps=8,
                                      checkpoint_every_steps=2,
                                      learning_rate=1e30,
                                      allow_changed_settings=True)]
  results = run_cases(tmp_path, cases)
  assert results[0] == {"ok": True}
  for message, result in zip(bad, results[1:-2]):
    assert message in result.get("error", ""), (message, result)
    assert "\n" not in result["error"]
  assert results[-2] == {"ok": True}
  assert re.match(r"step 6: the loss is (nan|inf)", results[-1]["error"]), (
      results[-1])
  assert "ckpt-4" in results[-1]["error"]
  checkpoints = tmp_path / "nan" / "checkpoints"
  assert sorted(p.name for p in checkpoints.glob("ckpt-*.index")) == [
      "ckpt-2.index", "ckpt-4.index"]


def test_bad_input_exits_2_with_one_line(world, tmp_path):
  """Acceptance 8, as a user sees it: one `error:` line, exit code 2."""
  result = subprocess.run(
      _command(world, tmp_path, "bad", num_retrievals=5), env=_environment(),
      capture_output=True, text=True)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1 and "neighbours asked for" in errors[0], (
      result.stderr[-2000:])
  assert "Traceback" not in result.stderr


def _start_workers(command, workers, **streams):
  """One process of `command` per worker address, each with its TF_CONFIG."""
  processes = []
  for index in range(len(workers)):
    env = _environment()
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                   "task": {"type": "worker", "index": index}})
    processes.append(subprocess.Popen(command, env=env, text=True, **streams))
  return processes


@pytest.mark.slow
@pytest.mark.multiworker
def test_two_worker_multiworker_mirrored_run(world, tmp_path):
  """Acceptance 6: two local worker processes train and evaluate end to end."""
  workers = [f"127.0.0.1:{port}"
             for port in distributed_fixtures.free_ports(2)]
  command = _command(world, tmp_path, "two_workers", max_steps=4,
                     batches_between_evals=4, checkpoint_every_steps=2,
                     distribute_mode="MultiWorkerMirroredStrategy")
  processes = _start_workers(command, workers, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  run_dir = tmp_path / "two_workers"
  metrics = read_metrics(run_dir)
  assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
  evals = [m for m in metrics if "eval_answer_loss" in m]
  assert len(evals) == 1 and evals[0]["eval_answer_tokens"] > 0
  assert (run_dir / "final_model" / "model.safetensors").exists()
  assert (run_dir / "checkpoints" / "worker-1" / "checkpoint").exists()


# ---------------------------------------------------------------------------
# Issue 13: training and evaluation never lose work and never lie
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_with_test_split(world, tmp_path_factory):
  """The world, its cache with a test split that has no answers (as KILT's),
  and a model config whose n_embd is a string."""
  cache = tmp_path_factory.mktemp("cache_with_test")
  shutil.copytree(world["cache"], cache, dirs_exist_ok=True)
  manifest = json.loads((cache / "manifest.json").read_text())
  records = cache_fixtures.random_records(
      6, num_neighbours=manifest["num_neighbours"],
      vocab_size=manifest["vocab_size"], seed=2, num_answers=0,
      id_prefix="t")
  shard = neighbour_cache.shard_name("test", 0, 1)
  tf_utils.write_tfrecords(str(cache / shard), [
      neighbour_cache.encode_example(**record) for record in records])
  manifest["splits"]["test"] = {"shards": [shard], "num_records": 6}
  (cache / "manifest.json").write_text(json.dumps(manifest))
  model = tmp_path_factory.mktemp("string_n_embd")
  config = json.loads(open(os.path.join(world["model"], "config.json")).read())
  (model / "config.json").write_text(json.dumps({**config, "n_embd": "32"}))
  return {**world, "cache": str(cache), "string_n_embd_model": str(model)}


def test_bad_inputs_are_refused_before_any_write(world_with_test_split,
                                                 tmp_path):
  """Issue 13, items 3, 5, 6: tracebacks, late failures and a run directory
  made by a failing job become one-line errors before anything is written."""
  world = world_with_test_split
  cases = {
      "log_every_0": (dict(log_every_steps=0),
                      "--log_every_steps=0: expected >= 1"),
      "checkpoint_every_0": (dict(checkpoint_every_steps=0),
                             "--checkpoint_every_steps=0: expected >= 1"),
      "keep_0": (dict(keep_checkpoints=0),
                 "--keep_checkpoints=0: expected >= 1"),
      "negative_lr": (dict(learning_rate=-0.001),
                      "--learning_rate=-0.001: expected a number > 0"),
      "dev_split": (dict(eval_split="dev", batches_between_evals=1),
                    "no split 'dev' in the cache"),
      "periodic_test": (dict(eval_split="test", batches_between_evals=1),
                        "--eval_split=test: the split has no answers"),
      "string_n_embd": (dict(model_key=world["string_n_embd_model"]),
                        "config.json: n_embd is '32', expected int"),
      "evaluate_missing": (dict(task="evaluate"), "no run here"),
  }
  results = run_cases(tmp_path, [
      ["--task=train"] + common_flags(world, tmp_path, name, **overrides)
      for name, (overrides, _) in cases.items()])
  for (name, (_, message)), result in zip(cases.items(), results):
    assert message in result.get("error", ""), (name, result)
    assert "\n" not in result["error"]
    assert not (tmp_path / name).exists(), name


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


@pytest.fixture(scope="module")
def resumed_runs(world_with_test_split, tmp_path_factory):
  """Trains small runs, damages them as users and crashes do, resumes them
  (two driver processes, about 90 s: the tests using it are marked slow).

  Returns {"dir", "first": {run: result}, "then": {case: result}, "log",
  "before": what the runs held before the second round}.
  """
  world = world_with_test_split
  root = tmp_path_factory.mktemp("resumed")

  def train(run, **overrides):
    return ["--task=train"] + common_flags(world, root, run, **overrides)

  first = {
      "settings": train("settings", checkpoint_every_steps=1),
      "changed": train("changed", checkpoint_every_steps=1),
      "pointer_deleted": train("pointer_deleted", max_steps=4,
                               checkpoint_every_steps=2),
      "pointer_garbage": train("pointer_garbage", max_steps=4,
                               checkpoint_every_steps=2),
      "truncated": train("truncated", checkpoint_every_steps=1),
      "metrics": train("metrics"),
      "events": train("events", max_steps=3, checkpoint_every_steps=2),
      "nan": train("nan", checkpoint_every_steps=1),
  }
  first_results = run_cases(root, list(first.values()))

  before = {name: read_metrics(root / name)
            for name in ("pointer_deleted", "pointer_garbage")}
  before["settings_config"] = (root / "settings" / "config.json").read_text()
  os.remove(root / "pointer_deleted" / "checkpoints" / "checkpoint")
  (root / "pointer_garbage" / "checkpoints" / "checkpoint").write_text(
      "garbage {")
  _truncate(root / "truncated" / "checkpoints" / "ckpt-2.data-00000-of-00001",
            100)
  metrics = (root / "metrics" / "metrics.jsonl").read_text().splitlines()
  (root / "metrics" / "metrics.jsonl").write_text(
      metrics[0] + "\n{not json\n")
  # As a kill after step 3 was logged but before ckpt-3 was complete.
  for path in (root / "events" / "checkpoints").glob("ckpt-3.*"):
    os.remove(path)
  os.remove(root / "events" / "checkpoints" / "checkpoint")
  os.remove(root / "events" / "done.json")
  shutil.rmtree(root / "events" / "final_model")
  (root / "stale").mkdir()
  stale_pid = _dead_pid()
  (root / "stale" / "lock").write_text(json.dumps(
      {"pid": stale_pid, "host": socket.gethostname(),
       "started": "2020-01-01T00:00:00+00:00", "command": "main.py"}))
  before["stale_pid"] = stale_pid

  then = {
      "refused_change": train("settings", checkpoint_every_steps=1,
                              learning_rate=2e-3, max_steps=3),
      "allowed_change": train("changed", checkpoint_every_steps=1,
                              learning_rate=2e-3, max_steps=3,
                              allow_changed_settings=True),
      "pointer_deleted": train("pointer_deleted", max_steps=6,
                               checkpoint_every_steps=2),
      "pointer_garbage": train("pointer_garbage", max_steps=6,
                               checkpoint_every_steps=2),
      "truncated": train("truncated", max_steps=3),
      "metrics": train("metrics", max_steps=3),
      "events": train("events", max_steps=3, checkpoint_every_steps=2),
      "nan": train("nan", max_steps=5, checkpoint_every_steps=1,
                   learning_rate=1e30, allow_changed_settings=True),
      "nan_evaluate": ["--task=evaluate"] + common_flags(world, root, "nan"),
      "nan_from_start": train("nan_from_start", max_steps=3,
                              checkpoint_every_steps=1, learning_rate=1e30),
      "evaluate_test": ["--task=evaluate"] + common_flags(
          world, root, "settings", eval_split="test"),
      "exp_overflow": train("exp_overflow", max_steps=3, learning_rate=30,
                            clip_norm=0),
      "float32_overflow": train("float32_overflow", max_steps=3,
                                learning_rate=3, clip_norm=0),
      "stale": train("stale", max_steps=1),
  }
  then_results, log = run_cases(root, list(then.values()), with_log=True)
  return {"dir": root, "first": dict(zip(first, first_results)),
          "then": dict(zip(then, then_results)), "log": log,
          "before": before}


@pytest.mark.slow
def test_first_round_trains(resumed_runs):
  assert all(result == {"ok": True}
             for result in resumed_runs["first"].values()), (
                 resumed_runs["first"])


def _checkpoint_steps(run_dir):
  return sorted(int(path.name[len("ckpt-"):-len(".index")])
                for path in (run_dir / "checkpoints").glob("ckpt-*.index"))


@pytest.mark.slow
def test_nan_guard_saves_no_ruined_state_and_names_a_good_checkpoint(
    resumed_runs):
  """Issue 13, item 1 and acceptance 4: at a huge learning rate the loss of
  step 3 is finite (computed before its update) but the update ruins the
  weights; no checkpoint of them is written, the message names ckpt-2, and
  evaluating ckpt-2 gives finite numbers."""
  root, then = resumed_runs["dir"], resumed_runs["then"]
  error = then["nan"]["error"]
  assert re.match(r"step 3: .*(nan|inf|NaN).*stopping without saving\. "
                  r"The last good checkpoint is .*ckpt-2$", error), error
  assert _checkpoint_steps(root / "nan") == [1, 2]
  reader = tf.train.load_checkpoint(str(root / "nan" / "checkpoints" /
                                        "ckpt-2"))
  for name, dtype in reader.get_variable_to_dtype_map().items():
    if dtype.is_floating:
      value = reader.get_tensor(name)
      assert np.isfinite(value).all() and np.abs(value).max() < 1e3, name
  assert then["nan_evaluate"] == {"ok": True}
  table = json.loads((root / "nan" / "ablation_validation.json").read_text())
  for row in table.values():
    assert row["checkpoint_step"] == 2
    assert math.isfinite(row["answer_ppl"]) and row["answer_tokens"] > 0
  # From the start: the first update already ruins the weights.
  assert re.match(r"step 1: .*The last good checkpoint is none",
                  then["nan_from_start"]["error"]), then["nan_from_start"]
  assert not (root / "nan_from_start" / "checkpoints").exists() or (
      _checkpoint_steps(root / "nan_from_start") == [])


@pytest.mark.slow
def test_a_huge_finite_loss_is_an_infinite_perplexity(resumed_runs):
  """Issue 13, item 1: exp(loss) overflowed into an OverflowError traceback
  (and a perplexity beyond float32 broke the TensorBoard scalar)."""
  root, then = resumed_runs["dir"], resumed_runs["then"]
  assert then["exp_overflow"] == {"ok": True}
  assert then["float32_overflow"] == {"ok": True}
  records = read_metrics(root / "exp_overflow")
  overflowing = [r for r in records if r["loss"] > 710]
  assert overflowing and all(r["answer_ppl"] == math.inf
                             for r in overflowing)
  assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_a_damaged_pointer_resumes_and_a_truncated_checkpoint_is_refused(
    resumed_runs):
  """Issue 13, item 2: a deleted or corrupt checkpoints/checkpoint restarted
  from step 0 over the run; now the run resumes from the latest complete
  checkpoint. A truncated .data file is one line (was an IndexError)."""
  root, then, before = (resumed_runs["dir"], resumed_runs["then"],
                        resumed_runs["before"])
  for run in ("pointer_deleted", "pointer_garbage"):
    assert then[run] == {"ok": True}, then[run]
    metrics = read_metrics(root / run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[:4] == before[run]
    assert _checkpoint_steps(root / run)[-1] == 6
  assert "ckpt-2: unreadable" in then["truncated"]["error"]
  assert "truncated or damaged" in then["truncated"]["error"]


@pytest.mark.slow
def test_a_resumed_run_refuses_or_records_changed_settings(resumed_runs):
  """Issue 13, item 6: resuming with another learning rate was accepted
  while config.json kept the old one."""
  root, then = resumed_runs["dir"], resumed_runs["then"]
  error = then["refused_change"]["error"]
  assert ("the run was made with --learning_rate=0.001, now "
          "--learning_rate=0.002" in error), error
  assert "--allow_changed_settings" in error
  assert (root / "settings" / "config.json").read_text() == (
      resumed_runs["before"]["settings_config"])
  assert then["allowed_change"] == {"ok": True}
  config = json.loads((root / "changed" / "config.json").read_text())
  assert config["flags"]["learning_rate"] == 0.002
  assert config["changes"] == [{"step": 2, "flags": {
      "learning_rate": {"was": 0.001, "now": 0.002},
      "max_steps": {"was": 2, "now": 3}}}]
  # The learning rate of step 1 is the peak (it was 0 without a warmup).
  assert read_metrics(root / "settings")[0]["learning_rate"] == (
      pytest.approx(1e-3))


@pytest.mark.slow
def test_a_corrupt_metrics_file_is_one_line(resumed_runs):
  """Issue 13, item 5."""
  error = resumed_runs["then"]["metrics"]["error"]
  assert "metrics.jsonl: line 2 is not a JSON record" in error, error


@pytest.mark.slow
def test_events_after_the_restored_step_are_not_logged_twice(resumed_runs):
  """Issue 13, item 6: TensorBoard showed the steps between the restored
  checkpoint and a kill twice after the resume."""
  root = resumed_runs["dir"]
  assert resumed_runs["then"]["events"] == {"ok": True}
  counts = collections.Counter()
  for path in (root / "events").glob("*/events.out.*"):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        counts[(value.tag, event.step)] += 1
  assert counts[("loss", 3)] == 1 and counts[("loss", 1)] == 1
  assert set(counts.values()) == {1}, counts


@pytest.mark.slow
def test_evaluating_a_split_without_answers_is_refused(resumed_runs):
  """Issue 13, item 3: the test split (no answers) gave perplexity 1.0."""
  error = resumed_runs["then"]["evaluate_test"]["error"]
  assert "--eval_split=test: the split has no answers" in error, error
  assert not (resumed_runs["dir"] / "settings" /
              "ablation_test.json").exists()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_log_line(resumed_runs):
  """Issue 13, item 4: a lock left by a dead process of this host."""
  assert resumed_runs["then"]["stale"] == {"ok": True}
  pid = resumed_runs["before"]["stale_pid"]
  assert f"taking over the lock left by pid {pid}" in resumed_runs["log"]
  assert not (resumed_runs["dir"] / "stale" / "lock").exists()


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
  lock = str(tmp_path / "lock")
  with utils.exclusive_lock(lock, "run directory x"):
    holder = json.loads(open(lock).read())
    assert holder["pid"] == os.getpid()
    with pytest.raises(utils.UserError) as error:
      with utils.exclusive_lock(lock, "run directory x"):
        pass
    message = str(error.value)
    assert message.startswith("run directory x: in use by another job (pid "
                              f"{os.getpid()} on host {socket.gethostname()}, "
                              "started ")
  assert not os.path.exists(lock)
  with utils.exclusive_lock(lock, "run directory x"):
    pass


@pytest.mark.slow
def test_a_second_job_on_a_running_run_fails_at_once(world, tmp_path):
  """Issue 13, item 4 and acceptance 3: two jobs on one run directory both
  exited 0 and one was silently lost. Now the second fails with one line
  naming the holder, no later than a job refused for a bad flag (it stops
  before loading anything), and the first finishes unharmed."""
  env = _environment()
  overrides = dict(max_steps=1000, log_every_steps=100,
                   checkpoint_every_steps=500)
  first = subprocess.Popen(_command(world, tmp_path, "shared", **overrides),
                           env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  lock = tmp_path / "shared" / "lock"
  deadline = time.time() + 120
  while not (lock.exists() and lock.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  commands = {"second": _command(world, tmp_path, "shared", **overrides),
              "bad_flag": _command(world, tmp_path, "other",
                                   **{**overrides, "log_every_steps": 0})}
  started = time.time()
  others = {name: subprocess.Popen(command, env=env,
                                   stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
            for name, command in commands.items()}
  seconds, stderr = {}, {}
  for name, process in others.items():
    stderr[name] = process.communicate(timeout=120)[1]
    seconds[name] = time.time() - started
  assert first.poll() is None, "the first job ended before the second began"
  assert others["second"].returncode == 2, stderr["second"][-2000:]
  errors = [line for line in stderr["second"].splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in stderr["second"]
  assert (f"in use by another job (pid {first.pid} on host "
          f"{socket.gethostname()}, started " in errors[0]), errors
  assert seconds["second"] < seconds["bad_flag"] + 1.0, seconds
  first_stderr = first.communicate(timeout=600)[1]
  assert first.returncode == 0, first_stderr[-3000:]
  assert [m["step"] for m in read_metrics(tmp_path / "shared")] == list(
      range(100, 1001, 100))
  done = json.loads((tmp_path / "shared" / "done.json").read_text())
  assert done["step"] == 1000
  assert not lock.exists()


@pytest.mark.multiworker
def test_a_missing_worker_stops_main_within_the_timeout(world, tmp_path):
  """Issue 13, item 7 and acceptance 5, through main.py."""
  workers = [f"127.0.0.1:{port}"
             for port in distributed_fixtures.free_ports(2)]
  env = _environment()
  env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                 "task": {"type": "worker", "index": 0}})
  started = time.time()
  result = subprocess.run(
      _command(world, tmp_path, "alone",
               distribute_mode="MultiWorkerMirroredStrategy",
               cluster_timeout_seconds=3),
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr
  assert f"not answering: worker 1 ({workers[1]})" in errors[0]
  assert time.time() - started < 60


@pytest.mark.slow
@pytest.mark.multiworker
def test_a_worker_that_dies_stops_the_others_with_one_line(world, tmp_path):
  """Issue 13, item 7 and acceptance 5: a peer that died mid-run gave an
  UnavailableError traceback."""
  workers = [f"127.0.0.1:{port}"
             for port in distributed_fixtures.free_ports(2)]
  command = _command(world, tmp_path, "dies", max_steps=100000,
                     log_every_steps=10, checkpoint_every_steps=100000,
                     distribute_mode="MultiWorkerMirroredStrategy")
  processes = _start_workers(command, workers, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
  metrics = tmp_path / "dies" / "metrics.jsonl"
  deadline = time.time() + 300
  while not metrics.exists() and time.time() < deadline:
    time.sleep(0.1)
  assert processes[0].poll() is None, processes[0].communicate()[1][-3000:]
  processes[1].send_signal(signal.SIGKILL)
  processes[1].wait()
  killed_at = time.time()
  stderr = processes[0].communicate(timeout=300)[1]
  assert processes[0].returncode == 2, stderr[-3000:]
  assert time.time() - killed_at < 180
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  assert "worker 1 of the multi-worker job stopped answering" in errors[0]
