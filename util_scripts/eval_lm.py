r"""Language-model evaluation of a GPT-2 checkpoint on a plain UTF-8 text file.

  python util_scripts/eval_lm.py --model_key=HF_DIR_OR_KEY --text_path=TEXT \
      [--window=1024 --stride=512] [--tokenizer=KEY_OR_DIR] \
      [--output_path=lm_eval.json]

or `--run_dir=RUNS/NAME` (a main.py run: its latest checkpoint and its
tokenizer) instead of --model_key. Scores every token of the text once with a
sliding window (`lm_eval.windows`: at most --window tokens of context, each
window scoring --stride new tokens; an EOS before the text is the first
token's context, as lm-evaluation-harness does), then prints and writes (JSON,
atomically) the figures with their normaliser named: `token_perplexity`,
`word_perplexity` (Megatron-LM's: exp(Σ NLL / whitespace words of the text)),
`bits_per_byte` (Σ NLL / (ln 2 · UTF-8 bytes)), with the counts, window and
stride.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_MODEL_KEY = flags.DEFINE_string(
    "model_key", None,
    "A Hugging Face GPT-2: hub key or directory (save_pretrained's, or "
    "util_scripts/export_hf.py's; one holding only a config.json is a "
    "freshly initialised model). This or --run_dir is required.")
_FLAG_RUN_DIR = flags.DEFINE_string(
    "run_dir", None,
    "Instead of --model_key: a run directory of main.py (its latest "
    "checkpoint and its tokenizer).")
_FLAG_TEXT_PATH = flags.DEFINE_string(
    "text_path", None, "The plain UTF-8 text file to score (local or gs://); "
    "required.")
_FLAG_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "GPT2TokenizerFast key or directory. Default: the "
    "run's, or --model_key's.")
_FLAG_WINDOW = flags.DEFINE_integer(
    "window", 1024, "Tokens of context the model reads at once (at most its "
    "n_positions).")
_FLAG_STRIDE = flags.DEFINE_integer(
    "stride", 512, "Tokens each window scores (1 .. --window): every scored "
    "token has at least --window - --stride tokens of context before it "
    "when the text has them; --stride = --window gives disjoint windows.")
_FLAG_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8, "Windows per model call.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Where to write the figures as JSON (optional).")

# Printed in this order, each with the count it is normalised by.
_SHOWN = (("token_perplexity", "tokens"), ("word_perplexity", "words"),
          ("bits_per_byte", "bytes"))


def main(argv):
  if not _FLAG_TEXT_PATH.value:
    raise utils.UserError("--text_path is required (a UTF-8 text file)")
  figures = lm_eval.evaluate_file(
      _FLAG_TEXT_PATH.value, window=_FLAG_WINDOW.value,
      stride=_FLAG_STRIDE.value, batch_size=_FLAG_BATCH_SIZE.value,
      model_key=_FLAG_MODEL_KEY.value, run_dir=_FLAG_RUN_DIR.value,
      tokenizer=_FLAG_TOKENIZER.value, output_path=_FLAG_OUTPUT_PATH.value,
      progress=True)
  print(f"{figures['windows']} windows of {figures['window']} tokens, "
        f"stride {figures['stride']}")
  for name, count in _SHOWN:
    print(f"{name} {figures[name]:.4f} ({figures[count]} {count})")


if __name__ == "__main__":
  cli.run(main)
