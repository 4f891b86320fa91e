"""Bad input to every entry script: one line, exit 2, the culprit named, nothing complete-looking written.

Issue 13: tried as a new user would, bad inputs gave tracebacks, silent wrong
results and hangs. Each case of `CASES` runs a script's `main` in this
process, as `cli.run` runs it (the flags parsed from an argv, `main`
through `utils.guarded`), and asserts: exit code 2; exactly one `error:`
line, and it is the last thing on stderr; the line names the culprit (flag,
file or field); no traceback (any exception but the exit fails the test with
its own); and no file that looks complete (done.json, manifest.json, the
script's output, ...) appears. A few cases run as real processes, one per
kind of script, to prove the command-line path itself.

Every script defines its flags at import, and two scripts share flag names
(--output_dir, --batch_size, ...): `_ScriptFlags` imports each script once
and swaps the registered flags when a case of another script runs.
"""

import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import typing

from absl import flags
import huggingface_hub
import pytest

import cache_fixtures
import caching
import cli
import gpt2_weights
import neighbour_cache
import run_dir
import task_specific
import tf_utils
import training
from util_scripts import demo_world
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")
FLAGS = flags.FLAGS
# Entry scripts that take positional arguments (cli.run's takes_arguments).
_TAKES_ARGUMENTS = {"json_to_args.py"}
# Files whose presence means a job finished: none may appear after a refusal.
_COMPLETE_NAMES = {
    "done.json", "manifest.json", "export_hf.json", "world.json",
    "generation_config.json", "kilt_metrics.json", "model.safetensors",
    "subset.json"}
_COMPLETE_SUFFIXES = ("generations.jsonl", "ablation_validation.json",
                      "ablation_test.json")


# ---------------------------------------------------------------------------
# Running a script in-process
# ---------------------------------------------------------------------------


def _is_absl_flag(name):
  return FLAGS.find_module_defining_flag(name, "").startswith("absl.")


class _ScriptFlags:
  """Imports entry scripts once each and registers one script's flags at a
  time; restores the flags of the session when closed."""

  def __init__(self):
    self.saved = dict(FLAGS._flags())  # pylint: disable=protected-access
    self.was_parsed = FLAGS.is_parsed()
    self.scripts = {}
    self._clear()

  def _clear(self):
    for name in list(FLAGS):
      if name in FLAGS and not _is_absl_flag(name):
        delattr(FLAGS, name)

  def activate(self, script):
    """The module of `script` (a path from the repository root), its flags
    the registered ones."""
    self._clear()
    if script in self.scripts:
      module, script_flags = self.scripts[script]
      for name, flag in script_flags.items():
        FLAGS[name] = flag
      return module
    path = os.path.join(ROOT, script)
    spec = importlib.util.spec_from_file_location(
        "bad_inputs_" + script.replace("/", "_")[:-3], path)
    module = importlib.util.module_from_spec(spec)
    # json_to_args.py looks itself up there.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    script_flags = {name: FLAGS[name] for name in FLAGS
                    if not _is_absl_flag(name)}
    self.scripts[script] = (module, script_flags)
    return module

  def close(self):
    self._clear()
    for name, flag in self.saved.items():
      if name not in FLAGS:
        FLAGS[name] = flag
    if self.was_parsed:
      FLAGS.mark_as_parsed()
    else:
      FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def script_flags():
  swapper = _ScriptFlags()
  yield swapper
  swapper.close()


def _run_in_process(script_flags, capsys, script, args):
  """(exit code, stderr) of `script` run with `args` as cli.run runs it."""
  module = script_flags.activate(script)
  FLAGS.unparse_flags()
  capsys.readouterr()
  try:
    argv = cli.parse_flags([script] + list(args))
    utils.guarded(module.main, script in _TAKES_ARGUMENTS)(argv)
    code = 0
  except SystemExit as exit_:
    code = exit_.code
  return code, capsys.readouterr().err


def _files(root):
  found = set()
  for directory, _, names in os.walk(root):
    found.update(os.path.join(directory, name) for name in names)
  return found


def _looks_complete(path):
  name = os.path.basename(path)
  return name in _COMPLETE_NAMES or name.endswith(_COMPLETE_SUFFIXES)


def assert_one_line_error(code, stderr, expected):
  """The `error:` line of a refusal; checks exit code 2, one such line, no
  traceback, and `expected` (substrings) in it."""
  assert code == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr[-3000:]
  for text in expected:
    assert text in errors[0], errors[0]
  return errors[0]


# ---------------------------------------------------------------------------
# The worlds the cases damage (module-scoped: each case costs milliseconds)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What a case builds its arguments from."""
  training_world: dict   # cache_fixtures.write_training_world
  trained: str           # a finished 2-step run of it
  runs: str              # its --output_dir
  demo: dict             # demo_world.build_world (tiny): KILT, REALM, ...
  tmp: str               # this case's own directory
  # Run after the case, pass or fail (e.g. releasing a lock it holds).
  cleanups: list = dataclasses.field(default_factory=list)

  def path(self, *parts):
    return os.path.join(self.tmp, *parts)

  def file_under_a_file(self, name="out"):
    """A path whose parent is a regular file (not a directory)."""
    blocker = self.path("a_file")
    with open(blocker, "w") as f:
      f.write("not a directory\n")
    return os.path.join(blocker, name)

  def regular_file(self, name="a_regular_file", text="x\n"):
    path = self.path(name)
    with open(path, "w") as f:
      f.write(text)
    return path

  def train_flags(self, *, output_dir=None, run_name="run", **overrides):
    return cache_fixtures.training_flags(
        self.training_world,
        self.path("runs") if output_dir is None else output_dir, run_name,
        **overrides)

  def copied_cache(self):
    target = self.path("cache")
    shutil.copytree(self.training_world["cache"], target)
    return target

  def copied_run(self):
    """A copy of the trained run: (its --output_dir, its directory)."""
    target = self.path("runs", "run")
    shutil.copytree(self.trained, target)
    for name in ("done.json",):
      os.remove(os.path.join(target, name))
    return self.path("runs"), target

  def manifest(self, cache_dir):
    with open(os.path.join(cache_dir, neighbour_cache.MANIFEST_NAME)) as f:
      return json.load(f)

  def write_manifest(self, cache_dir, manifest):
    with open(os.path.join(cache_dir, neighbour_cache.MANIFEST_NAME),
              "w") as f:
      json.dump(manifest, f)

  def kilt_dir(self, **files):
    """A copy of the demo's KILT directory with `files` ({split: bytes or
    None (removed) or "dir"}) replaced."""
    target = self.path("kilt")
    shutil.copytree(self.demo["paths"]["kilt_dir"], target)
    for split, content in files.items():
      path = os.path.join(target, _KILT_NAMES[split])
      os.remove(path)
      if content == "dir":
        os.makedirs(path)
      elif content is not None:
        with open(path, "wb") as f:
          f.write(content)
    return target

  def cacher_flags(self, **overrides):
    paths = self.demo["paths"]
    values = {"retriever_config_path": paths["retriever_config"],
              "dataset_root": paths["kilt_dir"],
              "output_dir": self.path("cache_out"),
              "tokenizer": paths["tokenizer"], "num_neighbours": 2,
              "num_shards": 1, "batch_size": 4, **overrides}
    return [f"--{name}={value}" for name, value in values.items()]


