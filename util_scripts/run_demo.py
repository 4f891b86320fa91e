r"""`make demo`: the whole pipeline, offline, on the generated demo world.

  python util_scripts/run_demo.py --output_dir=demo_out [--max_steps=N ...]

make_demo_data.py -> query_cacher_tfrecord.py (exact search) -> main.py trains
the same small GPT-2 three ways (retrieval, naked, random contexts) -> main.py
--task=evaluate (the context-condition grid on the validation split) ->
generation.py (greedy) + KILT metrics for the retrieval and naked runs, and
for the retrieval run with random contexts (its grounding's baseline) ->
OUT/report.md with the table and PNG plots. Every stage makes, in this one
process, the library call of the entry script a user would run
(demo_world.build_world, caching.cache, training.train / evaluation.evaluate,
generation_lib.generate) with the shipped configs; a stage whose output
exists is reused (delete it to redo the stage), and its time is the one
measured when it ran (OUT/stage_times.json).

Layout: OUT/world, OUT/cache, OUT/runs/{retrieval,naked,random_context},
OUT/generations/{retrieval,naked,retrieval_random_contexts}/{generations.jsonl,
kilt_metrics.json}, OUT/generations/grounding.{json,md},
OUT/report.md, OUT/*.png.
"""

import functools
import os
import sys
import time
import typing

from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import caching  # pylint: disable=g-import-not-at-top,wrong-import-position
import context_draw  # pylint: disable=g-import-not-at-top,wrong-import-position
import eval_stats  # pylint: disable=g-import-not-at-top,wrong-import-position
import evaluation  # pylint: disable=g-import-not-at-top,wrong-import-position
import generation_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import kilt_files  # pylint: disable=g-import-not-at-top,wrong-import-position
import kilt_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
import training  # pylint: disable=g-import-not-at-top,wrong-import-position
from util_scripts import demo_layout  # pylint: disable=g-import-not-at-top,wrong-import-position
from util_scripts import demo_world  # pylint: disable=g-import-not-at-top,wrong-import-position
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
_FLAG_LIVE_RETRIEVAL = flags.DEFINE_boolean(
    "live_retrieval", False,
    "The retrieval run's generation retrieves its contexts live (REALM's "
    "embedder and exact search over the world's blocks, in this process or "
    "through --retrieval_server) instead of reading the cache's neighbours.")
_FLAG_RETRIEVAL_SERVER = flags.DEFINE_string(
    "retrieval_server", None,
    "With --live_retrieval: http://host:port of a retrieval_server.py "
    "serving the world's blocks (the README's demo command starts one).")


def _given(values):
  """`values` without its None entries: a setting left at its default."""
  return {name: value for name, value in values.items() if value is not None}


def _shipped_config(name, overrides):
  """(path, flat settings) of configs/NAME with `overrides` on top.

  As `$(json_to_args.py configs/NAME) --flag=value ...` gives them to an
  entry script: a null, in the file or in `overrides`, leaves the setting as
  it is.
  """
  path = os.path.join(_REPO, "configs", name)
  return path, {**_given(settings.read_flat_config(path)),
                **_given(overrides)}


def _training_task(task, run, overrides):
  """`task` (training.train or evaluation.evaluate) of a demo run's config."""
  path, values = _shipped_config(f"train_configs/demo_{run}.json", overrides)
  task(training.config_from_values(values, path))


def _build_world(world_dir):
  started = time.time()
  world = demo_world.build_world(world_dir, seed=_FLAG_SEED.value, **_given({
      "num_train": _FLAG_NUM_TRAIN.value,
      "num_validation": _FLAG_NUM_VALIDATION.value,
      "num_test": _FLAG_NUM_TEST.value,
      "num_distractor_blocks": _FLAG_NUM_DISTRACTOR_BLOCKS.value,
      "gpt2_vocab_size": _FLAG_GPT2_VOCAB_SIZE.value}))
  for line in demo_world.summary_lines(world, time.time() - started):
    print(line, flush=True)


