"""Does the model use its retrievals? The context-condition grid of a run.

  import evaluation, training
  evaluation.evaluate(training.TrainConfig(..., conditions=["real", "none"]))

scores the run's latest checkpoint on `eval_split` under every context
condition of `conditions` (`context_draw.Condition`): the same checkpoint,
the same examples, teacher-forced answer NLL. It writes, into the run
directory (`run_dir`'s names):

- `ablation_{split}_examples.jsonl`: one row per (example, condition):
  `id`, `answer_index`, `condition`, `nll_sum`, `tokens`, `words`, `bytes`;
- `ablation_{split}.json`: per condition the totals of those rows
  (`answer_loss`, `answer_ppl` per token, `ppl_per_word`, `bits_per_byte`,
  counts), and its paired comparison with its baseline (`none`, or
  `counterfactual_none` for `counterfactual`): the difference in NLL per
  token with a bootstrap 95 % interval over examples and a sign-flip
  permutation p-value;
- `ablation_{split}.md` (the table) and `ablation_{split}.png` (the plot).

`gold` and `counterfactual` read a contexts file (`gold_contexts_path`,
`counterfactual_path`): jsonl, one question per line, `{"id", "input",
"answer", "contexts": [text, ...]}` — the passages GPT-2 is given, best
first, and the answer scored (the gold one, or the one the counterfactual
passages imply). The demo world writes both; a condition whose file is not
given is skipped with a one-line note.
"""

import collections
import dataclasses
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

import context_draw
import eval_stats
import kilt_files
import neighbour_cache
import run_dir as run_directory
import task_specific
import tf_utils
import training
import utils

Condition = context_draw.Condition
# Each condition's paired baseline: the same examples and answers, no context.
BASELINE = {condition: Condition.NONE for condition in Condition}
BASELINE[Condition.COUNTERFACTUAL] = Condition.COUNTERFACTUAL_NONE
del BASELINE[Condition.NONE], BASELINE[Condition.COUNTERFACTUAL_NONE]
# Which contexts file a condition reads (the flag naming it).
_CONTEXTS_FILE_FLAG = {Condition.GOLD: "gold_contexts_path",
                       Condition.COUNTERFACTUAL: "counterfactual_path",
                       Condition.COUNTERFACTUAL_NONE: "counterfactual_path"}


def evaluate(config):
  """The grid on the run's latest checkpoint; returns `ablation_{split}.json`'s
  table (`training.TrainConfig`: its eval_* fields and `conditions`)."""
  training.check_config(config)
  conditions = check_conditions(config.conditions)
  if config.eval_stride:
    task_specific.check_eval_stride(config.eval_stride,
                                    config.layout.max_answer_tokens)
  run_dir = config.run_dir
  if not run_directory.exists(run_dir):
    raise utils.UserError(
        f"{run_dir}: no run here (no config.json), expected a run directory "
        "made by --task=train: check --output_dir and --run_name")
  with run_directory.lock(
      run_dir, tf_utils.task_name(config.strategy.distribute_mode),
      create=False):
    setup = training.Setup(config, run_directory.read_config(run_dir))
    return _evaluate(setup, conditions)


def check_conditions(names):
  """The conditions named, in order, as `Condition`s; a UserError otherwise."""
  if not names:
    raise utils.UserError(
        "--conditions is empty, expected some of "
        f"{', '.join(context_draw.CONDITIONS)}")
  unknown = [name for name in names if name not in context_draw.CONDITIONS]
  if unknown:
    raise utils.UserError(
        f"--conditions: unknown condition {unknown[0]!r}, expected some of "
        f"{', '.join(context_draw.CONDITIONS)}")
  if len(set(names)) != len(names):
    raise utils.UserError(f"--conditions={','.join(names)}: a condition is "
                          "named twice")
  return [Condition(name) for name in names]