_KILT_NAMES = {"train": "eli5-train-kilt.jsonl",
               "validation": "eli5-dev-kilt.jsonl",
               "test": "eli5-test_without_answers-kilt.jsonl"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_inputs")
  training_world = cache_fixtures.write_training_world(root / "training")
  runs = str(root / "runs")
  training.train(cache_fixtures.training_config(training_world, runs, "run"))
  demo = demo_world.build_world(
      str(root / "demo"), num_train=6, num_validation=4, num_test=2,
      num_distractor_blocks=4, gpt2_vocab_size=300)
  return training_world, os.path.join(runs, "run"), runs, demo


# ---------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
  """A bad input: `build(context)` -> (args, expected substrings, paths that
  must not exist afterwards)."""
  name: str
  script: str
  build: typing.Callable


CASES = []


def case(name, script):
  def register(build):
    CASES.append(Case(name, script, build))
    return build
  return register


def _simple(name, script, args, *expected):
  """A case whose arguments do not depend on the worlds."""
  CASES.append(Case(name, script, lambda ctx: (list(args), expected, [])))


def _train(name, expected, **overrides):
  """main.py --task=train on the training world with `overrides`."""
  CASES.append(Case(name, "main.py", lambda ctx: (
      ["--task=train"] + ctx.train_flags(**overrides), expected,
      [ctx.path("runs", "run")])))


# main.py: settings no cache or model can make right (check_config).
for _name, _value, _message in (
    ("batch_size", 0, "--batch_size=0: expected >= 1"),
    ("batch_split", 0, "--batch_split=0: expected >= 1"),
    ("warmup_steps", -1, "--warmup_steps=-1"),
    ("weight_decay", -0.5, "--weight_decay=-0.5"),
    ("clip_norm", -1.0, "--clip_norm=-1.0"),
    ("max_steps", -3, "--max_steps=-3"),
    ("max_epochs", -1.0, "--max_epochs=-1.0"),
    ("batches_between_evals", -1, "--batches_between_evals=-1"),
    ("number_eval_batches", -2, "--number_eval_batches=-2"),
    ("log_every_steps", 0, "--log_every_steps=0"),
    ("log_samples", -1, "--log_samples=-1"),
    ("checkpoint_every_steps", 0, "--checkpoint_every_steps=0"),
    ("keep_checkpoints", 0, "--keep_checkpoints=0"),
    ("shuffle_buffer_size", 0, "--shuffle_buffer_size=0"),
    ("retrieval_bank_size", -1, "--retrieval_bank_size=-1"),
    ("eval_retrieval_temperature", -1.0, "--eval_retrieval_temperature=-1.0"),
    ("learning_rate", 0.0, "--learning_rate=0.0: expected a number > 0"),
    ("learning_rate", -1e-3, "--learning_rate=-0.001"),
    ("learning_rate", "nan", "--learning_rate=nan"),
    ("learning_rate", "inf", "--learning_rate=inf"),
    ("checkpoint_every_minutes", 0.0, "--checkpoint_every_minutes=0.0"),
    ("sequence_length", -1, "--sequence_length=-1"),
):
  _train(f"main_{_name}_{_value}", [_message], **{_name: _value})

# main.py: settings that need the cache or the model to judge.
_train("main_retrieval_temperature_0", ["--retrieval_temperature=0.0"],
       retrieval_temperature=0.0)
_train("main_more_retrievals_than_cached", ["5 neighbours asked for",
                                            "stores 4"], num_retrievals=5)
_train("main_batch_not_divisible", ["--batch_size=3", "--batch_split (2)"],
       batch_size=3, batch_split=2)
_train("main_no_max_steps", ["--max_steps or --max_epochs"], max_steps=0)
_train("main_missing_model_key", ["--model_key is required"], model_key="")
_train("main_missing_cache_dir", ["--cache_dir is required"], cache_dir="")
_train("main_missing_output_dir", ["--output_dir is required"],
       output_dir="")
_train("main_missing_run_name", ["--run_name is required"], run_name="")
_train("main_eval_split_dev", ["no split 'dev'"], eval_split="dev",
       batches_between_evals=1)
_train("main_eval_split_absent", ["no split 'test'"], eval_split="test",
       batches_between_evals=1)
_train("main_model_devices_unknown", ["/device:CPU:99"],
       model_devices="/device:CPU:99")
_train("main_model_devices_with_mirrored", ["--model_devices"],
       model_devices="/device:CPU:0",
       distribute_mode="MirroredStrategy")
_train("main_model_key_missing_dir", ["/no/such/model",
                                      "no such checkpoint directory"],
       model_key="/no/such/model")
_train("main_tokenizer_missing_dir", ["tokenizer '/no/such/tokenizer'"],
       tokenizer="/no/such/tokenizer")
_train("main_cache_dir_missing", ["/no/such/cache", "no manifest.json"],
       cache_dir="/no/such/cache")


def _offline(ctx):
  """The hub unreachable for this case (HF_HUB_OFFLINE), online or not."""
  offline = huggingface_hub.constants.HF_HUB_OFFLINE
  huggingface_hub.constants.HF_HUB_OFFLINE = True
  gpt2_weights.hub_reachable.cache_clear()

  def restore():
    huggingface_hub.constants.HF_HUB_OFFLINE = offline
    gpt2_weights.hub_reachable.cache_clear()

  ctx.cleanups.append(restore)


@case("main_unknown_hub_model_offline", "main.py")
def _(ctx):
  _offline(ctx)
  return (["--task=train"] + ctx.train_flags(
      model_key="no-such-org/no-such-gpt2-model"),
          ["--model_key=no-such-org/no-such-gpt2-model", "cannot be reached",
           "save_pretrained"], [ctx.path("runs", "run")])


@case("main_unknown_hub_tokenizer_offline", "main.py")
def _(ctx):
  _offline(ctx)
  return (["--task=train"] + ctx.train_flags(
      tokenizer="no-such-gpt2-tokenizer"),
          ["--tokenizer=no-such-gpt2-tokenizer", "cannot be reached"],
          [ctx.path("runs", "run")])
# Flags absl itself refuses (unknown, mistyped, not a choice): one line too.
for _script, _args, _message in (
    ("main.py", ["--no_such_flag=1"], "no_such_flag"),
    ("main.py", ["--batch_size=eight"], "--batch_size"),
    ("main.py", ["--optimizer_type=sgd"], "--optimizer_type"),
    ("main.py", ["--task=predict"], "--task"),
    ("main.py", ["--bf16=maybe"], "--bf16"),
    ("generation.py", ["--max_new_tokens=many"], "--max_new_tokens"),
    ("generation.py", ["--decoding=nucleus"], "--decoding"),
    ("query_cacher_tfrecord.py", ["--num_neighbours=1.5"], "--num_neighbours"),
    ("query_cacher_tfrecord.py", ["--search=faiss"], "--search"),
    ("util_scripts/kilt_eval.py", ["--baselines_seed=x"], "--baselines_seed"),
):
  _simple(f"absl_{_script.split('/')[-1][:-3]}_{_args[0][2:].split('=')[0]}",
          _script, _args, _message)

# main.py --task=evaluate: the grid's own settings.
for _name, _overrides, _message in (
    ("unknown_condition", dict(conditions="real,nonsense"),
     "unknown condition 'nonsense'"),
    ("twice_condition", dict(conditions="real,real"), "named twice"),
    ("eval_stride_negative", dict(eval_stride=-1), "--eval_stride=-1"),
    ("eval_stride_too_large", dict(eval_stride=99), "--eval_stride=99"),
):
  CASES.append(Case(f"main_evaluate_{_name}", "main.py", (
      lambda overrides, message: lambda ctx: (
          ["--task=evaluate"] + ctx.train_flags(
              output_dir=ctx.runs, run_name=os.path.basename(ctx.trained),
              **overrides), [message], []))(_overrides, _message)))

_simple("main_stray_argument", "main.py", ["--task=train", "stray"],
        "unexpected arguments: stray")


@case("main_output_dir_under_a_file", "main.py")
def _(ctx):
  output = ctx.file_under_a_file("runs")
  return (["--task=train"] + ctx.train_flags(output_dir=output),
          ["--output_dir=" + output, "is a file, expected a directory"],
          [output])


@case("main_output_dir_is_a_file", "main.py")
def _(ctx):
  output = ctx.regular_file("runs_file")
  return (["--task=train"] + ctx.train_flags(output_dir=output),
          ["--output_dir=" + output, "is a file, expected a directory"], [])


@case("main_run_dir_is_a_file", "main.py")
def _(ctx):
  os.makedirs(ctx.path("runs"))
  ctx.regular_file(os.path.join("runs", "run"))
  return (["--task=train"] + ctx.train_flags(),
          ["--run_name=", "is a file, expected a directory"], [])


def _model_dir(ctx, config_text):
  directory = ctx.path("model")
  os.makedirs(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(config_text)
  return directory


@case("main_model_config_mistyped", "main.py")
def _(ctx):
  with open(os.path.join(ctx.training_world["model"], "config.json")) as f:
    config = json.load(f)
  config["n_embd"] = "32"
  model = _model_dir(ctx, json.dumps(config))
  return (["--task=train"] + ctx.train_flags(model_key=model),
          ["config.json: n_embd is '32', expected int"], [])


@case("main_model_config_malformed", "main.py")
def _(ctx):
  model = _model_dir(ctx, "{\"n_layer\": 2,")
  return (["--task=train"] + ctx.train_flags(model_key=model),
          ["config.json: malformed JSON"], [])


@case("main_model_config_not_an_object", "main.py")
def _(ctx):
  model = _model_dir(ctx, "[1, 2]")
  return (["--task=train"] + ctx.train_flags(model_key=model),
          ["config.json: expected a JSON object"], [])


@case("main_model_vocabulary_differs_from_cache", "main.py")
def _(ctx):
  with open(os.path.join(ctx.training_world["model"], "config.json")) as f:
    config = json.load(f)
  config["vocab_size"] += 1
  model = _model_dir(ctx, json.dumps(config))
  return (["--task=train"] + ctx.train_flags(model_key=model),
          ["the model's vocabulary is"], [])


def _cache_case(name, damage, expected, **overrides):
  """main.py on a copy of the cache, damaged by `damage(ctx, cache_dir)`."""

  def build(ctx):
    cache_dir = ctx.copied_cache()
    extra = damage(ctx, cache_dir) or []
    return (["--task=train"] + ctx.train_flags(cache_dir=cache_dir,
                                                **overrides) + extra,
            [text.format(cache=cache_dir) for text in expected],
            [ctx.path("runs", "run", "done.json"),
             ctx.path("runs", "run", "final_model")])

  CASES.append(Case(name, "main.py", build))


def _edit_manifest(**changes):
  def damage(ctx, cache_dir):
    manifest = ctx.manifest(cache_dir)
    for key, value in changes.items():
      if value is None:
        del manifest[key]
      else:
        manifest[key] = value
    ctx.write_manifest(cache_dir, manifest)
  return damage


def _shard(cache_dir, index=0):
  return os.path.join(cache_dir, neighbour_cache.shard_name("train", index, 2))


def _truncate_shard(ctx, cache_dir):
  """Cuts the first train shard in its first record."""
  path = _shard(cache_dir)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:30])


