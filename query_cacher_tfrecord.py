r"""Caches the REALM neighbours of every KILT ELI5 question as sharded TFRecords.

For each question: REALM query embedding -> maximum inner product search over
the block embeddings (exact, or ScaNN) -> the top `--num_neighbours` block ids
and scores -> GPT-2 ids of the question, of every answer and of each
neighbour block (its text, or `title: text` with `--context_with_title`; cut
at `--max_block_tokens`), each text tokenized with a
leading space, as it appears after `Question:`, `Context:` or `Answer:`. The format is
`neighbour_cache.py`'s: `{split}-{i:05d}-of-{n:05d}.tfrecord` shards and
`manifest.json`, written last.

Exact search runs on the devices of `--distribute_mode` / `--devices` (the
shared strategy flags of `tf_utils.py`), the blocks split over them.

Resuming: the manifest the run will write is computed up front and kept as
`manifest.pending.json` while the run is unfinished. A rerun with the same
request keeps the shards already written (each one is renamed into place only
when complete) and writes the others, so the result equals an uninterrupted
run's. A rerun with another request into the same directory is refused.

  python query_cacher_tfrecord.py \
    --retriever_config_path=configs/retriever_configs/realm_cc_news_pretrained.json \
    --dataset_root=KILT_DIR --output_dir=CACHE --num_neighbours=100 \
    --search=exact --tokenizer=gpt2
"""

import collections
import itertools
import json
import os

from absl import flags
import numpy as np
import tensorflow as tf
import tqdm

import neighbour_cache
import retrievers
import task_specific
import tf_utils
import utils

# KILT's official file names, per split of the cache.
KILT_FILES = {
    "train": "eli5-train-kilt.jsonl",
    "validation": "eli5-dev-kilt.jsonl",
    "test": "eli5-test_without_answers-kilt.jsonl",
}
PENDING_MANIFEST_NAME = "manifest.pending.json"
LOCK_NAME = "lock"

_FLAG_RETRIEVER_CONFIG_PATH = flags.DEFINE_string(
    "retriever_config_path", None,
    "Required. Retriever config JSON (query_embedder_path, text_records, "
    "num_block_records, optional title_records), e.g. "
    "configs/retriever_configs/*.json.")
_FLAG_DATASET_ROOT = flags.DEFINE_string(
    "dataset_root", None,
    "Required. Directory (local or gs://) holding the KILT ELI5 files under "
    f"their official names: {', '.join(KILT_FILES.values())}.")
_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Required. Directory the cache is written to.")
_FLAG_SPLITS = flags.DEFINE_list(
    "splits", list(neighbour_cache.SPLITS),
    f"Splits to cache, among {', '.join(neighbour_cache.SPLITS)}.")
_FLAG_NUM_NEIGHBOURS = flags.DEFINE_integer(
    "num_neighbours", 100, "Neighbour blocks cached per question.")
_FLAG_SEARCH = flags.DEFINE_enum(
    "search", "exact", list(retrievers.SEARCH_KINDS),
    "exact: brute-force inner products over every block; scann: ScaNN "
    "(needs --scann_config_path).")
_FLAG_SCANN_CONFIG_PATH = flags.DEFINE_string(
    "scann_config_path", None,
    "ScaNN config JSON (configs/scann_configs/*.json), for --search=scann.")
_FLAG_SCANN_INDEX_DIR = flags.DEFINE_string(
    "scann_index_dir", None,
    "Optional, --search=scann: load the ScaNN index from this directory, or "
    "save the one built there for later runs.")
_FLAG_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 128, "Questions embedded and searched at once.")
_FLAG_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 16,
    "Shards per split (fewer for a split with fewer questions).")
_FLAG_MAX_BLOCK_TOKENS = flags.DEFINE_integer(
    "max_block_tokens", 256, "GPT-2 tokens kept of each neighbour block.")
_FLAG_BLOCK_TOKEN_CACHE_SIZE = flags.DEFINE_integer(
    "block_token_cache_size", 100000,
    "GPT-2 ids of this many recently used blocks are kept in memory, so that "
    "popular neighbours are read and tokenized once (0: none kept).")