def _cache(world, cache):
  path, values = _shipped_config("query_cacher_configs/demo.json", {
      "retriever_config_path": os.path.join(world, "retriever_config.json"),
      "dataset_root": os.path.join(world, "kilt"), "output_dir": cache,
      "search": "exact", "tokenizer": os.path.join(world, "tokenizer"),
      "num_neighbours": _FLAG_NUM_NEIGHBOURS.value})
  caching.cache(settings.from_flat(caching.CacheConfig, values, path))


def _generate(run_dir, output_path, title_map, gold_path,
              approach_type=None, retrieval=None):
  path, values = _shipped_config("generation_configs/demo_greedy.json", {
      "run_dir": run_dir, "split": demo_layout.EVAL_SPLIT,
      "output_path": output_path, "evaluate": True,
      "kilt_title_map": title_map, "gold_path": gold_path,
      "approach_type": approach_type, **(retrieval or {})})
  generation_lib.generate(generation_lib.config_from_flat(values, path))


def _live_retrieval(world):
  """The generation settings of live retrieval over the world's blocks, the
  neighbours' GPT-2 ids made as the demo's cache makes them."""
  _, cache_values = _shipped_config("query_cacher_configs/demo.json", {
      "num_neighbours": _FLAG_NUM_NEIGHBOURS.value})
  return {"approach_type": context_draw.Approach.LIVE_RETRIEVAL.value,
          "retrieval_server": _FLAG_RETRIEVAL_SERVER.value,
          "retriever_config_path": os.path.join(world, "retriever_config.json"),
          "live_num_neighbours": cache_values["num_neighbours"],
          "max_block_tokens": cache_values["max_block_tokens"],
          "context_with_title": cache_values.get("context_with_title", False)}


def _grounding(out, gold_path, train_path):
  """The grid run's generations with real vs random contexts: grounding,
  KILT's metrics, their paired differences and the calibration baselines,
  as `kilt_eval.py --compare_guess --grounding --baselines_train_path`."""
  result = kilt_metrics.evaluate_files(
      gold_path, demo_layout.generation_path(out, demo_layout.GRID_RUN),
      compare_path=demo_layout.generation_path(
          out, demo_layout.RANDOM_CONTEXT_GENERATION),
      with_grounding=True, baselines_train_path=train_path)
  json_path, markdown_path = demo_layout.grounding_paths(out)
  utils.atomic_write_text(markdown_path, kilt_metrics.result_table(
      result, "real contexts", "random contexts"))
  utils.atomic_write_json(json_path, result)


class Stage(typing.NamedTuple):
  """One step of the demo."""
  name: str
  library_call: str  # What the stage runs, as its progress line names it.
  run: typing.Callable[[], object]
  done_marker: str  # The output whose existence means the stage is done.


