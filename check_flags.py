"""The flag-usage lint: every use of a flag holder ends in `.value`.

Flags are defined as `_FLAG_NAME = flags.DEFINE_*(...)` and read as
`_FLAG_NAME.value`; passing a holder to absl's own flag helpers
(`flags.mark_flag_as_required(_FLAG_NAME)`, ...) is allowed too. Anything else
(`_FLAG_NAME` alone, `.name`, `.default`) is reported as `file:line: ...`,
and the lint exits 1.

  python check_flags.py [DIR_OR_FILE ...]   (default: the current directory)
"""

import io
import os
import re
import sys
import tokenize

HOLDER = re.compile(r"^_?FLAG_[A-Z0-9_]+$")
ABSL_HOLDER_FUNCTIONS = {
    "mark_flag_as_required", "mark_flags_as_required",
    "mark_flags_as_mutual_exclusive", "mark_bool_flags_as_mutual_exclusive",
    "register_validator", "register_multi_flags_validator",
}
SKIPPED_DIRS = {".venv", ".git", "__pycache__", "build", "node_modules",
                "demo_out", "bench_out"}


def _logical_lines(source):
  """Lists of significant tokens, one list per logical line."""
  line = []
  ignored = (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
             tokenize.ENCODING)
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.NEWLINE or token.type == tokenize.ENDMARKER:
      if line:
        yield line
      line = []
    elif token.type not in ignored:
      line.append(token)


def _is_definition(line, index):
  """`HOLDER = flags.DEFINE_...(` at the start of the logical line."""
  texts = [t.string for t in line[index:index + 5]]
  return (index == 0 and len(texts) == 5 and texts[1] == "=" and
          texts[2] == "flags" and texts[3] == "." and
          texts[4].startswith("DEFINE"))


def offences_in_source(source, path="<source>"):
  """(path, line, message) for each holder use that does not end in `.value`."""
  offences = []
  for line in _logical_lines(source):
    texts = {t.string for t in line}
    for index, token in enumerate(line):
      if token.type != tokenize.NAME or not HOLDER.match(token.string):
        continue
      following = [t.string for t in line[index + 1:index + 3]]
      if following == [".", "value"] or _is_definition(line, index):
        continue
      if texts & ABSL_HOLDER_FUNCTIONS:
        continue
      offences.append((path, token.start[0],
                       f"{token.string} used without .value"))
  return offences


def python_files(roots):
  for root in roots:
    if os.path.isfile(root):
      yield root
      continue
    for directory, subdirs, files in os.walk(root):
      subdirs[:] = sorted(d for d in subdirs
                          if d not in SKIPPED_DIRS and not d.startswith("."))
      for name in sorted(files):
        if name.endswith(".py"):
          yield os.path.join(directory, name)


def main(argv):
  offences = []
  files = list(python_files(argv[1:] or ["."]))
  for path in files:
    with open(path, encoding="utf-8") as f:
      offences.extend(offences_in_source(f.read(), path))
  for path, line, message in offences:
    print(f"{path}:{line}: {message}")
  if offences:
    print(f"check_flags: {len(offences)} flag use(s) without .value",
          file=sys.stderr)
    return 1
  print(f"check_flags: {len(files)} files, every flag read with .value")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
