"""The README's commands and its flags section, checked against the scripts.

Every shell command in README.md that runs one of the project's scripts
(`python X.py ...`, `.venv/bin/python X.py ...`, `make TARGET`) must name a
script that exists, flags that script accepts, `configs/` paths that exist,
configs whose keys are flags of the script they are expanded into, and Make
targets that exist (whose own recipes are checked the same way). The section
between `<!-- section:flags -->` and `<!-- /section:flags -->` must document
every flag of every entry script, under that script's heading.

A script's flags are read from the script itself: one subprocess imports the
entry scripts one after another (not as `__main__`, so none runs), lists the
flags each defined and deletes them before the next (the scripts share flag
names). A script's flags are absl's own (`--flagfile`, `--helpfull`, logging)
and those of the project's modules; flags that third-party libraries define
when imported (TensorFlow defines some) are not counted, so that the answer
does not depend on which script imported a library first.
"""

import dataclasses
import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import json_to_args
import settings
import utils

# Slow, the whole module (one process imports every entry script):
# not in `make test-fast`.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MAKEFILE = os.path.join(REPO, "Makefile")
ENTRY_SCRIPT_DIRS = ("", "util_scripts", "bench")
# A flag defined by absl, or a config's flags made by `cli.define_flags`.
DEFINE_LINE = re.compile(r"^\w+\s*=\s*(flags\.DEFINE_\w+|cli\.define_flags)\(",
                         re.MULTILINE)
MAIN_GUARD = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)
SECTION_START = "<!-- section:flags -->"
SECTION_END = "<!-- /section:flags -->"
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console", "zsh"}
PYTHON_PROGRAM = re.compile(r"^(?:\S*/)?python(?:3(?:\.\d+)?)?$")
MAKE_PYTHON = re.compile(r"\$[({](?:PY|PYTHON)[)}]")
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")
CONFIG_PATH = re.compile(
    r"(?<![\w/.-])((?:\./)?configs/(?:\{[^{}\s`]*\}|[^\s'\",;)`\]{}])*)")
PLACEHOLDER = "__SUBSTITUTION_{}__"


def _rel(path):
  return os.path.normpath(os.path.relpath(os.path.join(REPO, path), REPO))


@functools.lru_cache(maxsize=None)
def entry_scripts():
  """Repo-relative paths of the scripts that define absl flags and run."""
  found = []
  for directory in ENTRY_SCRIPT_DIRS:
    for path in sorted(glob.glob(os.path.join(REPO, directory, "*.py"))):
      with open(path, encoding="utf-8") as f:
        source = f.read()
      if DEFINE_LINE.search(source) and MAIN_GUARD.search(source):
        found.append(_rel(path))
  return tuple(found)


# --------------------------------------------------------------------------
# A script's flags, from one process that imports the entry scripts in turn.


@dataclasses.dataclass
class ScriptFlags:
  script: str
  flags: dict  # name -> {"file": defining module, "type": absl's flag type}
  error: str = ""

  @property
  def names(self):
    return set(self.flags)

  @property
  def own(self):
    """Flags of the script and of the project modules it imports (no absl)."""
    return {name for name, info in self.flags.items()
            if _is_project_module(info["file"])}

  def problem_with(self, token):
    """Why `--token[=value]` is not accepted, or None."""
    name = token.lstrip("-").split("=", 1)[0]
    if name in self.flags:
      return None
    if (name.startswith("no") and name[2:] in self.flags and
        self.flags[name[2:]]["type"] == "bool"):
      return None
    return f"{token.split('=', 1)[0]} is not a flag of {self.script}"


def _is_project_module(module):
  if module.endswith(".py"):  # the script itself, named as run
    return True
  return os.path.exists(os.path.join(REPO, *module.split(".")) + ".py")


