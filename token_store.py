r"""GPT-2 ids of REALM blocks, as the layout reads them: tokenized on demand, or read from a pre-tokenised store.

The neighbour cache and live retrieval both take a block's ids from here
(`block_tokens`), so that a neighbour has the same ids whichever path gave
it: `task_specific.text_token_ids` of `context_texts` (the block's text, or
`title: text`), cut at `max_block_tokens`.

Two sources give them. `BlockTokenCache` reads and tokenizes blocks as they
are asked for, keeping the most recently used. The pre-tokenised store
holds every block's ids, written once by `pretokenize`
(`util_scripts/pretokenize_blocks.py`), so that 13.35M blocks are not
tokenized again by every cacher and live-retrieval job:

  python util_scripts/pretokenize_blocks.py \
    --retriever_config_path=configs/retriever_configs/realm_cc_news_pretrained.json \
    --output_dir=BLOCK_TOKENS --tokenizer=gpt2

A store is a directory of three files:

  offsets.int64      int64 [N + 1], little-endian: block i's ids are
                     ids[offsets[i]:offsets[i + 1]]; offsets[N] = num_ids
  ids.uint16         every block's ids, concatenated, little-endian; uint16
  (or ids.int32)     when the vocabulary fits (GPT-2's 50,257 does), else int32
  token_store.json   written last (a directory without it is not a store):
                     format_version, tokenizer, vocab_size,
                     tokenizer_fingerprint (`neighbour_cache`'s),
                     max_block_tokens (the cut, 0: whole blocks), with_title,
                     num_blocks, num_ids, blocks_path, titles_path (null
                     without titles), offsets_file, ids_file

Read locally, both files are `np.memmap`ped: the OS pages in the blocks
asked for. On an object store (gs://), the offsets are read whole (8 bytes
a block: 107 MB for the public corpus) and each block's ids as a byte range
through `tf.io.gfile`. The store is written to a local directory (appends and
truncation need one); copy it to gs:// afterwards if jobs read it there.

A store cut at M serves any cut m <= M (a prefix of each block's ids); a
whole-block store (M = 0) serves any cut. Opening a store for another
tokenizer, another `with_title`, another block count or a longer cut is
refused with one line naming the store.

Resuming: `pretokenize` appends the ids of each batch of blocks to the two
files, syncs them, then records the blocks done and ids written in
`progress.json` (atomically). A rerun after a kill cuts both files back to
the last record and continues, so the result is byte for byte that of an
uninterrupted run; a rerun with other settings is refused.
"""

import collections
import dataclasses
import itertools
import os
import threading
import typing

import numpy as np
import tensorflow as tf
import tqdm

import block_store
import neighbour_cache
import settings
import task_specific
import utils

setting = settings.setting

FORMAT_VERSION = 1
STORE_NAME = "token_store.json"
PROGRESS_NAME = "progress.json"
OFFSETS_NAME = "offsets.int64"
LOCK_NAME = "lock"
_OFFSETS_DTYPE = np.dtype("<i8")


def context_texts(block_store_, block_ids, with_title=False):
  """The text GPT-2 reads of each block: its text, or `title: text`."""
  texts = block_store_.texts(block_ids)
  if not with_title:
    return texts
  return [f"{title}: {text}"
          for title, text in zip(block_store_.titles(block_ids), texts)]


def _cut(ids, max_block_tokens):
  """The first `max_block_tokens` of `ids` (all of them for 0)."""
  return ids[:max_block_tokens or None]


