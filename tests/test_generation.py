"""generation.py and util_scripts/export_hf.py on a tiny demo world and a briefly trained run.

The entry scripts run as subprocesses, the way users run them (their flags
would clash with other entry scripts' in one test process); the library parts
(`generation_lib`) are also tested in-process. The fixture is real: a demo
world (make_demo_data.py), its neighbour cache (query_cacher_tfrecord.py) and
a run trained for a few steps (main.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import transformers

import generation_lib
import neighbour_cache
import task_specific
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VALIDATION = 48
# Prompts hold the question (cut to 16 tokens) and one or two contexts.
LAYOUT = {"sequence_length": 96, "max_question_tokens": 16,
          "max_answer_tokens": 8, "max_context_tokens": 24,
          "use_helper_words": True, "context_helper_mode": "each"}
NUM_RETRIEVALS = 2
LAYOUT_FLAGS = [f"--{name}={value}" for name, value in LAYOUT.items()
                if name != "use_helper_words"]
BATCH_SIZE = 4
TRAIN_STEPS = 2


def run(script, *args):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, script), *args], cwd=REPO,
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)


def run_ok(script, *args):
  result = run(script, *args)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def one_line_error(result, *fragments):
  assert result.returncode == utils.USER_ERROR_EXIT_CODE, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  """Paths of a tiny world, its cache and a run trained on it briefly."""
  root = str(tmp_path_factory.mktemp("generation"))
  paths = {name: os.path.join(root, name)
           for name in ("world", "cache", "runs")}
  run_ok("util_scripts/make_demo_data.py", f"--output_dir={paths['world']}",
         "--num_train=40", f"--num_validation={NUM_VALIDATION}",
         "--num_test=3", "--num_distractor_blocks=20", "--gpt2_vocab_size=300")
  world = paths["world"]
  paths.update(tokenizer=os.path.join(world, "tokenizer"),
               gold=os.path.join(world, "kilt", "eli5-dev-kilt.jsonl"))
  run_ok("query_cacher_tfrecord.py",
         f"--retriever_config_path={world}/retriever_config.json",
         f"--dataset_root={world}/kilt", f"--output_dir={paths['cache']}",
         "--num_neighbours=3", "--search=exact",
         f"--tokenizer={paths['tokenizer']}", "--max_block_tokens=32",
         "--num_shards=2")
  # The demo's GPT-2 with large initial weights: its greedy answers vary
  # with the prompt and their argmax is far from a tie, so implementations
  # that agree to float32 round-off agree on every token.
  model_dir = os.path.join(root, "model")
  os.makedirs(model_dir)
  config = json.load(open(os.path.join(world, "model_config", "config.json")))
  config["initializer_range"] = 0.3
  utils.atomic_write_json(os.path.join(model_dir, "config.json"), config)
  run_ok("main.py", "--task=train", "--approach_type=cached_pretok",
         f"--model_key={model_dir}", f"--tokenizer={paths['tokenizer']}",
         f"--cache_dir={paths['cache']}", f"--output_dir={paths['runs']}",
         "--run_name=run", f"--max_steps={TRAIN_STEPS}", "--batch_size=4",
         f"--num_retrievals={NUM_RETRIEVALS}", "--batches_between_evals=0",
         "--log_samples=0", *LAYOUT_FLAGS)
  paths["run"] = os.path.join(paths["runs"], "run")
  return paths


@pytest.fixture(name="greedy", scope="module")
def fixture_greedy(world, tmp_path_factory):
  """An uninterrupted greedy generation from the run, on one device."""
  output = str(tmp_path_factory.mktemp("greedy") / "generations.jsonl")
  result = run_ok("generation.py", f"--run_dir={world['run']}",
                  f"--output_path={output}", f"--batch_size={BATCH_SIZE}",
                  "--evaluate", f"--gold_path={world['gold']}")
  return {"path": output, "stdout": result.stdout, "stderr": result.stderr}


def read_lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def cached_examples(cache_dir, split="validation"):
  manifest = neighbour_cache.read_manifest(cache_dir)
  files = neighbour_cache.split_files(cache_dir, manifest, split)
  return list(tf.data.TFRecordDataset(files).map(
      neighbour_cache.parse_example))


def test_generations_are_kilt_records_with_provenance_and_metrics(
    world, greedy):
  records = read_lines(greedy["path"])
  examples = cached_examples(world["cache"])
  assert [r["id"] for r in records] == [
      e["id"].numpy().decode() for e in examples]
  gold = {json.loads(line)["id"]: json.loads(line)
          for line in open(world["gold"], encoding="utf-8")}
  blocks = {}
  with_context = 0
  for record, example in zip(records, examples):
    assert record["input"] == gold[record["id"]]["input"]
    (output,) = record["output"]
    assert isinstance(output["answer"], str)
    # Provenance: the top-scored blocks (temperature 0) that the prompt holds,
    # with their cached scores; no wikipedia_id without --kilt_title_map.
    top = example["neighbour_block_ids"].numpy()[:NUM_RETRIEVALS].tolist()
    top_scores = example["neighbour_scores"].numpy()[:NUM_RETRIEVALS].tolist()
    block_ids = [p["block_id"] for p in output["provenance"]]
    assert block_ids == top[:len(block_ids)] and block_ids
    assert [p["score"] for p in output["provenance"]] == top_scores[
        :len(block_ids)]
    assert all(set(p) == {"title", "block_id", "score"}
               for p in output["provenance"])
    with_context += len(block_ids)
    blocks.update({p["block_id"]: p["title"] for p in output["provenance"]})
  assert with_context > len(records)  # Some prompts hold both contexts.
  # Titles are the blocks' titles.tfr records; the gold block's title is the
  # gold provenance's.
  titles = world_titles(world)
  assert all(titles[block_id] == title for block_id, title in blocks.items())
  gold_titles = {g["output"][0]["provenance"][0]["title"] for g in gold.values()}
  assert gold_titles & set(blocks.values())
  assert len({r["output"][0]["answer"] for r in records}) > 1

  output_dir = os.path.dirname(greedy["path"])
  config = json.load(open(os.path.join(output_dir, "generation_config.json")))
  assert config["source"]["step"] == TRAIN_STEPS
  assert config["decoding"]["method"] == "greedy"
  assert config["decoding"]["max_new_tokens"] == LAYOUT["max_answer_tokens"] + 1
  assert config["layout"] == LAYOUT
  assert config["num_retrievals"] == NUM_RETRIEVALS
  metrics = json.load(open(os.path.join(output_dir, "kilt_metrics.json")))
  assert metrics["num_examples"] == NUM_VALIDATION
  assert 0.0 <= metrics["rougeL"] <= 1.0
  assert "ROUGE-L" in greedy["stdout"]
  # The truncation rule's outcome is printed and logged.
  assert "questions cut to 16 tokens" in greedy["stdout"]
  assert "prompt layout:" in greedy["stderr"]
  assert not os.path.exists(greedy["path"] + ".partial")


def world_titles(world):
  """The demo corpus's titles.tfr records, by block id."""
  return [record.decode("utf-8") for record in tf.data.TFRecordDataset(
      os.path.join(world["world"], "realm", "titles.tfr")).as_numpy_iterator()]


