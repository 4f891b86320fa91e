"""KILT's downstream answer metrics, computed exactly as KILT computes them.

Follows `kilt/eval_downstream.py` of facebookresearch/KILT: `normalize_answer`,
`_exact_match_score`, `_f1_score`, `_rougel_score`,
`_metric_max_over_ground_truths`, `get_gold_answers`, `validate_input` and
`_calculate_metrics`:

- gold answers: the set of stripped, non-empty `output[*].answer` strings;
- the guess: `output[0].answer`, stripped; an empty guess scores 0 on every
  metric but still counts in the denominator;
- exact match and token F1 after normalisation (lower case, punctuation
  removed, articles a/an/the removed, white space collapsed); ROUGE-L is the
  F-measure of `rouge.Rouge().get_scores(guess, gold)["rouge-l"]` on the raw
  text (no normalisation), 0.0 where the package raises ValueError (a
  hypothesis or reference with no sentence left after splitting on ".");
- each metric is the maximum over the gold answers, then the plain mean over
  all gold ids (guesses are aligned to the gold file's ids, in its order).

Where KILT would stop on an assertion (missing, duplicate or unknown ids, a
guess without exactly one answer, a gold record without answers), this module
raises `utils.UserError` naming the file, the line and the id.

Also: the calibration baselines of Krishna et al. 2021 ("Hurdles to Progress
in Long-form Question Answering"), as their `generate_final_guess_bounds.py`
builds them: the question copied five times, and a random training answer.
"""

import collections
import json
import random
import re
import string
import sys

import rouge
import tensorflow as tf
from tqdm import tqdm

import utils

METRIC_NAMES = ("rougeL", "f1", "em", "accuracy")
# Krishna et al.'s `copy_input` bound joins five copies of the question.
COPY_INPUT_REPEATS = 5

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ROUGE_L = rouge.Rouge(metrics=["rouge-l"])


