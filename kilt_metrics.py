"""KILT's metrics, computed exactly as KILT computes them; KILT provenance of retrieved blocks.

Answer metrics follow `kilt/eval_downstream.py` of facebookresearch/KILT
(`normalize_answer`, `_exact_match_score`, `_f1_score`, `_rougel_score`,
`_metric_max_over_ground_truths`, `get_gold_answers`, `validate_input`,
`_calculate_metrics`):

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

Retrieval metrics follow `kilt/eval_retrieval.py` with its defaults
(`--rank_keys=wikipedia_id`, `--ks=1,5,10,20`); provenance is matched by
page, on `wikipedia_id` compared as `str(id).strip()`:

- the guess's pages: the `wikipedia_id`s of `output[0].provenance` in order,
  repeats dropped; entries without `wikipedia_id` are skipped;
- R-precision: for each gold output, its R distinct pages (R = 0 without
  provenance, scoring 0); the fraction of the guess's first R pages among
  them; the maximum over the gold outputs;
- evidence sets: the distinct page sets of the gold outputs that have a
  `provenance` key (an entry without `wikipedia_id` counts as the page "",
  an empty list as an empty set that no guess completes);
- the rank (KILT's `get_rank`): walking the guess's pages, a page in no set
  adds False; a page that completes a set adds True; a page that advances a
  set without completing it moves the set's placeholder to the end;
  precision@k = Trues in the first k / k, recall@k = Trues in the first k /
  number of sets, success_rate@k = any True in the first k (all 0 without
  sets or without guessed pages; recall and success rate only for k > 1);
- answer_in_context@k, answer_and_ent_in_context@k, entity_in_context@k look
  at the `text` of the first k provenance entries (ours carry none, so 0),
  entity_in_input at the gold titles in the question;
- `rprec` and `recall@5` are what `eval_downstream.py` reports; the whole of
  `eval_retrieval.py`'s report is under `retrieval`, by KILT's names.

KILT-RL, KILT-F1, KILT-EM and KILT-accuracy: a guess's ROUGE-L, F1, EM and
accuracy counted only where its R-precision is exactly 1, averaged over all
gold ids.

Where KILT would stop on an assertion (missing, duplicate or unknown ids, a
guess without exactly one answer, a gold record without answers) or crash (a
provenance that is not a list of objects, a title or text that is not a
string), this module raises `utils.UserError` naming the file, the line and
the id.

KILT names pages by `wikipedia_id`; REALM's blocks carry only a page title.
`title_map_from_knowledge_source` streams KILT's knowledge source
(`kilt_files.KNOWLEDGE_SOURCE_FILE`) into a title -> wikipedia_id map, matching
titles exactly and keeping a title's first page, as KILT's
`KnowledgeSource.get_page_by_title` does (`find_one({"wikipedia_title":
title})` over the file imported in order); `block_provenance` turns
retrieved blocks into KILT provenance with it.

Also: the calibration baselines of Krishna et al. 2021 ("Hurdles to Progress
in Long-form Question Answering"), as their `generate_final_guess_bounds.py`
builds them: the question copied five times, and a random training answer;
and their human upper bound, the longest gold answer scored against the
other gold answers of its question (questions with one gold answer have no
other to score against and are left out of that row).

Grounding (does a generation copy from its contexts?): the fraction of the
generation's n-grams, n = 1 to 4, that occur in the contexts it was given,
counting only n-grams that are not in the question (an answer restating the
question is not evidence of reading) and, for n = 1, not stop-words (NLTK's
English list); occurrences are counted (a repeated n-gram counts each time),
the tokens are KILT's `normalize_answer` split on white space, and an n-gram
must lie inside one context. It lives here, not in eval_stats, because it is
a per-example text metric on KILT's tokenisation, like F1. A guess file
carries the contexts of each answer as `meta.contexts` (generation.py writes
them; KILT's scripts ignore `meta`).
"""

import collections
import os
import random
import re
import string
import sys

import rouge
import tensorflow as tf
from tqdm import tqdm

import eval_stats
import kilt_files
import neighbour_cache
import utils

METRIC_NAMES = ("rougeL", "f1", "em", "accuracy")
# The corpus metrics reported with a bootstrap interval.
INTERVAL_METRICS = ("rougeL", "f1", "kilt_rougeL", "kilt_f1")
# eval_retrieval.py's defaults: pages matched on this key, cut-offs reported.
RANK_KEY = "wikipedia_id"
RETRIEVAL_KS = (1, 5, 10, 20)
# The fields of a knowledge-source page that the title map needs.
KNOWLEDGE_SOURCE_FIELDS = ("wikipedia_id", "wikipedia_title")
# Krishna et al.'s `copy_input` bound joins five copies of the question.
COPY_INPUT_REPEATS = 5
GROUNDING_ORDERS = (1, 2, 3, 4)
# NLTK's English stop words (nltk.corpus.stopwords, 179 words; its data is
# not installed with the package), normalised as generations are.
_NLTK_ENGLISH_STOP_WORDS = """
i me my myself we our ours ourselves you you're you've you'll you'd your
yours yourself yourselves he him his himself she she's her hers herself it
it's its itself they them their theirs themselves what which who whom this
that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while of
at by for with about against between into through during before after above
below to from up down in out on off over under again further then once here
there when where why how all any both each few more most other some such no
nor not only own same so than too very s t can will just don don't should
should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn
mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn
wasn't weren weren't won won't wouldn wouldn't
""".split()

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ROUGE_L = rouge.Rouge(metrics=["rouge-l"])