def condition_data_config(setup, condition):
  """The `DataConfig` of a condition (contexts-file conditions: top k of
  the file's passages, in their order)."""
  config = setup.config
  approach, temperature = (context_draw.Approach.CACHED_PRETOK,
                           config.eval_retrieval_temperature)
  extra = {}
  if condition in (Condition.NONE, Condition.COUNTERFACTUAL_NONE):
    approach = context_draw.Approach.NAKED_LM
  elif condition == Condition.RANDOM:
    approach = context_draw.Approach.RANDOM_CONTEXT
  elif condition == Condition.SHUFFLED:
    extra = dict(shuffle_contexts=True)
  elif condition == Condition.DISTRACTOR:
    offset = config.distractor_offset or config.num_retrievals
    available = setup.neighbours_per_question
    if offset + config.num_retrievals > available:
      last = offset + config.num_retrievals - 1
      raise utils.UserError(
          f"--conditions=distractor: ranks {offset}..{last} asked for "
          f"(--distractor_offset="
          f"{offset}, --num_retrievals={config.num_retrievals}), but there "
          f"are {available} neighbours per question (the cache's, or "
          "--live_num_neighbours), expected --distractor_offset + "
          "--num_retrievals <= that")
    temperature, extra = 0.0, dict(rank_offset=offset)
  elif condition in (Condition.TOP_K, Condition.GOLD,
                     Condition.COUNTERFACTUAL):
    temperature = 0.0
  extra["eval_stride"] = config.eval_stride
  if condition in _CONTEXTS_FILE_FLAG:
    return task_specific.DataConfig(
        approach=approach, num_retrievals=config.num_retrievals,
        retrieval_temperature=0.0, seed=config.random_seed, **extra)
  data_config = setup.data_config(approach, temperature)
  return dataclasses.replace(data_config, **extra)


# ---------------------------------------------------------------------------
# Contexts files (gold, counterfactual)
# ---------------------------------------------------------------------------


def read_contexts_file(path, flag):
  """[{"id", "input", "answer", "contexts"}] of a contexts file; a
  UserError naming the file, line and field otherwise."""
  records = []
  for line_number, record in kilt_files.read_jsonl(path, f"--{flag} file"):
    where = f"{path}:{line_number}"
    if not isinstance(record, dict):
      raise utils.UserError(f"{where}: expected a JSON object")
    for field in ("id", "input", "answer"):
      if not isinstance(record.get(field), str) or not record[field]:
        raise utils.UserError(
            f"{where}: field {field!r} must be a non-empty string")
    contexts = record.get("contexts")
    if not (isinstance(contexts, list) and contexts and
            all(isinstance(text, str) for text in contexts)):
      raise utils.UserError(
          f"{where}: field 'contexts' must be a non-empty list of strings")
    records.append(record)
  if not records:
    raise utils.UserError(f"{path}: no lines, expected one question per line "
                          f"(--{flag})")
  return records


def provenance_text(paragraphs, provenance):
  """The text of one KILT provenance in its page's paragraphs.

  KILT's span: paragraphs `start_paragraph_id` .. `end_paragraph_id`, from
  `start_character` in the first to `end_character` (exclusive) in the last,
  -1 meaning the paragraph's start or end (kilt_utils.match_answer). Without
  paragraph ids (provenance that names a page only), the page's paragraphs
  after the title (paragraph 0). None when the span lies outside the page.
  """
  start, end = (provenance.get("start_paragraph_id"),
                provenance.get("end_paragraph_id"))
  if start is None or end is None:
    text = " ".join(paragraph.strip() for paragraph in paragraphs[1:])
    return text or None
  if not 0 <= start <= end < len(paragraphs):
    return None
  span = list(paragraphs[start:end + 1])
  last_end = provenance.get("end_character", -1)
  if last_end is not None and last_end >= 0:
    span[-1] = span[-1][:last_end]
  first_start = provenance.get("start_character", -1)
  if first_start is not None and first_start >= 0:
    span[0] = span[0][first_start:]
  return " ".join(part.strip() for part in span).strip() or None


