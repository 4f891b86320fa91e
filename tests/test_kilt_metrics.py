"""KILT metrics: equal to KILT's official scripts on fixture cases and on a varied
set of guesses with provenance; the title map, retriever-only scoring from the
cache, the CLI's files and errors.

KILT's code is run, never restated: `kilt.eval_downstream` and
`kilt.eval_retrieval` of ../shared/reference/kilt (facebookresearch/KILT),
imported for per-example checks and run as `python -m kilt.eval_downstream
GUESS GOLD` / `python -m kilt.eval_retrieval GUESS GOLD` on the same files as
our `util_scripts/kilt_eval.py` for the acceptance test.
"""

import ast
import json
import os
import random
import re
import subprocess
import sys

import pytest
import tensorflow as tf

import kilt_files
import kilt_metrics
import utils
from cache_fixtures import write_cache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILT_EVAL = os.path.join(REPO_ROOT, "util_scripts", "kilt_eval.py")
KILT_TITLE_MAP = os.path.join(REPO_ROOT, "util_scripts", "kilt_title_map.py")
KILT_REFERENCE = os.path.join(REPO_ROOT, "..", "shared", "reference", "kilt")
REAL_DEV = os.path.join(REPO_ROOT, "..", "shared", "fixtures",
                        "kilt_eli5_sample",
                        kilt_files.ELI5_SPLIT_FILES["validation"])

sys.path.insert(0, KILT_REFERENCE)
from kilt import eval_downstream as kilt_downstream  # pylint: disable=g-import-not-at-top,wrong-import-position
from kilt import eval_retrieval as kilt_retrieval  # pylint: disable=g-import-not-at-top,wrong-import-position

# Our JSON keys -> KILT's eval_downstream.py result.
DOWNSTREAM_KEYS = {"rougeL": ("downstream", "rougel"), "f1": ("downstream", "f1"),
                   "em": ("downstream", "em"),
                   "accuracy": ("downstream", "accuracy"),
                   "kilt_rougeL": ("kilt", "KILT-rougel"),
                   "kilt_f1": ("kilt", "KILT-f1"), "kilt_em": ("kilt", "KILT-em"),
                   "kilt_accuracy": ("kilt", "KILT-accuracy"),
                   "rprec": ("retrieval", "Rprec"),
                   "recall@5": ("retrieval", "recall@5")}


def kilt_downstream_metrics(gold_records, guess_records):
  """KILT's own `_calculate_metrics` (guesses in gold order), by our names."""
  result = kilt_downstream._calculate_metrics(gold_records, guess_records)  # pylint: disable=protected-access
  return {name: result[group][key] for name, (group, key)
          in DOWNSTREAM_KEYS.items() if group != "retrieval"}


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
  gold = kilt_downstream.get_gold_answers(_gold("q", "question", answers))
  assert kilt_metrics.gold_answers(_gold("q", "question", answers)) == gold
  ours = kilt_metrics.score_answer(prediction.strip(), gold)
  theirs = kilt_downstream_metrics([_gold("q", "question", answers)],
                                   [_guess("q", prediction)])
  assert ours == pytest.approx(
      {name: theirs[name] for name in kilt_metrics.METRIC_NAMES}, abs=1e-12)


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


@pytest.mark.slow
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


def test_per_example_scores_average_to_the_corpus_metrics_with_intervals():
  gold_records = [_gold(f"id{i}", f"question {i}", answers)
                  for i, (_, answers) in enumerate(FIXTURE_CASES.values())]
  predictions = {f"id{i}": prediction
                 for i, (prediction, _) in enumerate(FIXTURE_CASES.values())}
  scores, _ = kilt_metrics.answer_scores(gold_records, predictions)
  metrics = kilt_metrics.corpus_metrics(gold_records, predictions)
  assert [row["id"] for row in scores] == list(predictions)
  for name in kilt_metrics.INTERVAL_METRICS:
    interval = metrics["intervals"][name]
    mean = sum(row[name] for row in scores) / len(scores)
    assert metrics[name] == pytest.approx(mean, abs=1e-12)
    assert interval["estimate"] == pytest.approx(mean, abs=1e-12)
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    assert interval["num_examples"] == len(FIXTURE_CASES)
  assert metrics["intervals"]["rougeL"]["low"] < metrics["rougeL"] < (
      metrics["intervals"]["rougeL"]["high"])
  assert metrics["num_empty_predictions"] == 2


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