def normalize_answer(text):
  """KILT's normalisation: lower, drop punctuation, drop articles, fix spaces."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


STOP_WORDS = frozenset(normalize_answer(word)
                       for word in _NLTK_ENGLISH_STOP_WORDS) - {""}


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


def gold_titles(record):
  """The set of stripped, non-empty provenance titles of a gold record."""
  return {entry["title"].strip() for output in record["output"]
          for entry in output.get("provenance", [])
          if entry.get("title") and entry["title"].strip()}


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


def _ngrams(tokens, order):
  return [tuple(tokens[start:start + order])
          for start in range(len(tokens) - order + 1)]


def grounding(generation, contexts, question):
  """The share of a generation's n-grams found in its contexts (see above).

  Args:
    generation: the generated answer.
    contexts: the texts the answer was generated from ([]: none).
    question: the question, whose n-grams do not count.

  Returns:
    found / counted over n = 1..4, or None when no n-gram counts (an empty
    generation, or one made only of the question and stop-words).
  """
  tokens = normalize_answer(generation).split()
  question_tokens = normalize_answer(question).split()
  context_tokens = [normalize_answer(context).split() for context in contexts]
  found = counted = 0
  for order in GROUNDING_ORDERS:
    in_question = set(_ngrams(question_tokens, order))
    in_contexts = set()
    for tokens_of_context in context_tokens:
      in_contexts.update(_ngrams(tokens_of_context, order))
    for ngram in _ngrams(tokens, order):
      if ngram in in_question or (order == 1 and ngram[0] in STOP_WORDS):
        continue
      counted += 1
      found += ngram in in_contexts
  return found / counted if counted else None


def grounding_scores(gold_records, answers, contexts):
  """{id: grounding} of {id: answer} given {id: contexts}, in the gold
  file's order."""
  return {_record_id(record): grounding(answers[_record_id(record)],
                                        contexts[_record_id(record)],
                                        record["input"])
          for record in gold_records}


def gold_answer_grounding_scores(gold_records, contexts):
  """{id: mean grounding of the question's gold answers} against the
  contexts a guess was given for it (None when no answer has an n-gram to
  count)."""
  scores = {}
  for record in gold_records:
    record_id = _record_id(record)
    values = [grounding(answer, contexts[record_id], record["input"])
              for answer in sorted(gold_answers(record))]
    values = [value for value in values if value is not None]
    scores[record_id] = sum(values) / len(values) if values else None
  return scores


def grounding_summary(scores, bootstrap=eval_stats.DEFAULT_BOOTSTRAP):
  """The mean of {id: grounding or None} over the ids that have one, with
  its bootstrap interval, and `num_undefined` (the ids without)."""
  defined = [value for value in scores.values() if value is not None]
  summary = eval_stats.mean_interval(defined, bootstrap)
  summary["num_undefined"] = len(scores) - len(defined)
  return summary


def paired_score_difference(scores_a, scores_b,
                            bootstrap=eval_stats.DEFAULT_BOOTSTRAP):
  """Interval and permutation p-value of mean(a − b) of two {id: score or
  None} over the ids both have a score for (`num_examples` of them)."""
  ids = [record_id for record_id, value in scores_a.items()
         if value is not None and scores_b.get(record_id) is not None]
  return eval_stats.paired_mean_difference(
      [scores_a[record_id] for record_id in ids],
      [scores_b[record_id] for record_id in ids], bootstrap)


# ---------------------------------------------------------------------------
# Retrieval: provenance matched by page, as eval_retrieval.py does
# ---------------------------------------------------------------------------


def _page_id(value):
  # KILT compares ids as `str(id).strip()`.
  return str(value).strip()


def provenance_pages(provenance):
  """The distinct `wikipedia_id`s of a provenance list, in order."""
  pages = []
  for entry in provenance:
    if RANK_KEY in entry:
      page = _page_id(entry[RANK_KEY])
      if page not in pages:
        pages.append(page)
  return pages


def gold_pages(record):
  """Per gold output, its distinct pages ([] for one without provenance)."""
  return [provenance_pages(output.get("provenance", []))
          for output in record["output"]]


