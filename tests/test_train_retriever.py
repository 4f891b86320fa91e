"""Retriever training (issue 17): the run on a tiny demo world (KILT pairs
and DPR's JSON), its evaluation, exports and resume; bad inputs."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import block_store
import kilt_files
import kilt_metrics
import query_embedder
import retriever_training
import retrievers
import settings
from util_scripts import demo_world
import utils


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  directory = tmp_path_factory.mktemp("world")
  world = demo_world.build_world(str(directory), num_train=48,
                                 num_validation=16, num_test=1,
                                 num_distractor_blocks=30, gpt2_vocab_size=300)
  title_map = str(directory / "title_map.json")
  kilt_metrics.write_title_map(world["paths"]["knowledge_source"], title_map)
  return dict(world["paths"], title_map=title_map)


def _config(world, output_dir, **overrides):
  kilt_dir = world["kilt_dir"]
  return retriever_training.RetrieverTrainConfig(**{
      "retriever_config_path": world["retriever_config"],
      "train_path": os.path.join(kilt_dir,
                                 kilt_files.ELI5_SPLIT_FILES["train"]),
      "eval_path": os.path.join(kilt_dir,
                                kilt_files.ELI5_SPLIT_FILES["validation"]),
      "kilt_title_map": world["title_map"], "output_dir": str(output_dir),
      "batch_size": 16, "max_steps": 4, "checkpoint_every": 2,
      "grad_cache": True, "query_chunk_size": 8, "block_chunk_size": 8,
      "max_query_length": 32, "max_block_length": 48, "learning_rate": 1e-2,
      **overrides})


def _export_embeddings(export_path, questions):
  return query_embedder.QueryEmbedder(export_path).embed(questions)


@pytest.mark.slow
def test_training_evaluates_exports_and_resumes_to_the_same_result(
    world, tmp_path):
  questions = ["Who founded the Society of Life?", "when was it built"]
  run = tmp_path / "run"
  result = retriever_training.train(_config(world, run))
  assert result["before"]["step"] == 0 and result["after"]["step"] == 4
  for when in ("before", "after"):
    assert result[when]["num_examples"] == 16
    assert 0 <= result[when]["rprec"] <= result[when]["retrieval"]["recall@5"]
  assert json.loads((run / "retriever_eval.json").read_text()) == result
  latest = json.loads((run / "exports" / "latest.json").read_text())
  assert latest == {"step": 4, "block_embedder": None,
                    "query_embedder": str(run / "exports" /
                                          "query_embedder-00000004")}
  assert result["exports"] == latest
  assert tf.io.gfile.glob(str(run / "tensorboard" / "events.*"))
  trained = _export_embeddings(latest["query_embedder"], questions)
  untrained = _export_embeddings(world["embedder"], questions)
  assert np.abs(trained - untrained).max() > 1e-3

  # Killed after step 2's checkpoint: the rerun gives the same embedder.
  interrupted = tmp_path / "interrupted"
  retriever_training.train(_config(world, interrupted, max_steps=2))
  resumed = retriever_training.train(_config(world, interrupted))
  assert resumed["before"] == result["before"]
  np.testing.assert_allclose(
      _export_embeddings(resumed["exports"]["query_embedder"], questions),
      trained, atol=1e-6)


def _dpr_records(world, count):
  with open(os.path.join(world["kilt_dir"],
                         kilt_files.ELI5_SPLIT_FILES["train"]),
            encoding="utf-8") as f:
    questions = [json.loads(line) for line in f][:count]
  retriever = retrievers.load_retriever_config(world["retriever_config"])
  store = block_store.BlockStore(retriever["text_records"],
                                 retriever["num_block_records"],
                                 retriever["title_records"])
  records = []
  for index, question in enumerate(questions):
    block_id = int(question["output"][0]["provenance"][0]["wikipedia_id"])
    title, text = store.title(block_id), store.text(block_id)
    other = (block_id + 1) % store.num_blocks
    other_title, other_text = store.title(other), store.text(other)
    records.append({
        "question": question["input"], "answers": [],
        "positive_ctxs": [{"title": title, "text": text}],
        "negative_ctxs": [],
        "hard_negative_ctxs": [{"title": other_title, "text": other_text}]
                              if index % 2 else [],
    })
  return records


def _mirrored():
  return dataclasses.replace(
      retriever_training.RetrieverTrainConfig().strategy,
      distribute_mode="MirroredStrategy", devices=["/cpu:0", "/cpu:1"])


@pytest.mark.slow
def test_dpr_training_on_two_replicas_by_the_cache_equals_one_device(
    world, tmp_path):
  records = _dpr_records(world, 8)
  for record in records:  # Where hard_negative_ctxs is empty, this is taken.
    record["negative_ctxs"] = [{"title": "", "text": "an unrelated passage"}]
  path = tmp_path / "dpr.json"
  path.write_text(json.dumps(records, indent=1))
  examples = retriever_training.dpr_examples(str(path), 1)
  assert examples[1].hard_negatives[0][1] == records[1][
      "hard_negative_ctxs"][0]["text"]
  assert examples[0].hard_negatives == (("", "an unrelated passage"),)

  common = dict(train_format="dpr", train_path=str(path), eval_path=None,
                num_hard_negatives=1, train_block_embedder=True, batch_size=4,
                max_steps=2)
  one = retriever_training.train(_config(world, tmp_path / "one",
                                         grad_cache=False, **common))
  two = retriever_training.train(_config(
      world, tmp_path / "two", query_chunk_size=1, block_chunk_size=3,
      strategy=_mirrored(), **common))
  questions = [record["question"] for record in records]
  untrained = _export_embeddings(world["embedder"], questions)
  for name in ("query_embedder", "block_embedder"):
    want = _export_embeddings(one["exports"][name], questions)
    assert np.abs(want - untrained).max() > 1e-2
    np.testing.assert_allclose(_export_embeddings(two["exports"][name],
                                                  questions), want, atol=1e-4)


def test_index_hard_negatives_leave_out_the_positive(world):
  retriever = retrievers.load_retriever_config(world["retriever_config"])
  store = block_store.BlockStore(retriever["text_records"],
                                 retriever["num_block_records"],
                                 retriever["title_records"])
  blocks = np.eye(4, 3, dtype=np.float32)  # Block 3 scores 0 everywhere.
  examples = [retriever_training.Example("q", ("", "x"), (), 0),
              retriever_training.Example("r", ("", "y"), (), None)]
  mined = retriever_training.with_index_hard_negatives(
      examples, np.array([[3, 2, 1], [1, 3, 2]], np.float32), blocks, store,
      2)
  assert [m.hard_negatives for m in mined] == [
      tuple((store.title(b), store.text(b)) for b in ids)
      for ids in ([1, 2], [1, 2])]


def test_a_resume_with_other_settings_is_refused(world, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  recorded = settings.flatten(_config(world, run))
  (run / "config.json").write_text(json.dumps(
      dict(recorded, learning_rate=0.5, max_steps=1)))
  with pytest.raises(utils.UserError, match=r"--learning_rate=0.01: .*"
                     r"config.json records 0.5 for this run"):
    retriever_training.train(_config(world, run))


@pytest.mark.parametrize("field,message", [
    ("question", "line 4: no 'question' field"),
    ("positive_ctxs", "line 4: no 'positive_ctxs' field"),
    ("text", "line 4: an entry of 'positive_ctxs' has no string 'text'"),
])
def test_dpr_file_with_a_missing_field_is_a_one_line_error(
    tmp_path, field, message):
  records = [{"question": "q1", "positive_ctxs": [{"title": "t",
                                                   "text": "x"}]},
             {"question": "q2", "positive_ctxs": [{"title": "t",
                                                   "text": "y"}]}]
  if field == "text":
    del records[1]["positive_ctxs"][0]["text"]
  else:
    del records[1][field]
  path = tmp_path / "dpr.json"
  # One object a line after the opening bracket: the second is on line 4.
  path.write_text("[\n" + json.dumps(records[0]) + ",\n\n" +
                  json.dumps(records[1]) + "\n]\n")
  with pytest.raises(utils.UserError) as error:
    retriever_training.dpr_examples(str(path), 0)
  assert str(error.value).startswith(f"{path}: {message}")
  assert "\n" not in str(error.value)


def test_too_few_hard_negatives_is_a_one_line_error(tmp_path):
  path = tmp_path / "dpr.jsonl"
  path.write_text(json.dumps({"question": "q", "positive_ctxs": [
      {"title": "t", "text": "x"}], "hard_negative_ctxs": []}) + "\n")
  with pytest.raises(utils.UserError, match=r"dpr.jsonl: line 1: 0 "
                     r"hard_negative_ctxs \+ negative_ctxs, expected at least "
                     "--num_hard_negatives=2"):
    retriever_training.dpr_examples(str(path), 2)


@pytest.mark.parametrize("overrides,message", [
    (dict(query_chunk_size=17), "--query_chunk_size=17: expected between 1 "
     "and the 16 examples a replica encodes per step"),
    (dict(block_chunk_size=0), "--block_chunk_size=0: expected between 1"),
    (dict(batch_size=7, strategy=_mirrored()),
     "--batch_size=7: expected a multiple of the 2 replicas"),
    (dict(train_path=None), "--train_path is required"),
])
def test_bad_settings_are_refused_before_any_work(world, tmp_path, overrides,
                                                  message):
  output_dir = tmp_path / "run"
  with pytest.raises(utils.UserError, match=message):
    retriever_training.train(_config(world, output_dir, **overrides))
  assert not output_dir.exists()