_FLAG_MAX_QUERY_LENGTH = flags.DEFINE_integer(
    "max_query_length", 0,
    "Wordpieces of each question given to the REALM query embedder, [CLS] and "
    "[SEP] included (at least 2). 0: all of them, as ORQA's retrieve(), up to "
    "the embedder's position limit.")
_FLAG_CONTEXT_WITH_TITLE = flags.DEFINE_bool(
    "context_with_title", False,
    "Cache each neighbour's GPT-2 ids as 'title: text' (the page title from "
    "the retriever config's title_records) instead of the block text alone.")
_FLAG_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "gpt2",
    "GPT-2 tokenizer: a Hugging Face hub key or a local directory "
    "(GPT2TokenizerFast.from_pretrained).")


# ---------------------------------------------------------------------------
# KILT ELI5 questions
# ---------------------------------------------------------------------------


def _kilt_question(line, path, line_number):
  """(id, question, answers) of one KILT line; a UserError naming what is wrong."""
  where = f"{path}:{line_number}"
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise utils.UserError(f"{where}: not JSON ({error.msg})") from None
  if not isinstance(record, dict):
    raise utils.UserError(f"{where}: expected a JSON object")
  for key in ("id", "input"):
    if not isinstance(record.get(key), str):
      raise utils.UserError(
          f"{where}: no string {key!r} (a KILT line has id, input, output)")
  outputs = record.get("output", [])
  if not isinstance(outputs, list):
    raise utils.UserError(f"{where}: 'output' is not a list")
  answers = []
  for output in outputs:
    # An output may hold only provenance; an answer that is there is text.
    if isinstance(output, dict) and "answer" in output:
      if not isinstance(output["answer"], str):
        raise utils.UserError(
            f"{where}: an 'answer' is {type(output['answer']).__name__}, "
            "expected a string")
      answers.append(output["answer"])
  return record["id"], record["input"], answers


def kilt_questions(path):
  """Yields (id, question, answers) of each line of a KILT ELI5 jsonl file.

  Streams the file: the training file's answers are too large to hold beside
  the block embeddings. The test split's answers are empty.
  """
  if not tf.io.gfile.exists(path):
    raise utils.UserError(f"{path}: KILT file does not exist")
  if tf.io.gfile.isdir(path):
    raise utils.UserError(f"{path}: is a directory, expected a KILT jsonl file")
  with tf.io.gfile.GFile(path, "rb") as f:
    for line_number, line in enumerate(f, start=1):
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError as error:
        raise utils.UserError(
            f"{path}:{line_number}: not UTF-8 ({error.reason} at byte "
            f"{error.start}), expected KILT's UTF-8 jsonl") from None
      if text.strip():
        yield _kilt_question(text, path, line_number)


def count_kilt_questions(path):
  """Number of questions in a KILT file, every line checked; ids must be unique."""
  seen = set()
  for question_id, _, _ in kilt_questions(path):
    if question_id in seen:
      raise utils.UserError(f"{path}: id {question_id!r} appears more than once")
    seen.add(question_id)
  if not seen:
    raise utils.UserError(
        f"{path}: no questions (an empty file), expected one KILT JSON object "
        "per line")
  return len(seen)


# ---------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------