@pytest.mark.slow
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
  assert set(result["baselines"]) == {"copy_input", "random_train_answer",
                                      "longest_gold_answer"}
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
    # Malformed provenance, where KILT's scripts would crash or miscount.
    ([_gold("a", "q", ["x"])],
     [{"id": "a", "output": [{"answer": "x", "provenance": {"wikipedia_id": "1"}}]}],
     "line 1 (id 'a'): 'provenance' is dict, expected a list"),
    ([_gold("a", "q", ["x"])],
     [{"id": "a", "output": [{"answer": "x", "provenance": ["12"]}]}],
     "line 1 (id 'a'): provenance[0] is str, expected an object"),
    ([_gold("a", "q", ["x"])],
     [{"id": "a", "output": [{"answer": "x", "provenance": [
         {"wikipedia_id": "1"}, {"wikipedia_id": [1, 2]}]}]}],
     "provenance[1].wikipedia_id is [1, 2], expected a string"),
    ([_gold("a", "q", ["x"])],
     [{"id": "a", "output": [{"answer": "x", "provenance": [
         {"wikipedia_id": "1", "text": 7}]}]}],
     "provenance[0].text is 7, expected a string"),
    ([{"id": "a", "input": "q", "output": [
        {"answer": "x"}, {"provenance": [{"wikipedia_id": "1", "title": 3}]}]}],
     [_guess("a", "x")], "gold.jsonl: line 1 (id 'a'): provenance[0].title is 3"),
])
def test_bad_inputs_are_one_line_user_errors(tmp_path, gold_lines, guess_lines,
                                             message):
  gold_path = _write_jsonl(tmp_path / "gold.jsonl", gold_lines)
  guess_path = _write_jsonl(tmp_path / "guess.jsonl", guess_lines)
  with pytest.raises(utils.UserError, match=re.escape(message)):
    kilt_metrics.evaluate_files(gold_path, guess_path)


@pytest.mark.slow
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



# ---------------------------------------------------------------------------
# Provenance: R-precision, recall@k and the KILT-* scores, against KILT's code
# ---------------------------------------------------------------------------


def test_rank_moves_a_partial_evidence_set_to_its_last_page():
  """KILT's `get_rank` by hand: pages a, x, b against the set {a, b}."""
  gold = {"id": "q", "input": "q", "output": [
      {"answer": "x"},
      {"provenance": [{"wikipedia_id": "a"}, {"wikipedia_id": "b"}]},
      {"provenance": [{"wikipedia_id": "c"}]}]}
  provenance = [{"wikipedia_id": page} for page in ("a", "x", "b", "a", "c")]
  pages = kilt_metrics.provenance_pages(provenance)
  assert pages == ["a", "x", "b", "c"]
  # a: placeholder of set 0; x: False; b completes set 0 (its placeholder
  # leaves); c completes set 1.
  assert kilt_metrics.evidence_rank(
      pages, kilt_metrics.evidence_sets(gold)) == [False, True, True]
  metrics = kilt_metrics.retrieval_metrics(provenance, gold)
  theirs = kilt_retrieval.get_ranking_metrics(
      {"id": "q", "output": [{"provenance": provenance}]}, gold,
      list(kilt_metrics.RETRIEVAL_KS), ["wikipedia_id"])
  # get_ranking_metrics also fills recall@1 and success_rate@1, which its
  # corpus-level `compute` never reports.
  assert metrics == pytest.approx({name: theirs[name] for name in metrics},
                                  abs=1e-12)
  assert metrics["precision@1"] == 0.0 and metrics["recall@5"] == 1.0
  # R-precision: the set {c} (R = 1) is not the first page; {a, b} (R = 2)
  # has one of the first two.
  assert metrics["Rprec"] == 0.5


