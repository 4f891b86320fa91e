r"""Writes the offline demo world: KILT ELI5 files, REALM files and GPT-2 files.

Every artefact has the format of the real one (see DESIGN.md), so the demo runs
the code paths of a real run:

  W/kilt/eli5-{train,dev,test_without_answers}-kilt.jsonl
  W/kilt/kilt_knowledgesource.json      KILT's knowledge source: a page per title
  W/realm/blocks.tfr                    raw UTF-8 records: the text of block i
  W/realm/titles.tfr                    raw UTF-8 records: the title of block i
  W/realm/embedder/                     a TF1 Hub module in REALM's layout
                                        (tfhub_module.pb, saved_model.pb,
                                        variables/, assets/vocab.txt) with the
                                        REALM signatures, encoded/encoded.ckpt
  W/retriever_config.json               absolute paths + num_block_records
  W/tokenizer/                          GPT-2 byte-level BPE (GPT2TokenizerFast)
  W/model_config/config.json            a small GPT-2
  W/contexts/gold-validation.jsonl      the evaluation's gold condition: each
                                        validation question's gold block, from
                                        its KILT provenance (gold_contexts.py)
  W/contexts/counterfactual-validation.jsonl
                                        its counterfactual conditions: the gold
                                        block with the next question's facts,
                                        and the answer those facts imply
  W/world.json                          sizes, seed, the embedder's recall@5

The world: every question is about an entity (a society, a bridge, ...) made
up for that question alone, with a made-up founder or builder, city and year.
Its gold block states those facts; the answer states all three facts and little
else. Because the facts are drawn fresh for every question, a model cannot
memorise them: it can only answer by reading the retrieved block. Distractor
blocks about other made-up entities share the style.

The embedder is a deterministic "toy REALM": an IDF-weighted bag of BERT
wordpieces through a fixed random projection to 128 dimensions, scaled to norm 4.
It is exported as REALM exports theirs, a TF1 Hub module whose graph names its
vocabulary by the placeholder `SAVEDMODEL-ASSET`, so the demo loads it through
the same path as the real embedder. Block embeddings are the same function
applied to `[CLS] title [SEP] text [SEP]` as ORQA's `encode_blocks.py` lays
them out, so a question scores its gold block highest (recall@5 is printed).

Usage:
  python util_scripts/make_demo_data.py --output_dir=demo_out/world [--seed=0]
"""

import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import kilt_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from util_scripts import demo_world  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Required. Local directory the world is written to.")
_FLAG_SEED = flags.DEFINE_integer(
    "seed", 0, "Random seed: the same seed and sizes give identical files.")
_FLAG_NUM_TRAIN = flags.DEFINE_integer(
    "num_train", demo_world.DEFAULT_SIZES["num_train"],
    "Training questions (each about its own new entity).")
_FLAG_NUM_VALIDATION = flags.DEFINE_integer(
    "num_validation", demo_world.DEFAULT_SIZES["num_validation"],
    f"Validation questions ({kilt_files.ELI5_SPLIT_FILES['validation']}).")
_FLAG_NUM_TEST = flags.DEFINE_integer(
    "num_test", demo_world.DEFAULT_SIZES["num_test"],
    f"Test questions ({kilt_files.ELI5_SPLIT_FILES['test']}, no answers).")
_FLAG_NUM_DISTRACTOR_BLOCKS = flags.DEFINE_integer(
    "num_distractor_blocks",
    demo_world.DEFAULT_SIZES["num_distractor_blocks"],
    "Blocks about entities no question asks about.")
_FLAG_GPT2_VOCAB_SIZE = flags.DEFINE_integer(
    "gpt2_vocab_size", demo_world.DEFAULT_SIZES["gpt2_vocab_size"],
    "Vocabulary size of the GPT-2 byte-level BPE tokenizer trained on the "
    "world's text (at least 300: 256 bytes + merges + <|endoftext|>).")


def main(argv):
  if not _FLAG_OUTPUT_DIR.value:
    raise utils.UserError("--output_dir is required: where to write the world")
  utils.check_output_path(_FLAG_OUTPUT_DIR.value, "--output_dir",
                          directory=True)
  start = time.time()
  world = demo_world.build_world(
      _FLAG_OUTPUT_DIR.value, seed=_FLAG_SEED.value,
      num_train=_FLAG_NUM_TRAIN.value,
      num_validation=_FLAG_NUM_VALIDATION.value, num_test=_FLAG_NUM_TEST.value,
      num_distractor_blocks=_FLAG_NUM_DISTRACTOR_BLOCKS.value,
      gpt2_vocab_size=_FLAG_GPT2_VOCAB_SIZE.value)
  for line in demo_world.summary_lines(world, time.time() - start):
    print(line)


if __name__ == "__main__":
  cli.run(main)
