"""Live retrieval: each question's neighbours retrieved as the pipeline runs, not read from a cache.

  retrieval = live_retrieval.open_retrieval(config.retrieval, tokenizer)
  found = retrieval.retrieve(["why is the sky blue"], k=100)
  found.block_ids, found.scores, found.token_ids

The approach `live_retrieval` reads the questions and answers of a cache's
shards (any depth: a cache made with `--num_neighbours=0` has none) and
replaces their neighbours with these: the same fields `neighbour_cache`
records (`neighbour_block_ids`, `neighbour_scores`, the blocks' GPT-2 ids),
so contexts are drawn and laid out exactly as `cached_pretok` draws them
from a cache of depth `live_num_neighbours`.

Two sources answer `retrieve`: `LocalRetrieval` (REALM's embedder and an
exact or ScaNN search in this process, `retrievers.LiveRetriever`) and the
client of `retrieval_server.py` (`retrieval_client.RemoteRetrieval`), which
holds the block embeddings and the index once for many jobs. Both name what
they serve by an index version: a hash of the embedder and block
embeddings, the search config and how block ids are made, which a run
records and checks when it resumes. A retriever config of an index root
(refresh_index.py's) is read as the version its CURRENT names when the
retrieval loads; the run records that version's name too (`index_name`).
"""

import dataclasses
import hashlib
import json
import os
import threading
import typing

import numpy as np
import tensorflow as tf

import neighbour_cache
import settings
import utils

setting = settings.setting

# retrievers.SEARCH_KINDS, restated so that a job imports retrievers (and
# tensorflow_text) only when it retrieves (`open_retrieval`).
SEARCH_KINDS = ("exact", "scann")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  """Where a `live_retrieval` run's neighbours come from."""
  retrieval_server: typing.Optional[str] = setting(
      None,
      "live_retrieval: http://host:port of a running retrieval_server.py; "
      "without it, retrieval runs in this process from "
      "--retriever_config_path.")
  retriever_config_path: typing.Optional[str] = setting(
      None,
      "Retrieval in this process (and retrieval_server.py): the retriever config JSON "
      "(configs/retriever_configs/*.json).")
  search: str = setting(
      "exact",
      "Retrieval in this process (and retrieval_server.py): exact (brute force over every block) "
      "or scann (needs --scann_config_path).", choices=SEARCH_KINDS)
  scann_config_path: typing.Optional[str] = setting(
      None, "live_retrieval, --search=scann: the ScaNN config JSON.")
  scann_index_dir: typing.Optional[str] = setting(
      None,
      "--search=scann: load the ScaNN index from here, or save the one "
      "built here.")
  block_token_store: typing.Optional[str] = setting(
      None,
      "Retrieval in this process (and retrieval_server.py): the blocks' GPT-2 ids from this "
      "pre-tokenised store (util_scripts/pretokenize_blocks.py) instead of "
      "tokenizing the neighbours as they come.")
  live_num_neighbours: int = setting(
      100,
      "live_retrieval: neighbours retrieved per question; contexts are drawn "
      "from them as from a cache of this depth.")
  max_block_tokens: int = setting(
      256, "Retrieval in this process (and retrieval_server.py): GPT-2 tokens kept of each block.")
  context_with_title: bool = setting(
      False,
      "Retrieval in this process (and retrieval_server.py): each block as 'title: text' (needs "
      "the retriever config's title_records).")
  max_query_length: int = setting(
      0,
      "Retrieval in this process (and retrieval_server.py): wordpieces of each question given to "
      "the REALM embedder, [CLS] and [SEP] included; 0: all (as ORQA).")
  retrieval_batch_size: int = setting(
      32, "live_retrieval: questions retrieved at once.")
  retrieval_timeout_seconds: float = setting(
      30.0,
      "live_retrieval through a server: give up on a request (retries "
      "included) after this many seconds, with a one-line error.")


@dataclasses.dataclass(frozen=True)
class Neighbours:
  """The neighbours of Q questions, best first.

  scores: float32 [Q, K]; block_ids: int64 [Q, K]; token_ids: Q lists of K
  lists of GPT-2 ids (each block as the layout reads it).
  """
  scores: np.ndarray
  block_ids: np.ndarray
  token_ids: list


def index_version(*, embedder_path, search, tokenizer_fingerprint,
                  max_block_tokens, context_with_title, max_query_length):
  """A hash of what decides a question's neighbours and their GPT-2 ids.

  The embedder's directory is read whole (REALM keeps the block embeddings
  in it, `encoded/`), so a re-encoded corpus is another version.
  """
  digest = hashlib.sha256()
  update_with_directory(digest, embedder_path)
  digest.update(json.dumps({
      "search": search, "tokenizer": tokenizer_fingerprint,
      "max_block_tokens": max_block_tokens,
      "context_with_title": context_with_title,
      "max_query_length": max_query_length}, sort_keys=True).encode("utf-8"))
  return digest.hexdigest()[:16]