def evidence_sets(record):
  """The distinct page sets of the gold outputs that have provenance."""
  sets = []
  for output in record["output"]:
    if "provenance" in output:
      # An entry without the rank key joins no key values: the page "".
      evidence = {_page_id(entry[RANK_KEY]) if RANK_KEY in entry else ""
                  for entry in output["provenance"]}
      if evidence not in sets:
        sets.append(evidence)
  return sets


def r_precision(pages, pages_per_output):
  """The best, over the gold outputs, of the share of the first R guessed
  pages among the output's R pages (0 where R = 0)."""
  best = 0.0
  for gold in pages_per_output:
    if gold:
      best = max(best, sum(page in gold for page in pages[:len(gold)]) /
                 len(gold))
  return best


def evidence_rank(pages, sets):
  """KILT's rank of guessed pages against evidence sets (`get_rank`).

  Returns a list of True (the page completed a set), False (the page is in
  no set) and placeholders of sets it advanced but did not complete; a set's
  placeholder moves to the page that last advanced it.
  """
  remaining = [set(evidence) for evidence in sets]
  rank = []
  for page in pages:
    found = False
    for index, evidence in enumerate(remaining):
      if page in evidence:
        found = True
        # A tuple, never equal to True, so that `count(True)` counts only
        # completed sets.
        placeholder = ("evidence set", index)
        if placeholder in rank:
          rank.remove(placeholder)
        evidence.remove(page)
        rank.append(placeholder if evidence else True)
    if not found:
      rank.append(False)
  return rank


def _contains_any(text, phrases):
  return any(normalize_answer(phrase) in text for phrase in phrases)


def retrieval_metrics(provenance, record, ks=RETRIEVAL_KS):
  """eval_retrieval.py's per-example metrics of one guess's provenance.

  Args:
    provenance: the guess's `output[0].provenance` ([] when it has none).
    record: the gold record.
    ks: the cut-offs, positive.

  Returns:
    A dict by KILT's names: `Rprec`, `entity_in_input`, and per k
    `precision@k`, `answer_in_context@k`, `answer_and_ent_in_context@k`,
    `entity_in_context@k`, and for k > 1 `recall@k`, `success_rate@k`.
  """
  pages = provenance_pages(provenance)
  sets = evidence_sets(record) if pages else []
  rank = evidence_rank(pages, sets)
  answers = gold_answers(record)
  titles = gold_titles(record)
  metrics = {
      "Rprec": r_precision(pages, gold_pages(record)),
      "entity_in_input": float(_contains_any(
          normalize_answer(record["input"]), titles)),
  }
  for k in ks:
    completed = rank[:k].count(True)
    texts = [normalize_answer(entry["text"]) for entry in provenance[:k]
             if "text" in entry]
    metrics[f"precision@{k}"] = completed / k if sets else 0.0
    metrics[f"answer_in_context@{k}"] = float(any(
        _contains_any(text, answers) for text in texts))
    metrics[f"answer_and_ent_in_context@{k}"] = float(any(
        _contains_any(text, answers) and _contains_any(text, titles)
        for text in texts))
    metrics[f"entity_in_context@{k}"] = float(any(
        _contains_any(text, titles) for text in texts))
    if k > 1:
      metrics[f"recall@{k}"] = completed / len(sets) if sets else 0.0
      metrics[f"success_rate@{k}"] = float(completed > 0)
  return metrics


def _retrieval_summary(per_example, provenance_lists):
  """Means of per-example retrieval metrics (`rprec`, `recall@5`, `retrieval`)
  and the number of guesses naming no page."""
  count = len(per_example)
  means = {name: sum(metrics[name] for metrics in per_example) / count
           for name in per_example[0]} if count else {}
  return {
      "rprec": means.get("Rprec", 0.0),
      "recall@5": means.get("recall@5", 0.0),
      "retrieval": means,
      "num_without_provenance": sum(
          not provenance_pages(entries) for entries in provenance_lists),
  }


def corpus_retrieval_metrics(gold_records, provenance):
  """Retrieval metrics alone, for {id: provenance list} (a retriever's)."""
  provenance_lists = [provenance.get(_record_id(record)) or []
                      for record in gold_records]
  result = _retrieval_summary(
      [retrieval_metrics(entries, record)
       for entries, record in zip(provenance_lists, gold_records)],
      provenance_lists)
  result["num_examples"] = len(gold_records)
  return result


