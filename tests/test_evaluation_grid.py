"""evaluation.evaluate: the context-condition grid, its per-example file, its
table and report, on a tiny trained run (`cache_fixtures.TINY_RUN`)."""

import collections
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

import cache_fixtures
import context_draw
import evaluation
import neighbour_cache
import task_specific
import training
import utils

ALL_CONDITIONS = list(context_draw.CONDITIONS)


def write_contexts_file(path, records):
  utils.atomic_write_text(str(path), "".join(json.dumps(r) + "\n"
                                             for r in records))
  return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A trained tiny run, its world, and contexts files for gold and
  counterfactual made from the validation split's cached texts."""
  root = tmp_path_factory.mktemp("grid")
  world = cache_fixtures.write_training_world(root / "world")
  config = cache_fixtures.training_config(world, root / "runs", "grid",
                                          max_steps=4)
  training.train(config)
  tokenizer = task_specific.load_tokenizer(world["tokenizer"])
  manifest = neighbour_cache.read_manifest(world["cache"])
  files = neighbour_cache.split_files(world["cache"], manifest, "validation")
  gold, counterfactual = [], []
  examples = list(tf.data.TFRecordDataset(files).map(
      neighbour_cache.parse_example))
  for index, example in enumerate(examples):
    text = lambda ids: tokenizer.decode(ids).lstrip(" ")
    record = {"id": example["id"].numpy().decode(),
              "input": example["question"].numpy().decode() or "q",
              "answer": text(example["answers"][0].numpy()),
              "contexts": [text(example["neighbours"][0].numpy())]}
    gold.append(record)
    other = examples[(index + 1) % len(examples)]
    counterfactual.append({**record, "answer": text(
        other["answers"][0].numpy()), "contexts": [text(
            other["neighbours"][0].numpy())]})
  return {"config": config, "world": world, "root": root,
          "gold": write_contexts_file(root / "gold.jsonl", gold),
          "counterfactual": write_contexts_file(root / "cf.jsonl",
                                                counterfactual)}


def grid_config(run, **overrides):
  values = dict(conditions=ALL_CONDITIONS, gold_contexts_path=run["gold"],
                counterfactual_path=run["counterfactual"])
  values.update(overrides)
  return dataclasses.replace(run["config"], **values)


@pytest.fixture(scope="module")
def grid(run):
  config = grid_config(run)
  table = evaluation.evaluate(config)
  run_dir = config.run_dir
  rows = [json.loads(line) for line in open(
      f"{run_dir}/ablation_validation_examples.jsonl")]
  return {"table": table, "rows": rows, "run_dir": run_dir, "config": config}