def gold_contexts_from_kilt(gold_path, knowledge_source_path):
  """A gold contexts file's records from KILT gold and KILT's knowledge source.

  Each question whose outputs hold provenance gets the provenance passages
  (in the outputs' order, duplicates once) and its first answer, the one the
  cache and the evaluation score. The knowledge source is streamed once,
  keeping only the pages the provenance names.

  Returns:
    (records, counts): `questions`, `with_provenance`, `written`,
    `missing_pages` (provenance naming a page the source lacks or a span
    outside it).
  """
  questions = []
  wanted = set()
  for line_number, record in kilt_files.read_jsonl(gold_path, "gold file"):
    outputs = record.get("output") or []
    answers = [o["answer"] for o in outputs
               if isinstance(o, dict) and isinstance(o.get("answer"), str)]
    provenance = [p for o in outputs if isinstance(o, dict)
                  for p in o.get("provenance") or []
                  if isinstance(p, dict) and p.get("wikipedia_id")]
    if not isinstance(record.get("id"), str) or not isinstance(
        record.get("input"), str):
      raise utils.UserError(f"{gold_path}: line {line_number}: no string "
                            "'id' and 'input', expected a KILT line")
    questions.append((record, answers, provenance))
    wanted.update(str(p["wikipedia_id"]) for p in provenance)
  pages = {}
  for line_number, page in kilt_files.read_jsonl(
      knowledge_source_path, "KILT knowledge source",
      progress_description="knowledge source"):
    page_id = str(page.get("wikipedia_id"))
    if page_id in wanted:
      if not isinstance(page.get("text"), list):
        raise utils.UserError(
            f"{knowledge_source_path}: line {line_number}: 'text' is not a "
            "list of paragraphs, expected a KILT page")
      pages[page_id] = page["text"]
  records, missing = [], 0
  for record, answers, provenance in questions:
    contexts = []
    for item in provenance:
      paragraphs = pages.get(str(item["wikipedia_id"]))
      text = None if paragraphs is None else provenance_text(paragraphs, item)
      missing += text is None
      if text is not None and text not in contexts:
        contexts.append(text)
    if contexts and answers:
      records.append({"id": record["id"], "input": record["input"],
                      "answer": answers[0], "contexts": contexts})
  return records, {"questions": len(questions),
                   "with_provenance": sum(bool(q[2]) for q in questions),
                   "written": len(records), "missing_pages": missing}


def write_contexts_file(path, records):
  """Writes a contexts file (jsonl), through a temporary name."""
  utils.makedirs(os.path.dirname(path) or ".")
  utils.atomic_write_text(path, "".join(json.dumps(record) + "\n"
                                        for record in records))


def contexts_file_examples(records, tokenizer):
  """A dataset of (epoch, example) pairs shaped as
  `neighbour_cache.parse_example`'s, from a contexts file's records."""
  question_ids = task_specific.text_token_ids(
      tokenizer, [r["input"] for r in records])
  answer_ids = task_specific.text_token_ids(
      tokenizer, [r["answer"] for r in records])
  context_ids = [task_specific.text_token_ids(tokenizer, r["contexts"])
                 for r in records]

  def examples():
    for record, question, answer, contexts in zip(records, question_ids,
                                                  answer_ids, context_ids):
      yield (np.int64(context_draw.EVALUATION_EPOCH), {
          "id": record["id"], "question": record["input"],
          "question_ids": np.array(question, np.int32),
          "answers": tf.ragged.constant([answer], tf.int32),
          "neighbour_block_ids": np.full(len(contexts), -1, np.int64),
          # Descending: the top-k draw keeps the file's order.
          "neighbour_scores": -np.arange(len(contexts), dtype=np.float32),
          "neighbours": tf.ragged.constant(contexts, tf.int32),
      })

  ragged = tf.RaggedTensorSpec([None, None], tf.int32, ragged_rank=1)
  return tf.data.Dataset.from_generator(examples, output_signature=(
      tf.TensorSpec([], tf.int64), {
          "id": tf.TensorSpec([], tf.string),
          "question": tf.TensorSpec([], tf.string),
          "question_ids": tf.TensorSpec([None], tf.int32),
          "answers": ragged,
          "neighbour_block_ids": tf.TensorSpec([None], tf.int64),
          "neighbour_scores": tf.TensorSpec([None], tf.float32),
          "neighbours": ragged,
      }))


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