def files_under(directory, skip=()):
  """Every file under `directory` (local or gs://), but under its
  subdirectories named in `skip` (names relative to `directory`)."""
  for root, _, names in tf.io.gfile.walk(directory):
    relative = os.path.relpath(root, directory)
    if relative.split(os.sep)[0] in skip:
      continue
    for name in names:
      yield os.path.join(root, name)


def update_with_directory(digest, directory, skip=()):
  """Feeds `digest` (a hashlib object) every file's relative path and bytes,
  in path order (`files_under`'s `skip` left out)."""
  for path in sorted(files_under(directory, skip)):
    digest.update(os.path.relpath(path, directory).encode("utf-8"))
    with tf.io.gfile.GFile(path, "rb") as f:
      for chunk in iter(lambda: f.read(16 << 20), b""):
        digest.update(chunk)


class LocalRetrieval:
  """REALM retrieval in this process: embedder, search, the blocks' GPT-2 ids.

  Safe to call from several threads (tf.data's): one retrieval at a time.
  """

  def __init__(self, config, tokenizer, *, devices=None):
    import retrievers  # pylint: disable=g-import-not-at-top
    import token_store  # pylint: disable=g-import-not-at-top
    if not config.retriever_config_path:
      raise utils.UserError(
          "--approach_type=live_retrieval needs --retrieval_server or "
          "--retriever_config_path")
    if config.max_block_tokens < 1:
      raise utils.UserError(f"--max_block_tokens={config.max_block_tokens}: "
                            "must be at least 1")
    retriever_config = retrievers.load_retriever_config(
        config.retriever_config_path,
        context_with_title=config.context_with_title)
    if config.search == "scann":
      if not config.scann_config_path:
        raise utils.UserError("--search=scann needs --scann_config_path")
      scann_config = retrievers.load_scann_config(config.scann_config_path)
      search = dict(scann_config, kind="scann")
    else:
      scann_config, search = None, {"kind": "exact"}
    self._retriever = retrievers.LiveRetriever(
        retriever_config, config.search, scann_config=scann_config,
        scann_index_dir=config.scann_index_dir, devices=devices,
        max_query_length=config.max_query_length)
    self._block_tokens = token_store.block_tokens(
        tokenizer, self._retriever.blocks, config.max_block_tokens,
        with_title=config.context_with_title,
        store_dir=config.block_token_store)
    self.num_blocks = self._retriever.num_blocks
    self._lock = threading.Lock()
    self.description = {
        "source": config.retriever_config_path,
        # The index root (refresh_index.py) and its version served; None
        # for a plain retriever config.
        "index_root": retriever_config.get("index_root"),
        "index_name": retriever_config.get("index_name"),
        "index_version": index_version(
            embedder_path=retriever_config["query_embedder_path"],
            search=search,
            tokenizer_fingerprint=neighbour_cache.tokenizer_fingerprint(
                tokenizer),
            max_block_tokens=config.max_block_tokens,
            context_with_title=config.context_with_title,
            max_query_length=config.max_query_length),
        "num_blocks": self.num_blocks, "search": search,
        "max_block_tokens": config.max_block_tokens,
        "context_with_title": config.context_with_title,
        "max_query_length": config.max_query_length,
    }

  @property
  def index_version(self):
    return self.description["index_version"]

  def embed(self, questions):
    """float32 [Q, D] REALM query embeddings."""
    with self._lock:
      return self._retriever.embedder.embed(list(questions))

  def search_vectors(self, query_embeddings, k, with_token_ids=True):
    """`Neighbours` of query embeddings float32 [Q, D] (token_ids None
    without `with_token_ids`)."""
    with self._lock:
      scores, block_ids = self._retriever.search(query_embeddings, k)
      token_ids = None
      if with_token_ids:
        flat = self._block_tokens.token_ids(block_ids.reshape(-1))
        token_ids = [flat[row * k:(row + 1) * k]
                     for row in range(block_ids.shape[0])]
    return Neighbours(scores=scores, block_ids=block_ids, token_ids=token_ids)

  def retrieve(self, questions, k):
    """`Neighbours` of question texts."""
    return self.search_vectors(self.embed(questions), k)

  def titles(self, block_ids):
    with self._lock:
      return self._retriever.blocks.titles(block_ids)


