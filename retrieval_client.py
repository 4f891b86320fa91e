"""The client of retrieval_server.py: `LocalRetrieval`'s interface, answered over HTTP.

  retrieval = retrieval_client.RemoteRetrieval("http://127.0.0.1:8765",
                                               tokenizer, timeout_seconds=30)
  found = retrieval.retrieve(["why is the sky blue"], k=100)

On construction it reads the server's `GET /health` and refuses a server
whose blocks' GPT-2 ids come from another tokenizer. Every request (retries
included) ends within `timeout_seconds` (a call larger than the server's
`max_request_questions` is several requests): a connection refused, a timeout, a
5xx or a garbled answer is retried with exponential backoff until then, and
then is a `utils.UserError` naming the server, the attempts and the seconds;
a 4xx is the request's own fault and is raised at once with the server's
reason. An answer from another index version than the one checked at
construction (the server was restarted on other data) is refused. Calls
share no connection, so tf.data may call from several threads at once.
"""

import base64
import http.client
import json
import time
import urllib.parse

import numpy as np

import live_retrieval
import neighbour_cache
import utils

_FIRST_BACKOFF_SECONDS = 0.05
_MAX_BACKOFF_SECONDS = 2.0
_CONNECTIONS = {"http": http.client.HTTPConnection,
                "https": http.client.HTTPSConnection}


def _checked_url(url):
  """(url without a trailing slash, scheme, host, port) of a server URL."""
  parsed = urllib.parse.urlsplit(url or "")
  if parsed.scheme not in _CONNECTIONS or not parsed.hostname or (
      parsed.path not in ("", "/")):
    raise utils.UserError(f"--retrieval_server={url}: expected "
                          "http://host:port of a retrieval_server.py")
  try:
    port = parsed.port
  except ValueError:
    raise utils.UserError(f"--retrieval_server={url}: the port is not a "
                          "number in 0 to 65535") from None
  return url.rstrip("/"), parsed.scheme, parsed.hostname, port


def _remaining(deadline):
  """Seconds left before `deadline`; a timeout when none are."""
  left = deadline - time.monotonic()
  if left <= 0:
    raise TimeoutError("timed out")
  return left


