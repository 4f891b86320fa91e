"""Small helpers every entry script shares: the user-error convention and atomic writes.

Bad input must end a run with one line naming the file, field or flag and what
was expected, a non-zero exit, and nothing half-written that looks complete.
Library code raises `UserError(message)`; entry scripts start with
`utils.run(main)`, which prints `error: message` on stderr and exits with 2.
Files are written to a temporary name and renamed when complete.
"""

import json
import sys
import uuid

from absl import app
import tensorflow as tf

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
  """A problem with the user's input: reported as one line, no traceback."""


def run(main, takes_arguments=False):
  """`absl.app.run(main)`, with `UserError` reported as one line and exit 2.

  Positional arguments (a misspelt flag, a stray word) are refused unless the
  script `takes_arguments`.
  """

  def guarded_main(argv):
    try:
      if len(argv) > 1 and not takes_arguments:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
      return main(argv)
    except UserError as error:
      print(f"error: {error}", file=sys.stderr, flush=True)
      sys.exit(USER_ERROR_EXIT_CODE)

  app.run(guarded_main)


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


def makedirs(path):
  tf.io.gfile.makedirs(path)
  return path

