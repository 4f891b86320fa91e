"""Trains GPT-2 on KILT ELI5 with cached retrievals, or evaluates the retrieval ablation.

  python main.py --task=train --approach_type=cached_pretok \
      --model_key=gpt2 --cache_dir=CACHE --output_dir=RUNS --run_name=NAME \
      --max_steps=1000

writes RUNS/NAME/: `config.json` (every flag and the model's config),
`checkpoints/` (model, optimizer, step and the tf.data iterator), TensorBoard
events in `train/` and `eval/`, `metrics.jsonl`, and at the end
`final_model/` (Hugging Face format) and `done.json`. Rerunning the same
command resumes from the latest checkpoint; a run that has reached
--max_steps only re-exports the model. A resumed run refuses settings that
change its training unless --allow_changed_settings is given (config.json
then records the change). One job at a time writes a run directory (a lock
file, `lock`, names its holder).

  python main.py --task=evaluate ...same flags...

computes answer perplexity on --eval_split with real, random and no contexts
on the latest checkpoint and writes RUNS/NAME/ablation_{split}.json.
"""

import json
import math
import os
import re
import sys
import time

from absl import flags
from absl import logging
import tensorflow as tf
import tqdm

import neighbour_cache
import task_specific
import tf_utils
import utils

_FLAG_TASK = flags.DEFINE_enum("task", "train", ["train", "evaluate"],
                               "train, or evaluate the retrieval ablation.")
_FLAG_APPROACH_TYPE = flags.DEFINE_enum(
    "approach_type", "cached_pretok", list(task_specific.APPROACHES),
    "naked_lm: no contexts; cached_pretok: contexts sampled from the cached "
    "neighbours; random_context: the neighbours of another question.")
_FLAG_MODEL_KEY = flags.DEFINE_string(
    "model_key", None,
    "GPT-2 to start from: a hub key (gpt2, gpt2-xl, ...) or a directory with "
    "config.json and weights; a directory with only config.json means a "
    "freshly initialised model. Required.")
_FLAG_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None,
    "GPT2TokenizerFast key or directory. Default: the one the cache was "
    "made with (its manifest's `tokenizer`).")
_FLAG_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Neighbour cache (query_cacher_tfrecord.py). Required.")
_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory of runs (local or gs://). Required.")
_FLAG_RUN_NAME = flags.DEFINE_string(
    "run_name", None, "The run's directory name under --output_dir. Required.")
_FLAG_RANDOM_SEED = flags.DEFINE_integer(
    "random_seed", 0, "Seed of the initialisation, data order, contexts and "
    "dropout.")

_FLAG_NUM_RETRIEVALS = flags.DEFINE_integer(
    "num_retrievals", 5, "Contexts per example.")
_FLAG_RETRIEVAL_TEMPERATURE = flags.DEFINE_float(
    "retrieval_temperature", 1.0,
    "Contexts are drawn without replacement from softmax(scores / this) "
    "while training; must be > 0.")
_FLAG_EVAL_RETRIEVAL_TEMPERATURE = flags.DEFINE_float(
    "eval_retrieval_temperature", 0.0,
    "The same, for evaluation; 0 takes the top --num_retrievals by score.")
_FLAG_RETRIEVAL_BANK_SIZE = flags.DEFINE_integer(
    "retrieval_bank_size", 0,
    "Draw only among the best this many neighbours; 0: all cached.")
_FLAG_USE_HELPER_WORDS = flags.DEFINE_boolean(
    "use_helper_words", True, "Lay out 'Question:', 'Context:', 'Answer:'.")
_FLAG_CONTEXT_HELPER_MODE = flags.DEFINE_enum(
    "context_helper_mode", "each", list(task_specific.CONTEXT_HELPER_MODES),
    "One 'Context:' before each context, or once before all of them.")
_FLAG_SEQUENCE_LENGTH = flags.DEFINE_integer(
    "sequence_length", 0, "Tokens per example; 0: the model's n_positions.")
_FLAG_MAX_QUESTION_TOKENS = flags.DEFINE_integer(
    "max_question_tokens", 64, "The question is cut to this many tokens.")
_FLAG_MAX_ANSWER_TOKENS = flags.DEFINE_integer(
    "max_answer_tokens", 350,
    "Tokens reserved for the answer (cut to this), before the EOS that ends "
    "a whole answer (a cut one gets none).")
_FLAG_MAX_CONTEXT_TOKENS = flags.DEFINE_integer(
    "max_context_tokens", 288, "Each context is cut to this many tokens.")
_FLAG_EVERY_ANSWER = flags.DEFINE_boolean(
    "every_answer", False,
    "Train on every answer of a question as its own example (default: the "
    "first answer only).")
_FLAG_SHUFFLE_BUFFER_SIZE = flags.DEFINE_integer(
    "shuffle_buffer_size", 1000, "Questions in the shuffle buffer (they are "
    "saved with each checkpoint).")

_FLAG_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 8, "Global batch: examples per step over all replicas.")
_FLAG_BATCH_SPLIT = flags.DEFINE_integer(
    "batch_split", 1, "Micro-batches per replica (gradient accumulation).")
