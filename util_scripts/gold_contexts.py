r"""Writes the gold condition's contexts file from KILT gold and KILT's knowledge source.

  python util_scripts/gold_contexts.py --gold=eli5-dev-kilt.jsonl \
      --knowledge_source=kilt_knowledgesource.json \
      --output_path=gold-validation.jsonl
  python main.py ...the run's flags... --task=evaluate \
      --conditions=real,none,gold --gold_contexts_path=gold-validation.jsonl

Each question whose KILT outputs hold provenance gets the provenance
passages (KILT's spans: paragraphs and characters of the named page) and its
first answer, in the contexts-file format `evaluation.py` reads (jsonl: `id`,
`input`, `answer`, `contexts`). Questions without provenance are left out
and counted: on ELI5 only part of the dev set has provenance. The passages
are KILT's Wikipedia paragraphs (2019-08), not REALM's blocks (2018-12).
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top
import evaluation  # pylint: disable=g-import-not-at-top
import kilt_files  # pylint: disable=g-import-not-at-top
import utils  # pylint: disable=g-import-not-at-top

_FLAG_GOLD = flags.DEFINE_string(
    "gold", None, "KILT gold jsonl with provenance (e.g. "
    f"{kilt_files.ELI5_SPLIT_FILES['validation']}); required.")
_FLAG_KNOWLEDGE_SOURCE = flags.DEFINE_string(
    "knowledge_source", None,
    f"KILT's knowledge source, {kilt_files.KNOWLEDGE_SOURCE_FILE} (one JSON "
    "page a line; local or gs://); required.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Where to write the contexts file (jsonl); required.")


def main(argv):
  required = {"gold": (_FLAG_GOLD.value, "KILT gold jsonl"),
              "knowledge_source": (_FLAG_KNOWLEDGE_SOURCE.value,
                                   "KILT's knowledge source"),
              "output_path": (_FLAG_OUTPUT_PATH.value,
                              "the contexts file to write")}
  for name, (value, what) in required.items():
    if not value:
      raise utils.UserError(f"--{name} is required ({what})")
  utils.check_output_path(_FLAG_OUTPUT_PATH.value, "--output_path")
  records, counts = evaluation.gold_contexts_from_kilt(
      _FLAG_GOLD.value, _FLAG_KNOWLEDGE_SOURCE.value)
  if not records:
    raise utils.UserError(
        f"{_FLAG_GOLD.value}: no question has both an answer and provenance "
        "found in --knowledge_source, expected KILT gold with provenance")
  evaluation.write_contexts_file(_FLAG_OUTPUT_PATH.value, records)
  print(f"wrote {counts['written']} of {counts['questions']} questions to "
        f"{_FLAG_OUTPUT_PATH.value} ({counts['with_provenance']} with "
        f"provenance; {counts['missing_pages']} provenance spans not found in "
        "the knowledge source)", flush=True)


if __name__ == "__main__":
  cli.run(main)