def answer_scores(gold_records, predictions, provenance=None,
                  description="scoring"):
  """Per-example answer metrics and their KILT-* variants, by gold id.

  Args:
    gold_records: KILT records with answers, each with a unique `id`.
    predictions: {id: guess answer string}, one per gold id.
    provenance: {id: the guess's provenance list}; a missing id (or no
      dict) is a guess without provenance.
    description: label of the progress bar.

  Returns:
    (scores, retrieval): in the gold file's order, per example
    {"id", "rougeL", "f1", "em", "accuracy", "kilt_rougeL", "kilt_f1",
    "kilt_em", "kilt_accuracy", "empty"} (a KILT-* value is the metric where
    R-precision is exactly 1, else 0) and `retrieval_metrics`' dict.
  """
  provenance = provenance or {}
  scores, retrieval = [], []
  for record in tqdm(gold_records, desc=description, unit="example",
                     disable=len(gold_records) < 100):
    record_id = _record_id(record)
    prediction = predictions[record_id].strip()
    entries = provenance.get(record_id) or []
    metrics = retrieval_metrics(entries, record)
    retrieval.append(metrics)
    row = {"id": record_id, "empty": not prediction}
    for name, value in score_answer(prediction, gold_answers(record)).items():
      row[name] = value
      row[f"kilt_{name}"] = value if metrics["Rprec"] == 1 else 0.0
    scores.append(row)
  return scores, retrieval


def corpus_metrics(gold_records, predictions, provenance=None,
                   description="scoring",
                   bootstrap=eval_stats.DEFAULT_BOOTSTRAP):
  """KILT's corpus-level metrics: per-example values averaged over gold ids.

  Args:
    gold_records, predictions, provenance, description: as `answer_scores`.
    bootstrap: an `eval_stats.Bootstrap`, for the intervals.

  Returns:
    As fractions in [0, 1]: `rougeL`, `f1`, `em`, `accuracy`, their KILT-*
    variants `kilt_rougeL`, `kilt_f1`, `kilt_em`, `kilt_accuracy`, `rprec`,
    `recall@5` and `retrieval` (eval_retrieval.py's report at its default
    ks); `intervals`: {name: `eval_stats.mean_interval`} of INTERVAL_METRICS
    (bootstrap over the examples); counts `num_examples`,
    `num_empty_predictions` and `num_without_provenance` (guesses naming no
    wikipedia_id).
  """
  provenance = provenance or {}
  scores, retrieval = answer_scores(gold_records, predictions, provenance,
                                    description)
  return summarise_scores(gold_records, scores, retrieval, provenance,
                          bootstrap)


def summarise_scores(gold_records, scores, retrieval, provenance, bootstrap):
  """`corpus_metrics` of `answer_scores`' (scores, retrieval)."""
  count = len(gold_records)
  names = METRIC_NAMES + tuple(f"kilt_{name}" for name in METRIC_NAMES)
  # Summed in the gold file's order, as KILT's script sums.
  metrics = {name: sum(row[name] for row in scores) / count if count else 0.0
             for name in names}
  metrics["intervals"] = {
      name: eval_stats.mean_interval([row[name] for row in scores], bootstrap)
      for name in INTERVAL_METRICS}
  metrics.update(_retrieval_summary(
      retrieval, [(provenance or {}).get(_record_id(record)) or []
                  for record in gold_records]))
  metrics.update(num_examples=count,
                 num_empty_predictions=sum(row["empty"] for row in scores))
  return metrics


def _answers_and_provenance(outputs):
  return ({record_id: output["answer"]
           for record_id, output in outputs.items()},
          {record_id: output.get("provenance")
           for record_id, output in outputs.items()})


def score_outputs(gold_records, outputs,
                  bootstrap=eval_stats.DEFAULT_BOOTSTRAP):
  """`corpus_metrics` of `read_guess_outputs`' {id: output}."""
  answers, provenance = _answers_and_provenance(outputs)
  return corpus_metrics(gold_records, answers, provenance, bootstrap=bootstrap)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _record_id(record):
  # KILT matches ids as `str(id).strip()`.
  return str(record["id"]).strip()


def _is_page_id(value):
  # KILT's ids are strings (its validator also lets None through); an int is
  # the same id once KILT applies str().
  return value is None or isinstance(value, str) or (
      isinstance(value, int) and not isinstance(value, bool))


def _check_provenance(provenance, where):
  """A UserError unless `provenance` is a list of KILT provenance objects."""
  if not isinstance(provenance, list):
    raise utils.UserError(
        f"{where}: 'provenance' is {type(provenance).__name__}, expected a "
        "list of {\"wikipedia_id\": ..., \"title\": ...} objects")
  for index, entry in enumerate(provenance):
    if not isinstance(entry, dict):
      raise utils.UserError(
          f"{where}: provenance[{index}] is {type(entry).__name__}, expected "
          "an object {\"wikipedia_id\": ..., \"title\": ...}")
    if RANK_KEY in entry and not _is_page_id(entry[RANK_KEY]):
      raise utils.UserError(
          f"{where}: provenance[{index}].wikipedia_id is "
          f"{entry[RANK_KEY]!r}, expected a string (KILT's page id)")
    for field, allow_null in (("title", True), ("text", False)):
      value = entry.get(field)
      if field in entry and not (isinstance(value, str) or
                                 (allow_null and value is None)):
        raise utils.UserError(
            f"{where}: provenance[{index}].{field} is {value!r}, expected a "
            "string")