_FLAG_OPTIMIZER_TYPE = flags.DEFINE_enum(
    "optimizer_type", "adam", list(tf_utils.OPTIMIZERS), "Optimizer.")
_FLAG_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-4,
                                         "Peak learning rate.")
_FLAG_LEARNING_RATE_SCHEDULE = flags.DEFINE_enum(
    "learning_rate_schedule", "constant", list(tf_utils.SCHEDULES),
    "After the warmup: constant, or linear/cosine decay to 0 at --max_steps.")
_FLAG_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 0,
                                          "Linear warmup steps.")
_FLAG_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0,
                                        "AdamW weight decay.")
_FLAG_CLIP_NORM = flags.DEFINE_float(
    "clip_norm", 1.0, "Clip the global gradient norm to this; 0: no clipping.")
_FLAG_MAX_STEPS = flags.DEFINE_integer(
    "max_steps", 0, "Steps to train for (this or --max_epochs is required).")
_FLAG_MAX_EPOCHS = flags.DEFINE_float(
    "max_epochs", 0.0, "Train for this many passes over the training "
    "questions (used when --max_steps is 0).")

_FLAG_EVAL_SPLIT = flags.DEFINE_string(
    "eval_split", "validation", "Split for periodic and ablation evaluation.")
_FLAG_BATCHES_BETWEEN_EVALS = flags.DEFINE_integer(
    "batches_between_evals", 500, "Evaluate every this many steps; 0: never.")
_FLAG_NUMBER_EVAL_BATCHES = flags.DEFINE_integer(
    "number_eval_batches", 0,
    "Global batches per evaluation; 0: the whole split.")
_FLAG_LOG_EVERY_STEPS = flags.DEFINE_integer(
    "log_every_steps", 10, "Write training summaries every this many steps.")
_FLAG_LOG_SAMPLES = flags.DEFINE_integer(
    "log_samples", 3, "Laid-out examples written as TensorBoard text.")
_FLAG_CHECKPOINT_EVERY_STEPS = flags.DEFINE_integer(
    "checkpoint_every_steps", 500, "Checkpoint every this many steps.")
_FLAG_CHECKPOINT_EVERY_MINUTES = flags.DEFINE_float(
    "checkpoint_every_minutes", 30.0,
    "Also checkpoint when this much time has passed (single worker only).")
_FLAG_KEEP_CHECKPOINTS = flags.DEFINE_integer(
    "keep_checkpoints", 3, "Checkpoints kept.")
_FLAG_ALLOW_CHANGED_SETTINGS = flags.DEFINE_boolean(
    "allow_changed_settings", False,
    "Let a resumed run change settings that change its training (learning "
    "rate, data, layout, ...); config.json records what changed and at which "
    "step. Without it such a change is refused.")

_FLAG_MODEL_DEVICES = flags.DEFINE_list(
    "model_devices", None,
    "Model parallelism: place GPT-2's blocks over these devices (one replica; "
    "--distribute_mode=OneDeviceStrategy).")
_FLAG_EXPERIMENTAL_COMPILE = flags.DEFINE_boolean(
    "experimental_compile", False, "Compile the train step with XLA.")
_FLAG_BF16 = flags.DEFINE_boolean(
    "bf16", False, "Compute in bfloat16 (weights and loss stay float32).")
_FLAG_RECOMPUTE = flags.DEFINE_boolean(
    "recompute", False,
    "Recompute each block in the backward pass: activation memory of one "
    "block instead of all (README: memory plan), about 1/3 more compute.")

# The model-config keys that decide the weights' shapes and meaning.
_MODEL_CONFIG_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer",
                      "n_head", "n_inner", "activation_function",
                      "layer_norm_epsilon")

# Flags a resumed run may change freely: they say how the run is watched,
# stored or spread over devices (one device, replicas, micro-batches and a
# model split give the same update), not what it computes. Every other flag,
# including one added later, counts as a change of the run.
_FREE_ON_RESUME = frozenset({
    "tokenizer", "output_dir", "run_name", "eval_split",
    "eval_retrieval_temperature", "batches_between_evals",
    "number_eval_batches", "log_every_steps", "log_samples",
    "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints",
    "batch_split", "model_devices",
    "experimental_compile", "recompute", "distribute_mode", "devices", "tpu",
    "num_cpu_devices", "cluster_timeout_seconds"})
# Where training stops: free too, unless the schedule decays to 0 there.
_STOP_FLAGS = frozenset({"max_steps", "max_epochs"})
# What to do with the run, not how it is made: neither compared nor recorded.
_NOT_SETTINGS = frozenset({"task", "allow_changed_settings"})


def _required(value, name):
  if not value:
    raise utils.UserError(f"--{name} is required")
  return value


def _flags_of_run():
  """The flags of this script and the shared strategy flags, by name."""
  return {flag.name: flag
          for module in (sys.modules[__name__], tf_utils)
          for flag in flags.FLAGS.get_flags_for_module(module)}


def _flag_values():
  """Every flag of this script and of the shared strategy flags, as JSON has
  them (lists, not tuples)."""
  return json.loads(json.dumps(
      {name: flag.value for name, flag in _flags_of_run().items()}))