def test_provenance_names_kilt_pages_through_the_title_map(world, greedy,
                                                          tmp_path):
  """With --kilt_title_map, provenance gets KILT's wikipedia_id; a title the
  map misses is warned about, with its count."""
  num_examples = 16
  plain = read_lines(greedy["path"])[:num_examples]
  missing = plain[0]["output"][0]["provenance"][0]["title"]
  # The demo's gold names the page of block i "i"; its titles are unique.
  title_map = {title: str(block_id)
               for block_id, title in enumerate(world_titles(world))
               if title != missing}
  map_path = tmp_path / "title_map.json"
  map_path.write_text(json.dumps(title_map), encoding="utf-8")
  output = tmp_path / "mapped" / "generations.jsonl"
  result = run_ok("generation.py", f"--run_dir={world['run']}",
                  f"--output_path={output}", f"--batch_size={BATCH_SIZE}",
                  f"--max_examples={num_examples}",
                  f"--kilt_title_map={map_path}", "--evaluate",
                  f"--gold_path={world['gold']}")
  mapped = read_lines(output)
  num_contexts = num_unmapped = 0
  for with_ids, without in zip(mapped, plain, strict=True):
    assert with_ids["output"][0]["answer"] == without["output"][0]["answer"]
    for entry, plain_entry in zip(with_ids["output"][0]["provenance"],
                                  without["output"][0]["provenance"],
                                  strict=True):
      num_contexts += 1
      assert {k: v for k, v in entry.items() if k != "wikipedia_id"} == (
          plain_entry)
      if entry["title"] == missing:
        num_unmapped += 1
        assert "wikipedia_id" not in entry
      else:
        assert list(entry) == ["wikipedia_id", "title", "block_id", "score"]
        assert entry["wikipedia_id"] == str(entry["block_id"])
  assert num_unmapped >= 1
  assert (f"warning: {num_unmapped} of {num_contexts} contexts (1 distinct "
          f"titles, e.g. {missing!r}) have a title that is not in "
          f"{map_path}") in result.stderr
  config = json.loads((output.parent / "generation_config.json").read_text())
  assert config["kilt_title_map"] == str(map_path)
  assert config["titles_path"].endswith("titles.tfr")
  metrics = json.loads((output.parent / "kilt_metrics.json").read_text())
  assert metrics["num_examples"] == num_examples
  # The gold block is the best neighbour of most demo questions.
  assert metrics["rprec"] > 0.5 and metrics["recall@5"] >= metrics["rprec"]
  assert metrics["kilt_rougeL"] <= metrics["rougeL"]
  assert "R-Prec (%)" in result.stdout