# Run as `python -c _LIST_FLAGS REPO SCRIPT...` in REPO; prints JSON {"absl":
# [absl's flags], "scripts": {script: {"flags": {name: {"file", "type"}}} or
# {"error": traceback}}}. Each script is imported as `python SCRIPT` would
# import it (its directory first on sys.path, sys.argv[0] the script), under
# the name `python SCRIPT` gives its flags' module: the script's path.
_LIST_FLAGS = """
import json, os, runpy, sys, traceback
from absl import app, flags
app.define_help_flags()  # As app.run does before it parses the flags.
absl_flags = set(flags.FLAGS)
repo, scripts = sys.argv[1], sys.argv[2:]
search_path = sys.path[1:]
found = {}
for script in scripts:
  sys.path[:] = [os.path.dirname(os.path.join(repo, script))] + search_path
  sys.argv = [script]
  try:
    runpy.run_path(script, run_name=script)
  except BaseException:  # SystemExit too: report it, go on with the next.
    found[script] = {"error": traceback.format_exc()[-1500:]}
  else:
    found[script] = {"flags": {  # By long name, as --helpxml lists them.
        flag.name: {"file": module, "type": flag.flag_type()}
        for module, module_flags in flags.FLAGS.flags_by_module_dict().items()
        for flag in module_flags}}
  for name in set(flags.FLAGS) - absl_flags:
    delattr(flags.FLAGS, name)
print(json.dumps({"absl": sorted(absl_flags), "scripts": found}))
"""


def read_script_flags(scripts):
  """{script: ScriptFlags} of repo-relative scripts, from one subprocess."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  scripts = sorted(set(scripts))
  try:
    result = subprocess.run(
        [sys.executable, "-c", _LIST_FLAGS, REPO, *scripts], cwd=REPO,
        env=env, capture_output=True, text=True, timeout=600)
  except subprocess.TimeoutExpired:
    return {script: ScriptFlags(script, {}, "listing its flags timed out")
            for script in scripts}
  if result.returncode != 0:
    return {script: ScriptFlags(script, {}, "listing the flags failed (exit "
                                f"{result.returncode}): {result.stderr[-1500:]}")
            for script in scripts}
  listed = json.loads(result.stdout.splitlines()[-1])
  absl_flags = set(listed["absl"])
  found = {}
  for script, entry in listed["scripts"].items():
    if "error" in entry:
      found[script] = ScriptFlags(script, {}, "importing it failed: " +
                                  entry["error"])
      continue
    found[script] = ScriptFlags(script, {
        name: info for name, info in entry["flags"].items()
        if name in absl_flags or _is_project_module(info["file"])})
  return found


class FlagCache:
  """ScriptFlags per script, each script imported at most once."""

  def __init__(self, prefetch):
    self._cache = read_script_flags(prefetch)

  def get(self, script):
    script = _rel(script)
    if script not in self._cache:
      self._cache.update(read_script_flags([script]))
    return self._cache[script]


# --------------------------------------------------------------------------
# Commands in the README.


@dataclasses.dataclass
class Line:
  number: int  # first README line of the logical line
  code: str  # without the comment
  comment: str
  source: str  # "block" or "inline"

  @property
  def where(self):
    text = (self.code + (" # " + self.comment if self.comment else "")).strip()
    if len(text) > 110:
      text = text[:107] + "..."
    return f"README.md:{self.number}: `{text}`"


def _split_comment(line):
  quote = None
  depth = 0
  for i, c in enumerate(line):
    if quote:
      if c == quote:
        quote = None
    elif c in "'\"":
      quote = c
    elif c == "(":
      depth += 1
    elif c == ")":
      depth = max(0, depth - 1)
    elif c == "#" and depth == 0 and (i == 0 or line[i - 1].isspace()):
      return line[:i].rstrip(), line[i + 1:].strip()
  return line.rstrip(), ""


def fenced_shell_lines(text):
  """Logical lines (continuations joined) of the README's shell code blocks."""
  lines = []
  fence = None
  shell = False
  pending = None
  for number, raw in enumerate(text.splitlines(), 1):
    stripped = raw.strip()
    if fence is None:
      match = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", stripped)
      if match:
        fence = match.group(1)
        shell = match.group(2).lower() in SHELL_LANGUAGES
      continue
    if stripped.startswith(fence) and not stripped.strip(fence[0]):
      if pending:
        lines.append(pending)
      fence, pending = None, None
      continue
    if not shell or (not stripped and pending is None):
      continue
    if pending is None:
      if stripped.startswith("$ "):
        stripped = stripped[2:]
      pending = [number, stripped]
    else:
      pending[1] += " " + stripped
    if pending[1].endswith("\\"):
      pending[1] = pending[1][:-1].rstrip()
    else:
      lines.append(pending)
      pending = None
  return [Line(number, *_split_comment(text), "block")
          for number, text in lines]