class _Examples:
  """What a condition scores: the split's cache, or a contexts file's
  records; per (example key, answer index) its id and the scored answer text
  (for the word and byte normalisers)."""

  def __init__(self, setup, split, records=None):
    self.split, self.records = split, records
    self.entries = {}
    if records is None:
      ids, answers = [], []
      for example in tf.data.TFRecordDataset(setup.files(split)).map(
          neighbour_cache.parse_example):
        ids.append(example["id"].numpy().decode("utf-8"))
        answers.append(example["answers"].to_list())
    else:
      ids = [record["id"] for record in records]
      answers = [[answer] for answer in task_specific.text_token_ids(
          setup.tokenizer, [record["answer"] for record in records])]
    # One op for the split's keys, not one per example.
    keys = task_specific.example_key(tf.constant(ids, tf.string)).numpy()
    for example_id, key, example_answers in zip(ids, keys.tolist(), answers):
      for answer_index, answer in enumerate(
          example_answers if setup.config.every_answer
          else example_answers[:1]):
        if (key, answer_index) in self.entries:
          raise utils.UserError(
              f"split {split!r}: id {example_id!r} appears twice (or two ids "
              "share a hash), expected unique ids")
        # With windows the whole answer is scored, else its first part.
        scored = (answer if setup.config.eval_stride
                  else answer[:setup.layout.max_answer_tokens])
        text = setup.tokenizer.decode(scored).lstrip(" ")
        self.entries[(key, answer_index)] = (example_id, text)

  def dataset(self, setup, data_config, number_batches):
    examples_fn = None
    if self.records is not None:
      examples_fn = lambda: contexts_file_examples(self.records,
                                                   setup.tokenizer)
    return setup.eval_dataset(data_config, self.split, number_batches,
                              examples_fn=examples_fn)


def make_scoring_step(setup):
  """distributed batch -> every row's (answer NLL sum, answer tokens,
  example key, answer index), gathered from all replicas."""

  @tf.function(autograph=False)
  def score_step(batch):
    def replica_fn(replica_batch):
      loss_sums, tokens = task_specific.answer_losses_per_row(
          setup.model, replica_batch, setup.layout.max_labels)
      return (loss_sums, tokens, replica_batch["example_key"],
              replica_batch["answer_index"])
    per_replica = setup.strategy.run(replica_fn, args=(batch,))
    return [setup.strategy.gather(value, axis=0) for value in per_replica]

  return score_step


def score_rows(setup, dataset, description, score_step):
  """{(example key, answer index): [NLL sum, tokens]} over a dataset.

  Each row of the dataset is scored by one replica (`Setup.eval_dataset`),
  and `score_step` gathers every replica's rows: the sums count each row
  once, on every worker."""
  sums = collections.defaultdict(lambda: [0.0, 0.0])
  for batch in tqdm.tqdm(dataset, desc=description, leave=False,
                         disable=not setup.is_chief):
    for loss_sum, tokens, key, answer_index in zip(
        *(value.numpy() for value in score_step(batch))):
      if key >= 0:
        sums[(int(key), int(answer_index))][0] += float(loss_sum)
        sums[(int(key), int(answer_index))][1] += float(tokens)
  return dict(sums)


