"""memory_plan: its formula against transformers, Keras and the model's own
graph, and its peak against the peak memory of real training steps on CPU.

How memory is measured (`measure`, this file run as a script in a fresh
process): TensorFlow's allocator statistics,
`tf.config.experimental.get_memory_info("CPU:0")`, which this TensorFlow
(2.20) keeps for the CPU too: the bytes of live tensors and their peak, no
interpreter, no graphs, no allocator pools (the process's resident set does
not fall back after a step: oneDNN's CPU allocator pools freed memory).

- static: the live bytes once the model and the optimizer's slots exist,
  against the plan's weights + optimizer state;
- step: two warm-up steps (tracing, graph optimisation), the peak reset
  (`reset_memory_stats`), a third step, and its peak minus the live bytes
  before it, against the plan's peak minus weights and optimizer state.

Both are what the plan claims to count. A cross-check with the resident set
(VmHWM after `clear_refs`, glibc serving big blocks by mmap,
TF_ENABLE_ONEDNN_OPTS=0 so freed tensors leave it) agreed within a few
per cent on the fp32 configuration.
"""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import transformers

import gpt2_weights
import memory_plan
import modeling_tf_gpt2_model_par
import task_specific
import tf_utils
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two configurations large enough that the planned bytes (hundreds of MB)
# dwarf the allocator's noise, small enough for a few seconds a step.
MEASURED = {
    "fp32_adam": dict(
        model=dict(n_layer=4, n_embd=256, n_head=4, vocab_size=2000,
                   n_positions=256),
        sequence_length=256, micro_batch=4, answer_window=64,
        optimizer="adam", precision="fp32", recompute=False, batch_split=1),
    "bf16_adafactor_recompute_split": dict(
        model=dict(n_layer=4, n_embd=512, n_head=8, vocab_size=8000,
                   n_positions=256),
        sequence_length=256, micro_batch=2, answer_window=64,
        optimizer="adafactor", precision="bf16", recompute=True,
        batch_split=2),
}


def _plan_settings(settings):
  """plan()'s keyword arguments (but num_stages) of a MEASURED entry."""
  return {k: v for k, v in settings.items() if k != "model"}


def measure(settings):
  """{"static", "step"}: measured bytes (see the module docstring)."""

  config = transformers.GPT2Config(**settings["model"])
  batch_size = settings["micro_batch"] * settings["batch_split"]
  length, window = settings["sequence_length"], settings["answer_window"]
  rng = np.random.RandomState(0)
  label_mask = np.zeros([batch_size, length], np.int32)
  label_mask[:, length - window + 1:] = 1
  batch = {
      "input_ids": tf.constant(rng.randint(0, config.vocab_size,
                                           [batch_size, length]), tf.int32),
      "attention_mask": tf.ones([batch_size, length], tf.int32),
      "label_mask": tf.constant(label_mask),
      "dropout_seed": tf.constant(rng.randint(0, 1000, [batch_size, 2]),
                                  tf.int32),
  }
  model = modeling_tf_gpt2_model_par.GPT2LMHeadModel.from_config(
      config, dtype="bfloat16" if settings["precision"] == "bf16" else None,
      recompute=settings["recompute"])
  optimizer = tf_utils.make_optimizer(settings["optimizer"], 1e-4)
  variables = model.trainable_variables
  optimizer.build(variables)
  static = tf.config.experimental.get_memory_info("CPU:0")["current"]
  train_step = tf_utils.make_train_step(
      tf.distribute.get_strategy(),
      lambda b: task_specific.answer_loss_sum(model, b, window,
                                              training=True),
      variables, optimizer, clip_norm=1.0,
      batch_split=settings["batch_split"])
  for _ in range(2):
    float(train_step(batch)["loss"])
  before = tf.config.experimental.get_memory_info("CPU:0")["current"]
  tf.config.experimental.reset_memory_stats("CPU:0")
  float(train_step(batch)["loss"])
  peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
  return {"static": static, "step": peak - before}