def inline_command_lines(text):
  """Inline code spans of the prose that are commands of a project script."""
  lines = []
  in_block = False
  for number, raw in enumerate(text.splitlines(), 1):
    if re.match(r"^\s*(`{3,}|~{3,})", raw):
      in_block = not in_block
      continue
    if in_block:
      continue
    for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", raw):
      words = span.split()
      if not words:
        continue
      if (PYTHON_PROGRAM.match(words[0]) or words[0] == "make" or
          (words[0].endswith(".py") and len(words) > 1 and
           all(w.strip("[]").startswith("-") for w in words[1:]))):
        lines.append(Line(number, span, "", "inline"))
  return lines


def _segments(code):
  """Simple commands of a shell line: lists of words, split at ; && | ( ) ..."""
  lexer = shlex.shlex(code, posix=True, punctuation_chars=";&|()<>")
  lexer.whitespace_split = True
  lexer.commenters = ""
  segment = []
  for token in lexer:
    if token and all(c in ";&|()<>" for c in token):
      if segment:
        yield segment
      segment = []
    else:
      segment.append(token)
  if segment:
    yield segment


def _command(words):
  """("python", script, args) / ("make", None, args) / None."""
  i = 0
  while i < len(words) and re.match(r"^[A-Za-z_]\w*=", words[i]):
    i += 1  # VAR=value before the program
  if i >= len(words):
    return None
  program, rest = words[i], words[i + 1:]
  if PYTHON_PROGRAM.match(program):
    j = 0
    while j < len(rest) and rest[j].startswith("-"):
      if rest[j] in ("-m", "-c"):
        return None  # a module or inline code, not a script of the project
      j += 1
    if j >= len(rest):
      return None
    return ("python", rest[j], rest[j + 1:])
  if program.endswith(".py"):
    return ("python", program, rest)
  if os.path.basename(program) == "make":
    return ("make", None, rest)
  return None


def _flag_words(args):
  """Words that are flags (`--x`, `--x=v`, `-x`), up to a lone `--`."""
  for word in args:
    word = word.strip("[]")
    if word == "--":
      return
    if word.startswith("-") and len(word) > 1:
      yield word


def _expand_braces(path):
  match = re.search(r"\{([^{}]*)\}", path)
  if not match:
    return [path]
  return [expanded for choice in match.group(1).split(",")
          for expanded in _expand_braces(
              path[:match.start()] + choice + path[match.end():])]


def _config_paths(text):
  """`configs/...` paths in text, braces expanded (`demo_{a,b}.json`)."""
  paths = []
  for path in CONFIG_PATH.findall(text.replace("\\*", "*")):
    paths.extend(_expand_braces(path.rstrip(".:")))
  return paths


def _path_exists(path):
  full = os.path.join(REPO, path)
  if any(c in path for c in "*?["):
    return bool(glob.glob(full))
  return os.path.exists(full)


