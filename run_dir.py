"""A run directory: what training writes, and the one way to read it back.

  RUN/config.json     {"flags": every training setting (flat, by flag
                      name), "model_config": the model's whole GPT2Config,
                      "tokenizer": "tokenizer", "changes": [...]}
  RUN/tokenizer/      the tokenizer the run trained with
  RUN/checkpoints/    model, optimizer, step and input position (workers of a
                      multi-worker job: checkpoints/worker-N/)
  RUN/train/, eval/   TensorBoard events
  RUN/metrics.jsonl   one line per logged step
  RUN/final_model/    Hugging Face format with the tokenizer, at the end
  RUN/done.json       written last
  RUN/ablation_{split}.json

Training (`training.py`) writes it; evaluation, generation and export read
it with this module alone: a run directory is self-sufficient once its
`model_key` directory is gone (the cache it read is still needed for
questions). Knows nothing of how training works.
"""

import os

import tensorflow as tf
import transformers

import modeling_tf_gpt2_model_par as modeling
import tf_utils
import utils

CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
FINAL_MODEL_DIR = "final_model"
METRICS_NAME = "metrics.jsonl"
DONE_NAME = "done.json"
# The model-config keys that decide the weights' shapes and meaning: a run
# refuses a model that differs in any of them.
MODEL_SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer",
                    "n_head", "n_inner", "activation_function",
                    "layer_norm_epsilon")


def path(run_dir, name):
  return os.path.join(run_dir, name)


_ABLATION_PREFIX, _ABLATION_SUFFIX = "ablation_", ".json"


def ablation_path(run_dir, split):
  return os.path.join(run_dir, f"{_ABLATION_PREFIX}{split}{_ABLATION_SUFFIX}")


def ablation_examples_path(run_dir, split):
  """The evaluation's per-example scores (evaluation.py), one row per line."""
  return os.path.join(run_dir, f"{_ABLATION_PREFIX}{split}_examples.jsonl")


def ablation_report_path(run_dir, split):
  """The evaluation's markdown table."""
  return os.path.join(run_dir, f"{_ABLATION_PREFIX}{split}.md")


def ablation_plot_path(run_dir, split):
  """The evaluation's plot."""
  return os.path.join(run_dir, f"{_ABLATION_PREFIX}{split}.png")


def ablation_paths(run_dir):
  """{split: path} of the run's ablation tables, by split."""
  paths = tf.io.gfile.glob(ablation_path(run_dir, "*"))
  return {os.path.basename(p)[len(_ABLATION_PREFIX):-len(_ABLATION_SUFFIX)]: p
          for p in sorted(paths)}


def checkpoint_dir(run_dir, worker_index=0):
  """The chief's checkpoints; other workers save theirs (with their own input
  position) beside it."""
  directory = os.path.join(run_dir, CHECKPOINT_DIR)
  if worker_index == 0:
    return directory
  return os.path.join(directory, f"worker-{worker_index}")


def lock(run_dir, task_name, *, create):
  """Holds the run directory's lock (one per task of a multi-worker job).

  `create`: make the directory if it is missing; a job that then fails before
  writing anything leaves no empty directory behind.
  """
  lock_name = f"lock-{task_name}" if task_name else "lock"
  what = f"run directory {run_dir}"
  if create:
    return utils.locked_directory(run_dir, lock_name, what)
  return utils.exclusive_lock(os.path.join(run_dir, lock_name), what)


def exists(run_dir):
  return tf.io.gfile.exists(path(run_dir, CONFIG_NAME))


def read_config(run_dir):
  """The run's config.json, checked to be one training wrote."""
  config_path = path(run_dir, CONFIG_NAME)
  if not tf.io.gfile.exists(config_path):
    raise utils.UserError(
        f"{run_dir}: no {CONFIG_NAME}, expected a run directory made by "
        "main.py --task=train")
  config = utils.read_json(config_path, "run config")
  if not (isinstance(config, dict) and
          isinstance(config.get("flags"), dict) and
          isinstance(config.get("model_config"), dict) and
          isinstance(config.get("tokenizer"), str)):
    raise utils.UserError(
        f"{config_path}: expected a JSON object with \"flags\", "
        "\"model_config\" and \"tokenizer\" (the config main.py writes)")
  return config