class BlockTokenCache:
  """GPT-2 ids of blocks (cut at `max_block_tokens`, 0: whole blocks), the
  most recently used kept.

  Popular blocks are the neighbours of many questions: keeping their ids
  saves reading and tokenizing them again. Ids are stored as int32 arrays, so
  `capacity` blocks take at most capacity * max_block_tokens * 4 bytes.
  A block's text is `context_texts`' (`with_title`: `title: text`).
  """

  def __init__(self, tokenizer, block_store_, max_block_tokens, capacity,
               with_title=False):
    self._tokenizer = tokenizer
    self._block_store = block_store_
    self._max_block_tokens = max_block_tokens
    self._capacity = capacity
    self._with_title = with_title
    self._ids = collections.OrderedDict()

  def token_ids(self, block_ids):
    """A list of id lists, one per block id."""
    block_ids = [int(block_id) for block_id in block_ids]
    missing = sorted({b for b in block_ids if b not in self._ids})
    fresh = dict(zip(missing, (
        np.array(_cut(ids, self._max_block_tokens), np.int32)
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


# ---------------------------------------------------------------------------
# The pre-tokenised store: reading
# ---------------------------------------------------------------------------


def ids_dtype(vocab_size):
  """The narrowest dtype that holds every id of a vocabulary."""
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def _ids_file_dtype(ids_file):
  """The little-endian dtype an ids file's name ends with (`ids.uint16`)."""
  return np.dtype(ids_file.split(".", 1)[1]).newbyteorder("<")


class _RangeReader:
  """Slices of a flat little-endian array in a file on an object store,
  each read as one byte range (thread-safe: one read at a time)."""

  def __init__(self, path, dtype):
    self._file = tf.io.gfile.GFile(path, "rb")
    self._dtype = dtype
    self._lock = threading.Lock()

  def __getitem__(self, index):
    start, stop = index.start, index.stop
    with self._lock:
      self._file.seek(start * self._dtype.itemsize)
      data = self._file.read((stop - start) * self._dtype.itemsize)
    return np.frombuffer(data, self._dtype)


def _local_array(path, dtype):
  # np.memmap refuses an empty file (a store of empty blocks has no ids).
  if os.path.getsize(path) == 0:
    return np.zeros([0], dtype)
  # A plain view: slicing an np.memmap makes a memmap object per slice.
  return np.memmap(path, dtype=dtype, mode="r").view(np.ndarray)


def _check_file_size(store_dir, path, count, dtype):
  found = tf.io.gfile.stat(path).length
  if found != count * dtype.itemsize:
    raise utils.UserError(
        f"{store_dir}: {os.path.basename(path)} holds {found} bytes, "
        f"{STORE_NAME} expects {count} {dtype.name} values "
        f"({count * dtype.itemsize} bytes); the store is damaged, rerun "
        "util_scripts/pretokenize_blocks.py into a new --output_dir")


class TokenStore:
  """GPT-2 ids of any block, read by block id from a pre-tokenised store
  (`open_store`), cut at `max_block_tokens` (0: whole blocks)."""

  def __init__(self, store_dir, description, max_block_tokens):
    self.store_dir = store_dir
    self.description = description
    self.num_blocks = description["num_blocks"]
    self._max_block_tokens = max_block_tokens
    offsets_path = os.path.join(store_dir, description["offsets_file"])
    ids_path = os.path.join(store_dir, description["ids_file"])
    dtype = _ids_file_dtype(description["ids_file"])
    for path in (offsets_path, ids_path):
      if not tf.io.gfile.exists(path):
        raise utils.UserError(
            f"{store_dir}: {os.path.basename(path)} does not exist, expected "
            f"the ids files that {STORE_NAME} names")
    _check_file_size(store_dir, offsets_path, self.num_blocks + 1,
                     _OFFSETS_DTYPE)
    _check_file_size(store_dir, ids_path, description["num_ids"], dtype)
    if "://" in store_dir:
      with tf.io.gfile.GFile(offsets_path, "rb") as f:
        self._offsets = np.frombuffer(f.read(), _OFFSETS_DTYPE)
      self._ids = _RangeReader(ids_path, dtype)
    else:
      self._offsets = _local_array(offsets_path, _OFFSETS_DTYPE)
      self._ids = _local_array(ids_path, dtype)

  def token_ids(self, block_ids):
    """A list of id lists, one per block id (as `BlockTokenCache`'s)."""
    block_ids = np.asarray(block_ids, np.int64).reshape(-1)
    outside = (block_ids < 0) | (block_ids >= self.num_blocks)
    if outside.any():
      raise IndexError(f"block id {block_ids[outside][0]} not in "
                       f"[0, {self.num_blocks})")
    starts = self._offsets[block_ids]
    ends = self._offsets[block_ids + 1]
    if self._max_block_tokens:
      ends = np.minimum(ends, starts + self._max_block_tokens)
    return [self._ids[start:end].tolist()
            for start, end in zip(starts.tolist(), ends.tolist())]


def _describe_titles(with_title):
  return "as 'title: text'" if with_title else "without titles"


def open_store(store_dir, *, tokenizer, max_block_tokens, with_title,
               num_blocks):
  """The `TokenStore` in `store_dir`, checked against what the caller reads.

  Args:
    store_dir: a directory `pretokenize` finished (local or gs://).
    tokenizer: the caller's GPT-2 tokenizer; the store's must have the same
      fingerprint.
    max_block_tokens: the cut the caller wants (0: whole blocks); the store's
      cut must be 0 or at least this.
    with_title: whether the caller reads blocks as `title: text`.
    num_blocks: blocks of the caller's corpus.
  """
  description = utils.read_finished_json(
      store_dir, STORE_NAME, "block token store", FORMAT_VERSION,
      "run util_scripts/pretokenize_blocks.py, or let it finish")
  if description["tokenizer_fingerprint"] != (
      neighbour_cache.tokenizer_fingerprint(tokenizer)):
    raise utils.UserError(
        f"{store_dir}: pre-tokenised with tokenizer "
        f"{description['tokenizer']!r}, which differs from this job's "
        "tokenizer (vocabulary/merges fingerprint), expected a store made "
        "with the same tokenizer")
  if description["with_title"] != with_title:
    raise utils.UserError(
        f"{store_dir}: holds blocks tokenized "
        f"{_describe_titles(description['with_title'])}, expected blocks "
        f"tokenized {_describe_titles(with_title)} "
        f"(--context_with_title={with_title})")
  if description["num_blocks"] != num_blocks:
    raise utils.UserError(
        f"{store_dir}: holds {description['num_blocks']} blocks, expected "
        f"the {num_blocks} blocks of the retriever config")
  stored_cut = description["max_block_tokens"]
  if stored_cut and not 0 < max_block_tokens <= stored_cut:
    wanted = ("whole blocks" if not max_block_tokens else
              f"the first {max_block_tokens}")
    raise utils.UserError(
        f"{store_dir}: holds the first {stored_cut} GPT-2 ids of each block, "
        f"but {wanted} are asked for (--max_block_tokens={max_block_tokens}), "
        "expected a store made with --max_block_tokens=0 (whole blocks) or at "
        "least that")
  return TokenStore(store_dir, description, max_block_tokens)


def block_tokens(tokenizer, block_store_, max_block_tokens, *,
                 with_title=False, capacity=100000, store_dir=None):
  """What gives the GPT-2 ids of blocks (`.token_ids(block_ids)`, a list of
  id lists): the pre-tokenised store in `store_dir` (checked by
  `open_store`), else a `BlockTokenCache` of `capacity` blocks over
  `block_store_`. Both give the same ids."""
  if store_dir:
    return open_store(store_dir, tokenizer=tokenizer,
                      max_block_tokens=max_block_tokens, with_title=with_title,
                      num_blocks=block_store_.num_blocks)
  return BlockTokenCache(tokenizer, block_store_, max_block_tokens, capacity,
                         with_title=with_title)


# ---------------------------------------------------------------------------
# The pre-tokenised store: writing
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PretokenizeConfig:
  """Every setting of a pre-tokenising run (pretokenize_blocks.py's flags)."""
  retriever_config_path: typing.Optional[str] = setting(
      None,
      "Required. Retriever config JSON (configs/retriever_configs/*.json): "
      "its text_records, title_records and num_block_records name the "
      "blocks.")
  output_dir: typing.Optional[str] = setting(
      None,
      "Required. Local directory the store is written to (copy it to gs:// "
      "afterwards if jobs read it there).")
  tokenizer: str = setting(
      "gpt2",
      "GPT-2 tokenizer: a Hugging Face hub key or a local directory "
      "(GPT2TokenizerFast.from_pretrained).")
  max_block_tokens: int = setting(
      0,
      "GPT-2 ids kept of each block (0: whole blocks). A store cut at M "
      "serves any --max_block_tokens <= M.")
  context_with_title: bool = setting(
      False,
      "Tokenize each block as 'title: text' (the retriever config's "
      "title_records) instead of its text alone, as the cacher's and "
      "live retrieval's --context_with_title.")
  batch_size: int = setting(
      4096, "Blocks read and tokenized at once; progress is recorded after "
      "each batch.")


def planned_description(*, retriever_config, tokenizer_name, tokenizer,
                        max_block_tokens, with_title):
  """`token_store.json` of a finished run, but `num_ids` (known at the end)."""
  dtype = ids_dtype(len(tokenizer))
  return {
      "format_version": FORMAT_VERSION,
      "tokenizer": tokenizer_name,
      "vocab_size": len(tokenizer),
      "tokenizer_fingerprint": neighbour_cache.tokenizer_fingerprint(tokenizer),
      "max_block_tokens": max_block_tokens,
      "with_title": with_title,
      "num_blocks": retriever_config["num_block_records"],
      "blocks_path": retriever_config["text_records"],
      "titles_path": (retriever_config["title_records"] if with_title
                      else None),
      "offsets_file": OFFSETS_NAME,
      "ids_file": f"ids.{dtype.name}",
  }


def _check_pretokenize_config(config):
  for name in ("retriever_config_path", "output_dir"):
    if not getattr(config, name):
      raise utils.UserError(f"--{name} is required")
  if "://" in config.output_dir:
    raise utils.UserError(
        f"--output_dir={config.output_dir}: expected a local directory (the "
        "store is appended to and cut back on resume); copy it to gs:// "
        "afterwards")
  if config.max_block_tokens < 0:
    raise utils.UserError(f"--max_block_tokens={config.max_block_tokens}: "
                          "must be >= 0 (0: whole blocks)")
  if config.batch_size < 1:
    raise utils.UserError(f"--batch_size={config.batch_size}: must be at "
                          "least 1")
  utils.check_output_path(config.output_dir, "--output_dir", directory=True)


def _refuse_other_settings(output_dir, state, found, planned):
  differing = sorted(key for key in set(found) | set(planned)
                     if key != "num_ids" and found.get(key) != planned.get(key))
  if differing:
    raise utils.UserError(
        f"{output_dir}: holds {state} block token store made with other "
        f"settings ({', '.join(differing)} differ); use another --output_dir "
        "or delete it")


def _record_progress(output_dir, plan, blocks_done, ids_written):
  utils.atomic_write_json(os.path.join(output_dir, PROGRESS_NAME), {
      "plan": plan, "blocks_done": blocks_done, "ids_written": ids_written})


def _resume_point(output_dir, plan):
  """(blocks done, ids written) of the unfinished run in `output_dir`, its
  files cut back to them; (0, 0) with fresh files when there is none.

  A killed run may have appended ids after its last progress record: they
  are cut off and written again.
  """
  offsets_path = os.path.join(output_dir, plan["offsets_file"])
  ids_path = os.path.join(output_dir, plan["ids_file"])
  progress_path = os.path.join(output_dir, PROGRESS_NAME)
  # What a kill left half-written under a temporary name.
  for name in (PROGRESS_NAME, STORE_NAME):
    for leftover in tf.io.gfile.glob(
        os.path.join(output_dir, f"{name}.tmp-*")):
      tf.io.gfile.remove(leftover)
  if not os.path.exists(progress_path):
    with open(offsets_path, "wb") as f:
      f.write(np.zeros([1], _OFFSETS_DTYPE).tobytes())
    open(ids_path, "wb").close()  # pylint: disable=consider-using-with
    _record_progress(output_dir, plan, 0, 0)
    return 0, 0
  progress = utils.read_json(progress_path, "progress record")
  _refuse_other_settings(output_dir, "an unfinished", progress["plan"],
                         plan)
  done, written = progress["blocks_done"], progress["ids_written"]
  itemsize = _ids_file_dtype(plan["ids_file"]).itemsize
  for path, size in ((offsets_path, (done + 1) * _OFFSETS_DTYPE.itemsize),
                     (ids_path, written * itemsize)):
    if not os.path.exists(path) or os.path.getsize(path) < size:
      raise utils.UserError(
          f"{output_dir}: {PROGRESS_NAME} records {done} blocks done, but "
          f"{os.path.basename(path)} is missing or shorter; delete the "
          "directory and rerun")
    os.truncate(path, size)
  return done, written


def _append_synced(f, array):
  f.write(array.tobytes())
  f.flush()
  os.fsync(f.fileno())


def _write_ids(output_dir, plan, blocks, tokenizer, batch_size):
  """Appends every block's ids not yet written; returns the number of ids."""
  done, written = _resume_point(output_dir, plan)
  num_blocks, with_title = plan["num_blocks"], plan["with_title"]
  dtype = _ids_file_dtype(plan["ids_file"])
  with open(os.path.join(output_dir, plan["offsets_file"]), "ab") as offsets, \
      open(os.path.join(output_dir, plan["ids_file"]), "ab") as ids, \
      tqdm.tqdm(total=num_blocks, initial=done, unit="block",
                desc="pretokenizing blocks") as progress:
    for start in range(done, num_blocks, batch_size):
      block_ids = range(start, min(start + batch_size, num_blocks))
      batch = [_cut(block, plan["max_block_tokens"])
               for block in task_specific.text_token_ids(
                   tokenizer, context_texts(blocks, block_ids, with_title))]
      lengths = np.array([len(block) for block in batch], np.int64)
      _append_synced(ids, np.fromiter(itertools.chain.from_iterable(batch),
                                      dtype, int(lengths.sum())))
      _append_synced(offsets,
                     (written + np.cumsum(lengths)).astype(_OFFSETS_DTYPE))
      written += int(lengths.sum())
      _record_progress(output_dir, plan, block_ids.stop, written)
      progress.update(len(block_ids))
  return written


def pretokenize(config):
  """Writes (or completes) the block token store of `config`, a
  `PretokenizeConfig`; a store already complete with the same settings is
  left as it is.

  Returns:
    The store's description (`token_store.json`).
  """
  # Here, not at the top: the readers of a store need no retriever code.
  import retrievers  # pylint: disable=g-import-not-at-top
  _check_pretokenize_config(config)
  retriever_config = retrievers.load_retriever_config(
      config.retriever_config_path,
      context_with_title=config.context_with_title)
  tokenizer = task_specific.load_tokenizer(config.tokenizer)
  plan = planned_description(
      retriever_config=retriever_config, tokenizer_name=config.tokenizer,
      tokenizer=tokenizer, max_block_tokens=config.max_block_tokens,
      with_title=config.context_with_title)
  output_dir = config.output_dir
  store_path = os.path.join(output_dir, STORE_NAME)
  if os.path.exists(store_path):
    found = utils.read_json(store_path, "block token store description")
    _refuse_other_settings(output_dir, "a complete", found, plan)
    # Left by a run killed between writing the description and this.
    if os.path.exists(os.path.join(output_dir, PROGRESS_NAME)):
      os.remove(os.path.join(output_dir, PROGRESS_NAME))
    print(f"{output_dir}: the block token store is already complete")
    return found
  with utils.locked_directory(output_dir, LOCK_NAME,
                              f"block token store {output_dir}"):
    blocks = block_store.BlockStore(
        retriever_config["text_records"], plan["num_blocks"],
        titles_path=plan["titles_path"])
    num_ids = _write_ids(output_dir, plan, blocks, tokenizer,
                         config.batch_size)
    description = dict(plan, num_ids=num_ids)
    utils.atomic_write_json(store_path, description)
    os.remove(os.path.join(output_dir, PROGRESS_NAME))
  print(f"{output_dir}: {num_ids} GPT-2 ids of {plan['num_blocks']} blocks")
  return description
