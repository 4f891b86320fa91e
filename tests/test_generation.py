"""Generation (`generation_lib.generate`) and util_scripts/export_hf.py on a tiny demo world and a briefly trained run.

In-process through the library; generation.py runs as a subprocess only for
what the command line alone shows (exit 2 with one line, kill -9 and resume,
the lock between jobs). The fixture is real: a demo world
(`demo_world.build_world`), its neighbour cache (`caching.cache`) and a run
trained for a few steps (`training.train`).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import transformers

import caching
import generation_lib
import neighbour_cache
import run_dir as run_dir_lib
import settings
import task_specific
import training
import utils
from util_scripts import demo_world

# Slow, the whole module (a trained run and generation subprocesses):
# not in `make test-fast`.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VALIDATION = 48
# Prompts hold the question (cut to 16 tokens) and one or two contexts.
LAYOUT = {"sequence_length": 96, "max_question_tokens": 16,
          "max_answer_tokens": 8, "max_context_tokens": 24,
          "use_helper_words": True, "context_helper_mode": "each"}
NUM_RETRIEVALS = 2
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
  demo_world.build_world(paths["world"], num_train=40,
                         num_validation=NUM_VALIDATION, num_test=3,
                         num_distractor_blocks=20, gpt2_vocab_size=300)
  world = paths["world"]
  paths.update(tokenizer=os.path.join(world, "tokenizer"),
               gold=os.path.join(world, "kilt", "eli5-dev-kilt.jsonl"))
  caching.cache(caching.CacheConfig(
      retriever_config_path=os.path.join(world, "retriever_config.json"),
      dataset_root=os.path.join(world, "kilt"), output_dir=paths["cache"],
      num_neighbours=3, search="exact", tokenizer=paths["tokenizer"],
      max_block_tokens=32, num_shards=2))
  # The demo's GPT-2 with large initial weights: its greedy answers vary
  # with the prompt and their argmax is far from a tie, so implementations
  # that agree to float32 round-off agree on every token.
  model_dir = os.path.join(root, "model")
  os.makedirs(model_dir)
  config = json.load(open(os.path.join(world, "model_config", "config.json")))
  config["initializer_range"] = 0.3
  utils.atomic_write_json(os.path.join(model_dir, "config.json"), config)
  training.train(settings.from_flat(training.TrainConfig, {
      "approach_type": "cached_pretok", "model_key": model_dir,
      "tokenizer": paths["tokenizer"], "cache_dir": paths["cache"],
      "output_dir": paths["runs"], "run_name": "run",
      "max_steps": TRAIN_STEPS, "batch_size": 4,
      "num_retrievals": NUM_RETRIEVALS, "batches_between_evals": 0,
      "log_samples": 0, **LAYOUT}, "test"))
  paths["model"] = model_dir
  paths["run"] = os.path.join(paths["runs"], "run")
  return paths


def generate(**values):
  """`generation_lib.generate` of GenerationConfig's flat settings."""
  return generation_lib.generate(settings.from_flat(
      generation_lib.GenerationConfig, {"batch_size": BATCH_SIZE, **values},
      "test"))


@pytest.fixture(name="greedy", scope="module")
def fixture_greedy(world, tmp_path_factory):
  """An uninterrupted greedy generation from the run, on one device."""
  output = str(tmp_path_factory.mktemp("greedy") / "generations.jsonl")
  result = run_ok("generation.py", f"--run_dir={world['run']}",
                  f"--output_path={output}", f"--batch_size={BATCH_SIZE}",
                  "--evaluate", f"--gold_path={world['gold']}")
  return {"path": output, "stdout": result.stdout, "stderr": result.stderr}


