"""The demo's output layout and its fact rule, flag-free.

`run_demo.py` (an entry script with flags) writes this layout; tests import
this module to check it without importing the entry script (absl refuses two
modules defining the same flag, e.g. `--output_dir`).
"""

import os
import re

# Run name -> its shipped train config (configs/train_configs/demo_NAME.json).
TRAIN_RUNS = ("retrieval", "naked", "random_context")
# Runs whose greedy generations are scored (random_context's generations
# would use real contexts, which it was not trained to read).
GENERATION_RUNS = ("retrieval", "naked")
ABLATIONS = ("real", "random", "none")
EVAL_SPLIT = "validation"
GOLD_FILE = "eli5-dev-kilt.jsonl"  # KILT's name of the validation split.
STAGE_TIMES = "stage_times.json"
REPORT = "report.md"
PLOTS = ("training_curves.png", "ablation.png", "lengths.png")


def paths(out):
  return dict(world=os.path.join(out, "world"),
              cache=os.path.join(out, "cache"),
              runs=os.path.join(out, "runs"),
              generations=os.path.join(out, "generations"))


def generation_path(out, run):
  return os.path.join(paths(out)["generations"], run, "generations.jsonl")


def answer_fact(answer):
  """The made-up fact a demo answer states: `in 1597.` -> `1597`.

  Demo answers (make_demo_data.py's _QUESTION_TEMPLATES) are lower-case marker
  words (`in`, `by`, `city of`), the fact (a year or capitalised names) and a
  period.
  """
  return re.sub(r"^[a-z ]+", "", answer).rstrip(".")


def fact_accuracy(gold_records, predictions):
  """Fraction of questions whose gold fact string is in the generated answer."""
  hits = [answer_fact(record["output"][0]["answer"]) in
          predictions[record["id"]] for record in gold_records]
  return sum(hits) / len(hits)
