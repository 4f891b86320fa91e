"""Model parallelism (issue 14, acceptance 4, 5, 7): the block -> stage plan,
the TPU path's CPU-testable parts (device assignment, XLA with the logical
device annotations), replicas x stages under MirroredStrategy, bad inputs."""

import re

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.compiler.xla.experimental import xla_sharding

from conftest import LOGICAL_CPUS
import gpt2_fixtures
import memory_plan
import modeling_tf_gpt2_model_par as gpt2
import placement
import tf_utils
import utils

# XLA, and two replicas' all-reduce, sum in other orders than one device.
TOLERANCE = 1e-5


# -- the one block -> stage plan ----------------------------------------------


def test_stages_are_contiguous_near_equal_runs():
  assert placement.stage_of_blocks(4, 2) == (0, 0, 1, 1)
  assert placement.stage_of_blocks(5, 2) == (0, 0, 0, 1, 1)
  assert placement.stage_of_blocks(4, 4) == (0, 1, 2, 3)
  assert placement.stage_layers(48, 2) == ((0, 23), (24, 47))
  assert placement.stage_layers(5, 3) == ((0, 1), (2, 3), (4, 4))


def test_model_and_memory_plan_split_the_layers_by_the_plan():
  """Three stages over four layers: the model's variables and the memory
  plan's layers both follow `placement.stage_of_blocks` (0, 0, 1, 2)."""
  config = gpt2_fixtures.config()
  model = gpt2.GPT2LMHeadModel.from_config(config, devices=LOGICAL_CPUS[:3])
  stages = placement.stage_of_blocks(config.n_layer, 3)
  for name, variable in model.named_weights().items():
    if name.startswith("transformer.h."):
      expected = LOGICAL_CPUS[stages[int(name.split(".")[2])]]
    elif name.startswith("transformer.ln_f."):
      expected = LOGICAL_CPUS[2]
    else:
      expected = LOGICAL_CPUS[0]
    assert variable.device.endswith(expected), name
  planned = memory_plan.plan(
      config, sequence_length=16, micro_batch=1, optimizer="adam",
      precision="fp32", recompute=False, batch_split=1, num_stages=3)
  assert planned.layers == placement.stage_layers(config.n_layer, 3)


# -- TPU: the device assignment -------------------------------------------------


def _topology(mesh_shape):
  """A one-host tf.tpu.experimental.Topology (no TPU needed): every core of
  an [x, y, z, cores per chip] mesh."""
  x, y, z, cores = mesh_shape
  coordinates = [[i, j, k, c] for k in range(z) for j in range(y)
                 for i in range(x) for c in range(cores)]
  return tf.tpu.experimental.Topology(
      mesh_shape=mesh_shape,
      device_coordinates=np.array([coordinates], np.int32))


@pytest.mark.parametrize("mesh_shape,cores_per_replica,replicas", [
    ([2, 2, 1, 2], 1, 8), ([2, 2, 1, 2], 2, 4), ([2, 2, 1, 2], 4, 2),
    ([2, 2, 1, 2], 8, 1), ([2, 2, 1, 1], 2, 2)])
def test_device_assignment_has_cores_per_replica_and_uses_every_core(
    mesh_shape, cores_per_replica, replicas):
  """v3-8 (4 chips x 2 cores) and v4-8 (4 chips, one core each as TF sees
  it): replicas x cores per replica cover each core once, and on v3 the two
  cores of a 2-core replica are one chip's."""
  assignment = tf_utils.tpu_device_assignment(_topology(mesh_shape),
                                              cores_per_replica)
  assert assignment.num_replicas == replicas
  assert assignment.num_cores_per_replica == cores_per_replica
  cores = [tuple(assignment.coordinates(replica, core))
           for replica in range(replicas)
           for core in range(cores_per_replica)]
  assert len(set(cores)) == np.prod(mesh_shape)
  if mesh_shape[3] == 2 and cores_per_replica == 2:
    for replica in range(replicas):
      chips = {tuple(assignment.coordinates(replica, core))[:3]
               for core in range(2)}
      assert len(chips) == 1, replica


# -- TPU: XLA with the logical-device annotations -------------------------------


def _assign(tensor, stage):
  """What TPUStrategy.experimental_assign_to_logical_device adds (its source:
  `xla_sharding.assign_device(tensor, id, use_sharding_op=True)`)."""
  return xla_sharding.assign_device(tensor, stage, use_sharding_op=True)


