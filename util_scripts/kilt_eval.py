r"""Scores KILT-format generations against KILT gold, as KILT's scripts do; or the retriever alone.

  python util_scripts/kilt_eval.py --gold=eli5-dev-kilt.jsonl \
      --guess=generations.jsonl [--output_path=metrics.json] \
      [--markdown_path=metrics.md] [--baselines_train_path=eli5-train-kilt.jsonl]

prints a markdown table and writes the metrics as JSON (fractions in [0, 1]):
KILT's answer metrics `rougeL`, `f1`, `em`, `accuracy`; its provenance
metrics `rprec` and `recall@5` (pages matched on `wikipedia_id`), with
eval_retrieval.py's whole report under `retrieval`; the KILT-* scores
`kilt_rougeL`, `kilt_f1`, `kilt_em`, `kilt_accuracy` (counted only where
R-precision is 1); 95 % bootstrap intervals of ROUGE-L, F1, KILT-RL and
KILT-F1 under `intervals`; and counts. With `--baselines_train_path`, also
scores Krishna et al.'s calibration baselines (the question copied; a random
training answer; the longest gold answer against the other gold answers) on
the same ids.

  python util_scripts/kilt_eval.py --gold=eli5-dev-kilt.jsonl \
      --guess=real/generations.jsonl --compare_guess=random/generations.jsonl \
      --grounding

also scores the second file, and the paired differences guess − compared
(ROUGE-L, F1, KILT-RL, KILT-F1 and, with --grounding, grounding) with 95 %
bootstrap intervals and sign-flip permutation p-values over the same ids.
`--grounding` scores how much each answer copies from the contexts it was
given (`meta.contexts` of generation.py's records; kilt_metrics.grounding),
beside the gold answers' grounding against the same contexts.

  python util_scripts/kilt_eval.py --gold=eli5-dev-kilt.jsonl \
      --cache_dir=CACHE --split=validation --kilt_title_map=title_map.json

scores the retriever alone, before any training: each question's provenance
is its top cached neighbours (`--num_provenance`, best first), mapped to
wikipedia_ids through the block titles (`titles.tfr`) and the title map.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import block_store  # pylint: disable=g-import-not-at-top
import eval_stats  # pylint: disable=g-import-not-at-top
import kilt_files  # pylint: disable=g-import-not-at-top
import kilt_metrics  # pylint: disable=g-import-not-at-top
import neighbour_cache  # pylint: disable=g-import-not-at-top
import utils  # pylint: disable=g-import-not-at-top

_FLAG_GOLD = flags.DEFINE_string(
    "gold", None, "KILT gold jsonl with answers (e.g. "
    f"{kilt_files.ELI5_SPLIT_FILES['validation']}); required.")
_FLAG_GUESS = flags.DEFINE_string(
    "guess", None, "KILT-format guess jsonl (one {'id', 'output': "
    "[{'answer', 'provenance'}]} per line), e.g. generation.py's output. "
    "This or --cache_dir is required.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Where to write the metrics as JSON (optional).")
_FLAG_MARKDOWN_PATH = flags.DEFINE_string(
    "markdown_path", None, "Where to write the markdown table (optional).")
_FLAG_BASELINES_TRAIN_PATH = flags.DEFINE_string(
    "baselines_train_path", None, "KILT training jsonl: when given, also "
    "score the copy-the-question, random-training-answer and longest-gold-"
    "answer baselines.")
_FLAG_BASELINES_SEED = flags.DEFINE_integer(
    "baselines_seed", 0, "Seed of the random-training-answer baseline.")
_FLAG_COMPARE_GUESS = flags.DEFINE_string(
    "compare_guess", None, "A second KILT-format guess jsonl on the same ids "
    "(e.g. generations with random contexts): scored too, with the paired "
    "differences --guess minus it, their 95 % intervals and p-values.")
_FLAG_GROUNDING = flags.DEFINE_boolean(
    "grounding", False, "Also score grounding: the share of each answer's "
    "n-grams (n = 1..4, not in the question) found in the contexts it was "
    "given (the guess files' meta.contexts, written by generation.py), and "
    "the gold answers' grounding against the same contexts.")
_FLAG_BOOTSTRAP_RESAMPLES = flags.DEFINE_integer(
    "bootstrap_resamples", eval_stats.DEFAULT_BOOTSTRAP.num_resamples,
    "Bootstrap resamples of the examples for the intervals (and sign flips "
    "for the permutation p-values).")
_FLAG_BOOTSTRAP_SEED = flags.DEFINE_integer(
    "bootstrap_seed", eval_stats.DEFAULT_BOOTSTRAP.seed,
    "Seed of the bootstrap and of the permutation test.")
_FLAG_CONFIDENCE = flags.DEFINE_float(
    "confidence", eval_stats.DEFAULT_BOOTSTRAP.confidence,
    "Confidence level of the bootstrap intervals, in (0, 1).")

_FLAG_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None,
    "Instead of --guess: score the retriever alone, each question's "
    "provenance being its top cached neighbours (needs --kilt_title_map and "
    "block titles).")
_FLAG_SPLIT = flags.DEFINE_enum(
    "split", "validation", list(neighbour_cache.SPLITS),
    "With --cache_dir: the cached split that --gold holds.")
_FLAG_NUM_PROVENANCE = flags.DEFINE_integer(
    "num_provenance", 0,
    "With --cache_dir: neighbours per question given as provenance, best "
    "first; 0: all cached.")
_FLAG_KILT_TITLE_MAP = flags.DEFINE_string(
    "kilt_title_map", None,
    "With --cache_dir: title -> wikipedia_id JSON map "
    "(util_scripts/kilt_title_map.py); required there.")
_FLAG_BLOCKS_PATH = flags.DEFINE_string(
    "blocks_path", None,
    "With --cache_dir: blocks.tfr of the cache's blocks. Default: the cache "
    "manifest's.")
_FLAG_TITLES_PATH = flags.DEFINE_string(
    "titles_path", None,
    "With --cache_dir: titles.tfr (record i: the page title of block i). "
    "Default: the cache manifest's titles_path.")


def _score_cache():
  """(result, table, warning or None) of the retriever's cached neighbours."""
  answer_only = [name for name, value in (
      ("--baselines_train_path", _FLAG_BASELINES_TRAIN_PATH.value),
      ("--compare_guess", _FLAG_COMPARE_GUESS.value),
      ("--grounding", _FLAG_GROUNDING.value)) if value]
  if answer_only:
    raise utils.UserError(
        f"{answer_only[0]} scores answers, which --cache_dir (the retriever "
        "alone) has none of; give it with --guess")
  if not _FLAG_KILT_TITLE_MAP.value:
    raise utils.UserError(
        "--cache_dir needs --kilt_title_map (util_scripts/kilt_title_map.py): "
        "KILT matches provenance by wikipedia_id, blocks carry only titles")
  if _FLAG_NUM_PROVENANCE.value < 0:
    raise utils.UserError(f"--num_provenance={_FLAG_NUM_PROVENANCE.value}: "
                          "must be >= 0 (0: all cached)")
  cache_dir = _FLAG_CACHE_DIR.value
  title_map = kilt_metrics.read_title_map(_FLAG_KILT_TITLE_MAP.value)
  manifest = neighbour_cache.read_manifest(cache_dir)
  neighbour_cache.check_manifest(
      manifest, cache_dir, split=_FLAG_SPLIT.value,
      num_neighbours=_FLAG_NUM_PROVENANCE.value or None)
  titles_path = _FLAG_TITLES_PATH.value or manifest.get("titles_path")
  if not titles_path:
    raise utils.UserError(
        f"{cache_dir}: the manifest has no titles_path, and the title map "
        "needs block titles; give --titles_path (REALM's titles.tfr)")
  blocks = block_store.BlockStore(
      _FLAG_BLOCKS_PATH.value or manifest["blocks_path"],
      manifest["num_blocks"], titles_path=titles_path)
  cache_name = f"{cache_dir} (split {_FLAG_SPLIT.value})"
  result, provenance = kilt_metrics.evaluate_cache(
      _FLAG_GOLD.value,
      neighbour_cache.split_files(cache_dir, manifest, _FLAG_SPLIT.value),
      cache_name, blocks.title, title_map, _FLAG_NUM_PROVENANCE.value)
  table = kilt_metrics.retrieval_table(
      {f"retriever ({os.path.basename(os.path.normpath(cache_dir))})": result})
  warning = kilt_metrics.unmapped_title_warning(provenance.values(),
                                                _FLAG_KILT_TITLE_MAP.value)
  return result, table, warning


