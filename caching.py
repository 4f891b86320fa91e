r"""The neighbour cache of KILT ELI5: REALM neighbours, as sharded TFRecords.

  import caching
  caching.cache(caching.CacheConfig(
      retriever_config_path="configs/retriever_configs/realm_cc_news_pretrained.json",
      dataset_root=KILT_DIR, output_dir=CACHE, num_neighbours=100))

For each question: REALM query embedding -> maximum inner product search over
the block embeddings (exact, or ScaNN) -> the top `num_neighbours` block ids
and scores -> GPT-2 ids of the question, of every answer and of each
neighbour block (its text, or `title: text` with `context_with_title`; cut
at `max_block_tokens`), each text tokenized as it appears in the layout
(`task_specific.text_token_ids`). The format is `neighbour_cache.py`'s:
`{split}-{i:05d}-of-{n:05d}.tfrecord` shards and `manifest.json`, written
last.

Exact search runs on the devices of the config's `strategy`
(`tf_utils.StrategyConfig`), the blocks split over them.

Resuming: the manifest the run will write is computed up front and kept as
`manifest.pending.json` while the run is unfinished. A rerun with the same
request keeps the shards already written (each one is renamed into place only
when complete) and writes the others, so the result equals an uninterrupted
run's. A rerun with another request into the same directory is refused.

`query_cacher_tfrecord.py` is the command line over `cache`: its flags are
the fields of `CacheConfig` (`cli.define_flags`).
"""

import collections
import dataclasses
import itertools
import os
import typing

import numpy as np
import tensorflow as tf
import tqdm

import kilt_files
import neighbour_cache
import query_embedder
import retrievers
import settings
import task_specific
import tf_utils
import utils

setting = settings.setting

