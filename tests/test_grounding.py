"""Grounding (kilt_metrics.grounding), its intervals and paired differences in kilt_eval, and the contexts generation.py records for it."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
import transformers

import caching
import generation_lib
import kilt_metrics
import neighbour_cache
import settings
import utils
from util_scripts import demo_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILT_EVAL = os.path.join(REPO, "util_scripts", "kilt_eval.py")

QUESTION = "Why does the old lighthouse keeper paint the tower red?"
CONTEXT = ("Keeper Orla Venn painted the tower crimson in 1871 so that ships "
           "could see it against snow.")


def test_copying_a_context_grounds_every_ngram_outside_the_question():
  assert kilt_metrics.grounding(CONTEXT, [CONTEXT], QUESTION) == 1.0
  # Copying the question adds nothing to count; copied before the context,
  # only the 6 n-grams across the join ('red keeper', 'tower red keeper',
  # ...) are new, and in neither: 51 of 57.
  assert kilt_metrics.grounding(QUESTION, [CONTEXT], QUESTION) is None
  assert kilt_metrics.grounding(QUESTION + " " + CONTEXT, [CONTEXT],
                                QUESTION) == pytest.approx(51 / 57)
  assert kilt_metrics.grounding("", [CONTEXT], QUESTION) is None
  assert kilt_metrics.grounding(CONTEXT, [], QUESTION) == 0.0


def test_grounding_counts_by_hand():
  """'crimson ships glow': unigrams crimson, ships, glow (none a stop-word,
  none in the question); bigrams 'crimson ships', 'ships glow'; the trigram.
  In the context: crimson, ships. 2 of 6."""
  assert kilt_metrics.grounding("crimson ships glow", [CONTEXT],
                                QUESTION) == pytest.approx(2 / 6)
  # Stop-words are not unigrams to count, but are part of longer n-grams:
  # 'so that' is a bigram of the context; 'so' and 'that' are stop-words.
  assert kilt_metrics.grounding("so that", [CONTEXT], QUESTION) == 1.0
  assert kilt_metrics.grounding("so it", [CONTEXT], QUESTION) == 0.0
  # n-grams of the question do not count, even where the context has them
  # ('tower'); 'painted' and 'painted tower' are not the question's.
  assert kilt_metrics.grounding("tower", [CONTEXT], QUESTION) is None
  assert kilt_metrics.grounding("painted tower", [CONTEXT], QUESTION) == 1.0
  assert kilt_metrics.grounding("tower painted", [CONTEXT],
                                QUESTION) == pytest.approx(1 / 2)
  # KILT's normalisation: case, punctuation and articles do not matter.
  assert kilt_metrics.grounding("CRIMSON, in 1871!", [CONTEXT],
                                QUESTION) == 1.0
  # An n-gram must lie inside one context.
  assert kilt_metrics.grounding("snow keeper", ["snow", "keeper"],
                                "q") == pytest.approx(2 / 3)
  assert {"because", "so", "that", "dont", "of"} <= kilt_metrics.STOP_WORDS
  assert "the" not in kilt_metrics.STOP_WORDS  # Normalised away already.


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return str(path)


def _synthetic_files(tmp_path, num_examples=40):
  """Gold, real-context guesses (half copied from their context) and
  random-context guesses (the same answers, another question's context)."""
  gold, real, random_guesses = [], [], []
  for index in range(num_examples):
    fact = f"keeper{index} painted tower{index} colour{index} in year{index}"
    other = f"miller{index} baked bread{index} at dawn{index}"
    answer = (fact if index % 2 else f"I think colour{index} was chosen")
    gold.append({"id": f"q{index}", "input": f"question {index}?",
                 "output": [{"answer": fact}, {"answer": "no idea at all"}]})
    real.append({"id": f"q{index}", "input": f"question {index}?",
                 "output": [{"answer": answer, "provenance": []}],
                 "meta": {"contexts": [fact, other]}})
    random_guesses.append({"id": f"q{index}", "input": f"question {index}?",
                           "output": [{"answer": answer}],
                           "meta": {"contexts": [
                               f"river{index} flows north{index}"]}})
  paths = {"gold": _write_jsonl(tmp_path / "gold.jsonl", gold),
           "train": _write_jsonl(tmp_path / "train.jsonl", gold),
           "real": _write_jsonl(tmp_path / "real.jsonl", real),
           "random": _write_jsonl(tmp_path / "random.jsonl", random_guesses)}
  return paths


def test_paired_grounding_difference_of_two_generation_files(tmp_path):
  paths = _synthetic_files(tmp_path)
  result = kilt_metrics.evaluate_files(
      paths["gold"], paths["real"], compare_path=paths["random"],
      with_grounding=True, baselines_train_path=paths["train"])
  grounding = result["grounding"]
  assert grounding["low"] <= grounding["estimate"] <= grounding["high"]
  assert result["comparison"]["metrics"]["grounding"]["estimate"] == 0.0
  difference = result["comparison"]["differences"]["grounding"]
  assert difference["estimate"] == pytest.approx(grounding["estimate"])
  assert 0 < difference["low"] <= difference["high"]
  assert difference["p_value"] < 0.01 and difference["num_examples"] == 40
  # The same answers: no ROUGE-L difference, p = 1.
  rouge = result["comparison"]["differences"]["rougeL"]
  assert rouge["estimate"] == 0.0 and rouge["p_value"] == 1.0
  # The gold answers against the real contexts: the fact is in them.
  assert result["gold_answer_grounding"]["estimate"] > 0.4
  assert set(result["baselines"]) == {"copy_input", "random_train_answer",
                                      "longest_gold_answer"}
  # Copying the question: only the n-grams across its copies count, and no
  # context has them.
  assert result["baselines"]["copy_input"]["grounding"]["estimate"] == 0.0
  table = kilt_metrics.result_table(result, "real", "random")
  for row in ("| real | ", "| random | ", "| gold answers, real's contexts | ",
              "| baseline: longest gold answer | ", "| grounding | "):
    assert row in table, row


def test_longest_gold_answer_is_scored_against_the_other_answers():
  records = [
      {"id": "a", "input": "q", "output": [
          {"answer": "short one"}, {"answer": "a much longer gold answer"},
          {"provenance": []}]},
      {"id": "b", "input": "q", "output": [{"answer": "only answer"}]}]
  scored, guesses = kilt_metrics.longest_gold_answer_baseline(records)
  assert guesses == {"a": "a much longer gold answer"}
  assert [r["id"] for r in scored] == ["a"]
  assert kilt_metrics.gold_answers(scored[0]) == {"short one"}


# A subprocess or a generation: over 10 s.
@pytest.mark.slow
def test_kilt_eval_prints_the_paired_differences(tmp_path):
  paths = _synthetic_files(tmp_path)
  output_path = tmp_path / "out" / "metrics.json"
  completed = subprocess.run(
      [sys.executable, KILT_EVAL, f"--gold={paths['gold']}",
       f"--guess={paths['real']}", f"--compare_guess={paths['random']}",
       "--grounding", "--bootstrap_resamples=500",
       f"--output_path={output_path}"],
      capture_output=True, text=True, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "| real.jsonl − random.jsonl (paired) |" in completed.stdout
  assert "| grounding (%) [95 % CI] |" in completed.stdout
  result = json.loads(output_path.read_text())
  assert result["comparison"]["differences"]["grounding"]["low"] > 0
  assert result["intervals"]["rougeL"]["num_resamples"] == 500


def _one_line_error(*flags):
  completed = subprocess.run([sys.executable, KILT_EVAL, *flags],
                             capture_output=True, text=True, check=False)
  assert completed.returncode == utils.USER_ERROR_EXIT_CODE, completed.stderr
  errors = [line for line in completed.stderr.splitlines()
            if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in completed.stderr
  return errors[0]


# A subprocess or a generation: over 10 s.
@pytest.mark.slow
def test_bad_grounding_inputs_are_one_line_errors(tmp_path):
  paths = _synthetic_files(tmp_path, num_examples=3)
  without_contexts = _write_jsonl(tmp_path / "plain.jsonl", [
      {"id": f"q{index}", "output": [{"answer": "x"}]} for index in range(3)])
  with pytest.raises(utils.UserError, match=r"plain.jsonl: line 1 \(id 'q0'\)"
                     ": no meta.contexts"):
    kilt_metrics.evaluate_files(paths["gold"], without_contexts,
                                with_grounding=True)
  not_utf8 = tmp_path / "latin1.jsonl"
  not_utf8.write_bytes(b'{"id": "q0", "output": [{"answer": "x"}]}\n'
                       b'{"id": "q1", "output": [{"answer": "caf\xe9"}]}\n')
  with pytest.raises(utils.UserError, match=r"latin1.jsonl: line 2: not UTF-8"):
    kilt_metrics.read_guess_outputs(str(not_utf8))
  error = _one_line_error(f"--gold={paths['gold']}",
                          f"--guess={paths['real']}", "--confidence=1.5")
  assert "--confidence=1.5" in error
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o500)
  try:
    if not os.access(read_only, os.W_OK):  # Not as root.
      error = _one_line_error(f"--gold={paths['gold']}",
                              f"--guess={paths['real']}",
                              f"--output_path={read_only}/metrics.json")
      assert "--output_path" in error
  finally:
    read_only.chmod(0o700)


# ---------------------------------------------------------------------------
# The contexts generation records, and a run's final_model/ as --model_key
# ---------------------------------------------------------------------------


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  """A tiny demo world, its cache, and a run directory holding a random
  GPT-2 as final_model/ (no tokenizer in it, as training writes it)."""
  root = str(tmp_path_factory.mktemp("grounding"))
  world = os.path.join(root, "world")
  demo_world.build_world(world, num_train=8, num_validation=6, num_test=2,
                         num_distractor_blocks=10, gpt2_vocab_size=300)
  cache = os.path.join(root, "cache")
  tokenizer_dir = os.path.join(world, "tokenizer")
  caching.cache(caching.CacheConfig(
      retriever_config_path=os.path.join(world, "retriever_config.json"),
      dataset_root=os.path.join(world, "kilt"), output_dir=cache,
      num_neighbours=3, search="exact", tokenizer=tokenizer_dir,
      max_block_tokens=32, num_shards=1))
  run = os.path.join(root, "run")
  config = json.load(open(os.path.join(world, "model_config", "config.json"),
                          encoding="utf-8"))
  config.update(n_layer=1, n_embd=32, n_head=2)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
  model.save_pretrained(os.path.join(run, "final_model"))
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(tokenizer_dir)
  tokenizer.save_pretrained(os.path.join(run, "tokenizer"))
  utils.atomic_write_json(os.path.join(run, "config.json"), {
      "flags": {}, "model_config": config, "tokenizer": "tokenizer"})
  return {"world": world, "cache": cache, "run": run,
          "gold": os.path.join(world, "kilt", "eli5-dev-kilt.jsonl")}


LAYOUT = {"sequence_length": 96, "max_question_tokens": 16,
          "max_answer_tokens": 8, "max_context_tokens": 24}


def _generate(**values):
  return generation_lib.generate(settings.from_flat(
      generation_lib.GenerationConfig,
      {"batch_size": 4, "num_retrievals": 2, **values}, "test"))


# A subprocess or a generation: over 10 s.
@pytest.mark.slow
def test_generations_record_the_contexts_of_their_prompts(world, tmp_path):
  """meta.contexts: per provenance entry, the block's text as the prompt
  holds it (a prefix of the block, cut to max_context_tokens); a run's
  final_model/ finds the run's tokenizer; --evaluate scores grounding."""
  output = str(tmp_path / "out" / "generations.jsonl")
  metrics = _generate(model_key=os.path.join(world["run"], "final_model"),
                      cache_dir=world["cache"], output_path=output,
                      layout_overrides=LAYOUT, evaluate=True,
                      gold_path=world["gold"])
  blocks = [record.decode("utf-8") for record in tf.data.TFRecordDataset(
      os.path.join(world["world"], "realm", "blocks.tfr")).as_numpy_iterator()]
  records = [json.loads(line) for line in open(output, encoding="utf-8")]
  assert len(records) == 6
  num_cut = 0
  for record in records:
    provenance = record["output"][0]["provenance"]
    contexts = record["meta"]["contexts"]
    assert len(contexts) == len(provenance) >= 1
    for entry, text in zip(provenance, contexts):
      block = blocks[entry["block_id"]].strip()
      assert text and block.startswith(text), (text, block)
      num_cut += text != block
  assert num_cut > 0  # Some contexts were cut to 24 tokens.
  # The untrained model's answers may have nothing to count.
  grounding = metrics["grounding"]
  assert grounding["num_examples"] + grounding["num_undefined"] == 6
  assert metrics["gold_answer_grounding"]["estimate"] > 0.0
  assert "intervals" in metrics
  # KILT's scripts still read the file: its own reader and metrics.
  assert kilt_metrics.read_guess_outputs(output).keys() == {
      record["id"] for record in records}


def test_a_model_directory_without_a_tokenizer_is_one_line(world, tmp_path):
  model_dir = tmp_path / "lonely_model"
  os.rename(os.path.join(world["run"], "final_model"), model_dir)
  try:
    with pytest.raises(utils.UserError, match="holds no tokenizer .* expected "
                       "--tokenizer"):
      _generate(model_key=str(model_dir), cache_dir=world["cache"],
                output_path=str(tmp_path / "out" / "generations.jsonl"))
  finally:
    os.rename(model_dir, os.path.join(world["run"], "final_model"))


# A subprocess or a generation: over 10 s.
@pytest.mark.slow
def test_random_context_generations_take_the_next_questions_blocks(world,
                                                                   tmp_path):
  manifest = neighbour_cache.read_manifest(world["cache"])
  examples = list(tf.data.TFRecordDataset(neighbour_cache.split_files(
      world["cache"], manifest, "validation")).map(
          neighbour_cache.parse_example).as_numpy_iterator())
  output = str(tmp_path / "random" / "generations.jsonl")
  _generate(model_key=os.path.join(world["run"], "final_model"),
            cache_dir=world["cache"], output_path=output,
            layout_overrides=LAYOUT, approach_type="random_context",
            max_examples=3)
  records = [json.loads(line) for line in open(output, encoding="utf-8")]
  assert [record["id"] for record in records] == [
      example["id"].decode() for example in examples[:3]]
  for index, record in enumerate(records):
    partner = examples[(index + 1) % len(examples)]
    block_ids = [entry["block_id"]
                 for entry in record["output"][0]["provenance"]]
    assert block_ids == partner["neighbour_block_ids"][:len(block_ids)].tolist()
    assert len(record["meta"]["contexts"]) == len(block_ids) >= 1
