r"""`make demo`: the whole pipeline, offline, on the generated demo world.

  python util_scripts/run_demo.py --output_dir=demo_out [--max_steps=N ...]

make_demo_data.py -> query_cacher_tfrecord.py (exact search) -> main.py trains
the same small GPT-2 three ways (retrieval, naked, random contexts) -> main.py
--task=evaluate (the retrieval ablation on the validation split) ->
generation.py (greedy) + KILT metrics for the retrieval and naked runs ->
OUT/report.md with the table and PNG plots. Every stage runs the same entry
script a user would, through the shipped configs; a stage whose output exists
is reused (delete it to redo the stage), and its time is the one measured
when it ran (OUT/stage_times.json).

Layout: OUT/world, OUT/cache, OUT/runs/{retrieval,naked,random_context},
OUT/generations/{retrieval,naked}/{generations.jsonl,kilt_metrics.json},
OUT/report.md, OUT/*.png.
"""

import json
import os
import subprocess
import sys
import time

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from util_scripts import demo_layout  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "demo_out", "Where the world, cache, runs and report go.")
_FLAG_SEED = flags.DEFINE_integer("seed", 0, "Seed of the world and the runs.")
_FLAG_NUM_TRAIN = flags.DEFINE_integer(
    "num_train", None, "World size: training questions. Default: "
    "make_demo_data.py's.")
_FLAG_NUM_VALIDATION = flags.DEFINE_integer(
    "num_validation", None, "World size: validation (held-out) questions. "
    "Default: make_demo_data.py's.")
_FLAG_NUM_TEST = flags.DEFINE_integer(
    "num_test", None, "World size: test questions. Default: "
    "make_demo_data.py's.")
_FLAG_NUM_DISTRACTOR_BLOCKS = flags.DEFINE_integer(
    "num_distractor_blocks", None, "World size: blocks no question asks "
    "about. Default: make_demo_data.py's.")
_FLAG_GPT2_VOCAB_SIZE = flags.DEFINE_integer(
    "gpt2_vocab_size", None, "World: GPT-2 tokenizer vocabulary size. "
    "Default: make_demo_data.py's.")
_FLAG_NUM_NEIGHBOURS = flags.DEFINE_integer(
    "num_neighbours", None, "Neighbours cached per question. Default: "
    "configs/query_cacher_configs/demo.json's.")
_FLAG_MAX_STEPS = flags.DEFINE_integer(
    "max_steps", None, "Training steps of each run. Default: the demo train "
    "configs' (configs/train_configs/demo_*.json).")
_FLAG_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", None, "Learning-rate warm-up steps of each run. Default: "
    "the demo train configs'.")



def _script(name):
  return os.path.join(_REPO, name)


def _optional(flag_name, value):
  return [] if value is None else [f"--{flag_name}={value}"]