def normalize_answer(text):
  """KILT's normalisation: lower, drop punctuation, drop articles, fix spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction, ground_truth):
  return normalize_answer(prediction) == normalize_answer(ground_truth)


def token_f1(prediction, ground_truth):
  """Bag-of-tokens F1 between the normalised texts (0 when nothing is shared)."""
  prediction_tokens = normalize_answer(prediction).split()
  ground_truth_tokens = normalize_answer(ground_truth).split()
  common = (collections.Counter(prediction_tokens) &
            collections.Counter(ground_truth_tokens))
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(ground_truth_tokens)
  return 2 * precision * recall / (precision + recall)


def rouge_l(prediction, ground_truth):
  """ROUGE-L F of the `rouge` package on the raw texts, 0.0 where it refuses."""
  # rouge 1.0.1 rebuilds the longest common subsequence recursively, one frame
  # per word of a sentence pair; a long generation without a full stop would
  # exceed Python's default limit, where KILT's script crashes. Raising the
  # limit gives the value KILT's formula defines.
  needed_depth = len(prediction.split()) + len(ground_truth.split()) + 1000
  previous_limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(previous_limit, needed_depth))
  try:
    scores = _ROUGE_L.get_scores(prediction, ground_truth, avg=True)
  except ValueError:  # "Hypothesis is empty." and friends, as KILT catches.
    return 0.0
  finally:
    sys.setrecursionlimit(previous_limit)
  return scores["rouge-l"]["f"]


def gold_answers(record):
  """The set of stripped, non-empty answers of a KILT record."""
  return {
      item["answer"].strip()
      for item in record.get("output", [])
      if isinstance(item, dict) and item.get("answer") and
      item["answer"].strip()
  }


def score_answer(prediction, answers):
  """Per-example metrics of one guess against its gold answers.

  Args:
    prediction: the guess, already stripped.
    answers: the non-empty set of gold answers.

  Returns:
    {"rougeL", "f1", "em", "accuracy"}: each the maximum over the answers;
    all 0 for an empty guess. `accuracy` is KILT's strict (unnormalised)
    exact match.
  """
  if not prediction:
    return {name: 0.0 for name in METRIC_NAMES}
  return {
      "rougeL": max(rouge_l(prediction, answer) for answer in answers),
      "f1": max(token_f1(prediction, answer) for answer in answers),
      "em": float(max(exact_match(prediction, answer) for answer in answers)),
      "accuracy": float(prediction in answers),
  }


def corpus_metrics(gold_records, predictions, description="scoring"):
  """KILT's corpus-level metrics: per-example maxima averaged over gold ids.

  Args:
    gold_records: KILT records with answers, each with a unique `id`.
    predictions: {id: guess answer string}, one per gold id.
    description: label of the progress bar.

  Returns:
    {"rougeL", "f1", "em", "accuracy"} as fractions in [0, 1], plus
    `num_examples` and `num_empty_predictions`.
  """
  totals = {name: 0.0 for name in METRIC_NAMES}
  num_empty = 0
  for record in tqdm(gold_records, desc=description, unit="example",
                     disable=len(gold_records) < 100):
    prediction = predictions[_record_id(record)].strip()
    num_empty += not prediction
    for name, value in score_answer(prediction, gold_answers(record)).items():
      totals[name] += value
  count = len(gold_records)
  metrics = {name: total / count if count else 0.0
             for name, total in totals.items()}
  metrics.update(num_examples=count, num_empty_predictions=num_empty)
  return metrics


def _record_id(record):
  # KILT matches ids as `str(id).strip()`.
  return str(record["id"]).strip()


def read_jsonl(path, what):
  """The objects of a jsonl file (local or gs://); blank lines are skipped.

  Returns a list of (line_number, object). A missing file, a malformed line
  or a line that is not an object is a UserError naming the line.
  """
  if not tf.io.gfile.exists(path):
    raise utils.UserError(f"{what} {path} does not exist")
  records = []
  with tf.io.gfile.GFile(path, "r") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise utils.UserError(
            f"{path}: line {line_number}: malformed JSON ({error.msg}, "
            f"column {error.colno})") from None
      if not isinstance(record, dict):
        raise utils.UserError(
            f"{path}: line {line_number}: expected a JSON object, got "
            f"{type(record).__name__}")
      records.append((line_number, record))
  return records


def read_gold(path):
  """KILT gold records, each with an `id` and at least one answer."""
  records = []
  seen = set()
  for line_number, record in read_jsonl(path, "gold file"):
    if "id" not in record:
      raise utils.UserError(f"{path}: line {line_number}: no 'id' field")
    record_id = _record_id(record)
    if record_id in seen:
      raise utils.UserError(
          f"{path}: line {line_number}: id {record_id!r} appears twice")
    seen.add(record_id)
    if not isinstance(record.get("input"), str):
      raise utils.UserError(
          f"{path}: line {line_number} (id {record_id!r}): no 'input' string "
          "(the question)")
    if not gold_answers(record):
      raise utils.UserError(
          f"{path}: line {line_number} (id {record_id!r}) has no gold answer; "
          "the gold file must be a split with answers (the test split "
          "eli5-test_without_answers-kilt.jsonl cannot be scored locally)")
    records.append(record)
  if not records:
    raise utils.UserError(f"{path}: no records")
  return records


def read_guesses(path):
  """{id: answer} of a KILT-format guess file (one answer per line)."""
  predictions = {}
  for line_number, record in read_jsonl(path, "guess file"):
    missing = [field for field in ("id", "output") if field not in record]
    if missing:
      raise utils.UserError(
          f"{path}: line {line_number}: no {' or '.join(map(repr, missing))} "
          "field; expected {\"id\": ..., \"output\": [{\"answer\": ...}]}")
    record_id = _record_id(record)
    output = record["output"]
    if (not isinstance(output, list) or len(output) != 1 or
        not isinstance(output[0], dict) or
        not isinstance(output[0].get("answer"), str)):
      raise utils.UserError(
          f"{path}: line {line_number} (id {record_id!r}): 'output' must hold "
          "exactly one {\"answer\": string}, as KILT requires")
    if record_id in predictions:
      raise utils.UserError(
          f"{path}: line {line_number}: id {record_id!r} appears twice")
    predictions[record_id] = output[0]["answer"]
  return predictions


def check_ids(gold_records, predictions, gold_path, guess_path):
  """Every gold id has a guess and every guess has a gold id."""
  gold_ids = [_record_id(record) for record in gold_records]
  missing = [record_id for record_id in gold_ids if record_id not in predictions]
  if missing:
    raise utils.UserError(
        f"{guess_path}: no prediction for {len(missing)} of {len(gold_ids)} "
        f"ids of {gold_path} (first: {missing[0]!r})")
  unknown = sorted(set(predictions) - set(gold_ids))
  if unknown:
    raise utils.UserError(
        f"{guess_path}: {len(unknown)} ids are not in {gold_path} (first: "
        f"{unknown[0]!r}); is the guess file for another split?")


def copy_input_predictions(gold_records):
  """Krishna et al.'s `copy_input` baseline: the question five times."""
  return {_record_id(record): " ".join([record["input"]] * COPY_INPUT_REPEATS)
          for record in gold_records}


def random_train_answer_predictions(gold_records, train_records, seed):
  """Krishna et al.'s `random_train_ans` baseline: any training answer, seeded."""
  train_answers = [item["answer"] for record in train_records
                   for item in record.get("output", [])
                   if isinstance(item, dict) and "answer" in item]
  if not train_answers:
    raise ValueError("the training records hold no answers")
  rng = random.Random(seed)
  return {_record_id(record): rng.choice(train_answers)
          for record in gold_records}


def markdown_table(rows):
  """A markdown table of {system name: metrics}, metrics shown in percent."""
  lines = ["| system | ROUGE-L (%) | F1 (%) | EM (%) | examples |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for name, metrics in rows.items():
    lines.append(
        f"| {name} | {100 * metrics['rougeL']:.2f} | {100 * metrics['f1']:.2f}"
        f" | {100 * metrics['em']:.2f} | {metrics['num_examples']} |")
  return "\n".join(lines) + "\n"


def evaluate_files(gold_path, guess_path, *, baselines_train_path=None,
                   baselines_seed=0):
  """Scores a guess file against a KILT gold file, with optional baselines.

  Returns the guess's metrics (`rougeL`, `f1`, `em`, `accuracy` in [0, 1],
  `num_examples`, `num_empty_predictions`), the two paths, and with
  `baselines_train_path` a `baselines` dict {"copy_input": metrics,
  "random_train_answer": metrics}.
  """
  gold_records = read_gold(gold_path)
  predictions = read_guesses(guess_path)
  check_ids(gold_records, predictions, gold_path, guess_path)
  result = corpus_metrics(gold_records, predictions)
  result.update(gold_path=gold_path, guess_path=guess_path)
  if baselines_train_path:
    train_records = [record for _, record in read_jsonl(
        baselines_train_path, "baselines training file")]
    try:
      random_answers = random_train_answer_predictions(
          gold_records, train_records, baselines_seed)
    except ValueError:
      raise utils.UserError(
          f"{baselines_train_path}: no answers to draw the random-answer "
          "baseline from (expected the KILT training split)") from None
    result["baselines"] = {
        "copy_input": corpus_metrics(
            gold_records, copy_input_predictions(gold_records),
            "copy-input baseline"),
        "random_train_answer": corpus_metrics(
            gold_records, random_answers, "random-answer baseline"),
    }
    result["baselines_seed"] = baselines_seed
  return result


def result_table(result, system_name="guess"):
  """The markdown table of `evaluate_files`' result: the guess, then baselines."""
  rows = {system_name: result}
  for name, metrics in result.get("baselines", {}).items():
    rows[f"baseline: {name.replace('_', ' ')}"] = metrics
  return markdown_table(rows)