@pytest.mark.slow
def test_every_condition_has_one_row_per_example_and_totals_equal_the_rows(
    grid):
  """Acceptance 1: all conditions written; one row per (example,
  condition); the totals are the sums of the rows."""
  table, rows = grid["table"], grid["rows"]
  assert list(table) == ALL_CONDITIONS
  by_condition = collections.defaultdict(list)
  for row in rows:
    by_condition[row["condition"]].append(row)
  for condition in ALL_CONDITIONS:
    condition_rows = by_condition[condition]
    ids = [row["id"] for row in condition_rows]
    assert len(ids) == len(set(ids)) == 12, condition
    assert len({i[:1] for i in ids}) == 1
    entry = table[condition]
    assert entry["examples"] == 12
    assert entry["answer_tokens"] == sum(r["tokens"] for r in condition_rows)
    assert entry["words"] == sum(r["words"] for r in condition_rows)
    assert entry["bytes"] == sum(r["bytes"] for r in condition_rows)
    nll = sum(r["nll_sum"] for r in condition_rows)
    assert entry["answer_loss"] == pytest.approx(nll / entry["answer_tokens"])
    assert entry["answer_ppl"] == pytest.approx(
        math.exp(nll / entry["answer_tokens"]))
    assert entry["ppl_per_word"] == pytest.approx(
        math.exp(nll / entry["words"]))
    assert entry["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / entry["bytes"])
    interval = entry["answer_ppl_interval"]
    assert interval["low"] <= entry["answer_ppl"] <= interval["high"]
  # The same answers are scored under every cache condition (gold's are
  # its file's texts, re-tokenised: the fixture's random ids do not
  # survive a decode and encode).
  tokens = {c: sorted((r["id"], r["tokens"]) for r in by_condition[c])
            for c in ("real", "top_k", "random", "none", "shuffled",
                      "distractor")}
  assert len({tuple(t) for t in tokens.values()}) == 1
  assert (sorted((r["id"], r["tokens"]) for r in by_condition["counterfactual"])
          == sorted((r["id"], r["tokens"])
                    for r in by_condition["counterfactual_none"]))


@pytest.mark.slow
def test_conditions_draw_what_they_say(grid):
  """top_k is real at evaluation temperature 0; shuffled differs from it
  only by order; none equals the periodic evaluation's scoring."""
  rows = {(r["condition"], r["id"]): r for r in grid["rows"]}
  ids = sorted({r["id"] for r in grid["rows"] if r["condition"] == "real"})
  for example_id in ids:
    assert rows[("top_k", example_id)]["nll_sum"] == pytest.approx(
        rows[("real", example_id)]["nll_sum"], abs=1e-4)
  assert any(abs(rows[("shuffled", i)]["nll_sum"] -
                 rows[("real", i)]["nll_sum"]) > 1e-4 for i in ids)
  assert any(abs(rows[("distractor", i)]["nll_sum"] -
                 rows[("real", i)]["nll_sum"]) > 1e-4 for i in ids)
  # gold's file holds each question's best neighbour: the first of real's
  # contexts, so its scores differ from none's.
  assert any(abs(rows[("gold", i)]["nll_sum"] -
                 rows[("none", i)]["nll_sum"]) > 1e-4 for i in ids)


@pytest.mark.slow
def test_the_none_row_equals_the_periodic_evaluation(run, grid):
  setup = training.Setup(grid["config"], training.run_directory.read_config(
      grid["run_dir"]))
  training.run_directory.restore_model(setup.run_dir, setup.model)
  evaluate = training.make_eval_fn(setup)
  none = evaluate(setup.eval_dataset(
      setup.data_config(context_draw.Approach.NAKED_LM, 0.0), "validation",
      0), "none")
  assert grid["table"]["none"]["answer_loss"] == pytest.approx(
      none["answer_loss"], rel=1e-6)
  assert grid["table"]["none"]["answer_tokens"] == none["answer_tokens"]


@pytest.mark.slow
def test_paired_comparisons_and_the_report(grid):
  table = grid["table"]
  for condition in ("real", "top_k", "random", "shuffled", "distractor",
                    "gold"):
    paired = table[condition]["paired_vs_none"]
    assert paired["num_examples"] == 12
    assert 0 < paired["p_value"] <= 1
    ratio = paired["ratio"]
    assert ratio["low"] <= ratio["estimate"] <= ratio["high"]
    assert ratio["estimate"] == pytest.approx(
        table[condition]["answer_ppl"] / table["none"]["answer_ppl"])
  assert "paired_vs_counterfactual_none" in table["counterfactual"]
  assert not any(name.startswith("paired_vs_") for name in table["none"])
  report = open(f"{grid['run_dir']}/ablation_validation.md").read()
  for condition in ALL_CONDITIONS:
    assert f"| {condition} |" in report
  assert "per word" in report and "bits per byte" in report
  png = open(f"{grid['run_dir']}/ablation_validation.png", "rb").read()
  assert png.startswith(b"\x89PNG")
  stored = json.load(open(f"{grid['run_dir']}/ablation_validation.json"))
  assert stored == json.loads(json.dumps(table))


@pytest.mark.slow
def test_a_condition_without_its_file_is_skipped_with_a_note(run, tmp_path):
  config = grid_config(run, conditions=["none", "gold"],
                       gold_contexts_path=None)
  table = evaluation.evaluate(config)
  assert list(table) == ["none"]
  report = open(f"{config.run_dir}/ablation_validation.md").read()
  assert "gold: skipped, no --gold_contexts_path" in report


@pytest.mark.parametrize("overrides, message", [
    (dict(conditions=["real", "nonsense"]), "unknown condition 'nonsense'"),
    (dict(conditions=[]), "--conditions is empty"),
    (dict(conditions=["real", "real"]), "named twice"),
    (dict(conditions=["distractor"], distractor_offset=3),
     "--distractor_offset=3"),
])
@pytest.mark.slow
def test_bad_conditions_are_one_line_errors(run, overrides, message):
  with pytest.raises(utils.UserError) as error:
    evaluation.evaluate(grid_config(run, **overrides))
  assert message in str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1"),
    (json.dumps({"id": "x", "input": "q", "answer": "a"}), "'contexts'"),
    (json.dumps({"id": "x", "input": "q", "answer": 3, "contexts": ["c"]}),
     "'answer'"),
])
@pytest.mark.slow
def test_bad_contexts_files_are_one_line_errors(run, tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(line + "\n")
  with pytest.raises(utils.UserError) as error:
    evaluation.evaluate(grid_config(run, conditions=["gold"],
                                    gold_contexts_path=str(path)))
  assert message in str(error.value) and str(path) in str(error.value)


def test_draw_skips_offsets_shuffles_and_takes_what_there_is():
  scores = tf.constant([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
  seed = tf.constant([1, 2], tf.int64)
  base = task_specific.DataConfig(approach="cached_pretok", num_retrievals=2,
                                  retrieval_temperature=0.0)
  replace = lambda **kw: type(base)(**{**base.__dict__, **kw})
  assert context_draw.draw(scores, base, seed).numpy().tolist() == [0, 1]
  assert context_draw.draw(scores, replace(rank_offset=3), seed
                           ).numpy().tolist() == [3, 4]
  shuffled = [context_draw.draw(scores, replace(
      num_retrievals=6, shuffle_contexts=True), tf.constant([s, 0], tf.int64)
                                ).numpy().tolist() for s in range(5)]
  assert all(sorted(order) == list(range(6)) for order in shuffled)
  assert len({tuple(order) for order in shuffled}) > 1
  assert context_draw.draw(scores[:1], replace(num_retrievals=3), seed
                           ).numpy().tolist() == [0]
  np.testing.assert_array_equal(
      context_draw.draw(scores, replace(retrieval_temperature=1.0), seed),
      context_draw.sample_neighbours(scores, 2, 1.0, seed))


FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "..", "shared", "fixtures", "kilt_eli5_sample")


def test_gold_contexts_come_from_kilt_provenance_spans(tmp_path):
  """Real ELI5 dev lines (their provenance: page ids, paragraph and
  character spans) against a knowledge source in KILT's page format."""
  gold_path = os.path.join(FIXTURES, "eli5-dev-kilt.jsonl")
  provenance = [p for line in open(gold_path, encoding="utf-8")
                for o in json.loads(line)["output"]
                for p in o.get("provenance") or []]
  assert provenance
  # Pages long enough for every span (ELI5's reach paragraph 49, some
  # without character offsets).
  pages = {item["wikipedia_id"]: [f"Title {item['wikipedia_id']}\n"] + [
      f"paragraph {i} of {item['wikipedia_id']} " + "x" * 800 + "\n"
      for i in range(1, 60)] for item in provenance}
  source = tmp_path / "kilt_knowledgesource.json"
  source.write_text("".join(json.dumps({
      "_id": page_id, "wikipedia_id": page_id,
      "wikipedia_title": f"Title {page_id}", "text": text}) + "\n"
                            for page_id, text in pages.items()))
  records, counts = evaluation.gold_contexts_from_kilt(gold_path, str(source))
  assert counts["missing_pages"] == 0 and counts["written"] == len(records)
  first = json.loads(open(gold_path, encoding="utf-8").readline())
  span = next(p for o in first["output"] for p in o.get("provenance") or [])
  text = pages[span["wikipedia_id"]][span["start_paragraph_id"]]
  expected = text[span["start_character"]:span["end_character"]].strip()
  by_id = {record["id"]: record for record in records}
  if span["start_paragraph_id"] == span["end_paragraph_id"]:
    assert expected in by_id[first["id"]]["contexts"]
  assert by_id[first["id"]]["answer"] == next(
      o["answer"] for o in first["output"] if "answer" in o)
  # Spans: several paragraphs, -1 offsets, a page-only provenance.
  paragraphs = ["T\n", "abcdef\n", "ghij\n", "klmn\n"]
  assert evaluation.provenance_text(paragraphs, {
      "start_paragraph_id": 1, "start_character": 2, "end_paragraph_id": 3,
      "end_character": 2}) == "cdef ghij kl"
  assert evaluation.provenance_text(paragraphs, {
      "start_paragraph_id": 2, "start_character": -1, "end_paragraph_id": 2,
      "end_character": -1}) == "ghij"
  assert evaluation.provenance_text(paragraphs, {"wikipedia_id": "1"}) == (
      "abcdef ghij klmn")
  assert evaluation.provenance_text(paragraphs, {
      "start_paragraph_id": 9, "end_paragraph_id": 9}) is None


@pytest.mark.slow
def test_eval_stride_scores_every_answer_token_once(run):
  """Long answers: cut without --eval_stride, whole (each token and the EOS
  once) with it; the first window's tokens score as the cut answer's."""
  manifest = neighbour_cache.read_manifest(run["world"]["cache"])
  files = neighbour_cache.split_files(run["world"]["cache"], manifest,
                                      "validation")
  lengths = {example["id"].numpy().decode(): len(example["answers"][0])
             for example in tf.data.TFRecordDataset(files).map(
                 neighbour_cache.parse_example)}
  room = 4
  assert max(lengths.values()) > room, "the fixture needs a long answer"
  layout = dataclasses.replace(run["config"].layout, max_answer_tokens=room)
  tables = {}
  for stride in (0, 3):
    tables[stride] = evaluation.evaluate(grid_config(
        run, conditions=["real", "none"], eval_stride=stride, layout=layout))
    rows = [json.loads(line) for line in open(
        f"{run['config'].run_dir}/ablation_validation_examples.jsonl")]
    for row in rows:
      length = lengths[row["id"]]
      expected = length + 1 if stride or length <= room else room
      assert row["tokens"] == expected, (stride, row)
  for condition in ("real", "none"):
    assert (tables[3][condition]["answer_tokens"] >
            tables[0][condition]["answer_tokens"])
  with pytest.raises(utils.UserError, match="--eval_stride=5"):
    evaluation.evaluate(grid_config(run, eval_stride=room + 1, layout=layout))


@pytest.mark.parametrize("placement", [
    dict(strategy=dict(distribute_mode="MirroredStrategy",
                       devices=["/device:CPU:0", "/device:CPU:1"])),
    dict(model_devices=["/device:CPU:2", "/device:CPU:3"]),
], ids=["mirrored", "model_split"])
@pytest.mark.slow
def test_replicas_and_a_split_model_score_the_same_rows(run, grid, placement):
  """Rows gathered from two replicas (or one model over two devices) are
  those of one device: every example once, the same NLL."""
  strategy = placement.get("strategy")
  config = grid_config(run, conditions=["real", "random", "none"], **{
      name: value for name, value in placement.items() if name != "strategy"})
  if strategy:
    config = dataclasses.replace(config, strategy=dataclasses.replace(
        config.strategy, **strategy))
  evaluation.evaluate(config)
  rows = {(r["condition"], r["id"]): r for r in map(json.loads, open(
      f"{config.run_dir}/ablation_validation_examples.jsonl"))}
  reference = {(r["condition"], r["id"]): r for r in grid["rows"]
               if r["condition"] in ("real", "random", "none")}
  assert rows.keys() == reference.keys()
  for key, row in rows.items():
    assert row["tokens"] == reference[key]["tokens"]
    assert row["nll_sum"] == pytest.approx(reference[key]["nll_sum"],
                                           rel=1e-5, abs=1e-4)