def _score_guess():
  """(result, table, warning or None) of a guess file."""
  cache_only = [name for name, value in (
      ("--kilt_title_map", _FLAG_KILT_TITLE_MAP.value),
      ("--titles_path", _FLAG_TITLES_PATH.value),
      ("--blocks_path", _FLAG_BLOCKS_PATH.value)) if value]
  if cache_only:
    raise utils.UserError(
        f"{cache_only[0]} applies only with --cache_dir; a guess file's "
        "provenance already names its wikipedia_ids")
  if _FLAG_BOOTSTRAP_RESAMPLES.value < 1:
    raise utils.UserError(
        f"--bootstrap_resamples={_FLAG_BOOTSTRAP_RESAMPLES.value}: must be "
        ">= 1 (e.g. 2000)")
  if not 0.0 < _FLAG_CONFIDENCE.value < 1.0:
    raise utils.UserError(f"--confidence={_FLAG_CONFIDENCE.value}: must be "
                          "in (0, 1), e.g. 0.95")
  bootstrap = eval_stats.Bootstrap(
      num_resamples=_FLAG_BOOTSTRAP_RESAMPLES.value,
      confidence=_FLAG_CONFIDENCE.value, seed=_FLAG_BOOTSTRAP_SEED.value)
  result = kilt_metrics.evaluate_files(
      _FLAG_GOLD.value, _FLAG_GUESS.value,
      baselines_train_path=_FLAG_BASELINES_TRAIN_PATH.value,
      baselines_seed=_FLAG_BASELINES_SEED.value,
      compare_path=_FLAG_COMPARE_GUESS.value,
      with_grounding=_FLAG_GROUNDING.value, bootstrap=bootstrap)
  system_name, compared_name = _system_names(_FLAG_GUESS.value,
                                             _FLAG_COMPARE_GUESS.value)
  table = kilt_metrics.result_table(result, system_name=system_name,
                                    compared_name=compared_name)
  warning = None
  if result["num_without_provenance"] == result["num_examples"]:
    warning = (f"warning: no guess of {_FLAG_GUESS.value} names a "
               "wikipedia_id in its provenance, so R-precision, recall@5 and "
               "the KILT-* scores are 0 (generate with --kilt_title_map)")
  return result, table, warning


