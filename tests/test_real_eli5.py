"""Real KILT ELI5 lines through every stage: cache, train, generate, score.

The inputs are the formats' own: KILT ELI5 lines from KILT's data
(`../shared/fixtures/kilt_eli5_sample/`: several answers per question, outputs
that hold only provenance, a test split without answers, no newline after the
last line) and a REALM retriever exported by REALM/ORQA's own code
(`../shared/fixtures/realm_tf1_hub/`, a TF1 Hub module). Every stage runs
in-process through the library function its entry script calls
(`caching.cache`, `training.train`, `kilt_metrics.write_title_map`,
`generation_lib.generate`, `kilt_metrics.evaluate_files`); their command lines
are test_query_cacher.py's, test_main.py's, test_generation.py's and
test_kilt_metrics.py's.
"""

import json
import os

import pytest
import tensorflow as tf

import cache_fixtures
import caching
import generation_lib
import kilt_files
import kilt_metrics
import neighbour_cache
import settings
import training

# Slow, the whole module (caches, trains and generates end to end):
# not in `make test-fast`.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "..", "shared", "fixtures")
KILT_DIR = os.path.join(FIXTURES, "kilt_eli5_sample")
RETRIEVER_CONFIG = os.path.join(FIXTURES, "realm_tf1_hub",
                                "retriever_config.json")
NUM_NEIGHBOURS = 4
# A KILT knowledge source for the fixture corpus's pages ("Snow" left out, to
# see provenance without a wikipedia_id).
PAGES = {"Sky": "1001", "Water": "1002", "Sun": "1003", "Ice": "1004",
         "Moon": "1005", "Rain": "1006", "Café": "1007"}


def _kilt_lines(split):
  return [record for _, record in kilt_files.read_jsonl(
      os.path.join(KILT_DIR, kilt_files.ELI5_SPLIT_FILES[split]), "KILT file")]


def _kilt_ids(split):
  return [line["id"] for line in _kilt_lines(split)]


@pytest.mark.slow
def test_real_eli5_lines_are_cached_trained_on_generated_for_and_scored(
    tmp_path):
  tokenizer_dir, model_dir = tmp_path / "tokenizer", tmp_path / "model"
  tokenizer = cache_fixtures.write_tokenizer(str(tokenizer_dir), vocab_size=400)
  cache_fixtures.write_model_config(str(model_dir), tokenizer, n_positions=128)
  cache_dir, runs_dir = tmp_path / "cache", tmp_path / "runs"

  caching.cache(caching.CacheConfig(
      retriever_config_path=RETRIEVER_CONFIG, dataset_root=KILT_DIR,
      output_dir=str(cache_dir), num_neighbours=NUM_NEIGHBOURS,
      search="exact", tokenizer=str(tokenizer_dir), max_block_tokens=32))
  manifest = neighbour_cache.read_manifest(str(cache_dir))
  for split in kilt_files.ELI5_SPLIT_FILES:
    files = neighbour_cache.split_files(str(cache_dir), manifest, split)
    examples = [neighbour_cache.parse_example(record)
                for record in tf.data.TFRecordDataset(files)]
    # Every line is cached, in file order, the last one (no newline) too.
    assert [e["id"].numpy().decode() for e in examples] == _kilt_ids(split)
    for example, line in zip(examples, _kilt_lines(split)):
      # Every answer is kept; outputs holding only provenance are not answers.
      answers = [output["answer"] for output in line.get("output", [])
                 if "answer" in output]
      assert int(example["answers"].nrows()) == len(answers)
      assert (not answers) == (split == "test")
      assert len(example["neighbour_block_ids"].numpy()) == NUM_NEIGHBOURS

  training.train(settings.from_flat(training.TrainConfig, {
      "approach_type": "cached_pretok", "model_key": str(model_dir),
      "cache_dir": str(cache_dir), "output_dir": str(runs_dir),
      "run_name": "real", "max_steps": 3, "batch_size": 2,
      "num_retrievals": 2, "sequence_length": 128, "max_question_tokens": 32,
      "max_answer_tokens": 32, "max_context_tokens": 24, "warmup_steps": 1,
      "batches_between_evals": 0, "checkpoint_every_steps": 3}, "test"))
  run_dir = runs_dir / "real"
  assert (run_dir / "done.json").exists()

  knowledge_source = tmp_path / "kilt_knowledgesource.json"
  knowledge_source.write_text("".join(
      json.dumps({"_id": page_id, "wikipedia_id": page_id,
                  "wikipedia_title": title, "text": [title + "\n"]}) + "\n"
      for title, page_id in PAGES.items()), encoding="utf-8")
  title_map = tmp_path / "title_map.json"
  kilt_metrics.write_title_map(str(knowledge_source), str(title_map))

  generations = tmp_path / "generations" / "generations.jsonl"
  generation_lib.generate(settings.from_flat(generation_lib.GenerationConfig, {
      "run_dir": str(run_dir), "split": "validation",
      "output_path": str(generations), "max_new_tokens": 8, "batch_size": 2,
      "kilt_title_map": str(title_map)}, "test"))
  with open(generations, encoding="utf-8") as f:
    guesses = [json.loads(line) for line in f]
  assert [guess["id"] for guess in guesses] == _kilt_ids("validation")
  for guess in guesses:
    provenance = guess["output"][0]["provenance"]
    assert len(provenance) == 2
    for entry in provenance:
      # Titles come from the corpus's titles.tfr, ids from the title map.
      assert entry["wikipedia_id"] == PAGES[entry["title"]] if (
          entry["title"] in PAGES) else "wikipedia_id" not in entry

  metrics = kilt_metrics.evaluate_files(
      os.path.join(KILT_DIR, kilt_files.ELI5_SPLIT_FILES["validation"]),
      str(generations))
  for name in ("rougeL", "f1", "em", "rprec", "recall@5", "kilt_rougeL",
               "kilt_f1"):
    assert 0.0 <= metrics[name] <= 1.0, (name, metrics)