def shard_ranges(num_questions, num_shards):
  """[start, end) of each shard: contiguous, in file order, sizes within one."""
  num_shards = max(1, min(num_shards, num_questions))
  return [(index * num_questions // num_shards,
           (index + 1) * num_questions // num_shards)
          for index in range(num_shards)]


def planned_manifest(*, retriever_config, tokenizer_name, tokenizer, search,
                     num_neighbours, max_block_tokens, split_sizes, num_shards,
                     max_query_length=0, context_with_title=False):
  """The manifest a complete run writes; known before any question is searched."""
  splits = {}
  for split, num_questions in split_sizes.items():
    ranges = shard_ranges(num_questions, num_shards)
    splits[split] = {
        "shards": [neighbour_cache.shard_name(split, index, len(ranges))
                   for index in range(len(ranges))],
        "num_records": num_questions,
    }
  return {
      "format_version": neighbour_cache.FORMAT_VERSION,
      "embedder_path": retriever_config["query_embedder_path"],
      "blocks_path": retriever_config["text_records"],
      "titles_path": retriever_config.get("title_records"),
      "num_blocks": retriever_config["num_block_records"],
      "max_query_length": max_query_length,
      "context_with_title": context_with_title,
      "tokenizer": tokenizer_name,
      "vocab_size": len(tokenizer),
      "tokenizer_fingerprint": neighbour_cache.tokenizer_fingerprint(tokenizer),
      "search": search,
      "num_neighbours": num_neighbours,
      "max_block_tokens": max_block_tokens,
      "splits": splits,
  }


def _first_difference(found, wanted, prefix=""):
  """Name and values of the first key where two manifests differ."""
  for key in sorted(set(found) | set(wanted)):
    found_value, wanted_value = found.get(key), wanted.get(key)
    if found_value == wanted_value:
      continue
    if isinstance(found_value, dict) and isinstance(wanted_value, dict):
      return _first_difference(found_value, wanted_value, f"{prefix}{key}.")
    return f"{prefix}{key} is {found_value!r}, this run asks for {wanted_value!r}"
  return None


def check_existing(output_dir, manifest):
  """True if `output_dir` already holds this cache; a UserError if another one.

  An unfinished run's pending manifest must match too: its shards are kept.
  """
  for name, state in ((neighbour_cache.MANIFEST_NAME, "complete"),
                      (PENDING_MANIFEST_NAME, "unfinished")):
    path = os.path.join(output_dir, name)
    if tf.io.gfile.exists(path):
      difference = _first_difference(utils.read_json(path, "cache manifest"),
                                     manifest)
      if difference:
        raise utils.UserError(
            f"{output_dir}: holds a {state} cache made with other settings "
            f"({difference}); use another --output_dir or delete it")
      if state == "complete":
        return True
  return False


def _remove_stale_temporaries(output_dir, names):
  """Deletes temporary files a killed run left behind while writing `names`."""
  for name in names:
    for path in tf.io.gfile.glob(
        os.path.join(output_dir, f"{name}.tmp-*")):
      tf.io.gfile.remove(path)


def _remove_if_exists(path):
  if tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def _token_ids(tokenizer, texts):
  """GPT-2 ids of " " + each text (no special tokens, no length limit).

  The leading space makes the ids those the text has inside the laid-out
  sequence `Question: {q} Context: {c} Answer: {a}`: GPT-2's pre-tokenizer
  attaches a space to the word after it, so `Question:` + ids(" " + q)
  tokenizes exactly like the joined text.
  """
  if not texts:
    return []
  return [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(
      [" " + text for text in texts], add_special_tokens=False)]


def context_texts(block_store, block_ids, with_title=False):
  """The text GPT-2 reads of each block: its text, or `title: text`."""
  texts = block_store.texts(block_ids)
  if not with_title:
    return texts
  return [f"{title}: {text}"
          for title, text in zip(block_store.titles(block_ids), texts)]


class BlockTokenCache:
  """GPT-2 ids of blocks (cut at `max_block_tokens`), the most recently used kept.

  Popular blocks are the neighbours of many questions: keeping their ids
  saves reading and tokenizing them again. Ids are stored as int32 arrays, so
  `capacity` blocks take at most capacity * max_block_tokens * 4 bytes.
  A block's text is `context_texts`' (`with_title`: `title: text`).
  """

  def __init__(self, tokenizer, block_store, max_block_tokens, capacity,
               with_title=False):
    self._tokenizer = tokenizer
    self._block_store = block_store
    self._max_block_tokens = max_block_tokens
    self._capacity = capacity
    self._with_title = with_title
    self._ids = collections.OrderedDict()

  def token_ids(self, block_ids):
    """A list of id lists, one per block id."""
    block_ids = [int(block_id) for block_id in block_ids]
    missing = sorted({b for b in block_ids if b not in self._ids})
    fresh = dict(zip(missing, (
        np.array(ids[:self._max_block_tokens], np.int32)
        for ids in _token_ids(self._tokenizer, context_texts(
            self._block_store, missing, self._with_title)))))
    found = [fresh[b] if b in fresh else self._ids[b] for b in block_ids]
    for block_id in block_ids:
      if block_id in self._ids:
        self._ids.move_to_end(block_id)
      elif self._capacity:
        self._ids[block_id] = fresh[block_id]
    while len(self._ids) > self._capacity:
      self._ids.popitem(last=False)
    return [ids.tolist() for ids in found]


def shard_records(questions, retriever, tokenizer, block_tokens, *,
                  num_neighbours, batch_size, progress):
  """Serialized `neighbour_cache` records of `questions`, in order, batch by batch."""
  for start in range(0, len(questions), batch_size):
    batch = questions[start:start + batch_size]
    texts = [question for _, question, _ in batch]
    scores, block_ids = retriever.search(retriever.embedder.embed(texts),
                                         num_neighbours)
    neighbour_ids = block_tokens.token_ids(block_ids.reshape(-1))
    question_ids = _token_ids(tokenizer, texts)
    for row, (example_id, question, answers) in enumerate(batch):
      yield neighbour_cache.encode_example(
          example_id=example_id, question=question,
          question_ids=question_ids[row],
          answer_ids=_token_ids(tokenizer, answers),
          neighbour_block_ids=block_ids[row].tolist(),
          neighbour_scores=scores[row].tolist(),
          neighbour_ids=neighbour_ids[row * num_neighbours:
                                      (row + 1) * num_neighbours])
    progress.update(len(batch))


def write_missing_shards(output_dir, manifest, kilt_paths, shard_records_fn):
  """Writes every shard of `manifest` not yet in `output_dir`, split by split.

  Args:
    output_dir: the cache directory.
    manifest: from `planned_manifest`.
    kilt_paths: {split: KILT file}.
    shard_records_fn: (questions, progress) -> serialized records.
  """
  splits = manifest["splits"]
  _remove_stale_temporaries(output_dir, [
      name for split in splits.values() for name in split["shards"]] + [
          neighbour_cache.MANIFEST_NAME, PENDING_MANIFEST_NAME])
  with tqdm.tqdm(total=sum(split["num_records"] for split in splits.values()),
                 unit="question", desc="caching neighbours") as progress:
    for split, split_plan in splits.items():
      questions = kilt_questions(kilt_paths[split])
      ranges = shard_ranges(split_plan["num_records"], len(split_plan["shards"]))
      for name, (start, end) in zip(split_plan["shards"], ranges):
        shard_questions = list(itertools.islice(questions, end - start))
        path = os.path.join(output_dir, name)
        if tf.io.gfile.exists(path):
          progress.update(len(shard_questions))
          continue
        tf_utils.write_tfrecords(path,
                                 shard_records_fn(shard_questions, progress))


def _check_positive(**values):
  for name, value in values.items():
    if value < 1:
      raise utils.UserError(f"--{name}={value}: must be at least 1")


def _required(**values):
  for name, value in values.items():
    if not value:
      raise utils.UserError(f"--{name} is required")


def _search_description():
  if _FLAG_SEARCH.value == "exact":
    return {"kind": "exact"}, None
  if not _FLAG_SCANN_CONFIG_PATH.value:
    raise utils.UserError("--search=scann needs --scann_config_path")
  scann_config = retrievers.load_scann_config(_FLAG_SCANN_CONFIG_PATH.value)
  return dict(scann_config, kind="scann"), scann_config


def main(argv):
  _required(retriever_config_path=_FLAG_RETRIEVER_CONFIG_PATH.value,
            dataset_root=_FLAG_DATASET_ROOT.value,
            output_dir=_FLAG_OUTPUT_DIR.value)
  _check_positive(num_neighbours=_FLAG_NUM_NEIGHBOURS.value,
                  batch_size=_FLAG_BATCH_SIZE.value,
                  num_shards=_FLAG_NUM_SHARDS.value,
                  max_block_tokens=_FLAG_MAX_BLOCK_TOKENS.value)
  if _FLAG_BLOCK_TOKEN_CACHE_SIZE.value < 0:
    raise utils.UserError(f"--block_token_cache_size="
                          f"{_FLAG_BLOCK_TOKEN_CACHE_SIZE.value}: must be >= 0")
  splits = _FLAG_SPLITS.value
  unknown = [split for split in splits if split not in KILT_FILES]
  if unknown or not splits:
    raise utils.UserError(
        f"--splits={','.join(splits)}: expected some of "
        f"{', '.join(neighbour_cache.SPLITS)}")
  max_query_length = _FLAG_MAX_QUERY_LENGTH.value
  retrievers.check_max_query_length(max_query_length, "--max_query_length")
  retriever_config = retrievers.load_retriever_config(
      _FLAG_RETRIEVER_CONFIG_PATH.value)
  context_with_title = _FLAG_CONTEXT_WITH_TITLE.value
  if context_with_title and retriever_config["title_records"] is None:
    raise utils.UserError(
        f"--context_with_title: {_FLAG_RETRIEVER_CONFIG_PATH.value} has no "
        "title_records, expected one naming the titles.tfr of the blocks")
  num_neighbours = _FLAG_NUM_NEIGHBOURS.value
  if num_neighbours > retriever_config["num_block_records"]:
    raise utils.UserError(
        f"--num_neighbours={num_neighbours}: there are only "
        f"{retriever_config['num_block_records']} blocks")
  search, scann_config = _search_description()
  kilt_paths = {split: os.path.join(_FLAG_DATASET_ROOT.value, KILT_FILES[split])
                for split in splits}
  split_sizes = {split: count_kilt_questions(path)
                 for split, path in kilt_paths.items()}
  tokenizer = task_specific.load_tokenizer(_FLAG_TOKENIZER.value)
  output_dir = _FLAG_OUTPUT_DIR.value
  manifest = planned_manifest(
      retriever_config=retriever_config, tokenizer_name=_FLAG_TOKENIZER.value,
      tokenizer=tokenizer, search=search, num_neighbours=num_neighbours,
      max_block_tokens=_FLAG_MAX_BLOCK_TOKENS.value,
      split_sizes=split_sizes,
      num_shards=_FLAG_NUM_SHARDS.value, max_query_length=max_query_length,
      context_with_title=context_with_title)
  if check_existing(output_dir, manifest):
    _remove_if_exists(os.path.join(output_dir, PENDING_MANIFEST_NAME))
    print(f"{output_dir}: the cache is already complete")
    return
  # One cacher at a time writes an output directory: a second one fails at
  # once, before loading the retriever.
  with utils.locked_directory(output_dir, LOCK_NAME,
                              f"neighbour cache {output_dir}"):
    strategy = tf_utils.strategy_from_flags()
    retriever = retrievers.LiveRetriever(
        retriever_config, _FLAG_SEARCH.value, scann_config=scann_config,
        scann_index_dir=_FLAG_SCANN_INDEX_DIR.value,
        devices=strategy.extended.worker_devices,
        max_query_length=max_query_length)
    # Written once the inputs have loaded: from here on, shards are kept.
    utils.atomic_write_json(os.path.join(output_dir, PENDING_MANIFEST_NAME),
                            manifest)
    block_tokens = BlockTokenCache(
        tokenizer, retriever.blocks, _FLAG_MAX_BLOCK_TOKENS.value,
        _FLAG_BLOCK_TOKEN_CACHE_SIZE.value, with_title=context_with_title)
    write_missing_shards(output_dir, manifest, kilt_paths, shard_records_fn=(
        lambda questions, progress: shard_records(
            questions, retriever, tokenizer, block_tokens,
            num_neighbours=num_neighbours, batch_size=_FLAG_BATCH_SIZE.value,
            progress=progress)))
    utils.atomic_write_json(
        os.path.join(output_dir, neighbour_cache.MANIFEST_NAME), manifest)
    _remove_if_exists(os.path.join(output_dir, PENDING_MANIFEST_NAME))
    print(f"{output_dir}: cached {num_neighbours} neighbours for "
          + ", ".join(f"{split_sizes[split]} {split}" for split in splits)
          + " questions")


if __name__ == "__main__":
  utils.run(main)
