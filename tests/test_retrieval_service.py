"""The retrieval service (retrieval_server.py) and its client (`retrieval_client.RemoteRetrieval`).

One server runs for the module, a subprocess on 127.0.0.1 over a tiny REALM
world (`retrieval_fixtures.write_retriever`) with a tiny GPT-2 tokenizer.
Exact retrieval through it must equal `live_retrieval.LocalRetrieval` in
this process and the exact neighbour cache of the same questions
(`caching.cache`); bad requests get a 4xx with one line and leave it
serving; concurrent clients each get their own answers; an unreachable
server is a one-line `UserError` within the timeout. The batching worker is
also tested in-process, over a fake retrieval.
"""

import base64
import concurrent.futures
import http.client
import http.server
import json
import os
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import cache_fixtures
import caching
import kilt_files
import live_retrieval
import neighbour_cache
import retrieval_client
import retrieval_fixtures
import retrieval_service
import server_fixtures
import settings
import task_specific
import utils

NUM_BLOCKS = 50
DIM = 8
K = 8
MAX_BLOCK_TOKENS = 16
MAX_REQUEST_QUESTIONS = 16
MAX_REQUEST_BYTES = 1 << 16
# A call may end this much after its timeout (the last attempt's clean-up,
# a loaded machine); a hang would not.
SLACK_SECONDS = 2.0
QUESTIONS = [
    "why is the sky blue", "why does water boil", "ice floating", "why",
    "bird fly south in winter", "light green plant grow", "moon tide",
    "salt sea cold", "hot water", "is the moon green", "why birds fly",
    "the sky is cold",
]


def kilt_line(index, question):
  return json.dumps({"id": f"q{index}", "input": question, "output": [
      {"answer": "because it is", "provenance": []}]}) + "\n"


@pytest.fixture(name="world", scope="module")
def fixture_world(tmp_path_factory):
  """A retriever, a tokenizer, and the exact cache of QUESTIONS (dev split)."""
  directory = str(tmp_path_factory.mktemp("world"))
  retriever = retrieval_fixtures.write_retriever(
      os.path.join(directory, "realm"), num_blocks=NUM_BLOCKS, dim=DIM)
  tokenizer_dir = os.path.join(directory, "tokenizer")
  cache_fixtures.write_tokenizer(tokenizer_dir)
  kilt_dir = os.path.join(directory, "kilt")
  os.makedirs(kilt_dir)
  with open(os.path.join(kilt_dir, kilt_files.ELI5_SPLIT_FILES["validation"]),
            "w", encoding="utf-8") as f:
    f.writelines(kilt_line(i, q) for i, q in enumerate(QUESTIONS))
  cache_dir = os.path.join(directory, "cache")
  caching.cache(settings.from_flat(caching.CacheConfig, {
      "retriever_config_path": retriever["config_path"],
      "dataset_root": kilt_dir, "output_dir": cache_dir,
      "tokenizer": tokenizer_dir, "splits": ["validation"],
      "num_neighbours": K, "num_shards": 1, "batch_size": 4,
      "max_block_tokens": MAX_BLOCK_TOKENS}, "test"))
  return dict(retriever, root=directory, tokenizer_dir=tokenizer_dir,
              cache=cache_dir,
              tokenizer=task_specific.load_tokenizer(tokenizer_dir))


@pytest.fixture(name="server", scope="module")
def fixture_server(world):
  with server_fixtures.running_server({
      "retriever_config_path": world["config_path"],
      "tokenizer": world["tokenizer_dir"],
      "max_block_tokens": MAX_BLOCK_TOKENS,
      "max_request_questions": MAX_REQUEST_QUESTIONS,
      "max_request_bytes": MAX_REQUEST_BYTES, "max_batch_questions": 32,
  }, os.path.join(world["root"], "logs")) as server:
    yield server


@pytest.fixture(name="local", scope="module")
def fixture_local(world):
  return live_retrieval.LocalRetrieval(live_retrieval.RetrievalConfig(
      retriever_config_path=world["config_path"],
      max_block_tokens=MAX_BLOCK_TOKENS), world["tokenizer"])


@pytest.fixture(name="expected", scope="module")
def fixture_expected(local):
  """In-process neighbours of QUESTIONS at depth K."""
  return local.retrieve(QUESTIONS, K)


def remote(server, world, timeout_seconds=30.0):
  return retrieval_client.RemoteRetrieval(server.url, world["tokenizer"],
                                          timeout_seconds=timeout_seconds)