def _corrupt_shard(ctx, cache_dir):
  """Flips a byte of the second train shard's first record."""
  path = _shard(cache_dir, 1)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[20] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _truncate_validation_tail(ctx, cache_dir):
  """Cuts the last record of a validation shard short: the first records,
  which the start-up check reads, stay whole."""
  path = os.path.join(cache_dir,
                      neighbour_cache.shard_name("validation", 1, 2))
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-6])


def _remove_shard(ctx, cache_dir):
  os.remove(_shard(cache_dir, 1))


def _empty_train_split(ctx, cache_dir):
  manifest = ctx.manifest(cache_dir)
  manifest["splits"]["train"]["num_records"] = 0
  ctx.write_manifest(cache_dir, manifest)


def _no_train_split(ctx, cache_dir):
  manifest = ctx.manifest(cache_dir)
  del manifest["splits"]["train"]
  ctx.write_manifest(cache_dir, manifest)


def _malformed_manifest(ctx, cache_dir):
  with open(os.path.join(cache_dir, neighbour_cache.MANIFEST_NAME), "w") as f:
    f.write("{\"format_version\": 1")


_cache_case("main_cache_manifest_of_another_tokenizer",
            _edit_manifest(tokenizer_fingerprint="another-tokenizer"),
            ["{cache}", "differs from the tokenizer asked for"])
_cache_case("main_cache_format_version", _edit_manifest(format_version=99),
            ["manifest.json: format_version 99"])
_cache_case("main_cache_malformed_manifest", _malformed_manifest,
            ["manifest.json: malformed JSON"])
_cache_case("main_cache_truncated_shard", _truncate_shard,
            ["{cache}/train-00000-of-00002.tfrecord",
             "corrupt or truncated TFRecord file"])
_cache_case("main_cache_corrupt_shard", _corrupt_shard,
            ["{cache}/train-00001-of-00002.tfrecord",
             "corrupt or truncated TFRecord file"])
_cache_case("main_cache_truncated_shard_at_periodic_eval",
            _truncate_validation_tail,
            ["{cache}: split 'validation'",
             "{cache}/validation-00001-of-00002.tfrecord"],
            batches_between_evals=1)
_cache_case("main_cache_missing_shard", _remove_shard,
            ["{cache}/train-00001-of-00002.tfrecord does not exist"])
_cache_case("main_cache_empty_train_split", _empty_train_split,
            ["the train split has no questions"])
_cache_case("main_cache_without_train_split", _no_train_split,
            ["no split 'train'"])
_cache_case("main_cache_truncated_shard_with_samples", _truncate_shard,
            ["{cache}/train-00000-of-00002.tfrecord"], log_samples=2)


def _resume_case(name, expected, damage=None, task="train", **overrides):
  """main.py on a copy of the trained run (done.json removed, so that a
  complete-looking done.json would be new)."""

  def build(ctx):
    output_dir, run = ctx.copied_run()
    if damage:
      damage(run)
    values = {name: value(ctx) if callable(value) else value
              for name, value in overrides.items()}
    return ([f"--task={task}"] + ctx.train_flags(output_dir=output_dir,
                                                  **values),
            [text.format(run=run) for text in expected],
            [os.path.join(run, "done.json"),
             os.path.join(run, "ablation_validation.json"),
             os.path.join(run, "ablation_test.json")])

  CASES.append(Case(name, "main.py", build))


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


_resume_case("main_resume_with_another_learning_rate",
             ["config.json: the run was made with --learning_rate=0.001",
              "--allow_changed_settings"], learning_rate=0.5, max_steps=4)
_resume_case("main_resume_with_another_model",
             ["another model config"], max_steps=4,
             model_key=lambda ctx: _other_model(ctx))
_resume_case("main_resume_with_corrupt_metrics",
             ["metrics.jsonl: line 2 is not a JSON record"],
             damage=lambda run: _write(os.path.join(run, "metrics.jsonl"),
                                       "{\"step\": 1}\nnot json\n"),
             max_steps=4)
_resume_case("main_resume_with_malformed_run_config",
             ["config.json: malformed JSON"],
             damage=lambda run: _write(os.path.join(run, "config.json"), "{"),
             max_steps=4)
_resume_case("main_evaluate_split_without_answers",
             ["--eval_split=test", "the split has no answers"], task="evaluate",
             eval_split="test",
             cache_dir=lambda ctx: _cache_with_test_split(ctx))
_resume_case("main_evaluate_unknown_split", ["no split 'dev'"],
             task="evaluate", eval_split="dev")
_resume_case("main_evaluate_truncated_checkpoint", ["ckpt-2"],
             damage=lambda run: _truncate_checkpoint_data(run),
             task="evaluate")