def _check_at_least(name, value, minimum):
  if not (isinstance(value, (int, float)) and math.isfinite(value) and
          value >= minimum):
    raise utils.UserError(f"--{name}={value}: expected >= {minimum}")


def _check_flags():
  """One-line errors for flag values that no cache or model can make right."""
  for name, value, minimum in (
      ("batch_size", _FLAG_BATCH_SIZE.value, 1),
      ("batch_split", _FLAG_BATCH_SPLIT.value, 1),
      ("warmup_steps", _FLAG_WARMUP_STEPS.value, 0),
      ("weight_decay", _FLAG_WEIGHT_DECAY.value, 0),
      ("clip_norm", _FLAG_CLIP_NORM.value, 0),
      ("max_steps", _FLAG_MAX_STEPS.value, 0),
      ("max_epochs", _FLAG_MAX_EPOCHS.value, 0),
      ("batches_between_evals", _FLAG_BATCHES_BETWEEN_EVALS.value, 0),
      ("number_eval_batches", _FLAG_NUMBER_EVAL_BATCHES.value, 0),
      ("log_every_steps", _FLAG_LOG_EVERY_STEPS.value, 1),
      ("log_samples", _FLAG_LOG_SAMPLES.value, 0),
      ("checkpoint_every_steps", _FLAG_CHECKPOINT_EVERY_STEPS.value, 1),
      ("keep_checkpoints", _FLAG_KEEP_CHECKPOINTS.value, 1),
      ("shuffle_buffer_size", _FLAG_SHUFFLE_BUFFER_SIZE.value, 1),
      ("sequence_length", _FLAG_SEQUENCE_LENGTH.value, 0),
      ("retrieval_bank_size", _FLAG_RETRIEVAL_BANK_SIZE.value, 0),
      ("eval_retrieval_temperature", _FLAG_EVAL_RETRIEVAL_TEMPERATURE.value,
       0)):
    _check_at_least(name, value, minimum)
  for name, value in (
      ("learning_rate", _FLAG_LEARNING_RATE.value),
      ("checkpoint_every_minutes", _FLAG_CHECKPOINT_EVERY_MINUTES.value)):
    if not (math.isfinite(value) and value > 0):
      raise utils.UserError(f"--{name}={value}: expected a number > 0")


def _run_dir():
  return os.path.join(_required(_FLAG_OUTPUT_DIR.value, "output_dir"),
                      _required(_FLAG_RUN_NAME.value, "run_name"))


def _locked_run_dir(run_dir, *, create):
  """Holds the run directory's lock (one per task of a multi-worker job).

  `create`: make the directory if it is missing; a job that then fails before
  writing anything leaves no empty directory behind.
  """
  task = tf_utils.task_name_from_flags()
  lock_name = f"lock-{task}" if task else "lock"
  what = f"run directory {run_dir}"
  if create:
    return utils.locked_directory(run_dir, lock_name, what)
  return utils.exclusive_lock(os.path.join(run_dir, lock_name), what)


_MODEL_CONFIG_TYPES = {
    "vocab_size": int, "n_positions": int, "n_embd": int, "n_layer": int,
    "n_head": int, "n_inner": (int, type(None)),
    "activation_function": str, "layer_norm_epsilon": (int, float)}


def _check_model_config_file(model_key):
  """A UserError for a model directory's config.json with a mistyped field."""
  path = os.path.join(model_key, "config.json")
  if not (tf.io.gfile.isdir(model_key) and tf.io.gfile.exists(path)):
    return
  config = utils.read_json(path, "GPT-2 config")
  if not isinstance(config, dict):
    raise utils.UserError(f"{path}: expected a JSON object (a GPT-2 config)")
  for key, expected in _MODEL_CONFIG_TYPES.items():
    if key in config and (isinstance(config[key], bool) or
                          not isinstance(config[key], expected)):
      names = " or ".join(t.__name__ for t in (
          expected if isinstance(expected, tuple) else (expected,)))
      raise utils.UserError(
          f"{path}: {key} is {config[key]!r}, expected "
          f"{names.replace('NoneType', 'null')}")


# ---------------------------------------------------------------------------
# Set-up shared by training and evaluation
# ---------------------------------------------------------------------------