def _measure_in_subprocess(name):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
  result = subprocess.run(
      [sys.executable, os.path.abspath(__file__), name], env=env,
      capture_output=True, text=True, check=False, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MEASURED))
def test_plan_matches_measured_peak_memory(name):
  settings = MEASURED[name]
  planned = memory_plan.plan(settings["model"], num_stages=1,
                             **_plan_settings(settings)).stages[0]
  measured = _measure_in_subprocess(name)
  planned_static = planned.weights + planned.optimizer
  planned_step = planned.total - planned_static
  assert planned_step > 100e6  # large enough to dominate the noise
  assert abs(measured["static"] / planned_static - 1) < 0.2, (
      measured, planned)
  assert abs(measured["step"] / planned_step - 1) < 0.2, (measured, planned)


def test_weights_are_four_bytes_per_parameter_of_transformers_gpt2():
  torch = pytest.importorskip("torch")
  config = transformers.GPT2Config(n_layer=3, n_embd=48, n_head=4,
                                   vocab_size=300, n_positions=40)
  torch.manual_seed(0)
  reference = transformers.GPT2LMHeadModel(config)
  # The LM head is tied to wte: counted once.
  parameters = sum(p.numel() for p in reference.parameters())
  result = memory_plan.plan(
      config, sequence_length=40, micro_batch=1, optimizer="adam",
      precision="fp32", recompute=False, batch_split=1, num_stages=1)
  assert result.stages[0].weights == 4 * parameters
  assert result.stages[0].gradients == 4 * parameters
  assert result.stages[0].optimizer == 8 * parameters
  assert result.stages[0].accumulator == 0


def test_adafactor_state_is_what_keras_allocates():
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4,
                                   vocab_size=100, n_positions=16)
  variables = [tf.Variable(tf.zeros(shape)) for shape
               in gpt2_weights.weight_shapes(config).values()]
  optimizer = tf_utils.make_optimizer("adafactor", 1e-3)
  optimizer.build(variables)
  # Keras' own lists: the int32 placeholders of vectors' r and c are plain
  # tf.Variables, not in optimizer.variables.
  slots = optimizer._r + optimizer._c + optimizer._v  # pylint: disable=protected-access
  allocated = sum(int(np.prod(v.shape)) * v.dtype.size for v in slots)
  result = memory_plan.plan(
      config, sequence_length=16, micro_batch=1, optimizer="adafactor",
      precision="fp32", recompute=False, batch_split=1, num_stages=1)
  assert result.stages[0].optimizer == allocated


@pytest.mark.parametrize("precision,recompute,activation,dropout", [
    ("fp32", False, "gelu_new", 0.1), ("bf16", False, "gelu_new", 0.1),
    ("fp32", True, "gelu_new", 0.1), ("bf16", True, "gelu_new", 0.1),
    ("fp32", False, "gelu", 0.1), ("fp32", False, "relu", 0.1),
    ("fp32", False, "gelu_new", 0.0), ("bf16", False, "gelu_new", 0.0)])
def test_activations_are_the_tensors_the_graph_keeps(precision, recompute,
                                                     activation, dropout):
  config = transformers.GPT2Config(
      n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=32,
      activation_function=activation, attn_pdrop=dropout,
      resid_pdrop=dropout, embd_pdrop=dropout)
  batch_size, length, window = 2, 32, 8
  model = modeling_tf_gpt2_model_par.GPT2LMHeadModel.from_config(
      config, dtype="bfloat16" if precision == "bf16" else None,
      recompute=recompute)
  label_mask = np.zeros([batch_size, length], np.int32)
  label_mask[:, length - window + 1:] = 1
  batch = {"input_ids": tf.zeros([batch_size, length], tf.int32),
           "attention_mask": tf.ones([batch_size, length], tf.int32),
           "label_mask": tf.constant(label_mask),
           "dropout_seed": tf.zeros([batch_size, 2], tf.int32)}
  kept = _kept_for_backward(model, batch, window)
  planned = memory_plan.plan(
      config, sequence_length=length, micro_batch=batch_size,
      optimizer="adam", precision=precision, recompute=recompute,
      batch_split=1, num_stages=1, answer_window=window).stages[0]
  # The rerun block's activations live in the backward pass only.
  rerun = 0
  if recompute:
    rerun = memory_plan.rerun_block_bytes(
        config, batch_size, length, 2 if precision == "bf16" else 4)
  assert abs((planned.activations - rerun) / kept - 1) < 0.02