def cached_neighbours(cache_dir):
  """{question: (block ids, scores, token ids)} of the cache's dev split."""
  manifest = neighbour_cache.read_manifest(cache_dir)
  found = {}
  for record in tf.data.TFRecordDataset(neighbour_cache.split_files(
      cache_dir, manifest, "validation")).map(neighbour_cache.parse_example):
    found[record["question"].numpy().decode("utf-8")] = (
        record["neighbour_block_ids"].numpy(),
        record["neighbour_scores"].numpy(), record["neighbours"].to_list())
  return found


def post(url, body, *, path="/search", method="POST", headers=None):
  """(status, decoded JSON body) of one raw request."""
  host, port = url.rsplit("/", 1)[1].split(":")
  connection = http.client.HTTPConnection(host, int(port), timeout=30)
  try:
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, json.loads(response.read())
  finally:
    connection.close()


def post_json(url, payload):
  return post(url, json.dumps(payload).encode("utf-8"))


# ---------------------------------------------------------------------------
# Equality: server = in-process = exact cache
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_exact_retrieval_through_the_server_equals_local_and_the_cache(
    world, server, local, expected):
  client = remote(server, world)
  found = client.retrieve(QUESTIONS, K)
  cache = cached_neighbours(world["cache"])
  assert found.scores.dtype == np.float32
  assert found.block_ids.dtype == np.int64
  assert found.scores.shape == found.block_ids.shape == (len(QUESTIONS), K)
  np.testing.assert_array_equal(found.block_ids, expected.block_ids)
  np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5)
  assert found.token_ids == expected.token_ids
  for row, question in enumerate(QUESTIONS):
    block_ids, scores, token_ids = cache[question]
    np.testing.assert_array_equal(found.block_ids[row], block_ids)
    np.testing.assert_allclose(found.scores[row], scores, atol=1e-5)
    assert found.token_ids[row] == token_ids
  assert client.index_version == local.index_version
  assert client.num_blocks == NUM_BLOCKS
  assert client.description["source"] == server.url
  assert client.description["embedding_dim"] == DIM
  assert client.description["search"] == {"kind": "exact"}


def test_query_vectors_and_titles_through_the_server(world, server, local,
                                                     expected):
  client = remote(server, world)
  vectors = local.embed(QUESTIONS)
  found = client.search_vectors(vectors, K, with_token_ids=False)
  np.testing.assert_array_equal(found.block_ids, expected.block_ids)
  np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5)
  assert found.token_ids is None
  status, answer = post_json(server.url, {"questions": QUESTIONS[:3], "k": 4})
  assert status == 200 and set(answer) == {"block_ids", "scores", "token_ids",
                                           "index_version"}
  assert answer["token_ids"] == [row[:4] for row in expected.token_ids[:3]]
  status, answer = post_json(server.url, {
      "questions": QUESTIONS[:3], "k": 4, "with_titles": True,
      "with_token_ids": False})
  assert status == 200 and "token_ids" not in answer
  assert answer["titles"] == [[world["titles"][i] for i in row]
                              for row in answer["block_ids"]]
  # float32 written as the double equal to it: it reads back unchanged.
  scores = np.array(answer["scores"], np.float64)
  np.testing.assert_array_equal(scores.astype(np.float32).astype(np.float64),
                                scores)


def test_health_describes_the_index(world, server, local):
  health = server_fixtures.health(server.url)
  assert health["ready"] is True
  assert health["index_version"] == local.index_version
  assert health["tokenizer_fingerprint"] == (
      neighbour_cache.tokenizer_fingerprint(world["tokenizer"]))
  assert health["max_block_tokens"] == MAX_BLOCK_TOKENS
  assert health["max_request_questions"] == MAX_REQUEST_QUESTIONS
  assert health["titles"] is True
  assert health["max_k"] == NUM_BLOCKS
  assert {"num_blocks", "embedding_dim", "context_with_title", "search",
          "max_query_length"} <= set(health)


def test_more_questions_than_a_request_takes_are_sent_in_several(
    world, server, expected):
  questions = QUESTIONS * 3  # 36 > MAX_REQUEST_QUESTIONS
  found = remote(server, world).retrieve(questions, K)
  np.testing.assert_array_equal(found.block_ids,
                                np.tile(expected.block_ids, (3, 1)))


# ---------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------