def _stages(out):
  """(name, script, args, output that marks the stage done), in order.

  Args starting with `--config FILE` are expanded by json_to_args.py; flags
  after it override the config (absl keeps the last value).
  """
  paths = demo_layout.paths(out)
  world, cache, runs = paths["world"], paths["cache"], paths["runs"]
  world_sizes = (
      _optional("num_train", _FLAG_NUM_TRAIN.value) +
      _optional("num_validation", _FLAG_NUM_VALIDATION.value) +
      _optional("num_test", _FLAG_NUM_TEST.value) +
      _optional("num_distractor_blocks", _FLAG_NUM_DISTRACTOR_BLOCKS.value) +
      _optional("gpt2_vocab_size", _FLAG_GPT2_VOCAB_SIZE.value))
  stages = [
      ("world", "util_scripts/make_demo_data.py",
       [f"--output_dir={world}", f"--seed={_FLAG_SEED.value}", *world_sizes],
       os.path.join(world, "world.json")),
      ("cache", "query_cacher_tfrecord.py",
       ["--config", "configs/query_cacher_configs/demo.json",
        f"--retriever_config_path={world}/retriever_config.json",
        f"--dataset_root={world}/kilt", f"--output_dir={cache}",
        "--search=exact", f"--tokenizer={world}/tokenizer",
        *_optional("num_neighbours", _FLAG_NUM_NEIGHBOURS.value)],
       os.path.join(cache, "manifest.json")),
      # KILT names provenance pages by wikipedia_id: map the corpus's titles
      # to them from the world's knowledge source, as for the real data.
      ("title map", "util_scripts/kilt_title_map.py",
       [f"--knowledge_source={world}/kilt/kilt_knowledgesource.json",
        f"--output_path={paths['title_map']}"],
       paths["title_map"]),
  ]
  run_flags = {
      run: ["--config", f"configs/train_configs/demo_{run}.json",
            f"--model_key={world}/model_config", f"--cache_dir={cache}",
            f"--output_dir={runs}", f"--run_name={run}",
            f"--random_seed={_FLAG_SEED.value}",
            *_optional("max_steps", _FLAG_MAX_STEPS.value),
            *_optional("warmup_steps", _FLAG_WARMUP_STEPS.value)]
      for run in demo_layout.TRAIN_RUNS}
  for run in demo_layout.TRAIN_RUNS:
    stages.append((f"train {run}", "main.py", run_flags[run],
                   os.path.join(runs, run, "done.json")))
  for run in demo_layout.TRAIN_RUNS:
    stages.append((f"evaluate {run}", "main.py",
                   # The whole split: training evaluates only a few batches.
                   run_flags[run] + ["--task=evaluate",
                                     f"--eval_split={demo_layout.EVAL_SPLIT}",
                                     "--number_eval_batches=0"],
                   os.path.join(runs, run, f"ablation_{demo_layout.EVAL_SPLIT}.json")))
  for run in demo_layout.GENERATION_RUNS:
    output = demo_layout.generation_path(out, run)
    stages.append((
        f"generate {run}", "generation.py",
        ["--config", "configs/generation_configs/demo_greedy.json",
         f"--run_dir={os.path.join(runs, run)}", f"--split={demo_layout.EVAL_SPLIT}",
         f"--output_path={output}", "--evaluate",
         f"--kilt_title_map={paths['title_map']}",
         f"--gold_path={os.path.join(world, 'kilt', demo_layout.GOLD_FILE)}"],
        os.path.join(os.path.dirname(output), "kilt_metrics.json")))
  return stages


def _command(script, args):
  """A stage's command line; `--config FILE` expands through json_to_args."""
  command = [sys.executable, _script(script)]
  if args[:1] == ["--config"]:
    expanded = subprocess.run(
        [sys.executable, _script("json_to_args.py"), _script(args[1])],
        check=True, capture_output=True, text=True).stdout.split()
    command += expanded
    args = args[2:]
  return command + args


def run_stages(out):
  """Runs every stage not done yet; returns {stage: seconds it took}."""
  times_path = os.path.join(out, demo_layout.STAGE_TIMES)
  times = utils.read_json(times_path) if os.path.exists(times_path) else {}
  stages = _stages(out)
  for number, (name, script, args, done_marker) in enumerate(stages, 1):
    prefix = f"[demo {number}/{len(stages)}] {name}"
    if os.path.exists(done_marker):
      print(f"{prefix}: reused ({done_marker})", flush=True)
      continue
    print(f"{prefix}: running {script}", flush=True)
    started = time.time()
    result = subprocess.run(_command(script, args), cwd=_REPO)
    if result.returncode != 0:
      raise utils.UserError(f"stage {name!r} failed ({script} exited "
                            f"{result.returncode}); rerun to resume")
    times[name] = round(time.time() - started, 1)
    utils.atomic_write_json(times_path, times)
    print(f"{prefix}: done in {times[name]:.0f} s", flush=True)
  return times


