r"""Index refresh (REALM): every block re-embedded, a new version swapped in.

  import index_refresh
  index_refresh.refresh(index_refresh.RefreshConfig(
      index_root=INDEX, block_embedder=EXPORT,
      retriever_config_path="configs/retriever_configs/x.json"))

embeds every block of the corpus (blocks.tfr + titles.tfr) with a block
embedder (REALM's TF1 Hub module or a TF2 SavedModel with `projected` and
`tokenization_info`, as `query_embedder.QueryEmbedder` loads them), laid out
as ORQA's encode_blocks.py does: `[CLS] title [SEP] text [SEP]` at 288
wordpieces (`query_embedder.block_features`, which made the demo world's block
embeddings). The result is a new version of an
index root:

  INDEX/
    retriever_config.json   {"index_root": "."}: what jobs and servers read
    CURRENT                 the served version's name, replaced atomically
    versions/NAME/
      retriever_config.json the version as a plain retriever config
      embedder/             the query embedder, its block embeddings in
                            encoded/encoded.ckpt (variable block_emb)
      scann/                the ScaNN index (with scann_config_path)
      version.json          written last: what made the version
    work/KEY/               shards of an unfinished refresh
    lock                    held by the one refresher at work

Blocks are embedded in shards (`shard_size` blocks each, a file each, renamed
into place when complete), so a refresh killed at any point resumes from the
shards it wrote and gives the uninterrupted run's block embeddings, bit for
bit. The version is assembled in a staging directory, renamed into
`versions/`, and only then named in `CURRENT`: a reader (a job starting, a
retrieval server reloading, `retrievers.load_retriever_config`) sees the old
version or the new one, complete. A version's name is its sequence number and
a hash of what made it (the embedders' files, the blocks, the layout): a
rerun of a finished refresh changes nothing; a refresh to a version already
built switches back to it.

Without a block embedder (after the first version), the current block
embeddings are kept and only the query embedder is new: the refresh of a
run that trains the query embedder alone. With `watch_exports` (REALM's
asynchronous refresh), the refresher polls a train_retriever.py run's
`exports/latest.json` and refreshes with each new export while training
goes on; retrieval servers of the root swap each version in as it comes.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
import typing

import numpy as np
import tensorflow as tf
import tqdm

import block_store
import live_retrieval
import query_embedder
import retrievers
import settings
import utils

setting = settings.setting

FORMAT_VERSION = 1
VERSION_RECORD_NAME = "version.json"
ROOT_CONFIG_NAME = "retriever_config.json"
LOCK_NAME = "lock"
_WORK_DIR = "work"
_STAGING_PREFIX = ".staging-"
# An embedder's old block embeddings are not an input of the refresh.
_NOT_THE_EMBEDDER = ("encoded",)


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
  """Every setting of refresh_index.py (its flags)."""
  index_root: typing.Optional[str] = setting(
      None,
      "Required. The index root (a local directory, made if missing): "
      "versions/, CURRENT, retriever_config.json for jobs and servers.")
  block_embedder: typing.Optional[str] = setting(
      None,
      "The block embedder that re-embeds every block: a REALM TF1 Hub module "
      "or TF2 SavedModel with projected and tokenization_info signatures "
      "(train_retriever.py's export). Required on a root's first refresh; "
      "default later: keep the current version's block embeddings (a new "
      "query embedder alone).")
  query_embedder: typing.Optional[str] = setting(
      None,
      "The query embedder served with the new block embeddings (copied into "
      "the version); default: the current version's, or on a root's first "
      "refresh the retriever config's query_embedder_path.")
  retriever_config_path: typing.Optional[str] = setting(
      None,
      "A root's first refresh: the retriever config of the blocks "
      "(text_records, title_records, num_block_records) and of the default "
      "query embedder; later refreshes take the current version's.")
  scann_config_path: typing.Optional[str] = setting(
      None,
      "Also build the version's ScaNN index with this config "
      "(configs/scann_configs/*.json); servers with --search=scann load it.")
  shard_size: int = setting(
      16384,
      "Blocks per shard: a killed refresh redoes at most one shard.")
  batch_size: int = setting(128, "Blocks embedded at once.")
  watch_exports: typing.Optional[str] = setting(
      None,
      "Asynchronous refresh (REALM): a train_retriever.py run's "
      "exports/latest.json; refresh with each export it names (its "
      "query_embedder, and its block_embedder or, when the run trains none, "
      "the current block embeddings) while training goes on. Replaces "
      "--query_embedder and --block_embedder.")
  poll_seconds: float = setting(
      60.0, "--watch_exports: seconds between two reads of latest.json.")
  watch_until_step: int = setting(
      0,
      "--watch_exports: stop once an export of this step or later is "
      "served; 0: watch until stopped.")


def refresh(config):
  """Re-embeds every block of `config.index_root`'s corpus with
  `config.block_embedder` (or keeps the current block embeddings) and makes
  the result, with `config.query_embedder`, the root's current version;
  with `config.watch_exports`, does so for each new export (`watch`).

  Returns:
    The new version's record (its version.json); the last one's when
    watching.
  """
  _check_config(config)
  if config.watch_exports:
    return watch(config)
  root = os.path.abspath(config.index_root)
  with utils.locked_directory(root, LOCK_NAME, f"index root {root}"):
    current = _current_config(root)
    plan = _plan(config, root, current)
    name = _existing_version(root, plan["key"])
    if name is None:
      name = _build_version(root, plan, current)
    record = utils.read_json(
        os.path.join(retrievers.index_version_dir(root, name),
                     VERSION_RECORD_NAME), "index version record")
    root_config = os.path.join(root, ROOT_CONFIG_NAME)
    if not os.path.exists(root_config):
      utils.atomic_write_json(root_config, {retrievers.INDEX_ROOT_KEY: "."})
    utils.atomic_write_text(
        os.path.join(root, retrievers.INDEX_POINTER_NAME), name + "\n")
    shutil.rmtree(_work_dir(root, plan["key"]), ignore_errors=True)
  print(f"{root}: serving version {name} ({record['num_blocks']} blocks of "
        f"{record['embedding_dim']} dimensions, block embedder "
        f"{record['block_embedder']}); jobs and servers read {root_config}")
  return record


# ---------------------------------------------------------------------------
# What a refresh makes
# ---------------------------------------------------------------------------


def _check_config(config):
  if not config.index_root:
    raise utils.UserError("--index_root is required")
  if config.watch_exports and (config.query_embedder or
                               config.block_embedder):
    raise utils.UserError(
        f"--watch_exports={config.watch_exports}: the embedders come from "
        "its exports, expected no --query_embedder nor --block_embedder")
  if config.poll_seconds <= 0:
    raise utils.UserError(f"--poll_seconds={config.poll_seconds}: must be "
                          "positive")
  if "://" in config.index_root:
    raise utils.UserError(
        f"--index_root={config.index_root}: expected a local directory (a "
        "version is renamed into place, which an object store cannot do "
        "atomically)")
  utils.check_output_path(config.index_root, "--index_root", directory=True)
  for name in ("shard_size", "batch_size"):
    if getattr(config, name) < 1:
      raise utils.UserError(f"--{name}={getattr(config, name)}: must be at "
                            "least 1")


def _current_config(root):
  """The retriever config of the root's current version, or None (no
  version yet)."""
  if not tf.io.gfile.exists(os.path.join(root, retrievers.INDEX_POINTER_NAME)):
    return None
  return retrievers.load_retriever_config(os.path.join(root, ROOT_CONFIG_NAME))


def _blocks_of(config, root, current):
  """(text_records, title_records, num_block_records) to embed: the current
  version's, which a given retriever config must not contradict."""
  given = (retrievers.load_retriever_config(config.retriever_config_path)
           if config.retriever_config_path else None)
  if current is None and given is None:
    raise utils.UserError(
        f"--index_root={root} holds no version yet: --retriever_config_path "
        "is required (the blocks to embed)")
  keys = ("text_records", "title_records", "num_block_records")
  blocks = tuple((current or given)[key] for key in keys)
  if given is not None and current is not None and tuple(
      given[key] for key in keys) != blocks:
    raise utils.UserError(
        f"--retriever_config_path={config.retriever_config_path}: its blocks "
        f"are not those of {root} (version {current['index_name']}: "
        f"{blocks[0]}, {blocks[2]} blocks); another corpus needs another "
        "--index_root")
  if blocks[1] is None:
    raise utils.UserError(
        f"{config.retriever_config_path or root}: no title_records, expected "
        "the blocks' titles.tfr (a block is embedded as [CLS] title [SEP] "
        "text [SEP])")
  return blocks