def test_prompts_are_the_training_layout_with_its_context_draw(world):
  """Prompts equal the training pipeline's sequences up to `Answer:`."""
  tokenizer = task_specific.load_tokenizer(world["tokenizer"])
  layout = generation_lib.make_layout(tokenizer, LAYOUT, 256)
  manifest = neighbour_cache.read_manifest(world["cache"])
  files = neighbour_cache.split_files(world["cache"], manifest, "validation")
  for approach, temperature in (("cached_pretok", 1.0), ("naked_lm", 0.0)):
    config = task_specific.DataConfig(
        approach=approach, num_retrievals=NUM_RETRIEVALS,
        retrieval_temperature=temperature, seed=3)
    prompts = generation_lib.read_prompts(files, config, layout)
    ours = sorted(
        tuple(ids[mask > 0]) for ids, mask in
        zip(prompts["input_ids"], prompts["attention_mask"]))
    training = []
    for batch in task_specific.make_dataset(files, config, layout,
                                            batch_size=16, training=False):
      for ids, labels in zip(batch["input_ids"].numpy(),
                             batch["label_mask"].numpy()):
        if labels.any():
          training.append(tuple(ids[:np.argmax(labels)]))
    assert ours == sorted(training), approach
    assert prompts["input_ids"].shape == (
        NUM_VALIDATION, generation_lib.prompt_length(layout))
  # The question-cut count is what the layout did.
  lengths = [len(e["question_ids"]) for e in cached_examples(world["cache"])]
  assert prompts["question_cut"].sum() == sum(
      n > LAYOUT["max_question_tokens"] for n in lengths)


def test_exported_checkpoint_greedy_equals_transformers_generate(
    world, greedy, tmp_path):
  """Acceptance 3."""
  export_dir = str(tmp_path / "hf")
  run_ok("util_scripts/export_hf.py", f"--run_dir={world['run']}",
         f"--output_dir={export_dir}")
  num_examples = 8
  output = str(tmp_path / "from_export" / "generations.jsonl")
  run_ok("generation.py", f"--model_key={export_dir}",
         f"--cache_dir={world['cache']}", f"--output_path={output}",
         f"--batch_size={BATCH_SIZE}", f"--max_examples={num_examples}",
         f"--num_retrievals={NUM_RETRIEVALS}", *LAYOUT_FLAGS)
  ours = [r["output"][0]["answer"] for r in read_lines(output)]
  # The exported weights generate what the run's checkpoint generated.
  assert ours == [r["output"][0]["answer"]
                  for r in read_lines(greedy["path"])[:num_examples]]

  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(export_dir)
  # transformers 4.x's TF loader cannot read the PyTorch-layout
  # model.safetensors; tf_model.h5 is the export's TF copy.
  model = transformers.TFGPT2LMHeadModel.from_pretrained(
      export_dir, use_safetensors=False)
  layout = task_specific.make_layout(tokenizer, **LAYOUT)
  # Temperature 0: the contexts are the best-scored neighbours, in order.
  prompts = [task_specific.prompt_ids(e["question_ids"],
                                      e["neighbours"][:NUM_RETRIEVALS],
                                      layout).numpy()
             for e in cached_examples(world["cache"])[:num_examples]]
  width = max(len(p) for p in prompts)
  eos = tokenizer.eos_token_id
  input_ids = np.array([[eos] * (width - len(p)) + list(p) for p in prompts])
  mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  generated = model.generate(
      tf.constant(input_ids), attention_mask=tf.constant(mask),
      max_new_tokens=LAYOUT["max_answer_tokens"] + 1, do_sample=False,
      eos_token_id=eos, pad_token_id=eos).numpy()[:, width:]
  theirs = [generation_lib.answer_text(tokenizer, tokens, eos)
            for tokens in generated]
  assert ours == theirs
  assert len(set(theirs)) > 1


