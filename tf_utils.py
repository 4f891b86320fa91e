"""Devices and strategies, optimizers and schedules, the train step, checkpoints, TFRecords.

Knows about tf.distribute and Keras optimizers; knows nothing about ELI5.
Every job builds its strategy the same way: `strategy_from_config` of a
`StrategyConfig` (the flags `--distribute_mode`, `--devices`, `--tpu`,
`--num_cpu_devices`, `--cluster_timeout_seconds`, `--cores_per_replica` and
`--devices_per_replica` of every entry script). The last two give each
replica several devices, for a model split over them (`placement.py`).
"""

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import sys
import typing

from absl import logging
import tensorflow as tf
import tf_keras

import settings
import utils

DISTRIBUTE_MODES = ("OneDeviceStrategy", "MirroredStrategy",
                    "MultiWorkerMirroredStrategy", "TPUStrategy")


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
  """Which tf.distribute strategy a job runs under (every entry script's)."""
  distribute_mode: str = settings.setting(
      "OneDeviceStrategy",
      f"tf.distribute strategy: one of {', '.join(DISTRIBUTE_MODES)}.")
  devices: typing.Optional[list] = settings.setting(
      None,
      "Devices to use, e.g. /gpu:0,/gpu:1 (OneDeviceStrategy: the first; "
      "MirroredStrategy: all). Default: all local GPUs, else the CPU(s).")
  tpu: typing.Optional[str] = settings.setting(
      None,
      "TPUStrategy: the TPU's name or grpc:// address, or 'local' on a TPU "
      "VM.")
  num_cpu_devices: int = settings.setting(
      1,
      "Split the host CPU into this many logical devices (several replicas, "
      "or a model split over devices, on a machine without accelerators).")
  cluster_timeout_seconds: float = settings.setting(
      300.0,
      "MultiWorkerMirroredStrategy: stop, with a one-line error naming the "
      "workers that do not answer, when the workers of TF_CONFIG have not "
      "all joined within this many seconds.")
  cores_per_replica: int = settings.setting(
      1,
      "TPUStrategy: TPU cores per replica; > 1 splits the model's blocks "
      "over them (model parallelism: consecutive blocks on consecutive "
      "logical cores), with the TPU's cores / this many replicas.")
  devices_per_replica: int = settings.setting(
      1,
      "MirroredStrategy: devices per replica; > 1 splits each replica's "
      "model over that many consecutive devices of --devices (e.g. 4 GPUs "
      "and 2: 2 replicas x 2 stages).")


# ---------------------------------------------------------------------------
# Devices and strategies
# ---------------------------------------------------------------------------


def split_host_cpu(num_devices):
  """Splits the host CPU into `num_devices` logical devices.

  Must run before TensorFlow initialises its devices (before the first op).
  Used by the tests, and by CPU runs that want several replicas or a model
  split over several devices.
  """
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)
  return [device.name for device in tf.config.list_logical_devices("CPU")]


def _canonical_device(name):
  spec = tf.DeviceSpec.from_string(name)
  return f"/device:{(spec.device_type or 'CPU').upper()}:{spec.device_index or 0}"


def check_devices(devices):
  """Canonical names of `devices`; a UserError naming any that is not here."""
  local = {_canonical_device(d.name): d.name
           for d in tf.config.list_logical_devices()}
  canonical = []
  for device in devices:
    name = _canonical_device(device)
    if name not in local:
      raise utils.UserError(
          f"device {device!r} not found; this host has: "
          f"{', '.join(sorted(local)) or 'no devices'}")
    canonical.append(name)
  return canonical


def _default_devices():
  gpus = tf.config.list_logical_devices("GPU")
  return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def _tpu_strategy(tpu, cores_per_replica):
  found = ", ".join(d.name for d in tf.config.list_logical_devices())
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    if tpu not in (None, "", "local"):
      tf.config.experimental_connect_to_cluster(resolver)
    topology = tf.tpu.experimental.initialize_tpu_system(resolver)
  except Exception as error:  # pylint: disable=broad-except
    # The resolver fails in many ways (no name, DNS, no TPU ops); all mean the
    # same to the user: there is no TPU to run on.
    reason = utils.error_reason(error, limit=160)
    raise utils.UserError(
        f"--distribute_mode=TPUStrategy: no TPU reachable with --tpu={tpu!r} "
        f"({reason}); devices found: {found}") from None
  if cores_per_replica == 1:
    return tf.distribute.TPUStrategy(resolver)
  return tf.distribute.TPUStrategy(
      resolver, experimental_device_assignment=tpu_device_assignment(
          topology, cores_per_replica))


