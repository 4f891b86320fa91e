"""`make demo` end to end at a tiny size: every stage's outputs exist and agree."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import kilt_metrics
import neighbour_cache
from util_scripts import demo_layout
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "util_scripts", "run_demo.py")
MAX_STEPS = 3
TINY = ["--num_train=40", "--num_validation=8", "--num_test=4",
        "--num_distractor_blocks=20", "--gpt2_vocab_size=400",
        "--num_neighbours=4", f"--max_steps={MAX_STEPS}", "--warmup_steps=1"]


def _run_script(output_dir, *args):
  return subprocess.run(
      [sys.executable, SCRIPT, f"--output_dir={output_dir}", *args],
      capture_output=True, text=True, timeout=900,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def _run(output_dir):
  result = _run_script(output_dir, *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("demo")
  return output_dir, _run(output_dir)


def _cached_ids(cache_dir, split):
  manifest = neighbour_cache.read_manifest(cache_dir)
  files = neighbour_cache.split_files(str(cache_dir), manifest, split)
  return [neighbour_cache.parse_example(record)["id"].numpy().decode()
          for record in tf.data.TFRecordDataset(files)]


def _table_rows(report):
  """{run: [cells]} of the report's results table."""
  rows = {}
  for line in report.splitlines():
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    if cells[0] in demo_layout.TRAIN_RUNS:
      rows[cells[0]] = cells[1:]
  return rows


