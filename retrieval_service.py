"""The retrieval service: one REALM index held once, shared by many jobs over HTTP.

  python retrieval_server.py --retriever_config_path=RETRIEVER.json \
      --tokenizer=gpt2 [--search=scann --scann_config_path=...] [--port=8765]

loads a `live_retrieval.LocalRetrieval` once (the query embedder, the block
embeddings with an exact or ScaNN search, the blocks' GPT-2 ids) and serves

- `POST /search` {"questions": [str, ...]} or {"query_vectors": [[float,
  ...], ...]} (exactly one), "k": int, "with_token_ids": bool (default
  true), "with_titles": bool (default false) -> {"block_ids": [[int]],
  "scores": [[float]], "token_ids": [[[int]]], "titles": [[str]],
  "index_version": str}. Scores are float32 written as the doubles equal to
  them, so they read back to the same float32. With "token_ids_format":
  "int32_base64" the GPT-2 ids come as "token_ids_int32_base64" (every id,
  row by row, block by block, little-endian int32, base64) and
  "token_lengths" [[int]] instead: parsing millions of JSON numbers costs
  more than the search (`retrieval_client` asks for this).
- `GET /health` -> {"ready": true, "index_version", "num_blocks",
  "embedding_dim", "tokenizer_fingerprint", "search", ...}: what a client
  checks before it trusts the answers (`retrieval_client.RemoteRetrieval`).

`LocalRetrieval` answers one call at a time, so concurrent requests are
queued and one worker thread answers all that are waiting (up to
`--max_batch_questions` questions) with one embed and one search. A bad
request is a 4xx with {"error": "one line"} and never reaches the worker;
the server goes on serving. The port is bound before the index loads (a
port in use is refused at once) and listens once it has loaded, when the
server prints one line: `READY_LINE_PREFIX` + its URL and index version.

Served from an index root (a retriever config {"index_root": ...}, which
refresh_index.py writes), the server reads the root's CURRENT every
`--reload_seconds` and, when it names a new version, loads it beside the one
serving and swaps it in between two batches (`IndexReloader`): no request
is dropped, each answer names the version that answered it, and /health
describes the new one. A client started on the old version refuses the new
one's answers (`retrieval_client`): a job records the index it used.
"""

import asyncio
import base64
import concurrent.futures
import dataclasses
import itertools
import json
import math
import queue
import socket
import threading
import time
import typing

from absl import logging
import fastapi
from fastapi import responses
import numpy as np
from starlette import exceptions as starlette_exceptions
import uvicorn

import live_retrieval
import neighbour_cache
import retrievers
import settings
import task_specific
import utils

setting = settings.setting

READY_LINE_PREFIX = "retrieval server ready: "
# RetrievalConfig's settings of a job that uses a server, not of the server.
CLIENT_ONLY_FLAGS = ("retrieval_server", "live_num_neighbours",
                     "retrieval_batch_size", "retrieval_timeout_seconds")
SEARCH_FIELDS = ("questions", "query_vectors", "k", "with_token_ids",
                 "token_ids_format", "with_titles")
TOKEN_IDS_FORMATS = ("lists", "int32_base64")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """Every setting of retrieval_server.py (its flags; the retrieval's are
  `live_retrieval.RetrievalConfig`'s, but for `CLIENT_ONLY_FLAGS`)."""
  retrieval: live_retrieval.RetrievalConfig = live_retrieval.RetrievalConfig()
  tokenizer: str = setting(
      "gpt2",
      "GPT-2 tokenizer of the blocks' ids served: a Hugging Face hub key or a "
      "local directory; clients with another tokenizer are refused.")
  host: str = setting(
      "127.0.0.1",
      "Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every "
      "interface).")
  port: int = setting(8765, "Port to listen on; 0: a free one, printed in "
                      "the ready line.")
  max_request_questions: int = setting(
      1024, "Questions (or query vectors) one request may carry; more: 413.")
  max_request_bytes: int = setting(
      8 << 20, "Bytes one request body may have; more: 413.")
  max_batch_questions: int = setting(
      256,
      "Questions of concurrent requests answered together by one embed and "
      "one search (a larger request is answered alone).")
  reload_seconds: float = setting(
      10.0,
      "With a retriever config of an index root (refresh_index.py): read its "
      "CURRENT every this many seconds and serve a new version once it has "
      "loaded (memory for two meanwhile), without dropping requests; 0: "
      "never.")
  warm_up_k: int = setting(
      100,
      "Before it listens, the server searches once for this many neighbours "
      "(at most the blocks), so that clients asking for as many do not wait "
      "for TensorFlow to trace the search; 0: no warm-up.")