def _embedder_digest(path, flag):
  """A hash of an embedder's files (its old block embeddings left out)."""
  if not tf.io.gfile.isdir(path):
    raise utils.UserError(f"{flag}={path}: not a directory, expected an "
                          "embedder export")
  digest = hashlib.sha256()
  live_retrieval.update_with_directory(digest, path, skip=_NOT_THE_EMBEDDER)
  return digest.hexdigest()


def _plan(config, root, current):
  """What the refresh embeds and serves (`current`: the root's current
  version's config, or None), and its key: a hash of all that decides the
  version's files."""
  blocks_path, titles_path, num_blocks = _blocks_of(config, root, current)
  query = config.query_embedder or (current or retrievers.load_retriever_config(
      config.retriever_config_path))["query_embedder_path"]
  if config.block_embedder:
    block = {"block_embedder": config.block_embedder,
             "block_embedder_digest": _embedder_digest(config.block_embedder,
                                                       "--block_embedder"),
             # ORQA's candidate length (encode_blocks.py).
             "max_length": query_embedder.BLOCK_MAX_LENGTH,
             "shard_size": config.shard_size,
             "batch_size": config.batch_size}
  elif current is None:
    raise utils.UserError(
        f"--index_root={root} holds no version yet: --block_embedder is "
        "required (the embedder of its blocks)")
  else:
    # The current block embeddings, kept: described as they were made.
    record = _version_record(current)
    block = {name: record[name] for name in (
        "block_embedder", "block_embedder_digest", "max_length",
        "shard_size", "batch_size")}
  plan = {
      **block,
      "query_embedder": query,
      "blocks_path": blocks_path, "titles_path": titles_path,
      "num_blocks": num_blocks,
      "blocks_bytes": tf.io.gfile.stat(blocks_path).length,
      "titles_bytes": tf.io.gfile.stat(titles_path).length,
      "query_embedder_digest": _embedder_digest(query, "--query_embedder"),
      "scann_config": (retrievers.load_scann_config(config.scann_config_path)
                       if config.scann_config_path else None),
      "current": current and current["index_name"],
      "kept_block_embeddings": not config.block_embedder,
  }
  plan["key"] = hashlib.sha256(json.dumps(
      {name: value for name, value in plan.items()
       if name not in ("block_embedder", "query_embedder", "current",
                       "kept_block_embeddings")},
      sort_keys=True).encode("utf-8")).hexdigest()[:12]
  return plan