def tpu_computation_shape(mesh_shape, cores_per_replica):
  """The [x, y, z, core] block of the TPU mesh one replica takes: a chip's
  cores first, then chips along x, y, z, so that a replica's cores are
  neighbours. `cores_per_replica` divides the mesh's cores: each prime
  factor of it then finds a side with room left."""
  mesh_shape = [int(n) for n in mesh_shape]
  shape = [1] * len(mesh_shape)
  order = [len(mesh_shape) - 1] + list(range(len(mesh_shape) - 1))
  remaining = cores_per_replica
  while remaining > 1:
    factor = next(f for f in range(2, remaining + 1) if remaining % f == 0)
    dimension = next(d for d in order
                     if mesh_shape[d] % (shape[d] * factor) == 0)
    shape[dimension] *= factor
    remaining //= factor
  return shape


def tpu_device_assignment(topology, cores_per_replica):
  """A DeviceAssignment of `topology` (a tf.tpu.experimental.Topology) with
  `cores_per_replica` logical cores per replica and as many replicas as fit."""
  total = topology.num_tasks * topology.num_tpus_per_task
  if cores_per_replica < 1 or total % cores_per_replica:
    raise utils.UserError(
        f"--cores_per_replica={cores_per_replica}: does not divide the TPU's "
        f"{total} cores, expected a divisor of {total}")
  return tf.tpu.experimental.DeviceAssignment.build(
      topology,
      computation_shape=tpu_computation_shape(topology.mesh_shape,
                                              cores_per_replica),
      num_replicas=total // cores_per_replica)


def _tf_config_cluster():
  """TF_CONFIG's resolver; a UserError when TF_CONFIG is not valid JSON."""
  try:
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    # TF_CONFIG is parsed here, not when the resolver is made.
    resolver.cluster_spec()
    return resolver
  except ValueError as error:
    raise utils.UserError(
        f"TF_CONFIG: {' '.join(str(error).split())[:200]}, expected JSON "
        '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
        '"worker", "index": i}}') from None


def task_name(distribute_mode):
  """This process's task in TF_CONFIG ('worker-1', 'chief-0'), or None when it
  is the only process of its job (any strategy but a multi-worker one)."""
  if distribute_mode != "MultiWorkerMirroredStrategy":
    return None
  resolver = _tf_config_cluster()
  if not resolver.cluster_spec().as_dict() or resolver.task_type is None:
    return None
  return f"{resolver.task_type}-{resolver.task_id}"


# Run by `_cluster_watchdog` as `python -c`: a separate process, because the
# strategy's constructor waits for the cluster in C++ holding the GIL, so no
# Python thread of the waiting process runs (and it ignores SIGTERM).
_WATCHDOG_SOURCE = """
import os, select, signal, socket, sys
timeout, parent, tasks = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
if select.select([sys.stdin], [], [], timeout)[0]:
  sys.exit(0)
silent = []
for task in tasks:
  name, address = task.split("=", 1)
  host, port = address.rsplit(":", 1)
  try:
    socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
  except OSError:
    silent.append(f"{name} ({address})")
print("error: --distribute_mode=MultiWorkerMirroredStrategy: the cluster of "
      f"TF_CONFIG did not form within --cluster_timeout_seconds={timeout:g}; "
      + ("not answering: " + ", ".join(silent) if silent else
         "every worker answers, but not all of them joined") +
      ", expected every worker of TF_CONFIG started and reachable",
      file=sys.stderr, flush=True)
os.kill(parent, signal.SIGKILL)
"""


@contextlib.contextmanager
def _cluster_watchdog(resolver, timeout_seconds):
  """Kills this process with a one-line error if the block outlasts the timeout."""
  me = (resolver.task_type, resolver.task_id)
  tasks = [f"{job} {index}={address}"
           for job, addresses in resolver.cluster_spec().as_dict().items()
           for index, address in enumerate(addresses) if (job, index) != me]
  watchdog = subprocess.Popen(
      [sys.executable, "-c", _WATCHDOG_SOURCE, str(timeout_seconds),
       str(os.getpid()), *tasks], stdin=subprocess.PIPE)
  try:
    yield
  finally:
    watchdog.stdin.close()
    watchdog.wait()


def _multi_worker_strategy(cluster_timeout_seconds):
  if not cluster_timeout_seconds > 0:
    raise utils.UserError(
        f"--cluster_timeout_seconds={cluster_timeout_seconds}: expected > 0")
  resolver = _tf_config_cluster()
  if not resolver.cluster_spec().as_dict():
    return tf.distribute.MultiWorkerMirroredStrategy()
  with _cluster_watchdog(resolver, cluster_timeout_seconds):
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)