class Setup:
  """The strategy, model, tokenizer, cache and layout of a run."""

  def __init__(self, run_dir):
    self.run_dir = run_dir
    model_key = _required(_FLAG_MODEL_KEY.value, "model_key")
    _check_model_config_file(model_key)
    self.cache_dir = _required(_FLAG_CACHE_DIR.value, "cache_dir")
    self.manifest = neighbour_cache.read_manifest(self.cache_dir)
    self.tokenizer = task_specific.load_tokenizer(
        _FLAG_TOKENIZER.value or self.manifest["tokenizer"])
    self.strategy = tf_utils.strategy_from_flags()
    self.model_devices = None
    if _FLAG_MODEL_DEVICES.value:
      if not isinstance(self.strategy, tf.distribute.OneDeviceStrategy):
        raise utils.UserError(
            "--model_devices: a model split over devices is one replica; use "
            "--distribute_mode=OneDeviceStrategy")
      self.model_devices = tf_utils.check_devices(_FLAG_MODEL_DEVICES.value)
      # The blocks place their own variables and ops: no strategy scope.
      self.strategy = tf.distribute.get_strategy()
    with self.strategy.scope():
      self.model = task_specific.load_model(
          model_key, devices=self.model_devices,
          dtype="bfloat16" if _FLAG_BF16.value else None,
          seed=_FLAG_RANDOM_SEED.value, recompute=_FLAG_RECOMPUTE.value)
    config = self.model.config
    neighbour_cache.check_manifest(
        self.manifest, self.cache_dir, vocab_size=config.vocab_size,
        tokenizer_fingerprint=neighbour_cache.tokenizer_fingerprint(
            self.tokenizer))
    sequence_length = _FLAG_SEQUENCE_LENGTH.value or config.n_positions
    if sequence_length > config.n_positions:
      raise utils.UserError(
          f"--sequence_length={sequence_length} exceeds the model's "
          f"n_positions={config.n_positions}")
    self.layout = task_specific.make_layout(
        self.tokenizer, sequence_length=sequence_length,
        max_question_tokens=_FLAG_MAX_QUESTION_TOKENS.value,
        max_answer_tokens=_FLAG_MAX_ANSWER_TOKENS.value,
        max_context_tokens=_FLAG_MAX_CONTEXT_TOKENS.value,
        use_helper_words=_FLAG_USE_HELPER_WORDS.value,
        context_helper_mode=_FLAG_CONTEXT_HELPER_MODE.value)
    self.num_replicas = self.strategy.num_replicas_in_sync
    self.num_workers, self.worker_index, self.is_chief = _workers(
        self.strategy)
    # Set when an evaluation dataset is distributed (see eval_dataset).
    self.eval_pipelines = 1

  def data_config(self, approach, temperature):
    config = task_specific.DataConfig(
        approach=approach, num_retrievals=_FLAG_NUM_RETRIEVALS.value,
        retrieval_temperature=temperature,
        retrieval_bank_size=_FLAG_RETRIEVAL_BANK_SIZE.value,
        every_answer=_FLAG_EVERY_ANSWER.value, seed=_FLAG_RANDOM_SEED.value,
        shuffle_buffer_size=_FLAG_SHUFFLE_BUFFER_SIZE.value)
    task_specific.check_data_config(config, self.manifest, self.cache_dir)
    return config

  def files(self, split):
    neighbour_cache.check_manifest(self.manifest, self.cache_dir, split=split)
    return neighbour_cache.split_files(self.cache_dir, self.manifest, split)

  def check_run_config(self, *, compare_settings):
    """Checks config.json against this job; nothing is written here.

    The model config must be the run's. `compare_settings` (training): a flag
    that changes the run must also be the run's, unless
    --allow_changed_settings.

    Returns:
      (the config.json to write, or None when it stays as it is; the changed
      flags, {name: {"was": ..., "now": ...}}, to record at the resumed step).
    """
    model_config = {key: getattr(self.model.config, key)
                    for key in _MODEL_CONFIG_KEYS}
    path = os.path.join(self.run_dir, "config.json")
    current = _flag_values()
    if not tf.io.gfile.exists(path):
      return {"flags": current, "model_config": model_config}, {}
    stored = utils.read_json(path, "run config")
    if not (isinstance(stored, dict) and isinstance(stored.get("flags"), dict)
            and isinstance(stored.get("model_config"), dict)):
      raise utils.UserError(
          f"{path}: expected a JSON object with \"flags\" and "
          "\"model_config\" (the config main.py writes)")
    differences = [
        f"{key}: run {stored['model_config'].get(key)!r}, now {value!r}"
        for key, value in model_config.items()
        if stored["model_config"].get(key) != value]
    if differences:
      raise utils.UserError(
          f"{path}: the run directory was made with another model config "
          f"({'; '.join(differences)}); use another --run_name")
    if not compare_settings:
      return None, {}
    changed = _changed_flags(stored["flags"], current)
    free = _FREE_ON_RESUME | (
        _STOP_FLAGS if _FLAG_LEARNING_RATE_SCHEDULE.value == "constant"
        else frozenset())
    refused = [name for name in changed if name not in free]
    if refused and not _FLAG_ALLOW_CHANGED_SETTINGS.value:
      first = changed[refused[0]]
      more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
      raise utils.UserError(
          f"{path}: the run was made with --{refused[0]}={first['was']}, now "
          f"--{refused[0]}={first['now']}{more}, expected the run's settings "
          "when resuming: rerun with them, or pass --allow_changed_settings "
          "(config.json then records the change)")
    if not changed:
      return None, {}
    return {**stored, "flags": current}, changed

  def write_run_config(self, config, changed, step):
    """Writes config.json (the chief), recording changed flags at `step`."""
    if config is None or not self.is_chief:
      return
    if changed:
      config = {**config, "changes": config.get("changes", []) + [
          {"step": step, "flags": changed}]}
      logging.warning("resumed at step %d with changed settings: %s", step,
                      ", ".join(f"--{name}: {change['was']} -> "
                                f"{change['now']}"
                                for name, change in changed.items()))
    utils.atomic_write_json(os.path.join(self.run_dir, "config.json"), config)

  def eval_dataset(self, data_config, split, number_batches):
    """Distributed evaluation batches; every worker reads the whole split."""
    per_replica = self.eval_batch_size // self.num_replicas
    files = self.files(split)
    layout = self.layout

    def dataset_fn(input_context):
      self.eval_pipelines = input_context.num_input_pipelines
      replicas_here = input_context.num_replicas_in_sync // (
          input_context.num_input_pipelines)
      dataset = task_specific.make_dataset(
          files, data_config, layout, batch_size=per_replica, training=False,
          batches_multiple=replicas_here)
      if number_batches:
        dataset = dataset.take(number_batches * replicas_here)
      return dataset

    return self.strategy.distribute_datasets_from_function(dataset_fn)

  @property
  def eval_batch_size(self):
    return _FLAG_BATCH_SIZE.value // _FLAG_BATCH_SPLIT.value