def _evaluate(setup, conditions):
  training.check_batch(setup)
  split = setup.config.eval_split
  training.check_split_has_answers(setup, split, "--task=evaluate")
  data_configs, sources, notes = {}, {}, []
  cache_examples = None
  file_examples = {}
  for condition in conditions:
    flag = _CONTEXTS_FILE_FLAG.get(condition)
    if flag is None:
      cache_examples = cache_examples or _Examples(setup, split)
      sources[condition] = cache_examples
    else:
      path = getattr(setup.config, flag)
      if not path:
        notes.append(f"{condition}: skipped, no --{flag} (a contexts file "
                     "with the passages and answers this condition needs)")
        logging.warning("%s", notes[-1])
        continue
      if path not in file_examples:
        file_examples[path] = _Examples(
            setup, split, read_contexts_file(path, flag))
      sources[condition] = file_examples[path]
    data_configs[condition] = condition_data_config(setup, condition)
  _, step = run_directory.restore_model(setup.run_dir, setup.model)
  score_step = make_scoring_step(setup)
  rows = []
  for condition, data_config in data_configs.items():
    examples = sources[condition]
    scores = score_rows(setup, examples.dataset(
        setup, data_config, setup.config.number_eval_batches),
                        str(condition), score_step)
    for key, (nll_sum, tokens) in sorted(
        scores.items(), key=lambda item: examples.entries[item[0]]):
      example_id, text = examples.entries[key]
      rows.append({"id": example_id, "answer_index": key[1],
                   "condition": str(condition), "nll_sum": nll_sum,
                   "tokens": int(round(tokens)),
                   "words": eval_stats.answer_words(text),
                   "bytes": eval_stats.answer_bytes(text)})
  table = summarise(rows, [str(c) for c in data_configs], step)
  if setup.is_chief:
    _write_report(setup.run_dir, split, rows, table, notes)
  print(json.dumps({name: None if row["answer_ppl"] is None
                    else round(row["answer_ppl"], 4)
                    for name, row in table.items()}))
  return table


# ---------------------------------------------------------------------------
# The table, its statistics and the report
# ---------------------------------------------------------------------------


def summarise(rows, conditions, checkpoint_step):
  """{condition: totals and its paired comparison} from per-example rows.

  A condition's entry keeps the keys of the original three-row table
  (`answer_loss`, nats per token; `answer_ppl`; `answer_tokens`;
  `checkpoint_step`) and adds `ppl_per_word`, `bits_per_byte`, `words`,
  `bytes`, `examples`, `answer_ppl_interval` (bootstrap 95 %) and
  `paired_vs_{baseline}` (`eval_stats.paired_normalised_difference` of the
  per-token perplexity: the difference, the ratio, their intervals and the
  permutation p-value). No answer token: the figures are null and
  `no_answer_tokens` is true.
  """
  by_condition = collections.defaultdict(dict)
  for row in rows:
    by_condition[row["condition"]][(row["id"], row["answer_index"])] = row
  table = {}
  for condition in conditions:
    examples = list(by_condition[condition].values())
    column = {name: np.array([row[name] for row in examples], np.float64)
              for name in ("nll_sum", "tokens", "words", "bytes")}
    figures = eval_stats.perplexities(column["nll_sum"], column["tokens"],
                                      column["words"], column["bytes"])
    tokens = figures["tokens"]
    entry = {
        "answer_loss": figures["nll_sum"] / tokens if tokens else None,
        "answer_ppl": figures["token_perplexity"], "answer_tokens": tokens,
        "ppl_per_word": figures["word_perplexity"],
        "bits_per_byte": figures["bits_per_byte"], "words": figures["words"],
        "bytes": figures["bytes"], "examples": len(examples),
        "checkpoint_step": checkpoint_step,
        "answer_ppl_interval": eval_stats.normalised_interval(
            column["nll_sum"], column["tokens"], "token"),
    }
    if not tokens:
      entry["no_answer_tokens"] = True
    baseline = BASELINE.get(Condition(condition))
    if baseline is not None and str(baseline) in by_condition:
      entry[f"paired_vs_{baseline}"] = paired_comparison(
          by_condition[condition], by_condition[str(baseline)])
    table[condition] = entry
  return table


def paired_comparison(rows, baseline_rows):
  """Per-token perplexity of `rows` minus `baseline_rows`' (and their ratio)
  over the examples both have, with bootstrap 95 % intervals and the
  permutation p-value of the per-example NLL differences."""
  keys = sorted(set(rows) & set(baseline_rows))

  def column(source, name):
    return np.array([source[key][name] for key in keys], np.float64)

  result = eval_stats.paired_normalised_difference(
      column(rows, "nll_sum"), column(rows, "tokens"),
      column(baseline_rows, "nll_sum"), column(baseline_rows, "tokens"),
      "token")
  result["sign_test_p_value"] = eval_stats.sign_test_p_value(
      column(rows, "nll_sum") - column(baseline_rows, "nll_sum"))
  return result


