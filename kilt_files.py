"""KILT's files: their names, reading them, and the output record generations are written as.

KILT ELI5 splits and KILT's knowledge source are jsonl (one JSON object a
line), local or gs://. Every KILT file is read through `read_jsonl`, so a bad
file gives the same one-line error wherever it is read.
"""

import json

import tensorflow as tf
import tqdm

import utils

# KILT's official file names of the ELI5 splits, by the cache's split names.
ELI5_SPLIT_FILES = {
    "train": "eli5-train-kilt.jsonl",
    "validation": "eli5-dev-kilt.jsonl",
    "test": "eli5-test_without_answers-kilt.jsonl",
}
# KILT's Wikipedia: one page a line (`_id`, `wikipedia_id`, `wikipedia_title`,
# `text`, ...), 35 GB.
KNOWLEDGE_SOURCE_FILE = "kilt_knowledgesource.json"


def read_jsonl(path, what, *, progress_description=None):
  """Yields (line_number, object) of each non-blank line of a jsonl file.

  Streams the file (KILT's training split and knowledge source are too large
  to hold). A missing file, a directory, a line that is not UTF-8, not JSON
  or not an object, and a file without any object are `utils.UserError`s
  naming the file and the line.

  Args:
    path: the file, local or gs://.
    what: what the file is, for errors ("gold file", "KILT ELI5 file").
    progress_description: when given, a progress bar over the file's bytes.
  """
  if not tf.io.gfile.exists(path):
    raise utils.UserError(f"{path}: {what} does not exist")
  if tf.io.gfile.isdir(path):
    raise utils.UserError(
        f"{path}: is a directory, expected a jsonl file ({what})")
  found = False
  with tf.io.gfile.GFile(path, "rb") as f, tqdm.tqdm(
      total=tf.io.gfile.stat(path).length, desc=progress_description,
      unit="B", unit_scale=True, mininterval=2.0,
      disable=progress_description is None) as progress:
    for line_number, line in enumerate(f, start=1):
      progress.update(len(line))
      where = f"{path}: line {line_number}"
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError as error:
        raise utils.UserError(
            f"{where}: not UTF-8 ({error.reason} at byte {error.start}), "
            "expected UTF-8 JSON") from None
      if not text.strip():
        continue
      try:
        # Without the line's end, an error's column is on this line.
        record = json.loads(text.rstrip("\r\n"))
      except json.JSONDecodeError as error:
        raise utils.UserError(
            f"{where}: malformed JSON ({error.msg}, column {error.colno})"
        ) from None
      if not isinstance(record, dict):
        raise utils.UserError(
            f"{where}: expected a JSON object, got {type(record).__name__}")
      found = True
      yield line_number, record
  if not found:
    raise utils.UserError(
        f"{path}: no lines (an empty {what}), expected one JSON object a line")


def eli5_questions(path):
  """Yields (id, question, answers) of each line of a KILT ELI5 split file.

  `answers` are the `output[*].answer` strings in order (an output may hold
  only provenance); none on the test split.
  """
  for line_number, record in read_jsonl(path, "KILT ELI5 file"):
    where = f"{path}: line {line_number}"
    for key in ("id", "input"):
      if not isinstance(record.get(key), str):
        raise utils.UserError(
            f"{where}: no string {key!r} (a KILT line has id, input, output)")
    outputs = record.get("output", [])
    if not isinstance(outputs, list):
      raise utils.UserError(f"{where}: 'output' is not a list")
    answers = []
    for output in outputs:
      if isinstance(output, dict) and "answer" in output:
        if not isinstance(output["answer"], str):
          raise utils.UserError(
              f"{where}: an 'answer' is {type(output['answer']).__name__}, "
              "expected a string")
        answers.append(output["answer"])
    yield record["id"], record["input"], answers


def output_record(example_id, question, answer, provenance):
  """One line of KILT's output format, as KILT's scripts score it.

  `provenance`: the blocks the answer was generated from, as
  `kilt_metrics.block_provenance` writes them.
  """
  return {"id": example_id, "input": question,
          "output": [{"answer": answer, "provenance": provenance}]}
