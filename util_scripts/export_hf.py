r"""Exports a run's latest checkpoint as a Hugging Face GPT-2 repository.

  python util_scripts/export_hf.py --run_dir=RUNS/NAME --output_dir=HF_DIR

writes into HF_DIR what a GPT-2 hub repository holds:

  model.safetensors       PyTorch layout (`format: pt`): the names and shapes
                          of transformers' `GPT2LMHeadModel.save_pretrained`
                          (Conv1D weights [in, out]; the head is tied to
                          `transformer.wte.weight` and not stored)
  tf_model.h5             TF layout, written by transformers' TFGPT2LMHeadModel
  config.json, generation_config.json
  tokenizer files         GPT2TokenizerFast's
  README.md               model card: base model, data, steps, ablation tables
  export_hf.json          what was exported (run, checkpoint, step, files)

PyTorch loads it with `GPT2LMHeadModel.from_pretrained(HF_DIR)`, TensorFlow
with `TFGPT2LMHeadModel.from_pretrained(HF_DIR, use_safetensors=False)` (the
TF loader of transformers 4.x prefers model.safetensors, and with
safetensors>=0.6 it cannot read a PyTorch-layout one: it must be sent to
tf_model.h5), this project with `--model_key=HF_DIR`.

Nothing half-written looks complete. A local export is written into a
temporary sibling directory and renamed into place; a remote one (gs://),
where directories cannot be renamed, is staged locally and copied with
export_hf.json last, so a remote directory without it is unfinished. An
earlier export (a directory with export_hf.json) is replaced; any other
non-empty directory is refused.
"""

import functools
import os
import shutil
import sys
import tempfile

from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import safetensors.numpy  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position

import context_draw  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt2_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
import neighbour_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
import run_dir as run_dir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import task_specific  # pylint: disable=g-import-not-at-top,wrong-import-position
import training  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_RUN_DIR = flags.DEFINE_string(
    "run_dir", None, "Required. A run directory written by main.py.")
_FLAG_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None,
    "Required. The Hugging Face directory to write (local or gs://); an "
    "earlier export there is replaced.")
_FLAG_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None,
    "GPT2TokenizerFast key or directory to export with the weights. "
    "Default: the run's.")

MARKER_NAME = "export_hf.json"
PYTORCH_WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
# One tf_model.h5 at any GPT-2 size, as the hub's GPT-2 repositories hold
# (transformers would otherwise shard at 5 GB, i.e. gpt2-xl).
_TF_MAX_SHARD_SIZE = "1000GB"
# The ablation rows main.py writes, in the order the card lists them.
_ABLATION_ROWS = {"real": "the question's retrieved contexts",
                  "random": "a random question's contexts",
                  "none": "no contexts"}


def check_output_dir(output_dir):
  """Refuses, before any work, an output path an export must not replace."""
  utils.check_output_path(output_dir, "--output_dir", directory=True)
  if not tf.io.gfile.exists(output_dir):
    return
  if not tf.io.gfile.isdir(output_dir):
    raise utils.UserError(
        f"--output_dir={output_dir}: is a file, expected a directory to "
        "export into")
  if (tf.io.gfile.listdir(output_dir) and
      not tf.io.gfile.exists(os.path.join(output_dir, MARKER_NAME))):
    raise utils.UserError(
        f"--output_dir={output_dir}: a non-empty directory that is not an "
        f"earlier export (no {MARKER_NAME}), expected a new or empty "
        "directory or an earlier export to replace")


def write_pytorch_weights(model, path):
  """The model's weights as transformers' PyTorch GPT-2 saves them.

  Our weight names and shapes are PyTorch's already (Conv1D [in, out],
  biases [n]); `save_pretrained` leaves out `lm_head.weight` (tied to wte)
  and the attention `bias` buffers (not persistent), so this does too.
  """
  tensors = {name: variable.numpy()
             for name, variable in model.named_weights().items()}
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def transformers_tf_model(model):
  """transformers' TFGPT2LMHeadModel holding `model`'s weights."""
  config = transformers.GPT2Config.from_dict(model.config.to_dict())
  tf_model = transformers.TFGPT2LMHeadModel(config)
  tf_model.build_in_name_scope()
  weights = model.named_weights()
  for variable in tf_model.weights:
    # TF Conv1D biases are [1, n], ours [n].
    variable.assign(tf.reshape(
        weights.pop(gpt2_weights.hf_weight_name(variable.name)),
        variable.shape))
  assert not weights, f"not in transformers' TF GPT-2: {sorted(weights)}"
  return tf_model