def _stages(out):
  """The demo's stages, in order; each runs the library call of the entry
  script a user would run, with the shipped config and these overrides."""
  paths = demo_layout.paths(out)
  world, cache, runs = paths["world"], paths["cache"], paths["runs"]
  stages = [
      Stage("world", "demo_world.build_world",
            functools.partial(_build_world, world),
            os.path.join(world, "world.json")),
      Stage("cache", "caching.cache", functools.partial(_cache, world, cache),
            os.path.join(cache, "manifest.json")),
      # KILT names provenance pages by wikipedia_id: map the corpus's titles
      # to them from the world's knowledge source, as for the real data.
      Stage("title map", "kilt_metrics.write_title_map",
            functools.partial(
                kilt_metrics.write_title_map,
                os.path.join(world, "kilt", kilt_files.KNOWLEDGE_SOURCE_FILE),
                paths["title_map"]),
            paths["title_map"]),
  ]
  run_overrides = {
      "model_key": os.path.join(world, "model_config"), "cache_dir": cache,
      "output_dir": runs, "random_seed": _FLAG_SEED.value,
      "max_steps": _FLAG_MAX_STEPS.value,
      "warmup_steps": _FLAG_WARMUP_STEPS.value}
  for run in demo_layout.TRAIN_RUNS:
    stages.append(Stage(
        f"train {run}", "training.train",
        functools.partial(_training_task, training.train, run,
                          dict(run_overrides, run_name=run)),
        os.path.join(runs, run, "done.json")))
  world_files = demo_world.world_paths(world)
  for run in demo_layout.TRAIN_RUNS:
    # The whole split: training evaluates only a few batches.
    conditions = dict(conditions=demo_layout.ABLATIONS)
    if run == demo_layout.GRID_RUN:
      conditions = dict(conditions=context_draw.CONDITIONS,
                        gold_contexts_path=world_files["gold_contexts"],
                        counterfactual_path=world_files["counterfactual"])
    stages.append(Stage(
        f"evaluate {run}", "evaluation.evaluate",
        functools.partial(_training_task, evaluation.evaluate, run, dict(
            run_overrides, run_name=run, eval_split=demo_layout.EVAL_SPLIT,
            number_eval_batches=0, **conditions)),
        os.path.join(runs, run, f"ablation_{demo_layout.EVAL_SPLIT}.json")))
  gold_path = os.path.join(world, "kilt", demo_layout.GOLD_FILE)
  generations = [(run, run, None) for run in demo_layout.GENERATION_RUNS] + [
      (demo_layout.RANDOM_CONTEXT_GENERATION, demo_layout.GRID_RUN,
       "random_context")]
  for name, run, approach_type in generations:
    output = demo_layout.generation_path(out, name)
    live = (_live_retrieval(world) if _FLAG_LIVE_RETRIEVAL.value and
            name == demo_layout.GRID_RUN else None)
    stages.append(Stage(
        f"generate {name}", "generation_lib.generate",
        functools.partial(
            _generate, os.path.join(runs, run), output, paths["title_map"],
            gold_path, approach_type, live),
        os.path.join(os.path.dirname(output), "kilt_metrics.json")))
  stages.append(Stage(
      "grounding", "kilt_metrics.evaluate_files",
      functools.partial(_grounding, out, gold_path, os.path.join(
          world, "kilt", kilt_files.ELI5_SPLIT_FILES["train"])),
      demo_layout.grounding_paths(out)[0]))
  return stages


def run_stages(out):
  """Runs every stage not done yet, in this process; returns {stage: seconds
  it took}."""
  times_path = os.path.join(out, demo_layout.STAGE_TIMES)
  times = utils.read_json(times_path) if os.path.exists(times_path) else {}
  stages = _stages(out)
  for number, stage in enumerate(stages, 1):
    prefix = f"[demo {number}/{len(stages)}] {stage.name}"
    if os.path.exists(stage.done_marker):
      print(f"{prefix}: reused ({stage.done_marker})", flush=True)
      continue
    print(f"{prefix}: running {stage.library_call}", flush=True)
    started = time.time()
    try:
      stage.run()
    except utils.UserError as error:
      raise utils.UserError(
          f"stage {stage.name!r} failed: {error}; rerun to resume") from error
    times[stage.name] = round(time.time() - started, 1)
    utils.atomic_write_json(times_path, times)
    print(f"{prefix}: done in {times[stage.name]:.0f} s", flush=True)
  return times


# ---------------------------------------------------------------------------
# The report: numbers read back from the stages' JSON files, then plots
# ---------------------------------------------------------------------------


def collect_results(out):
  """{run: {"steps", "ablation": {name: ppl}, "generation": {...} or None}}."""
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
    if run == demo_layout.GRID_RUN:
      row["grid"] = ablation
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