def make_strategy(distribute_mode, *, devices=None, tpu=None,
                  cluster_timeout_seconds=300.0, cores_per_replica=1,
                  devices_per_replica=1):
  """The tf.distribute strategy named by `distribute_mode`.

  Args:
    distribute_mode: one of DISTRIBUTE_MODES.
    devices: optional device names. OneDeviceStrategy uses the first
      (default: the first GPU, else the CPU); MirroredStrategy all of them
      (default: all GPUs, else all logical CPUs).
    tpu: TPUStrategy's TPU name, grpc address, or 'local'.
    cluster_timeout_seconds: MultiWorkerMirroredStrategy: the process ends
      with a one-line error (exit -9) when the workers of TF_CONFIG have not
      all joined within this time.
    cores_per_replica: TPUStrategy: logical cores per replica (a device
      assignment of that many cores per replica, `tpu_device_assignment`).
    devices_per_replica: MirroredStrategy: consecutive devices per replica;
      the strategy's replicas run on the first device of each group
      (`replica_groups`), the model places its stages on the others.
  """
  if distribute_mode not in DISTRIBUTE_MODES:
    raise utils.UserError(
        f"--distribute_mode={distribute_mode!r} is not one of "
        f"{', '.join(DISTRIBUTE_MODES)}")
  _check_devices_per_replica(distribute_mode, cores_per_replica,
                             devices_per_replica)
  if distribute_mode == "TPUStrategy":
    return _tpu_strategy(tpu, cores_per_replica)
  if distribute_mode == "MultiWorkerMirroredStrategy":
    return _multi_worker_strategy(cluster_timeout_seconds)
  devices = check_devices(devices) if devices else _default_devices()
  if devices_per_replica > 1:
    devices = [group[0] for group in replica_groups(devices,
                                                    devices_per_replica)]
  if distribute_mode == "OneDeviceStrategy":
    return tf.distribute.OneDeviceStrategy(devices[0])
  if all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices):
    # NCCL is GPU-only, and collectives over logical CPUs clash when a process
    # builds more than one strategy (tests do): reduce on one device instead.
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  return tf.distribute.MirroredStrategy(devices)


def strategy_from_config(config, *, splits_model=False):
  """The strategy a `StrategyConfig` asks for (call before any other op:
  splitting the host CPU must come first).

  `splits_model`: the job places its model's stages over a replica's devices
  (`placement.for_strategy`); any other job refuses --cores_per_replica and
  --devices_per_replica rather than leave a replica's other devices idle.
  """
  for flag in ("cores_per_replica", "devices_per_replica"):
    if not splits_model and getattr(config, flag) != 1:
      raise utils.UserError(
          f"--{flag}={getattr(config, flag)}: this job does not split a model "
          "over a replica's devices (only main.py's train and evaluate "
          "tasks do), expected 1")
  if config.num_cpu_devices < 1:
    raise utils.UserError(
        f"--num_cpu_devices={config.num_cpu_devices}: must be >= 1")
  if config.num_cpu_devices > 1:
    split_host_cpu(config.num_cpu_devices)
  return make_strategy(
      config.distribute_mode, devices=config.devices, tpu=config.tpu,
      cluster_timeout_seconds=config.cluster_timeout_seconds,
      cores_per_replica=config.cores_per_replica,
      devices_per_replica=config.devices_per_replica)


def _check_devices_per_replica(distribute_mode, cores_per_replica,
                               devices_per_replica):
  """One-line errors for a split of replicas the strategy cannot make."""
  for flag, value, mode in (
      ("--cores_per_replica", cores_per_replica, "TPUStrategy"),
      ("--devices_per_replica", devices_per_replica, "MirroredStrategy")):
    if not isinstance(value, int) or value < 1:
      raise utils.UserError(f"{flag}={value!r}: expected an integer >= 1")
    if value > 1 and distribute_mode != mode:
      raise utils.UserError(
          f"{flag}={value}: only --distribute_mode={mode} splits a replica "
          f"over several devices this way, not {distribute_mode}"
          + ("; on GPUs/CPUs use --devices_per_replica with "
             "MirroredStrategy, or --model_devices for one replica"
             if mode == "TPUStrategy" else
             "; with one replica use --model_devices"))