def write_config(run_dir, config):
  utils.atomic_write_json(path(run_dir, CONFIG_NAME), config)


def model_shape_differences(config, model_config):
  """'key: run X, now Y' for each weight-deciding key that differs."""
  stored = config["model_config"]
  return [f"{key}: run {stored.get(key)!r}, now {model_config.get(key)!r}"
          for key in MODEL_SHAPE_KEYS if stored.get(key) != model_config.get(key)]


def save_tokenizer(run_dir, tokenizer):
  """Saves the tokenizer into the run (complete, or not there at all)."""
  target = path(run_dir, TOKENIZER_DIR)
  if tf.io.gfile.exists(target):
    return
  staging = utils.temporary_path(target)
  tokenizer.save_pretrained(staging)
  tf.io.gfile.rename(staging, target)


def save_final_model(run_dir, model, tokenizer):
  """RUN/final_model: the model in Hugging Face format and its tokenizer, so
  that `--model_key=RUN/final_model` is a whole checkpoint on its own."""
  directory = path(run_dir, FINAL_MODEL_DIR)
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)


def tokenizer_dir(run_dir, config):
  return path(run_dir, config["tokenizer"])


def model_config(config):
  """The run's whole GPT2Config."""
  return transformers.GPT2Config.from_dict(config["model_config"])


def _check_checkpoint_weights(checkpoint_path, model, run_dir):
  """Refuses a checkpoint whose model weights are not the run's.

  Checked by name and shape before restoring: a checkpoint of a deeper
  model would otherwise silently fill a shallower one, and a failed restore
  leaves TensorFlow warning about every unread value.
  """
  prefix, suffix = "model/", "/.ATTRIBUTES/VARIABLE_VALUE"
  stored = {name[len(prefix):-len(suffix)].replace("/", "."): tuple(shape)
            for name, shape in tf.train.list_variables(checkpoint_path)
            if name.startswith(prefix) and name.endswith(suffix) and
            ".OPTIMIZER_SLOT" not in name}
  expected = {name: tuple(variable.shape)
              for name, variable in model.named_weights().items()}
  config_path = path(run_dir, CONFIG_NAME)
  if len(stored) != len(expected):
    raise utils.UserError(
        f"{checkpoint_path}: holds {len(stored)} model weights, but the model "
        f"of {config_path} has {len(expected)}; the checkpoint is not this "
        "run's")
  for name, shape in expected.items():
    if stored.get(name) != shape:
      raise utils.UserError(
          f"{checkpoint_path}: weight {name} has shape {stored.get(name)} in "
          f"the checkpoint, {shape} in the model of {config_path}; the "
          "checkpoint is not this run's")


def restore_model(run_dir, model):
  """Restores the model of the run's latest checkpoint into `model`.

  Returns:
    (checkpoint path, training step).
  """
  checkpoint_path = tf_utils.latest_checkpoint(checkpoint_dir(run_dir))
  if checkpoint_path is None:
    raise utils.UserError(
        f"{run_dir}: no checkpoint in {CHECKPOINT_DIR}/ (train first)")
  _check_checkpoint_weights(checkpoint_path, model, run_dir)
  # Partial: the optimizer and input position of the checkpoint stay unread.
  tf_utils.restore(tf.train.Checkpoint(model=model), checkpoint_path,
                   f"model of {path(run_dir, CONFIG_NAME)}", partial=True)
  return checkpoint_path, int(checkpoint_path.rsplit("-", 1)[-1])


def load_model(run_dir, config, strategy=None):
  """The model of the run's latest checkpoint, its variables made in
  `strategy`'s scope (mirrored over its replicas).

  Returns:
    (model, checkpoint path, training step).
  """
  with (strategy or tf.distribute.get_strategy()).scope():
    model = modeling.GPT2LMHeadModel.from_config(model_config(config))
  checkpoint_path, step = restore_model(run_dir, model)
  return model, checkpoint_path, step
