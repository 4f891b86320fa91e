r"""Turns a JSON config into command-line flags for the entry script it is for.

  python main.py $(python json_to_args.py configs/train_configs/demo_retrieval.json)

A config is a flat JSON object whose keys are flag names of one entry script.
Booleans become `--flag` / `--noflag`, lists `--flag=a,b,c`, null leaves the
flag at its default. The script is found from the config's directory
(`train_configs/` -> main.py, `generation_configs/` -> generation.py,
`query_cacher_configs/` -> query_cacher_tfrecord.py) or given by `--script`,
and every key must be one of its flags. With `--check`, any number of configs
are validated and nothing is printed but a summary.
"""

import importlib.util
import os
import sys

from absl import flags

import cli
import settings
import utils

SCRIPT_FOR_CONFIG_DIR = {
    "train_configs": "main.py",
    "generation_configs": "generation.py",
    "query_cacher_configs": "query_cacher_tfrecord.py",
}
_REPO = os.path.dirname(os.path.abspath(__file__))

_FLAG_SCRIPT = flags.DEFINE_string(
    "script", None,
    "Entry script the config is for. Default: found from the config's "
    f"directory ({', '.join(f'{d}/ -> {s}' for d, s in SCRIPT_FOR_CONFIG_DIR.items())}).")
_FLAG_CHECK = flags.DEFINE_bool(
    "check", False,
    "Only validate the configs given (any number) against their scripts.")


def _scalar_text(path, key, value):
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise utils.UserError(
        f"{path}: key {key!r}: lists may hold only numbers and strings, "
        f"got {value!r}")
  text = str(value)
  if any(c.isspace() for c in text):
    raise utils.UserError(
        f"{path}: key {key!r}: value {text!r} contains white space, which "
        "$(...) would split; give this flag on the command line instead")
  return text


def config_to_args(config, path="config"):
  """A flat config dict -> a list of `--flag=value` arguments."""
  args = []
  for key, value in config.items():
    if value is None:
      continue
    if isinstance(value, bool):
      args.append(f"--{key}" if value else f"--no{key}")
    elif isinstance(value, list):
      items = [_scalar_text(path, key, item) for item in value]
      if any("," in item for item in items):
        raise utils.UserError(
            f"{path}: key {key!r}: list items cannot contain commas")
      args.append(f"--{key}={','.join(items)}")
    elif isinstance(value, dict):
      raise utils.UserError(
          f"{path}: key {key!r}: nested objects cannot be flags; "
          "expected a number, string, boolean or list")
    else:
      args.append(f"--{key}={_scalar_text(path, key, value)}")
  return args


def script_for_config(path):
  """The entry script a config is for, from its directory."""
  config_dir = os.path.basename(os.path.dirname(os.path.abspath(path)))
  if config_dir not in SCRIPT_FOR_CONFIG_DIR:
    raise utils.UserError(
        f"{path}: cannot tell which script it is for from its directory "
        f"{config_dir!r}; pass --script")
  return os.path.join(_REPO, SCRIPT_FOR_CONFIG_DIR[config_dir])


def script_flag_names(script_path):
  """The flags `script_path` accepts, found by importing it (not running it)."""
  if not os.path.exists(script_path):
    raise utils.UserError(f"--script: {script_path} does not exist")
  own = {flag.name for flag in
         flags.FLAGS.get_flags_for_module(sys.modules[__name__])}
  module_dir = os.path.dirname(os.path.abspath(script_path))
  if module_dir not in sys.path:
    sys.path.insert(0, module_dir)
  spec = importlib.util.spec_from_file_location(
      "_config_target_" + os.path.basename(script_path)[:-3], script_path)
  before = set(flags.FLAGS)
  spec.loader.exec_module(importlib.util.module_from_spec(spec))
  names = set(flags.FLAGS) - own
  # Forgotten again, so that the next script may define flags of the same
  # names (main.py and generation.py both have --batch_size).
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  return names


def check_keys(config, path, script_path, flag_names):
  for key in config:
    if key not in flag_names:
      raise utils.UserError(
          f"{path}: key {key!r} matches no flag of "
          f"{os.path.basename(script_path)}")


def main(argv):
  paths = argv[1:]
  if not paths:
    raise utils.UserError("give a JSON config file (or several, with --check)")
  if len(paths) > 1 and not _FLAG_CHECK.value:
    raise utils.UserError("several configs need --check; give one to convert")
  flag_names_by_script = {}
  for path in paths:
    config = settings.read_flat_config(path)
    script = _FLAG_SCRIPT.value or script_for_config(path)
    if script not in flag_names_by_script:
      flag_names_by_script[script] = script_flag_names(script)
    check_keys(config, path, script, flag_names_by_script[script])
    args = config_to_args(config, path)
    if not _FLAG_CHECK.value:
      print(" ".join(args))
  if _FLAG_CHECK.value:
    print(f"ok: {len(paths)} config(s) match the flags of "
          f"{', '.join(sorted(os.path.basename(s) for s in flag_names_by_script))}")


if __name__ == "__main__":
  cli.run(main, takes_arguments=True)