VECTOR = [0.5] * DIM
BAD_SEARCHES = {
    "not JSON": (b"{questions", 400, "not JSON"),
    "not UTF-8": (b"\xff\xfe", 400, "not JSON"),
    "a JSON array": (b"[1, 2]", 400, "expected a JSON object"),
    "neither field": ({"k": 3}, 400, "exactly one"),
    "both fields": ({"questions": ["why"], "query_vectors": [VECTOR], "k": 3},
                    400, "exactly one"),
    "questions not a list": ({"questions": "why", "k": 3}, 400, "questions"),
    "a question not a string": ({"questions": ["why", 3], "k": 3}, 400,
                                "questions[1]"),
    "no questions": ({"questions": [], "k": 3}, 400, "non-empty"),
    "vector too short": ({"query_vectors": [VECTOR[1:]], "k": 3}, 400,
                         f"expected a list of {DIM} numbers"),
    "vector too long": ({"query_vectors": [VECTOR, VECTOR + [1.0]], "k": 3},
                        400, "query_vectors[1]"),
    "vector of strings": ({"query_vectors": [["a"] * DIM], "k": 3}, 400,
                          "finite numbers"),
    "k zero": ({"questions": ["why"], "k": 0}, 400, "k: 0"),
    "k negative": ({"questions": ["why"], "k": -2}, 400, "k: -2"),
    "k over the blocks": ({"questions": ["why"], "k": NUM_BLOCKS + 1}, 400,
                          f"1 to {NUM_BLOCKS}"),
    "k a string": ({"questions": ["why"], "k": "3"}, 400, "an integer"),
    "k a bool": ({"questions": ["why"], "k": True}, 400, "an integer"),
    "k a float": ({"questions": ["why"], "k": 2.5}, 400, "an integer"),
    "k missing": ({"questions": ["why"]}, 400, "k: null"),
    "an unknown token_ids_format": (
        {"questions": ["why"], "k": 3, "token_ids_format": "npy"}, 400,
        "expected one of lists, int32_base64"),
    "with_token_ids not a bool": (
        {"questions": ["why"], "k": 3, "with_token_ids": "yes"}, 400,
        "with_token_ids"),
    "an unknown field": ({"questions": ["why"], "k": 3, "kk": 1}, 400,
                         "unknown field(s) kk"),
    "too many questions": (
        {"questions": ["why"] * (MAX_REQUEST_QUESTIONS + 1), "k": 3}, 413,
        "--max_request_questions"),
    "too many vectors": (
        {"query_vectors": [VECTOR] * (MAX_REQUEST_QUESTIONS + 1), "k": 3},
        413, "--max_request_questions"),
}


def assert_one_line_error(status, answer, expected_status, expected_text):
  assert status == expected_status, answer
  assert set(answer) == {"error"}
  assert "\n" not in answer["error"] and expected_text in answer["error"]


@pytest.mark.parametrize("case", sorted(BAD_SEARCHES))
def test_bad_search_is_refused_and_the_server_keeps_serving(server, case):
  body, expected_status, expected_text = BAD_SEARCHES[case]
  if not isinstance(body, bytes):
    body = json.dumps(body).encode("utf-8")
  assert_one_line_error(*post(server.url, body), expected_status,
                        expected_text)
  assert server_fixtures.health(server.url)["ready"]
  status, answer = post_json(server.url, {"questions": ["why"], "k": 2})
  assert status == 200 and len(answer["block_ids"][0]) == 2


def test_oversize_body_refused_before_it_is_read(server):
  assert_one_line_error(*post(server.url, b"", headers={
      "Content-Length": str(10 * MAX_REQUEST_BYTES)}), 413,
                        "--max_request_bytes")
  body = json.dumps({"questions": ["why " * (MAX_REQUEST_BYTES // 4)],
                     "k": 3}).encode("utf-8")
  assert len(body) > MAX_REQUEST_BYTES
  assert_one_line_error(*post(server.url, body), 413, "--max_request_bytes")
  assert server_fixtures.health(server.url)["ready"]


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/nowhere", 404), ("GET", "/search", 405),
    ("POST", "/health", 405)])
def test_unknown_routes_get_json_errors(server, method, path, status):
  assert_one_line_error(*post(server.url, None, method=method, path=path),
                        status, "expected POST /search or GET /health")


def test_client_raises_a_refusal_at_once_without_retrying(world, server):
  client = remote(server, world, timeout_seconds=20)
  started = time.monotonic()
  with pytest.raises(utils.UserError, match=(
      rf"{server.url}: refused POST /search \(HTTP 400\): k: "
      rf"{NUM_BLOCKS + 1}, expected 1 to {NUM_BLOCKS}")):
    client.retrieve(["why"], NUM_BLOCKS + 1)
  # A retried refusal would take the whole timeout.
  assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------
