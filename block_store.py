"""Random access by record offset into REALM's block text and titles (blocks.tfr, titles.tfr).

The full text does not fit in memory beside the block embeddings: records are
read with seeks after one scan for their offsets, which is saved for later runs.
"""

import array
import hashlib
import io
import os
import struct

import numpy as np
import tensorflow as tf
import tqdm

import utils


# A TFRecord is: uint64 length, uint32 masked CRC of the length, the data,
# uint32 masked CRC of the data.
_RECORD_HEADER_BYTES = 12
_RECORD_FOOTER_BYTES = 4
_SCAN_READ_BYTES = 16 << 20


def _scan_record_offsets(path):
  """int64 [R + 1]: byte offset of each record of a TFRecord file, then its length."""
  file_length = tf.io.gfile.stat(path).length
  offsets = array.array("q")
  position = 0
  buffer, buffer_start = b"", 0
  with tf.io.gfile.GFile(path, "rb") as f, tqdm.tqdm(
      total=file_length, unit="B", unit_scale=True,
      desc=f"indexing {os.path.basename(path)}") as progress:
    while position < file_length:
      if position + _RECORD_HEADER_BYTES > buffer_start + len(buffer):
        f.seek(position)
        buffer, buffer_start = f.read(_SCAN_READ_BYTES), position
        progress.update(position - progress.n)
        if len(buffer) < _RECORD_HEADER_BYTES:
          break
      (length,) = struct.unpack_from("<Q", buffer, position - buffer_start)
      offsets.append(position)
      position += _RECORD_HEADER_BYTES + length + _RECORD_FOOTER_BYTES
    progress.update(file_length - progress.n)
  if position != file_length:
    raise utils.UserError(
        f"{path}: truncated TFRecord file (record {len(offsets)} runs past "
        f"the end at byte {file_length})")
  offsets.append(file_length)
  return np.frombuffer(offsets, dtype=np.int64).copy()


def _local_offsets_path(records_path):
  cache_home = os.environ.get("XDG_CACHE_HOME",
                              os.path.join(os.path.expanduser("~"), ".cache"))
  digest = hashlib.sha1(records_path.encode("utf-8")).hexdigest()[:16]
  return os.path.join(cache_home, "eli5_retrieval", "block_offsets",
                      f"{digest}-{os.path.basename(records_path)}.offsets.npy")


def _read_offsets(path, file_length, num_records):
  """Saved offsets at `path` if they describe the current file, else None."""
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      offsets = np.load(io.BytesIO(f.read()))
  except (tf.errors.OpError, OSError, ValueError):
    return None  # Unreadable or not an offsets file: index again.
  if offsets.shape != (num_records + 1,) or offsets[-1] != file_length:
    return None
  return offsets


def _write_offsets(path, offsets):
  buffer = io.BytesIO()
  np.save(buffer, offsets)
  utils.makedirs(os.path.dirname(path))
  tmp = utils.temporary_path(path)
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)


class _RecordFile:
  """Random access to the records of a TFRecord file of raw UTF-8 records.

  Record offsets are found in one pass over the file and saved beside it
  (`<path>.offsets.npy`), or, when that directory is not writable (e.g. a
  public bucket), under `~/.cache/eli5_retrieval/block_offsets/`; later runs
  read them back. Records are then read with seeks, so only those asked for
  are ever in memory.

  Args:
    path: the TFRecord file.
    num_records: how many records it must hold.
    record_name: what a record is, for errors ("block", "title").
    count_error: fn(records found) -> the UserError message when the count
      differs from `num_records`.
  """

  def __init__(self, path, num_records, record_name, count_error):
    if not tf.io.gfile.exists(path):
      raise utils.UserError(f"{path}: {record_name}s file does not exist")
    self.path = path
    self._record_name = record_name
    file_length = tf.io.gfile.stat(path).length
    candidates = (f"{path}.offsets.npy", _local_offsets_path(path))
    offsets = None
    for offsets_path in candidates:
      offsets = _read_offsets(offsets_path, file_length, num_records)
      if offsets is not None:
        break
    if offsets is None:
      offsets = _scan_record_offsets(path)
      if len(offsets) - 1 != num_records:
        raise utils.UserError(count_error(len(offsets) - 1))
      self._save_offsets(candidates, offsets)
    self._offsets = offsets
    self._file = tf.io.gfile.GFile(path, "rb")

  @staticmethod
  def _save_offsets(candidates, offsets):
    for path in candidates:
      try:
        _write_offsets(path, offsets)
        return
      except (tf.errors.OpError, OSError):
        continue

  def read(self, index):
    """Record `index` as text."""
    start = int(self._offsets[index])
    length = (int(self._offsets[index + 1]) - start - _RECORD_HEADER_BYTES -
              _RECORD_FOOTER_BYTES)
    self._file.seek(start + _RECORD_HEADER_BYTES)
    data = self._file.read(length)
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError as error:
      raise utils.UserError(
          f"{self.path}: {self._record_name} {index} is not UTF-8 text "
          f"({error.reason} at byte {error.start})") from None

  def read_many(self, indices):
    """Records of `indices` (ints, repeats allowed), read in file order."""
    by_index = {index: self.read(index) for index in sorted(set(indices))}
    return [by_index[index] for index in indices]


class BlockStore:
  """Random access to the text and title of any block of a REALM corpus.

  As ORQA's preprocessing writes it: record i of `blocks.tfr` is the text of
  block i (raw UTF-8), record i of the optional `titles.tfr` the title of its
  Wikipedia page. Both are read by record offset (`_RecordFile`).
  """

  def __init__(self, blocks_path, num_blocks, titles_path=None):
    self.num_blocks = num_blocks
    self._texts = _RecordFile(
        blocks_path, num_blocks, "block", lambda found: (
            f"{blocks_path}: holds {found} records, but the retriever config "
            f"claims num_block_records={num_blocks}"))
    self._titles = None
    if titles_path is not None:
      self._titles = _RecordFile(
          titles_path, num_blocks, "title", lambda found: (
              f"{titles_path}: holds {found} titles, but {blocks_path} holds "
              f"{num_blocks} blocks, expected one title per block"))

  def _checked_ids(self, block_ids):
    block_ids = [int(block_id) for block_id in block_ids]
    for block_id in block_ids:
      if not 0 <= block_id < self.num_blocks:
        raise IndexError(f"block id {block_id} not in [0, {self.num_blocks})")
    return block_ids

  def text(self, block_id):
    """The text of `block_id` (its blocks.tfr record)."""
    return self.texts([block_id])[0]

  def texts(self, block_ids):
    """Texts of `block_ids` (any iterable of ints), read in file order."""
    return self._texts.read_many(self._checked_ids(block_ids))

  def title(self, block_id):
    """The page title of `block_id` (its titles.tfr record); None without titles."""
    return self.titles([block_id])[0]

  def titles(self, block_ids):
    """Titles of `block_ids`, as `texts`; Nones without a titles file."""
    block_ids = self._checked_ids(block_ids)
    if self._titles is None:
      return [None] * len(block_ids)
    return self._titles.read_many(block_ids)