_WORDS = ("the sky is blue because air scatters light water boils at a lower "
          "heat on high mountains ice floats since it is lighter than liquid "
          "birds fly south in winter to find food plants need sun to grow "
          "green leaves café naïve résumé an of and").split()
_PAGES = [(str(1000 + index), f"Page {word.title()}") for index, word in
          enumerate("alpha beta gamma delta epsilon zeta eta theta iota kappa "
                    "lambda mu nu xi omicron pi rho sigma tau upsilon phi chi "
                    "psi omega".split())]


def _sentence(rng, low=3, high=12):
  words = rng.choices(_WORDS, k=rng.randint(low, high))
  text = " ".join(words)
  return rng.choice([text, text.capitalize() + ".", text + "!",
                     text.upper() + ". " + rng.choice(_WORDS) + "."])


def _page_entry(rng, page):
  page_id, title = page
  entry = {"wikipedia_id": page_id, "title": title}
  kind = rng.random()
  if kind < 0.05:
    entry["wikipedia_id"] = int(page_id)  # KILT compares str(id).
  elif kind < 0.1:
    entry["wikipedia_id"] = f" {page_id} "  # ... stripped.
  elif kind < 0.13:
    del entry["wikipedia_id"]  # A gold entry without the rank key.
  return entry


def _varied_gold(rng, index):
  """A gold record: 1-3 answers, 0-3 evidence sets (some repeated)."""
  answers = [_sentence(rng) for _ in range(rng.randint(1, 3))]
  outputs = []
  for answer in answers:
    output = {"answer": answer}
    if rng.random() < 0.3:
      output["provenance"] = []  # As KILT's HF copy of ELI5 has it.
    outputs.append(output)
  sets = []
  for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
    if sets and rng.random() < 0.2:
      sets.append(sets[-1])  # A duplicate evidence set.
    else:
      sets.append([_page_entry(rng, page)
                   for page in rng.sample(_PAGES, rng.randint(1, 3))])
  outputs.extend({"provenance": entries, "meta": {"index": index}}
                 for entries in sets)
  rng.shuffle(outputs)
  titles = [entry["title"] for entries in sets for entry in entries]
  question = _sentence(rng)
  if titles and rng.random() < 0.3:
    question += " about " + rng.choice(titles).lower()
  record_id = f"q{index:03d}"
  return {"id": f" {record_id} " if index % 17 == 0 else record_id,
          "input": question, "output": outputs, "meta": {}}