def test_the_run_directory_alone_generates_the_same(world, greedy, tmp_path):
  """Generation reads model, tokenizer, layout and context settings from the
  run directory: with the run's `model_key` directory gone, the output is
  the same as the command line's with it there."""
  moved = str(tmp_path / "model_moved_away")
  shutil.move(world["model"], moved)
  try:
    output = str(tmp_path / "alone" / "generations.jsonl")
    generate(run_dir=world["run"], output_path=output)
  finally:
    shutil.move(moved, world["model"])
  with open(output, "rb") as ours, open(greedy["path"], "rb") as reference:
    assert ours.read() == reference.read()


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
                                                          tmp_path, capsys):
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
  generate(run_dir=world["run"], output_path=str(output),
           max_examples=num_examples, kilt_title_map=str(map_path),
           evaluate=True, gold_path=world["gold"])
  result = capsys.readouterr()
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
          f"{map_path}") in result.err
  config = json.loads((output.parent / "generation_config.json").read_text())
  assert config["kilt_title_map"] == str(map_path)
  assert config["titles_path"].endswith("titles.tfr")
  metrics = json.loads((output.parent / "kilt_metrics.json").read_text())
  assert metrics["num_examples"] == num_examples
  # The gold block is the best neighbour of most demo questions.
  assert metrics["rprec"] > 0.5 and metrics["recall@5"] >= metrics["rprec"]
  assert metrics["kilt_rougeL"] <= metrics["rougeL"]
  assert "R-Prec (%)" in result.out


def test_prompts_are_the_training_layout_with_its_context_draw(world):
  """Prompts equal the training pipeline's sequences up to `Answer:`."""
  tokenizer = task_specific.load_tokenizer(world["tokenizer"])
  layout = task_specific.make_layout(
      tokenizer, task_specific.LayoutConfig(**LAYOUT), 256)
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
        NUM_VALIDATION, layout.prompt_length)
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
  generation_lib.generate(generation_lib.GenerationConfig(
      model_key=export_dir, cache_dir=world["cache"], output_path=output,
      batch_size=BATCH_SIZE, max_examples=num_examples,
      num_retrievals=NUM_RETRIEVALS, layout_overrides=LAYOUT))
  ours = [r["output"][0]["answer"] for r in read_lines(output)]
  # The exported weights generate what the run's checkpoint generated.
  assert ours == [r["output"][0]["answer"]
                  for r in read_lines(greedy["path"])[:num_examples]]

  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(export_dir)
  # transformers 4.x's TF loader cannot read the PyTorch-layout
  # model.safetensors; tf_model.h5 is the export's TF copy.
  model = transformers.TFGPT2LMHeadModel.from_pretrained(
      export_dir, use_safetensors=False)
  layout = task_specific.make_layout(
      tokenizer, task_specific.LayoutConfig(**LAYOUT), model.config.n_positions)
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
  generate(run_dir=world["run"], output_path=output,
           distribute_mode="MirroredStrategy",
           devices=["/cpu:0", "/cpu:1"])
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


def test_bad_inputs_are_one_line(world, tmp_path):
  """Acceptance 5: refused before any model is built; one case on the
  command line (exit 2, one line), the others in-process."""
  output = tmp_path / "out" / "g.jsonl"
  one_line_error(run("generation.py", f"--run_dir={world['run']}",
                     f"--output_path={output}", "--decoding=beam",
                     "--num_beams=3", "--top_p=0.5"),
                 "--top_p=0.5 applies only to --decoding=sampling")
  bad_map = tmp_path / "title_map.json"
  bad_map.write_text('{"Sky": 11}')
  cases = {
      "--evaluate: the test split has no gold answers": dict(
          split="test", evaluate=True, gold_path=world["gold"]),
      "title 'Sky' maps to 11, expected a wikipedia_id string": dict(
          kilt_title_map=str(bad_map)),
  }
  for message, overrides in cases.items():
    with pytest.raises(utils.UserError, match=re.escape(message)) as error:
      generate(run_dir=world["run"], output_path=str(output), **overrides)
    assert "\n" not in str(error.value)
  assert not output.parent.exists()


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
  with pytest.raises(utils.UserError) as error:
    run_dir_lib.load_model(str(run_dir), run_dir_lib.read_config(str(run_dir)))
  assert message in str(error.value) and "\n" not in str(error.value)
