"""KILT's files: the jsonl reader's one-line errors, ELI5 questions, the output record."""

import json
import os

import pytest

import kilt_files
import retrieval_fixtures
import utils


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def test_real_kilt_lines_are_read_under_kilt_names():
  # The last line of each file has no newline; outputs may hold only
  # provenance; the test split has no answers.
  for split, name in kilt_files.ELI5_SPLIT_FILES.items():
    path = os.path.join(retrieval_fixtures.KILT_ELI5_SAMPLE, name)
    records = list(kilt_files.read_jsonl(path, "KILT file"))
    assert [line_number for line_number, _ in records] == [1, 2, 3, 4, 5]
    questions = list(kilt_files.eli5_questions(path))
    assert [(question_id, question) for question_id, question, _ in
            questions] == [(record["id"], record["input"])
                           for _, record in records]
    for (_, record), (_, _, answers) in zip(records, questions):
      assert answers == [output["answer"] for output in record.get("output", [])
                         if "answer" in output]
    assert any(answers for _, _, answers in questions) == (split != "test")


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
  path = _write(tmp_path / "a.jsonl", b'\n{"id": "a"}\n  \n{"id": "b"}')
  assert list(kilt_files.read_jsonl(path, "file")) == [
      (2, {"id": "a"}), (4, {"id": "b"})]


@pytest.mark.parametrize("data, message", [
    (b"", "{path}: no lines (an empty gold file), expected one JSON object a "
     "line"),
    (b"\n \n", "{path}: no lines (an empty gold file)"),
    (b'{"id": "a"}\n{"id": "caf\xe9"}\n',
     "{path}: line 2: not UTF-8 (invalid continuation byte at byte 11), "
     "expected UTF-8 JSON"),
    (b'{"id": "a"}\n\n{"id": \n',
     "{path}: line 3: malformed JSON (Expecting value, column 8)"),
    (b'["a"]\n', "{path}: line 1: expected a JSON object, got list"),
])
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, data,
                                                             message):
  path = _write(tmp_path / "gold.jsonl", data)
  with pytest.raises(utils.UserError) as error:
    list(kilt_files.read_jsonl(path, "gold file"))
  assert str(error.value).startswith(message.format(path=path))
  assert "\n" not in str(error.value)


def test_missing_file_and_directory_are_refused(tmp_path):
  missing = str(tmp_path / "missing.jsonl")
  with pytest.raises(utils.UserError) as error:
    list(kilt_files.read_jsonl(missing, "guess file"))
  assert str(error.value) == f"{missing}: guess file does not exist"
  with pytest.raises(utils.UserError) as error:
    list(kilt_files.read_jsonl(str(tmp_path), "guess file"))
  assert str(error.value) == (
      f"{tmp_path}: is a directory, expected a jsonl file (guess file)")


@pytest.mark.parametrize("record, message", [
    ({"input": "why?"}, "line 1: no string 'id' (a KILT line has id, input, "
     "output)"),
    ({"id": "a", "input": 3}, "line 1: no string 'input'"),
    ({"id": "a", "input": "why?", "output": {"answer": "x"}},
     "line 1: 'output' is not a list"),
    ({"id": "a", "input": "why?", "output": [{"answer": 42}]},
     "line 1: an 'answer' is int, expected a string"),
])
def test_bad_eli5_lines_are_refused(tmp_path, record, message):
  path = _write(tmp_path / "eli5.jsonl", json.dumps(record).encode("utf-8"))
  with pytest.raises(utils.UserError) as error:
    list(kilt_files.eli5_questions(path))
  assert str(error.value).startswith(f"{path}: {message}")


def test_output_record_is_kilts_format():
  provenance = [{"wikipedia_id": "12", "title": "Sky", "score": 1.5}]
  assert kilt_files.output_record("id-1", "why?", "because.", provenance) == {
      "id": "id-1", "input": "why?",
      "output": [{"answer": "because.", "provenance": provenance}]}
