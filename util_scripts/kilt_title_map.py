r"""Writes the title -> wikipedia_id map of KILT's knowledge source.

  python util_scripts/kilt_title_map.py \
      --knowledge_source=kilt_knowledgesource.json --output_path=title_map.json

KILT names provenance pages by `wikipedia_id`; REALM's blocks carry only a
page title (`titles.tfr`). This streams `kilt_knowledgesource.json` (one JSON
page a line: `_id`, `wikipedia_id`, `wikipedia_title`, `text`, ...; 5.9M
lines, 35 GB, from http://dl.fbaipublicfiles.com/KILT/kilt_knowledgesource.json)
line by line and writes {wikipedia_title: wikipedia_id} as JSON, for
`generation.py --kilt_title_map` and `util_scripts/kilt_eval.py
--kilt_title_map`. Titles match exactly; a title held by several pages keeps
its first page, as KILT's own `get_page_by_title` (`find_one` over the file
imported in order) does, and the duplicates are counted and printed.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import kilt_files  # pylint: disable=g-import-not-at-top
import kilt_metrics  # pylint: disable=g-import-not-at-top
import utils  # pylint: disable=g-import-not-at-top

_FLAG_KNOWLEDGE_SOURCE = flags.DEFINE_string(
    "knowledge_source", None,
    f"KILT's knowledge source, {kilt_files.KNOWLEDGE_SOURCE_FILE} (one JSON "
    "page a line; local or gs://); required.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None,
    "Where to write the {title: wikipedia_id} JSON map; required.")


def main(argv):
  if not _FLAG_KNOWLEDGE_SOURCE.value:
    raise utils.UserError(
        "--knowledge_source is required (KILT's "
        f"{kilt_files.KNOWLEDGE_SOURCE_FILE})")
  if not _FLAG_OUTPUT_PATH.value:
    raise utils.UserError("--output_path is required (the title map .json)")
  utils.check_output_path(_FLAG_OUTPUT_PATH.value, "--output_path")
  counts = kilt_metrics.write_title_map(_FLAG_KNOWLEDGE_SOURCE.value,
                                       _FLAG_OUTPUT_PATH.value)
  print(f"wrote {counts['num_titles']} titles of {counts['num_pages']} pages "
        f"to {_FLAG_OUTPUT_PATH.value}; {counts['num_duplicate_titles']} "
        "pages repeat an earlier page's title (the first page kept), "
        f"{counts['num_conflicting_duplicates']} of them with another "
        "wikipedia_id", flush=True)


if __name__ == "__main__":
  cli.run(main)