def make_rules():
  """{target: (prerequisites, [(Makefile line, recipe line)])}."""
  rules = {}
  current = []
  with open(MAKEFILE, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.startswith("\t"):
        for target in current:
          rules[target][1].append((number, line.strip()))
        continue
      if not line.strip():
        continue
      match = re.match(r"^([^\s:=#][^:=#]*?)\s*::?(?!=)(.*)$", line)
      current = match.group(1).split() if match else []
      for target in current:
        rules.setdefault(target, ([], []))[0].extend(
            match.group(2).split("#")[0].split())
  return rules


class Checker:
  """Collects one message per problem found in the README's commands."""

  def __init__(self, flag_cache):
    self.flags = flag_cache
    self.rules = make_rules()
    self.problems = []
    self.commands_seen = 0
    self.configs_expanded = 0

  def _problem(self, where, message):
    if f"{where}: {message}" not in self.problems:
      self.problems.append(f"{where}: {message}")

  def check_line(self, line):
    for path in _config_paths(line.code + " " + line.comment):
      if not _path_exists(path):
        self._problem(line.where, f"{path} does not exist")
    self.check_code(line.code, line.where)
    # A comment may spell out a command (`make demo  # = python ...`).
    if re.search(r"(?:^|\s)(?:\S*/)?python3?\s+\S+\.py", line.comment):
      command = re.search(r"(?:^|\s)((?:\S*/)?python3?\s+\S+\.py.*)$",
                          line.comment).group(1)
      self.check_code(command, line.where + " (in the comment)")

  def check_code(self, code, where):
    substitutions = []

    def stash(match):
      substitutions.append(match.group(1))
      return " " + PLACEHOLDER.format(len(substitutions) - 1) + " "

    outer = SUBSTITUTION.sub(stash, code)
    for words in self._segments_or_problem(outer, where):
      command = _command(words)
      if command is None:
        continue
      self.commands_seen += 1
      kind, script, args = command
      if kind == "make":
        self.check_make(args, where)
        continue
      self.check_script(script, args, where)
      for word in args:
        match = re.fullmatch(PLACEHOLDER.format(r"(\d+)"), word)
        if match:
          self.check_substitution(substitutions[int(match.group(1))], script,
                                  where)

  def check_script(self, script, args, where):
    if not os.path.isfile(os.path.join(REPO, script)):
      self._problem(where, f"{script} does not exist")
      return None
    flag_words = list(_flag_words(args))
    if _rel(script) not in set(entry_scripts()):
      for word in flag_words:
        self._problem(where, f"{script} defines no absl flags, but is given "
                      f"{word}")
      return None
    flags = self.flags.get(script)
    if flags.error:
      self._problem(where, f"cannot read the flags of {script}: {flags.error}")
      return None
    for word in flag_words:
      problem = flags.problem_with(word)
      if problem:
        self._problem(where, problem)
    return flags

  def _segments_or_problem(self, code, where):
    """The commands of `code` as word lists; none, and a problem, if it
    cannot be split into words."""
    try:
      return list(_segments(code))
    except ValueError as error:
      self._problem(where, f"cannot split {code!r} into words: {error}")
      return []

  def check_substitution(self, inner, outer_script, where):
    for words in self._segments_or_problem(inner, where):
      command = _command(words)
      if command is None or command[0] != "python":
        continue
      _, script, args = command
      self.commands_seen += 1
      self.check_script(script, args, where)
      if os.path.basename(script) != "json_to_args.py":
        continue
      target = None
      positional = []
      skip_next = False
      for word in args:
        if skip_next:
          target, skip_next = word, False
        elif word == "--script":
          skip_next = True
        elif word.startswith("--script="):
          target = word.split("=", 1)[1]
        elif not word.startswith("-"):
          positional.append(word)
      if not positional:
        self._problem(where, "json_to_args.py is given no config")
      for config_path in positional:
        self.check_config(config_path, target, outer_script, where)

  def check_config(self, config_path, target, outer_script, where):
    full = os.path.join(REPO, config_path)
    if not os.path.isfile(full):
      self._problem(where, f"{config_path} does not exist")
      return
    try:
      config = settings.read_flat_config(full)
      target = (os.path.join(REPO, target) if target else
                json_to_args.script_for_config(full))
    except utils.UserError as error:
      self._problem(where, f"json_to_args.py: {error}")
      return
    self.configs_expanded += 1
    target = _rel(os.path.relpath(target, REPO))
    if target != _rel(outer_script):
      self._problem(where, f"{config_path} is a config of {target} (as "
                    f"json_to_args.py decides), but its flags are given to "
                    f"{outer_script}")
    flags = self.flags.get(target)
    if flags.error:
      self._problem(where, f"cannot read the flags of {target}: {flags.error}")
      return
    for key in config:
      if key not in flags.names:
        self._problem(where, f"{config_path}: key {key!r} is not a flag of "
                      f"{target}")

  def check_make(self, args, where):
    for word in args:
      if word.startswith("-") or "=" in word:
        continue
      if word not in self.rules:
        self._problem(where, f"`make {word}`: no such target in the Makefile")
        continue
      self.check_recipes(word, where, set())

  def check_recipes(self, target, where, done):
    """The recipes of a target and of the targets it depends on."""
    if target in done or target not in self.rules:
      return
    done.add(target)
    prerequisites, recipes = self.rules[target]
    for prerequisite in prerequisites:
      self.check_recipes(prerequisite, where, done)
    for number, recipe in recipes:
      self.check_code(MAKE_PYTHON.sub("python", recipe),
                      f"{where} -> Makefile:{number}: `{recipe}`")


@pytest.fixture(scope="module")
def readme():
  with open(README, encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def script_flags():
  """FlagCache of every entry script, all listed by one subprocess."""
  return FlagCache(entry_scripts())


def _report(problems):
  return "\n".join(["README problems:"] + problems)


def test_readme_code_block_commands(readme, script_flags):
  """Fenced shell blocks: scripts, flags, configs/ paths, configs, targets."""
  lines = fenced_shell_lines(readme)
  checker = Checker(script_flags)
  for line in lines:
    checker.check_line(line)
  assert not checker.problems, _report(checker.problems)
  # The extraction itself must keep finding the README's commands.
  assert checker.commands_seen >= 15, checker.commands_seen
  assert checker.configs_expanded >= 3, checker.configs_expanded


def test_readme_inline_commands(readme, script_flags):
  """Commands in inline code spans (`python util_scripts/x.py --flag=...`)."""
  checker = Checker(script_flags)
  for line in inline_command_lines(readme):
    checker.check_line(line)
  assert not checker.problems, _report(checker.problems)


def test_readme_config_paths_exist(readme):
  """Every `configs/...` path the README mentions, commands or prose."""
  problems = []
  for number, line in enumerate(readme.splitlines(), 1):
    for path in _config_paths(line):
      if not _path_exists(path):
        problems.append(f"README.md:{number}: {path} does not exist")
  assert not problems, _report(problems)


def _flags_section(readme):
  assert readme.count(SECTION_START) == 1, f"README needs one {SECTION_START}"
  assert readme.count(SECTION_END) == 1, f"README needs one {SECTION_END}"
  start = readme.index(SECTION_START)
  end = readme.index(SECTION_END)
  assert start < end, f"{SECTION_START} must come before {SECTION_END}"
  first_line = readme.count("\n", 0, start) + 1
  return readme[start:end], first_line


def _subsections(section, first_line):
  """{script: (README line, text)} of the section's `### `script`` parts."""
  found = {}
  parts = re.split(r"(?m)^(?=### )", section)
  line = first_line
  for part in parts:
    heading = part.splitlines()[0] if part else ""
    if heading.startswith("### "):
      for name in re.findall(r"`([^`]+\.py)`", heading):
        found[_rel(name)] = (line, part)
    line += part.count("\n")
  return found


def test_flags_section_documents_every_flag(readme, script_flags):
  section, first_line = _flags_section(readme)
  subsections = _subsections(section, first_line)
  problems = []
  for script in entry_scripts():
    flags = script_flags.get(script)
    assert not flags.error, f"cannot read the flags of {script}: {flags.error}"
    if script not in subsections:
      problems.append(f"README.md:{first_line}: the flags section has no "
                      f"`### `{script}`` heading")
      continue
    line, text = subsections[script]
    mentioned = set(re.findall(r"(?<![\w-])--([A-Za-z_]\w*)", text))
    for name in sorted(flags.own - mentioned):
      problems.append(f"README.md:{line}: the flags section for {script} "
                      f"does not mention --{name}")
    for name in sorted(mentioned):
      problem = flags.problem_with("--" + name)
      if problem:
        problems.append(f"README.md:{line}: the flags section for {script} "
                        f"mentions --{name}: {problem}")
  assert not problems, _report(problems)


def test_every_flag_config_matches_its_script(script_flags):
  """Every config under configs/ that json_to_args.py expands: keys that are
  flags of its script and values that are flags, as `json_to_args.py --check`
  finds them (its command line is test_configs_and_lint.py's)."""
  checked = 0
  for directory in json_to_args.SCRIPT_FOR_CONFIG_DIR:
    paths = sorted(glob.glob(os.path.join(REPO, "configs", directory,
                                          "*.json")))
    for path in paths:
      script = json_to_args.script_for_config(path)
      flags = script_flags.get(os.path.relpath(script, REPO))
      assert not flags.error, f"cannot read the flags of {script}: {flags.error}"
      config = settings.read_flat_config(path)
      json_to_args.check_keys(config, path, script, flags.names)
      json_to_args.config_to_args(config, path)
      checked += 1
  # The search itself must keep finding the configs (nine today).
  assert checked >= 9, checked


def test_entry_scripts_are_found():
  scripts = entry_scripts()
  for expected in ("main.py", "generation.py", "query_cacher_tfrecord.py",
                   "json_to_args.py", os.path.join("util_scripts",
                                                   "run_demo.py")):
    assert expected in scripts, scripts
