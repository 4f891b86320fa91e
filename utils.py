"""Small helpers every entry script shares: the user-error convention and atomic writes.

Bad input must end a run with one line naming the file, field or flag and what
was expected, a non-zero exit, and nothing half-written that looks complete.
Library code raises `UserError(message)`; entry scripts start with
`cli.run(main)` (`guarded`), which prints `error: message` on stderr and
exits with 2; so does a full disk or a read-only file system met mid-run.
Files are written to a temporary name and renamed when complete.
"""

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import math
import os
import re
import socket
import sys
import uuid

from absl import logging
import tensorflow as tf
import tqdm

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
  """A problem with the user's input: reported as one line, no traceback."""


# OS errors that mean "the machine cannot take the write", reported as one
# line like bad input.
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def _exit_with(message):
  # Through tqdm: on a line of its own, not after a progress bar.
  tqdm.tqdm.write(f"error: {message}", file=sys.stderr)
  sys.stderr.flush()
  sys.exit(USER_ERROR_EXIT_CODE)


def check_at_least(flag, value, minimum):
  """A UserError naming --flag unless `value` is a finite number >= minimum."""
  if not (isinstance(value, (int, float)) and math.isfinite(value) and
          value >= minimum):
    raise UserError(f"--{flag}={value}: expected >= {minimum}")


def guarded(main, takes_arguments=False):
  """`main(argv)` with a `UserError` reported as one line and exit 2.

  Positional arguments (a misspelt flag, a stray word) are refused unless the
  script `takes_arguments`.
  """

  def guarded_main(argv):
    try:
      if len(argv) > 1 and not takes_arguments:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
      return main(argv)
    except UserError as error:
      _exit_with(str(error))
    except tf.errors.OpError as error:
      # A UserError raised in Python called from a graph (tf.data's
      # py_function) reaches here as an op error around its traceback.
      reported = _raised_in_graph.get("last")
      if reported is None or str(reported) not in str(error):
        raise
      _exit_with(str(reported))
    except OSError as error:
      # A full disk or a location that turned read-only mid-run: the
      # environment, not a bug; what was written so far is still whole
      # (writes go through temporary names), so rerunning resumes.
      if error.errno not in _ENVIRONMENT_ERRNOS:
        raise
      _exit_with(f"{error.filename or 'a write'}: {error.strerror}, expected "
                 "room to write there (free space, then rerun to resume)")

  return guarded_main


# The last UserError raised inside a graph's Python call (tf.data runs them
# on its own threads).
_raised_in_graph = {}


def reporting_user_errors(function):
  """`function` for `tf.py_function`, its UserErrors reported by `guarded`
  as one line when TensorFlow re-raises them as op errors."""

  @functools.wraps(function)
  def reporting(*args):
    try:
      return function(*args)
    except UserError as error:
      _raised_in_graph["last"] = error
      raise

  return reporting


def error_reason(error, limit=200):
  """The first line of an exception's message, at most `limit` characters,
  for a one-line error (TensorFlow's function-node prefix and op suffix
  left out)."""
  text = (str(error.message if isinstance(error, tf.errors.OpError)
              else error).strip().splitlines() or [type(error).__name__])[0]
  text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)
  return re.sub(r"\s*\[Op:\w+\].*$", "", text)[:limit]


def temporary_path(path):
  """A sibling name for `path` that no reader mistakes for the finished file."""
  return f"{path}.tmp-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path, text):
  """Writes `text` to `path` (local or gs://) through a temporary name + rename."""
  tmp = temporary_path(path)
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def atomic_write_json(path, obj):
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, what="JSON file"):
  """Reads a JSON file (local or gs://); a missing or malformed file is a UserError."""
  if not tf.io.gfile.exists(path):
    raise UserError(f"{what} {path} does not exist")
  with tf.io.gfile.GFile(path, "r") as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    raise UserError(
        f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: "
        f"{error.msg}") from None


def checkpoint_reader(prefix, error_message):
  """tf.train's reader of the checkpoint at `prefix`; a UserError with
  `error_message` when there is none to read there."""
  try:
    return tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError):
    raise UserError(error_message) from None


def read_finished_json(directory, name, what, format_version, how_to_finish):
  """The JSON file `name` that marks `directory` as a finished `what` (it is
  written last), checked to be of `format_version`."""
  path = os.path.join(directory, name)
  if not tf.io.gfile.exists(path):
    raise UserError(f"{directory}: no {name}; not a finished {what} "
                    f"({how_to_finish})")
  content = read_json(path, what)
  if content.get("format_version") != format_version:
    raise UserError(
        f"{path}: format_version {content.get('format_version')!r}, this "
        f"code reads version {format_version}")
  return content


def makedirs(path):
  tf.io.gfile.makedirs(path)
  return path


