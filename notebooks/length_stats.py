"""GPT-2 length statistics behind the two length notebooks, as plain functions.

`compute_cumul_lengths.ipynb` asks how much of GPT-2's window the question and
the answer leave for retrieved contexts; `cumul_lengths_retrieval.ipynb` asks
how long the retrieved blocks are, alone and stacked best first. The notebooks
only set parameters, call these functions and show the results, so the same
numbers come out of a script or a test.

Texts are counted as the layout holds them (`task_specific.text_token_ids`:
after a space, as they follow `Question:`, `Context:` or `Answer:`), and the
room for contexts is the budget of `task_specific.Layout` (its module doc):
what the sequence leaves after the fixed parts (`Layout.fixed_tokens`) and
the question actually laid out. k blocks of `block_length` tokens fit when
`room >= k * (block_length + len(context helper))`.
"""

import itertools
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kilt_files  # pylint: disable=g-import-not-at-top
import neighbour_cache  # pylint: disable=g-import-not-at-top
import task_specific  # pylint: disable=g-import-not-at-top
import utils  # pylint: disable=g-import-not-at-top

load_tokenizer = task_specific.load_tokenizer


def read_kilt_examples(path, limit=None):
  """(question, [answers]) pairs of a KILT jsonl (local or gs://), in file order.

  Answers are the non-empty `output[*].answer` strings (none on the test split).
  """
  questions = kilt_files.eli5_questions(path)
  return [(question, [answer for answer in answers if answer])
          for _, question, answers in itertools.islice(questions, limit)]


def token_lengths(texts, tokenizer):
  """GPT-2 token counts of `texts` as the layout holds them, an int64 array."""
  return np.array([len(ids) for ids in task_specific.text_token_ids(
      tokenizer, list(texts))], np.int64)


def question_answer_lengths(examples, tokenizer):
  """Token lengths of every (question, answer) pair: one row per answer.

  Returns (question_lengths, answer_lengths), two int64 arrays of equal size.
  """
  questions = [question for question, answers in examples for _ in answers]
  answers = [answer for _, answers in examples for answer in answers]
  return token_lengths(questions, tokenizer), token_lengths(answers, tokenizer)


def make_layout(tokenizer, *, n_positions, max_question_tokens,
                answer_reserve, max_block_tokens):
  """The training layout (helper words on, one ` Context:` per context)."""
  config = task_specific.LayoutConfig(
      max_question_tokens=max_question_tokens,
      max_answer_tokens=answer_reserve, max_context_tokens=max_block_tokens)
  return task_specific.make_layout(tokenizer, config, n_positions)


def room_for_contexts(question_lengths, layout):
  """Tokens the layout leaves for contexts and their helpers, per example
  (the budget `task_specific.prompt_and_kept` gives `fit_contexts`)."""
  question_tokens = np.minimum(np.asarray(question_lengths),
                               layout.max_question_tokens)
  return (layout.sequence_length - layout.fixed_tokens +
          layout.max_question_tokens - question_tokens)


def fraction_with_room(room, num_contexts, block_length, per_context_tokens):
  """Fraction of examples whose room holds `num_contexts` whole blocks."""
  if len(room) == 0:
    return float("nan")
  needed = num_contexts * (block_length + per_context_tokens)
  return float(np.mean(np.asarray(room) >= needed))


def room_table(room, num_contexts_list, block_lengths, per_context_tokens):
  """[len(block_lengths), len(num_contexts_list)] fractions with room."""
  return np.array([[fraction_with_room(room, k, block_length,
                                       per_context_tokens)
                    for k in num_contexts_list]
                   for block_length in block_lengths])


def markdown_room_table(table, num_contexts_list, block_lengths):
  """The room table as markdown: one row per block length, one column per k."""
  header = "| block length | " + " | ".join(
      f"k={k}" for k in num_contexts_list) + " |"
  lines = [header, "| ---: |" + " ---: |" * len(num_contexts_list)]
  for block_length, row in zip(block_lengths, table):
    lines.append(f"| {block_length} | " +
                 " | ".join(f"{fraction:.3f}" for fraction in row) + " |")
  return "\n".join(lines) + "\n"


