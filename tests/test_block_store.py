"""The block store: blocks.tfr and titles.tfr read by record offset, offsets saved, bad files."""

import os

import numpy as np
import pytest
import tensorflow as tf

import block_store
import retrieval_fixtures
import retrievers
import utils


def test_block_store_reads_by_offset_and_saves_offsets(tmp_path,
                                                       monkeypatch):
  texts = retrieval_fixtures.block_texts(30)
  texts[7] = "x" * 100000  # Longer than one read of the scan.
  path = str(tmp_path / "blocks.tfr")
  retrieval_fixtures.write_blocks(path, texts)
  store = block_store.BlockStore(path, 30)
  assert store.text(5) == texts[5]
  # No titles file: no title is made up.
  assert store.title(5) is None and store.titles([5, 6]) == [None, None]
  assert store.texts([29, 7, 0, 7]) == [texts[29], texts[7], texts[0],
                                        texts[7]]
  offsets = np.load(path + ".offsets.npy")
  assert offsets.shape == (31,) and offsets[-1] == os.path.getsize(path)

  def no_scan(path):
    raise AssertionError(f"{path} scanned again")

  with monkeypatch.context() as patch:
    patch.setattr(block_store, "_scan_record_offsets", no_scan)
    assert block_store.BlockStore(path, 30).text(29) == texts[29]
  # A changed file is indexed again.
  retrieval_fixtures.write_blocks(path, texts[:29] + ["new last"])
  assert block_store.BlockStore(path, 30).text(29) == "new last"


def test_block_store_titles_come_from_titles_tfr(tmp_path, monkeypatch):
  # The fixture's directory is read-only: offsets go to the cache dir.
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  config = retrievers.load_retriever_config(os.path.join(
      retrieval_fixtures.REALM_TF1_HUB, "retriever_config.json"))
  read = lambda path: [record.decode("utf-8") for record in
                       tf.data.TFRecordDataset(path).as_numpy_iterator()]
  titles, texts = read(config["title_records"]), read(config["text_records"])
  store = block_store.BlockStore(config["text_records"], 8,
                                titles_path=config["title_records"])
  assert [store.title(i) for i in range(8)] == titles
  assert store.titles([6, 0, 6]) == [titles[6], titles[0], titles[6]]
  assert store.texts(range(8)) == texts
  assert titles[6] == "Café"  # Non-ASCII, as written by ORQA.
  without = block_store.BlockStore(config["text_records"], 8)
  assert without.title(0) is None and without.text(0) == texts[0]
  with pytest.raises(IndexError):
    store.title(8)


def test_block_store_refuses_titles_of_another_count(tmp_path):
  blocks, titles = str(tmp_path / "blocks.tfr"), str(tmp_path / "titles.tfr")
  retrieval_fixtures.write_blocks(blocks, ["a", "b", "c"])
  retrieval_fixtures.write_blocks(titles, ["A", "B"])
  with pytest.raises(utils.UserError) as error:
    block_store.BlockStore(blocks, 3, titles_path=titles)
  assert str(error.value) == (
      f"{titles}: holds 2 titles, but {blocks} holds 3 blocks, expected one "
      "title per block")
  with pytest.raises(utils.UserError, match="titles file does not exist"):
    block_store.BlockStore(blocks, 3, titles_path=str(tmp_path / "none.tfr"))


def test_block_store_falls_back_to_a_local_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  path = str(tmp_path / "blocks.tfr")
  retrieval_fixtures.write_blocks(path, ["a b", "c d"])
  # A directory where the offsets file would go: beside the data is not
  # writable.
  os.makedirs(path + ".offsets.npy")
  assert block_store.BlockStore(path, 2).texts([1, 0]) == ["c d", "a b"]
  saved = [name for _, _, names in os.walk(tmp_path / "cache")
           for name in names]
  assert saved == [next(n for n in saved if n.endswith(
      "blocks.tfr.offsets.npy"))]
  assert block_store.BlockStore(path, 2).text(0) == "a b"


def test_block_store_bad_files(tmp_path):
  path = str(tmp_path / "blocks.tfr")
  retrieval_fixtures.write_blocks(path, ["a", b"\xff\xfe not utf-8", "c"])
  with pytest.raises(utils.UserError, match="holds 3 records, but .* claims "
                     "num_block_records=4"):
    block_store.BlockStore(path, 4)
  assert not os.path.exists(path + ".offsets.npy")
  store = block_store.BlockStore(path, 3)
  with pytest.raises(utils.UserError, match="block 1 is not UTF-8"):
    store.texts([0, 1])
  with open(path, "rb") as f:
    data = f.read()
  truncated = str(tmp_path / "truncated.tfr")
  with open(truncated, "wb") as f:
    f.write(data[:-3])
  with pytest.raises(utils.UserError, match="truncated TFRecord"):
    block_store.BlockStore(truncated, 3)
  with pytest.raises(utils.UserError, match="does not exist"):
    block_store.BlockStore(str(tmp_path / "missing.tfr"), 3)