def _changed_flags(stored, current):
  """{name: {"was", "now"}} for each flag whose value differs from the run's
  (a flag the run predates counts as having had its default)."""
  defaults = json.loads(json.dumps(
      {name: flag.default for name, flag in _flags_of_run().items()}))
  return {name: {"was": stored.get(name, defaults[name]), "now": value}
          for name, value in sorted(current.items())
          if name not in _NOT_SETTINGS and
          stored.get(name, defaults[name]) != value}


def _has_answers(files, split):
  """Whether any question of a split's shards has an answer (stops at the
  first that has); a shard that does not read is a UserError."""
  answered = tf.data.TFRecordDataset(files).map(
      lambda record: neighbour_cache.parse_example(record)["answers"].nrows()
  ).filter(lambda count: count > 0).take(1)
  try:
    return bool(list(answered))
  except tf.errors.OpError as error:
    reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
    raise utils.UserError(
        f"split {split!r} of the cache: unreadable shard ({reason}), "
        "expected complete TFRecord shards (rerun query_cacher_tfrecord.py)"
    ) from None


def _check_split_has_answers(setup, split, use):
  """A UserError when `split` (checked to exist) has no answer to score."""
  if not _has_answers(setup.files(split), split):
    raise utils.UserError(
        f"--eval_split={split}: the split has no answers (KILT's test split "
        f"has none), expected a split with answers for {use}, e.g. "
        "--eval_split=validation")