def test_two_replicas_equal_one(world, greedy, tmp_path):
  """Acceptance 4, first half."""
  output = str(tmp_path / "generations.jsonl")
  run_ok("generation.py", f"--run_dir={world['run']}",
         f"--output_path={output}", f"--batch_size={BATCH_SIZE}",
         "--distribute_mode=MirroredStrategy", "--num_cpu_devices=2")
  config = json.load(open(tmp_path / "generation_config.json"))
  assert config["num_replicas"] == 2
  with open(output, "rb") as ours, open(greedy["path"], "rb") as reference:
    assert ours.read() == reference.read()


def test_killed_generation_resumes_to_the_uninterrupted_output(
    world, greedy, tmp_path):
  """Acceptance 4, second half: SIGKILL after the first batch, then rerun."""
  output = str(tmp_path / "generations.jsonl")
  partial = output + ".partial"
  command = [sys.executable, os.path.join(REPO, "generation.py"),
             f"--run_dir={world['run']}", f"--output_path={output}",
             f"--batch_size={BATCH_SIZE}"]
  process = subprocess.Popen(
      command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  deadline = time.time() + 300
  while process.poll() is None and not (
      os.path.exists(partial) and os.path.getsize(partial) > 0):
    assert time.time() < deadline, "no batch was ever written"
    time.sleep(0.001)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "finished before the kill"
  assert not os.path.exists(output)
  # A torn last line, as a kill in the middle of a write leaves.
  with open(partial, "a", encoding="utf-8") as f:
    f.write('{"id": "torn')

  run_ok(*command[1:])
  records = read_lines(output)
  ids = [r["id"] for r in records]
  assert len(ids) == len(set(ids)) == NUM_VALIDATION
  with open(output, "rb") as ours, open(greedy["path"], "rb") as reference:
    assert ours.read() == reference.read()
  assert not os.path.exists(partial)


def test_resume_keeps_whole_batches_and_checks_ids(tmp_path):
  output = str(tmp_path / "g.jsonl")
  lines = [json.dumps({"id": f"q{i}"}) + "\n" for i in range(5)]
  with open(output + ".partial", "w", encoding="utf-8") as f:
    f.write("".join(lines) + '{"id": "q5", "out')
  expected = [f"q{i}" for i in range(8)]
  assert generation_lib.resume_partial(output, expected, 2) == 2
  with open(output + ".partial", encoding="utf-8") as f:
    assert f.read() == "".join(lines[:4])
  with pytest.raises(utils.UserError, match="not this generation's"):
    generation_lib.resume_partial(output, ["other"] * 8, 2)


def test_output_is_continued_only_under_its_config(tmp_path):
  output = str(tmp_path / "g.jsonl")
  config = {"output_name": "g.jsonl", "batch_size": 4}
  assert not generation_lib.prepare_output(output, config)
  with open(output + ".partial", "w", encoding="utf-8") as f:
    f.write("")
  assert not generation_lib.prepare_output(output, config)
  with pytest.raises(utils.UserError, match="batch_size=4"):
    generation_lib.prepare_output(output, dict(config, batch_size=8))
  # Another output in the same directory would overwrite the config.
  os.rename(output + ".partial", output)
  with pytest.raises(utils.UserError, match="its own directory"):
    generation_lib.prepare_output(str(tmp_path / "other.jsonl"),
                                  dict(config, output_name="other.jsonl"))
  assert generation_lib.prepare_output(output, config)


@pytest.mark.parametrize("settings, message", [
    (dict(method="beam", num_beams=4, temperature=0.7),
     "--temperature=0.7 applies only to --decoding=sampling"),
    (dict(method="sampling", num_beams=4), "beam sampling is not supported"),
    (dict(method="sampling", top_p=1.5), "--top_p=1.5: must be in (0, 1]"),
    (dict(method="sampling", top_p=0.0), "--top_p=0.0: must be in (0, 1]"),
    (dict(method="sampling", temperature=0.0), "--temperature=0.0: must be > 0"),
    (dict(method="greedy", top_k=5), "--top_k=5 applies only to"),
    (dict(method="greedy", length_penalty=0.5), "--length_penalty=0.5"),
    (dict(method="beam"), "--decoding=beam needs >= 2"),
    (dict(method="beam", num_beams=2, repetition_penalty=0.0),
     "--repetition_penalty=0.0"),
    (dict(max_new_tokens=-1), "--max_new_tokens=-1"),
])
def test_unknown_decoding_combinations_are_refused(settings, message):
  with pytest.raises(utils.UserError) as error:
    generation_lib.check_decoding(generation_lib.Decoding(**settings))
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_bad_inputs_are_one_line(world, tmp_path):
  """Acceptance 5 on the command line (refused before any model is built)."""
  output = f"--output_path={tmp_path / 'out' / 'g.jsonl'}"
  one_line_error(run("generation.py", f"--run_dir={world['run']}", output,
                     "--decoding=beam", "--num_beams=3", "--top_p=0.5"),
                 "--top_p=0.5 applies only to --decoding=sampling")
  one_line_error(run("generation.py", f"--run_dir={world['run']}", output,
                     "--split=test", "--evaluate",
                     f"--gold_path={world['gold']}"),
                 "--evaluate: the test split has no gold answers")
  bad_map = tmp_path / "title_map.json"
  bad_map.write_text('{"Sky": 11}')
  one_line_error(run("generation.py", f"--run_dir={world['run']}", output,
                     f"--kilt_title_map={bad_map}"),
                 "title 'Sky' maps to 11, expected a wikipedia_id string")


def test_a_second_generation_into_one_output_fails_naming_the_holder(
    world, tmp_path):
  output_path = tmp_path / "out" / "generations.jsonl"
  with utils.locked_directory(str(output_path.parent),
                              "generations.jsonl.lock", "a test's hold"):
    one_line_error(run("generation.py", f"--run_dir={world['run']}",
                       f"--output_path={output_path}", "--max_examples=2"),
                   f"generation output {output_path}", f"pid {os.getpid()}")
    assert os.listdir(output_path.parent) == ["generations.jsonl.lock"]


@pytest.mark.parametrize("key, value, message", [
    ("n_embd", 64, "has shape (300, 128) in the checkpoint, (300, 64)"),
    ("n_layer", 1, "holds 28 model weights, but the model of"),
])
def test_checkpoint_of_another_config_is_refused(world, tmp_path, key, value,
                                                 message):
  run_dir = tmp_path / "run"
  shutil.copytree(world["run"], run_dir, ignore=shutil.ignore_patterns(
      "train", "eval", "final_model"))
  config = json.loads((run_dir / "config.json").read_text())
  config["model_config"][key] = value
  (run_dir / "config.json").write_text(json.dumps(config))
  tokenizer = task_specific.load_tokenizer(world["tokenizer"])
  with pytest.raises(utils.UserError) as error:
    generation_lib.restore_run_model(
        str(run_dir), generation_lib.read_run_config(str(run_dir)), tokenizer)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_answers_longer_than_the_model_allows_are_refused(world):
  tokenizer = task_specific.load_tokenizer(world["tokenizer"])
  layout = generation_lib.make_layout(tokenizer, LAYOUT, 256)
  decoding = generation_lib.resolve_max_new_tokens(
      generation_lib.Decoding(), layout, 256)
  assert decoding.max_new_tokens == LAYOUT["max_answer_tokens"] + 1
  with pytest.raises(utils.UserError, match="at most 169 new tokens"):
    generation_lib.resolve_max_new_tokens(
        generation_lib.Decoding(max_new_tokens=170), layout, 256)