def _kept_for_backward(model, batch, window):
  """Bytes of the forward tensors the backward pass of the loss reads.

  In the tf.function's graph, the backward ops are those that depend (by
  data or control edges) on the gradient's seed (`ones`, after the loss); a
  tensor they read that does not
  (a forward tensor, or a gradient op's input computed from forward tensors
  alone, which the executor runs in the forward pass) is held from its
  creation to the backward pass. Shapes, constants, variables' values and
  the batch are not activations.
  """
  variables = model.trainable_variables
  loss_names = []

  @tf.function(autograph=False)
  def gradients(batch):
    with tf.GradientTape() as tape:
      loss, _ = task_specific.answer_loss_sum(model, batch, window,
                                              training=True)
    loss_names.append(loss.op.name)
    return tape.gradient(loss, variables)

  operations = gradients.get_concrete_function(batch).graph.get_operations()
  start = [op.name for op in operations].index(loss_names[0]) + 1
  seed = next(op.name for op in operations[start:]
              if op.name.startswith("ones"))
  backward = {seed}
  for op in operations[start:]:  # creation order is topological
    if (any(t.op.name in backward for t in op.inputs) or
        any(c.name in backward for c in op.control_inputs)):
      backward.add(op.name)
  not_activations = ("Const", "ReadVariableOp", "Placeholder", "VarHandleOp")
  kept = {}
  for op in operations:
    if op.name not in backward or op.type in ("Shape", "Size", "Rank"):
      continue
    for tensor in map(_buffer_of, op.inputs):
      if (tensor.op.name not in backward and
          tensor.op.type not in not_activations):
        kept[tensor.name] = (int(np.prod(tensor.shape.as_list())) *
                             tensor.dtype.size)
  return sum(kept.values())


def _buffer_of(tensor):
  """The tensor whose buffer `tensor` shares (reshapes and identities alias
  their input)."""
  while tensor.op.type in ("Reshape", "Identity", "IdentityN"):
    tensor = tensor.op.inputs[
        tensor.value_index if tensor.op.type == "IdentityN" else 0]
  return tensor


def test_stages_split_the_whole_as_the_model_places_blocks():
  config = memory_plan.resolve_config("gpt2-xl")
  settings = dict(sequence_length=1024, micro_batch=1, optimizer="adafactor",
                  precision="bf16", recompute=True, batch_split=8)
  whole = memory_plan.plan(config, num_stages=1, **settings)
  for stages in (2, 3, 8, 48):
    split = memory_plan.plan(config, num_stages=stages, **settings)
    assert len(split.stages) == stages
    for component in memory_plan.COMPONENTS[:4]:
      assert (getattr(split.replica, component) ==
              getattr(whole.replica, component)), component
    # Beyond the whole: each stage reruns one of its blocks (under bf16 the
    # head's copy of the tied embedding is there on one stage too).
    assert (split.replica.activations - whole.replica.activations ==
            (stages - 1) * memory_plan.rerun_block_bytes(config, 1, 1024, 2))
    owners = [i * stages // config.n_layer for i in range(config.n_layer)]
    assert [last - first + 1 for first, last in split.layers] == [
        owners.count(s) for s in range(stages)]
  one = memory_plan.plan(config, num_stages=1, **settings).per_device
  two = memory_plan.plan(config, num_stages=2, **settings).per_device
  assert two.total < one.total


def test_known_shapes_are_the_openai_sizes():
  parameters = {key: sum(int(np.prod(s)) for s in gpt2_weights.weight_shapes(
      memory_plan.resolve_config(key)).values())
                for key in memory_plan.KNOWN_SHAPES}
  # transformers' reported sizes: 124M, 355M, 774M, 1558M.
  assert [round(parameters[k] / 1e6) for k in
          ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")] == [
              124, 355, 774, 1558]


def test_accumulator_only_with_batch_split():
  settings = dict(sequence_length=128, micro_batch=1, optimizer="adam",
                  precision="fp32", recompute=False, num_stages=1)
  config = memory_plan.resolve_config("gpt2")
  one = memory_plan.plan(config, batch_split=1, **settings).stages[0]
  eight = memory_plan.plan(config, batch_split=8, **settings).stages[0]
  assert one.accumulator == 0 and eight.accumulator == eight.gradients


def test_config_from_a_directory_and_a_json_path(tmp_path):
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4)
  utils.atomic_write_json(str(tmp_path / "config.json"), config.to_dict())
  assert memory_plan.resolve_config(str(tmp_path)).n_layer == 2
  assert memory_plan.resolve_config(str(tmp_path / "config.json")).n_embd == 32


