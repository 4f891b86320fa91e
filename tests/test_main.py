"""main.py: training, the ablation, distribution equivalence, resume, bad inputs.

On a tiny GPT-2 and a tiny learnable cache. Several runs share one process
(`tests/main_driver.py`, which keeps main's flags out of pytest's process);
the resume and multi-worker tests run main.py itself.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
import transformers

import cache_fixtures
import distributed_fixtures
import modeling_tf_gpt2_model_par as modeling
import task_specific
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


def run_cases(tmp_path, cases):
  """Runs main with each argument list in one driver process; the results."""
  cases_path, results_path = tmp_path / "cases.json", tmp_path / "results.json"
  cases_path.write_text(json.dumps(cases))
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "main_driver.py"),
       str(cases_path), str(results_path)],
      env=_environment(), capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(results_path.read_text())


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
                                      learning_rate=1e30)]
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


@pytest.mark.slow
@pytest.mark.multiworker
def test_two_worker_multiworker_mirrored_run(world, tmp_path):
  """Acceptance 6: two local worker processes train and evaluate end to end."""
  workers = [f"127.0.0.1:{port}"
             for port in distributed_fixtures.free_ports(2)]
  command = _command(world, tmp_path, "two_workers", max_steps=4,
                     batches_between_evals=4, checkpoint_every_steps=2,
                     distribute_mode="MultiWorkerMirroredStrategy")
  processes = []
  for index in range(2):
    env = _environment()
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                   "task": {"type": "worker", "index": index}})
    processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
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
