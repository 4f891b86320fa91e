"""retrieval_server.py as a subprocess on 127.0.0.1, for tests.

  with server_fixtures.running_server(flags, log_dir) as server:
    retrieval = retrieval_client.RemoteRetrieval(server.url, tokenizer)
    ...
    server.kill()                       # SIGKILL, as a crash
    server = server_fixtures.start_server(flags, log_dir, port=server.port)

The server picks a free port itself (`--port=0`) and prints it in its ready
line, so two tests never race for one; a restart may ask for the port it
had. `start_server` returns once /health answers, or raises with the end of
the server's log when the server exits or the deadline passes.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import retrieval_service

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(REPO_ROOT, "retrieval_server.py")
READY_LINE = re.compile(re.escape(retrieval_service.READY_LINE_PREFIX) +
                        r"(http://[^ ]+)")
STARTUP_SECONDS = 120.0


class ServerProcess:
  """A started retrieval_server.py: its URL, port, process and log file."""

  def __init__(self, process, url, log_path):
    self.process = process
    self.url = url
    self.port = int(url.rsplit(":", 1)[1])
    self.log_path = log_path

  def log(self):
    with open(self.log_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def kill(self):
    """SIGKILL: the server dies as in a crash."""
    if self.process.poll() is None:
      self.process.kill()
    self.process.wait(timeout=30)

  def stop(self, grace_seconds=10.0):
    """SIGTERM (uvicorn's graceful stop), SIGKILL after `grace_seconds`."""
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout=grace_seconds)
      except subprocess.TimeoutExpired:
        self.kill()


def server_command(flags, port=0):
  """The command line of a server with `flags` ({flag name: value})."""
  return [sys.executable, SERVER, "--host=127.0.0.1", f"--port={port}"] + [
      f"--{name}={value}" for name, value in flags.items()]


def health(url, timeout_seconds=5.0):
  """GET /health's JSON object."""
  with urllib.request.urlopen(f"{url}/health", timeout=timeout_seconds) as f:
    return json.load(f)


def start_server(flags, log_dir, *, port=0, deadline_seconds=STARTUP_SECONDS):
  """Starts retrieval_server.py with `flags`; returns its `ServerProcess`
  once /health answers ready."""
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, f"server-{time.monotonic_ns()}.log")
  with open(log_path, "w", encoding="utf-8") as log:
    process = subprocess.Popen(  # pylint: disable=consider-using-with
        server_command(flags, port), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1"))
  deadline = time.monotonic() + deadline_seconds
  url = None
  while time.monotonic() < deadline:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      found = READY_LINE.search(f.read())
    if found:
      url = found.group(1)
      try:
        if health(url)["ready"]:
          return ServerProcess(process, url, log_path)
      except OSError:
        pass
    if process.poll() is not None:
      break
    time.sleep(0.1)
  ServerProcess(process, url or "http://127.0.0.1:0", log_path).kill()
  with open(log_path, encoding="utf-8", errors="replace") as f:
    tail = f.read()[-3000:]
  raise RuntimeError(
      f"retrieval server {' '.join(server_command(flags, port))} not ready "
      f"(exit code {process.returncode}); its log ends:\n{tail}")


@contextlib.contextmanager
def running_server(flags, log_dir, **options):
  """A started server (`start_server`), stopped when the block ends (one
  started again inside the block is the caller's to stop)."""
  server = start_server(flags, log_dir, **options)
  try:
    yield server
  finally:
    server.stop()