def read_gold(path):
  """KILT gold records, each with an `id` and at least one answer."""
  records = []
  seen = set()
  for line_number, record in kilt_files.read_jsonl(path, "gold file"):
    if "id" not in record:
      raise utils.UserError(f"{path}: line {line_number}: no 'id' field")
    record_id = _record_id(record)
    if record_id in seen:
      raise utils.UserError(
          f"{path}: line {line_number}: id {record_id!r} appears twice")
    seen.add(record_id)
    where = f"{path}: line {line_number} (id {record_id!r})"
    if not isinstance(record.get("input"), str):
      raise utils.UserError(f"{where}: no 'input' string (the question)")
    outputs = record.get("output", [])
    if not isinstance(outputs, list) or not all(
        isinstance(output, dict) for output in outputs):
      raise utils.UserError(
          f"{where}: 'output' must be a list of objects "
          "({\"answer\": ...} or {\"provenance\": [...]})")
    for output in outputs:
      if output.get("answer") is not None and not isinstance(
          output["answer"], str):
        raise utils.UserError(
            f"{where}: answer {output['answer']!r}, expected a string")
      if "provenance" in output:
        _check_provenance(output["provenance"], where)
    if not gold_answers(record):
      raise utils.UserError(
          f"{where} has no gold answer; the gold file must be a split with "
          f"answers (the test split {kilt_files.ELI5_SPLIT_FILES['test']} "
          "cannot be scored locally)")
    records.append(record)
  return records


def _guess_records(path):
  """Yields (line number, id, record) of a KILT-format guess file, each
  record's single output checked, each id once."""
  seen = set()
  for line_number, record in kilt_files.read_jsonl(path, "guess file"):
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
    if "provenance" in output[0]:
      _check_provenance(output[0]["provenance"],
                        f"{path}: line {line_number} (id {record_id!r})")
    if record_id in seen:
      raise utils.UserError(
          f"{path}: line {line_number}: id {record_id!r} appears twice")
    seen.add(record_id)
    yield line_number, record_id, record


def read_guess_outputs(path):
  """{id: output} of a KILT-format guess file: one {"answer", "provenance"?}
  per line, the provenance (when there) a list of objects."""
  return {record_id: record["output"][0]
          for _, record_id, record in _guess_records(path)}


def read_guess_contexts(path):
  """{id: the context texts the answer was given} of a guess file that
  records them (`meta.contexts`, as generation.py writes: [] for an answer
  generated without contexts)."""
  contexts = {}
  for line_number, record_id, record in _guess_records(path):
    where = f"{path}: line {line_number} (id {record_id!r})"
    meta = record.get("meta")
    if not isinstance(meta, dict) or "contexts" not in meta:
      raise utils.UserError(
          f"{where}: no meta.contexts, expected the texts the answer was "
          "generated from (grounding needs them; generation.py writes them)")
    texts = meta["contexts"]
    if not isinstance(texts, list) or not all(
        isinstance(text, str) for text in texts):
      raise utils.UserError(
          f"{where}: meta.contexts must be a list of strings (the contexts' "
          "texts)")
    contexts[record_id] = texts
  return contexts


def read_guesses(path):
  """{id: answer} of a KILT-format guess file (one answer per line)."""
  return {record_id: output["answer"]
          for record_id, output in read_guess_outputs(path).items()}


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


# ---------------------------------------------------------------------------
# KILT pages of REALM blocks: the title map and block provenance
# ---------------------------------------------------------------------------


def title_map_from_knowledge_source(path):
  """Streams KILT's knowledge source into {wikipedia_title: wikipedia_id}.

  One JSON page a line (`_id`, `wikipedia_id`, `wikipedia_title`, `text`,
  ...), read line by line (the real file is 35 GB), with a progress bar over
  its bytes. Titles match exactly; a title's first page is kept, as KILT's
  `get_page_by_title` (`find_one`) returns it.

  Returns:
    (title_map, counts): `num_pages`, `num_titles`, `num_duplicate_titles`
    (pages whose title an earlier page has) and `num_conflicting_duplicates`
    (those of them with another wikipedia_id).
  """
  title_map = {}
  num_pages = num_duplicates = num_conflicting = 0
  for line_number, page in kilt_files.read_jsonl(
      path, "KILT knowledge source", progress_description="knowledge source"):
    missing = [field for field in KNOWLEDGE_SOURCE_FIELDS if field not in page]
    if missing:
      raise utils.UserError(
          f"{path}: line {line_number}: no {' or '.join(map(repr, missing))}"
          " field, expected a KILT page object with 'wikipedia_id' and "
          "'wikipedia_title'")
    title, page_id = page["wikipedia_title"], page["wikipedia_id"]
    if not isinstance(title, str) or not isinstance(page_id, str):
      raise utils.UserError(
          f"{path}: line {line_number}: wikipedia_title {title!r} and "
          f"wikipedia_id {page_id!r}, expected two strings")
    num_pages += 1
    if title in title_map:
      num_duplicates += 1
      num_conflicting += title_map[title] != page_id
    else:
      title_map[title] = page_id
  return title_map, {"num_pages": num_pages, "num_titles": len(title_map),
                     "num_duplicate_titles": num_duplicates,
                     "num_conflicting_duplicates": num_conflicting}


