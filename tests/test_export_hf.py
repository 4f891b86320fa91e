"""util_scripts/export_hf.py: a hub-style export that transformers' PyTorch and TF GPT-2 load with our logits.

The run is the cheapest real one: cache_fixtures' tiny training world, trained
for two steps and evaluated in-process (`training.train`, `evaluation.evaluate`).
The export runs as users run it, in a subprocess (importing an entry script
would define its flags in the test process); the export is then loaded in
this process by transformers' PyTorch and TF GPT-2 and GPT2TokenizerFast.
"""

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import tensorflow as tf
import torch
import transformers

import cache_fixtures
import evaluation
import run_dir as run_dir_lib
import settings
import task_specific
import training
import utils

# Slow, the whole module (a trained run, exports in subprocesses):
# not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 2
NUM_TRAIN, NUM_VALIDATION = 48, 12
# Exports to ram:// (TensorFlow's in-process filesystem, standing in for
# gs://: no directory rename) twice, the second replacing the first, and
# copies the result to a local directory to compare.
_REMOTE_EXPORT = """
import os, sys
import tensorflow as tf
from util_scripts import export_hf
run_dir, local_copy = sys.argv[1:]
for _ in range(2):
  export_hf.export(run_dir, "ram://hf")
os.makedirs(local_copy)
for name in tf.io.gfile.listdir("ram://hf"):
  tf.io.gfile.copy("ram://hf/" + name, os.path.join(local_copy, name))
"""


def _environment():
  return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")