def _workers(strategy):
  """(number of workers, this worker's index, whether it is the chief)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1, 0, True
  resolver = strategy.cluster_resolver
  cluster = resolver.cluster_spec().as_dict()
  num_workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
  index = resolver.task_id + (len(cluster.get("chief", []))
                              if resolver.task_type == "worker" else 0)
  return num_workers, index, index == 0


def perplexity(loss):
  """exp(loss); infinity when that overflows a float (loss > 709.78 nats)."""
  try:
    return math.exp(loss)
  except OverflowError:
    return math.inf


def make_eval_step(setup):
  """distributed batch -> (answer loss sum, answer tokens) over all replicas."""

  @tf.function
  def eval_step(batch):
    per_replica = setup.strategy.run(
        lambda b: task_specific.answer_loss_sum(
            setup.model, b, setup.layout.max_labels), args=(batch,))
    return [setup.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
            for value in per_replica]

  return eval_step


def make_eval_fn(setup):
  """dataset -> answer loss, perplexity and tokens over the whole dataset.

  With no answer token to score, loss and perplexity are None (null in
  JSON) and `no_answer_tokens` is true: never a perplexity of 1.
  """
  eval_step = make_eval_step(setup)

  def evaluate(dataset, description):
    loss_sum, num_tokens = 0.0, 0.0
    for batch in tqdm.tqdm(dataset, desc=description, leave=False,
                           disable=not setup.is_chief):
      batch_loss, batch_tokens = eval_step(batch)
      loss_sum += float(batch_loss)
      num_tokens += float(batch_tokens)
    # Every input pipeline (host) reads the whole split: count tokens once.
    loss_sum /= setup.eval_pipelines
    num_tokens /= setup.eval_pipelines
    if not num_tokens:
      logging.warning("%s: no answer tokens to score; the metrics are null",
                      description)
      return {"answer_loss": None, "answer_ppl": None, "answer_tokens": 0,
              "no_answer_tokens": True}
    loss = loss_sum / num_tokens
    return {"answer_loss": loss, "answer_ppl": perplexity(loss),
            "answer_tokens": int(round(num_tokens))}

  return evaluate


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def _check_batch(setup):
  batch_size, batch_split = _FLAG_BATCH_SIZE.value, _FLAG_BATCH_SPLIT.value
  if batch_size < 1 or batch_split < 1 or batch_size % (
      setup.num_replicas * batch_split):
    raise utils.UserError(
        f"--batch_size={batch_size} is not divisible by replicas "
        f"({setup.num_replicas}) x --batch_split ({batch_split})")


def _max_steps(setup):
  if _FLAG_MAX_STEPS.value > 0:
    return _FLAG_MAX_STEPS.value
  if _FLAG_MAX_EPOCHS.value > 0:
    questions = setup.manifest["splits"]["train"]["num_records"]
    return max(1, math.ceil(_FLAG_MAX_EPOCHS.value * questions /
                            _FLAG_BATCH_SIZE.value))
  raise utils.UserError("--max_steps or --max_epochs is required (> 0)")


class _Metrics:
  """metrics.jsonl: one JSON line per logged step; a resumed run drops the
  lines written after its checkpoint, so the file reads as one run.

  The existing file is read (and checked) when this is made, before any
  work; `resume_at` drops the later lines once the resumed step is known.
  """

  def __init__(self, path, enabled):
    self.path, self.enabled, self.records = path, enabled, []
    if not (enabled and tf.io.gfile.exists(path)):
      return
    with tf.io.gfile.GFile(path) as f:
      lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step_ok = isinstance(record["step"], int)
      except (ValueError, TypeError, KeyError):
        step_ok = False
      if not step_ok:
        raise utils.UserError(
            f"{path}: line {number} is not a JSON record with an integer "
            "\"step\", expected the lines main.py writes: repair or delete "
            "the file")
      self.records.append(record)

  def resume_at(self, step):
    self.records = [r for r in self.records if r["step"] <= step]

  def write(self, record):
    if self.enabled:
      self.records.append(record)
      utils.atomic_write_text(self.path, "".join(
          json.dumps(r, sort_keys=True) + "\n" for r in self.records))


def _drop_events_after(run_dir, step):
  """Rewrites the run's TensorBoard event files without the events logged
  after `step`: a resumed run logs those steps again, and TensorBoard would
  show both. An event file cut short by a kill keeps its readable part."""
  for path in tf.io.gfile.glob(os.path.join(run_dir, "*", "events.out.*")):
    kept, dropped = [], 0
    try:
      for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        if event.step > step:
          dropped += 1
        else:
          kept.append(record.numpy())
    except tf.errors.DataLossError:
      dropped += 1
    if dropped:
      tf_utils.write_tfrecords(path, kept)
      logging.info("%s: dropped %d events after step %d", path, dropped, step)


def _check_state(non_finite_variables, eval_step, batch):
  """Why the state after this step's update must not be saved, or None.

  The loss of a step is computed before its update, so a finite loss does
  not vouch for the weights it leaves: check them (and the optimizer's
  slots), and the loss they give on the step's batch.
  """
  # The loss first: it is a collective, which every worker must join.
  loss_sum, num_tokens = (float(value) for value in eval_step(batch))
  bad = non_finite_variables()
  if bad:
    return (f"{len(bad)} variables hold NaN or infinite values after the "
            f"update (first: {bad[0]})")
  if num_tokens and not math.isfinite(loss_sum / num_tokens):
    return (f"the updated weights give a loss of {loss_sum / num_tokens} on "
            "the step's batch")
  return None


def _peer_failure(error, step):
  """A UserError for a worker of a multi-worker job that stopped answering."""
  peer = re.search(r"/job:(\w+)/replica:\d+/task:(\d+)", str(error))
  who = f"{peer.group(1)} {peer.group(2)}" if peer else "a worker"
  return utils.UserError(
      f"step {step}: {who} of the multi-worker job stopped answering "
      f"({type(error).__name__}), expected every worker of TF_CONFIG running: "
      "restart all of them to resume from the last checkpoint")


def train():
  _check_flags()
  run_dir = _run_dir()
  with _locked_run_dir(run_dir, create=True):
    _train(run_dir)


def _train(run_dir):
  """Validates everything, then trains (the caller holds the run's lock)."""
  setup = Setup(run_dir)
  _check_batch(setup)
  if _FLAG_RETRIEVAL_TEMPERATURE.value <= 0:
    raise utils.UserError(
        f"--retrieval_temperature={_FLAG_RETRIEVAL_TEMPERATURE.value}: must be "
        "> 0 (use --eval_retrieval_temperature=0 for the top-k at evaluation)")
  max_steps = _max_steps(setup)
  train_config = setup.data_config(_FLAG_APPROACH_TYPE.value,
                                   _FLAG_RETRIEVAL_TEMPERATURE.value)
  eval_config = setup.data_config(_FLAG_APPROACH_TYPE.value,
                                  _FLAG_EVAL_RETRIEVAL_TEMPERATURE.value)
  train_files = setup.files("train")
  if not setup.manifest["splits"]["train"]["num_records"]:
    raise utils.UserError(
        f"{setup.cache_dir}: the train split has no questions, expected a "
        "cache made from a non-empty eli5-train-kilt.jsonl")
  if _FLAG_BATCHES_BETWEEN_EVALS.value:
    _check_split_has_answers(setup, _FLAG_EVAL_SPLIT.value,
                             "the periodic evaluation (--batches_between_evals)")
  run_config, changed_settings = setup.check_run_config(compare_settings=True)
  metrics = _Metrics(os.path.join(setup.run_dir, "metrics.jsonl"),
                     setup.is_chief)
  done_path = os.path.join(setup.run_dir, "done.json")
  schedule = tf_utils.make_learning_rate_schedule(
      _FLAG_LEARNING_RATE_SCHEDULE.value, _FLAG_LEARNING_RATE.value,
      warmup_steps=_FLAG_WARMUP_STEPS.value, total_steps=max_steps)

  strategy, model = setup.strategy, setup.model
  iterator, next_batch = _train_input(setup, train_files, train_config)
  with strategy.scope():
    optimizer = tf_utils.make_optimizer(
        _FLAG_OPTIMIZER_TYPE.value, schedule,
        weight_decay=_FLAG_WEIGHT_DECAY.value)
    variables = model.trainable_variables
    optimizer.build(variables)
  # A host variable, outside the strategy: only Python reads it.
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                   iterator=iterator)
  manager = tf_utils.make_checkpoint_manager(
      _checkpoint_dir(setup), checkpoint,
      max_to_keep=_FLAG_KEEP_CHECKPOINTS.value)
  if tf_utils.restore_latest(manager, "model, optimizer and data iterator"):
    logging.info("resumed from %s at step %d", manager.latest_checkpoint,
                 int(step))
  elif tf.io.gfile.exists(done_path):
    raise utils.UserError(
        f"{done_path}: the run finished, but {_checkpoint_dir(setup)} holds "
        "no checkpoint, expected its checkpoints: restore them, or delete the "
        "run directory to train again from step 0")
  setup.write_run_config(run_config, changed_settings, int(step))
  metrics.resume_at(int(step))
  if setup.is_chief and int(step):
    _drop_events_after(setup.run_dir, int(step))
  train_step = tf_utils.make_train_step(
      strategy, lambda batch: task_specific.answer_loss_sum(
          model, batch, setup.layout.max_labels, training=True),
      variables, optimizer, clip_norm=_FLAG_CLIP_NORM.value or None,
      batch_split=_FLAG_BATCH_SPLIT.value,
      jit_compile=_FLAG_EXPERIMENTAL_COMPILE.value)
  evaluate = make_eval_fn(setup)
  eval_step = make_eval_step(setup)
  non_finite_variables = tf_utils.make_finiteness_check(
      list(model.variables) + list(optimizer.variables))
  writers = _summary_writers(setup)
  if int(step) == 0:
    _log_samples(setup, train_files, train_config, writers["train"])

  last_save_time = time.time()
  window_start, window_tokens = time.time(), 0.0
  progress = tqdm.tqdm(total=max_steps, initial=int(step), desc="train",
                       disable=not setup.is_chief)
  while int(step) < max_steps:
    batch = next_batch()
    try:
      outputs = train_step(batch)
      loss = float(outputs["loss"])
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as e:
      if setup.num_workers == 1:
        raise
      raise _peer_failure(e, int(step) + 1) from None
    grad_norm = float(outputs["grad_norm"])
    last_good = (manager.latest_checkpoint or
                 "none (no checkpoint was written)")
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      raise utils.UserError(
          f"step {int(step) + 1}: the loss is {loss} (gradient norm "
          f"{grad_norm}); stopping. The last good checkpoint is {last_good}")
    step.assign_add(1)
    progress.update(1)
    current = int(step)
    window_tokens += float(outputs["num_tokens"])
    if current % _FLAG_LOG_EVERY_STEPS.value == 0 or current == max_steps:
      elapsed = max(time.time() - window_start, 1e-9)
      record = {"step": current, "loss": loss, "answer_ppl": perplexity(loss),
                "grad_norm": grad_norm,
                "learning_rate": float(schedule(current - 1)),
                "tokens_per_second": window_tokens / elapsed}
      _write_scalars(writers["train"], record, current)
      metrics.write(record)
      window_start, window_tokens = time.time(), 0.0
    if (_FLAG_BATCHES_BETWEEN_EVALS.value and
        current % _FLAG_BATCHES_BETWEEN_EVALS.value == 0):
      result = evaluate(setup.eval_dataset(
          eval_config, _FLAG_EVAL_SPLIT.value,
          _FLAG_NUMBER_EVAL_BATCHES.value), "eval")
      _write_scalars(writers["eval"], result, current)
      metrics.write({"step": current,
                     **{f"eval_{k}": v for k, v in result.items()}})
    minutes = (time.time() - last_save_time) / 60
    if (current % _FLAG_CHECKPOINT_EVERY_STEPS.value == 0 or
        current == max_steps or
        (setup.num_workers == 1 and
         minutes >= _FLAG_CHECKPOINT_EVERY_MINUTES.value)):
      problem = _check_state(non_finite_variables, eval_step, batch)
      if problem:
        raise utils.UserError(
            f"step {current}: {problem}; stopping without saving. The last "
            f"good checkpoint is {last_good}")
      manager.save(checkpoint_number=current)
      last_save_time = time.time()
  progress.close()
  if setup.is_chief:
    model.save_pretrained(os.path.join(setup.run_dir, "final_model"))
    # Written last: scripts (the demo) take it to mean "training finished".
    utils.atomic_write_json(done_path, {
        "step": int(step), "final_model": "final_model",
        "checkpoint": manager.latest_checkpoint})
  for writer in writers.values():
    writer.flush()


