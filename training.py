"""Training GPT-2 on cached retrievals, with periodic evaluation.

  import training
  training.train(training.TrainConfig(model_key=..., cache_dir=...,
                                      output_dir=..., run_name=...,
                                      max_steps=1000))
  evaluation.evaluate(config)  # the context-condition grid (evaluation.py)

`main.py` is the command line over these two calls: its flags are the
fields of `TrainConfig` (`cli.define_flags`). What a run directory holds is
`run_dir`'s; training writes it, everything else reads it back from there.
A resumed run refuses settings that change its training unless
`allow_changed_settings` (config.json then records the change).
"""

import dataclasses
import json
import math
import os
import re
import time
import typing

from absl import logging
import tensorflow as tf
import tqdm

import context_draw
import gpt2_weights
import kilt_files
import live_retrieval
import modeling_tf_gpt2_model_par as modeling
import neighbour_cache
import placement as placement_lib
import run_dir as run_directory
import settings
import task_specific
import tf_utils
import utils

setting = settings.setting

# Device prefetch: each replica's next batches are copied to its device while
# it computes (`distribute_datasets_from_function`).
INPUT_OPTIONS = tf.distribute.InputOptions(
    experimental_fetch_to_device=True, experimental_per_replica_buffer_size=2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a training run (and of its evaluation)."""
  approach_type: str = setting(
      "cached_pretok",
      "naked_lm: no contexts; cached_pretok: contexts sampled from the cached "
      "neighbours; random_context: the neighbours of another question; "
      "live_retrieval: sampled as cached_pretok from neighbours retrieved as "
      "training runs (--retrieval_server, or --retriever_config_path in this "
      "process), the cache giving the questions.",
      choices=context_draw.APPROACHES)
  model_key: typing.Optional[str] = setting(
      None,
      "GPT-2 to start from: a hub key (gpt2, gpt2-xl, ...) or a directory "
      "with config.json and weights; a directory with only config.json means "
      "a freshly initialised model. Required.")
  tokenizer: typing.Optional[str] = setting(
      None,
      "GPT2TokenizerFast key or directory. Default: the one the cache was "
      "made with (its manifest's `tokenizer`).")
  cache_dir: typing.Optional[str] = setting(
      None, "Neighbour cache (query_cacher_tfrecord.py). Required.")
  output_dir: typing.Optional[str] = setting(
      None, "Directory of runs (local or gs://). Required.")
  run_name: typing.Optional[str] = setting(
      None, "The run's directory name under --output_dir. Required.")
  random_seed: int = setting(
      0, "Seed of the initialisation, data order, contexts and dropout.")
  num_retrievals: int = setting(5, "Contexts per example.")
  retrieval_temperature: float = setting(
      1.0,
      "Contexts are drawn without replacement from softmax(scores / this) "
      "while training; must be > 0.")
  eval_retrieval_temperature: float = setting(
      0.0,
      "The same, for evaluation; 0 takes the top --num_retrievals by score.")
  retrieval_bank_size: int = setting(
      0, "Draw only among the best this many neighbours; 0: all cached.")
  layout: task_specific.LayoutConfig = task_specific.LayoutConfig()
  every_answer: bool = setting(
      False,
      "Train on every answer of a question as its own example (default: the "
      "first answer only).")
  shuffle_buffer_size: int = setting(
      1000, "Questions in each epoch's shuffle buffer (seeded per epoch: a "
      "resumed run reads its last epoch again up to where it stopped).")
  batch_size: int = setting(
      8, "Global batch: examples per step over all replicas.")
  batch_split: int = setting(
      1, "Micro-batches per replica (gradient accumulation).")
  optimizer_type: str = setting("adam", "Optimizer.",
                                choices=tf_utils.OPTIMIZERS)
  learning_rate: float = setting(1e-4, "Peak learning rate.")
  learning_rate_schedule: str = setting(
      "constant",
      "After the warmup: constant, or linear/cosine decay to 0 at "
      "--max_steps.", choices=tf_utils.SCHEDULES)
  warmup_steps: int = setting(0, "Linear warmup steps.")
  weight_decay: float = setting(0.0, "AdamW weight decay.")
  clip_norm: float = setting(
      1.0, "Clip the global gradient norm to this; 0: no clipping.")
  max_steps: int = setting(
      0, "Steps to train for (this or --max_epochs is required).")
  max_epochs: float = setting(
      0.0, "Train for this many passes over the training questions (used "
      "when --max_steps is 0).")
  eval_split: str = setting(
      "validation", "Split for periodic and ablation evaluation.")
  batches_between_evals: int = setting(
      500, "Evaluate every this many steps; 0: never.")
  number_eval_batches: int = setting(
      0, "Evaluate the split's first this many global batches of examples "
      "(--batch_size / --batch_split each; with --eval_stride, every window "
      "of each); 0: the whole split.")
  conditions: tuple = setting(
      context_draw.DEFAULT_CONDITIONS,
      "--task=evaluate: the context conditions to score, some of "
      f"{', '.join(context_draw.CONDITIONS)} (README: \"Did it use its "
      "retrievals?\").")
  eval_stride: int = setting(
      0, "--task=evaluate: score answers longer than --max_answer_tokens "
      "whole, in windows: after the first, each scores the next this many "
      "answer tokens, the ones before as context (1 .. --max_answer_tokens); "
      "0: cut them.")
  distractor_offset: int = setting(
      0, "The distractor condition's contexts are the neighbours ranked "
      "this .. this + --num_retrievals - 1; 0: --num_retrievals.")
  gold_contexts_path: typing.Optional[str] = setting(
      None, "The gold condition's contexts file (jsonl: id, input, answer, "
      "contexts); the demo world writes one.")
  counterfactual_path: typing.Optional[str] = setting(
      None, "The counterfactual conditions' contexts file (jsonl: id, input, "
      "the counterfactual answer, its contexts); the demo world writes one.")
  log_every_steps: int = setting(
      10, "Write training summaries every this many steps.")
  log_samples: int = setting(
      3, "Laid-out examples written as TensorBoard text.")
  checkpoint_every_steps: int = setting(
      500, "Checkpoint every this many steps.")
  checkpoint_every_minutes: float = setting(
      30.0,
      "Also checkpoint when this much time has passed (single worker only).")
  keep_checkpoints: int = setting(3, "Checkpoints kept.")
  allow_changed_settings: bool = setting(
      False,
      "Let a resumed run change settings that change its training (learning "
      "rate, data, layout, ...); config.json records what changed and at "
      "which step. Without it such a change is refused.")
  model_devices: typing.Optional[list] = setting(
      None,
      "Model parallelism: place GPT-2's blocks over these devices (one "
      "replica; --distribute_mode=OneDeviceStrategy). Several replicas: "
      "--devices_per_replica (MirroredStrategy) or --cores_per_replica "
      "(TPUStrategy).")
  experimental_compile: bool = setting(
      False, "Compile each replica's train and eval computation with XLA "
      "(the all-reduce and the update stay outside).")
  bf16: bool = setting(
      False, "Compute in bfloat16 (weights and loss stay float32).")
  recompute: bool = setting(
      False,
      "Recompute each block in the backward pass: activation memory of one "
      "block instead of all (README: memory plan), about 1/3 more compute.")
  retrieval: live_retrieval.RetrievalConfig = live_retrieval.RetrievalConfig()
  strategy: tf_utils.StrategyConfig = tf_utils.StrategyConfig()

  @property
  def run_dir(self):
    return os.path.join(_required(self.output_dir, "output_dir"),
                        _required(self.run_name, "run_name"))


def read_run(run_dir):
  """(a run's config.json, its settings as a `TrainConfig`)."""
  config = run_directory.read_config(run_dir)
  return config, settings.from_flat(
      TrainConfig, config["flags"],
      run_directory.path(run_dir, run_directory.CONFIG_NAME))


def config_from_values(values, where):
  """The TrainConfig of a train config's flat values (configs/train_configs/)
  as main.py gets them through json_to_args.py: a null leaves the setting's
  default, and `task` is main.py's own flag, not a setting."""
  return settings.from_flat(
      TrainConfig, {name: value for name, value in values.items()
                    if name != "task" and value is not None}, where)


# Settings a resumed run may change freely: they say how the run is watched,
# stored or spread over devices (one device, replicas, micro-batches and a
# model split give the same update), not what it computes. Every other
# setting, including one added later, counts as a change of the run.
_FREE_ON_RESUME = frozenset({
    "tokenizer", "output_dir", "run_name", "eval_split",
    "eval_retrieval_temperature", "batches_between_evals",
    "number_eval_batches", "conditions", "eval_stride", "distractor_offset",
    "gold_contexts_path", "counterfactual_path", "log_every_steps",
    "log_samples",
    "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints",
    "batch_split", "model_devices",
    "experimental_compile", "recompute", "distribute_mode", "devices", "tpu",
    "num_cpu_devices", "cluster_timeout_seconds", "cores_per_replica",
    "devices_per_replica",
    # Where the neighbours are retrieved, not which: the index version
    # recorded in config.json is checked instead.
    "retrieval_server", "retriever_config_path", "scann_index_dir",
    "block_token_store", "retrieval_batch_size", "retrieval_timeout_seconds"})
# Where training stops: free too, unless the schedule decays to 0 there.
_STOP_SETTINGS = frozenset({"max_steps", "max_epochs"})
# What to do with the run, not how it is made: neither compared nor recorded.
_NOT_SETTINGS = frozenset({"allow_changed_settings"})


def _required(value, name):
  if not value:
    raise utils.UserError(f"--{name} is required")
  return value


def check_config(config):
  """One-line errors for values that no cache or model can make right."""
  for name, minimum in (
      ("batch_size", 1), ("batch_split", 1), ("warmup_steps", 0),
      ("weight_decay", 0), ("clip_norm", 0), ("max_steps", 0),
      ("max_epochs", 0), ("batches_between_evals", 0),
      ("number_eval_batches", 0), ("log_every_steps", 1), ("log_samples", 0),
      ("checkpoint_every_steps", 1), ("keep_checkpoints", 1),
      ("shuffle_buffer_size", 1), ("retrieval_bank_size", 0),
      ("eval_retrieval_temperature", 0)):
    utils.check_at_least(name, getattr(config, name), minimum)
  utils.check_at_least("sequence_length", config.layout.sequence_length, 0)
  for name in ("learning_rate", "checkpoint_every_minutes"):
    value = getattr(config, name)
    if not (math.isfinite(value) and value > 0):
      raise utils.UserError(f"--{name}={value}: expected a number > 0")
  for flag, split in (("--model_devices", config.model_devices),
                      ("--devices_per_replica",
                       config.strategy.devices_per_replica > 1)):
    if config.experimental_compile and split:
      raise utils.UserError(
          f"--experimental_compile with {flag}: XLA compiles a replica's "
          f"step for one device, {flag} spreads it over several (only a TPU "
          "compiles over a replica's cores, --cores_per_replica); drop one")
  utils.check_output_path(config.output_dir, "--output_dir", directory=True)
  if config.output_dir and config.run_name:
    utils.check_output_path(config.run_dir, "--run_name", directory=True)


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

  def __init__(self, config, run_config=None):
    """`run_config`: the run's config.json, to evaluate it: the model and
    the tokenizer are then the run's, not `model_key`'s."""
    self.config = config
    self.run_dir = config.run_dir
    self.cache_dir = _required(config.cache_dir, "cache_dir")
    self.manifest = neighbour_cache.read_manifest(self.cache_dir)
    if run_config is None:
      model_key = _required(config.model_key, "model_key")
      _check_model_config_file(model_key)
      # Before the tokenizer, which may be the hub's too.
      gpt2_weights.check_hub_name(model_key, "--model_key")
      tokenizer_key = config.tokenizer or self.manifest["tokenizer"]
      tokenizer_flag = ("--tokenizer" if config.tokenizer else
                        f"--tokenizer (the default, {self.cache_dir}'s)")
    else:
      tokenizer_key = run_directory.tokenizer_dir(self.run_dir, run_config)
      tokenizer_flag = f"the tokenizer of {self.run_dir}"
    self.tokenizer = task_specific.load_tokenizer(tokenizer_key,
                                                  tokenizer_flag)
    self.strategy = tf_utils.strategy_from_config(config.strategy,
                                                  splits_model=True)
    self.model_devices = None
    # The stages of a replica over its devices (--devices_per_replica) or TPU
    # cores (--cores_per_replica), made under the strategy's scope.
    split = placement_lib.for_strategy(config.strategy, self.strategy)
    if config.model_devices:
      if not isinstance(self.strategy, tf.distribute.OneDeviceStrategy):
        raise utils.UserError(
            "--model_devices: a model split over devices is one replica; use "
            "--distribute_mode=OneDeviceStrategy")
      self.model_devices = tf_utils.check_devices(config.model_devices)
      # The blocks place their own variables and ops: no strategy scope.
      self.strategy = tf.distribute.get_strategy()
      split = self.model_devices
    placement = dict(devices=split,
                     dtype="bfloat16" if config.bf16 else None,
                     seed=config.random_seed, recompute=config.recompute)
    with self.strategy.scope():
      if run_config is None:
        self.model = task_specific.load_model(model_key, **placement)
      else:
        self.model = modeling.GPT2LMHeadModel.from_config(
            run_directory.model_config(run_config), **placement)
    model_config = self.model.config
    neighbour_cache.check_manifest(
        self.manifest, self.cache_dir, vocab_size=model_config.vocab_size,
        tokenizer_fingerprint=neighbour_cache.tokenizer_fingerprint(
            self.tokenizer))
    self.layout = task_specific.make_layout(self.tokenizer, config.layout,
                                            model_config.n_positions)
    self.retrieval = None
    approach = (run_config["flags"].get("approach_type") if run_config
                else config.approach_type)
    if approach == context_draw.Approach.LIVE_RETRIEVAL:
      self.retrieval = live_retrieval.open_retrieval(config.retrieval,
                                                     self.tokenizer)
      if run_config is not None:
        live_retrieval.check_recorded(
            self.retrieval, run_config.get("retrieval"),
            run_directory.path(self.run_dir, run_directory.CONFIG_NAME))
    self.num_replicas = self.strategy.num_replicas_in_sync
    self.num_workers, self.worker_index, self.is_chief = _workers(
        self.strategy)

  def data_config(self, approach, temperature):
    """A pipeline's `DataConfig`: in a live_retrieval run, every approach
    but naked_lm draws from live neighbours (live_retrieval as cached_pretok
    does)."""
    config = task_specific.DataConfig(
        **task_specific.approach_fields(approach, self.config.retrieval,
                                        live=self.retrieval is not None),
        num_retrievals=self.config.num_retrievals,
        retrieval_temperature=temperature,
        retrieval_bank_size=self.config.retrieval_bank_size,
        every_answer=self.config.every_answer, seed=self.config.random_seed,
        shuffle_buffer_size=self.config.shuffle_buffer_size)
    task_specific.check_data_config(config, self.manifest, self.cache_dir)
    return config

  @property
  def neighbours_per_question(self):
    """Neighbours a question's contexts are drawn from: retrieved, or cached."""
    if self.retrieval is not None:
      return self.config.retrieval.live_num_neighbours
    return self.manifest["num_neighbours"]

  def files(self, split):
    neighbour_cache.check_manifest(self.manifest, self.cache_dir, split=split)
    return neighbour_cache.split_files(self.cache_dir, self.manifest, split)

  def check_run_config(self):
    """Checks config.json against this training job; nothing is written here.

    The model config must be the run's, and a setting that changes the run
    must be the run's too, unless allow_changed_settings.

    Returns:
      (the config.json to write, or None when it stays as it is; the changed
      settings, {name: {"was": ..., "now": ...}}, to record at the resumed
      step).
    """
    model_config = self.model.config.to_dict()
    current = settings.flatten(self.config)
    retrieval = ({"retrieval": live_retrieval.recorded(self.retrieval)}
                 if self.retrieval else {})
    if not run_directory.exists(self.run_dir):
      return {"flags": current, "model_config": model_config,
              "tokenizer": run_directory.TOKENIZER_DIR, **retrieval}, {}
    stored = run_directory.read_config(self.run_dir)
    config_path = run_directory.path(self.run_dir, run_directory.CONFIG_NAME)
    if self.retrieval:
      live_retrieval.check_recorded(self.retrieval, stored.get("retrieval"),
                                    config_path)
    differences = run_directory.model_shape_differences(stored, model_config)
    if differences:
      raise utils.UserError(
          f"{config_path}: the run directory was made with another model "
          f"config ({'; '.join(differences)}); use another --run_name")
    changed = _changed_settings(stored["flags"], current)
    free = _FREE_ON_RESUME | (
        _STOP_SETTINGS if self.config.learning_rate_schedule == "constant"
        else frozenset())
    refused = [name for name in changed if name not in free]
    if refused and not self.config.allow_changed_settings:
      first = changed[refused[0]]
      more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
      raise utils.UserError(
          f"{config_path}: the run was made with --{refused[0]}="
          f"{first['was']}, now --{refused[0]}={first['now']}{more}, expected "
          "the run's settings when resuming: rerun with them, or pass "
          "--allow_changed_settings (config.json then records the change)")
    if not changed:
      return None, {}
    return {**stored, "flags": current}, changed

  def write_run_config(self, config, changed, step):
    """Writes config.json and the tokenizer (the chief), recording changed
    settings at `step`."""
    if not self.is_chief:
      return
    run_directory.save_tokenizer(self.run_dir, self.tokenizer)
    if config is None:
      return
    if changed:
      config = {**config, "changes": config.get("changes", []) + [
          {"step": step, "flags": changed}]}
      logging.warning("resumed at step %d with changed settings: %s", step,
                      ", ".join(f"--{name}: {change['was']} -> "
                                f"{change['now']}"
                                for name, change in changed.items()))
    run_directory.write_config(self.run_dir, config)

  def eval_dataset(self, data_config, split, number_batches,
                   examples_fn=None):
    """Distributed evaluation batches of the split's first `number_batches`
    global batches of examples (0: all), or of the (epoch, parsed example)
    pairs `examples_fn()` makes. Every worker lays out the same rows and
    keeps its replicas' part of each global batch (`task_specific.
    batch_examples`): each row is scored once, and every worker runs the
    same number of steps."""
    per_replica = self.eval_batch_size // self.num_replicas
    files = self.files(split) if examples_fn is None else None
    layout, retrieval = self.layout, self.retrieval
    number_examples = number_batches * self.eval_batch_size

    def dataset_fn(input_context):
      if examples_fn is None:
        return task_specific.make_dataset(
            files, data_config, layout, batch_size=per_replica,
            training=False, input_context=input_context,
            number_examples=number_examples, retrieval=retrieval)
      return task_specific.batch_examples(
          examples_fn(), data_config, layout, batch_size=per_replica,
          training=False, input_context=input_context,
          number_examples=number_examples)

    return self.strategy.distribute_datasets_from_function(
        dataset_fn, options=INPUT_OPTIONS)

  @property
  def eval_batch_size(self):
    return self.config.batch_size // self.config.batch_split

  @property
  def checkpoint_dir(self):
    return run_directory.checkpoint_dir(self.run_dir, self.worker_index)


def _changed_settings(stored, current):
  """{name: {"was", "now"}} for each setting whose value differs from the
  run's (a setting the run predates counts as having had its default)."""
  defaults = settings.flat_defaults(TrainConfig)
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
    raise utils.UserError(
        f"split {split!r} of the cache: unreadable shard "
        f"({utils.error_reason(error)}), "
        "expected complete TFRecord shards (rerun query_cacher_tfrecord.py)"
    ) from None


def check_split_has_answers(setup, split, use):
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
  """distributed batch -> (answer loss sum, answer tokens) over all replicas;
  each replica's forward pass compiled with XLA under --experimental_compile."""
  replica_loss = tf_utils.compile_replica_fn(
      lambda batch: task_specific.answer_loss_sum(
          setup.model, batch, setup.layout.max_labels),
      setup.config.experimental_compile)

  @tf.function(autograph=False)
  def eval_step(batch):
    per_replica = setup.strategy.run(replica_loss, args=(batch,))
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


def check_batch(setup):
  batch_size, batch_split = setup.config.batch_size, setup.config.batch_split
  if batch_size < 1 or batch_split < 1 or batch_size % (
      setup.num_replicas * batch_split):
    raise utils.UserError(
        f"--batch_size={batch_size} is not divisible by replicas "
        f"({setup.num_replicas}) x --batch_split ({batch_split})")


def _max_steps(setup):
  if setup.config.max_steps > 0:
    return setup.config.max_steps
  if setup.config.max_epochs > 0:
    questions = setup.manifest["splits"]["train"]["num_records"]
    return max(1, math.ceil(setup.config.max_epochs * questions /
                            setup.config.batch_size))
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


def train(config):
  """Trains a run to `config.max_steps` (or max_epochs), resuming from its
  latest checkpoint; ends with RUN/final_model and RUN/done.json."""
  check_config(config)
  with run_directory.lock(
      config.run_dir, tf_utils.task_name(config.strategy.distribute_mode),
      create=True):
    _train(Setup(config))


def _train(setup):
  """Validates everything, then trains (the caller holds the run's lock)."""
  check_batch(setup)
  if setup.config.retrieval_temperature <= 0:
    raise utils.UserError(
        f"--retrieval_temperature={setup.config.retrieval_temperature}: must be "
        "> 0 (use --eval_retrieval_temperature=0 for the top-k at evaluation)")
  max_steps = _max_steps(setup)
  train_config = setup.data_config(setup.config.approach_type,
                                   setup.config.retrieval_temperature)
  eval_config = setup.data_config(setup.config.approach_type,
                                  setup.config.eval_retrieval_temperature)
  train_files = setup.files("train")
  neighbour_cache.check_shards_exist(setup.cache_dir, train_files, "train")
  if not setup.manifest["splits"]["train"]["num_records"]:
    raise utils.UserError(
        f"{setup.cache_dir}: the train split has no questions, expected a "
        f"cache made from a non-empty {kilt_files.ELI5_SPLIT_FILES['train']}")
  if setup.config.batches_between_evals:
    check_split_has_answers(
        setup, setup.config.eval_split,
        "the periodic evaluation (--batches_between_evals)")
  run_config, changed_settings = setup.check_run_config()
  metrics = _Metrics(
      run_directory.path(setup.run_dir, run_directory.METRICS_NAME),
      setup.is_chief)
  done_path = run_directory.path(setup.run_dir, run_directory.DONE_NAME)
  schedule = tf_utils.make_learning_rate_schedule(
      setup.config.learning_rate_schedule, setup.config.learning_rate,
      warmup_steps=setup.config.warmup_steps, total_steps=max_steps)

  strategy, model = setup.strategy, setup.model
  with strategy.scope():
    optimizer = tf_utils.make_optimizer(
        setup.config.optimizer_type, schedule,
        weight_decay=setup.config.weight_decay)
    variables = model.trainable_variables
    optimizer.build(variables)
  # Host variables, outside the strategy: only Python reads them. The
  # input's position is the examples each input pipeline (worker) has given
  # the model; a resumed run's stream goes on from there (`_train_input`).
  step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
  examples_read = tf.Variable(0, dtype=tf.int64, trainable=False,
                              name="examples_read")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                   examples_read=examples_read)
  manager = tf_utils.make_checkpoint_manager(
      setup.checkpoint_dir, checkpoint,
      max_to_keep=setup.config.keep_checkpoints)
  if _restore_latest(manager, examples_read,
                     setup.config.batch_size // setup.num_workers):
    logging.info("resumed from %s at step %d", manager.latest_checkpoint,
                 int(step))
  elif tf.io.gfile.exists(done_path):
    raise utils.UserError(
        f"{done_path}: the run finished, but {setup.checkpoint_dir} holds "
        "no checkpoint, expected its checkpoints: restore them, or delete the "
        "run directory to train again from step 0")
  setup.write_run_config(run_config, changed_settings, int(step))
  next_batch = _train_input(setup, train_files, train_config,
                            int(examples_read))
  metrics.resume_at(int(step))
  if setup.is_chief and int(step):
    _drop_events_after(setup.run_dir, int(step))
  train_step = tf_utils.make_train_step(
      strategy, lambda batch: task_specific.answer_loss_sum(
          model, batch, setup.layout.max_labels, training=True),
      variables, optimizer, clip_norm=setup.config.clip_norm or None,
      batch_split=setup.config.batch_split,
      jit_compile=setup.config.experimental_compile)
  evaluate = make_eval_fn(setup)
  eval_step = make_eval_step(setup)
  non_finite_variables = tf_utils.make_finiteness_check(
      list(model.variables) + list(optimizer.variables))
  writers = _summary_writers(setup)
  if int(step) == 0:
    with neighbour_cache.reading_shards(setup.cache_dir, train_files, "train"):
      _log_samples(setup, train_files, train_config, writers["train"])

  last_save_time = time.time()
  window_start, window_tokens = time.time(), 0.0
  progress = tqdm.tqdm(total=max_steps, initial=int(step), desc="train",
                       disable=not setup.is_chief)
  try:
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
      examples_read.assign_add(setup.config.batch_size // setup.num_workers)
      progress.update(1)
      current = int(step)
      window_tokens += float(outputs["num_tokens"])
      if current % setup.config.log_every_steps == 0 or current == max_steps:
        elapsed = max(time.time() - window_start, 1e-9)
        record = {"step": current, "loss": loss, "answer_ppl": perplexity(loss),
                  "grad_norm": grad_norm,
                  "learning_rate": float(schedule(current - 1)),
                  "tokens_per_second": window_tokens / elapsed}
        _write_scalars(writers["train"], record, current)
        metrics.write(record)
        window_start, window_tokens = time.time(), 0.0
      if (setup.config.batches_between_evals and
          current % setup.config.batches_between_evals == 0):
        with neighbour_cache.reading_shards(
            setup.cache_dir, setup.files(setup.config.eval_split),
            setup.config.eval_split):
          result = evaluate(setup.eval_dataset(
              eval_config, setup.config.eval_split,
              setup.config.number_eval_batches), "eval")
        _write_scalars(writers["eval"], result, current)
        metrics.write({"step": current,
                       **{f"eval_{k}": v for k, v in result.items()}})
      minutes = (time.time() - last_save_time) / 60
      if (current % setup.config.checkpoint_every_steps == 0 or
          current == max_steps or
          (setup.num_workers == 1 and
           minutes >= setup.config.checkpoint_every_minutes)):
        problem = _check_state(non_finite_variables, eval_step, batch)
        if problem:
          raise utils.UserError(
              f"step {current}: {problem}; stopping without saving. The last "
              f"good checkpoint is {last_good}")
        _save_checkpoint(setup, manager, current)
        last_save_time = time.time()
  finally:
    # Before an error is reported: the error's line comes after the bar's.
    progress.close()
  if setup.is_chief:
    run_directory.save_final_model(setup.run_dir, model, setup.tokenizer)
    # Written last: scripts (the demo) take it to mean "training finished".
    utils.atomic_write_json(done_path, {
        "step": int(step), "final_model": run_directory.FINAL_MODEL_DIR,
        "checkpoint": manager.latest_checkpoint})
  for writer in writers.values():
    writer.flush()


def _restore_latest(manager, examples_read, examples_per_step):
  """Restores the run's latest checkpoint; False when there is none.

  A checkpoint written before checkpoints held the input's position holds
  the tf.data iterator instead (not read): its position is then its step's
  examples, `examples_per_step` a step.
  """
  path = manager.latest_checkpoint
  if path is None:
    return False
  what = "model, optimizer and input position"
  if _holds_position(path):
    tf_utils.restore(manager.checkpoint, path, what)
    return True
  checkpoint = manager.checkpoint
  tf_utils.restore(tf.train.Checkpoint(
      model=checkpoint.model, optimizer=checkpoint.optimizer,
      step=checkpoint.step), path, what, partial=True)
  examples_read.assign(checkpoint.step * examples_per_step)
  return True


def _holds_position(path):
  """Whether a checkpoint holds `examples_read`; an unreadable one counts as
  holding it, for `tf_utils.restore` to say what is wrong with it."""
  try:
    names = [name for name, _ in tf.train.list_variables(path)]
  except tf.errors.OpError:
    return True
  return any(name.startswith("examples_read/") for name in names)


def _save_checkpoint(setup, manager, step):
  """Saves a checkpoint; then stops if live retrieval has failed.

  A checkpoint holds the input's position, not the pipeline's buffers: the
  elements prefetched with a failed retrieval are not in it, and a run
  resumed from it retrieves them again.
  """
  manager.save(checkpoint_number=step)
  if setup.retrieval is not None and setup.retrieval.failure is not None:
    raise setup.retrieval.failure


def _train_input(setup, files, data_config, examples_read):
  """() -> the next distributed training batch, `examples_read` examples of
  each input pipeline's stream on (a resumed run's position).

  Through `distribute_datasets_from_function`: each worker reads its share of
  the shards (by its `InputContext`) in per-replica batches, which its
  replicas take in turn, so a global batch is the same whatever the number
  of replicas of a worker. TensorFlow's distributed iterators cannot be
  checkpointed (`tf.train.Checkpoint` refuses them; the batches prefetched
  to the devices are no iterator state): a resumed run starts the stream,
  deterministic in the seed, at the epoch it stopped in, and drops that
  epoch's examples already read before they are laid out
  (`task_specific.make_dataset`'s `skip_examples`).
  """
  per_replica = setup.config.batch_size // setup.num_replicas

  def dataset_fn(input_context):
    return task_specific.make_dataset(
        files, data_config, setup.layout, batch_size=per_replica,
        training=True, input_context=input_context,
        skip_examples=examples_read, retrieval=setup.retrieval)

  iterator = iter(setup.strategy.distribute_datasets_from_function(
      dataset_fn, options=INPUT_OPTIONS))

  def next_batch():
    with neighbour_cache.reading_shards(setup.cache_dir, files, "train"):
      return next(iterator)

  return next_batch


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
  if not setup.config.log_samples:
    return
  batch = next(iter(task_specific.make_dataset(
      files, data_config, setup.layout, batch_size=setup.config.log_samples,
      training=True, retrieval=setup.retrieval)))
  texts = []
  for index in range(setup.config.log_samples):
    row = {name: value[index].numpy() for name, value in batch.items()}
    texts.append(task_specific.format_sample(setup.tokenizer, row))
  with writer.as_default(step=0):
    tf.summary.text("samples (⟦no loss⟧)",
                    "\n\n---\n\n".join(f"```\n{t}\n```" for t in texts))