# Concurrent clients
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_answers(world, server,
                                                       expected):
  """8 threads x 200 requests through one client, each a random question
  and depth, each answer checked against that question's neighbours."""
  client = remote(server, world)
  num_threads, requests_per_thread = 8, 200
  answered, errors = [0] * num_threads, []

  def run_client(thread_index):
    rng = np.random.default_rng(thread_index)
    for _ in range(requests_per_thread):
      rows = rng.choice(len(QUESTIONS), size=rng.integers(1, 4))
      k = int(rng.integers(1, K + 1))
      found = client.retrieve([QUESTIONS[row] for row in rows], k)
      np.testing.assert_array_equal(found.block_ids,
                                    expected.block_ids[rows, :k])
      np.testing.assert_allclose(found.scores, expected.scores[rows, :k],
                                 atol=1e-5)
      assert found.token_ids == [expected.token_ids[row][:k] for row in rows]
      answered[thread_index] += 1

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    futures = [pool.submit(run_client, i) for i in range(num_threads)]
    for future in concurrent.futures.as_completed(futures, timeout=240):
      if future.exception() is not None:
        errors.append(future.exception())
  assert not errors, errors[0]
  assert answered == [requests_per_thread] * num_threads


# ---------------------------------------------------------------------------
# Unreachable servers, wrong tokenizer, bad URLs
# ---------------------------------------------------------------------------


def free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_nothing_listening_is_a_user_error_within_the_timeout(world):
  url = f"http://127.0.0.1:{free_port()}"
  started = time.monotonic()
  with pytest.raises(utils.UserError) as raised:
    retrieval_client.RemoteRetrieval(url, world["tokenizer"],
                                     timeout_seconds=1.5)
  assert time.monotonic() - started < 1.5 + SLACK_SECONDS
  message = str(raised.value)
  assert url in message and "\n" not in message
  assert "attempt(s)" in message and "GET /health" in message


def test_a_server_that_never_answers_is_a_user_error_within_the_timeout(
    world):
  """A socket that listens but never accepts: the connection is made (the
  backlog), the answer never comes."""
  with socket.socket() as silent:
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(utils.UserError, match=f"{url}: no answer"):
      retrieval_client.RemoteRetrieval(url, world["tokenizer"],
                                       timeout_seconds=1.0)
    assert time.monotonic() - started < 1.0 + SLACK_SECONDS


def test_a_server_of_another_tokenizer_is_refused(world, server, tmp_path):
  other = cache_fixtures.write_tokenizer(str(tmp_path / "other"),
                                         vocab_size=280)
  with pytest.raises(utils.UserError, match="another tokenizer"):
    retrieval_client.RemoteRetrieval(server.url, other)


@pytest.mark.slow
def test_a_killed_server_fails_the_call_in_time_and_a_restart_serves_again(
    world, expected):
  """What a trainer sees when its server dies: one line within its timeout;
  a server restarted on the same port answers again."""
  # Warmed up for K: the first search does not trace (seconds on a loaded
  # machine) within the client's 2 s.
  flags = {"retriever_config_path": world["config_path"],
           "tokenizer": world["tokenizer_dir"],
           "max_block_tokens": MAX_BLOCK_TOKENS, "warm_up_k": K}
  log_dir = os.path.join(world["root"], "restart_logs")
  server = server_fixtures.start_server(flags, log_dir)
  try:
    client = remote(server, world, timeout_seconds=2.0)
    assert client.retrieve(QUESTIONS[:2], K).block_ids.tolist() == (
        expected.block_ids[:2].tolist())
    server.kill()
    started = time.monotonic()
    with pytest.raises(utils.UserError, match=(
        rf"retrieval server {server.url}: no answer to POST /search after "
        r"\d+ attempt\(s\) in \d+\.\d s")):
      client.retrieve(QUESTIONS[:2], K)
    assert time.monotonic() - started < 2.0 + SLACK_SECONDS
    server = server_fixtures.start_server(flags, log_dir, port=server.port)
    found = remote(server, world).retrieve(QUESTIONS, K)
    np.testing.assert_array_equal(found.block_ids, expected.block_ids)
  finally:
    server.stop()


