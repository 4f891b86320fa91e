"""main.py as a process: what only a process of its own shows.

The command-line contract (`--help` loads neither ScaNN nor TF-Hub; a bad
input exits 2 with one line: test_bad_inputs.py), kill -9 then rerun, two
jobs on one run directory, and multi-worker runs (two workers, a missing one,
a dying one).
Training itself is tested in-process, through `training.train`, in
test_training.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import cache_fixtures
import distributed_fixtures
import run_dir
import training

# Slow, the whole module (subprocesses: kill -9, multi-worker, locks):
# not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs main.py as `python main.py --help` does, then names the heavy modules
# that importing it (and parsing the flags) loaded.
_HELP_PROBE = """
import json, runpy, sys
sys.argv = ["main.py", "--help"]
try:
  runpy.run_path("main.py", run_name="__main__")
except SystemExit:
  pass
print(json.dumps(sorted(name for name in ("scann", "tensorflow_hub")
                        if name in sys.modules)))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return cache_fixtures.write_training_world(tmp_path_factory.mktemp("world"))


def _command(world, output_dir, run_name, **overrides):
  return [sys.executable, os.path.join(ROOT, "main.py"), "--task=train"] + (
      cache_fixtures.training_flags(world, output_dir, run_name, **overrides))


def _environment():
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def _one_error_line(returncode, stderr):
  """The `error:` line of a job refused with exit code 2 and no traceback."""
  assert returncode == 2, stderr[-2000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
  return errors[0]


def test_help_imports_neither_scann_nor_tensorflow_hub():
  """Issue 12, acceptance 4: imports cost what they use."""
  result = subprocess.run([sys.executable, "-c", _HELP_PROBE], cwd=ROOT,
                          env=_environment(), capture_output=True, text=True,
                          timeout=300)
  assert "--model_key" in result.stdout, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1]) == []


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(tmp_path):
  """Acceptance 3 (and 4: the resumed run sees the same contexts). The
  uninterrupted run and the rerun train in-process: the command line gives
  the library's weights (test_training.py)."""
  world = cache_fixtures.write_training_world(tmp_path / "world", dropout=0.1)
  overrides = dict(max_steps=150, checkpoint_every_steps=10,
                   checkpoint_every_minutes=1000, log_every_steps=10,
                   approach_type="random_context", shuffle_buffer_size=8)
  training.train(cache_fixtures.training_config(world, tmp_path, "straight",
                                                **overrides))
  process = subprocess.Popen(_command(world, tmp_path, "killed", **overrides),
                             env=_environment(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  index = tmp_path / "killed" / "checkpoints" / "checkpoint"
  deadline = time.time() + 300
  while not index.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed"
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (tmp_path / "killed" / "final_model").exists()
  training.train(cache_fixtures.training_config(world, tmp_path, "killed",
                                                **overrides))
  straight = cache_fixtures.final_weights(tmp_path / "straight")
  resumed = cache_fixtures.final_weights(tmp_path / "killed")
  for key, value in straight.items():
    np.testing.assert_array_equal(resumed[key], value, err_msg=key)
  # The metrics of the resumed run read as one run, the same as the other's.
  def losses(run_name):
    return [(m["step"], m["loss"], m["grad_norm"])
            for m in cache_fixtures.read_metrics(tmp_path / run_name)]
  assert [step for step, _, _ in losses("killed")] == list(range(10, 151, 10))
  assert losses("killed") == losses("straight")


@pytest.mark.slow
def test_a_second_job_on_a_running_run_fails_at_once(world, tmp_path):
  """Issue 13, item 4 and acceptance 3: two jobs on one run directory both
  exited 0 and one was silently lost. Now the second fails with one line
  naming the holder, no later than a job refused for a bad flag (it stops
  before loading anything), and the first finishes unharmed. The first job
  is this process, holding the run's lock as `training.train` does while
  main.py tries the run, and then training it."""
  env = _environment()
  config = cache_fixtures.training_config(world, tmp_path, "shared")
  lock = tmp_path / "shared" / "lock"
  with run_dir.lock(config.run_dir, None, create=True):
    holder = lock.read_text()
    commands = {"second": _command(world, tmp_path, "shared"),
                "bad_flag": _command(world, tmp_path, "other",
                                     log_every_steps=0)}
    started = time.time()
    others = {name: subprocess.Popen(command, env=env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
              for name, command in commands.items()}
    seconds, stderr = {}, {}
    for name, process in others.items():
      stderr[name] = process.communicate(timeout=120)[1]
      seconds[name] = time.time() - started
    assert lock.read_text() == holder
    assert sorted(os.listdir(tmp_path / "shared")) == ["lock"]
  error = _one_error_line(others["second"].returncode, stderr["second"])
  assert (f"in use by another job (pid {os.getpid()} on host "
          f"{socket.gethostname()}, started " in error), error
  assert "--log_every_steps=0: expected >= 1" in _one_error_line(
      others["bad_flag"].returncode, stderr["bad_flag"])
  assert seconds["second"] < seconds["bad_flag"] + 1.0, seconds
  training.train(config)
  assert [m["step"] for m in cache_fixtures.read_metrics(tmp_path / "shared")] == [1, 2]
  done = json.loads((tmp_path / "shared" / "done.json").read_text())
  assert done["step"] == 2
  assert not lock.exists()


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
  metrics = cache_fixtures.read_metrics(run_dir)
  assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
  evals = [m for m in metrics if "eval_answer_loss" in m]
  assert len(evals) == 1 and evals[0]["eval_answer_tokens"] > 0
  assert (run_dir / "final_model" / "model.safetensors").exists()
  assert (run_dir / "checkpoints" / "worker-1" / "checkpoint").exists()


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
  assert time.time() - killed_at < 180
  error = _one_error_line(processes[0].returncode, stderr)
  assert "worker 1 of the multi-worker job stopped answering" in error
