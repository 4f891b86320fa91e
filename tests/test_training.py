"""training.train / evaluation.evaluate in-process: learning, the ablation table,
distribution equivalence, the command line's weights, resume, bad inputs.

On a tiny GPT-2 and a tiny learnable cache (`cache_fixtures.TINY_RUN`). The
pytest process has four logical CPUs (conftest.py), so mirrored and
model-split runs train here too. What only a process of its own shows (the
command line's exit code, kill -9, several workers, two jobs on one run) is
in test_main.py.
"""

import collections
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import transformers

import cache_fixtures
import context_draw
import evaluation
import gpt2_weights
import neighbour_cache
import task_specific
import tf_utils
import training
import utils

# Slow, the whole module (real training runs, resumed and killed):
# not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = "reference"


def outcome(function, config):
  """{"ok": True}, or {"error": the UserError's message}."""
  try:
    function(config)
  except utils.UserError as error:
    return {"error": str(error)}
  return {"ok": True}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return cache_fixtures.write_training_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def reference_runs(world, tmp_path_factory):
  """The output directory of a TINY_RUN named REFERENCE (one device)."""
  output_dir = tmp_path_factory.mktemp("reference")
  training.train(cache_fixtures.training_config(world, output_dir, REFERENCE))
  return output_dir


@pytest.mark.slow
def test_training_lowers_validation_loss_and_evaluate_writes_the_table(
    world, tmp_path):
  """Acceptance 1."""
  config = cache_fixtures.training_config(
      world, tmp_path, "learn", max_steps=60, batches_between_evals=20,
      learning_rate=3e-3, checkpoint_every_steps=30, log_samples=2)
  training.train(config)
  returned = evaluation.evaluate(config)
  run_dir = tmp_path / "learn"
  evals = [m for m in cache_fixtures.read_metrics(run_dir) if "eval_answer_loss" in m]
  assert [m["step"] for m in evals] == [20, 40, 60]
  vocabulary = transformers.GPT2Config.from_json_file(
      os.path.join(world["model"], "config.json")).vocab_size
  # A fresh model is near chance (log V); training must get well below it.
  assert evals[-1]["eval_answer_loss"] < evals[0]["eval_answer_loss"]
  assert evals[-1]["eval_answer_loss"] < math.log(vocabulary) - 1.0
  for name in ("config.json", "checkpoints/checkpoint", "train", "eval",
               "final_model/config.json", "done.json"):
    assert (run_dir / name).exists(), name
  run_config = json.loads((run_dir / "config.json").read_text())
  assert run_config["flags"]["approach_type"] == "cached_pretok"
  assert run_config["flags"]["distribute_mode"] == "OneDeviceStrategy"

  table = json.loads((run_dir / "ablation_validation.json").read_text())
  assert table == returned
  assert set(table) == set(context_draw.DEFAULT_CONDITIONS)
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
    world, reference_runs, tmp_path):
  """Acceptance 2: the same global batches give the same weights (1e-5).
  Two replicas of two micro-batches each: both splits of the global batch in
  one run (tf_utils' tests check each alone on the train step)."""
  variants = {
      "mirrored_batch_split": dict(
          distribute_mode="MirroredStrategy",
          devices=["/device:CPU:0", "/device:CPU:1"], batch_split=2),
      "model_split": dict(model_devices=["/device:CPU:2", "/device:CPU:3"]),
  }
  for name, overrides in variants.items():
    training.train(cache_fixtures.training_config(world, tmp_path, name,
                                                  **overrides))
  reference = cache_fixtures.final_weights(reference_runs / REFERENCE)
  start = {name: variable.numpy() for name, variable in
           task_specific.load_model(world["model"]).named_weights().items()}
  # The steps moved the weights (a comparison of untrained weights proves
  # nothing); final_model holds Hugging Face names, Conv1D biases as [1, n].
  moved = [np.abs(reference[gpt2_weights.tf_weight_name(name)].reshape(
      value.shape) - value).max() for name, value in start.items()]
  assert max(moved) > 1e-4
  for name in variants:
    got = cache_fixtures.final_weights(tmp_path / name)
    for key, value in reference.items():
      np.testing.assert_allclose(got[key], value, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_train_in_process_gives_the_weights_of_the_command_line(
    world, reference_runs, tmp_path):
  """Issue 12, acceptance 1: `train(TrainConfig(...))` and `main.py
  --task=train` with the same settings as flags save identical weights."""
  command = [sys.executable, os.path.join(ROOT, "main.py"), "--task=train"]
  command += cache_fixtures.training_flags(world, tmp_path, REFERENCE)
  result = subprocess.run(
      command, env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  in_process = cache_fixtures.final_weights(reference_runs / REFERENCE)
  command_line = cache_fixtures.final_weights(tmp_path / REFERENCE)
  assert sorted(command_line) == sorted(in_process)
  for key, value in in_process.items():
    np.testing.assert_array_equal(command_line[key], value, err_msg=key)
  flags = {name: json.loads((directory / REFERENCE / "config.json")
                            .read_text())["flags"]
           for name, directory in (("cli", tmp_path),
                                   ("library", reference_runs))}
  assert {k: v for k, v in flags["cli"].items() if k != "output_dir"} == {
      k: v for k, v in flags["library"].items() if k != "output_dir"}


def test_bad_inputs_are_one_line_errors(world, reference_runs, tmp_path):
  """Acceptance 8: each bad input is a UserError naming it."""
  other_tokenizer = str(tmp_path / "other_tokenizer")
  cache_fixtures.write_tokenizer(other_tokenizer, vocab_size=280)
  bigger_model = str(tmp_path / "bigger_model")
  utils.makedirs(bigger_model)
  model_config = transformers.GPT2Config.from_json_file(
      os.path.join(world["model"], "config.json"))
  model_config.n_embd = 64
  utils.atomic_write_text(os.path.join(bigger_model, "config.json"),
                          model_config.to_json_string())
  empty_dir = str(tmp_path / "empty")
  utils.makedirs(empty_dir)
  cases = {
      "differs from the tokenizer": dict(tokenizer=other_tokenizer),
      "neighbours asked for": dict(num_retrievals=5),
      "retrieval_temperature=0.0": dict(retrieval_temperature=0.0),
      "retrieval_temperature=-1.0": dict(retrieval_temperature=-1.0),
      "not divisible by replicas": dict(batch_size=5, batch_split=2),
      "exceed the sequence length 64": dict(max_answer_tokens=60),
      "exceeds the model's n_positions": dict(sequence_length=65),
      "another model config": dict(output_dir=str(reference_runs),
                                   run_name=REFERENCE,
                                   model_key=bigger_model),
      "no manifest.json": dict(cache_dir=empty_dir),
  }
  reference_config = (reference_runs / REFERENCE / "config.json").read_text()
  for message, overrides in cases.items():
    config = cache_fixtures.training_config(
        world, **{"output_dir": tmp_path, "run_name": "bad", **overrides})
    with pytest.raises(utils.UserError, match=re.escape(message)) as error:
      training.train(config)
    assert "\n" not in str(error.value)
  assert (reference_runs / REFERENCE / "config.json").read_text() == (
      reference_config)


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
  }
  function_cases = [(name, training.train, overrides, message)
                    for name, (overrides, message) in cases.items()]
  function_cases.append(("evaluate_missing", evaluation.evaluate, {},
                         "no run here"))
  for name, function, overrides, message in function_cases:
    result = outcome(function, cache_fixtures.training_config(
        world, tmp_path, name, **overrides))
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


def _checkpoint_steps(run_dir):
  return sorted(int(path.name[len("ckpt-"):-len(".index")])
                for path in (run_dir / "checkpoints").glob("ckpt-*.index"))


@pytest.fixture(scope="module")
def resumed_runs(world_with_test_split, tmp_path_factory):
  """Trains small runs, then damages, changes and resumes them as users and
  crashes do: each run goes through several cases in turn, so that one
  training serves every case that can start from it.

  Returns {"dir", "world", "outcomes": {case: {"ok": True} or {"error":
  message}}, "seen": what the runs held between the cases}.
  """
  world = world_with_test_split
  root = tmp_path_factory.mktemp("resumed")
  outcomes, seen = {}, {}

  def attempt(case, function, run, **overrides):
    outcomes[case] = outcome(function, cache_fixtures.training_config(
        world, root, run, **overrides))

  # "settings": a changed learning rate, refused, then allowed and recorded;
  # an evaluation of the answerless split; a huge learning rate; a damaged
  # metrics file.
  settings_run = root / "settings"
  training.train(cache_fixtures.training_config(world, root, "settings",
                                                checkpoint_every_steps=1))
  changed = dict(checkpoint_every_steps=1, learning_rate=2e-3, max_steps=3)
  seen["settings_config"] = (settings_run / "config.json").read_text()
  attempt("refused_change", training.train, "settings", **changed)
  seen["settings_config_refused"] = (settings_run / "config.json").read_text()
  attempt("allowed_change", training.train, "settings", **changed,
          allow_changed_settings=True)
  seen["settings_config_allowed"] = json.loads(
      (settings_run / "config.json").read_text())
  seen["settings_metrics"] = cache_fixtures.read_metrics(settings_run)
  attempt("evaluate_test", evaluation.evaluate, "settings", eval_split="test")
  # From ckpt-3 at a huge learning rate, the update of step 4 ruins the
  # weights while its loss (computed before the update) is finite.
  # Unchecked (no checkpoint at step 4), the loss of step 5 is not finite;
  # checked (a checkpoint every step), the state of step 4 is refused.
  huge = dict(max_steps=8, learning_rate=1e30, allow_changed_settings=True)
  attempt("nan_loss", training.train, "settings", checkpoint_every_steps=3,
          **huge)
  seen["nan_loss_checkpoints"] = _checkpoint_steps(settings_run)
  attempt("nan_guard", training.train, "settings", checkpoint_every_steps=1,
          **huge)
  seen["nan_guard_checkpoints"] = _checkpoint_steps(settings_run)
  attempt("nan_evaluate", evaluation.evaluate, "settings")
  metrics = (settings_run / "metrics.jsonl").read_text().splitlines()
  (settings_run / "metrics.jsonl").write_text(metrics[0] + "\n{not json\n")
  attempt("metrics", training.train, "settings", checkpoint_every_steps=1,
          **huge)

  # "pointer": the checkpoint pointer deleted, then garbled; a kill after
  # step 8 was logged but before ckpt-8 was complete; the latest checkpoint
  # cut short.
  pointer_run = root / "pointer"
  training.train(cache_fixtures.training_config(
      world, root, "pointer", max_steps=4, checkpoint_every_steps=2))
  seen["pointer_metrics_4"] = cache_fixtures.read_metrics(pointer_run)
  os.remove(pointer_run / "checkpoints" / "checkpoint")
  attempt("pointer_deleted", training.train, "pointer", max_steps=6,
          checkpoint_every_steps=2)
  seen["pointer_metrics_6"] = cache_fixtures.read_metrics(pointer_run)
  seen["pointer_checkpoints_6"] = _checkpoint_steps(pointer_run)
  (pointer_run / "checkpoints" / "checkpoint").write_text("garbage {")
  attempt("pointer_garbage", training.train, "pointer", max_steps=8,
          checkpoint_every_steps=2)
  seen["pointer_metrics_8"] = cache_fixtures.read_metrics(pointer_run)
  seen["pointer_checkpoints_8"] = _checkpoint_steps(pointer_run)
  for path in (pointer_run / "checkpoints").glob("ckpt-8.*"):
    os.remove(path)
  os.remove(pointer_run / "checkpoints" / "checkpoint")
  os.remove(pointer_run / "done.json")
  shutil.rmtree(pointer_run / "final_model")
  attempt("events", training.train, "pointer", max_steps=8,
          checkpoint_every_steps=2)
  seen["events_metrics"] = cache_fixtures.read_metrics(pointer_run)
  seen["events"] = _event_counts(pointer_run)
  _truncate(pointer_run / "checkpoints" / "ckpt-8.data-00000-of-00001", 100)
  attempt("truncated", training.train, "pointer", max_steps=10,
          checkpoint_every_steps=2)

  attempt("nan_from_start", training.train, "nan_from_start", max_steps=3,
          checkpoint_every_steps=1, learning_rate=1e30)
  # Losses of 5.7, ~380 and ~1250: exp overflows float32, then float64.
  attempt("overflow", training.train, "overflow", **_OVERFLOW)
  return {"dir": root, "world": world, "outcomes": outcomes, "seen": seen}


_OVERFLOW = dict(max_steps=3, learning_rate=6, clip_norm=0)


def _event_counts(run_dir):
  """{(tag, step): how many summary values}, over the run's event files."""
  counts = collections.Counter()
  for path in run_dir.glob("*/events.out.*"):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        counts[(value.tag, event.step)] += 1
  return counts


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_last_good_checkpoint(
    resumed_runs):
  """Acceptance 8: a loss that turns NaN stops the run, leaving the last
  good checkpoint."""
  error = resumed_runs["outcomes"]["nan_loss"]["error"]
  assert re.match(r"step 5: the loss is (nan|inf)", error), error
  assert "ckpt-3" in error
  assert resumed_runs["seen"]["nan_loss_checkpoints"] == [1, 2, 3]


@pytest.mark.slow
def test_nan_guard_saves_no_ruined_state_and_names_a_good_checkpoint(
    resumed_runs):
  """Issue 13, item 1 and acceptance 4: at a huge learning rate the loss of
  step 4 is finite (computed before its update) but the update ruins the
  weights; no checkpoint of them is written, the message names ckpt-3, and
  evaluating ckpt-3 gives finite numbers."""
  root, outcomes = resumed_runs["dir"], resumed_runs["outcomes"]
  error = outcomes["nan_guard"]["error"]
  assert re.match(r"step 4: .*(nan|inf|NaN).*stopping without saving\. "
                  r"The last good checkpoint is .*ckpt-3$", error), error
  assert resumed_runs["seen"]["nan_guard_checkpoints"] == [1, 2, 3]
  reader = tf.train.load_checkpoint(str(root / "settings" / "checkpoints" /
                                        "ckpt-3"))
  for name, dtype in reader.get_variable_to_dtype_map().items():
    if dtype.is_floating:
      value = reader.get_tensor(name)
      assert np.isfinite(value).all() and np.abs(value).max() < 1e3, name
  assert outcomes["nan_evaluate"] == {"ok": True}
  table = json.loads((root / "settings" / "ablation_validation.json")
                     .read_text())
  for row in table.values():
    assert row["checkpoint_step"] == 3
    assert math.isfinite(row["answer_ppl"]) and row["answer_tokens"] > 0
  # From the start: the first update already ruins the weights.
  assert re.match(r"step 1: .*The last good checkpoint is none",
                  outcomes["nan_from_start"]["error"]), (
                      outcomes["nan_from_start"])
  assert not (root / "nan_from_start" / "checkpoints").exists() or (
      _checkpoint_steps(root / "nan_from_start") == [])


@pytest.mark.slow
def test_a_huge_finite_loss_is_an_infinite_perplexity(resumed_runs):
  """Issue 13, item 1: exp(loss) overflowed into an OverflowError traceback
  (and a perplexity beyond float32 broke the TensorBoard scalar)."""
  root, outcomes = resumed_runs["dir"], resumed_runs["outcomes"]
  assert outcomes["overflow"] == {"ok": True}
  records = cache_fixtures.read_metrics(root / "overflow")
  assert all(math.isfinite(r["loss"]) for r in records)
  float32_max = float(np.finfo(np.float32).max)
  beyond_float32 = [r for r in records if 100 < r["loss"] < 700]
  assert beyond_float32 and all(float32_max < r["answer_ppl"] < math.inf
                                for r in beyond_float32), records
  overflowing = [r for r in records if r["loss"] > 710]
  assert overflowing and all(r["answer_ppl"] == math.inf
                             for r in overflowing), records


@pytest.mark.slow
def test_a_damaged_pointer_resumes_and_a_truncated_checkpoint_is_refused(
    resumed_runs):
  """Issue 13, item 2: a deleted or corrupt checkpoints/checkpoint restarted
  from step 0 over the run; now the run resumes from the latest complete
  checkpoint. A truncated .data file is one line (was an IndexError)."""
  outcomes, seen = resumed_runs["outcomes"], resumed_runs["seen"]
  for case, steps in (("pointer_deleted", 6), ("pointer_garbage", 8)):
    assert outcomes[case] == {"ok": True}, outcomes[case]
    metrics = seen[f"pointer_metrics_{steps}"]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert metrics[:steps - 2] == seen[f"pointer_metrics_{steps - 2}"]
    assert seen[f"pointer_checkpoints_{steps}"][-1] == steps
  assert "ckpt-8: unreadable" in outcomes["truncated"]["error"]
  assert "truncated or damaged" in outcomes["truncated"]["error"]


@pytest.mark.slow
def test_a_resumed_run_refuses_or_records_changed_settings(resumed_runs):
  """Issue 13, item 6: resuming with another learning rate was accepted
  while config.json kept the old one."""
  outcomes, seen = resumed_runs["outcomes"], resumed_runs["seen"]
  error = outcomes["refused_change"]["error"]
  assert ("the run was made with --learning_rate=0.001, now "
          "--learning_rate=0.002" in error), error
  assert "--allow_changed_settings" in error
  assert seen["settings_config_refused"] == seen["settings_config"]
  assert outcomes["allowed_change"] == {"ok": True}
  run_config = seen["settings_config_allowed"]
  assert run_config["flags"]["learning_rate"] == 0.002
  assert run_config["changes"] == [{"step": 2, "flags": {
      "learning_rate": {"was": 0.001, "now": 0.002},
      "max_steps": {"was": 2, "now": 3}}}]
  # The learning rate of step 1 is the peak (it was 0 without a warmup).
  assert seen["settings_metrics"][0]["learning_rate"] == pytest.approx(1e-3)
  assert seen["settings_metrics"][2]["learning_rate"] == pytest.approx(2e-3)


@pytest.mark.slow
def test_a_corrupt_metrics_file_is_one_line(resumed_runs):
  """Issue 13, item 5."""
  error = resumed_runs["outcomes"]["metrics"]["error"]
  assert "metrics.jsonl: line 2 is not a JSON record" in error, error


@pytest.mark.slow
def test_events_after_the_restored_step_are_not_logged_twice(resumed_runs):
  """Issue 13, item 6: TensorBoard showed the steps between the restored
  checkpoint and a kill twice after the resume."""
  assert resumed_runs["outcomes"]["events"] == {"ok": True}
  assert [m["step"] for m in resumed_runs["seen"]["events_metrics"]] == list(
      range(1, 9))
  counts = resumed_runs["seen"]["events"]
  assert counts[("loss", 8)] == 1 and counts[("loss", 1)] == 1
  assert set(counts.values()) == {1}, counts


@pytest.mark.slow
def test_evaluating_a_split_without_answers_is_refused(resumed_runs):
  """Issue 13, item 3: the test split (no answers) gave perplexity 1.0."""
  error = resumed_runs["outcomes"]["evaluate_test"]["error"]
  assert "--eval_split=test: the split has no answers" in error, error
  assert not (resumed_runs["dir"] / "settings" /
              "ablation_test.json").exists()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_log_line(resumed_runs, caplog):
  """Issue 13, item 4: a lock left by a dead process of this host. (On a
  finished run: rerunning it trains no step, only re-exports the model.)"""
  run_dir = resumed_runs["dir"] / "overflow"
  pid = _dead_pid()
  (run_dir / "lock").write_text(json.dumps(
      {"pid": pid, "host": socket.gethostname(),
       "started": "2020-01-01T00:00:00+00:00", "command": "main.py"}))
  training.train(cache_fixtures.training_config(
      resumed_runs["world"], resumed_runs["dir"], "overflow", **_OVERFLOW))
  assert f"taking over the lock left by pid {pid}" in caplog.text
  assert not (run_dir / "lock").exists()


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
