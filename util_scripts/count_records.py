r"""Counts the records of TFRecord files, per file and in total.

  python util_scripts/count_records.py --paths='CACHE/train-*.tfrecord,blocks.tfr'
  python util_scripts/count_records.py --cache_dir=CACHE

`--paths` takes comma-separated files or glob patterns, local or gs://.
`--cache_dir` counts every shard a neighbour cache's manifest lists and compares
each split's total with the manifest's `num_records`; a missing shard or a
count that differs ends the run with a one-line error (exit 2) after the table.
`--output_path` also writes the counts as JSON.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tqdm  # pylint: disable=g-import-not-at-top,wrong-import-position

import neighbour_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_PATHS = flags.DEFINE_list(
    "paths", [], "TFRecord files or glob patterns (local or gs://), "
    "comma-separated. Either this or --cache_dir is required.")
_FLAG_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "A neighbour cache directory (the output of "
    "query_cacher_tfrecord.py): counts its shards and checks them against "
    "manifest.json.")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Optional: also write the counts here as JSON.")


def expand_patterns(patterns):
  """Files matching `patterns`, sorted, each once; no match is a UserError."""
  files = []
  for pattern in patterns:
    matches = sorted(path for path in tf.io.gfile.glob(pattern)
                     if not tf.io.gfile.isdir(path))
    if not matches:
      raise utils.UserError(f"--paths: {pattern} matches no file")
    files.extend(path for path in matches if path not in files)
  return files


def count_files(files):
  """{path: record count} for each of `files`, with a progress bar."""
  return {path: tf_utils.count_tfrecords(path)
          for path in tqdm.tqdm(files, desc="counting", unit="file",
                                disable=len(files) < 2)}


def check_cache(cache_dir):
  """Counts a cache's shards and compares each split with its manifest.

  Returns:
    (counts {shard path: records}, splits {split: {"manifest", "counted",
    "missing_shards"}}, problems [one line per disagreement]).
  """
  manifest = neighbour_cache.read_manifest(cache_dir)
  counts, splits, problems = {}, {}, []
  for split in sorted(manifest["splits"]):
    files = neighbour_cache.split_files(cache_dir, manifest, split)
    present = [path for path in files if tf.io.gfile.exists(path)]
    missing = [os.path.basename(path) for path in files if path not in present]
    split_counts = count_files(present)
    counts.update(split_counts)
    expected = manifest["splits"][split]["num_records"]
    counted = sum(split_counts.values())
    splits[split] = {"manifest": expected, "counted": counted,
                     "missing_shards": missing}
    if missing:
      problems.append(f"{split}: {len(missing)} shard(s) missing "
                      f"({', '.join(missing[:3])})")
    if counted != expected:
      problems.append(f"{split}: {counted} records counted, the manifest "
                      f"says {expected}")
  return counts, splits, problems


def format_table(counts, splits=None):
  """Per-file counts, the total and, for a cache, each split's comparison."""
  width = max([len(path) for path in counts] + [5])
  lines = [f"{'file':<{width}}  {'records':>12}"]
  lines += [f"{path:<{width}}  {count:>12,}" for path, count in counts.items()]
  lines.append(f"{'total':<{width}}  {sum(counts.values()):>12,}")
  if splits:
    lines.append("")
    lines.append(f"{'split':<12}  {'counted':>12}  {'manifest':>12}  status")
    for split, row in splits.items():
      status = "ok" if (row["counted"] == row["manifest"] and
                        not row["missing_shards"]) else "MISMATCH"
      lines.append(f"{split:<12}  {row['counted']:>12,}  "
                   f"{row['manifest']:>12,}  {status}")
  return "\n".join(lines)


def main(argv):
  if bool(_FLAG_PATHS.value) == bool(_FLAG_CACHE_DIR.value):
    raise utils.UserError(
        "give exactly one of --paths (TFRecord files or globs) and "
        "--cache_dir (a neighbour cache)")
  utils.check_output_path(_FLAG_OUTPUT_PATH.value, "--output_path")
  splits, problems = None, []
  if _FLAG_CACHE_DIR.value:
    counts, splits, problems = check_cache(_FLAG_CACHE_DIR.value)
  else:
    counts = count_files(expand_patterns(_FLAG_PATHS.value))
  print(format_table(counts, splits))
  if _FLAG_OUTPUT_PATH.value:
    result = {"files": counts, "total": sum(counts.values())}
    if splits is not None:
      result["splits"] = splits
    utils.makedirs(os.path.dirname(_FLAG_OUTPUT_PATH.value) or ".")
    utils.atomic_write_json(_FLAG_OUTPUT_PATH.value, result)
  if problems:
    raise utils.UserError(
        f"{_FLAG_CACHE_DIR.value}: does not match its manifest: "
        f"{'; '.join(problems)}")


if __name__ == "__main__":
  cli.run(main)
