"""The length notebooks: executed headless on a tiny demo world and cache; their numbers and PNGs."""

import os
import re

import cache_fixtures
import kilt_files
import nbclient
import nbformat
import numpy as np
import pytest
import tensorflow as tf
import transformers

from notebooks import length_stats
from util_scripts import demo_world

# Slow, the whole module (executes the notebooks):
# not in `make test-fast`.
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS_DIR = os.path.join(REPO_ROOT, "notebooks")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("world"))
  demo_world.build_world(directory, num_train=40, num_validation=5,
                             num_test=2, num_distractor_blocks=20,
                             gpt2_vocab_size=300)
  return directory


def run_notebook(name, parameters):
  """Executes a notebook with `parameters` set after its parameters cell.

  Returns the text the notebook printed.
  """
  notebook = nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)
  index = next(i for i, cell in enumerate(notebook.cells)
               if "parameters" in cell.metadata.get("tags", []))
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell("\n".join(
      f"{key} = {value!r}" for key, value in parameters.items())))
  nbclient.NotebookClient(
      notebook, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": NOTEBOOKS_DIR}}).execute()
  return "".join(output.get("text", "") for cell in notebook.cells
                 if cell.cell_type == "code" for output in cell.outputs
                 if output.output_type == "stream")


def _png(path):
  with open(path, "rb") as f:
    return f.read(len(PNG_MAGIC)) == PNG_MAGIC


def test_room_arithmetic_by_hand(world):
  tokenizer = length_stats.load_tokenizer(os.path.join(world, "tokenizer"))
  layout = length_stats.make_layout(tokenizer, n_positions=100,
                                    max_question_tokens=30, answer_reserve=20,
                                    max_block_tokens=10)
  helpers = len(layout.question_helper) + len(layout.answer_helper)
  room = length_stats.room_for_contexts([10, 50], layout)
  # 100 - helpers - question (cut to 30) - reserve 20 - EOS.
  np.testing.assert_array_equal(room, [69 - helpers, 49 - helpers])
  per_context = len(layout.context_helper)
  fits_first_only = (49 - helpers) // (10 + per_context) + 1
  assert length_stats.fraction_with_room(room, fits_first_only, 10,
                                         per_context) == 0.5
  np.testing.assert_array_equal(
      length_stats.cumulative_context_lengths(np.array([[3, 4, 5]])),
      [[3, 7, 12]])


def test_compute_cumul_lengths_notebook(world, tmp_path):
  kilt_path = os.path.join(world, "kilt", kilt_files.ELI5_SPLIT_FILES["train"])
  tokenizer_dir = os.path.join(world, "tokenizer")
  # Sizes at which, on this tiny world, some fractions fall strictly between
  # 0 and 1.
  n_positions, max_question_tokens, answer_reserve = 96, 40, 8
  block_lengths, num_contexts = [4, 8, 12], [1, 2, 3, 4]
  output_dir = str(tmp_path / "out")
  printed = run_notebook("compute_cumul_lengths.ipynb", {
      "KILT_PATH": kilt_path, "TOKENIZER": tokenizer_dir, "LIMIT": None,
      "N_POSITIONS": n_positions, "MAX_QUESTION_TOKENS": max_question_tokens,
      "ANSWER_RESERVE": answer_reserve,
      "BLOCK_LENGTHS": block_lengths, "NUM_CONTEXTS": num_contexts,
      "OUTPUT_DIR": output_dir})

  # The same fractions, from the files and the tokenizer directly: the
  # question cut to its maximum, the answer reserve and EOS, the helper words.
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tokenizer_dir)
  count = lambda text: len(tokenizer(text)["input_ids"])
  fixed = count("Question:") + count(" Answer:") + answer_reserve + 1
  per_context = count(" Context:")
  rooms = []
  for _, record in kilt_files.read_jsonl(kilt_path, "KILT file"):
    question_tokens = min(count(" " + record["input"]), max_question_tokens)
    rooms += [n_positions - question_tokens - fixed] * len(record["output"])
  assert f"40 questions, {len(rooms)} (question, answer) examples" in printed
  fractions = []
  for block_length in block_lengths:
    row = re.search(rf"^\| {block_length} \| (.*) \|$", printed, re.MULTILINE)
    expected = [np.mean([room >= k * (block_length + per_context)
                         for room in rooms]) for k in num_contexts]
    assert [float(value) for value in row.group(1).split(" | ")] == (
        pytest.approx(expected, abs=5e-4))
    fractions += expected
  assert any(0 < fraction < 1 for fraction in fractions)
  for png in ("question_answer_lengths.png", "room_for_contexts.png"):
    assert _png(os.path.join(output_dir, png))


def test_cumul_lengths_retrieval_notebook_from_a_cache(tmp_path):
  cache_dir = str(tmp_path / "cache")
  records = cache_fixtures.random_records(30, num_neighbours=4, vocab_size=300,
                                          seed=0, max_block_tokens=12)
  cache_fixtures.write_cache(cache_dir, {"train": records}, num_neighbours=4,
                             vocab_size=300, max_block_tokens=12)
  budget = 20
  output_dir = str(tmp_path / "out")
  printed = run_notebook("cumul_lengths_retrieval.ipynb", {
      "CACHE_DIR": cache_dir, "SPLIT": "train", "LIMIT": None,
      "BUDGET": budget, "OUTPUT_DIR": output_dir})

  cumulative = np.cumsum([[len(block) for block in record["neighbour_ids"]]
                          for record in records], axis=1)
  assert "30 questions x 4 neighbours" in printed
  for k in range(1, 5):
    line = re.search(rf"^k={k}: median (\S+), within budget (\S+)$", printed,
                     re.MULTILINE)
    assert float(line.group(1)) == pytest.approx(
        np.median(cumulative[:, k - 1]), abs=0.5)
    assert float(line.group(2)) == pytest.approx(
        np.mean(cumulative[:, k - 1] <= budget), abs=5e-4)
  for png in ("block_lengths.png", "cumulative_block_lengths.png"):
    assert _png(os.path.join(output_dir, png))


def test_block_lengths_from_a_blocks_file(world):
  tokenizer = length_stats.load_tokenizer(os.path.join(world, "tokenizer"))
  blocks_path = os.path.join(world, "realm", "blocks.tfr")
  lengths = length_stats.blocks_file_lengths(blocks_path, tokenizer, limit=5)
  first_texts = [record.decode("utf-8") for record in
                 tf.data.TFRecordDataset(blocks_path).take(5)
                 .as_numpy_iterator()]
  # Counted as the cache holds them: after a space, as after ` Context:`.
  assert lengths.tolist() == [len(tokenizer(" " + text)["input_ids"])
                              for text in first_texts]