def grid_lines(out, results):
  """The retrieval run's context-condition grid and what it says."""
  grid = results[demo_layout.GRID_RUN]["grid"]
  report_path = os.path.join(demo_layout.paths(out)["runs"],
                             demo_layout.GRID_RUN,
                             f"ablation_{demo_layout.EVAL_SPLIT}.md")
  with open(report_path, encoding="utf-8") as file:
    table = file.read().strip()
  lines = [f"The {demo_layout.GRID_RUN} run under every context condition "
           f"(`{os.path.relpath(report_path, out)}`):", "", table, ""]
  counterfactual = grid.get("counterfactual", {}).get(
      "paired_vs_counterfactual_none")
  if counterfactual:
    ratio = counterfactual["ratio"]
    follows = ratio["high"] is not None and ratio["high"] < 1
    lines.append(
        "- counterfactual: perplexity of the swapped facts with the swapped "
        f"passage / without context: "
        f"{eval_stats.format_interval(ratio, digits=3)} (follows what it "
        f"reads if < 1 with the whole interval: {'yes' if follows else 'no'})")
  return lines


def grounding_lines(out):
  """Does the grid run copy from its contexts? Its grounding with real vs
  random contexts, and the calibration baselines."""
  json_path, markdown_path = demo_layout.grounding_paths(out)
  result = utils.read_json(json_path)
  difference = result["comparison"]["differences"]["grounding"]
  above = difference["low"] is not None and difference["low"] > 0
  with open(markdown_path, encoding="utf-8") as file:
    tables = file.read().strip()
  return [
      f"Generations of the {demo_layout.GRID_RUN} run with its real contexts "
      "and with another question's (grounding: the share of generated "
      "n-grams, n = 1..4, found in the contexts given and not in the "
      "question), and the calibration baselines "
      f"(`{os.path.relpath(markdown_path, out)}`):", "", tables, "",
      "- grounding, real − random contexts: "
      f"{eval_stats.format_interval(difference, scale=100)} points (copies "
      "more from its own question's passages than from another's if the "
      f"interval is above 0: {'yes' if above else 'no'})"]


def contexts_source_line(out):
  """Where the grid run's generation took its contexts from, as its
  generation_config.json records it."""
  record = utils.read_json(os.path.join(os.path.dirname(
      demo_layout.generation_path(out, demo_layout.GRID_RUN)),
      generation_lib.GENERATION_CONFIG_NAME))
  retrieval = record.get("retrieval")
  if not retrieval:
    return (f"Contexts of the {demo_layout.GRID_RUN} run's generation: the "
            f"neighbour cache ({record['approach_type']}).")
  return (f"Contexts of the {demo_layout.GRID_RUN} run's generation: live "
          f"retrieval ({retrieval['search']['kind']} search over "
          f"{retrieval['num_blocks']} blocks, index version "
          f"{retrieval['index_version']}).")


def _metrics_lines(run_dir):
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [record for _, record in
          kilt_files.read_jsonl(path, "training metrics")]


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
  stage_times = [(stage.name, times[stage.name]) for stage in _stages(out)
                 if stage.name in times]
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
      results_table(results, times), contexts_source_line(out), "",
      "Does the retrieval model read its contexts?", "",
      *acceptance_lines(results), "",
      *grid_lines(out, results), "",
      *grounding_lines(out), "",
      "| stage | time (s) |", "| --- | ---: |", stage_rows,
      f"| total | {sum(seconds for _, seconds in stage_times):.0f} |", "",
      *[f"![{name}]({name})" for name in demo_layout.PLOTS], ""])
  utils.atomic_write_text(os.path.join(out, demo_layout.REPORT), text)
  return text


def main(argv):
  out = os.path.abspath(_FLAG_OUTPUT_DIR.value)
  utils.check_output_path(out, "--output_dir", directory=True)
  os.makedirs(out, exist_ok=True)
  times = run_stages(out)
  print("[demo] report: tables and plots", flush=True)
  text = write_report(out, times)
  print(text, flush=True)
  print(f"[demo] wrote {os.path.join(out, demo_layout.REPORT)}", flush=True)


if __name__ == "__main__":
  cli.run(main)