def _system_names(guess_path, compare_path):
  """The guess files' names in the tables: their file names, with their
  directories when both are called the same (generation.py's
  generations.jsonl in two output directories)."""
  if not compare_path:
    return os.path.basename(guess_path), None
  names = [os.path.basename(path) for path in (guess_path, compare_path)]
  if names[0] == names[1]:
    names = [os.path.join(os.path.basename(os.path.dirname(
        os.path.abspath(path))), name)
             for path, name in zip((guess_path, compare_path), names)]
  return names[0], names[1]


def main(argv):
  if not _FLAG_GOLD.value:
    raise utils.UserError("--gold is required (a KILT jsonl with answers)")
  utils.check_output_path(_FLAG_OUTPUT_PATH.value, "--output_path")
  utils.check_output_path(_FLAG_MARKDOWN_PATH.value, "--markdown_path")
  if bool(_FLAG_GUESS.value) == bool(_FLAG_CACHE_DIR.value):
    raise utils.UserError(
        "give exactly one of --guess (a KILT-format guess jsonl) and "
        "--cache_dir (a neighbour cache, to score the retriever alone)")
  result, table, warning = (_score_cache() if _FLAG_CACHE_DIR.value
                            else _score_guess())
  print(table, end="")
  if warning:
    print(warning, file=sys.stderr, flush=True)
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
  cli.run(main)