def _truncate_checkpoint_data(run):
  checkpoints = os.path.join(run, "checkpoints")
  for name in os.listdir(checkpoints):
    if name.startswith("ckpt-2.data"):
      path = os.path.join(checkpoints, name)
      with open(path, "rb") as f:
        data = f.read()
      with open(path, "wb") as f:
        f.write(data[:len(data) // 3])


@case("main_evaluate_missing_run", "main.py")
def _(ctx):
  return (["--task=evaluate"] + ctx.train_flags(),
          [ctx.path("runs", "run"), "no run here"], [ctx.path("runs")])


@case("main_run_locked_by_another_job", "main.py")
def _(ctx):
  output_dir, run = ctx.copied_run()
  # flock locks belong to an open file: a second open in this process
  # conflicts like another process would.
  lock = run_dir.lock(run, None, create=False)
  lock.__enter__()
  ctx.cleanups.append(lambda: lock.__exit__(None, None, None))
  return (["--task=train"] + ctx.train_flags(output_dir=output_dir,
                                              max_steps=4),
          [f"run directory {run}: in use by another job"],
          [os.path.join(run, "done.json")])


@case("main_finished_run_without_checkpoints", "main.py")
def _(ctx):
  output_dir, run = ctx.copied_run()
  shutil.rmtree(os.path.join(run, "checkpoints"))
  _write(os.path.join(run, "done.json"), "{\"step\": 2}\n")
  return (["--task=train"] + ctx.train_flags(output_dir=output_dir),
          ["done.json: the run finished", "holds no checkpoint"], [])


@case("main_nan_loss_keeps_a_good_checkpoint", "main.py")
def _(ctx):
  return (["--task=train"] + ctx.train_flags(learning_rate=1e30,
                                              checkpoint_every_steps=1,
                                              max_steps=6),
          ["stopping", "The last good checkpoint is"],
          [ctx.path("runs", "run", "done.json"),
           ctx.path("runs", "run", "final_model")])


# query_cacher_tfrecord.py: settings, then the inputs.
def _cacher(name, expected, **overrides):
  CASES.append(Case(name, "query_cacher_tfrecord.py", lambda ctx: (
      ctx.cacher_flags(**overrides), expected, [ctx.path("cache_out")])))


for _name in ("retriever_config_path", "dataset_root", "output_dir"):
  _cacher(f"cacher_missing_{_name}", [f"--{_name} is required"],
          **{_name: ""})
for _name in ("batch_size", "num_shards", "max_block_tokens"):
  _cacher(f"cacher_{_name}_0", [f"--{_name}=0: must be at least 1"],
          **{_name: 0})
_cacher("cacher_num_neighbours_negative", ["--num_neighbours=-1: must be >= 0"],
        num_neighbours=-1)
_cacher("cacher_block_token_cache_size", ["--block_token_cache_size=-1"],
        block_token_cache_size=-1)
_cacher("cacher_unknown_split", ["--splits=validation,dev: expected some of "
                                 "train, validation, test"],
        splits="validation,dev")
_cacher("cacher_no_split", ["--splits=: expected some of"], splits="")
_cacher("cacher_max_query_length_1", ["--max_query_length=1: expected 0 (no "
                                      "cut) or at least 2"],
        max_query_length=1)
_cacher("cacher_max_query_length", ["--max_query_length"],
        max_query_length=-2)
_cacher("cacher_scann_without_config", ["--search=scann needs "
                                        "--scann_config_path"],
        search="scann")
_cacher("cacher_retriever_config_missing", ["/no/such/retriever.json"],
        retriever_config_path="/no/such/retriever.json")
_cacher("cacher_more_neighbours_than_blocks", ["--num_neighbours=100000",
                                               "there are only"],
        num_neighbours=100000)
_cacher("cacher_tokenizer_missing", ["tokenizer '/no/such/tokenizer'"],
        tokenizer="/no/such/tokenizer")
_cacher("cacher_dataset_root_missing", ["/no/such/kilt"],
        dataset_root="/no/such/kilt")


@case("cacher_unknown_hub_tokenizer_offline", "query_cacher_tfrecord.py")
def _(ctx):
  _offline(ctx)
  return (ctx.cacher_flags(tokenizer="no-such-gpt2-tokenizer"),
          ["--tokenizer=no-such-gpt2-tokenizer", "cannot be reached"],
          [ctx.path("cache_out")])


@case("cacher_output_dir_under_a_file", "query_cacher_tfrecord.py")
def _(ctx):
  output = ctx.file_under_a_file("cache")
  return (ctx.cacher_flags(output_dir=output),
          [f"--output_dir={output}", "is a file"], [output])


@case("cacher_output_dir_is_a_file", "query_cacher_tfrecord.py")
def _(ctx):
  output = ctx.regular_file("cache_file")
  return (ctx.cacher_flags(output_dir=output),
          [f"--output_dir={output}", "is a file"], [])


@case("cacher_retriever_config_malformed", "query_cacher_tfrecord.py")
def _(ctx):
  config = ctx.regular_file("retriever.json", "{\"text_records\": ")
  return (ctx.cacher_flags(retriever_config_path=config),
          [config, "malformed JSON"], [ctx.path("cache_out")])


@case("cacher_retriever_config_unknown_key", "query_cacher_tfrecord.py")
def _(ctx):
  with open(ctx.demo["paths"]["retriever_config"]) as f:
    config = json.load(f)
  config["query_embeder_path"] = "typo"
  path = os.path.join(os.path.dirname(ctx.demo["paths"]["retriever_config"]),
                      f"bad-{os.path.basename(ctx.tmp)}.json")
  _write(path, json.dumps(config))
  ctx.cleanups.append(lambda: os.remove(path))
  return (ctx.cacher_flags(retriever_config_path=path),
          [path, "query_embeder_path"], [ctx.path("cache_out")])


@case("cacher_context_with_title_without_titles", "query_cacher_tfrecord.py")
def _(ctx):
  with open(ctx.demo["paths"]["retriever_config"]) as f:
    config = json.load(f)
  config.pop("title_records", None)
  path = os.path.join(os.path.dirname(ctx.demo["paths"]["retriever_config"]),
                      f"untitled-{os.path.basename(ctx.tmp)}.json")
  _write(path, json.dumps(config))
  ctx.cleanups.append(lambda: os.remove(path))
  return (ctx.cacher_flags(retriever_config_path=path,
                           context_with_title=True),
          ["--context_with_title", "no title_records"],
          [ctx.path("cache_out")])


def _kilt_case(name, split, content, expected):
  CASES.append(Case(name, "query_cacher_tfrecord.py", lambda ctx: (
      ctx.cacher_flags(dataset_root=ctx.kilt_dir(**{split: content})),
      expected, [ctx.path("cache_out", "manifest.json")])))


_LINE = (b'{"id": "q1", "input": "why", "output": [{"answer": "because"}]}\n')
_kilt_case("cacher_kilt_train_missing", "train", None,
           ["eli5-train-kilt.jsonl", "does not exist"])
_kilt_case("cacher_kilt_train_empty", "train", b"",
           ["eli5-train-kilt.jsonl", "no lines (an empty KILT ELI5 file)"])
_kilt_case("cacher_kilt_train_blank_lines", "train", b"\n\n  \n",
           ["eli5-train-kilt.jsonl", "no lines"])
_kilt_case("cacher_kilt_train_directory", "train", "dir",
           ["eli5-train-kilt.jsonl: is a directory"])
_kilt_case("cacher_kilt_train_not_utf8", "train",
           _LINE + b'{"id": "q2", "input": "caf\xe9"}\n',
           ["eli5-train-kilt.jsonl: line 2: not UTF-8"])
_kilt_case("cacher_kilt_train_malformed_json", "train",
           _LINE + b'{"id": "q2", "input": }\n',
           ["eli5-train-kilt.jsonl: line 2: malformed JSON"])
_kilt_case("cacher_kilt_train_not_an_object", "train", _LINE + b'[1, 2]\n',
           ["eli5-train-kilt.jsonl: line 2: expected a JSON object"])
_kilt_case("cacher_kilt_dev_non_string_answer", "validation",
           b'{"id": "v1", "input": "why", "output": [{"answer": 7}]}\n',
           ["eli5-dev-kilt.jsonl: line 1",
            "an 'answer' is int, expected a string"])
_kilt_case("cacher_kilt_dev_duplicate_id", "validation", _LINE + _LINE,
           ["eli5-dev-kilt.jsonl", "'q1' appears more than once"])
_kilt_case("cacher_kilt_dev_question_not_a_string", "validation",
           b'{"id": "v1", "input": 3, "output": []}\n',
           ["eli5-dev-kilt.jsonl: line 1"])


@case("cacher_locked_by_another_job", "query_cacher_tfrecord.py")
def _(ctx):
  output = ctx.path("cache_out")
  lock = utils.locked_directory(output, caching.LOCK_NAME,
                                f"neighbour cache {output}")
  lock.__enter__()
  ctx.cleanups.append(lambda: lock.__exit__(None, None, None))
  return (ctx.cacher_flags(), [f"neighbour cache {output}: in use by "
                               "another job"],
          [os.path.join(output, "manifest.json")])


# generation.py
def _generation(name, expected, *, run=True, **overrides):

  def build(ctx):
    values = {"output_path": ctx.path("gen", "generations.jsonl"),
              "batch_size": 2, "max_examples": 2}
    if run:
      values["run_dir"] = ctx.trained
    values.update(overrides)
    values = {name: value.format(tmp=ctx.tmp, final_model=os.path.join(
        ctx.trained, run_dir.FINAL_MODEL_DIR)) if isinstance(value, str)
              else value for name, value in values.items()}
    return ([f"--{name}={value}" for name, value in values.items()],
            expected, [ctx.path("gen", "generations.jsonl"),
                       ctx.path("gen", "generation_config.json")])

  CASES.append(Case(name, "generation.py", build))


_generation("generation_missing_output_path", ["--output_path is required"],
            output_path="")
_generation("generation_neither_run_nor_model", ["--model_key"], run=False)
_generation("generation_run_dir_missing", ["/no/such/run",
                                           "no config.json"],
            run_dir="/no/such/run")
_generation("generation_model_key_without_cache", ["--cache_dir is required "
                                                   "with --model_key"],
            run=False, model_key="{final_model}")
_generation("generation_cache_dir_missing", ["/no/such/cache"],
            cache_dir="/no/such/cache")
_generation("generation_batch_size_0", ["--batch_size"], batch_size=0)
_generation("generation_max_examples_negative", ["--max_examples"],
            max_examples=-1)
_generation("generation_num_beams_0", ["--num_beams"], decoding="beam",
            num_beams=0)
_generation("generation_max_new_tokens_negative", ["--max_new_tokens=-1"],
            max_new_tokens=-1)
_generation("generation_top_p_above_1", ["--top_p=1.5"], decoding="sampling",
            top_p=1.5)
_generation("generation_top_p_without_sampling", ["--top_p=0.5 applies only"],
            top_p=0.5)
_generation("generation_top_k_negative", ["--top_k=-1"], decoding="sampling",
            top_k=-1)
_generation("generation_repetition_penalty_0", ["--repetition_penalty=0.0"],
            repetition_penalty=0.0)
_generation("generation_temperature_negative", ["--temperature"],
            decoding="sampling", temperature=-1.0)
_generation("generation_evaluate_without_gold", ["--gold_path"],
            evaluate=True)
_generation("generation_title_map_missing", ["/no/such/map.json"],
            kilt_title_map="/no/such/map.json")
_generation("generation_tokenizer_missing", ["/no/such/tokenizer"],
            tokenizer="/no/such/tokenizer")
_generation("generation_more_retrievals_than_cached",
            ["5 neighbours asked for"], num_retrievals=5)


@case("generation_output_path_under_a_file", "generation.py")
def _(ctx):
  output = ctx.file_under_a_file("generations.jsonl")
  return ([f"--run_dir={ctx.trained}", f"--output_path={output}",
           "--max_examples=2", "--batch_size=2"],
          [f"--output_path={output}", "is a file"], [output])


@case("generation_output_path_is_a_directory", "generation.py")
def _(ctx):
  output = ctx.path("gen_dir")
  os.makedirs(output)
  return ([f"--run_dir={ctx.trained}", f"--output_path={output}",
           "--max_examples=2", "--batch_size=2"],
          [f"--output_path={output}", "is a directory"], [])


# json_to_args.py
_simple("json_to_args_no_config", "json_to_args.py", [],
        "give a JSON config file")
_simple("json_to_args_missing_config", "json_to_args.py",
        ["/no/such/train_configs/x.json"], "/no/such/train_configs/x.json")


@case("json_to_args_malformed", "json_to_args.py")
def _(ctx):
  os.makedirs(ctx.path("train_configs"))
  path = ctx.regular_file(os.path.join("train_configs", "x.json"),
                          "{\"batch_size\": ")
  return [path], [path, "malformed JSON"], []


@case("json_to_args_unknown_key", "json_to_args.py")
def _(ctx):
  os.makedirs(ctx.path("train_configs"))
  path = ctx.regular_file(os.path.join("train_configs", "x.json"),
                          "{\"batch_sise\": 4}")
  return [path], [path, "'batch_sise' matches no flag of main.py"], []


@case("json_to_args_nested_value", "json_to_args.py")
def _(ctx):
  os.makedirs(ctx.path("train_configs"))
  path = ctx.regular_file(os.path.join("train_configs", "x.json"),
                          "{\"batch_size\": {\"a\": 1}}")
  return [path], [path, "batch_size"], []


@case("json_to_args_unknown_directory", "json_to_args.py")
def _(ctx):
  path = ctx.regular_file("x.json", "{\"batch_size\": 4}")
  return [path], [path, "pass --script"], []


@case("json_to_args_several_without_check", "json_to_args.py")
def _(ctx):
  first = ctx.regular_file("a.json", "{}")
  second = ctx.regular_file("b.json", "{}")
  return [first, second], ["several configs need --check"], []


@case("json_to_args_script_missing", "json_to_args.py")
def _(ctx):
  path = ctx.regular_file("x.json", "{\"batch_size\": 4}")
  return (["--script=/no/such/script.py", path],
          ["--script: /no/such/script.py does not exist"], [])


# util_scripts/kilt_eval.py
_KILT_EVAL = "util_scripts/kilt_eval.py"
_GUESS = (b'{"id": "q1", "output": [{"answer": "because"}]}\n')


def _kilt_eval(name, expected, gold=True, guess_text=None, **flags_):
  """kilt_eval.py with the demo's gold file and a guess file holding
  `guess_text` (bytes), or the flags alone."""

  def build(ctx):
    args = []
    if gold:
      args.append("--gold=" + os.path.join(ctx.demo["paths"]["kilt_dir"],
                                           _KILT_NAMES["validation"]))
    if guess_text is not None:
      path = ctx.path("guess.jsonl")
      with open(path, "wb") as f:
        f.write(guess_text)
      args.append(f"--guess={path}")
    args += [f"--{name}={value.format(tmp=ctx.tmp)}"
             for name, value in flags_.items()]
    return (args, [text.format(tmp=ctx.tmp) for text in expected],
            [ctx.path("metrics.json"), ctx.path("table.md")])

  CASES.append(Case(name, _KILT_EVAL, build))


_kilt_eval("kilt_eval_no_gold", ["--gold is required"], gold=False,
           guess_text=_GUESS)
_kilt_eval("kilt_eval_neither_guess_nor_cache", ["give exactly one of"])
_kilt_eval("kilt_eval_guess_and_cache", ["give exactly one of"],
           guess_text=_GUESS, cache_dir="{tmp}")
_kilt_eval("kilt_eval_guess_missing", ["/no/such/guess.jsonl",
                                       "does not exist"],
           **{"guess": "/no/such/guess.jsonl"})
_kilt_eval("kilt_eval_guess_not_utf8", ["{tmp}/guess.jsonl: line 2: "
                                        "not UTF-8"],
           guess_text=_GUESS + b'{"id": "q2", "output": [{"answer": "\xff"}]}\n')
_kilt_eval("kilt_eval_guess_malformed", ["{tmp}/guess.jsonl: line 1: "
                                         "malformed JSON"],
           guess_text=b'{"id": \n')
_kilt_eval("kilt_eval_guess_empty", ["{tmp}/guess.jsonl"], guess_text=b"")
_kilt_eval("kilt_eval_title_map_with_guess", ["--kilt_title_map applies "
                                              "only with --cache_dir"],
           guess_text=_GUESS, kilt_title_map="{tmp}/map.json")
_kilt_eval("kilt_eval_cache_without_title_map", ["--cache_dir needs "
                                                 "--kilt_title_map"],
           cache_dir="{tmp}")
_kilt_eval("kilt_eval_num_provenance_negative", ["--num_provenance=-1"],
           cache_dir="{tmp}", kilt_title_map="{tmp}/map.json",
           num_provenance="-1")


@case("kilt_eval_gold_not_utf8", _KILT_EVAL)
def _(ctx):
  gold = ctx.path("gold.jsonl")
  with open(gold, "wb") as f:
    f.write(b'{"id": "q1", "input": "caf\xe9", "output": []}\n')
  guess = ctx.regular_file("guess.jsonl", _GUESS.decode())
  return ([f"--gold={gold}", f"--guess={guess}"],
          [f"{gold}: line 1: not UTF-8"], [])


@case("kilt_eval_output_path_under_a_file", _KILT_EVAL)
def _(ctx):
  gold = os.path.join(ctx.demo["paths"]["kilt_dir"], _KILT_NAMES["validation"])
  output = ctx.file_under_a_file("metrics.json")
  return ([f"--gold={gold}", f"--guess={gold}", f"--output_path={output}"],
          [f"--output_path={output}", "is a file"], [output])


@case("kilt_eval_markdown_path_under_a_file", _KILT_EVAL)
def _(ctx):
  gold = os.path.join(ctx.demo["paths"]["kilt_dir"], _KILT_NAMES["validation"])
  output = ctx.file_under_a_file("table.md")
  return ([f"--gold={gold}", f"--guess={gold}", f"--markdown_path={output}"],
          [f"--markdown_path={output}", "is a file"], [output])


# util_scripts/kilt_title_map.py
_TITLE_MAP = "util_scripts/kilt_title_map.py"


@case("kilt_title_map_no_knowledge_source", _TITLE_MAP)
def _(ctx):
  return [f"--output_path={ctx.path('map.json')}"], [
      "--knowledge_source is required"], [ctx.path("map.json")]


@case("kilt_title_map_no_output_path", _TITLE_MAP)
def _(ctx):
  return [f"--knowledge_source={ctx.demo['paths']['knowledge_source']}"], [
      "--output_path is required"], []


@case("kilt_title_map_source_missing", _TITLE_MAP)
def _(ctx):
  return (["--knowledge_source=/no/such/ks.json",
           f"--output_path={ctx.path('map.json')}"],
          ["/no/such/ks.json", "does not exist"], [ctx.path("map.json")])


@case("kilt_title_map_source_not_utf8", _TITLE_MAP)
def _(ctx):
  source = ctx.path("ks.json")
  with open(source, "wb") as f:
    f.write(b'{"_id": "1", "wikipedia_id": "1", "wikipedia_title": "\xff"}\n')
  return ([f"--knowledge_source={source}",
           f"--output_path={ctx.path('map.json')}"],
          [f"{source}: line 1: not UTF-8"], [ctx.path("map.json")])


@case("kilt_title_map_source_malformed", _TITLE_MAP)
def _(ctx):
  source = ctx.regular_file("ks.json", "{\"_id\": \n")
  return ([f"--knowledge_source={source}",
           f"--output_path={ctx.path('map.json')}"],
          [f"{source}: line 1: malformed JSON"], [ctx.path("map.json")])


@case("kilt_title_map_output_under_a_file", _TITLE_MAP)
def _(ctx):
  output = ctx.file_under_a_file("map.json")
  return ([f"--knowledge_source={ctx.demo['paths']['knowledge_source']}",
           f"--output_path={output}"],
          [f"--output_path={output}", "is a file"], [output])


@case("kilt_title_map_output_is_a_directory", _TITLE_MAP)
def _(ctx):
  output = ctx.path("map_dir")
  os.makedirs(output)
  return ([f"--knowledge_source={ctx.demo['paths']['knowledge_source']}",
           f"--output_path={output}"],
          [f"--output_path={output}", "is a directory"], [])


# util_scripts/export_hf.py
_EXPORT = "util_scripts/export_hf.py"


@case("export_hf_no_run_dir", _EXPORT)
def _(ctx):
  return [f"--output_dir={ctx.path('hf')}"], ["--run_dir is required"], [
      ctx.path("hf")]


@case("export_hf_no_output_dir", _EXPORT)
def _(ctx):
  return [f"--run_dir={ctx.trained}"], ["--output_dir is required"], []


@case("export_hf_run_dir_missing", _EXPORT)
def _(ctx):
  return (["--run_dir=/no/such/run", f"--output_dir={ctx.path('hf')}"],
          ["/no/such/run", "no config.json"], [ctx.path("hf")])


@case("export_hf_output_dir_under_a_file", _EXPORT)
def _(ctx):
  output = ctx.file_under_a_file("hf")
  return ([f"--run_dir={ctx.trained}", f"--output_dir={output}"],
          [f"--output_dir={output}", "is a file"], [output])


@case("export_hf_output_dir_is_a_file", _EXPORT)
def _(ctx):
  output = ctx.regular_file("hf_file")
  return ([f"--run_dir={ctx.trained}", f"--output_dir={output}"],
          [f"--output_dir={output}", "is a file"], [])


@case("export_hf_output_dir_not_an_export", _EXPORT)
def _(ctx):
  output = ctx.path("hf")
  os.makedirs(output)
  ctx.regular_file(os.path.join("hf", "precious.txt"))
  return ([f"--run_dir={ctx.trained}", f"--output_dir={output}"],
          [f"--output_dir={output}", "not an earlier export"],
          [os.path.join(output, "export_hf.json")])


@case("export_hf_tokenizer_missing", _EXPORT)
def _(ctx):
  return ([f"--run_dir={ctx.trained}", f"--output_dir={ctx.path('hf')}",
           "--tokenizer=/no/such/tokenizer"],
          ["tokenizer '/no/such/tokenizer'"], [ctx.path("hf")])


@case("export_hf_truncated_checkpoint", _EXPORT)
def _(ctx):
  _, run = ctx.copied_run()
  _truncate_checkpoint_data(run)
  return ([f"--run_dir={run}", f"--output_dir={ctx.path('hf')}"],
          ["ckpt-2"], [ctx.path("hf")])


# util_scripts/make_demo_data.py
_MAKE_DEMO = "util_scripts/make_demo_data.py"
_simple("make_demo_data_no_output_dir", _MAKE_DEMO, [],
        "--output_dir is required")


@case("make_demo_data_output_dir_under_a_file", _MAKE_DEMO)
def _(ctx):
  output = ctx.file_under_a_file("world")
  return ([f"--output_dir={output}"], [f"--output_dir={output}", "is a file"],
          [output])


@case("make_demo_data_output_dir_is_a_file", _MAKE_DEMO)
def _(ctx):
  output = ctx.regular_file("world_file")
  return ([f"--output_dir={output}"], [f"--output_dir={output}", "is a file"],
          [])


for _name, _value in (("num_train", 0), ("num_validation", 0),
                      ("num_test", 0), ("num_distractor_blocks", -1),
                      ("gpt2_vocab_size", 100)):
  CASES.append(Case(
      f"make_demo_data_{_name}_{_value}", _MAKE_DEMO,
      lambda ctx, name=_name, value=_value: (
          [f"--output_dir={ctx.path('world')}", f"--{name}={value}"],
          [f"--{name}={value}"], [ctx.path("world", "world.json")])))


# util_scripts/count_records.py
_COUNT = "util_scripts/count_records.py"
_simple("count_records_neither", _COUNT, [], "give exactly one of --paths")
_simple("count_records_no_match", _COUNT, ["--paths=/no/such/*.tfrecord"],
        "--paths: /no/such/*.tfrecord matches no file")
_simple("count_records_cache_missing", _COUNT, ["--cache_dir=/no/such/cache"],
        "/no/such/cache", "no manifest.json")


@case("count_records_both", _COUNT)
def _(ctx):
  return ([f"--paths={_shard(ctx.training_world['cache'])}",
           f"--cache_dir={ctx.training_world['cache']}"],
          ["give exactly one of --paths"], [])


@case("count_records_truncated_counts_the_good_records", _COUNT)
def _(ctx):
  cache_dir = ctx.copied_cache()
  path = _shard(cache_dir)
  good = 0
  with open(path, "rb") as f:
    data = f.read()
  # Keep 3 whole records and half of the 4th: TFRecord framing is
  # length (8) + crc (4) + data + crc (4).
  offset = 0
  for _ in range(3):
    length = int.from_bytes(data[offset:offset + 8], "little")
    offset += 16 + length
    good += 1
  with open(path, "wb") as f:
    f.write(data[:offset + 10])
  return ([f"--paths={path}"],
          [path, "corrupt or truncated TFRecord file", "after 3 good records"],
          [])


@case("count_records_corrupt_counts_the_good_records", _COUNT)
def _(ctx):
  cache_dir = ctx.copied_cache()
  path = _shard(cache_dir)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  length = int.from_bytes(data[0:8], "little")
  second = 16 + length
  data[second + 12 + 2] ^= 0xFF  # the second record's data
  with open(path, "wb") as f:
    f.write(bytes(data))
  return ([f"--paths={path}"], [path, "after 1 good records"], [])


@case("count_records_cache_mismatch", _COUNT)
def _(ctx):
  cache_dir = ctx.copied_cache()
  os.remove(_shard(cache_dir, 1))
  return ([f"--cache_dir={cache_dir}"],
          ["does not match its manifest", "train: 1 shard(s) missing"], [])


@case("count_records_output_under_a_file", _COUNT)
def _(ctx):
  output = ctx.file_under_a_file("counts.json")
  return ([f"--cache_dir={ctx.training_world['cache']}",
           f"--output_path={output}"],
          [f"--output_path={output}", "is a file"], [output])


# util_scripts/create_data_subset_realm.py
_SUBSET = "util_scripts/create_data_subset_realm.py"


def _subset(name, expected, **overrides):

  def build(ctx):
    values = {"retriever_config_path": ctx.demo["paths"]["retriever_config"],
              "num_blocks": 2, "output_dir": ctx.path("subset"), **overrides}
    return ([f"--{k}={v}" for k, v in values.items() if v is not None],
            expected, [ctx.path("subset", "retriever_config.json")])

  CASES.append(Case(name, _SUBSET, build))


for _name in ("retriever_config_path", "num_blocks", "output_dir"):
  _subset(f"subset_missing_{_name}", [f"--{_name} is required"],
          **{_name: None})
_subset("subset_num_blocks_0", ["--num_blocks=0: expected 1 to"],
        num_blocks=0)
_subset("subset_num_blocks_too_many", ["--num_blocks=100000"],
        num_blocks=100000)
_subset("subset_retriever_config_missing", ["/no/such/retriever.json"],
        retriever_config_path="/no/such/retriever.json")


@case("subset_output_dir_under_a_file", _SUBSET)
def _(ctx):
  output = ctx.file_under_a_file("subset")
  return ([f"--retriever_config_path={ctx.demo['paths']['retriever_config']}",
           "--num_blocks=2", f"--output_dir={output}"],
          [f"--output_dir={output}", "is a file"], [output])


@case("subset_output_dir_holds_a_subset", _SUBSET)
def _(ctx):
  output = ctx.path("subset")
  os.makedirs(output)
  ctx.regular_file(os.path.join("subset", "retriever_config.json"), "{}")
  return ([f"--retriever_config_path={ctx.demo['paths']['retriever_config']}",
           "--num_blocks=2", f"--output_dir={output}"],
          [f"--output_dir={output}", "already holds a finished subset"], [])


# util_scripts/scann_test_recall.py
_RECALL = "util_scripts/scann_test_recall.py"


def _recall(name, expected, **overrides):

  def build(ctx):
    values = {"output_path": ctx.path("recall.json"),
              "scann_config_path": os.path.join(
                  ROOT, "configs", "scann_configs", "small.json"),
              "synthetic_num_blocks": 64, "num_queries": 4, **overrides}
    values = {k: v.format(tmp=ctx.tmp) if isinstance(v, str) else v
              for k, v in values.items()}
    return ([f"--{k}={v}" for k, v in values.items() if v is not None],
            expected, [ctx.path("recall.json")])

  CASES.append(Case(name, _RECALL, build))


_recall("recall_no_output_path", ["--output_path is required"],
        output_path=None)
_recall("recall_num_queries_0", ["--num_queries=0"], num_queries=0)
_recall("recall_k_0", ["--k=0"], k=0)
_recall("recall_scann_config_missing", ["/no/such/scann.json"],
        scann_config_path="/no/such/scann.json")
_recall("recall_both_databases", ["give exactly one of "
                                   "--retriever_config_path"],
        retriever_config_path="/no/such/retriever.json")
_recall("recall_neither_kilt_nor_queries", ["--kilt_path and --queries_npy"],
        retriever_config_path="/no/such/retriever.json",
        synthetic_num_blocks=None)
_recall("recall_synthetic_dim_0", ["--synthetic_dim=0"], synthetic_dim=0)


@case("recall_output_under_a_file", _RECALL)
def _(ctx):
  output = ctx.file_under_a_file("recall.json")
  return ([f"--output_path={output}", "--synthetic_num_blocks=64",
           "--num_queries=4", "--scann_config_path=" + os.path.join(
               ROOT, "configs", "scann_configs", "small.json")],
          [f"--output_path={output}", "is a file"], [output])


def _scann_config_case(name, config, expected):

  def build(ctx):
    path = ctx.regular_file("scann.json", config)
    return ([f"--output_path={ctx.path('recall.json')}",
             f"--scann_config_path={path}", "--synthetic_num_blocks=64",
             "--num_queries=4"], [path] + expected, [ctx.path("recall.json")])

  CASES.append(Case(name, _RECALL, build))


_scann_config_case("recall_scann_config_malformed", "{\"num_leaves\": ",
                   ["malformed JSON"])
_scann_config_case("recall_scann_config_not_an_object", "[1]", [])


# bench/bench_input_pipeline.py and util_scripts/run_demo.py: what fails
# before their long work.
_BENCH = "bench/bench_input_pipeline.py"
_simple("bench_input_pipeline_cache_missing", _BENCH,
        ["--cache_dir=/no/such/cache"], "/no/such/cache", "no manifest.json")
_simple("bench_input_pipeline_train_config_missing", _BENCH,
        ["--train_config=/no/such/train.json"], "/no/such/train.json")


@case("run_demo_num_train_0", "util_scripts/run_demo.py")
def _(ctx):
  return ([f"--output_dir={ctx.path('demo')}", "--num_train=0"],
          ["--num_train=0: expected at least 1"],
          [ctx.path("demo", "report.md")])


def test_the_table_holds_at_least_100_distinct_bad_inputs():
  """Issue 13's acceptance 2: >= 100 cases (printed with -s)."""
  names = [c.name for c in CASES]
  assert len(set(names)) == len(names), sorted(
      n for n in names if names.count(n) > 1)
  scripts = sorted({c.script for c in CASES})
  print(f"\nbad-input cases: {len(CASES)} over {len(scripts)} entry scripts")
  assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_is_one_line_naming_the_culprit(
    bad, worlds, script_flags, capsys, tmp_path):
  training_world, trained, runs, demo = worlds
  ctx = Context(training_world, trained, runs, demo, str(tmp_path))
  roots = [str(tmp_path), os.path.dirname(trained),
           os.path.dirname(demo["paths"]["kilt_dir"])]
  try:
    args, expected, absent = bad.build(ctx)
    before = set().union(*(_files(root) for root in roots))
    code, stderr = _run_in_process(script_flags, capsys, bad.script, args)
  finally:
    for cleanup in ctx.cleanups:
      cleanup()
  assert_one_line_error(code, stderr, expected)
  for path in absent:
    assert not os.path.exists(path), path
  new = set().union(*(_files(root) for root in roots)) - before
  assert not [path for path in new if _looks_complete(path)], sorted(new)


def _other_model(ctx):
  """A model directory whose config differs from the run's in n_layer."""
  if not os.path.isdir(ctx.path("other_model")):
    with open(os.path.join(ctx.training_world["model"], "config.json")) as f:
      config = json.load(f)
    config["n_layer"] = 3
    os.makedirs(ctx.path("other_model"))
    _write(ctx.path("other_model", "config.json"), json.dumps(config))
  return ctx.path("other_model")


def _cache_with_test_split(ctx):
  """A copy of the training cache whose `test` split has no answers."""
  if os.path.isdir(ctx.path("test_cache")):
    return ctx.path("test_cache")
  cache_dir = ctx.path("test_cache")
  shutil.copytree(ctx.training_world["cache"], cache_dir)
  manifest = ctx.manifest(cache_dir)
  records = cache_fixtures.random_records(
      4, num_neighbours=manifest["num_neighbours"],
      vocab_size=manifest["vocab_size"], seed=3, num_answers=0)
  name = neighbour_cache.shard_name("test", 0, 1)
  tf_utils.write_tfrecords(os.path.join(cache_dir, name), [
      neighbour_cache.encode_example(**record) for record in records])
  manifest["splits"]["test"] = {"shards": [name], "num_records": 4}
  ctx.write_manifest(cache_dir, manifest)
  return cache_dir


# ---------------------------------------------------------------------------
# What only a real process shows: the exit code and stderr of the CLI
# ---------------------------------------------------------------------------


# main_more_retrievals_than_cached was test_main.py's
# test_bad_input_exits_2_with_one_line.
_PROCESS_CASES = ["main_more_retrievals_than_cached",
                  "cacher_output_dir_under_a_file",
                  "kilt_eval_guess_not_utf8",
                  "count_records_truncated_counts_the_good_records",
                  "json_to_args_unknown_key"]


@pytest.mark.slow
@pytest.mark.parametrize("name", _PROCESS_CASES)
def test_the_command_line_exits_2_with_one_line(name, worlds, tmp_path):
  training_world, trained, runs, demo = worlds
  ctx = Context(training_world, trained, runs, demo, str(tmp_path))
  bad = next(c for c in CASES if c.name == name)
  args, expected, absent = bad.build(ctx)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, bad.script)] + args, cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
      capture_output=True, text=True, timeout=300)
  assert_one_line_error(result.returncode, result.stderr, expected)
  for path in absent:
    assert not os.path.exists(path), path