def start_export(*args):
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "util_scripts", "export_hf.py"),
       *args], cwd=ROOT, env=_environment(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def finish(process):
  stdout, stderr = process.communicate(timeout=600)
  return process.returncode, stdout, stderr


def one_line_error(process, *fragments):
  returncode, _, stderr = finish(process)
  assert returncode == utils.USER_ERROR_EXIT_CODE, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


@pytest.fixture(name="run_dir", scope="module")
def fixture_run_dir(tmp_path_factory):
  """A run trained for TRAIN_STEPS steps, with its ablation table."""
  root = tmp_path_factory.mktemp("export_run")
  world = cache_fixtures.write_training_world(
      root / "world", num_train=NUM_TRAIN, num_validation=NUM_VALIDATION)
  config = settings.from_flat(training.TrainConfig, {
      "model_key": world["model"], "tokenizer": world["tokenizer"],
      "cache_dir": world["cache"], "output_dir": str(root / "runs"),
      "run_name": "run", "batch_size": 4, "num_retrievals": 2,
      "max_question_tokens": 8, "max_answer_tokens": 8,
      "max_context_tokens": 12, "learning_rate": 1e-3,
      "max_steps": TRAIN_STEPS, "batches_between_evals": 0, "log_samples": 0,
      "shuffle_buffer_size": 16}, "test")
  training.train(config)
  evaluation.evaluate(config)
  return str(root / "runs" / "run")


@pytest.fixture(name="export_dir", scope="module")
def fixture_export_dir(run_dir, tmp_path_factory):
  output = str(tmp_path_factory.mktemp("export") / "hf")
  returncode, stdout, stderr = finish(
      start_export(f"--run_dir={run_dir}", f"--output_dir={output}"))
  assert returncode == 0, stderr[-3000:]
  assert f"exported step {TRAIN_STEPS} of {run_dir}" in stdout
  return output


def test_pytorch_and_tf_load_the_export_with_our_logits(run_dir, export_dir):
  """Acceptance 7."""
  tokenizer = transformers.GPT2TokenizerFast.from_pretrained(export_dir)
  run_config = run_dir_lib.read_config(run_dir)
  run_tokenizer = task_specific.load_tokenizer(
      run_dir_lib.tokenizer_dir(run_dir, run_config))
  text = "why does the sky look blue"
  assert tokenizer(text)["input_ids"] == run_tokenizer(text)["input_ids"]
  ours_model, _, step = run_dir_lib.load_model(run_dir, run_config)
  assert step == TRAIN_STEPS
  config = ours_model.config
  input_ids = np.random.default_rng(0).integers(
      0, config.vocab_size, (2, config.n_positions))
  ours = ours_model(tf.constant(input_ids)).numpy()

  pt_model, info = transformers.GPT2LMHeadModel.from_pretrained(
      export_dir, output_loading_info=True)
  assert info == {"missing_keys": [], "unexpected_keys": [],
                  "mismatched_keys": [], "error_msgs": []}
  assert not [name for name, tensor in itertools.chain(
      pt_model.named_parameters(), pt_model.named_buffers()) if tensor.is_meta]
  with torch.no_grad():
    pt_logits = pt_model.eval()(torch.tensor(input_ids)).logits.numpy()
  np.testing.assert_allclose(pt_logits, ours, rtol=0, atol=1e-4)

  # transformers' TF loader prefers model.safetensors and cannot read a
  # PyTorch-layout one (see export_hf.py): TF users load tf_model.h5.
  tf_model, info = transformers.TFGPT2LMHeadModel.from_pretrained(
      export_dir, use_safetensors=False, output_loading_info=True)
  assert info == {"missing_keys": [], "unexpected_keys": [],
                  "mismatched_keys": []}
  tf_logits = tf_model(tf.constant(input_ids)).logits.numpy()
  np.testing.assert_allclose(tf_logits, ours, rtol=0, atol=1e-4)


def test_files_are_what_transformers_writes(export_dir, tmp_path):
  assert sorted(os.listdir(export_dir)) == sorted([
      "README.md", "config.json", "export_hf.json", "generation_config.json",
      "merges.txt", "model.safetensors", "special_tokens_map.json",
      "tf_model.h5", "tokenizer.json", "tokenizer_config.json", "vocab.json"])
  assert not [name for name in os.listdir(os.path.dirname(export_dir))
              if name != "hf"]  # No staging directory left behind.
  # model.safetensors: the names, shapes and metadata of PyTorch's own save.
  pt_model = transformers.GPT2LMHeadModel.from_pretrained(export_dir)
  pt_model.save_pretrained(str(tmp_path))

  def layout(directory):
    with safetensors.safe_open(os.path.join(directory, "model.safetensors"),
                               "np") as f:
      return f.metadata(), {name: f.get_slice(name).get_shape()
                            for name in f.keys()}

  ours, theirs = layout(export_dir), layout(str(tmp_path))
  assert ours == theirs and ours[0] == {"format": "pt"}
  assert "transformer.h.1.attn.c_attn.weight" in ours[1]
  config = json.load(open(os.path.join(export_dir, "config.json")))
  assert config["architectures"] == ["GPT2LMHeadModel"]
  marker = json.load(open(os.path.join(export_dir, "export_hf.json")))
  assert marker["step"] == TRAIN_STEPS
  assert marker["files"] == sorted(os.listdir(export_dir))


def test_model_card_names_the_base_model_data_steps_and_ablation(
    run_dir, export_dir):
  card = open(os.path.join(export_dir, "README.md"), encoding="utf-8").read()
  run_flags = run_dir_lib.read_config(run_dir)["flags"]
  assert f"| steps trained | {TRAIN_STEPS} |" in card
  assert f"| base model (`--model_key`) | `{run_flags['model_key']}` |" in card
  assert f"Neighbour cache `{run_flags['cache_dir']}`" in card
  assert f"| train | {NUM_TRAIN} |" in card
  assert f"| validation | {NUM_VALIDATION} |" in card
  table = json.load(open(os.path.join(run_dir, "ablation_validation.json")))
  assert "### validation" in card
  for name, row in table.items():
    assert (f"| {name} (" in card and
            f"| {row['answer_ppl']:.4f} | {row['answer_tokens']} | "
            f"{TRAIN_STEPS} |" in card), name


def test_reexport_and_remote_export_and_bad_inputs(run_dir, export_dir,
                                                    tmp_path):
  """A local re-export replaces the earlier one; a remote export copies
  with the marker last; bad paths get one-line errors."""
  again = str(tmp_path / "again")
  shutil.copytree(export_dir, again)
  no_checkpoint = tmp_path / "no_checkpoint"
  no_checkpoint.mkdir()
  shutil.copy(os.path.join(run_dir, "config.json"), no_checkpoint)
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  not_an_export = tmp_path / "not_an_export"
  not_an_export.mkdir()
  (not_an_export / "notes.txt").write_text("keep me")
  remote_copy = str(tmp_path / "remote_copy")
  # Started together: each is mostly the interpreter starting.
  processes = {
      "again": start_export(f"--run_dir={run_dir}", f"--output_dir={again}"),
      "no_checkpoint": start_export(f"--run_dir={no_checkpoint}",
                                    f"--output_dir={tmp_path / 'unused'}"),
      "file": start_export(f"--run_dir={run_dir}", f"--output_dir={a_file}"),
      "not_an_export": start_export(f"--run_dir={run_dir}",
                                    f"--output_dir={not_an_export}"),
      "remote": subprocess.Popen(
          [sys.executable, "-c", _REMOTE_EXPORT, run_dir, remote_copy],
          cwd=ROOT, env=_environment(), stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True),
  }
  returncode, _, stderr = finish(processes["again"])
  assert returncode == 0, stderr[-3000:]
  assert sorted(os.listdir(again)) == sorted(os.listdir(export_dir))
  for name in ("model.safetensors", "README.md", "vocab.json"):
    with open(os.path.join(again, name), "rb") as ours, open(
        os.path.join(export_dir, name), "rb") as reference:
      assert ours.read() == reference.read(), name
  returncode, _, stderr = finish(processes["remote"])
  assert returncode == 0, stderr[-3000:]
  assert sorted(os.listdir(remote_copy)) == sorted(os.listdir(export_dir))
  assert json.load(open(os.path.join(remote_copy, "export_hf.json")))[
      "step"] == TRAIN_STEPS
  model, info = transformers.GPT2LMHeadModel.from_pretrained(
      remote_copy, output_loading_info=True)
  assert not info["missing_keys"] and model.num_parameters() > 0

  one_line_error(processes["no_checkpoint"], f"{no_checkpoint}: no checkpoint")
  one_line_error(processes["file"], f"--output_dir={a_file}", "is a file")
  one_line_error(processes["not_an_export"], "not an earlier export")
  assert os.listdir(not_an_export) == ["notes.txt"]
  assert sorted(os.listdir(tmp_path)) == sorted([
      "again", "no_checkpoint", "a_file", "not_an_export", "remote_copy"])