def check_output_path(path, flag, *, directory=False):
  """Refuses, before any work, an output location that cannot be written.

  A local `path` (a file, or with `directory` a directory, made if missing)
  must not exist as the other kind, its nearest existing ancestor must be a
  directory (not a regular file), and that ancestor, or `path` itself when it
  exists, must be writable. Object-store paths (gs://) are left to the write:
  they have no directories or permissions to check up front.

  Args:
    path: the output location.
    flag: the flag (or field) that named it, for the message, e.g.
      "--output_dir".
    directory: whether `path` is a directory to write into.
  """
  if not path or "://" in path:
    return
  where = f"{flag}={path}"
  absolute = os.path.abspath(path)
  if os.path.exists(absolute):
    if directory and not os.path.isdir(absolute):
      raise UserError(f"{where}: is a file, expected a directory")
    if not directory and os.path.isdir(absolute):
      raise UserError(f"{where}: is a directory, expected a file path")
    if not os.access(absolute, os.W_OK | (os.X_OK if directory else 0)):
      raise UserError(f"{where}: not writable, expected a location this user "
                      "may write")
    if directory or os.access(os.path.dirname(absolute), os.W_OK | os.X_OK):
      return
  ancestor = os.path.dirname(absolute)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise UserError(f"{where}: {ancestor} is a file, expected a directory "
                    "there (or nothing, to be made)")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise UserError(f"{where}: {ancestor} is not writable, expected a "
                    "location this user may write")



# ---------------------------------------------------------------------------
# Exclusive locks on a job's output (a run directory, a cache, a generation)
# ---------------------------------------------------------------------------


def _holder_record():
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(
              timespec="seconds"),
          "command": " ".join(sys.argv)}


def _describe_holder(text):
  """'pid P on host H, started T' from a lock file's text."""
  try:
    holder = json.loads(text)
    return (f"pid {holder['pid']} on host {holder['host']}, started "
            f"{holder['started']}")
  except (ValueError, TypeError, KeyError):
    return "holder not recorded yet"


def _process_is_gone(holder_text):
  """Whether a lock file names a process of this host that no longer runs."""
  try:
    holder = json.loads(holder_text)
    if holder["host"] != socket.gethostname():
      return False
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return True
  except (ValueError, TypeError, KeyError, PermissionError):
    return False
  return False


def _refusal(what, lock_path, holder_text):
  return UserError(
      f"{what}: in use by another job ({_describe_holder(holder_text)}; lock "
      f"{lock_path}), expected no other job writing it: wait for that job to "
      "end or stop it")


def _lock_local(lock_path, what):
  """flock on a local file: the kernel frees it when its holder dies."""
  while True:
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with os.fdopen(descriptor) as f:
        raise _refusal(what, lock_path, f.read()) from None
    try:
      same_file = os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
      same_file = False
    if same_file:
      break
    # The holder released (deleted) the file between our open and flock:
    # the lock is now a new file.
    os.close(descriptor)
  previous = os.pread(descriptor, 1 << 16, 0).decode("utf-8", "replace")
  if previous.strip():
    logging.warning("%s: taking over the lock left by %s, which no longer "
                    "holds it", what, _describe_holder(previous))
  os.ftruncate(descriptor, 0)
  os.pwrite(descriptor, json.dumps(_holder_record()).encode("utf-8"), 0)
  return descriptor


def _lock_remote(lock_path, what):
  """A lock file on an object store (gs://): checked, then written.

  Object stores offer no exclusive create through tf.io.gfile, so two jobs
  starting within the same moment can both pass; a lock left by a dead job of
  another host must be deleted by hand.
  """
  if tf.io.gfile.exists(lock_path):
    with tf.io.gfile.GFile(lock_path) as f:
      previous = f.read()
    if not _process_is_gone(previous):
      raise _refusal(what, lock_path, previous)
    logging.warning("%s: taking over the lock left by %s, which is gone",
                    what, _describe_holder(previous))
  atomic_write_json(lock_path, _holder_record())


@contextlib.contextmanager
def exclusive_lock(lock_path, what):
  """Holds `lock_path` while the block runs: one job at a time writes `what`.

  A second job fails at once with a UserError naming the holder (pid, host,
  start time). A lock whose holder died is taken over with a log line: on a
  local file system the lock is an flock, which the kernel releases when its
  process ends however it ends; on gs:// it is a file naming its holder,
  taken over when that holder is a process of this host that no longer runs.
  The lock file is deleted when the block ends.

  Args:
    lock_path: the lock file, in the directory it protects (which must exist).
    what: what is locked, for messages (e.g. "run directory runs/x").
  """
  if "://" in lock_path:
    _lock_remote(lock_path, what)
    try:
      yield
    finally:
      tf.io.gfile.remove(lock_path)
    return
  descriptor = _lock_local(lock_path, what)
  try:
    yield
  finally:
    # Deleted while still held: a job that opened the old file sees, once it
    # holds that, that the path is no longer its file, and starts again.
    os.remove(lock_path)
    os.close(descriptor)


@contextlib.contextmanager
def locked_directory(directory, lock_name, what):
  """Holds `directory/lock_name` (see `exclusive_lock`), making `directory` if missing.

  A job that fails before writing anything there leaves no empty directory
  it made behind.
  """
  created = not tf.io.gfile.isdir(directory)
  if created:
    makedirs(directory)
  try:
    with exclusive_lock(os.path.join(directory, lock_name), what):
      yield
  finally:
    # os.rmdir removes only an empty directory; on an object store (gs://) an
    # empty "directory" does not exist anyway.
    if created and "://" not in directory and not os.listdir(directory):
      os.rmdir(directory)