class BadRequest(Exception):
  """A request refused with HTTP `status` and a one-line reason."""

  def __init__(self, status, reason):
    super().__init__(reason)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
  """What a request may ask of this server."""
  max_k: int
  max_k_reason: str  # What bounds k, for the message.
  embedding_dim: int
  max_request_questions: int
  max_request_bytes: int
  has_titles: bool


@dataclasses.dataclass(frozen=True)
class SearchRequest:
  """A checked `POST /search`: `questions` (list of str) or `query_vectors`
  (float32 [Q, D]), the other None."""
  questions: typing.Optional[list]
  query_vectors: typing.Optional[np.ndarray]
  k: int
  with_token_ids: bool
  token_ids_format: str
  with_titles: bool

  @property
  def num_queries(self):
    if self.questions is not None:
      return len(self.questions)
    return self.query_vectors.shape[0]


# ---------------------------------------------------------------------------
# Requests: checked before they are queued
# ---------------------------------------------------------------------------


def parse_search_request(body, limits):
  """The `SearchRequest` of a request body (bytes); a `BadRequest` naming
  the field and what was expected otherwise."""
  if len(body) > limits.max_request_bytes:
    raise _oversize_body(len(body), limits)
  try:
    fields = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise BadRequest(400, f"request body: not JSON ({_error_line(error)}), "
                     "expected a JSON object") from None
  if not isinstance(fields, dict):
    raise BadRequest(400, f"request body: a JSON {type(fields).__name__}, "
                     "expected a JSON object")
  unknown = sorted(set(fields) - set(SEARCH_FIELDS))
  if unknown:
    raise BadRequest(400, f"unknown field(s) {', '.join(unknown)}; expected "
                     f"{', '.join(SEARCH_FIELDS)}")
  if ("questions" in fields) == ("query_vectors" in fields):
    raise BadRequest(400, "expected exactly one of questions and "
                     "query_vectors")
  questions = query_vectors = None
  if "questions" in fields:
    questions = _questions(fields["questions"], limits)
  else:
    query_vectors = _query_vectors(fields["query_vectors"], limits)
  return SearchRequest(
      questions=questions, query_vectors=query_vectors,
      k=_k(fields.get("k"), limits),
      with_token_ids=_flag(fields, "with_token_ids", True),
      token_ids_format=_token_ids_format(fields),
      with_titles=_titles_flag(fields, limits))


def _error_line(error):
  return utils.error_reason(error, limit=120)


def _oversize_body(num_bytes, limits):
  return BadRequest(413, f"request body: {num_bytes} bytes, expected at most "
                    f"{limits.max_request_bytes} (--max_request_bytes)")


def _checked_count(name, values, limits):
  if not isinstance(values, list) or not values:
    raise BadRequest(400, f"{name}: expected a non-empty list")
  if len(values) > limits.max_request_questions:
    raise BadRequest(413, f"{name}: {len(values)} in one request, expected at "
                     f"most {limits.max_request_questions} "
                     "(--max_request_questions)")


def _questions(questions, limits):
  _checked_count("questions", questions, limits)
  for index, question in enumerate(questions):
    if not isinstance(question, str):
      raise BadRequest(400, f"questions[{index}]: a "
                       f"{type(question).__name__}, expected a string")
  return questions


