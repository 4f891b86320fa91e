r"""Exports a run's latest checkpoint as a Hugging Face GPT-2 directory.

  python util_scripts/export_hf.py --run_dir=RUNS/NAME --output_dir=HF_DIR

writes HF_DIR/config.json, HF_DIR/model.safetensors (transformers' TF layout)
and the tokenizer's files, loadable by transformers'
`TFGPT2LMHeadModel.from_pretrained(HF_DIR)` and
`GPT2TokenizerFast.from_pretrained(HF_DIR)`, and by
`generation.py --model_key=HF_DIR` / `main.py --model_key=HF_DIR`.
The tokenizer files are copied first and config.json is written last, so a
directory without config.json is an unfinished export.
"""

import os
import sys
import tempfile

from absl import flags
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import generation_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import task_specific  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_RUN_DIR = flags.DEFINE_string(
    "run_dir", None, "Required. A run directory written by main.py.")
_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None,
    "Required. The Hugging Face directory to write (local or gs://).")
_FLAG_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None,
    "GPT2TokenizerFast key or directory to export with the weights. "
    "Default: the run's.")


def export(run_dir, output_dir, tokenizer_key=None):
  """Writes the run's latest checkpoint to `output_dir`; returns its step."""
  run_config = generation_lib.read_run_config(run_dir)
  tokenizer = task_specific.load_tokenizer(
      tokenizer_key or generation_lib.run_tokenizer_key(run_config))
  model, _, step = generation_lib.restore_run_model(run_dir, run_config,
                                                    tokenizer)
  utils.makedirs(output_dir)
  # transformers writes tokenizers to local paths only: stage, then copy.
  with tempfile.TemporaryDirectory() as staging:
    tokenizer.save_pretrained(staging)
    for name in sorted(os.listdir(staging)):
      tf.io.gfile.copy(os.path.join(staging, name),
                       os.path.join(output_dir, name), overwrite=True)
  model.save_pretrained(output_dir)
  return step


def main(argv):
  if not _FLAG_RUN_DIR.value:
    raise utils.UserError("--run_dir is required (a main.py run directory)")
  if not _FLAG_OUTPUT_DIR.value:
    raise utils.UserError("--output_dir is required")
  step = export(_FLAG_RUN_DIR.value, _FLAG_OUTPUT_DIR.value,
                _FLAG_TOKENIZER.value)
  print(f"exported step {step} of {_FLAG_RUN_DIR.value} to "
        f"{_FLAG_OUTPUT_DIR.value}")


if __name__ == "__main__":
  utils.run(main)