def write_title_map(knowledge_source, output_path):
  """Writes the {title: wikipedia_id} map of a knowledge source (complete,
  or not at all); returns `title_map_from_knowledge_source`'s counts."""
  title_map, counts = title_map_from_knowledge_source(knowledge_source)
  parent = os.path.dirname(output_path)
  if parent:
    utils.makedirs(parent)
  utils.atomic_write_json(output_path, title_map)
  return counts


def read_title_map(path):
  """A {title: wikipedia_id} map written by util_scripts/kilt_title_map.py."""
  title_map = utils.read_json(path, "KILT title map")
  if not isinstance(title_map, dict):
    raise utils.UserError(
        f"{path}: a JSON {type(title_map).__name__}, expected an object "
        "{title: wikipedia_id} (written by util_scripts/kilt_title_map.py)")
  for title, page_id in title_map.items():
    if not isinstance(page_id, str):
      raise utils.UserError(
          f"{path}: title {title!r} maps to {page_id!r}, expected a "
          "wikipedia_id string (written by util_scripts/kilt_title_map.py)")
  return title_map


def block_provenance(block_ids, scores, title_of_block=None, title_map=None):
  """KILT provenance of retrieved blocks, in the order given.

  Each entry is {"wikipedia_id", "title", "block_id", "score"}: KILT's fields
  and ours. `title` only where `title_of_block(block id)` gives one,
  `wikipedia_id` only where `title_map` has that title.
  """
  entries = []
  for block_id, score in zip(block_ids, scores):
    entry = {}
    title = title_of_block(block_id) if title_of_block else None
    if title_map is not None and title in title_map:
      entry[RANK_KEY] = title_map[title]
    if title is not None:
      entry["title"] = title
    entry.update(block_id=int(block_id), score=float(score))
    entries.append(entry)
  return entries


def unmapped_title_warning(provenance_lists, title_map_path):
  """The warning line for provenance entries without a wikipedia_id, or None."""
  num_entries = 0
  unmapped = collections.Counter()
  for entries in provenance_lists:
    for entry in entries:
      num_entries += 1
      if RANK_KEY not in entry:
        unmapped[entry.get("title")] += 1
  if not unmapped:
    return None
  examples = ", ".join(repr(title) for title, _ in unmapped.most_common(3))
  return (f"warning: {sum(unmapped.values())} of {num_entries} contexts "
          f"({len(unmapped)} distinct titles, e.g. {examples}) have a title "
          f"that is not in {title_map_path}; their provenance has no "
          "wikipedia_id, and KILT's retrieval scores skip them")


def cached_provenance(files, title_of_block, title_map, num_provenance=0):
  """{id: block_provenance of its top cached neighbours} of a cache split.

  Args:
    files: the split's shards (`neighbour_cache.split_files`).
    title_of_block: fn(block id) -> title or None.
    title_map: {title: wikipedia_id}.
    num_provenance: neighbours per question, best first; 0: all cached.
  """
  dataset = tf.data.TFRecordDataset(files).map(
      lambda serialized: {
          name: value for name, value in neighbour_cache.parse_example(
              serialized).items()
          if name in ("id", "neighbour_block_ids", "neighbour_scores")})
  provenance = {}
  for example in dataset.as_numpy_iterator():
    count = num_provenance or len(example["neighbour_block_ids"])
    provenance[example["id"].decode("utf-8").strip()] = block_provenance(
        example["neighbour_block_ids"][:count],
        example["neighbour_scores"][:count], title_of_block, title_map)
  return provenance


# ---------------------------------------------------------------------------
# Baselines, tables, whole files
# ---------------------------------------------------------------------------


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


def longest_gold_answer_baseline(gold_records):
  """Krishna et al.'s `longest_gold_ans` bound: per question with at least
  two gold answers, the longest (in words; the first of equals in the gold
  file's order) as the guess, the others as its gold.

  Returns:
    (gold records of those questions, without that answer; {id: guess}).
  """
  records, predictions = [], {}
  for record in gold_records:
    answers = [item["answer"].strip() for item in record["output"]
               if item.get("answer") and item["answer"].strip()]
    longest = max(answers, key=lambda answer: len(answer.split()))
    others = [answer for answer in answers if answer != longest]
    if not others:
      continue
    records.append({"id": record["id"], "input": record["input"],
                    "output": [{"answer": answer} for answer in others]})
    predictions[_record_id(record)] = longest
  return records, predictions


def _percent(value):
  return f"{100 * value:.2f}"