def _is_number(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _query_vectors(vectors, limits):
  _checked_count("query_vectors", vectors, limits)
  width = limits.embedding_dim
  for index, vector in enumerate(vectors):
    if not isinstance(vector, list) or len(vector) != width:
      found = (f"{len(vector)} numbers" if isinstance(vector, list)
               else f"a {type(vector).__name__}")
      raise BadRequest(400, f"query_vectors[{index}]: {found}, expected a "
                       f"list of {width} numbers (the embedding width)")
    if not all(_is_number(value) and math.isfinite(value)
               for value in vector):
      raise BadRequest(400, f"query_vectors[{index}]: expected finite numbers "
                       "only")
  return np.asarray(vectors, np.float32)


def _k(k, limits):
  if not isinstance(k, int) or isinstance(k, bool):
    raise BadRequest(400, f"k: {json.dumps(k)}, expected an integer (the "
                     "neighbours per question)")
  if not 1 <= k <= limits.max_k:
    raise BadRequest(400, f"k: {k}, expected 1 to {limits.max_k} "
                     f"({limits.max_k_reason})")
  return k


def _flag(fields, name, default):
  value = fields.get(name, default)
  if not isinstance(value, bool):
    raise BadRequest(400, f"{name}: {json.dumps(value)}, expected true or "
                     "false")
  return value


def _token_ids_format(fields):
  value = fields.get("token_ids_format", "lists")
  if value not in TOKEN_IDS_FORMATS:
    raise BadRequest(400, f"token_ids_format: {json.dumps(value)}, expected "
                     f"one of {', '.join(TOKEN_IDS_FORMATS)}")
  return value


def _titles_flag(fields, limits):
  with_titles = _flag(fields, "with_titles", False)
  if with_titles and not limits.has_titles:
    raise BadRequest(400, "with_titles: this server's retriever config has "
                     "no title_records, expected with_titles false")
  return with_titles


# ---------------------------------------------------------------------------
# Answers: concurrent requests batched into one embed + one search
# ---------------------------------------------------------------------------


def answer_batch(retrieval, requests):
  """The answer (a JSON-ready dict) of each request, from one embed of all
  their questions and one search of all their vectors at the largest k."""
  texts = [question for request in requests if request.questions is not None
           for question in request.questions]
  embedded = retrieval.embed(texts) if texts else None
  vectors, used = [], 0
  for request in requests:
    if request.questions is None:
      vectors.append(request.query_vectors)
    else:
      vectors.append(embedded[used:used + len(request.questions)])
      used += len(request.questions)
  found = retrieval.search_vectors(
      np.concatenate(vectors), max(request.k for request in requests),
      with_token_ids=any(request.with_token_ids for request in requests))
  answers, row = [], 0
  for request in requests:
    rows = slice(row, row + request.num_queries)
    row += request.num_queries
    block_ids = found.block_ids[rows, :request.k]
    answer = {
        "block_ids": block_ids.tolist(),
        # float32 -> the double equal to it: JSON reads back the same float32.
        "scores": found.scores[rows, :request.k].astype(np.float64).tolist(),
        "index_version": retrieval.index_version}
    if request.with_token_ids:
      answer.update(_token_ids_answer(
          [ids[:request.k] for ids in found.token_ids[rows]],
          request.token_ids_format))
    if request.with_titles:
      titles = retrieval.titles(block_ids.reshape(-1))
      answer["titles"] = [titles[i:i + request.k]
                          for i in range(0, len(titles), request.k)]
    answers.append(answer)
  return answers


def _token_ids_answer(token_ids, token_ids_format):
  """The fields of the GPT-2 ids (Q lists of k id lists) in the format."""
  if token_ids_format == "lists":
    return {"token_ids": token_ids}
  flat = np.fromiter(itertools.chain.from_iterable(
      itertools.chain.from_iterable(token_ids)), np.dtype("<i4"))
  return {"token_ids_int32_base64": base64.b64encode(
      flat.tobytes()).decode("ascii"),
          "token_lengths": [[len(ids) for ids in row] for row in token_ids]}


class SearchBatcher:
  """A worker thread that answers the queued requests, as many at a time as
  fit `max_batch_questions` (a request is never split).

  `swap` replaces the retrieval (and the /health that describes it) between
  two batches: a batch is answered by one retrieval, the requests waiting
  stay queued, and none is dropped.
  """

  def __init__(self, retrieval, max_batch_questions, health=None):
    # (retrieval, its /health), replaced as one by `swap`.
    self._served = (retrieval, health)
    self._max_batch_questions = max_batch_questions
    self._queue = queue.Queue()
    self._held = None  # Taken from the queue, but did not fit the last batch.
    self._thread = threading.Thread(target=self._work, daemon=True,
                                    name="retrieval-batcher")
    self._thread.start()

  @property
  def health(self):
    """GET /health's answer for the retrieval now serving."""
    return self._served[1]

  def swap(self, retrieval, health):
    """Answers the batches after the one in progress from `retrieval`."""
    # One assignment (atomic under the GIL): a batch, or a /health, sees the
    # old pair or the new one.
    self._served = (retrieval, health)

  def submit(self, request):
    """A `concurrent.futures.Future` of the request's answer."""
    future = concurrent.futures.Future()
    self._queue.put((request, future))
    return future

  def _next_batch(self):
    batch = [self._held or self._queue.get()]
    self._held = None
    size = batch[0][0].num_queries
    while size < self._max_batch_questions:
      try:
        item = self._queue.get_nowait()
      except queue.Empty:
        break
      if size + item[0].num_queries > self._max_batch_questions:
        self._held = item
        break
      batch.append(item)
      size += item[0].num_queries
    # Requests whose client went away are dropped here.
    return [(request, future) for request, future in batch
            if future.set_running_or_notify_cancel()]

  def _work(self):
    while True:
      batch = self._next_batch()
      if not batch:
        continue
      retrieval, _ = self._served
      try:
        answers = answer_batch(retrieval, [request for request, _ in batch])
      except Exception as error:  # pylint: disable=broad-except
        # Reported to each request of the batch; the worker goes on.
        for _, future in batch:
          future.set_exception(error)
        continue
      for (_, future), answer in zip(batch, answers):
        future.set_result(answer)


# ---------------------------------------------------------------------------
# The HTTP application
# ---------------------------------------------------------------------------


def _error_response(status, reason):
  return responses.JSONResponse({"error": reason}, status_code=status)


async def _read_body(request, limits):
  """The request's body, refused (413) as soon as it exceeds the limit."""
  declared = request.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limits.max_request_bytes:
    raise _oversize_body(int(declared), limits)
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > limits.max_request_bytes:
      raise _oversize_body(len(body), limits)
  return bytes(body)


def create_app(limits, batcher):
  """The FastAPI app: requests checked against `limits`, answered by
  `batcher` (the only caller of the retrieval), its `health` as GET
  /health."""
  app = fastapi.FastAPI(title="REALM retrieval", docs_url=None,
                        redoc_url=None, openapi_url=None)

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def http_error(request, error):
    return _error_response(
        error.status_code, f"{request.method} {request.url.path}: "
        f"{error.detail}; expected POST /search or GET /health")

  @app.get("/health")
  async def health_check():
    return responses.JSONResponse(batcher.health)

  @app.post("/search")
  async def search(request: fastapi.Request):
    try:
      search_request = parse_search_request(
          await _read_body(request, limits), limits)
    except BadRequest as error:
      return _error_response(error.status, str(error))
    try:
      answer = await asyncio.wrap_future(batcher.submit(search_request))
    except utils.UserError as error:
      return _error_response(400, str(error))
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("search failed")
      return _error_response(500, f"search failed: {_error_line(error)}")
    return responses.JSONResponse(answer)

  return app


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------


def check_config(config):
  """Refuses settings the server cannot start with, before anything loads."""
  if not config.retrieval.retriever_config_path:
    raise utils.UserError("--retriever_config_path is required (the "
                          "retriever config JSON of the index to serve)")
  if not 0 <= config.port <= 65535:
    raise utils.UserError(f"--port={config.port}: expected 0 to 65535")
  for name in ("max_request_questions", "max_request_bytes",
               "max_batch_questions"):
    if getattr(config, name) < 1:
      raise utils.UserError(f"--{name}={getattr(config, name)}: must be at "
                            "least 1")
  if config.reload_seconds < 0:
    raise utils.UserError(f"--reload_seconds={config.reload_seconds}: must "
                          "be at least 0")
  if config.warm_up_k < 0:
    raise utils.UserError(f"--warm_up_k={config.warm_up_k}: must be at least "
                          "0")


def bound_socket(host, port):
  """A TCP socket bound to (host, port), not yet listening."""
  try:
    family, kind, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)[0]
  except socket.gaierror as error:
    raise utils.UserError(f"--host={host}: cannot be resolved "
                          f"({error.strerror})") from None
  sock = socket.socket(family, kind)
  # A restarted server takes its port back at once (no TIME_WAIT wait).
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as error:
    sock.close()
    raise utils.UserError(f"--host={host} --port={port}: cannot listen there "
                          f"({error.strerror})") from None
  return sock