def test_final_model_holds_its_tokenizer(worlds):
  """Issue 13, item 6: `generation.py --model_key=RUN/final_model` without
  --tokenizer failed, as final_model/ had no tokenizer."""
  _, trained, _, _ = worlds
  final_model = os.path.join(trained, run_dir.FINAL_MODEL_DIR)
  tokenizer = task_specific.load_tokenizer(final_model)
  run_tokenizer = task_specific.load_tokenizer(
      os.path.join(trained, run_dir.TOKENIZER_DIR))
  assert (neighbour_cache.tokenizer_fingerprint(tokenizer) ==
          neighbour_cache.tokenizer_fingerprint(run_tokenizer))


@pytest.mark.parametrize("script, flag, make_args", [
    ("main.py", "--output_dir", lambda ctx, output: ["--task=train"] +
     ctx.train_flags(output_dir=output)),
    ("util_scripts/make_demo_data.py", "--output_dir",
     lambda ctx, output: [f"--output_dir={output}"]),
    ("util_scripts/kilt_title_map.py", "--output_path", lambda ctx, output: [
        f"--knowledge_source={ctx.demo['paths']['knowledge_source']}",
        f"--output_path={output}/map.json"]),
])
def test_an_output_location_this_user_may_not_write_is_refused(
    script, flag, make_args, worlds, script_flags, capsys, tmp_path,
    monkeypatch):
  """Read-only locations, as os.access reports them (tests may run as root,
  whom permissions do not stop: os.access is patched to deny writes under
  one directory)."""
  ctx = Context(*worlds, str(tmp_path))
  read_only = ctx.path("read_only")
  os.makedirs(read_only)
  access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode: (
      not (mode & os.W_OK and os.path.abspath(path).startswith(read_only))
      and access(path, mode)))
  output = os.path.join(read_only, "out")
  code, stderr = _run_in_process(script_flags, capsys, script,
                                 make_args(ctx, output))
  assert_one_line_error(code, stderr, [flag, "not writable"])
  assert os.listdir(read_only) == []