def markdown_report(table, notes=()):
  """The table as markdown: a row per condition, figures by normaliser."""

  def figure(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"

  lines = ["| condition | examples | answer tokens | ppl / token [95 % CI] "
           "| ppl / word | bits / byte | ratio to baseline [95 % CI] | p |",
           "| --- | ---: | ---: | --- | ---: | ---: | --- | ---: |"]
  for condition, entry in table.items():
    paired = [(name[len("paired_vs_"):], value) for name, value in
              entry.items() if name.startswith("paired_vs_")]
    comparison, p_value = "—", "—"
    if paired:
      baseline, result = paired[0]
      comparison = (f"{eval_stats.format_interval(result['ratio'], digits=3)}"
                    f" vs {baseline}")
      p_value = f"{result['p_value']:.4f}"
    lines.append(
        f"| {condition} | {entry['examples']} | {entry['answer_tokens']} | "
        f"{eval_stats.format_interval(entry['answer_ppl_interval'], digits=3)}"
        f" | {figure(entry['ppl_per_word'])} | "
        f"{figure(entry['bits_per_byte'])} | {comparison} | {p_value} |")
  lines += ["", "Perplexity per token is exp(Σ NLL / Σ answer tokens, EOS "
            "included); per word exp(Σ NLL / Σ whitespace words of the scored "
            "answer text); bits per byte Σ NLL / (ln 2 · Σ its UTF-8 bytes). "
            "Intervals: percentile bootstrap over examples "
            f"({eval_stats.DEFAULT_BOOTSTRAP.num_resamples} resamples); the "
            "ratio is paired (the same resampled examples for both "
            "conditions); p: sign-flip permutation test of the per-example "
            "NLL differences."]
  lines += [f"- {note}" for note in notes]
  return "\n".join(lines) + "\n"


def plot_report(table, path):
  """Perplexity per condition with its interval, and each paired ratio."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  names = [name for name, entry in table.items() if entry["answer_ppl"]]
  figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.6))
  values = [table[name]["answer_ppl"] for name in names]
  intervals = [table[name]["answer_ppl_interval"] for name in names]
  left.bar(names, values, yerr=[
      [value - (i["low"] or value) for value, i in zip(values, intervals)],
      [(i["high"] or value) - value for value, i in zip(values, intervals)]],
           capsize=4, color="tab:blue")
  left.set_ylabel("answer perplexity per token")
  left.set_title("by context condition (95 % CI)")
  paired = [(name, next(v for k, v in table[name].items()
                        if k.startswith("paired_vs_"))["ratio"])
            for name in names
            if any(k.startswith("paired_vs_") for k in table[name])]
  if paired:
    ratios = [ratio["estimate"] for _, ratio in paired]
    right.bar([name for name, _ in paired], ratios, yerr=[
        [r["estimate"] - r["low"] for _, r in paired],
        [r["high"] - r["estimate"] for _, r in paired]],
              capsize=4, color="tab:orange")
    right.axhline(1.0, color="black", linewidth=0.8)
  right.set_ylabel("perplexity ratio to the baseline")
  right.set_title("paired, vs none (counterfactual: vs counterfactual_none)")
  for axis in (left, right):
    axis.tick_params(axis="x", rotation=30)
  figure.tight_layout()
  with tf.io.gfile.GFile(path, "wb") as file:
    figure.savefig(file, format="png", dpi=110)
  pyplot.close(figure)


def _write_report(run_dir, split, rows, table, notes):
  utils.atomic_write_text(
      run_directory.ablation_examples_path(run_dir, split),
      "".join(json.dumps(row) + "\n" for row in rows))
  utils.atomic_write_text(run_directory.ablation_report_path(run_dir, split),
                          markdown_report(table, notes))
  plot_path = run_directory.ablation_plot_path(run_dir, split)
  staging = utils.temporary_path(plot_path)
  plot_report(table, staging)
  tf.io.gfile.rename(staging, plot_path, overwrite=True)
  # Last: its presence means the whole report was written.
  utils.atomic_write_json(run_directory.ablation_path(run_dir, split), table)