def _markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |",
           "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |"
            for row in rows]
  return "\n".join(lines)


def _data_section(cache_dir):
  """The model card's data section: the cache and its split counts."""
  try:
    manifest = neighbour_cache.read_manifest(cache_dir)
  except utils.UserError as error:
    # The cache may have been moved since training; the export still holds.
    logging.warning("model card without data details: %s", error)
    return (f"Neighbour cache `{cache_dir}` (its manifest could not be read "
            f"at export time: {error}).")
  search = manifest["search"]["kind"]
  if not manifest["num_neighbours"]:
    lines = [
        f"Neighbour cache `{cache_dir}`: KILT ELI5 questions and answers only "
        "(made with --num_neighbours=0; contexts, if any, were retrieved "
        "live).", ""]
  else:
    lines = [
        f"Neighbour cache `{cache_dir}`: KILT ELI5 questions with the "
        f"{manifest['num_neighbours']} nearest of {manifest['num_blocks']} "
        f"Wikipedia blocks (`{manifest['blocks_path']}`) by {search} search "
        f"with the REALM embedder `{manifest['embedder_path']}`, blocks cut "
        f"to {manifest['max_block_tokens']} tokens.", ""]
  lines.append(_markdown_table(
      ["split", "questions"],
      [(split, values["num_records"])
       for split, values in manifest["splits"].items()]))
  return "\n".join(lines)


def _ablation_section(run_dir, step):
  """The run's `ablation_{split}.json` tables as markdown."""
  paths = run_dir_lib.ablation_paths(run_dir)
  if not paths:
    return ("No ablation was run (`main.py --task=evaluate` writes "
            "`ablation_{split}.json` into the run directory).")
  sections = ["Answer perplexity by `main.py --task=evaluate`, per split."]
  for split, path in paths.items():
    table = utils.read_json(path, "ablation table")
    names = [n for n in _ABLATION_ROWS if n in table] + sorted(
        n for n in table if n not in _ABLATION_ROWS)
    rows = []
    for name in names:
      row = table[name]
      if not isinstance(row, dict) or "answer_ppl" not in row:
        raise utils.UserError(
            f"{path}: row {name!r} has no answer_ppl, expected the table "
            "main.py --task=evaluate writes")
      rows.append((f"{name} ({_ABLATION_ROWS.get(name, name)})",
                   f"{row['answer_ppl']:.4f}", row.get("answer_tokens", "—"),
                   row.get("checkpoint_step", "—")))
    sections += [f"### {split}", _markdown_table(
        ["contexts", "answer perplexity", "answer tokens", "checkpoint step"],
        rows)]
    stale = sorted({row[3] for row in rows if isinstance(row[3], int)} -
                   {step})
    if stale:
      sections.append(f"Measured at step {', '.join(map(str, stale))}, not "
                      f"at the exported step {step}.")
  return "\n\n".join(sections)


def model_card(run_dir, run, step, tokenizer_key):
  """README.md of the export (`run`: the run's TrainConfig): what was
  trained, on what, for how long."""
  name = run.run_name or os.path.basename(run_dir.rstrip("/"))
  if run.approach_type == context_draw.Approach.NAKED_LM:
    task = "without retrieved passages (`Question: … Answer: …`"
  else:
    task = ("from retrieved Wikipedia passages (`Question: … Context: … "
            "Answer: …`")
  facts = [
      ("base model (`--model_key`)", f"`{run.model_key}`"),
      ("approach (`--approach_type`)", f"`{run.approach_type}`"),
      ("steps trained", step),
      ("batch size", run.batch_size),
      ("contexts per question (`--num_retrievals`)", run.num_retrievals),
      ("tokenizer", f"`{tokenizer_key}`"),
      ("run directory", f"`{run_dir}`"),
  ]
  return "\n".join([
      "---", "library_name: transformers", "pipeline_tag: text-generation",
      "tags:", "- gpt2", "- eli5", "- retrieval-augmented-generation", "---",
      "", f"# {name}", "",
      f"GPT-2 fine-tuned to answer KILT ELI5 questions {task}, loss on the "
      f"answer only), exported at training step {step} by "
      "`util_scripts/export_hf.py`.", "",
      _markdown_table(["", ""], facts), "",
      "## Data", "", _data_section(run.cache_dir or ""), "",
      "## Retrieval ablation", "", _ablation_section(run_dir, step), "",
      "## Loading", "",
      "```python",
      "from transformers import GPT2LMHeadModel, GPT2TokenizerFast, "
      "TFGPT2LMHeadModel",
      'tokenizer = GPT2TokenizerFast.from_pretrained("HF_DIR")',
      'model = GPT2LMHeadModel.from_pretrained("HF_DIR")  # PyTorch',
      'tf_model = TFGPT2LMHeadModel.from_pretrained("HF_DIR", '
      'use_safetensors=False)  # TensorFlow: tf_model.h5',
      "```", ""])