class StubServer:
  """An HTTP server on 127.0.0.1 that answers GET /health with `health` and
  each POST /search with the next of `searches` ((status, JSON object)), the
  last one again when they run out; counts the searches."""

  def __init__(self, health, searches):
    stub = self
    self.num_searches = 0

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        self._answer(200, health)

      def do_POST(self):  # pylint: disable=invalid-name
        self.rfile.read(int(self.headers["Content-Length"]))
        stub.num_searches += 1
        self._answer(*searches[min(stub.num_searches, len(searches)) - 1])

      def _answer(self, status, answer):
        body = json.dumps(answer).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        del args

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def close(self):
    self._server.shutdown()
    self._server.server_close()


def stub_health(world, version="v1"):
  return {"ready": True, "index_version": version, "num_blocks": NUM_BLOCKS,
          "max_request_questions": MAX_REQUEST_QUESTIONS,
          "tokenizer_fingerprint": neighbour_cache.tokenizer_fingerprint(
              world["tokenizer"])}


ONE_NEIGHBOUR = {"block_ids": [[3]], "scores": [[0.5]],
                 "token_ids_int32_base64": base64.b64encode(
                     np.array([7], "<i4").tobytes()).decode("ascii"),
                 "token_lengths": [[1]], "index_version": "v1"}


def test_the_client_retries_server_errors_until_an_answer(world):
  stub = StubServer(stub_health(world), [
      (503, {"error": "busy"}), (500, {"error": "oops"}),
      (200, ONE_NEIGHBOUR)])
  try:
    found = retrieval_client.RemoteRetrieval(
        stub.url, world["tokenizer"], timeout_seconds=10).retrieve(["why"], 1)
  finally:
    stub.close()
  assert stub.num_searches == 3
  assert found.block_ids.tolist() == [[3]] and found.token_ids == [[[7]]]