class RemoteRetrieval:
  """Retrieval answered by a retrieval_server.py at `url`.

  Attributes:
    description: the server's /health (less `ready`), `source` = the URL.
    num_blocks: blocks in the served index.
  """

  def __init__(self, url, tokenizer, *, timeout_seconds=30.0):
    self.url, self._scheme, self._host, self._port = _checked_url(url)
    if not timeout_seconds > 0:
      raise utils.UserError(f"--retrieval_timeout_seconds={timeout_seconds}: "
                            "must be positive")
    self._timeout_seconds = timeout_seconds
    health = self._call("GET", "/health")
    missing = sorted({"index_version", "num_blocks", "max_request_questions",
                      "tokenizer_fingerprint"} - set(health))
    if missing:
      raise utils.UserError(
          f"retrieval server {self.url}: its /health has no "
          f"{', '.join(missing)}, expected a retrieval_server.py there")
    expected = neighbour_cache.tokenizer_fingerprint(tokenizer)
    served = str(health.get("tokenizer_fingerprint"))
    if served != expected:
      raise utils.UserError(
          f"retrieval server {self.url}: serves the GPT-2 ids of another "
          f"tokenizer (fingerprint {served[:12]}), expected this job's "
          f"({expected[:12]}): start the server with the same --tokenizer")
    self.description = {**{name: value for name, value in health.items()
                           if name != "ready"}, "source": self.url}
    self.num_blocks = health["num_blocks"]
    self._max_request_questions = health["max_request_questions"]

  @property
  def index_version(self):
    return self.description["index_version"]

  def retrieve(self, questions, k):
    """`live_retrieval.Neighbours` of question texts, best first."""
    return self._search("questions", list(questions), k, with_token_ids=True)

  def search_vectors(self, query_embeddings, k, with_token_ids=True):
    """`Neighbours` of query embeddings [Q, D] (token_ids None without
    `with_token_ids`)."""
    rows = np.asarray(query_embeddings, np.float32).astype(np.float64)
    return self._search("query_vectors", rows.tolist(), k, with_token_ids)

  def _search(self, field, queries, k, with_token_ids):
    step = self._max_request_questions
    answers = [self._call("POST", "/search", {
        field: queries[start:start + step], "k": k,
        "with_token_ids": with_token_ids, "token_ids_format": "int32_base64"})
               for start in range(0, len(queries), step)]
    for answer in answers:
      self._check_answer(answer, k)
    block_ids = [row for answer in answers for row in answer["block_ids"]]
    if len(block_ids) != len(queries):
      raise utils.UserError(
          f"retrieval server {self.url}: answered {len(block_ids)} rows for "
          f"{len(queries)} queries, expected one per query")
    return live_retrieval.Neighbours(
        scores=np.array([row for answer in answers
                         for row in answer["scores"]],
                        np.float32).reshape(-1, k),
        block_ids=np.array(block_ids, np.int64).reshape(-1, k),
        token_ids=[row for answer in answers for row in _token_ids(answer)]
        if with_token_ids else None)

  def _check_answer(self, answer, k):
    if answer.get("index_version") != self.index_version:
      raise utils.UserError(
          f"retrieval server {self.url}: now serves index version "
          f"{answer.get('index_version')}, expected {self.index_version} (the "
          "one it served when this job started): restart the job")
    if any(len(row) != k for row in answer.get("block_ids", [[]])):
      raise utils.UserError(f"retrieval server {self.url}: answered rows "
                            f"that are not {k} neighbours long")

  def _call(self, method, path, payload=None):
    """The JSON object answered to `method path`, retried until the deadline."""
    body = None if payload is None else json.dumps(payload).encode("utf-8")
    started = time.monotonic()
    deadline = started + self._timeout_seconds
    backoff, attempts, reason = _FIRST_BACKOFF_SECONDS, 0, "no attempt"
    while time.monotonic() < deadline:
      attempts += 1
      try:
        status, data = self._exchange(method, path, body, deadline)
      except (OSError, http.client.HTTPException) as error:
        reason = utils.error_reason(error) or type(error).__name__
      else:
        answer = _json_object(data)
        if status == 200 and answer is not None:
          return answer
        message = (answer or {}).get("error") or data[:200].decode(
            "utf-8", "replace")
        if 400 <= status < 500:
          raise utils.UserError(
              f"retrieval server {self.url}: refused {method} {path} (HTTP "
              f"{status}): {message}")
        reason = f"HTTP {status}: {message}"
      pause = min(backoff, deadline - time.monotonic())
      if pause > 0:
        time.sleep(pause)
      backoff = min(2 * backoff, _MAX_BACKOFF_SECONDS)
    raise utils.UserError(
        f"retrieval server {self.url}: no answer to {method} {path} after "
        f"{attempts} attempt(s) in {time.monotonic() - started:.1f} s (last: "
        f"{reason}), expected a running retrieval_server.py there")

  def _exchange(self, method, path, body, deadline):
    """(status, body bytes) of one request, every socket wait bounded by the
    deadline."""
    connection = _CONNECTIONS[self._scheme](self._host, self._port,
                                            timeout=_remaining(deadline))
    try:
      connection.connect()
      # The response reads through this socket even once http.client lets go
      # of it (a response that closes the connection).
      sock = connection.sock
      connection.request(method, path, body=body, headers={
          "Content-Type": "application/json"} if body else {})
      sock.settimeout(_remaining(deadline))
      response = connection.getresponse()
      chunks = []
      # The response closes itself (and may close the socket) once its body
      # is read.
      while not response.isclosed():
        sock.settimeout(_remaining(deadline))
        chunk = response.read(1 << 16)
        if not chunk:
          break
        chunks.append(chunk)
      return response.status, b"".join(chunks)
    finally:
      connection.close()


def _token_ids(answer):
  """Q lists of k id lists, from an answer's int32_base64 fields."""
  flat = np.frombuffer(base64.b64decode(answer["token_ids_int32_base64"]),
                       np.dtype("<i4")).tolist()
  rows, start = [], 0
  for lengths in answer["token_lengths"]:
    row = []
    for length in lengths:
      row.append(flat[start:start + length])
      start += length
    rows.append(row)
  return rows


def _json_object(data):
  try:
    answer = json.loads(data)
  except (UnicodeDecodeError, json.JSONDecodeError):
    return None
  return answer if isinstance(answer, dict) else None