# ---------------------------------------------------------------------------
# The report: numbers read back from the stages' JSON files, then plots
# ---------------------------------------------------------------------------


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def collect_results(out):
  """{run: {"steps", "ablation": {name: ppl}, "generation": {...} or None}}."""
  import kilt_metrics  # pylint: disable=g-import-not-at-top
  paths = demo_layout.paths(out)
  gold_records = kilt_metrics.read_gold(
      os.path.join(paths["world"], "kilt", demo_layout.GOLD_FILE))
  results = {}
  for run in demo_layout.TRAIN_RUNS:
    run_dir = os.path.join(paths["runs"], run)
    ablation = utils.read_json(
        os.path.join(run_dir, f"ablation_{demo_layout.EVAL_SPLIT}.json"))
    row = {"steps": utils.read_json(os.path.join(run_dir, "done.json"))["step"],
           "ablation": {name: ablation[name]["answer_ppl"]
                        for name in demo_layout.ABLATIONS},
           "generation": None}
    if run in demo_layout.GENERATION_RUNS:
      output = demo_layout.generation_path(out, run)
      metrics = utils.read_json(
          os.path.join(os.path.dirname(output), "kilt_metrics.json"))
      row["generation"] = {
          "rougeL": metrics["rougeL"], "f1": metrics["f1"],
          "rprec": metrics["rprec"], "kilt_rougeL": metrics["kilt_rougeL"],
          "fact_accuracy": demo_layout.fact_accuracy(gold_records,
                                         kilt_metrics.read_guesses(output))}
    results[run] = row
  return results


def _run_seconds(times, run):
  return sum(times.get(f"{stage} {run}", 0.0)
             for stage in ("train", "evaluate", "generate"))


# The generation scores of the table, in its column order.
GENERATION_COLUMNS = ("rougeL", "f1", "fact_accuracy", "rprec", "kilt_rougeL")


def results_table(results, times):
  """The demo's table, as markdown: one row per run."""
  lines = [
      "| run | steps | answer ppl, real contexts | random contexts | "
      "no contexts | ROUGE-L | F1 | fact accuracy | R-Prec | KILT-RL | "
      "time (s) |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: |"]
  for run, row in results.items():
    generation = row["generation"]
    scores = (["-"] * len(GENERATION_COLUMNS) if generation is None else
              [f"{generation[name]:.3f}" for name in GENERATION_COLUMNS])
    lines.append(
        f"| {run} | {row['steps']} | " +
        " | ".join(f"{row['ablation'][name]:.3f}" for name in demo_layout.ABLATIONS) +
        " | " + " | ".join(scores) + f" | {_run_seconds(times, run):.0f} |")
  return "\n".join(lines) + "\n"


def acceptance_lines(results):
  """Does the model read its contexts? Ratios against the naked model."""
  naked = results["naked"]["ablation"]["none"]
  retrieval = results["retrieval"]["ablation"]
  real_ratio, random_ratio = retrieval["real"] / naked, retrieval["random"] / naked
  random_run_ratio = results["random_context"]["ablation"]["real"] / naked
  return [
      f"- retrieval run, real contexts / naked run: {real_ratio:.3f} "
      f"(reads its contexts if <= 0.5: {'yes' if real_ratio <= 0.5 else 'no'})",
      f"- retrieval run, random contexts / naked run: {random_ratio:.3f} "
      f"(no help from unrelated text if >= 0.9: "
      f"{'yes' if random_ratio >= 0.9 else 'no'})",
      f"- random_context run, real contexts / naked run: {random_run_ratio:.3f}",
  ]


def _metrics_lines(run_dir):
  path = os.path.join(run_dir, "metrics.jsonl")
  return read_jsonl(path) if os.path.exists(path) else []


def plot_training_curves(out, path):
  import length_stats  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for run in demo_layout.TRAIN_RUNS:
    records = _metrics_lines(os.path.join(demo_layout.paths(out)["runs"], run))
    train = [r for r in records if "answer_ppl" in r]
    line, = axes.plot([r["step"] for r in train],
                      [r["answer_ppl"] for r in train], label=f"{run} (train)")
    evals = [r for r in records if "eval_answer_ppl" in r]
    if evals:
      axes.plot([r["step"] for r in evals],
                [r["eval_answer_ppl"] for r in evals], "o--",
                color=line.get_color(), label=f"{run} ({demo_layout.EVAL_SPLIT})")
  axes.set(title="Answer perplexity during training", xlabel="step",
           ylabel="answer perplexity", yscale="log")
  axes.grid(alpha=0.3)
  axes.legend()
  return length_stats.save_figure(figure, path)


