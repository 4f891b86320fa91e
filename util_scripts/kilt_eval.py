"""Scores KILT-format generations against KILT gold answers, as KILT does.

  python util_scripts/kilt_eval.py --gold=eli5-dev-kilt.jsonl \
      --guess=generations.jsonl [--output_path=metrics.json] \
      [--markdown_path=metrics.md] [--baselines_train_path=eli5-train-kilt.jsonl]

Prints a markdown table (ROUGE-L, F1, EM in percent) and writes the metrics as
JSON (`rougeL`, `f1`, `em`, `accuracy` as fractions in [0, 1], with counts).
With `--baselines_train_path`, also scores Krishna et al.'s calibration
baselines (the question copied; a random training answer) on the same ids.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kilt_metrics  # pylint: disable=g-import-not-at-top
import utils  # pylint: disable=g-import-not-at-top

_FLAG_GOLD = flags.DEFINE_string(
    "gold", None, "KILT gold jsonl with answers (e.g. eli5-dev-kilt.jsonl); "
    "required.")
_FLAG_GUESS = flags.DEFINE_string(
    "guess", None, "KILT-format guess jsonl (one {'id', 'output': "
    "[{'answer'}]} per line), e.g. generation.py's output; required.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Where to write the metrics as JSON (optional).")
_FLAG_MARKDOWN_PATH = flags.DEFINE_string(
    "markdown_path", None, "Where to write the markdown table (optional).")
_FLAG_BASELINES_TRAIN_PATH = flags.DEFINE_string(
    "baselines_train_path", None, "KILT training jsonl: when given, also "
    "score the copy-the-question and random-training-answer baselines.")
_FLAG_BASELINES_SEED = flags.DEFINE_integer(
    "baselines_seed", 0, "Seed of the random-training-answer baseline.")


def main(argv):
  if not _FLAG_GOLD.value:
    raise utils.UserError("--gold is required (a KILT jsonl with answers)")
  if not _FLAG_GUESS.value:
    raise utils.UserError("--guess is required (a KILT-format guess jsonl)")
  result = kilt_metrics.evaluate_files(
      _FLAG_GOLD.value, _FLAG_GUESS.value,
      baselines_train_path=_FLAG_BASELINES_TRAIN_PATH.value,
      baselines_seed=_FLAG_BASELINES_SEED.value)
  table = kilt_metrics.result_table(
      result, system_name=os.path.basename(_FLAG_GUESS.value))
  print(table, end="")
  if _FLAG_OUTPUT_PATH.value:
    _make_parent_dir(_FLAG_OUTPUT_PATH.value)
    utils.atomic_write_json(_FLAG_OUTPUT_PATH.value, result)
  if _FLAG_MARKDOWN_PATH.value:
    _make_parent_dir(_FLAG_MARKDOWN_PATH.value)
    utils.atomic_write_text(_FLAG_MARKDOWN_PATH.value, table)


def _make_parent_dir(path):
  parent = os.path.dirname(path)
  if parent:
    utils.makedirs(parent)


if __name__ == "__main__":
  utils.run(main)