def _version_names(root):
  versions = os.path.join(root, retrievers.INDEX_VERSIONS_DIR)
  if not os.path.isdir(versions):
    return []
  return sorted(name for name in os.listdir(versions)
                if not name.startswith(_STAGING_PREFIX))


def _existing_version(root, key):
  """The finished version made by the same plan, or None."""
  for name in _version_names(root):
    if name.endswith(f"-{key}") and os.path.exists(os.path.join(
        retrievers.index_version_dir(root, name), VERSION_RECORD_NAME)):
      return name
  return None


def _work_dir(root, key):
  return os.path.join(root, _WORK_DIR, key)


# ---------------------------------------------------------------------------
# Embedding the blocks, shard by shard
# ---------------------------------------------------------------------------


class BlockEmbedder:
  """A REALM embedder run over blocks laid out as ORQA's encode_blocks.py."""

  def __init__(self, path, max_length):
    self._embedder = query_embedder.QueryEmbedder(path)
    self.path = path
    # Fewer if the embedder's BERT embeds fewer positions.
    self.max_length = min(max_length, query_embedder.position_limit(path) or
                          max_length)

  def embed(self, titles, texts):
    """float32 [B, D] embeddings of the blocks (title, text)."""
    return self._embedder.embed_features(query_embedder.block_features(
        self._embedder.wordpieces, list(zip(titles, texts)), self.max_length))


