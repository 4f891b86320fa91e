"""The demo's output layout and its fact rule, flag-free.

`run_demo.py` (an entry script with flags) writes this layout; tests import
this module to check it without importing the entry script (absl refuses two
modules defining the same flag, e.g. `--output_dir`).
"""

import os
import re

import kilt_files
from util_scripts import demo_world

# Run name -> its shipped train config (configs/train_configs/demo_NAME.json).
TRAIN_RUNS = ("retrieval", "naked", "random_context")
# Runs whose greedy generations are scored (random_context's generations
# would use real contexts, which it was not trained to read).
GENERATION_RUNS = ("retrieval", "naked")
ABLATIONS = ("real", "random", "none")
# The run evaluated under every context condition (the others: ABLATIONS).
GRID_RUN = "retrieval"
# The grid run's generations with another question's contexts: the baseline
# of its grounding (does it copy from the contexts it is given?).
RANDOM_CONTEXT_GENERATION = "retrieval_random_contexts"
GROUNDING = "grounding"
EVAL_SPLIT = "validation"
GOLD_FILE = kilt_files.ELI5_SPLIT_FILES[EVAL_SPLIT]
STAGE_TIMES = "stage_times.json"
REPORT = "report.md"
PLOTS = ("training_curves.png", "ablation.png", "lengths.png")


def paths(out):
  return dict(world=os.path.join(out, "world"),
              cache=os.path.join(out, "cache"),
              title_map=os.path.join(out, "title_map.json"),
              runs=os.path.join(out, "runs"),
              generations=os.path.join(out, "generations"))


def generation_path(out, run):
  return os.path.join(paths(out)["generations"], run, "generations.jsonl")


def grounding_paths(out):
  """(JSON, markdown) of the grid run's grounding comparison."""
  base = os.path.join(paths(out)["generations"], GROUNDING)
  return base + ".json", base + ".md"


def _template_pattern(template):
  """A regex matching what `template.format(...)` writes, a group per field."""
  pieces = re.split(r"\{\w+\}", template)
  return re.compile("^" + "(.+)".join(map(re.escape, pieces)) + "$")


_ANSWER = _template_pattern(demo_world.ANSWER_TEMPLATE)


def answer_facts(answer):
  """The made-up facts a demo answer states, without the marker words.

  `by Trukkos Ramshou, in 1597, city of Zendakbrim.` ->
  ["Trukkos Ramshou", "1597", "Zendakbrim"].
  """
  match = _ANSWER.match(answer)
  if match is None:
    raise ValueError(f"not a demo answer: {answer!r}")
  return list(match.groups())


def fact_accuracy(gold_records, predictions):
  """Fraction of the gold facts (three per question) in the generated answers."""
  hits = [fact in predictions[record["id"]]
          for record in gold_records
          for fact in answer_facts(record["output"][0]["answer"])]
  return sum(hits) / len(hits)