def url_of(sock):
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def health_of(retrieval, tokenizer, config):
  """GET /health's answer: the retrieval's description and what a client
  needs to check and size its requests."""
  return {
      "ready": True, **retrieval.description,
      "embedding_dim": int(retrieval.embed([""]).shape[1]),
      "tokenizer_fingerprint": neighbour_cache.tokenizer_fingerprint(
          tokenizer),
      "titles": retrieval.titles([0])[0] is not None,
      "max_request_questions": config.max_request_questions,
      "max_request_bytes": config.max_request_bytes,
  }


def max_k_of(num_blocks, search):
  """{max_k, max_k_reason}: the most neighbours a search of `search` (the
  description's) answers; ScaNN's reordering is checked here, not in a
  batch, where it would fail the other requests too."""
  reordering = search.get("reordering_num_neighbors")
  if search["kind"] == "scann" and reordering and reordering < num_blocks:
    return {"max_k": reordering,
            "max_k_reason": "the ScaNN config's reordering_num_neighbors"}
  return {"max_k": num_blocks, "max_k_reason": "the number of blocks"}


def load_index(config, tokenizer):
  """(retrieval, its /health, the `Limits` of requests to it) of the index
  `config` (a `ServerConfig`) names, warmed up."""
  retrieval = live_retrieval.LocalRetrieval(config.retrieval, tokenizer)
  health = health_of(retrieval, tokenizer, config)
  limits = Limits(**max_k_of(retrieval.num_blocks, health["search"]),
                  embedding_dim=health["embedding_dim"],
                  max_request_questions=config.max_request_questions,
                  max_request_bytes=config.max_request_bytes,
                  has_titles=health["titles"])
  health["max_k"] = limits.max_k
  if config.warm_up_k:
    retrieval.search_vectors(
        np.zeros([1, health["embedding_dim"]], np.float32),
        min(config.warm_up_k, limits.max_k), with_token_ids=False)
  return retrieval, health, limits