def length_percentiles(lengths, percents=(50, 80, 90, 95, 99)):
  """{percent: length} (numpy's linear interpolation), empty for no lengths."""
  if len(lengths) == 0:
    return {}
  return {percent: float(np.percentile(lengths, percent))
          for percent in percents}


def cached_neighbour_lengths(cache_dir, split, limit=None):
  """GPT-2 lengths of the cached neighbour blocks of a split, best first.

  Returns (lengths [E, N] int64, manifest). Lengths are as cached, that is cut
  at the manifest's `max_block_tokens`.
  """
  manifest = neighbour_cache.read_manifest(cache_dir)
  neighbour_cache.check_manifest(manifest, cache_dir, split=split)
  dataset = tf.data.TFRecordDataset(
      neighbour_cache.split_files(cache_dir, manifest, split))
  if limit is not None:
    dataset = dataset.take(limit)
  rows = [
      neighbour_cache.parse_example(serialized)["neighbours"].row_lengths()
      .numpy() for serialized in dataset
  ]
  if not rows:
    return np.zeros([0, manifest["num_neighbours"]], np.int64), manifest
  return np.stack(rows).astype(np.int64), manifest


def blocks_file_lengths(blocks_path, tokenizer, limit):
  """GPT-2 lengths of the first `limit` blocks of a REALM blocks.tfr, each
  counted as it follows ` Context:` (as the cache holds it)."""
  if not tf.io.gfile.exists(blocks_path):
    raise utils.UserError(f"blocks file {blocks_path} does not exist")
  texts = [record.decode("utf-8") for record in
           tf.data.TFRecordDataset(blocks_path).take(limit).as_numpy_iterator()]
  return token_lengths(texts, tokenizer)


def cumulative_context_lengths(neighbour_lengths):
  """[E, N]: tokens taken by the best 1, 2, … N blocks of each example."""
  return np.cumsum(neighbour_lengths, axis=1)


def plot_cumulative_distributions(series, path, *, title, xlabel,
                                  vertical_lines=()):
  """Empirical CDFs of {label: lengths} in one PNG at `path` (local or gs://)."""
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for label, lengths in series.items():
    values = np.sort(np.asarray(lengths))
    if len(values):
      axes.step(values, np.arange(1, len(values) + 1) / len(values),
                where="post", label=label)
  for x, label in vertical_lines:
    axes.axvline(x, color="grey", linestyle="--", linewidth=1)
    axes.annotate(label, (x, 0.02), rotation=90, color="grey",
                  ha="right", va="bottom")
  axes.set(title=title, xlabel=xlabel, ylabel="fraction of examples ≤ x",
           ylim=(0, 1.02))
  axes.grid(alpha=0.3)
  axes.legend()
  return save_figure(figure, path)


def plot_room_table(table, num_contexts_list, block_lengths, path, *, title):
  """Fraction with room for k contexts, one line per block length, as a PNG."""
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for block_length, row in zip(block_lengths, table):
    axes.plot(num_contexts_list, row, marker="o",
              label=f"{block_length} tokens per block")
  axes.set(title=title, xlabel="k contexts", ylabel="fraction of examples",
           ylim=(0, 1.02))
  axes.set_xticks(list(num_contexts_list))
  axes.grid(alpha=0.3)
  axes.legend()
  return save_figure(figure, path)


def save_figure(figure, path):
  """Writes a figure as PNG through a temporary name; closes it; returns path."""
  parent = os.path.dirname(path)
  if parent:
    utils.makedirs(parent)
  tmp = utils.temporary_path(path)
  with tf.io.gfile.GFile(tmp, "wb") as f:
    figure.savefig(f, format="png", dpi=100, bbox_inches="tight")
  plt.close(figure)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path