@pytest.mark.slow
def test_every_stage_writes_its_outputs(demo):
  output_dir, stdout = demo
  expected = ["world/world.json", "cache/manifest.json",
              "stage_times.json", "report.md", *demo_layout.PLOTS]
  for run in demo_layout.TRAIN_RUNS:
    expected += [f"runs/{run}/{name}" for name in
                 ("done.json", "metrics.jsonl", "ablation_validation.json")]
  expected += [f"runs/{demo_layout.GRID_RUN}/ablation_validation{suffix}"
               for suffix in (".md", ".png", "_examples.jsonl")]
  for run in demo_layout.GENERATION_RUNS + (
      demo_layout.RANDOM_CONTEXT_GENERATION,):
    expected += [f"generations/{run}/generations.jsonl",
                 f"generations/{run}/kilt_metrics.json"]
  expected += [os.path.relpath(path, output_dir)
               for path in demo_layout.grounding_paths(str(output_dir))]
  for name in expected:
    path = os.path.join(output_dir, name)
    assert os.path.getsize(path) > 0, path
  for plot in demo_layout.PLOTS:
    with open(os.path.join(output_dir, plot), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Progress is visible, and the table is printed as well as written.
  assert ("[demo 13/13] grounding: running kilt_metrics.evaluate_files"
          in stdout)
  with open(os.path.join(output_dir, "report.md"), encoding="utf-8") as f:
    assert _table_rows(f.read()) == _table_rows(stdout)


@pytest.mark.slow
def test_ids_agree_across_cache_generations_and_gold(demo):
  output_dir, _ = demo
  gold = kilt_metrics.read_gold(
      os.path.join(output_dir, "world", "kilt", demo_layout.GOLD_FILE))
  gold_ids = [record["id"] for record in gold]
  assert len(gold_ids) == 8
  assert _cached_ids(os.path.join(output_dir, "cache"), "validation") == gold_ids
  for run in demo_layout.GENERATION_RUNS:
    with open(demo_layout.generation_path(str(output_dir), run),
              encoding="utf-8") as f:
      assert [json.loads(line)["id"] for line in f] == gold_ids


@pytest.mark.slow
def test_report_table_has_the_numbers_of_the_json_files(demo):
  output_dir, _ = demo
  with open(os.path.join(output_dir, "report.md"), encoding="utf-8") as f:
    rows = _table_rows(f.read())
  assert list(rows) == list(demo_layout.TRAIN_RUNS)
  gold = kilt_metrics.read_gold(
      os.path.join(output_dir, "world", "kilt", demo_layout.GOLD_FILE))
  for run, cells in rows.items():
    run_dir = os.path.join(output_dir, "runs", run)
    assert int(cells[0]) == MAX_STEPS == utils.read_json(
        os.path.join(run_dir, "done.json"))["step"]
    ablation = utils.read_json(os.path.join(run_dir,
                                            "ablation_validation.json"))
    assert cells[1:4] == [f"{ablation[name]['answer_ppl']:.3f}"
                          for name in demo_layout.ABLATIONS]
    if run not in demo_layout.GENERATION_RUNS:
      assert cells[4:9] == ["-"] * 5
      continue
    output = demo_layout.generation_path(str(output_dir), run)
    metrics = utils.read_json(os.path.join(os.path.dirname(output),
                                           "kilt_metrics.json"))
    accuracy = demo_layout.fact_accuracy(gold,
                                         kilt_metrics.read_guesses(output))
    assert cells[4:9] == [f"{metrics['rougeL']:.3f}", f"{metrics['f1']:.3f}",
                          f"{accuracy:.3f}", f"{metrics['rprec']:.3f}",
                          f"{metrics['kilt_rougeL']:.3f}"]
    # The provenance names KILT pages, so the retrieval scores are real.
    if run == "retrieval":
      assert metrics["num_without_provenance"] == 0


def test_answer_facts_strip_the_marker_words_and_the_period():
  assert demo_layout.answer_facts(
      "by Trukkos Ramshou, in 1597, city of Zendakbrim.") == [
          "Trukkos Ramshou", "1597", "Zendakbrim"]
  with pytest.raises(ValueError, match="not a demo answer"):
    demo_layout.answer_facts("in 1597.")


def test_fact_accuracy_counts_each_of_the_three_facts():
  gold = [{"id": "a", "output": [{"answer": "by Ann Bo, in 1500, city of Cy."}]},
          {"id": "b", "output": [{"answer": "by Dee Ea, in 1600, city of Fu."}]}]
  predictions = {"a": "by Ann Bo, in 1500, city of Zz.",
                 "b": "in 1601, by Dee Ea."}
  assert demo_layout.fact_accuracy(gold, predictions) == 3 / 6


@pytest.mark.slow
def test_the_retrieval_generation_can_retrieve_live(demo, tmp_path):
  """--live_retrieval: the retrieval run's generation retrieves its contexts
  (exact search over the world's blocks) and says so in the report; exact
  live retrieval gives the cache's neighbours, so the same answers."""
  cached_dir, _ = demo
  output_dir = tmp_path / "demo"
  shutil.copytree(cached_dir, output_dir)
  generation = os.path.dirname(demo_layout.generation_path(
      str(output_dir), demo_layout.GRID_RUN))
  shutil.rmtree(generation)
  result = _run_script(output_dir, *TINY, "--live_retrieval")
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(rf"generate {demo_layout.GRID_RUN}: running", result.stdout)
  with open(os.path.join(output_dir, "report.md"), encoding="utf-8") as f:
    report = f.read()
  assert "generation: live retrieval (exact search over" in report
  with open(os.path.join(cached_dir, "report.md"), encoding="utf-8") as f:
    assert "generation: the neighbour cache" in f.read()
  cached, live = (
      _outputs(demo_layout.generation_path(str(directory),
                                           demo_layout.GRID_RUN))
      for directory in (cached_dir, output_dir))
  # The same answers from the same blocks; the scores within float32's
  # rounding (the embedder saw the questions in other batches).
  assert _without_scores(live) == _without_scores(cached)
  np.testing.assert_allclose(_scores(live), _scores(cached), rtol=1e-5)


def _outputs(generations_path):
  with open(generations_path, encoding="utf-8") as f:
    return [json.loads(line)["output"] for line in f]


def _without_scores(outputs):
  return [[{**output, "provenance": [
      {name: value for name, value in entry.items() if name != "score"}
      for entry in output["provenance"]]} for output in outputs_of_question]
          for outputs_of_question in outputs]


def _scores(outputs):
  return [entry["score"] for outputs_of_question in outputs
          for output in outputs_of_question for entry in output["provenance"]]


@pytest.mark.slow
def test_rerun_reuses_every_stage(demo):
  output_dir, _ = demo
  with open(os.path.join(output_dir, "report.md"), encoding="utf-8") as f:
    report = f.read()
  stdout = _run(output_dir)
  assert len(re.findall(r"^\[demo \d+/13\] .*: reused", stdout, re.M)) == 13
  assert "running" not in stdout
  with open(os.path.join(output_dir, "report.md"), encoding="utf-8") as f:
    assert f.read() == report


@pytest.mark.slow
def test_a_failing_stage_is_one_line_naming_it(tmp_path):
  result = _run_script(tmp_path, "--num_train=0")
  assert result.returncode == utils.USER_ERROR_EXIT_CODE
  assert result.stderr.strip().splitlines()[-1] == (
      "error: stage 'world' failed: --num_train=0: expected at least 1; "
      "rerun to resume")


@pytest.mark.slow
def test_report_shows_the_grid_the_counterfactual_and_the_grounding(demo):
  output_dir, _ = demo
  with open(os.path.join(output_dir, "report.md"), encoding="utf-8") as f:
    report = f.read()
  grid = utils.read_json(os.path.join(
      output_dir, "runs", demo_layout.GRID_RUN, "ablation_validation.json"))
  for condition, entry in grid.items():
    assert f"| {condition} | {entry['examples']} |" in report
  assert "- counterfactual: perplexity of the swapped facts" in report
  grounding = utils.read_json(demo_layout.grounding_paths(str(output_dir))[0])
  assert "longest_gold_answer" in grounding["baselines"]
  assert "- grounding, real − random contexts:" in report