class IndexReloader:
  """Serves each new version of an index root (refresh_index.py's) once it
  has loaded, without dropping a request.

  `reload_if_changed` reads the root's CURRENT; a version other than the one
  served is loaded beside it (the old one answers meanwhile: memory for
  both), checked to take the same requests (`Limits`: the same blocks,
  width, titles and k), and swapped into the batcher between two batches. A
  version that does not load or takes other requests is reported once and
  skipped; the old one goes on serving.
  """

  def __init__(self, config, tokenizer, batcher, limits, health):
    self._config = config
    self._tokenizer = tokenizer
    self._batcher = batcher
    self._limits = limits
    self._root = health["index_root"]
    self._served_name = health["index_name"]
    self._last_problem = None

  def start(self, stopped):
    """Reloads every `config.reload_seconds` on a thread of its own, until
    `stopped()` is true."""
    threading.Thread(target=self._watch, args=(stopped,), daemon=True,
                     name="index-reloader").start()

  def reload_if_changed(self):
    """Swaps in the root's current version if it is another; returns
    whether it did."""
    try:
      name = retrievers.current_index_name(self._root)
      if name == self._served_name:
        return False
      retrieval, health, limits = load_index(self._config, self._tokenizer)
      if limits != self._limits:
        raise utils.UserError(
            f"version {health['index_name']} takes other requests ({limits}) "
            f"than the version served ({self._limits}); another index needs "
            "another server")
    except utils.UserError as error:
      self._report(f"retrieval server: not reloading {self._root} "
                   f"({error}); still serving version {self._served_name}")
      return False
    self._batcher.swap(retrieval, health)
    self._served_name = health["index_name"]
    self._last_problem = None
    print(f"retrieval server: now serving index version "
          f"{retrieval.index_version} ({self._served_name} of {self._root})",
          flush=True)
    return True

  def _report(self, problem):
    """Prints `problem`, unless it is the one printed last (a poll finds it
    again and again)."""
    if problem != self._last_problem:
      print(problem, flush=True)
      self._last_problem = problem

  def _watch(self, stopped):
    while not stopped():
      time.sleep(self._config.reload_seconds)
      try:
        self.reload_if_changed()
      except Exception as error:  # pylint: disable=broad-except
        # A reload is never worth the server: the old version serves on.
        logging.exception("index reload failed")
        self._report(f"retrieval server: reload failed "
                     f"({_error_line(error)}); still serving version "
                     f"{self._served_name}")


def start(config):
  """Loads the index of `config` (a `ServerConfig`), its port bound and
  listening; returns (a `uvicorn.Server` to run on the socket, the socket).
  An index root's new versions are swapped in as they come
  (`IndexReloader`)."""
  check_config(config)
  sock = bound_socket(config.host, config.port)
  tokenizer = task_specific.load_tokenizer(config.tokenizer)
  retrieval, health, limits = load_index(config, tokenizer)
  batcher = SearchBatcher(retrieval, config.max_batch_questions, health)
  # log_config=None: uvicorn's warnings go through the process's logging
  # (absl's handler); its own config would replace every handler there is.
  server = uvicorn.Server(uvicorn.Config(
      create_app(limits, batcher), log_level="warning", access_log=False,
      lifespan="off", log_config=None))
  if health["index_root"] and config.reload_seconds:
    IndexReloader(config, tokenizer, batcher, limits, health).start(
        lambda: server.should_exit)
  # Connections wait in the backlog from here until uvicorn accepts them.
  sock.listen(2048)
  print(f"{READY_LINE_PREFIX}{url_of(sock)} (index version "
        f"{retrieval.index_version}, {retrieval.num_blocks} blocks, "
        f"{health['search']['kind']} search)", flush=True)
  return server, sock


def serve(config):
  """Serves the index of `config` (a `ServerConfig`, see `start`) until
  stopped (SIGINT / SIGTERM)."""
  server, sock = start(config)
  server.run(sockets=[sock])