def _shard_path(work_dir, index, num_shards):
  return os.path.join(work_dir, f"shard-{index:05d}-of-{num_shards:05d}.npy")


def _shard_ranges(num_blocks, shard_size):
  return [(start, min(start + shard_size, num_blocks))
          for start in range(0, num_blocks, shard_size)]


def _write_shard(path, embeddings):
  tmp = utils.temporary_path(path)
  with open(tmp, "wb") as f:
    np.save(f, embeddings)
  os.rename(tmp, path)


def embed_missing_shards(work_dir, plan, embedder, blocks):
  """Writes each shard not yet in `work_dir`; returns all their paths."""
  ranges = _shard_ranges(plan["num_blocks"], plan["shard_size"])
  paths = [_shard_path(work_dir, index, len(ranges))
           for index in range(len(ranges))]
  missing = [index for index, path in enumerate(paths)
             if not os.path.exists(path)]
  if len(missing) < len(paths):
    print(f"{work_dir}: resuming, {len(paths) - len(missing)} of "
          f"{len(paths)} shards already embedded")
  batch = plan["batch_size"]
  for index in tqdm.tqdm(missing, desc="embedding blocks", unit="shard",
                         disable=None):
    start, end = ranges[index]
    parts = []
    for first in range(start, end, batch):
      ids = range(first, min(first + batch, end))
      parts.append(embedder.embed(blocks.titles(ids), blocks.texts(ids)))
    _write_shard(paths[index], np.concatenate(parts))
  return paths


def _check_width(block_width, block_source, plan, current):
  """Refuses block embeddings of `block_width` (from `block_source`, for
  the message) unless the query embedder and the root's current version
  have that width too."""
  query = query_embedder.QueryEmbedder(plan["query_embedder"])
  query_width = int(query.embed([""]).shape[1])
  if block_width != query_width:
    raise utils.UserError(
        f"{block_source}: gives {block_width}-dimensional embeddings, but the "
        f"query embedder {plan['query_embedder']} gives {query_width}: "
        "expected embedders of one width")
  if current is not None:
    current_width = _version_record(current)["embedding_dim"]
    if current_width != block_width:
      raise utils.UserError(
          f"{block_source}: gives {block_width}-dimensional embeddings, but "
          f"{current['index_root']} serves {current_width} (version "
          f"{current['index_name']}); another width needs another "
          "--index_root")


def _version_record(retriever_config):
  return utils.read_json(os.path.join(
      retrievers.index_version_dir(retriever_config["index_root"],
                                   retriever_config["index_name"]),
      VERSION_RECORD_NAME), "index version record")


def _load_shards(paths, num_blocks, width):
  block_emb = np.concatenate([np.load(path) for path in paths])
  if block_emb.shape != (num_blocks, width):
    raise utils.UserError(
        f"{os.path.dirname(paths[0])}: the shards hold {block_emb.shape}, "
        f"expected [{num_blocks}, {width}]; delete the directory and rerun")
  return block_emb


# ---------------------------------------------------------------------------
# Assembling the version
# ---------------------------------------------------------------------------


def _next_name(root, key):
  numbers = [int(name.split("-", 1)[0]) for name in _version_names(root)
             if name.split("-", 1)[0].isdigit()]
  return f"{max(numbers, default=0) + 1:04d}-{key}"


def _copy_embedder(source, destination):
  """The embedder's files but its old block embeddings (`encoded/`)."""
  for path in live_retrieval.files_under(source, skip=_NOT_THE_EMBEDDER):
    target = os.path.join(destination, os.path.relpath(path, source))
    utils.makedirs(os.path.dirname(target))
    tf.io.gfile.copy(path, target, overwrite=True)