def plot_ablation(results, path):
  import length_stats  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(figsize=(7, 4.5))
  width = 0.8 / len(demo_layout.ABLATIONS)
  for index, name in enumerate(demo_layout.ABLATIONS):
    axes.bar([run_index + index * width for run_index in range(len(results))],
             [row["ablation"][name] for row in results.values()], width,
             label=name)
  axes.set_xticks([run_index + width for run_index in range(len(results))])
  axes.set_xticklabels(list(results))
  axes.set(title=f"Held-out ({demo_layout.EVAL_SPLIT}) answer perplexity by contexts given",
           ylabel="answer perplexity", yscale="log")
  axes.grid(alpha=0.3, axis="y")
  axes.legend(title="contexts")
  return length_stats.save_figure(figure, path)


def plot_lengths(out, path):
  """GPT-2 lengths of questions, answers and cached blocks (validation)."""
  import length_stats  # pylint: disable=g-import-not-at-top
  paths = demo_layout.paths(out)
  tokenizer = length_stats.load_tokenizer(
      os.path.join(paths["world"], "tokenizer"))
  examples = length_stats.read_kilt_examples(
      os.path.join(paths["world"], "kilt", demo_layout.GOLD_FILE))
  questions, answers = length_stats.question_answer_lengths(examples,
                                                            tokenizer)
  neighbours, _ = length_stats.cached_neighbour_lengths(paths["cache"],
                                                        demo_layout.EVAL_SPLIT)
  stacked = length_stats.cumulative_context_lengths(neighbours)
  series = {"question": questions, "answer": answers,
            "best block": stacked[:, 0]}
  if stacked.shape[1] > 1:
    series["best 2 blocks"] = stacked[:, 1]
  return length_stats.plot_cumulative_distributions(
      series, path, title=f"GPT-2 lengths ({demo_layout.EVAL_SPLIT} split)",
      xlabel="tokens")


def write_report(out, times):
  """Writes OUT/report.md and the plots; returns the report's text."""
  sys.path.insert(0, os.path.join(_REPO, "notebooks"))
  results = collect_results(out)
  plot_training_curves(out, os.path.join(out, demo_layout.PLOTS[0]))
  plot_ablation(results, os.path.join(out, demo_layout.PLOTS[1]))
  plot_lengths(out, os.path.join(out, demo_layout.PLOTS[2]))
  world = utils.read_json(os.path.join(demo_layout.paths(out)["world"], "world.json"))
  # In stage order (stage_times.json is sorted by name), so the total sums
  # the same floats in the same order on every run.
  stage_times = [(name, times[name]) for name, _, _, _ in _stages(out)
                 if name in times]
  stage_rows = "\n".join(f"| {name} | {seconds:.0f} |"
                         for name, seconds in stage_times)
  text = "\n".join([
      "# Demo report", "",
      f"World: seed {world.get('seed')}, {world.get('num_train')} training / "
      f"{world.get('num_validation')} validation questions, embedder "
      f"recall@5 {world.get('recall_at_5')}. Answer perplexities are over the "
      f"held-out ({demo_layout.EVAL_SPLIT}) answers; generations are greedy, scored with "
      "KILT's metrics; fact accuracy is the fraction of the gold facts (three "
      "per question: person, year, city) found verbatim in the answers.", "",
      results_table(results, times),
      "Does the retrieval model read its contexts?", "",
      *acceptance_lines(results), "",
      "| stage | time (s) |", "| --- | ---: |", stage_rows,
      f"| total | {sum(seconds for _, seconds in stage_times):.0f} |", "",
      *[f"![{name}]({name})" for name in demo_layout.PLOTS], ""])
  utils.atomic_write_text(os.path.join(out, demo_layout.REPORT), text)
  return text


def main(argv):
  out = os.path.abspath(_FLAG_OUTPUT_DIR.value)
  os.makedirs(out, exist_ok=True)
  times = run_stages(out)
  print("[demo] report: tables and plots", flush=True)
  text = write_report(out, times)
  print(text, flush=True)
  print(f"[demo] wrote {os.path.join(out, demo_layout.REPORT)}", flush=True)


if __name__ == "__main__":
  utils.run(main)