PENDING_MANIFEST_NAME = "manifest.pending.json"
LOCK_NAME = "lock"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Every setting of a cacher run (query_cacher_tfrecord.py's flags)."""
  retriever_config_path: typing.Optional[str] = setting(
      None,
      "Required. Retriever config JSON (query_embedder_path, text_records, "
      "num_block_records, optional title_records), e.g. "
      "configs/retriever_configs/*.json.")
  dataset_root: typing.Optional[str] = setting(
      None,
      "Required. Directory (local or gs://) holding the KILT ELI5 files under "
      "their official names: "
      f"{', '.join(kilt_files.ELI5_SPLIT_FILES.values())}.")
  output_dir: typing.Optional[str] = setting(
      None, "Required. Directory the cache is written to.")
  splits: tuple = setting(
      neighbour_cache.SPLITS,
      f"Splits to cache, among {', '.join(neighbour_cache.SPLITS)}.")
  num_neighbours: int = setting(100, "Neighbour blocks cached per question.")
  search: str = setting(
      "exact",
      "exact: brute-force inner products over every block; scann: ScaNN "
      "(needs --scann_config_path).", choices=retrievers.SEARCH_KINDS)
  scann_config_path: typing.Optional[str] = setting(
      None,
      "ScaNN config JSON (configs/scann_configs/*.json), for --search=scann.")
  scann_index_dir: typing.Optional[str] = setting(
      None,
      "Optional, --search=scann: load the ScaNN index from this directory, or "
      "save the one built there for later runs.")
  batch_size: int = setting(128, "Questions embedded and searched at once.")
  num_shards: int = setting(
      16, "Shards per split (fewer for a split with fewer questions).")
  max_block_tokens: int = setting(
      256, "GPT-2 tokens kept of each neighbour block.")
  block_token_cache_size: int = setting(
      100000,
      "GPT-2 ids of this many recently used blocks are kept in memory, so "
      "that popular neighbours are read and tokenized once (0: none kept).")
  max_query_length: int = setting(
      0,
      "Wordpieces of each question given to the REALM query embedder, [CLS] "
      "and [SEP] included (at least 2). 0: all of them, as ORQA's retrieve(), "
      "up to the embedder's position limit.")
  context_with_title: bool = setting(
      False,
      "Cache each neighbour's GPT-2 ids as 'title: text' (the page title from "
      "the retriever config's title_records) instead of the block text alone.")
  strategy: tf_utils.StrategyConfig = tf_utils.StrategyConfig()
  tokenizer: str = setting(
      "gpt2",
      "GPT-2 tokenizer: a Hugging Face hub key or a local directory "
      "(GPT2TokenizerFast.from_pretrained).")


# ---------------------------------------------------------------------------
# KILT ELI5 questions
# ---------------------------------------------------------------------------


def count_kilt_questions(path):
  """Number of questions in a KILT file, every line checked; ids must be unique."""
  seen = set()
  for question_id, _, _ in kilt_files.eli5_questions(path):
    if question_id in seen:
      raise utils.UserError(f"{path}: id {question_id!r} appears more than once")
    seen.add(question_id)
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
        for ids in task_specific.text_token_ids(
            self._tokenizer, context_texts(self._block_store, missing,
                                           self._with_title)))))
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
    question_ids = task_specific.text_token_ids(tokenizer, texts)
    for row, (example_id, question, answers) in enumerate(batch):
      yield neighbour_cache.encode_example(
          example_id=example_id, question=question,
          question_ids=question_ids[row],
          answer_ids=task_specific.text_token_ids(tokenizer, answers),
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
      # Streamed: the training split's answers are too large to hold beside
      # the block embeddings.
      questions = kilt_files.eli5_questions(kilt_paths[split])
      ranges = shard_ranges(split_plan["num_records"], len(split_plan["shards"]))
      for name, (start, end) in zip(split_plan["shards"], ranges):
        shard_questions = list(itertools.islice(questions, end - start))
        path = os.path.join(output_dir, name)
        if tf.io.gfile.exists(path):
          progress.update(len(shard_questions))
          continue
        tf_utils.write_tfrecords(path,
                                 shard_records_fn(shard_questions, progress))


# ---------------------------------------------------------------------------
# A cacher run
# ---------------------------------------------------------------------------


def _check_config(config):
  """A UserError naming the flag of the first setting `cache` cannot take."""
  for name in ("retriever_config_path", "dataset_root", "output_dir"):
    if not getattr(config, name):
      raise utils.UserError(f"--{name} is required")
  for name in ("num_neighbours", "batch_size", "num_shards",
               "max_block_tokens"):
    value = getattr(config, name)
    if value < 1:
      raise utils.UserError(f"--{name}={value}: must be at least 1")
  if config.block_token_cache_size < 0:
    raise utils.UserError(f"--block_token_cache_size="
                          f"{config.block_token_cache_size}: must be >= 0")
  unknown = [split for split in config.splits
             if split not in kilt_files.ELI5_SPLIT_FILES]
  if unknown or not config.splits:
    raise utils.UserError(
        f"--splits={','.join(config.splits)}: expected some of "
        f"{', '.join(neighbour_cache.SPLITS)}")
  if config.search not in retrievers.SEARCH_KINDS:
    raise utils.UserError(f"--search={config.search}: expected one of "
                          f"{', '.join(retrievers.SEARCH_KINDS)}")
  query_embedder.check_max_query_length(config.max_query_length,
                                        "--max_query_length")
  utils.check_output_path(config.output_dir, "--output_dir", directory=True)


def _search_description(config):
  """(the manifest's `search`, the ScaNN config or None)."""
  if config.search == "exact":
    return {"kind": "exact"}, None
  if not config.scann_config_path:
    raise utils.UserError("--search=scann needs --scann_config_path")
  scann_config = retrievers.load_scann_config(config.scann_config_path)
  return dict(scann_config, kind="scann"), scann_config


def cache(config):
  """Writes (or completes) the neighbour cache of `config`, a `CacheConfig`.

  Every setting and input is checked before anything is written; a cache
  already complete with the same settings is left as it is.

  Returns:
    The cache's manifest.
  """
  _check_config(config)
  retriever_config = retrievers.load_retriever_config(
      config.retriever_config_path)
  if config.context_with_title and retriever_config["title_records"] is None:
    raise utils.UserError(
        f"--context_with_title: {config.retriever_config_path} has no "
        "title_records, expected one naming the titles.tfr of the blocks")
  num_neighbours = config.num_neighbours
  if num_neighbours > retriever_config["num_block_records"]:
    raise utils.UserError(
        f"--num_neighbours={num_neighbours}: there are only "
        f"{retriever_config['num_block_records']} blocks")
  search, scann_config = _search_description(config)
  kilt_paths = {split: os.path.join(config.dataset_root,
                                    kilt_files.ELI5_SPLIT_FILES[split])
                for split in config.splits}
  split_sizes = {split: count_kilt_questions(path)
                 for split, path in kilt_paths.items()}
  tokenizer = task_specific.load_tokenizer(config.tokenizer)
  output_dir = config.output_dir
  manifest = planned_manifest(
      retriever_config=retriever_config, tokenizer_name=config.tokenizer,
      tokenizer=tokenizer, search=search, num_neighbours=num_neighbours,
      max_block_tokens=config.max_block_tokens, split_sizes=split_sizes,
      num_shards=config.num_shards, max_query_length=config.max_query_length,
      context_with_title=config.context_with_title)
  if check_existing(output_dir, manifest):
    _remove_if_exists(os.path.join(output_dir, PENDING_MANIFEST_NAME))
    print(f"{output_dir}: the cache is already complete")
    return manifest
  # One cacher at a time writes an output directory: a second one fails at
  # once, before loading the retriever.
  with utils.locked_directory(output_dir, LOCK_NAME,
                              f"neighbour cache {output_dir}"):
    strategy = tf_utils.strategy_from_config(config.strategy)
    retriever = retrievers.LiveRetriever(
        retriever_config, config.search, scann_config=scann_config,
        scann_index_dir=config.scann_index_dir,
        devices=strategy.extended.worker_devices,
        max_query_length=config.max_query_length)
    # Written once the inputs have loaded: from here on, shards are kept.
    utils.atomic_write_json(os.path.join(output_dir, PENDING_MANIFEST_NAME),
                            manifest)
    block_tokens = BlockTokenCache(
        tokenizer, retriever.blocks, config.max_block_tokens,
        config.block_token_cache_size, with_title=config.context_with_title)
    write_missing_shards(output_dir, manifest, kilt_paths, shard_records_fn=(
        lambda questions, progress: shard_records(
            questions, retriever, tokenizer, block_tokens,
            num_neighbours=num_neighbours, batch_size=config.batch_size,
            progress=progress)))
    utils.atomic_write_json(
        os.path.join(output_dir, neighbour_cache.MANIFEST_NAME), manifest)
    _remove_if_exists(os.path.join(output_dir, PENDING_MANIFEST_NAME))
    print(f"{output_dir}: cached {num_neighbours} neighbours for "
          + ", ".join(f"{split_sizes[split]} {split}"
                      for split in config.splits)
          + " questions")
  return manifest
