"""KILT metrics: equal to KILT's own code on fixture cases; the CLI's files and errors."""

import collections
import json
import os
import re
import string
import subprocess
import sys

import pytest
from rouge import Rouge

import kilt_metrics
import utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILT_EVAL = os.path.join(REPO_ROOT, "util_scripts", "kilt_eval.py")


# A faithful re-statement of facebookresearch/KILT, kilt/eval_downstream.py:
# get_gold_answers, normalize_answer, _f1_score, _exact_match_score,
# _rougel_score, _metric_max_over_ground_truths, and the downstream part of
# _calculate_metrics (after validate_input has put the guesses in gold order).
# The retrieval-conditioned KILT-* metrics need provenance and are not here.
def kilt_get_gold_answers(gold):
  ground_truths = set()
  for item in gold["output"]:
    if "answer" in item and item["answer"] and len(item["answer"].strip()) > 0:
      ground_truths.add(item["answer"].strip())
  return ground_truths


def kilt_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
  return max(metric_fn(prediction, ground_truth)
             for ground_truth in ground_truths)


def kilt_normalize_answer(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


def kilt_f1_score(prediction, ground_truth):
  prediction_tokens = kilt_normalize_answer(prediction).split()
  ground_truth_tokens = kilt_normalize_answer(ground_truth).split()
  common = (collections.Counter(prediction_tokens) &
            collections.Counter(ground_truth_tokens))
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  return (2 * precision * recall) / (precision + recall)


def kilt_exact_match_score(prediction, ground_truth):
  return kilt_normalize_answer(prediction) == kilt_normalize_answer(ground_truth)


def kilt_rougel_score(prediction, ground_truth):
  try:
    scores = Rouge().get_scores(prediction, ground_truth, avg=True)
  except ValueError:
    return 0.0
  return scores["rouge-l"]["f"]


def kilt_downstream_metrics(gold_records, guess_records):
  total_count = accuracy = normalized_em = normalized_f1 = rougel = 0
  for guess_item, gold_item in zip(guess_records, gold_records):
    assert str(gold_item["id"]).strip() == str(guess_item["id"]).strip()
    total_count += 1
    gold_candidate_answers = kilt_get_gold_answers(gold_item)
    guess_answer = str(guess_item["output"][0]["answer"]).strip()
    if len(guess_answer) == 0:
      continue
    accuracy += int(guess_answer in gold_candidate_answers)
    normalized_em += kilt_metric_max_over_ground_truths(
        kilt_exact_match_score, guess_answer, gold_candidate_answers)
    normalized_f1 += kilt_metric_max_over_ground_truths(
        kilt_f1_score, guess_answer, gold_candidate_answers)
    rougel += kilt_metric_max_over_ground_truths(
        kilt_rougel_score, guess_answer, gold_candidate_answers)
  return {"accuracy": accuracy / total_count, "em": normalized_em / total_count,
          "f1": normalized_f1 / total_count, "rougeL": rougel / total_count}


def _gold(record_id, question, answers):
  return {"id": record_id, "input": question,
          "output": [{"answer": a, "provenance": []} for a in answers]}


def _guess(record_id, answer):
  return {"id": record_id, "input": "", "output": [{"answer": answer}]}


# (prediction, gold answers): the cases acceptance 2 names, and their edges.
FIXTURE_CASES = {
    "empty": ("", ["Water boils at one hundred degrees."]),
    "blank": ("   \n", ["Water boils at one hundred degrees."]),
    "several_gold": ("The sky is blue because air scatters blue light.",
                     ["Rayleigh scattering.",
                      "Air scatters blue light more than red light, so the "
                      "sky looks blue.",
                      "Because of the ocean."]),
    "punctuation_articles": ("The cat, a dog; AN owl!", ["cat dog owl"]),
    "articles_only": ("A... the!", ["The."]),
    "only_full_stops": ("...", ["It is hot. Very hot."]),
    "several_sentences": ("It is hot. It is very hot. Yes.",
                          ["It is hot. Very hot.", "Cold"]),
    "unicode": ("Café naïve — RÉSUMÉ… 東京 is big",
                ["café naive résumé 東京 is big", "Ünïcödé"]),
    "repeated_words": ("the the cat cat cat", ["cat sat on the cat mat"]),
    "gold_with_blank_answer": ("yes", ["  ", "Yes!"]),
    "exact": ("  Exactly this.  ", ["Exactly this.", "other"]),
}


@pytest.mark.parametrize("name", sorted(FIXTURE_CASES))
def test_per_example_metrics_equal_kilt(name):
  prediction, answers = FIXTURE_CASES[name]
  gold = kilt_get_gold_answers(_gold("q", "question", answers))
  assert kilt_metrics.gold_answers(_gold("q", "question", answers)) == gold
  ours = kilt_metrics.score_answer(prediction.strip(), gold)
  theirs = kilt_downstream_metrics([_gold("q", "question", answers)],
                                   [_guess("q", prediction)])
  assert ours == pytest.approx(theirs, abs=1e-12)


def test_corpus_metrics_equal_kilt_with_guesses_in_another_order():
  gold_records = [_gold(f" id{i} ", f"question {i}", answers)
                  for i, (_, answers) in enumerate(FIXTURE_CASES.values())]
  guess_records = [_guess(f"id{i}", prediction)
                   for i, (prediction, _) in enumerate(FIXTURE_CASES.values())]
  predictions = {record["id"]: record["output"][0]["answer"]
                 for record in reversed(guess_records)}
  ours = kilt_metrics.corpus_metrics(gold_records, predictions)
  theirs = kilt_downstream_metrics(gold_records, guess_records)
  for metric in theirs:
    assert ours[metric] == pytest.approx(theirs[metric], abs=1e-12)
  assert ours["num_examples"] == len(FIXTURE_CASES)
  assert ours["num_empty_predictions"] == 2


def test_metric_values_by_hand():
  assert kilt_metrics.normalize_answer("The Cat, a dog;  AN owl!") == "cat dog owl"
  assert kilt_metrics.normalize_answer("Ünïcödé — Über") == "ünïcödé — über"
  # Tokens {cat, sat} shared: precision 2/2, recall 2/4.
  assert kilt_metrics.token_f1("the cat sat", "cat sat on a mat") == (
      pytest.approx(2 * 1.0 * 0.5 / 1.5))
  # rouge 1.0.1 counts distinct reference words (5) and the LCS (2): R=2/5, P=1.
  assert kilt_metrics.rouge_l("cat sat", "the cat sat on the mat") == (
      pytest.approx(2 * 0.4 / 1.4, abs=1e-7))
  assert kilt_metrics.rouge_l("...", "anything") == 0.0
  assert kilt_metrics.exact_match("An apple.", "apple")


def test_rouge_l_of_a_long_sentence_does_not_hit_the_recursion_limit():
  words = " ".join(f"w{i % 97}" for i in range(1500))
  assert kilt_metrics.rouge_l(words, words) == pytest.approx(1.0, abs=1e-6)
  assert sys.getrecursionlimit() < 1500


def test_baselines_are_seeded_and_follow_krishna_et_al():
  gold_records = [_gold("a", "Why is it?", ["x"]), _gold("b", "How so?", ["y"])]
  train_records = [_gold(f"t{i}", "q", [f"answer {i}", f"other {i}"])
                   for i in range(50)]
  assert kilt_metrics.copy_input_predictions(gold_records) == {
      "a": " ".join(["Why is it?"] * 5), "b": " ".join(["How so?"] * 5)}
  first = kilt_metrics.random_train_answer_predictions(
      gold_records, train_records, seed=3)
  assert first == kilt_metrics.random_train_answer_predictions(
      gold_records, train_records, seed=3)
  all_answers = {item["answer"] for r in train_records for item in r["output"]}
  assert set(first.values()) <= all_answers
  assert any(kilt_metrics.random_train_answer_predictions(
      gold_records, train_records, seed=seed) != first for seed in range(4, 8))


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
  return str(path)


@pytest.fixture(name="gold_path")
def fixture_gold_path(tmp_path):
  return _write_jsonl(tmp_path / "gold.jsonl", [
      _gold(f"id{i}", f"question {i}", answers)
      for i, (_, answers) in enumerate(FIXTURE_CASES.values())])


def _all_guesses():
  return [_guess(f"id{i}", prediction)
          for i, (prediction, _) in enumerate(FIXTURE_CASES.values())]


def test_cli_writes_json_and_markdown_with_baselines(tmp_path, gold_path):
  guess_path = _write_jsonl(tmp_path / "guess.jsonl", _all_guesses())
  train_path = _write_jsonl(tmp_path / "train.jsonl", [
      _gold(f"t{i}", f"train question {i}", [f"train answer {i}"])
      for i in range(20)])
  output_path = tmp_path / "out" / "metrics.json"
  markdown_path = tmp_path / "out" / "metrics.md"
  completed = subprocess.run(
      [sys.executable, KILT_EVAL, f"--gold={gold_path}",
       f"--guess={guess_path}", f"--output_path={output_path}",
       f"--markdown_path={markdown_path}",
       f"--baselines_train_path={train_path}"],
      capture_output=True, text=True, check=True)
  result = json.loads(output_path.read_text())
  expected = kilt_downstream_metrics(
      [json.loads(line) for line in open(gold_path, encoding="utf-8")],
      _all_guesses())
  for metric in ("rougeL", "f1", "em", "accuracy"):
    assert result[metric] == pytest.approx(expected[metric], abs=1e-12)
    assert 0.0 <= result[metric] <= 1.0
  assert result["num_examples"] == len(FIXTURE_CASES)
  assert set(result["baselines"]) == {"copy_input", "random_train_answer"}
  table = markdown_path.read_text()
  assert table in completed.stdout
  assert f"| guess.jsonl | {100 * expected['rougeL']:.2f} |" in table
  assert "| baseline: copy input |" in table


@pytest.mark.parametrize("gold_lines,guess_lines,message", [
    ([_gold("a", "q", ["x"]), {"id": "b", "input": "test question"}],
     [_guess("a", "x"), _guess("b", "y")], "line 2 (id 'b') has no gold answer"),
    ([_gold("a", "q", ["x"])], [{"output": [{"answer": "x"}]}],
     "line 1: no 'id' field"),
    ([_gold("a", "q", ["x"])], [{"id": "a"}], "line 1: no 'output' field"),
    ([_gold("a", "q", ["x"])], [_guess("a", "x"), _guess("zz", "y")],
     "1 ids are not in"),
    ([_gold("a", "q", ["x"]), _gold("b", "q", ["y"])], [_guess("a", "x")],
     "no prediction for 1 of 2 ids"),
    ([_gold("a", "q", ["x"])], [_guess("a", "x"), '{"id": "b", "output": ['],
     "line 2: malformed JSON"),
    ([_gold("a", "q", ["x"])],
     [{"id": "a", "output": [{"answer": "x"}, {"answer": "y"}]}],
     "exactly one"),
])
def test_bad_inputs_are_one_line_user_errors(tmp_path, gold_lines, guess_lines,
                                             message):
  gold_path = _write_jsonl(tmp_path / "gold.jsonl", gold_lines)
  guess_path = _write_jsonl(tmp_path / "guess.jsonl", guess_lines)
  with pytest.raises(utils.UserError, match=re.escape(message)):
    kilt_metrics.evaluate_files(gold_path, guess_path)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
  gold_path = _write_jsonl(tmp_path / "test.jsonl",
                           [{"id": "a", "input": "a test question"}])
  guess_path = _write_jsonl(tmp_path / "guess.jsonl", [_guess("a", "x")])
  completed = subprocess.run(
      [sys.executable, KILT_EVAL, f"--gold={gold_path}", f"--guess={guess_path}"],
      capture_output=True, text=True, check=False)
  assert completed.returncode == utils.USER_ERROR_EXIT_CODE
  error_lines = [line for line in completed.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1 and "has no gold answer" in error_lines[0]
