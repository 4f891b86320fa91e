"""`make demo`: the whole pipeline, offline, on the generated demo world.

make_demo_data.py -> query_cacher_tfrecord.py (exact search) -> main.py trains
the same small GPT-2 three ways (retrieval, naked, random contexts) -> main.py
--task=evaluate (the retrieval ablation) -> generation.py + KILT metrics ->
report.md with the table and PNG plots. Every stage runs the same entry script
a user would, through the same flags; a stage whose outputs exist is reused.
A stage whose script does not exist yet is named, and the demo exits 1.
"""

import os
import subprocess
import sys
import time

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "demo_out", "Where the world, cache, runs and report go.")
_FLAG_SEED = flags.DEFINE_integer("seed", 0, "Seed of the world and the runs.")

TRAIN_RUNS = ("retrieval", "naked", "random_context")


def _script(name):
  return os.path.join(_REPO, name)


def _stages(out):
  """(name, script, args, output that marks the stage done), in order."""
  world = os.path.join(out, "world")
  cache = os.path.join(out, "cache")
  runs = os.path.join(out, "runs")
  stages = [
      ("world", "util_scripts/make_demo_data.py",
       [f"--output_dir={world}", f"--seed={_FLAG_SEED.value}"],
       os.path.join(world, "world.json")),
      ("cache", "query_cacher_tfrecord.py",
       [f"--retriever_config_path={world}/retriever_config.json",
        f"--dataset_root={world}/kilt", f"--output_dir={cache}",
        "--search=exact", f"--tokenizer={world}/tokenizer"],
       os.path.join(cache, "manifest.json")),
  ]
  for run in TRAIN_RUNS:
    stages.append((
        f"train {run}", "main.py",
        ["--config", f"configs/train_configs/demo_{run}.json",
         f"--model_key={world}/model_config", f"--cache_dir={cache}",
         f"--output_dir={runs}", f"--run_name={run}"],
        os.path.join(runs, run, "done.json")))
  return stages


def _command(script, args):
  """A stage's command line; `--config FILE` expands through json_to_args."""
  command = [sys.executable, _script(script)]
  if args[:1] == ["--config"]:
    expanded = subprocess.run(
        [sys.executable, _script("json_to_args.py"), args[1]],
        check=True, capture_output=True, text=True).stdout.split()
    command += expanded
    args = args[2:]
  return command + args


def main(argv):
  del argv
  out = os.path.abspath(_FLAG_OUTPUT_DIR.value)
  os.makedirs(out, exist_ok=True)
  missing = []
  for name, script, args, done_marker in _stages(out):
    if not os.path.exists(_script(script)):
      print(f"[demo] {name}: not built yet ({script} does not exist)",
            flush=True)
      missing.append(name)
      continue
    if missing:
      print(f"[demo] {name}: skipped, an earlier stage is missing", flush=True)
      continue
    if os.path.exists(done_marker):
      print(f"[demo] {name}: reused ({done_marker})", flush=True)
      continue
    print(f"[demo] {name}: running {script}", flush=True)
    started = time.time()
    result = subprocess.run(_command(script, args), cwd=_REPO)
    if result.returncode != 0:
      raise utils.UserError(f"stage {name!r} failed ({script} exited "
                            f"{result.returncode})")
    print(f"[demo] {name}: done in {time.time() - started:.0f} s", flush=True)
  if missing:
    raise utils.UserError(
        f"the demo is incomplete: {', '.join(missing)} not built yet")


if __name__ == "__main__":
  utils.run(main)