def _percent_interval(interval):
  return eval_stats.format_interval(interval, scale=100)


def _markdown(header, rows, cells):
  """A markdown table: one row per {system name: metrics}, each cell
  `cell(metrics)`, then the number of examples."""
  lines = ["| system | " + " | ".join(header) + " | examples |",
           "| --- |" + " ---: |" * (len(header) + 1)]
  for name, metrics in rows.items():
    lines.append(f"| {name} | " + " | ".join(cell(metrics) for cell in cells)
                 + f" | {metrics['num_examples']} |")
  return "\n".join(lines) + "\n"


def markdown_table(rows):
  """A markdown table of {system name: metrics}, metrics shown in percent:
  the answer metrics, R-precision and recall@5, KILT-RL and KILT-F1 (the
  columns of KILT's ELI5 leaderboard), then the 95 % intervals of ROUGE-L,
  F1 and KILT-RL."""
  names = ("rougeL", "f1", "em", "rprec", "recall@5", "kilt_rougeL",
           "kilt_f1")
  interval_names = ("rougeL", "f1", "kilt_rougeL")
  return _markdown(
      ["ROUGE-L (%)", "F1 (%)", "EM (%)", "R-Prec (%)", "recall@5 (%)",
       "KILT-RL (%)", "KILT-F1 (%)", "ROUGE-L [95 % CI]", "F1 [95 % CI]",
       "KILT-RL [95 % CI]"], rows,
      [lambda metrics, name=name: _percent(metrics[name]) for name in names] +
      [lambda metrics, name=name: _percent_interval(
          metrics["intervals"][name]) for name in interval_names])


def retrieval_table(rows):
  """A markdown table of {system name: corpus_retrieval_metrics}, in percent."""
  names = ("Rprec", "precision@1", "recall@5", "recall@20", "success_rate@5")
  return _markdown(
      ["R-Prec (%)", "precision@1 (%)", "recall@5 (%)", "recall@20 (%)",
       "success_rate@5 (%)"], rows,
      [lambda metrics, name=name: _percent(metrics["retrieval"][name])
       for name in names])


def _baselines(gold_records, baselines_train_path, baselines_seed):
  """{name: (gold records scored, {id: guess})} of the calibration baselines."""
  train_records = [record for _, record in kilt_files.read_jsonl(
      baselines_train_path, "baselines training file")]
  try:
    random_answers = random_train_answer_predictions(
        gold_records, train_records, baselines_seed)
  except ValueError:
    raise utils.UserError(
        f"{baselines_train_path}: no answers to draw the random-answer "
        "baseline from (expected the KILT training split)") from None
  return {
      "copy_input": (gold_records, copy_input_predictions(gold_records)),
      "random_train_answer": (gold_records, random_answers),
      "longest_gold_answer": longest_gold_answer_baseline(gold_records),
  }


def _read_scored_guess(gold_records, gold_path, guess_path, bootstrap):
  """(corpus metrics, per-example scores, {id: answer}) of a guess file."""
  outputs = read_guess_outputs(guess_path)
  check_ids(gold_records, outputs, gold_path, guess_path)
  answers, provenance = _answers_and_provenance(outputs)
  scores, retrieval = answer_scores(gold_records, answers, provenance)
  metrics = summarise_scores(gold_records, scores, retrieval, provenance,
                             bootstrap)
  metrics["guess_path"] = guess_path
  return metrics, scores, answers


def evaluate_files(gold_path, guess_path, *, baselines_train_path=None,
                   baselines_seed=0, compare_path=None, with_grounding=False,
                   bootstrap=eval_stats.DEFAULT_BOOTSTRAP):
  """Scores a guess file against a KILT gold file, with optional baselines,
  grounding and a paired comparison with a second guess file.

  Returns:
    `corpus_metrics`' result for the guess and the two paths; with
    `baselines_train_path`, `baselines`: {"copy_input", "random_train_answer",
    "longest_gold_answer": metrics} (guesses without provenance; the longest
    gold answer on the questions with two or more); with `with_grounding`,
    `grounding` (`grounding_summary` of the guess's answers against its
    `meta.contexts`), `gold_answer_grounding` (the gold answers against the
    same contexts) and each baseline's `grounding` against them; with
    `compare_path` (another guess file on the same ids), `comparison`:
    {"metrics": its result, "differences": {name: guess − compared, paired
    over the examples: `eval_stats.paired_mean_difference`} for
    INTERVAL_METRICS (and `grounding`)}.
  """
  gold_records = read_gold(gold_path)
  result, scores, answers = _read_scored_guess(gold_records, gold_path,
                                               guess_path, bootstrap)
  result["gold_path"] = gold_path
  contexts = grounding_by_id = None
  if with_grounding:
    contexts = read_guess_contexts(guess_path)
    grounding_by_id = grounding_scores(gold_records, answers, contexts)
    result["grounding"] = grounding_summary(grounding_by_id, bootstrap)
    result["gold_answer_grounding"] = grounding_summary(
        gold_answer_grounding_scores(gold_records, contexts), bootstrap)
  if compare_path:
    compared, compared_scores, compared_answers = _read_scored_guess(
        gold_records, gold_path, compare_path, bootstrap)
    differences = {
        name: eval_stats.paired_mean_difference(
            [row[name] for row in scores],
            [row[name] for row in compared_scores], bootstrap)
        for name in INTERVAL_METRICS}
    if with_grounding:
      compared_grounding = grounding_scores(
          gold_records, compared_answers, read_guess_contexts(compare_path))
      compared["grounding"] = grounding_summary(compared_grounding, bootstrap)
      differences["grounding"] = paired_score_difference(
          grounding_by_id, compared_grounding, bootstrap)
    result["comparison"] = {"metrics": compared, "differences": differences}
  if baselines_train_path:
    result["baselines"] = {}
    for name, (records, predictions) in _baselines(
        gold_records, baselines_train_path, baselines_seed).items():
      metrics = corpus_metrics(records, predictions,
                               description=f"{name} baseline",
                               bootstrap=bootstrap)
      if contexts is not None:
        metrics["grounding"] = grounding_summary(
            grounding_scores(records, predictions, contexts), bootstrap)
      result["baselines"][name] = metrics
    result["baselines_seed"] = baselines_seed
  return result


