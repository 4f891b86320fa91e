r"""Generates answers to KILT ELI5 questions from a trained run, in KILT's format.

  python generation.py --run_dir=RUNS/NAME --split=validation \
      --output_path=OUT/generations.jsonl [--decoding=beam --num_beams=5 ...] \
      [--evaluate --gold_path=eli5-dev-kilt.jsonl]

reads the run's latest checkpoint, its tokenizer and its config.json
(layout, cache, retrieval settings: any of them can be overridden by its
flag), lays each question of the cached split out exactly as training does,
up to and including `Answer:`, and decodes. Or `--model_key=HF_DIR_OR_KEY`
(a Hugging Face GPT-2, e.g. from util_scripts/export_hf.py, or a run's
final_model/, whose tokenizer is the run's) with --cache_dir and the layout
flags.

Writes OUT/generations.jsonl, one line per question in the cache's order:
{"id", "input", "output": [{"answer", "provenance": [{"wikipedia_id",
"title", "block_id", "score"}]}], "meta": {"contexts": [text, ...]}}
(provenance: the blocks whose text is in the prompt, in the order drawn, with
their cached retrieval scores; `title` from the block store's titles file,
`wikipedia_id` through --kilt_title_map, which KILT's R-precision, recall@5
and KILT-* scores need; meta.contexts: the text of each of those blocks as
the prompt holds it, which util_scripts/kilt_eval.py --grounding scores the
answer against, and KILT's scripts ignore), and
OUT/generation_config.json (everything that decides the output). Batches are
appended to OUT/generations.jsonl.partial as they finish; rerunning the same
command after a kill continues from the last whole batch, and the finished
file (renamed into place) equals an uninterrupted run's. With --evaluate, the
generations are scored with KILT's metrics (kilt_metrics.py), with 95 %
bootstrap intervals and their grounding, and the metrics written to
OUT/kilt_metrics.json. --approach_type=random_context answers each question
from the next question's neighbours: the control that grounding is compared
against (`kilt_eval.py --compare_guess`).

The flags are the fields of `generation_lib.GenerationConfig` (decoding:
`decoding.DecodeSettings`; layout: `task_specific.LayoutConfig`, the run's
unless given); from Python, call `generation_lib.generate(config)`.
"""

import cli
import generation_lib
import task_specific

_GENERATION_FLAGS = cli.define_flags(generation_lib.GenerationConfig,
                                     exclude=("layout_overrides",))
_LAYOUT_FLAGS = cli.define_flags(task_specific.LayoutConfig,
                                 overriding="the run's")


def main(argv):
  generation_lib.generate(_GENERATION_FLAGS.config(
      layout_overrides=_LAYOUT_FLAGS.values()))


if __name__ == "__main__":
  cli.run(main)