def _write_export(directory, model, tokenizer, run_dir, run, path, step,
                  tokenizer_key):
  """Writes every file of the export into the local `directory`."""
  tokenizer.save_pretrained(directory)
  write_pytorch_weights(model, os.path.join(directory, PYTORCH_WEIGHTS_NAME))
  # Also writes config.json and generation_config.json.
  transformers_tf_model(model).save_pretrained(
      directory, safe_serialization=False, max_shard_size=_TF_MAX_SHARD_SIZE)
  utils.atomic_write_text(os.path.join(directory, MODEL_CARD_NAME),
                          model_card(run_dir, run, step, tokenizer_key))
  files = sorted(os.listdir(directory) + [MARKER_NAME])
  utils.atomic_write_json(os.path.join(directory, MARKER_NAME),
                          {"run_dir": run_dir, "checkpoint": path,
                           "step": step, "files": files})


def _publish_local(staging, output_dir):
  """Renames the finished `staging` directory to `output_dir`."""
  previous = None
  if os.path.isdir(output_dir):
    # An earlier export or an empty directory (check_output_dir): moved
    # aside, so output_dir is at every moment absent or a whole export.
    previous = utils.temporary_path(output_dir)
    os.rename(output_dir, previous)
  os.rename(staging, output_dir)
  if previous:
    shutil.rmtree(previous)


def _publish_remote(staging, output_dir):
  """Copies the finished `staging` directory to `output_dir`, marker last."""
  marker = os.path.join(output_dir, MARKER_NAME)
  if tf.io.gfile.exists(output_dir):
    # The marker goes first, so the export being replaced no longer looks
    # complete.
    if tf.io.gfile.exists(marker):
      tf.io.gfile.remove(marker)
    tf.io.gfile.rmtree(output_dir)
  utils.makedirs(output_dir)
  for name in sorted(os.listdir(staging)):
    if name != MARKER_NAME:
      tf.io.gfile.copy(os.path.join(staging, name),
                       os.path.join(output_dir, name))
  tf.io.gfile.copy(os.path.join(staging, MARKER_NAME), marker)


def export(run_dir, output_dir, tokenizer_key=None):
  """Writes the run's latest checkpoint to `output_dir`; returns its step."""
  check_output_dir(output_dir)
  run_config, run = training.read_run(run_dir)
  model, path, step = run_dir_lib.load_model(run_dir, run_config)
  tokenizer_key = tokenizer_key or run_dir_lib.tokenizer_dir(run_dir,
                                                             run_config)
  tokenizer = task_specific.load_tokenizer(tokenizer_key)
  write = functools.partial(
      _write_export, model=model, tokenizer=tokenizer, run_dir=run_dir,
      run=run, path=path, step=step, tokenizer_key=tokenizer_key)
  if "://" in output_dir:
    with tempfile.TemporaryDirectory() as staging:
      write(staging)
      _publish_remote(staging, output_dir)
    return step
  output_dir = os.path.abspath(output_dir)
  os.makedirs(os.path.dirname(output_dir), exist_ok=True)
  staging = utils.temporary_path(output_dir)
  os.makedirs(staging)
  try:
    write(staging)
    _publish_local(staging, output_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return step


def main(argv):
  if not _FLAG_RUN_DIR.value:
    raise utils.UserError("--run_dir is required (a main.py run directory)")
  if not _FLAG_OUTPUT_DIR.value:
    raise utils.UserError("--output_dir is required")
  step = export(_FLAG_RUN_DIR.value, _FLAG_OUTPUT_DIR.value,
                _FLAG_TOKENIZER.value)
  print(f"exported step {step} of {_FLAG_RUN_DIR.value} to "
        f"{_FLAG_OUTPUT_DIR.value}")


if __name__ == "__main__":
  cli.run(main)
