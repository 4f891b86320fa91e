"""The flag-usage lint: flags are read only in entry scripts, always with `.value`.

Three rules, each offence reported as `file:line: ...` (the lint then exits 1):

- Every use of a flag holder ends in `.value`. Flags are defined as
  `_FLAG_NAME = flags.DEFINE_*(...)` and read as `_FLAG_NAME.value`; passing a
  holder to absl's own flag helpers (`flags.mark_flag_as_required(_FLAG_NAME)`,
  ...) is allowed too. Anything else (`_FLAG_NAME` alone, `.name`,
  `.default`) is an offence.
- Only entry scripts (files with `if __name__ == "__main__":`) and `cli.py`
  (the command-line layer) touch flags: a library module, any other .py
  outside `tests/`, must not import `absl.flags` nor `cli`, and must not read
  a flag holder's `.value`. The library takes typed configs instead.
- An entry script that imports `cli` imports it before any module but the
  standard library's and absl's: cli.py sets the start-up environment that
  TensorFlow and transformers read when they are imported.

  python check_flags.py [DIR_OR_FILE ...]   (default: the current directory)
"""

import ast
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
# Where flags may be read besides the entry scripts (paths relative to the
# directory the lint is run on); tests parse flags of the scripts they test.
COMMAND_LINE_MODULE = "cli.py"
TEST_DIR = "tests"
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


def _is_entry_script(tree):
  """Whether the module has a top-level `if __name__ == "__main__":`."""
  for node in tree.body:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and
        test.left.id == "__name__" and len(test.comparators) == 1 and
        isinstance(test.comparators[0], ast.Constant) and
        test.comparators[0].value == "__main__"):
      return True
  return False


def _forbidden_import(node):
  """The flag module a library import brings in (`absl.flags`, `cli`), or None."""
  if isinstance(node, ast.Import):
    for alias in node.names:
      if alias.name == "cli":
        return "cli"
      if alias.name == "absl.flags" or alias.name.startswith("absl.flags."):
        return "absl.flags"
  elif isinstance(node, ast.ImportFrom) and not node.level:
    module = node.module or ""
    if module == "cli":
      return "cli"
    if module == "absl.flags" or module.startswith("absl.flags."):
      return "absl.flags"
    if module == "absl" and any(a.name == "flags" for a in node.names):
      return "absl.flags"
  return None


def library_offences_in_source(source, path="<source>"):
  """(path, line, message) for each flag import or read of a library module
  (the caller decides which files are library modules); none in an entry
  script."""
  tree = ast.parse(source, path)
  if _is_entry_script(tree):
    return []
  offences = []
  for node in ast.walk(tree):
    module = _forbidden_import(node)
    if module:
      offences.append((path, node.lineno,
                       f"library module imports {module}: flags are read "
                       "only in entry scripts and cli.py"))
    elif (isinstance(node, ast.Attribute) and node.attr == "value" and
          isinstance(node.value, ast.Name) and HOLDER.match(node.value.id)):
      offences.append((path, node.lineno,
                       f"library module reads {node.value.id}.value: flags "
                       "are read only in entry scripts and cli.py"))
  return sorted(offences)


def _imported_modules(node):
  """The top-level names of the modules an import statement imports."""
  if isinstance(node, ast.Import):
    return [alias.name.split(".")[0] for alias in node.names]
  if isinstance(node, ast.ImportFrom) and not node.level:
    return [(node.module or "").split(".")[0]]
  return []


def import_order_offences_in_source(source, path="<source>"):
  """(path, line, message) for each module an entry script imports before
  `cli` but the standard library's and absl's."""
  tree = ast.parse(source, path)
  if not _is_entry_script(tree):
    return []
  early = []
  for node in tree.body:
    modules = _imported_modules(node)
    if "cli" in modules:
      return [(path, line, f"entry script imports {module} before cli: cli's "
               "start-up environment must precede TensorFlow's import")
              for line, module in early]
    early += [(node.lineno, module) for module in modules
              if module not in sys.stdlib_module_names and module != "absl"]
  return []


def is_library_path(relative_path):
  """Whether a file (its path relative to the linted directory) is a library
  module: not `cli.py`, nor under `tests/`."""
  parts = os.path.normpath(relative_path).split(os.sep)
  return parts != [COMMAND_LINE_MODULE] and TEST_DIR not in parts[:-1]


def python_files(roots):
  """(path, path relative to its root) of every .py under `roots`."""
  for root in roots:
    if os.path.isfile(root):
      yield root, os.path.relpath(root)
      continue
    for directory, subdirs, files in os.walk(root):
      subdirs[:] = sorted(d for d in subdirs
                          if d not in SKIPPED_DIRS and not d.startswith("."))
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(directory, name)
          yield path, os.path.relpath(path, root)


def main(argv):
  offences = []
  files = list(python_files(argv[1:] or ["."]))
  for path, relative_path in files:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    offences.extend(offences_in_source(source, path))
    if is_library_path(relative_path):
      offences.extend(library_offences_in_source(source, path))
      offences.extend(import_order_offences_in_source(source, path))
  for path, line, message in offences:
    print(f"{path}:{line}: {message}")
  if offences:
    print(f"check_flags: {len(offences)} flag use(s) without .value or "
          "outside the entry scripts", file=sys.stderr)
    return 1
  print(f"check_flags: {len(files)} files, every flag read with .value, "
        "only in entry scripts and cli.py")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