class FailFast:
  """A retrieval whose calls all fail at once after one has failed.

  The input pipeline runs ahead of training: without this, each element it
  prefetches would wait out the client's timeout again, and a checkpoint
  (which waits for the elements in flight) with them. `failure` is the
  first failure, for the trainer to stop on.
  """

  def __init__(self, retrieval):
    self._retrieval = retrieval
    self.failure = None

  def __getattr__(self, name):
    return getattr(self._retrieval, name)

  def retrieve(self, questions, k):
    if self.failure is not None:
      raise self.failure
    try:
      return self._retrieval.retrieve(questions, k)
    except utils.UserError as error:
      self.failure = error
      raise


def open_retrieval(config, tokenizer, *, devices=None):
  """The retrieval `config` (a `RetrievalConfig`) asks for, `FailFast`: the
  server's client, or `LocalRetrieval`."""
  if config.live_num_neighbours < 1:
    raise utils.UserError(f"--live_num_neighbours={config.live_num_neighbours}"
                          ": must be at least 1")
  if config.retrieval_batch_size < 1:
    raise utils.UserError(
        f"--retrieval_batch_size={config.retrieval_batch_size}: must be at "
        "least 1")
  if config.retrieval_server:
    import retrieval_client  # pylint: disable=g-import-not-at-top
    return FailFast(retrieval_client.RemoteRetrieval(
        config.retrieval_server, tokenizer,
        timeout_seconds=config.retrieval_timeout_seconds))
  return FailFast(LocalRetrieval(config, tokenizer, devices=devices))


# What names the neighbours a retrieval gives (a run and a generation record
# it), whichever source serves them.
RECORDED = ("index_version", "index_name", "num_blocks", "search",
            "max_block_tokens", "context_with_title", "max_query_length")


def recorded(retrieval):
  """The description a job records of its retrieval: `RECORDED` and the
  source."""
  description = retrieval.description
  return {"source": description.get("source"),
          **{name: description.get(name) for name in RECORDED}}


def check_recorded(retrieval, record, where):
  """Refuses a retrieval whose index is not the one a run recorded."""
  found = retrieval.description["index_version"]
  if record and record.get("index_version") != found:
    raise utils.UserError(
        f"{where}: the run retrieved from index version "
        f"{record.get('index_version')} ({record.get('source')}), but "
        f"{retrieval.description.get('source')} serves {found}; use the same "
        "embedder, blocks, search and tokenizer to resume")


# ---------------------------------------------------------------------------
# In the input pipeline
# ---------------------------------------------------------------------------


def with_live_neighbours(records, retrieval, num_neighbours, batch_size):
  """(epoch, serialised cache record) -> (epoch, parsed example) whose
  neighbours were retrieved now (`neighbour_cache.parse_example`'s fields).

  Questions are retrieved `batch_size` at a time, in the stream's order.
  """

  @utils.reporting_user_errors
  def retrieve(questions):
    found = retrieval.retrieve(
        [question.decode("utf-8") for question in questions.numpy()],
        num_neighbours)
    blocks = [block for row in found.token_ids for block in row]
    return (found.block_ids.astype(np.int64), found.scores.astype(np.float32),
            np.array([i for block in blocks for i in block], np.int32),
            np.array([len(block) for block in blocks], np.int64))

  @tf.autograph.experimental.do_not_convert
  def add_neighbours(epochs, serialized):
    questions = tf.io.parse_example(serialized, {
        "question": tf.io.FixedLenFeature([], tf.string)})["question"]
    block_ids, scores, flat_ids, lengths = tf.py_function(
        retrieve, [questions], [tf.int64, tf.float32, tf.int32, tf.int64])
    block_ids.set_shape([None, num_neighbours])
    scores.set_shape([None, num_neighbours])
    neighbours = tf.RaggedTensor.from_uniform_row_length(
        tf.RaggedTensor.from_row_lengths(flat_ids, lengths), num_neighbours)
    return epochs, serialized, block_ids, scores, neighbours

  @tf.autograph.experimental.do_not_convert
  def parse(epoch, serialized, block_ids, scores, neighbours):
    example = neighbour_cache.parse_example(serialized)
    example.update(neighbour_block_ids=block_ids, neighbour_scores=scores,
                   neighbours=neighbours)
    return epoch, example

  return records.batch(batch_size).map(add_neighbours).unbatch().map(
      parse, num_parallel_calls=tf.data.AUTOTUNE)


def pipeline_options():
  """tf.data options of a pipeline that retrieves: the retrieval is a Python
  call (not state of the iterator), so a checkpoint may leave it out; a
  restored iterator retrieves the next questions again, with the same
  result."""
  options = tf.data.Options()
  options.experimental_external_state_policy = (
      tf.data.experimental.ExternalStatePolicy.IGNORE)
  return options