def _embedded_blocks(root, plan, current):
  """(block embeddings float32 [N, D], seconds spent embedding): the
  current version's when kept, else embedded shard by shard (resuming from
  the shards of an earlier attempt)."""
  if plan["kept_block_embeddings"]:
    block_emb = retrievers.load_block_embeddings(
        current["query_embedder_path"], plan["num_blocks"])
    _check_width(block_emb.shape[1], f"version {current['index_name']}'s "
                 "block embeddings", plan, current)
    return block_emb, 0.0
  embedder = BlockEmbedder(plan["block_embedder"], plan["max_length"])
  width = int(embedder.embed([""], [""]).shape[1])
  _check_width(width, f"--block_embedder={embedder.path}", plan, current)
  work_dir = utils.makedirs(_work_dir(root, plan["key"]))
  blocks = block_store.BlockStore(plan["blocks_path"], plan["num_blocks"],
                                  plan["titles_path"])
  started = time.monotonic()
  block_emb = _load_shards(embed_missing_shards(work_dir, plan, embedder,
                                                blocks),
                           plan["num_blocks"], width)
  return block_emb, time.monotonic() - started


def _build_version(root, plan, current):
  """Renames the finished version of `plan` into `versions/`; returns its
  name."""
  block_emb, seconds = _embedded_blocks(root, plan, current)
  name = _next_name(root, plan["key"])
  versions = utils.makedirs(os.path.join(root, retrievers.INDEX_VERSIONS_DIR))
  for leftover in os.listdir(versions):
    if leftover.startswith(_STAGING_PREFIX):
      shutil.rmtree(os.path.join(versions, leftover))
  staging = os.path.join(versions, _STAGING_PREFIX + name)
  embedder_dir = os.path.join(staging, "embedder")
  _copy_embedder(plan["query_embedder"], embedder_dir)
  retrievers.write_block_embeddings(embedder_dir, block_emb)
  utils.atomic_write_json(os.path.join(staging, retrievers.VERSION_CONFIG_NAME),
                          {"query_embedder_path": "embedder",
                           "text_records": plan["blocks_path"],
                           "title_records": plan["titles_path"],
                           "num_block_records": plan["num_blocks"]})
  if plan["scann_config"] is not None:
    retrievers.ScannSearcher.build(block_emb, plan["scann_config"]).save(
        os.path.join(staging, retrievers.VERSION_SCANN_DIR))
  utils.atomic_write_json(os.path.join(staging, VERSION_RECORD_NAME), {
      "format_version": FORMAT_VERSION, "name": name,
      "embedding_dim": int(block_emb.shape[1]),
      "embedding_seconds": round(seconds, 1),
      "created": datetime.datetime.now().astimezone().isoformat(
          timespec="seconds"),
      "previous": plan["current"],
      **{key: value for key, value in plan.items() if key != "current"}})
  os.rename(staging, retrievers.index_version_dir(root, name))
  return name


# ---------------------------------------------------------------------------
# Asynchronous refresh: each new export of a training run
# ---------------------------------------------------------------------------


def _latest_export(path):
  """train_retriever.py's exports/latest.json ({step, query_embedder,
  block_embedder}), or None while the run has exported nothing."""
  if not tf.io.gfile.exists(path):
    return None
  latest = utils.read_json(path, "latest export")
  if not isinstance(latest, dict) or not isinstance(
      latest.get("step"), int) or not latest.get("query_embedder"):
    raise utils.UserError(
        f"--watch_exports={path}: expected train_retriever.py's latest.json "
        "({step, query_embedder, block_embedder})")
  return latest


def watch(config):
  """Refreshes `config.index_root` with each export `config.watch_exports`
  names, polling every `config.poll_seconds`, as REALM refreshes its index
  while the embedders train; returns the last version's record once one of
  step >= `config.watch_until_step` (if not 0) is served."""
  record, served_step = None, None
  while True:
    latest = _latest_export(config.watch_exports)
    if latest is not None and latest["step"] != served_step:
      record = refresh(dataclasses.replace(
          config, watch_exports=None, query_embedder=latest["query_embedder"],
          block_embedder=latest.get("block_embedder")))
      served_step = latest["step"]
      print(f"{config.index_root}: serving the export of step {served_step}")
      if config.watch_until_step and served_step >= config.watch_until_step:
        return record
    time.sleep(config.poll_seconds)
