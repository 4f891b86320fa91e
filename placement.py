"""Where GPT-2's blocks run: the one block -> stage plan, and the placements that carry it out.

A model split over `num_stages` stages (vertical model parallelism) puts
consecutive blocks on consecutive stages, in near-equal runs
(`stage_of_blocks`); the embeddings go with the first block, the final
LayerNorm and the tied head with the last. The memory plan
(`memory_plan.plan`) splits the layers by the same function.

A placement says what a stage is on a given engine. The model asks it two
things (`modeling_tf_gpt2_model_par`): `scope(stage)`, the context its
variables are created in and the stage's forward and backward ops run in, and
`boundary(tensor, stage)`, applied to a block's input and output (an
identity, but on TPU).

- `DevicePlacement`: one replica; stage s on the device devices[s] (GPUs or
  logical CPUs, `--model_devices`).
- `ReplicaGroupPlacement`: several replicas of a split model under
  `MirroredStrategy` over the first device of each group of consecutive
  devices (`--devices_per_replica`); stage s of replica r runs on
  groups[r][s], and each stage's mirrored variables have their copies on the
  stage's devices, so the strategy's own all-reduce and update apply.
- `LogicalDevicePlacement`: `TPUStrategy` with `--cores_per_replica` logical
  cores per replica (`tf_utils.tpu_device_assignment`); stage s is logical
  core s: its variables are made under
  `strategy.extended.experimental_logical_device(s)` and each block's input
  and output are annotated with `strategy.experimental_assign_to_logical_device`.
  Written against the documented API; it has not run on a TPU (see README).
"""

import contextlib

import tensorflow as tf

import tf_utils
import utils


def check_num_stages(num_stages, n_layer, where):
  """A UserError (naming `where`) unless 1 <= num_stages <= n_layer."""
  if not 1 <= num_stages <= n_layer:
    raise utils.UserError(
        f"{where}: {num_stages} stages for a model of n_layer={n_layer} "
        f"layers, expected between 1 and {n_layer} stages (a stage holds at "
        "least one block)")


def stage_of_blocks(n_layer, num_stages, where="num_stages"):
  """The stage of each block: contiguous, near-equal runs (block i on stage
  i * num_stages // n_layer); a UserError naming `where` for more stages than
  blocks."""
  check_num_stages(num_stages, n_layer, where)
  return tuple(i * num_stages // n_layer for i in range(n_layer))


def stage_layers(n_layer, num_stages):
  """(first, last) block of each stage, as `stage_of_blocks` assigns them."""
  owners = stage_of_blocks(n_layer, num_stages)
  return tuple((owners.index(stage), n_layer - 1 - owners[::-1].index(stage))
               for stage in range(num_stages))


class DevicePlacement:
  """One replica, stage s on devices[s] (variables, forward and backward)."""

  flag = "--model_devices"

  def __init__(self, devices):
    self.devices = tuple(tf_utils.check_devices(devices))
    self.num_stages = len(self.devices)

  def scope(self, stage):
    return tf.device(self.devices[stage])

  def boundary(self, tensor, stage):
    del stage  # The device scope places the stage's ops.
    return tensor


class _StageCopies:
  """What MirroredStrategy's variable creator reads from a `colocate_with`
  variable: the devices of its copies, one per replica (`_devices`, read by
  TF 2.20's `MirroredExtended._create_variable`, as for the variables Keras
  colocates its slots with)."""

  def __init__(self, devices):
    self._devices = devices


class ReplicaGroupPlacement:
  """Replicas x stages under a MirroredStrategy over groups[r][0].

  A variable made in `scope(stage)` (under the strategy's scope) is a
  MirroredVariable whose copy for replica r lives on groups[r][stage]: the
  strategy's creator places the copies on the devices of the variable it is
  to be colocated with, which this placement names. Optimizer slots follow
  their variable (Keras colocates them), and the strategy's update runs on
  each copy's device. In a replica's computation, `scope(stage)` is that
  replica's device of the stage.
  """

  devices = None  # Several devices per stage.
  flag = "--devices_per_replica"

  def __init__(self, strategy, groups):
    self.groups = tuple(tuple(tf_utils.check_devices(g)) for g in groups)
    self.num_stages = len(self.groups[0])
    replica_devices = tuple(tf_utils.check_devices(
        strategy.extended.worker_devices))
    if replica_devices != tuple(group[0] for group in self.groups):
      raise utils.UserError(
          f"replica groups: the strategy's replicas run on "
          f"{', '.join(replica_devices)}, expected the first device of each "
          f"group ({', '.join(g[0] for g in self.groups)})")

  def stage_devices(self, stage):
    """The devices of the stage's copies, one per replica."""
    return tuple(group[stage] for group in self.groups)

  def scope(self, stage):
    if tf.distribute.in_cross_replica_context():
      return self._variable_scope(stage)
    replica = tf.get_static_value(
        tf.distribute.get_replica_context().replica_id_in_sync_group)
    return tf.device(self.groups[replica][stage])

  @contextlib.contextmanager
  def _variable_scope(self, stage):
    copies = _StageCopies(self.stage_devices(stage))

    def creator(next_creator, **kwargs):
      kwargs["colocate_with"] = copies
      return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
      yield

  def boundary(self, tensor, stage):
    del stage
    return tensor


class LogicalDevicePlacement:
  """Stage s on logical device s of each replica (TPUStrategy with a device
  assignment of `num_stages` cores per replica).

  `scope(stage)` is `strategy.extended.experimental_logical_device(stage)`:
  outside the replica computation it makes the stage's variables on logical
  device `stage` of every replica; inside, it places the stage's ops there.
  `boundary` annotates a block's input and output with `assign(tensor,
  stage)`, the strategy's `experimental_assign_to_logical_device` (an XLA
  sharding annotation, whose gradient carries the same annotation).

  `assign` and `scope` can be given instead of a strategy (tests on CPU, where
  no TPUStrategy can be built: `xla_sharding.assign_device` is the op the
  strategy's method adds).
  """

  devices = None  # Logical devices, not device names.
  flag = "--cores_per_replica"

  def __init__(self, num_stages, *, strategy=None, assign=None, scope=None):
    self.num_stages = num_stages
    if strategy is not None:
      assign = strategy.experimental_assign_to_logical_device
      scope = strategy.extended.experimental_logical_device
    self._assign = assign
    self._scope = scope or (lambda stage: contextlib.nullcontext())

  def scope(self, stage):
    return self._scope(stage)

  def boundary(self, tensor, stage):
    return self._assign(tensor, stage)


def make(devices):
  """The placement of the model's `devices` argument: None (no placement),
  device names (a `DevicePlacement`) or a placement."""
  if devices is None or hasattr(devices, "boundary"):
    return devices
  return DevicePlacement(list(devices))


def for_strategy(strategy_config, strategy):
  """The placement `StrategyConfig` asks for under `strategy` (built by
  `tf_utils.strategy_from_config(strategy_config)`), or None: no split."""
  if strategy_config.cores_per_replica > 1:
    return LogicalDevicePlacement(strategy_config.cores_per_replica,
                                  strategy=strategy)
  if strategy_config.devices_per_replica > 1:
    return ReplicaGroupPlacement(
        strategy, tf_utils.strategy_replica_groups(strategy_config))
  return None