def test_json_to_args_checks_the_configs_of_several_scripts_at_once(
    script_flags, capsys):
  """Was a DuplicateFlagError traceback: main.py and generation.py both
  define --batch_size."""
  configs = [os.path.join(ROOT, "configs", directory, name)
             for directory in ("train_configs", "generation_configs")
             for name in sorted(os.listdir(os.path.join(ROOT, "configs",
                                                        directory)))]
  code, stderr = _run_in_process(script_flags, capsys, "json_to_args.py",
                                 ["--check"] + configs)
  assert code == 0, stderr[-3000:]


@pytest.mark.parametrize("error_number", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_mid_run_is_one_line(capsys, error_number):
  """A write that fails because the machine cannot take it (a full disk, a
  file system turned read-only) is one line too; other OS errors are bugs
  and keep their traceback."""

  def main(argv):
    raise OSError(error_number, os.strerror(error_number), "/runs/x/ckpt-3")

  with pytest.raises(SystemExit) as exit_:
    utils.guarded(main)(["script"])
  assert exit_.value.code == utils.USER_ERROR_EXIT_CODE
  assert_one_line_error(2, capsys.readouterr().err,
                        ["/runs/x/ckpt-3", os.strerror(error_number)])

  def buggy(argv):
    raise OSError(errno.EBADF, "Bad file descriptor")

  with pytest.raises(OSError):
    utils.guarded(buggy)(["script"])
