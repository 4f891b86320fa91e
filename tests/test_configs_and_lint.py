"""json_to_args.py, the configs under configs/, check_flags.py, one-line errors."""

import glob
import os
import subprocess
import sys

import pytest

import check_flags
import json_to_args
import retrievers
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  return subprocess.run([sys.executable] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, **kwargs)


def _one_line_error(result):
  assert result.returncode == utils.USER_ERROR_EXIT_CODE, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  return errors[0]


def test_config_to_args_types():
  config = {"model_key": "gpt2-xl", "use_helper_words": True,
            "experimental_compile": False, "learning_rate": 5e-06,
            "batch_size": 8, "devices": ["/gpu:0", "/gpu:1"], "tpu": None}
  assert json_to_args.config_to_args(config) == [
      "--model_key=gpt2-xl", "--use_helper_words", "--noexperimental_compile",
      "--learning_rate=5e-06", "--batch_size=8", "--devices=/gpu:0,/gpu:1"]


@pytest.mark.parametrize("value,message", [
    ({"a": 1}, "nested objects cannot be flags"),
    ([[1, 2]], "lists may hold only numbers and strings"),
    ("two words", "contains white space"),
    (["a,b"], "list items cannot contain commas"),
])
def test_config_to_args_refuses_non_flag_values(value, message):
  with pytest.raises(utils.UserError, match=message) as error:
    json_to_args.config_to_args({"thing": value}, "x.json")
  assert "'thing'" in str(error.value)