def evaluate_cache(gold_path, cache_files, cache_name, title_of_block,
                   title_map, num_provenance=0):
  """The retriever alone: each question's top cached neighbours as provenance.

  Returns:
    (`corpus_retrieval_metrics`' result with the gold path, the cache's name
    and `num_provenance`; {id: the provenance scored}).
  """
  gold_records = read_gold(gold_path)
  provenance = cached_provenance(cache_files, title_of_block, title_map,
                                 num_provenance)
  check_ids(gold_records, provenance, gold_path, cache_name)
  result = corpus_retrieval_metrics(gold_records, provenance)
  result.update(gold_path=gold_path, cache=cache_name,
                num_provenance=num_provenance)
  return result, provenance


def _baseline_rows(result):
  return {f"baseline: {name.replace('_', ' ')}": metrics
          for name, metrics in result.get("baselines", {}).items()}


def grounding_table(result, system_name="guess", compared_name="compared"):
  """The markdown table of `evaluate_files`' grounding scores (percent,
  95 % intervals): the guess, the compared guess, the gold answers against
  the guess's contexts, the baselines against them; '' without grounding."""
  if "grounding" not in result:
    return ""
  rows = {system_name: result["grounding"]}
  if "grounding" in result.get("comparison", {}).get("metrics", {}):
    rows[compared_name] = result["comparison"]["metrics"]["grounding"]
  rows[f"gold answers, {system_name}'s contexts"] = result[
      "gold_answer_grounding"]
  for name, metrics in _baseline_rows(result).items():
    rows[f"{name}, {system_name}'s contexts"] = metrics["grounding"]
  lines = ["| answers | grounding (%) [95 % CI] | scored | without an n-gram "
           "to count |", "| --- | ---: | ---: | ---: |"]
  for name, summary in rows.items():
    lines.append(f"| {name} | {_percent_interval(summary)} | "
                 f"{summary['num_examples']} | {summary['num_undefined']} |")
  return "\n".join(lines) + "\n"


def difference_table(result, system_name="guess", compared_name="compared"):
  """The markdown table of `evaluate_files`' paired differences (percentage
  points, 95 % intervals, permutation p-values); '' without a comparison."""
  if "comparison" not in result:
    return ""
  labels = {"rougeL": "ROUGE-L", "f1": "F1", "kilt_rougeL": "KILT-RL",
            "kilt_f1": "KILT-F1", "grounding": "grounding"}
  lines = [f"| {system_name} − {compared_name} (paired) | difference (points) "
           "[95 % CI] | p (sign-flip permutation) | examples |",
           "| --- | ---: | ---: | ---: |"]
  for name, difference in result["comparison"]["differences"].items():
    lines.append(f"| {labels[name]} | {_percent_interval(difference)} | "
                 f"{difference['p_value']:.4f} | "
                 f"{difference['num_examples']} |")
  return "\n".join(lines) + "\n"


def result_table(result, system_name="guess", compared_name="compared"):
  """The markdown tables of `evaluate_files`' result: the metrics of the
  guess, the compared guess and the baselines; then grounding and the
  paired differences when scored."""
  rows = {system_name: result}
  if "comparison" in result:
    rows[compared_name] = result["comparison"]["metrics"]
  rows.update(_baseline_rows(result))
  tables = [markdown_table(rows),
            grounding_table(result, system_name, compared_name),
            difference_table(result, system_name, compared_name)]
  return "\n".join(table for table in tables if table)