@pytest.mark.parametrize("change,message", [
    (dict(num_stages=13), "num_stages: 13 stages for a model of n_layer=12"),
    (dict(num_stages=0), "num_stages: 0 stages for a model of n_layer=12"),
    (dict(optimizer="sgd"), "optimizer='sgd': expected one of"),
    (dict(precision="fp16"), "precision='fp16': expected one of"),
    (dict(micro_batch=0), "micro_batch=0: expected an integer >= 1"),
    (dict(sequence_length=-1), "sequence_length=-1: expected an integer"),
    (dict(batch_split=0), "batch_split=0: expected an integer >= 1"),
    (dict(sequence_length=2048), "sequence_length=2048: longer than"),
    (dict(answer_window=1024), "answer_window=1024: expected between 1"),
])
def test_bad_inputs_are_one_line(change, message):
  settings = dict(sequence_length=1024, micro_batch=1, optimizer="adam",
                  precision="fp32", recompute=False, batch_split=1,
                  num_stages=1)
  settings.update(change)
  with pytest.raises(utils.UserError) as error:
    memory_plan.plan(memory_plan.resolve_config("gpt2"), **settings)
  assert message in str(error.value) and "\n" not in str(error.value)


def _script(*arguments):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, "util_scripts", "memory_plan.py"),
       *arguments], capture_output=True, text=True, check=False, timeout=120,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


@pytest.mark.slow
def test_script_prints_the_table_and_the_stages_to_fit():
  result = _script("--config=gpt2-xl", "--seq=1024", "--micro_batch=1",
                   "--optimizer=adafactor", "--precision=bf16",
                   "--recompute", "--batch_split=8", "--stages=2",
                   "--answer_window=351", "--device_gb=16")
  assert result.returncode == 0, result.stderr
  assert "| stage | blocks | weights |" in result.stdout
  assert "| replica | all |" in result.stdout
  assert "TPU v3 core (16 GiB):" in result.stdout
  assert "TPU v4 core (32 GiB):" in result.stdout


@pytest.mark.parametrize("change,message", [
    (dict(config=None), "--config is required"),
    (dict(config="gpt9"), "--config=gpt9: expected one of gpt2"),
    (dict(stages=13), "num_stages: 13 stages for a model of n_layer=12"),
    (dict(optimizer="sgd"), "optimizer='sgd': expected one of"),
    (dict(micro_batch=0), "micro_batch=0"),
    (dict(device_gb=-1.0), "--device_gb=-1.0"),
    (dict(answer_window=-1), "--answer_window=-1"),
])
def test_report_bad_inputs_are_one_line(change, message):
  config = dataclasses.replace(memory_plan.PlanConfig(config="gpt2"),
                               **change)
  with pytest.raises(utils.UserError) as error:
    memory_plan.report(config)
  assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_script_bad_input_is_one_line_and_exit_2():
  result = _script("--config=gpt2", "--stages=13")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "13 stages" in lines[0], result.stderr


if __name__ == "__main__":
  measured_settings = dict(MEASURED[sys.argv[1]])
  measured_settings.update(json.loads(sys.argv[2]) if len(sys.argv) > 2
                           else {})
  print(json.dumps(measure(measured_settings)))