def _train_input(setup, files, data_config):
  """(this worker's tf.data iterator, a function giving the next global batch).

  The iterator is a plain tf.data one, so a checkpoint holds its state
  (tf.distribute's own distributed iterators cannot be checkpointed); each
  worker's batch is sliced into its replicas' batches in order, so the global
  batch is the same whatever the number of replicas.
  """
  strategy = setup.strategy
  per_replica = _FLAG_BATCH_SIZE.value // setup.num_replicas
  local_replicas = setup.num_replicas // setup.num_workers
  input_context = tf.distribute.InputContext(
      num_input_pipelines=setup.num_workers,
      input_pipeline_id=setup.worker_index,
      num_replicas_in_sync=setup.num_replicas)
  iterator = iter(task_specific.make_dataset(
      files, data_config, setup.layout, batch_size=per_replica * local_replicas,
      training=True, input_context=input_context))
  first_replica = setup.worker_index * local_replicas

  def next_batch():
    batch = next(iterator)

    def replica_batch(context):
      start = (context.replica_id_in_sync_group - first_replica) * per_replica
      return {name: value[start:start + per_replica]
              for name, value in batch.items()}

    return strategy.experimental_distribute_values_from_function(
        replica_batch)

  return iterator, next_batch


def _checkpoint_dir(setup):
  """The chief's checkpoints; other workers save theirs (with their own data
  iterator) beside it."""
  directory = os.path.join(setup.run_dir, "checkpoints")
  if setup.is_chief:
    return directory
  return os.path.join(directory, f"worker-{setup.worker_index}")