def _lm_loss(model, training=False):
  """micro_batch -> (sum of next-token cross-entropies, token count)."""

  def loss_fn(batch):
    logits = model(batch["ids"], attention_mask=batch["mask"],
                   training=training, dropout_seed=tf.constant([3, 4]))
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        batch["ids"][:, 1:], logits[:, :-1])
    mask = tf.cast(batch["mask"][:, 1:], tf.float32)
    return tf.reduce_sum(losses * mask), tf.reduce_sum(mask)

  return loss_fn


def _model(devices=None, recompute=False):
  """A 2-layer GPT-2 (one block per stage of two), the same weights each
  time."""
  return gpt2.GPT2LMHeadModel.from_config(
      gpt2_fixtures.config(n_layer=2), devices=devices, seed=3,
      recompute=recompute)


def _batch(rows=4):
  ids, mask = gpt2_fixtures.batch()
  ids = tf.tile(ids, [2, 1])[:rows]
  mask = tf.tile(mask, [2, 1])[:rows]
  return {"ids": ids, "mask": mask}


def _train(strategy, build_model, steps, batch, **step_options):
  """Weights of `build_model()` (made under `strategy`) after `steps` Adam
  steps on `batch` (the global batch, distributed by `strategy`), the last
  loss, the model and its optimizer."""
  with strategy.scope():
    model = build_model()
    optimizer = tf_utils.make_optimizer("adam", 1e-3)
    optimizer.build(model.trainable_variables)
  step = tf_utils.make_train_step(strategy, _lm_loss(model),
                                  model.trainable_variables, optimizer,
                                  **step_options)
  rows = int(batch["ids"].shape[0])
  distributed = next(iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensor_slices(batch).batch(rows))))
  for _ in range(steps):
    loss = float(step(distributed)["loss"])
  return ({name: v.numpy() for name, v in model.named_weights().items()},
          loss, model, optimizer)


@pytest.fixture(scope="module")
def one_device_weights():
  """8 steps of the unsplit model on one device, without XLA."""
  initial = {name: v.numpy() for name, v in _model().named_weights().items()}
  trained, loss, _, _ = _train(tf_utils.make_strategy("OneDeviceStrategy"),
                            _model, 8, _batch())
  # The steps did something: otherwise equality would prove nothing.
  assert max(np.abs(trained[n] - initial[n]).max() for n in initial) > 1e-3
  return trained, loss


def _sharding_annotations(hlo):
  """{(logical device, in the backward pass): count} of the HLO's sharding
  annotations."""
  found = {}
  for line in hlo.splitlines():
    match = re.search(r'custom_call_target="Sharding", '
                      r"sharding=\{maximal device=(\d+)\}", line)
    if match:
      key = (int(match.group(1)), "gradient" in line)
      found[key] = found.get(key, 0) + 1
  return found


def test_logical_device_placement_compiles_with_xla_and_annotates_each_stage():
  """The TPU path's replica computation (2 stages, recomputation as the
  shipped config) compiled by XLA on the CPU: every block's input and output,
  forward and backward, carries its stage's logical device."""
  model = _model(devices=placement.LogicalDevicePlacement(2, assign=_assign),
                 recompute=True)
  batch = _batch()
  loss_fn = _lm_loss(model, training=True)

  @tf.function(jit_compile=True)
  def gradients(batch):
    with tf.GradientTape() as tape:
      loss_sum, _ = loss_fn(batch)
    return tape.gradient(loss_sum, model.trainable_variables)

  annotations = _sharding_annotations(
      gradients.experimental_get_compiler_ir(batch)(stage="hlo"))
  assert {device for device, _ in annotations} == {0, 1}
  for device in (0, 1):
    assert annotations.get((device, False), 0) >= 2, annotations
    assert annotations.get((device, True), 0) >= 2, annotations


@pytest.mark.slow
def test_logical_device_placement_trains_like_one_device_under_xla(
    one_device_weights):
  """8 XLA-compiled train steps (tf_utils.make_train_step, jit_compile) of the
  annotated 2-stage model give the weights of the plain model."""
  got, loss, _, _ = _train(
      tf_utils.make_strategy("OneDeviceStrategy"),
      lambda: _model(
          devices=placement.LogicalDevicePlacement(2, assign=_assign)),
      8, _batch(), jit_compile=True)
  want, want_loss = one_device_weights
  assert loss == pytest.approx(want_loss, abs=TOLERANCE)
  for name, weight in want.items():
    np.testing.assert_allclose(got[name], weight, atol=TOLERANCE,
                               err_msg=name)


# -- GPUs/CPUs: replicas x stages under MirroredStrategy ------------------------