def test_the_client_gives_up_on_server_errors_at_its_timeout(world):
  stub = StubServer(stub_health(world), [(500, {"error": "index broken"})])
  try:
    client = retrieval_client.RemoteRetrieval(stub.url, world["tokenizer"],
                                              timeout_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(utils.UserError, match=(
        r"no answer to POST /search after \d+ attempt\(s\) .* \(last: HTTP "
        r"500: index broken\)")):
      client.retrieve(["why"], 1)
    assert time.monotonic() - started < 1.0 + SLACK_SECONDS
  finally:
    stub.close()
  assert stub.num_searches > 1


def test_the_client_refuses_a_server_that_is_not_a_retrieval_server(world):
  stub = StubServer({"status": "ok"}, [(200, {})])
  try:
    with pytest.raises(utils.UserError, match=(
        "its /health has no index_version, max_request_questions, num_blocks, "
        "tokenizer_fingerprint, expected a retrieval_server.py there")):
      retrieval_client.RemoteRetrieval(stub.url, world["tokenizer"])
  finally:
    stub.close()


def test_the_client_refuses_an_answer_from_another_index_version(world):
  stub = StubServer(stub_health(world), [
      (200, dict(ONE_NEIGHBOUR, index_version="v2"))])
  try:
    client = retrieval_client.RemoteRetrieval(stub.url, world["tokenizer"])
    with pytest.raises(utils.UserError, match=(
        "now serves index version v2, expected v1")):
      client.retrieve(["why"], 1)
  finally:
    stub.close()


@pytest.mark.parametrize("url", [
    "127.0.0.1:8765", "ftp://127.0.0.1:8765", "http://127.0.0.1:8765/search",
    "http://127.0.0.1:port", ""])
def test_a_bad_url_is_refused(world, url):
  with pytest.raises(utils.UserError, match="--retrieval_server"):
    retrieval_client.RemoteRetrieval(url, world["tokenizer"])


@pytest.mark.slow
def test_server_without_a_retriever_config_exits_with_one_line(world):
  result = subprocess.run(
      server_fixtures.server_command({"tokenizer": world["tokenizer_dir"]}),
      capture_output=True, text=True, timeout=120, check=False,
      cwd=server_fixtures.REPO_ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == utils.USER_ERROR_EXIT_CODE
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --retriever_config_path is required (the retriever config JSON "
      "of the index to serve)")


# ---------------------------------------------------------------------------
# The batching worker, in-process
# ---------------------------------------------------------------------------


class FakeRetrieval:
  """Question i's vector is [i, 0]; a vector's neighbours are blocks
  v0, v0 + 1, ..., scored -rank. Records the size of every call."""

  index_version = "fake"

  def __init__(self, gate=None):
    self.calls = []
    self._gate = gate

  def embed(self, questions):
    return np.array([[float(q), 0.0] for q in questions], np.float32)

  def search_vectors(self, vectors, k, with_token_ids=True):
    if self._gate is not None:
      self._gate.wait(30)
    self.calls.append(len(vectors))
    if np.any(vectors < 0):
      raise ValueError("negative vector")
    block_ids = vectors[:, :1].astype(np.int64) + np.arange(k)
    return live_retrieval.Neighbours(
        scores=-np.broadcast_to(np.arange(k, dtype=np.float32),
                                block_ids.shape),
        block_ids=block_ids,
        token_ids=[[[int(b)] for b in row] for row in block_ids]
        if with_token_ids else None)

  def titles(self, block_ids):
    return [f"t{b}" for b in block_ids]


def search_request(questions=None, vectors=None, k=2,
                   token_ids_format="lists"):
  return retrieval_service.SearchRequest(
      questions=questions,
      query_vectors=None if vectors is None else np.array(vectors,
                                                          np.float32),
      k=k, with_token_ids=True, token_ids_format=token_ids_format,
      with_titles=False)


def test_batcher_answers_waiting_requests_together_each_its_own():
  gate = threading.Event()
  retrieval = FakeRetrieval(gate)
  batcher = retrieval_service.SearchBatcher(retrieval, max_batch_questions=5)
  # The first request holds the worker; the next ones wait in the queue.
  first = batcher.submit(search_request(["7"]))
  time.sleep(0.2)
  waiting = [batcher.submit(search_request(["1", "2"], k=1)),
             batcher.submit(search_request(vectors=[[4.0, 0.0]], k=3)),
             batcher.submit(search_request(["3", "5"],
                                           token_ids_format="int32_base64")),
             batcher.submit(search_request(["6"]))]
  gate.set()
  answers = [future.result(timeout=30) for future in [first] + waiting]
  # 1 + (2 + 1 + 2 = 5, the bound) + 1.
  assert retrieval.calls == [1, 5, 1]
  assert [answer["block_ids"] for answer in answers] == [
      [[7, 8]], [[1], [2]], [[4, 5, 6]], [[3, 4], [5, 6]], [[6, 7]]]
  assert answers[2]["token_ids"] == [[[4], [5], [6]]]
  assert answers[3]["token_lengths"] == [[1, 1], [1, 1]]
  assert np.frombuffer(base64.b64decode(answers[3]["token_ids_int32_base64"]),
                       "<i4").tolist() == [3, 4, 5, 6]
  assert answers[2]["scores"] == [[0.0, -1.0, -2.0]]
  assert all(answer["index_version"] == "fake" for answer in answers)


def test_batcher_reports_a_failed_batch_and_goes_on():
  batcher = retrieval_service.SearchBatcher(FakeRetrieval(),
                                            max_batch_questions=4)
  with pytest.raises(ValueError, match="negative vector"):
    batcher.submit(search_request(vectors=[[-1.0, 0.0]])).result(timeout=30)
  assert batcher.submit(search_request(["2"])).result(
      timeout=30)["block_ids"] == [[2, 3]]


def test_titles_are_refused_by_a_server_without_them():
  limits = retrieval_service.Limits(
      **retrieval_service.max_k_of(10, {"kind": "exact"}), embedding_dim=2,
      max_request_questions=4, max_request_bytes=1000, has_titles=False)
  with pytest.raises(retrieval_service.BadRequest, match="no title_records"):
    retrieval_service.parse_search_request(json.dumps({
        "questions": ["a"], "k": 1, "with_titles": True}).encode(), limits)


def test_scann_depth_is_bounded_by_its_reordering():
  """Refused as a request, not in a batch, where it would fail the others."""
  limits = retrieval_service.Limits(
      **retrieval_service.max_k_of(1000, {
          "kind": "scann", "reordering_num_neighbors": 100}),
      embedding_dim=2, max_request_questions=4, max_request_bytes=1000,
      has_titles=False)
  body = json.dumps({"query_vectors": [[1.0, 0.0]], "k": 101}).encode()
  with pytest.raises(retrieval_service.BadRequest, match=(
      r"k: 101, expected 1 to 100 \(the ScaNN config's "
      "reordering_num_neighbors\)")):
    retrieval_service.parse_search_request(body, limits)
  assert retrieval_service.max_k_of(50, {
      "kind": "scann", "reordering_num_neighbors": 100})["max_k"] == 50