def _summary_writers(setup):
  if not setup.is_chief:
    return {name: tf.summary.create_noop_writer() for name in ("train", "eval")}
  return {name: tf.summary.create_file_writer(os.path.join(setup.run_dir, name))
          for name in ("train", "eval")}


def _write_scalars(writer, record, step):
  """The record's numbers as scalars (null metrics and flags are left out)."""
  with writer.as_default(step=step):
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)) and (
          not isinstance(value, bool)):
        # float64: a perplexity beyond float32's range is stored as inf,
        # where converting the Python float straight to float32 fails.
        tf.summary.scalar(name, tf.constant(value, tf.float64))


def _log_samples(setup, files, data_config, writer):
  if not _FLAG_LOG_SAMPLES.value:
    return
  batch = next(iter(task_specific.make_dataset(
      files, data_config, setup.layout, batch_size=_FLAG_LOG_SAMPLES.value,
      training=True)))
  texts = []
  for index in range(_FLAG_LOG_SAMPLES.value):
    row = {name: value[index].numpy() for name, value in batch.items()}
    texts.append(task_specific.format_sample(setup.tokenizer, row))
  with writer.as_default(step=0):
    tf.summary.text("samples (⟦no loss⟧)",
                    "\n\n---\n\n".join(f"```\n{t}\n```" for t in texts))


# ---------------------------------------------------------------------------
# Evaluation: the retrieval ablation
# ---------------------------------------------------------------------------

_ABLATIONS = {"real": "cached_pretok", "random": "random_context",
              "none": "naked_lm"}


def evaluate_ablation():
  _check_flags()
  run_dir = _run_dir()
  if not tf.io.gfile.exists(os.path.join(run_dir, "config.json")):
    raise utils.UserError(
        f"{run_dir}: no run here (no config.json), expected a run directory "
        "made by --task=train: check --output_dir and --run_name")
  with _locked_run_dir(run_dir, create=False):
    return _evaluate_ablation(run_dir)


def _evaluate_ablation(run_dir):
  setup = Setup(run_dir)
  _check_batch(setup)
  split = _FLAG_EVAL_SPLIT.value
  _check_split_has_answers(setup, split, "--task=evaluate")
  configs = {name: setup.data_config(approach,
                                     _FLAG_EVAL_RETRIEVAL_TEMPERATURE.value)
             for name, approach in _ABLATIONS.items()}
  setup.check_run_config(compare_settings=False)
  path = tf_utils.latest_checkpoint(_checkpoint_dir(setup))
  if path is None:
    raise utils.UserError(
        f"{setup.run_dir}: no checkpoint to evaluate (train first)")
  tf_utils.restore(tf.train.Checkpoint(model=setup.model), path, "model",
                   partial=True)
  step = int(path.rsplit("-", 1)[-1])
  evaluate = make_eval_fn(setup)
  table = {}
  for name, config in configs.items():
    table[name] = evaluate(setup.eval_dataset(
        config, split, _FLAG_NUMBER_EVAL_BATCHES.value), name)
    table[name]["checkpoint_step"] = step
    logging.info("%s contexts: answer perplexity %s over %d tokens", name,
                 table[name]["answer_ppl"], table[name]["answer_tokens"])
  output = os.path.join(setup.run_dir, f"ablation_{split}.json")
  if setup.is_chief:
    utils.atomic_write_json(output, table)
  print(json.dumps({name: None if row["answer_ppl"] is None
                    else round(row["answer_ppl"], 4)
                    for name, row in table.items()}))
  return table


def main(argv):
  if _FLAG_TASK.value == "train":
    train()
  else:
    evaluate_ablation()


if __name__ == "__main__":
  utils.run(main)