@pytest.mark.slow
def test_two_replicas_of_two_stages_train_like_one_device(one_device_weights):
  """4 logical CPUs as 2 replicas x 2 stages (--devices_per_replica=2:
  MirroredStrategy over CPU:0 and CPU:2): after 8 steps, the weights of one device on the global batch; each
  stage's variables and Adam slots have their copies on the stage's
  devices (CPU:0 and CPU:2, CPU:1 and CPU:3)."""
  config = tf_utils.StrategyConfig(distribute_mode="MirroredStrategy",
                                   devices=LOGICAL_CPUS, devices_per_replica=2)
  strategy = tf_utils.strategy_from_config(config, splits_model=True)
  split = placement.for_strategy(config, strategy)
  assert strategy.num_replicas_in_sync == 2 and split.num_stages == 2
  assert placement.for_strategy(tf_utils.StrategyConfig(), strategy) is None
  got, loss, model, optimizer = _train(
      strategy, lambda: _model(devices=split), 8, _batch())
  want, want_loss = one_device_weights
  assert loss == pytest.approx(want_loss, abs=TOLERANCE)
  for name, weight in want.items():
    np.testing.assert_allclose(got[name], weight, atol=TOLERANCE,
                               err_msg=name)
  assert split.stage_devices(1) == tuple(
      tf_utils.check_devices(LOGICAL_CPUS[1::2]))

  def copies(variable):
    return tuple(tf_utils.check_devices([c.device for c in variable.values]))

  for name, variable in model.named_weights().items():
    stage = (int(name.split(".")[2]) if name.startswith("transformer.h.")
             else 1 if name.startswith("transformer.ln_f.") else 0)
    assert copies(variable) == split.stage_devices(stage), name
    slots = [v for v in optimizer.variables if v.name.endswith(f"/{name}:0")]
    assert len(slots) == 2, name  # Adam's m and v
    for slot in slots:
      assert copies(slot) == split.stage_devices(stage), slot.name


# -- bad inputs: one line each ---------------------------------------------------


def _one_line_error(fn, *fragments):
  with pytest.raises(utils.UserError) as error:
    fn()
  message = str(error.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


def test_stages_that_do_not_divide_the_devices_are_refused():
  _one_line_error(
      lambda: tf_utils.make_strategy("MirroredStrategy", devices=LOGICAL_CPUS,
                                     devices_per_replica=3),
      "--devices_per_replica=3: does not divide the 4 devices")
  _one_line_error(
      lambda: tf_utils.tpu_device_assignment(_topology([2, 2, 1, 2]), 3),
      "--cores_per_replica=3: does not divide the TPU's 8 cores")


def test_more_stages_than_layers_are_refused():
  config = gpt2_fixtures.config()  # 4 layers
  _one_line_error(
      lambda: gpt2.GPT2LMHeadModel.from_config(
          config, devices=placement.LogicalDevicePlacement(5, assign=_assign)),
      "--cores_per_replica: 5 stages for a model of n_layer=4 layers")
  _one_line_error(
      lambda: gpt2.GPT2LMHeadModel.from_config(
          config, devices=LOGICAL_CPUS + LOGICAL_CPUS[:1]),
      "--model_devices: 5 stages for a model of n_layer=4 layers")


@pytest.mark.parametrize("mode,flags,fragment", [
    ("MirroredStrategy", dict(cores_per_replica=2),
     "--cores_per_replica=2: only --distribute_mode=TPUStrategy"),
    ("OneDeviceStrategy", dict(cores_per_replica=2),
     "--cores_per_replica=2: only --distribute_mode=TPUStrategy"),
    ("MultiWorkerMirroredStrategy", dict(cores_per_replica=4),
     "--cores_per_replica=4: only --distribute_mode=TPUStrategy"),
    ("OneDeviceStrategy", dict(devices_per_replica=2),
     "--devices_per_replica=2: only --distribute_mode=MirroredStrategy"),
    ("TPUStrategy", dict(cores_per_replica=0),
     "--cores_per_replica=0: expected an integer >= 1"),
])
def test_a_split_the_strategy_cannot_make_is_refused(mode, flags, fragment):
  """Through `strategy_from_config`, as every entry script builds it, before
  any device or TPU is looked for."""
  config = tf_utils.StrategyConfig(distribute_mode=mode, **flags)
  _one_line_error(
      lambda: tf_utils.strategy_from_config(config, splits_model=True),
      fragment)


def test_a_job_that_does_not_split_its_model_refuses_the_split_flags():
  config = tf_utils.StrategyConfig(distribute_mode="MirroredStrategy",
                                   devices_per_replica=2)
  _one_line_error(lambda: tf_utils.strategy_from_config(config),
                  "--devices_per_replica=2: this job does not split a model")
