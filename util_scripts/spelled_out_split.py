r"""Writes a demo-world split whose wording the world's toy embedder handles poorly.

  python util_scripts/spelled_out_split.py --world=WORLD --output_dir=SPLIT

Each question's entity name (its gold block's title) is spelled out by its
wordpieces ("Brakunda Society" -> "bra-kun-da Society"), so the bag of
wordpieces misses the gold block: the split on which `train_retriever.py`
shows what training the query embedder buys (README, "Training the
retriever"). Writes SPLIT/train.jsonl, SPLIT/validation.jsonl (KILT lines,
provenance kept) and SPLIT/title_map.json (`demo_world.write_spelled_out_split`).
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
from util_scripts import demo_world  # pylint: disable=g-import-not-at-top
import utils  # pylint: disable=g-import-not-at-top

_FLAG_WORLD = flags.DEFINE_string(
    "world", None, "A demo world's directory (util_scripts/make_demo_data.py "
    "--output_dir); required.")
_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the split is written; required.")


def main(argv):
  if not _FLAG_WORLD.value:
    raise utils.UserError("--world is required (a demo world's directory)")
  if not _FLAG_OUTPUT_DIR.value:
    raise utils.UserError("--output_dir is required")
  utils.check_output_path(_FLAG_OUTPUT_DIR.value, "--output_dir",
                          directory=True)
  written = demo_world.write_spelled_out_split(_FLAG_WORLD.value,
                                               _FLAG_OUTPUT_DIR.value)
  print("wrote " + ", ".join(written.values()), flush=True)


if __name__ == "__main__":
  cli.run(main)