def replica_groups(devices, devices_per_replica):
  """`devices` cut into consecutive groups of `devices_per_replica`: one
  group per replica, one device per stage of its model."""
  if len(devices) % devices_per_replica:
    raise utils.UserError(
        f"--devices_per_replica={devices_per_replica}: does not divide the "
        f"{len(devices)} devices ({', '.join(devices)}), expected a divisor "
        f"of {len(devices)} (each replica gets that many consecutive "
        "devices)")
  return tuple(tuple(devices[start:start + devices_per_replica])
               for start in range(0, len(devices), devices_per_replica))


def strategy_replica_groups(config):
  """The device groups of a MirroredStrategy `StrategyConfig` with
  `devices_per_replica` (the devices `strategy_from_config` used)."""
  devices = check_devices(config.devices) if config.devices else (
      _default_devices())
  return replica_groups(devices, config.devices_per_replica)


# ---------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------

SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adam", "adamw", "adafactor")


class WarmupDecaySchedule(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup from 0 to `peak` over `warmup_steps`, then `decay` to 0.

  Called with the number of updates done so far: without warmup the first
  update is at `peak`.

  decay: "constant" keeps `peak`; "linear" and "cosine" reach 0 at
  `total_steps`.
  """

  def __init__(self, peak, warmup_steps, decay, total_steps):
    super().__init__()
    self.peak = peak
    self.warmup_steps = warmup_steps
    self.decay = decay
    self.total_steps = total_steps

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = tf.cast(self.warmup_steps, tf.float32)
    warmup_factor = 1.0 if self.warmup_steps == 0 else tf.minimum(
        1.0, step / warmup)
    if self.decay == "constant":
      return self.peak * warmup_factor
    decay_steps = tf.maximum(float(self.total_steps - self.warmup_steps), 1.0)
    progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
    if self.decay == "linear":
      decay_factor = 1.0 - progress
    else:
      decay_factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
    return self.peak * tf.where(step < warmup, warmup_factor, decay_factor)

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps,
            "decay": self.decay, "total_steps": self.total_steps}


def make_learning_rate_schedule(kind, learning_rate, *, warmup_steps=0,
                                total_steps=None):
  """A learning-rate schedule: linear warmup, then constant/linear/cosine."""
  if kind not in SCHEDULES:
    raise utils.UserError(
        f"learning-rate schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
  if warmup_steps < 0:
    raise utils.UserError(f"warmup steps must be >= 0, got {warmup_steps}")
  if kind != "constant" and (total_steps is None or total_steps <= warmup_steps):
    raise utils.UserError(
        f"the {kind} schedule decays to 0 at the last step: it needs a number "
        f"of steps greater than the warmup ({warmup_steps}), got {total_steps}")
  return WarmupDecaySchedule(learning_rate, warmup_steps, kind, total_steps)


def make_optimizer(name, learning_rate, *, weight_decay=0.0):
  """A maintained Keras optimizer: Adam, AdamW or Adafactor.

  AdamW does not decay LayerNorm weights and biases (names containing `ln_`
  or `bias`), as is usual for GPT-2.
  """
  if name == "adam":
    return tf_keras.optimizers.Adam(learning_rate)
  if name == "adamw":
    optimizer = tf_keras.optimizers.AdamW(learning_rate,
                                          weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["ln_", "bias"])
    return optimizer
  if name == "adafactor":
    return tf_keras.optimizers.Adafactor(learning_rate)
  raise utils.UserError(
      f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def _split_micro_batches(batch, batch_split):
  """[B, ...] tensors -> [batch_split, B / batch_split, ...]."""

  def split(tensor):
    shape = tf.shape(tensor)
    return tf.reshape(tensor, tf.concat(
        [[batch_split, shape[0] // batch_split], shape[1:]], axis=0))

  return tf.nest.map_structure(split, batch)


def make_train_step(strategy, loss_fn, variables, optimizer, *, clip_norm=None,
                    batch_split=1, jit_compile=None):
  """A distributed train step whose update does not depend on the batch split.

  Each replica splits its batch into `batch_split` micro-batches and
  accumulates the gradients of `loss_sum`; sums of gradients, losses and token
  counts are all-reduced over replicas, and the gradient is divided by the
  token count of the GLOBAL batch. So one device, several replicas and
  several micro-batches give the same update for the same global batch.

  With `jit_compile`, XLA compiles each replica's forward and backward passes
  (all its micro-batches, `compile_replica_fn`); the all-reduce and the
  optimizer's update, which reach every replica's copy of a variable, stay
  outside, as cross-device work XLA cannot do on CPUs and GPUs. TPUStrategy
  compiles its whole replica step anyway and inlines the compiled part.

  Args:
    strategy: the tf.distribute strategy that owns `variables`.
    loss_fn: micro_batch -> (loss_sum, num_tokens): the sum of per-token
      losses and how many tokens it sums over.
    variables: the variables to train.
    optimizer: a Keras optimizer (gradients reach it already aggregated).
    clip_norm: clip the global gradient norm to this, if given.
    batch_split: micro-batches per replica; the per-replica batch size must
      be divisible by it.
    jit_compile: compile each replica's gradient computation with XLA. A
      UserError when the variables live on several devices of a replica (a
      model split over devices) but under TPUStrategy: XLA compiles for one
      device, except a TPU computation over a replica's logical cores.

  Returns:
    A tf.function(distributed_batch) -> {"loss": mean loss per token,
    "grad_norm": global gradient norm before clipping, "num_tokens"}.
  """
  variables = list(variables)
  if jit_compile and not isinstance(strategy, tf.distribute.TPUStrategy):
    _check_one_device(variables)
  replica_gradients = compile_replica_fn(
      _make_replica_gradients(loss_fn, variables, batch_split), jit_compile)

  def replica_step(batch):
    gradients, loss_sum, num_tokens = replica_gradients(batch)
    context = tf.distribute.get_replica_context()
    gradients, loss_sum, num_tokens = context.all_reduce(
        tf.distribute.ReduceOp.SUM, (gradients, loss_sum, num_tokens))
    denominator = tf.maximum(num_tokens, 1.0)
    gradients = [g / denominator for g in gradients]
    grad_norm = tf.linalg.global_norm(gradients)
    if clip_norm:
      gradients, _ = tf.clip_by_global_norm(gradients, clip_norm,
                                            use_norm=grad_norm)
    optimizer.apply_gradients(zip(gradients, variables),
                              skip_gradients_aggregation=True)
    return {"loss": loss_sum / denominator, "grad_norm": grad_norm,
            "num_tokens": num_tokens}

  # No autograph: the step has no data-dependent Python control flow, and
  # converting it (and the optimizer) costs seconds of every run's start.
  @tf.function(autograph=False)
  def train_step(distributed_batch):
    per_replica = strategy.run(replica_step, args=(distributed_batch,))
    # Every replica holds the same all-reduced values: take this host's first.
    return tf.nest.map_structure(
        lambda value: strategy.experimental_local_results(value)[0],
        per_replica)

  return train_step


def compile_replica_fn(fn, jit_compile):
  """`fn`, to call in `strategy.run`, compiled with XLA on each replica when
  `jit_compile`; `fn` must not reach other replicas (no all-reduce).

  The compiled function is wrapped in a plain Python one: handed a
  tf.function, MirroredStrategy on CPUs runs it once around all replicas,
  i.e. as one XLA computation on the first device reading the others'
  variables ("Trying to access resource ... located in device CPU:1 from
  device CPU:0").
  """
  if not jit_compile:
    return fn
  compiled = tf.function(fn, jit_compile=True, autograph=False)

  def replica_fn(*args):
    return compiled(*args)

  return replica_fn


def _check_one_device(variables):
  """A UserError when `variables` (a replica's: a distributed variable
  counts by its primary copy) are spread over several devices."""
  devices = sorted({v.device for v in variables})
  if len(devices) > 1:
    raise utils.UserError(
        f"XLA (--experimental_compile): the variables to train live on "
        f"{len(devices)} devices ({', '.join(devices)}), expected one: XLA "
        "compiles a replica's step for a single device (but on a TPU); drop "
        "--experimental_compile, or the model split (--model_devices, "
        "--devices_per_replica)")


def _make_replica_gradients(loss_fn, variables, batch_split):
  """batch -> (summed gradients, loss sum, token count) of one replica's
  batch, over its `batch_split` micro-batches; nothing crosses replicas."""

  def micro_batch_gradients(micro_batch):
    with tf.GradientTape() as tape:
      loss_sum, num_tokens = loss_fn(micro_batch)
    gradients = tape.gradient(loss_sum, variables)
    # Embedding gradients come as IndexedSlices; accumulation needs dense.
    gradients = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                 for g, v in zip(gradients, variables)]
    return gradients, tf.cast(loss_sum, tf.float32), tf.cast(num_tokens,
                                                             tf.float32)

  def replica_gradients(batch):
    if batch_split == 1:
      return micro_batch_gradients(batch)
    micro_batches = _split_micro_batches(batch, batch_split)

    def accumulate(index, gradients, loss_sum, num_tokens):
      micro_batch = tf.nest.map_structure(lambda t: t[index], micro_batches)
      micro_gradients, micro_loss, micro_tokens = micro_batch_gradients(
          micro_batch)
      return (index + 1, [a + g for a, g in zip(gradients, micro_gradients)],
              loss_sum + micro_loss, num_tokens + micro_tokens)

    # A while loop (not a Python loop) so micro-batches run one at a time.
    _, gradients, loss_sum, num_tokens = tf.while_loop(
        lambda index, *_: index < batch_split, accumulate,
        (tf.constant(0), [tf.zeros_like(v) for v in variables],
         tf.constant(0.0), tf.constant(0.0)),
        maximum_iterations=batch_split)
    return gradients, loss_sum, num_tokens

  return replica_gradients


# ---------------------------------------------------------------------------
# Checkpoints and TFRecords
# ---------------------------------------------------------------------------


_CHECKPOINT_INDEX = re.compile(r"ckpt-(\d+)\.index$")
_DATA_SHARD = re.compile(r"\.data-(\d+)-of-(\d+)$")


def _complete_checkpoints(directory):
  """Prefixes of the `ckpt-N` checkpoints in `directory` whose index reads
  and whose data shards are all present, by step."""
  found = []
  for index_path in tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index")):
    match = _CHECKPOINT_INDEX.search(index_path)
    if not match:
      continue
    prefix = index_path[:-len(".index")]
    shards = [_DATA_SHARD.search(path)
              for path in tf.io.gfile.glob(prefix + ".data-*")]
    counts = {int(shard.group(2)) for shard in shards if shard}
    if len(counts) != 1 or len(shards) != counts.pop():
      continue
    try:
      tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError):
      continue
    found.append((int(match.group(1)), prefix))
  return [prefix for _, prefix in sorted(found)]


def _pointed_checkpoint(directory):
  """The checkpoint the `checkpoint` file names, if the file reads and the
  checkpoint is there; None otherwise."""
  state = tf.train.get_checkpoint_state(directory)
  if state is None or not state.model_checkpoint_path:
    return None
  path = state.model_checkpoint_path
  return path if tf.io.gfile.exists(path + ".index") else None


def latest_checkpoint(directory):
  """The latest checkpoint of `directory` (a CheckpointManager's), or None.

  When the `checkpoint` pointer file is missing, unreadable or names a
  checkpoint that is gone, the latest complete `ckpt-N` present is taken
  (with a log line), so a damaged pointer never restarts a run from step 0.
  A pointer with no checkpoint at all left is a UserError: the checkpoints
  were deleted.
  """
  path = _pointed_checkpoint(directory)
  if path is not None:
    return path
  pointer = os.path.join(directory, "checkpoint")
  complete = _complete_checkpoints(directory)
  if complete:
    logging.warning(
        "%s is %s; taking the latest complete checkpoint present, %s", pointer,
        "damaged" if tf.io.gfile.exists(pointer) else "missing", complete[-1])
    return complete[-1]
  if tf.io.gfile.exists(pointer):
    raise utils.UserError(
        f"{pointer}: names no checkpoint that is present (and there is no "
        f"complete ckpt-N in {directory}), expected the run's checkpoints: "
        "restore them, or delete the run directory to start from step 0")
  return None


def make_checkpoint_manager(directory, checkpoint, *, max_to_keep=3):
  """A CheckpointManager of `directory`, its pointer file repaired first.

  A missing or damaged `checkpoint` file is rewritten from the complete
  `ckpt-N` present (see `latest_checkpoint`), so the manager resumes from
  the latest of them and rotates them as usual.
  """
  if max_to_keep < 1:
    raise utils.UserError(
        f"keep {max_to_keep} checkpoints: expected at least 1")
  latest = latest_checkpoint(directory)
  if latest is not None and _pointed_checkpoint(directory) is None:
    present = _complete_checkpoints(directory)
    times = [tf.io.gfile.stat(path + ".index").mtime_nsec / 1e9
             for path in present]
    # With their times, and none "preserved", the manager rotates them as
    # the checkpoints it wrote itself.
    tf.compat.v1.train.update_checkpoint_state(
        directory, latest, all_model_checkpoint_paths=present,
        all_model_checkpoint_timestamps=times,
        last_preserved_timestamp=min(times) - 1)
  return tf.train.CheckpointManager(checkpoint, directory,
                                    max_to_keep=max_to_keep)


def restore(checkpoint, path, what="model", *, partial=False):
  """Restores `checkpoint` from `path`; a UserError when it does not fit.

  A checkpoint that does not match (a missing or mis-shaped variable) or
  whose files are truncated or damaged is a UserError naming it and the
  first problem. `partial`: the checkpoint may hold more than `checkpoint`
  (e.g. an optimizer, when only the model is restored).
  """
  try:
    status = checkpoint.restore(path)
    if partial:
      status = status.expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as error:
    reason = " ".join(str(error).split())[:300]
    raise utils.UserError(
        f"{path}: does not match the {what}: {reason}") from None
  except IndexError as error:
    # What the checkpoint reader raises on a data file cut short.
    raise utils.UserError(
        f"{path}: unreadable ({error}), expected a complete checkpoint: its "
        f"files are truncated or damaged; delete {path}.* to resume from the "
        "checkpoint before it") from None


def restore_latest(manager, what="model"):
  """Restores the latest checkpoint of `manager`; False when there is none.

  A checkpoint that does not fit is a UserError (see `restore`).
  """
  path = manager.latest_checkpoint
  if path is None:
    return False
  restore(manager.checkpoint, path, what)
  return True


def make_finiteness_check(variables):
  """() -> names of the floating-point `variables` holding a NaN or an inf.

  One compiled reduction, one host sync: cheap enough to run before every
  checkpoint, so that no checkpoint holds a ruined state.
  """
  floating = [v for v in variables if v.dtype.is_floating]

  @tf.function(autograph=False)
  def finite_flags():
    return tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in floating])

  def non_finite():
    return [v.name for v, finite in zip(floating, finite_flags().numpy())
            if not finite]

  return non_finite


def write_tfrecords(path, serialized_records):
  """Writes records to `path` through a temporary name; returns their number."""
  tmp = utils.temporary_path(path)
  count = 0
  with tf.io.TFRecordWriter(tmp) as writer:
    for record in serialized_records:
      writer.write(record)
      count += 1
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return count


# Bytes around each record's data in a TFRecord file: its length (8) and the
# CRCs of the length (4) and of the data (4).
_TFRECORD_FRAMING_BYTES = 16


def count_tfrecords(path):
  """Records in the (uncompressed) TFRecord file `path` (local or gs://).

  A missing, corrupt or truncated file is a UserError naming it, why, and
  how many records read before the damage. TensorFlow's reader takes a file
  cut inside a record's header for a shorter whole file: the records' bytes
  are summed and held against the file's size to catch that.
  """
  count, data_bytes = 0, 0
  try:
    for batch in tf.data.TFRecordDataset(path, buffer_size=8 << 20).batch(
        4096):
      count += int(batch.shape[0])
      data_bytes += int(tf.reduce_sum(tf.strings.length(batch)))
  except tf.errors.NotFoundError:
    raise utils.UserError(f"{path}: does not exist") from None
  except tf.errors.DataLossError as error:
    # The batch that meets the damage is lost whole: its good records are
    # counted one by one.
    reason = utils.error_reason(error)
    try:
      for _ in tf.data.TFRecordDataset(path).skip(count):
        count += 1
    except tf.errors.DataLossError:
      pass
    raise utils.UserError(
        f"{path}: corrupt or truncated TFRecord file ({reason}) after "
        f"{count} good records") from None
  trailing = tf.io.gfile.stat(path).length - (
      data_bytes + count * _TFRECORD_FRAMING_BYTES)
  if trailing:
    raise utils.UserError(
        f"{path}: corrupt or truncated TFRecord file ({trailing} bytes after "
        f"the last whole record) after {count} good records")
  return count