@pytest.mark.slow
def test_cli_malformed_json_names_line_and_column(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{\n  "a": 1,\n  "b": \n}\n')
  line = _one_line_error(_run(["json_to_args.py", "--script=check_flags.py",
                               str(path)]))
  assert str(path) in line and "line 4, column 1" in line


@pytest.mark.slow
def test_cli_unknown_key_names_key_and_script(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(
      "from absl import flags\n"
      "_FLAG_RATE = flags.DEFINE_float('rate', 0.1, 'A rate.')\n")
  config = tmp_path / "config.json"
  config.write_text('{"rate": 0.5}')
  bad_config = tmp_path / "bad_config.json"
  bad_config.write_text('{"rate": 0.5, "rates": 2}')
  # --check, as the repository's configs are checked (test_readme.py checks
  # them in-process).
  line = _one_line_error(_run(["json_to_args.py", "--check",
                               f"--script={script}", str(config),
                               str(bad_config)]))
  assert f"{bad_config}: key 'rates' matches no flag of entry.py" in line
  result = _run(["json_to_args.py", f"--script={script}", str(config)])
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["--rate=0.5"]


def _configs_by_directory():
  found = {}
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*", "*.json"))):
    found.setdefault(os.path.basename(os.path.dirname(path)), []).append(path)
  return found


def test_every_config_directory_has_a_validator():
  validators = set(json_to_args.SCRIPT_FOR_CONFIG_DIR) | {
      "retriever_configs", "scann_configs"}
  assert set(_configs_by_directory()) <= validators


def test_retriever_configs_are_valid():
  paths = _configs_by_directory()["retriever_configs"]
  for path in paths:
    config = retrievers.load_retriever_config(path)
    assert config["num_block_records"] > 0


def test_scann_configs_are_valid():
  paths = _configs_by_directory()["scann_configs"]
  assert paths, "ship at least the default ScaNN config"
  for path in paths:
    assert retrievers.load_scann_config(path)


def test_check_flags_catches_a_planted_bad_use(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(
      "from absl import flags\n"
      "_FLAG_STEPS = flags.DEFINE_integer('steps', 1, 'Steps.')\n"
      "FLAG_NAME = flags.DEFINE_string(\n    'name', 'x', 'Name.')\n"
      "flags.mark_flag_as_required(FLAG_NAME)\n"
      "# _FLAG_STEPS in a comment is fine\n"
      "def f():\n"
      "  text = '_FLAG_STEPS in a string is fine'\n"
      "  return _FLAG_STEPS.value + len(FLAG_NAME.value)\n"
      "def g():\n"
      "  return _FLAG_STEPS + 1, FLAG_NAME.name\n")
  offences = check_flags.offences_in_source(bad.read_text(), "bad.py")
  assert offences == [("bad.py", 11, "_FLAG_STEPS used without .value"),
                      ("bad.py", 11, "FLAG_NAME used without .value")]
  result = _run(["check_flags.py", str(tmp_path)])
  assert result.returncode == 1
  assert f"{bad}:11: _FLAG_STEPS used without .value" in result.stdout


def test_check_flags_keeps_flags_out_of_library_modules(tmp_path):
  """Issue 12: flags are read only in entry scripts and cli.py; a library
  module takes typed configs."""
  library = (
      "import absl.flags\n"
      "from absl import app, flags\n"
      "import cli\n"
      "from cli import define_flags\n"
      "def f():\n"
      "  from absl.flags import FLAGS\n"
      "  return _FLAG_STEPS.value\n")
  assert check_flags.library_offences_in_source(library, "lib.py") == [
      ("lib.py", line, message) for line, message in (
          (1, "library module imports absl.flags: flags are read only in "
              "entry scripts and cli.py"),
          (2, "library module imports absl.flags: flags are read only in "
              "entry scripts and cli.py"),
          (3, "library module imports cli: flags are read only in entry "
              "scripts and cli.py"),
          (4, "library module imports cli: flags are read only in entry "
              "scripts and cli.py"),
          (6, "library module imports absl.flags: flags are read only in "
              "entry scripts and cli.py"),
          (7, "library module reads _FLAG_STEPS.value: flags are read only "
              "in entry scripts and cli.py"))]
  entry = ("from absl import flags\nimport cli\n"
           "_FLAG_STEPS = flags.DEFINE_integer('steps', 1, 'Steps.')\n"
           "def main(argv):\n  return _FLAG_STEPS.value\n"
           "if __name__ == \"__main__\":\n  main([])\n")
  assert check_flags.library_offences_in_source(entry, "entry.py") == []
  # A library that merely names things `value` or `flags` is fine.
  assert check_flags.library_offences_in_source(
      "import tensorflow as tf\nflags = tf.Variable(1).value\n") == []
  for name, source in (("library.py", library), ("entry.py", entry),
                       ("cli.py", library), ("tests/test_x.py", library),
                       ("pkg/tests/conftest.py", library),
                       ("pkg/helpers.py", "from absl import flags\n")):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(source)
  result = _run(["check_flags.py", str(tmp_path)])
  assert result.returncode == 1
  reported = sorted({line.split(":")[0] for line in result.stdout.splitlines()
                     if line.startswith(str(tmp_path))})
  assert reported == [str(tmp_path / "library.py"),
                      str(tmp_path / "pkg" / "helpers.py")], result.stdout


def test_check_flags_wants_cli_before_tensorflow_in_entry_scripts():
  """cli.py's start-up environment (no PyTorch, no Keras 3) works only if it
  is set before TensorFlow and transformers are imported."""
  main_guard = "if __name__ == \"__main__\":\n  main()\n"
  late = ("import os\nfrom absl import flags\nimport numpy as np\n"
          "import tensorflow as tf\nimport cli\nimport training\n" +
          main_guard)
  message = ("entry script imports {} before cli: cli's start-up "
             "environment must precede TensorFlow's import")
  assert check_flags.import_order_offences_in_source(late, "late.py") == [
      ("late.py", 3, message.format("numpy")),
      ("late.py", 4, message.format("tensorflow"))]
  first = ("import os\nimport sys\nfrom absl import flags\n"
           "sys.path.insert(0, '.')\nimport cli\nimport tensorflow as tf\n" +
           main_guard)
  assert check_flags.import_order_offences_in_source(first, "first.py") == []
  # Not an entry script, or one without cli: no rule.
  assert check_flags.import_order_offences_in_source(
      "import tensorflow as tf\nimport cli\n", "lib.py") == []
  assert check_flags.import_order_offences_in_source(
      "import tensorflow as tf\n" + main_guard, "plain.py") == []


def test_entry_scripts_start_without_pytorch_or_keras_3():
  """The start-up environment takes effect: an entry script's imports (cli,
  then the library) bring in transformers' TensorFlow GPT-2 without PyTorch
  or Keras 3, both installed here."""
  probe = ("import sys\nimport cli\nimport training\n"
           "from transformers import TFGPT2Model\n"
           "print(sorted(m for m in ('torch', 'keras') if m in sys.modules))\n")
  # Not this process's setting: the probe must make its own.
  env = {name: value for name, value in os.environ.items()
         if name not in ("USE_TF", "TF_USE_LEGACY_KERAS")}
  result = subprocess.run([sys.executable, "-c", probe], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(env, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.stdout.splitlines()[-1] == "[]", result.stderr[-2000:]


def test_check_flags_passes_on_the_repository():
  result = _run(["check_flags.py", "."])
  assert result.returncode == 0, result.stdout


_STRATEGY_ENTRY = (
    "import cli, tf_utils\n"
    "strategy_flags = cli.define_flags(tf_utils.StrategyConfig)\n"
    "cli.run(lambda argv: print(tf_utils.strategy_from_config(\n"
    "    strategy_flags.config())))\n")


# A flag that absl refuses, and a library UserError (test_tf_utils.py checks
# every strategy error in-process, "no TPU reachable" too).
@pytest.mark.parametrize("flag,expected", [
    ("--distribute_mode=GPUStrategy",
     "--distribute_mode='GPUStrategy' is not one of OneDeviceStrategy"),
    ("--devices=/gpu:3", "device '/gpu:3' not found; this host has"),
])
@pytest.mark.slow
def test_strategy_flags_bad_input_is_one_line(flag, expected):
  line = _one_line_error(_run(["-c", _STRATEGY_ENTRY, flag]))
  assert expected in line
