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
(`tf_utils.StrategyConfig`), the blocks split over them. The neighbours'
GPT-2 ids come from `token_store.block_tokens`: tokenized as they come, or
read from a pre-tokenised store (`block_token_store`), which gives the same
ids faster, so the manifest does not record it and the cache is the same
bytes either way.

A question-only cache (`num_neighbours=0`) holds questions and answers and no
neighbours: no retriever is loaded and the retrieval settings are not used;
its manifest records `search: {"kind": "none"}`, `num_neighbours: 0` and no
embedder, blocks or titles. Live retrieval (`live_retrieval.py`) reads the
questions of such a cache and retrieves their neighbours itself; `naked_lm`
trains on it.

Resuming: the manifest the run will write is computed up front and kept as
`manifest.pending.json` while the run is unfinished. A rerun with the same
request keeps the shards already written (each one is renamed into place only
when complete) and writes the others, so the result equals an uninterrupted
run's. A rerun with another request into the same directory is refused.

`query_cacher_tfrecord.py` is the command line over `cache`: its flags are
the fields of `CacheConfig` (`cli.define_flags`).
"""

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
import token_store
import utils

setting = settings.setting

PENDING_MANIFEST_NAME = "manifest.pending.json"
LOCK_NAME = "lock"


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Every setting of a cacher run (query_cacher_tfrecord.py's flags)."""
  retriever_config_path: typing.Optional[str] = setting(
      None,
      "Required (but with --num_neighbours=0). Retriever config JSON "
      "(query_embedder_path, text_records, num_block_records, optional "
      "title_records), e.g. configs/retriever_configs/*.json.")
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
  num_neighbours: int = setting(
      100,
      "Neighbour blocks cached per question. 0: questions and answers only "
      "(no retriever loaded, the retrieval flags unused), for "
      "main.py's live_retrieval or naked_lm approach.")
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
      "that popular neighbours are read and tokenized once (0: none kept; "
      "unused with --block_token_store).")
  block_token_store: typing.Optional[str] = setting(
      None,
      "Optional: read the neighbours' GPT-2 ids from this pre-tokenised block "
      "store (util_scripts/pretokenize_blocks.py, same tokenizer and "
      "--context_with_title, cut at 0 or >= --max_block_tokens) instead of "
      "tokenizing them; the cache is the same bytes either way.")
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
  """The manifest a complete run writes; known before any question is searched.

  A question-only cache has no `retriever_config` (None): no embedder,
  blocks or titles.
  """
  splits = {}
  for split, num_questions in split_sizes.items():
    ranges = shard_ranges(num_questions, num_shards)
    splits[split] = {
        "shards": [neighbour_cache.shard_name(split, index, len(ranges))
                   for index in range(len(ranges))],
        "num_records": num_questions,
    }
  retriever_config = retriever_config or {}
  return {
      "format_version": neighbour_cache.FORMAT_VERSION,
      "embedder_path": retriever_config.get("query_embedder_path"),
      "blocks_path": retriever_config.get("text_records"),
      "titles_path": retriever_config.get("title_records"),
      "num_blocks": retriever_config.get("num_block_records"),
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


def shard_records(questions, retriever, tokenizer, block_tokens, *,
                  num_neighbours, batch_size, progress):
  """Serialized `neighbour_cache` records of `questions`, in order, batch by batch.

  With `num_neighbours` 0 the records have no neighbours and `retriever`
  and `block_tokens` are not used.
  """
  for start in range(0, len(questions), batch_size):
    batch = questions[start:start + batch_size]
    texts = [question for _, question, _ in batch]
    if num_neighbours:
      scores, block_ids = retriever.search(retriever.embedder.embed(texts),
                                           num_neighbours)
      neighbour_ids = block_tokens.token_ids(block_ids.reshape(-1))
    else:  # A question-only cache.
      scores = block_ids = np.zeros([len(batch), 0])
      neighbour_ids = []
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
  required = ["dataset_root", "output_dir"]
  if config.num_neighbours:
    required.insert(0, "retriever_config_path")
  for name in required:
    if not getattr(config, name):
      raise utils.UserError(f"--{name} is required")
  if config.num_neighbours < 0:
    raise utils.UserError(f"--num_neighbours={config.num_neighbours}: must "
                          "be >= 0 (0: questions and answers only)")
  for name in ("batch_size", "num_shards", "max_block_tokens"):
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
  if not config.num_neighbours:
    return {"kind": "none"}, None
  if config.search == "exact":
    return {"kind": "exact"}, None
  if not config.scann_config_path:
    raise utils.UserError("--search=scann needs --scann_config_path")
  scann_config = retrievers.load_scann_config(config.scann_config_path)
  return dict(scann_config, kind="scann"), scann_config


def _checked_retriever_config(config):
  """The retriever config of a run that searches, checked against its settings."""
  retriever_config = retrievers.load_retriever_config(
      config.retriever_config_path,
      context_with_title=config.context_with_title)
  if config.num_neighbours > retriever_config["num_block_records"]:
    raise utils.UserError(
        f"--num_neighbours={config.num_neighbours}: there are only "
        f"{retriever_config['num_block_records']} blocks")
  return retriever_config


def _block_settings(config):
  """The manifest's settings of how blocks are read: unused (0, 0, False)
  by a question-only cache, so that they do not tell two such caches apart."""
  if not config.num_neighbours:
    return dict(max_block_tokens=0, max_query_length=0,
                context_with_title=False)
  return dict(max_block_tokens=config.max_block_tokens,
              max_query_length=config.max_query_length,
              context_with_title=config.context_with_title)


def _load_retrieval(config, retriever_config, scann_config, tokenizer):
  """(the retriever, what gives the neighbours' GPT-2 ids) of a run."""
  strategy = tf_utils.strategy_from_config(config.strategy)
  retriever = retrievers.LiveRetriever(
      retriever_config, config.search, scann_config=scann_config,
      scann_index_dir=config.scann_index_dir,
      devices=strategy.extended.worker_devices,
      max_query_length=config.max_query_length)
  block_tokens = token_store.block_tokens(
      tokenizer, retriever.blocks, config.max_block_tokens,
      with_title=config.context_with_title,
      capacity=config.block_token_cache_size,
      store_dir=config.block_token_store)
  return retriever, block_tokens


def cache(config):
  """Writes (or completes) the neighbour cache of `config`, a `CacheConfig`.

  Every setting and input is checked before anything is written; a cache
  already complete with the same settings is left as it is.

  Returns:
    The cache's manifest.
  """
  _check_config(config)
  num_neighbours = config.num_neighbours
  retriever_config = (_checked_retriever_config(config) if num_neighbours
                      else None)
  search, scann_config = _search_description(config)
  kilt_paths = {split: os.path.join(config.dataset_root,
                                    kilt_files.ELI5_SPLIT_FILES[split])
                for split in config.splits}
  split_sizes = {split: count_kilt_questions(path)
                 for split, path in kilt_paths.items()}
  tokenizer = task_specific.load_tokenizer(config.tokenizer)
  if num_neighbours and config.block_token_store:
    # Refused now rather than after the block embeddings have loaded.
    token_store.open_store(
        config.block_token_store, tokenizer=tokenizer,
        max_block_tokens=config.max_block_tokens,
        with_title=config.context_with_title,
        num_blocks=retriever_config["num_block_records"])
  output_dir = config.output_dir
  manifest = planned_manifest(
      retriever_config=retriever_config, tokenizer_name=config.tokenizer,
      tokenizer=tokenizer, search=search, num_neighbours=num_neighbours,
      split_sizes=split_sizes, num_shards=config.num_shards,
      **_block_settings(config))
  if check_existing(output_dir, manifest):
    _remove_if_exists(os.path.join(output_dir, PENDING_MANIFEST_NAME))
    print(f"{output_dir}: the cache is already complete")
    return manifest
  # One cacher at a time writes an output directory: a second one fails at
  # once, before loading the retriever.
  with utils.locked_directory(output_dir, LOCK_NAME,
                              f"neighbour cache {output_dir}"):
    retriever = block_tokens = None
    if num_neighbours:
      retriever, block_tokens = _load_retrieval(config, retriever_config,
                                                scann_config, tokenizer)
    # Written once the inputs have loaded: from here on, shards are kept.
    utils.atomic_write_json(os.path.join(output_dir, PENDING_MANIFEST_NAME),
                            manifest)
    write_missing_shards(output_dir, manifest, kilt_paths, shard_records_fn=(
        lambda questions, progress: shard_records(
            questions, retriever, tokenizer, block_tokens,
            num_neighbours=num_neighbours, batch_size=config.batch_size,
            progress=progress)))
    utils.atomic_write_json(
        os.path.join(output_dir, neighbour_cache.MANIFEST_NAME), manifest)
    _remove_if_exists(os.path.join(output_dir, PENDING_MANIFEST_NAME))
    print(f"{output_dir}: cached {num_neighbours or 'no'} neighbours for "
          + ", ".join(f"{split_sizes[split]} {split}"
                      for split in config.splits)
          + " questions")
  return manifest