def _varied_answer(rng, gold):
  answers = [o["answer"] for o in gold["output"] if "answer" in o]
  answer = rng.choice(answers)
  words = answer.split()
  return rng.choice([
      answer, f"  {answer}  ", answer.lower().rstrip(".!") + " ...",
      " ".join(words[:max(1, len(words) // 2)]),
      " ".join(rng.sample(words, len(words))), _sentence(rng), "", "   ",
      "...", answer + " " + _sentence(rng)])


def _varied_provenance(rng, gold):
  """None (no key), or a list: right, partly right, wrong, repeated, with text."""
  sets = [[e for e in o["provenance"]] for o in gold["output"]
          if o.get("provenance")]
  kind = rng.randrange(8)
  if kind == 0:
    return None if rng.random() < 0.5 else []
  chosen = [dict(e) for e in rng.choice(sets)] if sets else []
  if kind == 1 or kind == 2:  # One evidence set, in any order.
    rng.shuffle(chosen)
    entries = chosen
  elif kind == 3:  # Part of a set, after wrong pages.
    entries = ([_page_entry(rng, p) for p in rng.sample(_PAGES, 2)] +
               chosen[:max(1, len(chosen) - 1)])
  elif kind == 4:  # Wrong pages only.
    entries = [_page_entry(rng, p) for p in rng.sample(_PAGES, 3)]
  elif kind == 5:  # Every set, repeated pages, long enough for @20.
    entries = [dict(e) for entries in sets for e in entries] * 2
    entries += [_page_entry(rng, p) for p in rng.sample(_PAGES, 15)]
    rng.shuffle(entries)
  elif kind == 6:  # Right pages interleaved with wrong ones.
    entries = []
    for entry in chosen:
      entries += [_page_entry(rng, rng.choice(_PAGES)), entry]
  else:  # Entries without a usable id: none, null, title only.
    entries = [{"title": "Page Alpha"}, {"wikipedia_id": None}] + chosen
  for entry in entries:
    if rng.random() < 0.15:  # Text for the answer/entity-in-context metrics.
      answers = [o["answer"] for o in gold["output"] if "answer" in o]
      entry["text"] = rng.choice([
          rng.choice(answers), f"{entry.get('title', '')} {_sentence(rng)}",
          f"{rng.choice(answers)} on {entry.get('title', 'nothing')}",
          _sentence(rng)])
  return entries


def _varied_files(directory, num_synthetic=270, seed=0):
  """Gold and guess files (guesses shuffled); also a copy of the guesses
  where every guess has a provenance key, as eval_retrieval.py demands.

  The gold file starts with the five real ELI5 dev lines of the fixtures.
  """
  rng = random.Random(seed)
  with open(REAL_DEV, encoding="utf-8") as f:
    gold = [json.loads(line) for line in f if line.strip()]
  gold += [_varied_gold(rng, index) for index in range(num_synthetic)]
  guesses = []
  for record in gold:
    output = {"answer": _varied_answer(rng, record)}
    provenance = _varied_provenance(rng, record)
    if provenance is not None:
      output["provenance"] = provenance
    guesses.append({"id": record["id"].strip(), "output": [output]})
  rng.shuffle(guesses)
  with_keys = [{"id": g["id"], "output": [dict(g["output"][0]) | {
      "provenance": g["output"][0].get("provenance", [])}]} for g in guesses]
  return {"gold": _write_jsonl(os.path.join(directory, "gold.jsonl"), gold),
          "guess": _write_jsonl(os.path.join(directory, "guess.jsonl"), guesses),
          "guess_with_keys": _write_jsonl(
              os.path.join(directory, "guess_with_keys.jsonl"), with_keys),
          "records": (gold, guesses)}


def _run_kilt_script(module, guess_path, gold_path):
  """KILT's script as its README runs it; its printed result, parsed."""
  completed = subprocess.run(
      [sys.executable, "-m", module, guess_path, gold_path], cwd=REPO_ROOT,
      env=dict(os.environ, PYTHONPATH=KILT_REFERENCE), capture_output=True,
      text=True, check=True)
  printed = completed.stdout[completed.stdout.index("{") if module.endswith(
      "downstream") else completed.stdout.index("OrderedDict"):]
  if printed.startswith("OrderedDict"):
    # pprint shows eval_retrieval's OrderedDict as OrderedDict([(key, value)]).
    return dict(ast.literal_eval(printed[len("OrderedDict("):].strip()[:-1]))
  return ast.literal_eval(printed)


def _run_kilt_eval(gold_path, guess_path, output_path):
  completed = subprocess.run(
      [sys.executable, KILT_EVAL, f"--gold={gold_path}",
       f"--guess={guess_path}", f"--output_path={output_path}"],
      capture_output=True, text=True, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  with open(output_path, encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
def test_every_metric_equals_kilts_official_scripts(tmp_path):
  """Acceptance: ROUGE-L, F1, EM, accuracy, R-Prec, recall@5, KILT-RL,
  KILT-F1, KILT-EM, KILT-accuracy, and all of eval_retrieval.py's report,
  equal KILT's scripts run on the same files, to 1e-9."""
  files = _varied_files(str(tmp_path))
  gold, guesses = files["records"]
  # The set is varied: provenance absent, empty, right, partly right, wrong;
  # several evidence sets; empty answers.
  outputs = [g["output"][0] for g in guesses]
  assert len(outputs) >= 200
  assert sum("provenance" not in o for o in outputs) >= 5
  assert sum(bool(o.get("provenance")) for o in outputs) >= 200
  assert sum(not o["answer"].strip() for o in outputs) >= 10
  assert sum(len([x for x in r["output"] if x.get("provenance")]) >= 2
             for r in gold) >= 50

  for guess_file in ("guess", "guess_with_keys"):
    ours = _run_kilt_eval(files["gold"], files[guess_file],
                          str(tmp_path / f"{guess_file}.metrics.json"))
    theirs = _run_kilt_script("kilt.eval_downstream", files[guess_file],
                              files["gold"])
    for name, (group, key) in DOWNSTREAM_KEYS.items():
      assert ours[name] == pytest.approx(theirs[group][key], abs=1e-9), name
  # eval_retrieval.py refuses guesses without a provenance key; with keys
  # (an empty list where there was none) the scores are the same.
  retrieval = _run_kilt_script("kilt.eval_retrieval", files["guess_with_keys"],
                               files["gold"])
  assert set(ours["retrieval"]) == set(retrieval)
  for name, value in retrieval.items():
    assert ours["retrieval"][name] == pytest.approx(value, abs=1e-9), name
  # Nothing trivially 0 or 1.
  for name in DOWNSTREAM_KEYS:
    assert 0.0 < ours[name] < 1.0, name
  for name in ("precision@1", "recall@20", "success_rate@5",
               "answer_in_context@5", "answer_and_ent_in_context@20",
               "entity_in_context@10", "entity_in_input"):
    assert 0.0 < ours["retrieval"][name] < 1.0, name
  assert ours["num_without_provenance"] > 0


# ---------------------------------------------------------------------------
# The title map and block provenance
# ---------------------------------------------------------------------------


def _page(page_id, title):
  return {"_id": page_id, "wikipedia_id": page_id, "wikipedia_title": title,
          "text": [title + "\n", "Some text.\n"], "anchors": [],
          "categories": "", "history": {}, "wikidata_info": {}}


@pytest.mark.slow
def test_title_map_cli_keeps_the_first_page_of_a_title(tmp_path):
  source = _write_jsonl(tmp_path / kilt_files.KNOWLEDGE_SOURCE_FILE, [
      _page("12", "Anarchism"), _page("25", "Autism"), "",
      _page("39", "Albedo"), _page("40", "Anarchism"), _page("25", "Autism"),
      _page("303", "Café Müller")])
  output = tmp_path / "maps" / "title_map.json"
  completed = subprocess.run(
      [sys.executable, KILT_TITLE_MAP, f"--knowledge_source={source}",
       f"--output_path={output}"], capture_output=True, text=True, check=False)
  assert completed.returncode == 0, completed.stderr[-2000:]
  assert json.loads(output.read_text(encoding="utf-8")) == {
      "Anarchism": "12", "Autism": "25", "Albedo": "39", "Café Müller": "303"}
  assert ("wrote 4 titles of 6 pages to " in completed.stdout and
          "2 pages repeat an earlier page's title (the first page kept), 1 of "
          "them with another wikipedia_id" in completed.stdout)
  assert kilt_metrics.read_title_map(str(output))["Anarchism"] == "12"
  assert not [name for name in os.listdir(output.parent) if ".tmp" in name]


@pytest.mark.parametrize("lines,message", [
    ([_page("1", "A"), _page("2", "B"), '{"_id": "3", "wikipedia_id": '],
     "ks.json: line 3: malformed JSON"),
    ([_page("1", "A"), {"_id": "2", "wikipedia_id": "2", "text": []}],
     "ks.json: line 2: no 'wikipedia_title' field"),
    (['["not", "a", "page"]'], "line 1: expected a JSON object, got list"),
    ([_page("1", "A"), {"_id": "2"}],
     "ks.json: line 2: no 'wikipedia_id' or 'wikipedia_title' field"),
    ([{"wikipedia_id": 2, "wikipedia_title": "B"}],
     "line 1: wikipedia_title 'B' and wikipedia_id 2, expected two strings"),
    ([""], "no lines (an empty KILT knowledge source)"),
])
def test_bad_knowledge_source_lines_are_one_line_errors(tmp_path, lines,
                                                        message):
  source = _write_jsonl(tmp_path / "ks.json", lines)
  with pytest.raises(utils.UserError, match=re.escape(message)) as error:
    kilt_metrics.title_map_from_knowledge_source(source)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("text,message", [
    ('["A", "1"]', "a JSON list, expected an object {title: wikipedia_id}"),
    ('{"A": "1", "B": 2}', "title 'B' maps to 2, expected a wikipedia_id"),
    ('{"A": "1",', "malformed JSON at line 1"),
])
def test_malformed_title_map_is_a_one_line_error(tmp_path, text, message):
  path = tmp_path / "title_map.json"
  path.write_text(text)
  with pytest.raises(utils.UserError, match=re.escape(message)):
    kilt_metrics.read_title_map(str(path))
  with pytest.raises(utils.UserError, match="KILT title map .* does not exist"):
    kilt_metrics.read_title_map(str(tmp_path / "missing.json"))


def test_block_provenance_and_the_unmapped_title_warning():
  titles = {3: "Sky", 5: "Water", 8: None}
  entries = kilt_metrics.block_provenance(
      [3, 5, 8], [2.5, 1.25, -1.0], titles.get, {"Sky": "101"})
  assert entries == [
      {"wikipedia_id": "101", "title": "Sky", "block_id": 3, "score": 2.5},
      {"title": "Water", "block_id": 5, "score": 1.25},
      {"block_id": 8, "score": -1.0}]
  assert kilt_metrics.block_provenance([3], [0.5]) == [
      {"block_id": 3, "score": 0.5}]
  warning = kilt_metrics.unmapped_title_warning(
      [entries, entries[:2]], "map.json")
  assert warning.startswith(
      "warning: 3 of 5 contexts (2 distinct titles, e.g. 'Water', None) have "
      "a title that is not in map.json")
  assert kilt_metrics.unmapped_title_warning([entries[:1]], "map.json") is None


# ---------------------------------------------------------------------------
# The retriever alone, from the neighbour cache
# ---------------------------------------------------------------------------

# Blocks of four pages (a page has several blocks); "Moon" is not in the map.
BLOCK_TITLES = ["Sky", "Sky", "Water", "Ice", "Water", "Moon", "Ice", "Sky",
                "Moon", "Water"]
TITLE_MAP = {"Sky": "11", "Water": "22", "Ice": "33", "Snow": "44"}
NUM_CACHED = 5


def _write_records(path, records):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for record in records:
      writer.write(record.encode("utf-8"))


@pytest.fixture(name="cache_world")
def fixture_cache_world(tmp_path):
  """blocks.tfr + titles.tfr, a cache of their neighbours, gold and title map."""
  rng = random.Random(3)
  _write_records(tmp_path / "blocks.tfr",
                 [f"text of block {i}" for i in range(len(BLOCK_TITLES))])
  _write_records(tmp_path / "titles.tfr", BLOCK_TITLES)
  records, gold = [], []
  for index in range(12):
    block_ids = rng.sample(range(len(BLOCK_TITLES)), NUM_CACHED)
    records.append(dict(
        example_id=f"v{index}", question=f"question {index}",
        question_ids=[1, 2], answer_ids=[[3]], neighbour_block_ids=block_ids,
        neighbour_scores=sorted((rng.random() for _ in block_ids),
                                reverse=True),
        neighbour_ids=[[4]] * NUM_CACHED))
    evidence = [[{"wikipedia_id": page_id, "title": title}
                 for title, page_id in rng.sample(sorted(TITLE_MAP.items()),
                                                  rng.randint(1, 2))]
                for _ in range(rng.randint(1, 2))]
    gold.append({"id": f"v{index}", "input": f"question {index}",
                 "output": [{"answer": "an answer"}] +
                           [{"provenance": entries} for entries in evidence]})
  cache_dir = tmp_path / "cache"
  write_cache(str(cache_dir), {"validation": records},
              num_neighbours=NUM_CACHED, vocab_size=10)
  manifest_path = cache_dir / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest.update(blocks_path=str(tmp_path / "blocks.tfr"),
                  num_blocks=len(BLOCK_TITLES),
                  titles_path=str(tmp_path / "titles.tfr"))
  manifest_path.write_text(json.dumps(manifest))
  map_path = tmp_path / "title_map.json"
  map_path.write_text(json.dumps(TITLE_MAP))
  return {"cache": str(cache_dir), "records": records, "map": str(map_path),
          "gold": _write_jsonl(tmp_path / "gold.jsonl", gold),
          "tmp": tmp_path}


def _run_cache_eval(world, *flags):
  return subprocess.run(
      [sys.executable, KILT_EVAL, f"--gold={world['gold']}",
       f"--cache_dir={world['cache']}", *flags], capture_output=True,
      text=True, check=False)


@pytest.mark.slow
def test_retriever_alone_equals_kilt_on_its_top_cached_blocks(cache_world):
  num_provenance = 4
  output = cache_world["tmp"] / "retriever.json"
  completed = _run_cache_eval(
      cache_world, f"--kilt_title_map={cache_world['map']}",
      f"--num_provenance={num_provenance}", f"--output_path={output}")
  assert completed.returncode == 0, completed.stderr[-3000:]
  ours = json.loads(output.read_text())
  # The provenance KILT is given: the top blocks, by the titles file and map.
  guesses = []
  unmapped = 0
  for record in cache_world["records"]:
    entries = []
    for block_id in record["neighbour_block_ids"][:num_provenance]:
      title = BLOCK_TITLES[block_id]
      entry = {"title": title}
      if title in TITLE_MAP:
        entry["wikipedia_id"] = TITLE_MAP[title]
      else:
        unmapped += 1
      entries.append(entry)
    guesses.append({"id": record["example_id"],
                    "output": [{"answer": "", "provenance": entries}]})
  guess_path = _write_jsonl(cache_world["tmp"] / "guess.jsonl", guesses)
  theirs = _run_kilt_script("kilt.eval_retrieval", guess_path,
                            cache_world["gold"])
  assert set(ours["retrieval"]) == set(theirs)
  for name, value in theirs.items():
    assert ours["retrieval"][name] == pytest.approx(value, abs=1e-9), name
  assert ours["rprec"] == ours["retrieval"]["Rprec"]
  assert 0.0 < ours["rprec"] < 1.0 and 0.0 < ours["recall@5"] <= 1.0
  assert ours["num_examples"] == 12 and ours["num_provenance"] == num_provenance
  assert "| retriever (cache) |" in completed.stdout
  # The map misses "Moon": a warning with the count, not silence.
  assert unmapped > 0
  assert (f"warning: {unmapped} of {12 * num_provenance} contexts (1 distinct "
          "titles, e.g. 'Moon') have a title that is not in") in completed.stderr


@pytest.mark.slow
def test_retriever_alone_bad_inputs_are_one_line(cache_world):
  def error_of(*flags):
    completed = _run_cache_eval(cache_world, *flags)
    assert completed.returncode == utils.USER_ERROR_EXIT_CODE, (
        completed.stderr[-2000:])
    (line,) = [l for l in completed.stderr.splitlines()
               if l.startswith("error:")]
    return line

  assert "--cache_dir needs --kilt_title_map" in error_of()
  manifest_path = os.path.join(cache_world["cache"], "manifest.json")
  with open(manifest_path, encoding="utf-8") as f:
    manifest = json.load(f)
  manifest["titles_path"] = None
  with open(manifest_path, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  assert "the manifest has no titles_path" in error_of(
      f"--kilt_title_map={cache_world['map']}")
