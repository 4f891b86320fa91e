"""The memory a training step of our GPT-2 needs, per device, from its shape.

`plan(...)` counts the bytes of what a training step keeps, as this repository
computes it (`modeling_tf_gpt2_model_par`, `task_specific.answer_loss_sum`,
`tf_utils.make_train_step`, the Keras optimizers of `tf_utils.make_optimizer`):

- weights: float32 master copies (`gpt2_weights.weight_shapes`), 4 B a
  parameter, whatever the compute precision.
- gradients: float32, one per weight (the micro-batch's gradients).
- accumulator: with `batch_split` > 1, `make_train_step` sums the micro-batch
  gradients into a float32 loop carry the size of the gradients.
- optimizer state: Adam and AdamW keep m and v (8 B a parameter). Keras'
  Adafactor keeps the factored second moments r (shape[:-1]) and c
  (shape[:-2] + shape[-1:]) of every matrix *and* a full-size `v` per
  variable (`add_variable_from_reference`), so about 4 B a parameter, not
  the near-zero of the paper's Adafactor; vectors get two int32 scalar
  placeholders.
- activations: the tensors the forward pass keeps for the backward pass. Per
  block (B sequences of T tokens, width E, inner width F, H heads): each
  LayerNorm keeps x - mean twice (its own and tf.nn.moments' gradient's),
  the normalised x (float32) and its output (compute dtype); q, k, v; the
  softmax (float32) and, with attention dropout or bf16, the probabilities
  fed to the value matmul (compute dtype) and a bool dropout mask; the
  inputs of both projections; tanh-GELU's four intermediates (F wide); a bool
  mask per residual dropout; under bf16, the bf16 copies of the block's
  matrices (the matmul gradients read them). The head runs on the answer
  window only (`score_positions`): its LayerNorm and the cross-entropy's
  gradient ([B, window, V], float32), and under bf16 (or on a last stage
  that is not the first) the copy of the tied embedding it multiplies by.
  With `recompute`, a block keeps its float32 input, its dropout masks and,
  under bf16, its bf16 weight copies: the rerun's masks and casts depend only
  on the seed and the weights, so TensorFlow's executor computes them as soon
  as it can, in the forward pass, and holds them until the block is rerun.
  The block being rerun holds one block's activations.

The peak (`Usage.total`) is weights + optimizer state + accumulator + what
the step holds at the worst point of the backward pass, which runs from the
last block to the first turning each block's activations into its
gradients: at its start (every activation, the head's and the last block's
gradients) or at its end (every gradient, the first block's activations, the
embedding gather's gradient made dense beside the head's).

These are the tensors of TensorFlow's graph (tf.function, no XLA): a test
derives them from the graph itself and checks the totals against measured
peak memory on CPU. XLA fuses elementwise chains (GELU's intermediates, the
LayerNorm's differences) and may keep less; allocator fragmentation and
transient buffers add some: read the figures as a plan, with headroom.

Stages split the layers as the model places them
(`placement.stage_of_blocks`: block i on stage i * stages // n_layer): the embeddings with the first block, the final
LayerNorm and the head with the last block. The tied embedding's gradient is
counted where the embedding lives (the first stage).
"""

import dataclasses
import math
import os
import typing

import transformers

import gpt2_weights
import placement
import settings
import utils

setting = settings.setting

OPTIMIZERS = ("adam", "adamw", "adafactor")
PRECISIONS = ("fp32", "bf16")
COMPONENTS = ("weights", "gradients", "accumulator", "optimizer",
              "activations")
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2}
_FLOAT32 = 4
# Cloud TPU cores: v3 has 16 GiB of HBM per core, v4 32 GiB.
DEVICE_GB = {"v3": 16, "v4": 32}
_GIB = 2 ** 30
# Tensors of width F that the activation keeps besides its output (which the
# next projection keeps): tanh-GELU keeps x^2, 0.5x, tanh(.) and 1 + tanh(.)
# (see tf.nn.gelu); erf-GELU keeps -x/sqrt(2), 0.5x and erfc(.); ReLU keeps
# only its output.
_ACTIVATION_KEPT = {"gelu_new": 4, "gelu_pytorch_tanh": 4, "gelu": 3,
                    "relu": 0}

# The shapes of OpenAI's GPT-2 checkpoints (the hub cannot be reached from
# every machine; the rest of each config is GPT2Config's defaults).
KNOWN_SHAPES = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


@dataclasses.dataclass(frozen=True)
class Usage:
  """Bytes of one device (or of a whole replica), by component.

  `activations` is everything the forward pass keeps (and, with
  recomputation, the block being rerun); `total` is the peak of the step,
  less than the sum of the components: the backward pass frees a block's
  activations as it makes the block's gradients.
  """
  weights: int = 0
  gradients: int = 0
  accumulator: int = 0
  optimizer: int = 0
  activations: int = 0
  total: int = 0

  def __add__(self, other):
    return Usage(**{field.name: getattr(self, field.name) +
                    getattr(other, field.name)
                    for field in dataclasses.fields(self)})


@dataclasses.dataclass(frozen=True)
class Plan:
  """The per-stage usage of one replica.

  Attributes:
    stages: a Usage per stage (device of the replica), first to last.
    layers: per stage, the (first, last) block it holds.
  """
  stages: tuple
  layers: tuple

  @property
  def per_device(self):
    """The usage of the fullest device (what must fit)."""
    return max(self.stages, key=lambda usage: usage.total)

  @property
  def replica(self):
    """The usage of the whole replica (the sum over its stages)."""
    total = Usage()
    for usage in self.stages:
      total += usage
    return total


def model_config(config_or_dict):
  """A transformers.GPT2Config from a GPT2Config or a dict of its fields."""
  if isinstance(config_or_dict, transformers.GPT2Config):
    return config_or_dict
  if isinstance(config_or_dict, dict):
    return transformers.GPT2Config.from_dict(config_or_dict)
  raise utils.UserError(
      f"gpt2_config: {type(config_or_dict).__name__}, expected a "
      "transformers.GPT2Config or a dict of its fields")


def resolve_config(key):
  """The GPT2Config of a known shape's name, a directory with config.json,
  or a config.json path."""
  if key in KNOWN_SHAPES:
    return transformers.GPT2Config(**KNOWN_SHAPES[key])
  path = key
  if os.path.isdir(key):
    path = os.path.join(key, gpt2_weights.CONFIG_NAME)
  if not os.path.isfile(path):
    raise utils.UserError(
        f"--config={key}: expected one of {', '.join(KNOWN_SHAPES)}, a "
        f"directory holding {gpt2_weights.CONFIG_NAME} or a config.json path")
  return gpt2_weights.read_config(path)


def _check(config, sequence_length, micro_batch, optimizer, precision,
           batch_split, num_stages, answer_window):
  for name, value in (("sequence_length", sequence_length),
                      ("micro_batch", micro_batch),
                      ("batch_split", batch_split)):
    if not isinstance(value, int) or value < 1:
      raise utils.UserError(f"{name}={value!r}: expected an integer >= 1")
  if optimizer not in OPTIMIZERS:
    raise utils.UserError(
        f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
  if precision not in PRECISIONS:
    raise utils.UserError(
        f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
  if not isinstance(num_stages, int):
    raise utils.UserError(f"num_stages={num_stages!r}: expected an integer")
  placement.check_num_stages(num_stages, config.n_layer, "num_stages")
  if sequence_length > config.n_positions:
    raise utils.UserError(
        f"sequence_length={sequence_length}: longer than the model's "
        f"n_positions={config.n_positions}")
  if answer_window is not None and not 1 <= answer_window < sequence_length:
    raise utils.UserError(
        f"answer_window={answer_window!r}: expected between 1 and "
        f"sequence_length - 1 = {sequence_length - 1} (or None: every "
        "position)")
  if config.activation_function not in _ACTIVATION_KEPT:
    raise utils.UserError(
        f"activation_function={config.activation_function!r}: expected one "
        f"of {', '.join(_ACTIVATION_KEPT)}")
  if config.n_embd % config.n_head:
    raise utils.UserError(
        f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}")


def _optimizer_bytes(optimizer, shape):
  """Bytes of the optimizer slots of one float32 variable of `shape`."""
  size = math.prod(shape)
  if optimizer in ("adam", "adamw"):
    return 2 * _FLOAT32 * size
  if len(shape) < 2:  # v, and two int32 scalars for r and c
    return _FLOAT32 * size + 2 * 4
  rows, columns = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
  return _FLOAT32 * (size + rows + columns)


def _block_activation_bytes(config, batch, length, compute, recompute):
  """Bytes one block keeps for its backward pass (see the module doc)."""
  width = config.n_embd
  inner = config.n_inner or 4 * width
  tokens = batch * length
  scores = batch * config.n_head * length * length
  masks = ((scores if config.attn_pdrop else 0) +
           (2 * tokens * width if config.resid_pdrop else 0))
  weight_copies = 0
  if compute != _FLOAT32:
    weight_copies = compute * (4 * width * width + 2 * width * inner)
  if recompute:
    return _FLOAT32 * tokens * width + masks + weight_copies
  layer_norms = 2 * (3 * _FLOAT32 * tokens * width + compute * tokens * width
                     + _FLOAT32 * tokens)
  # q, k, v and the input of the attention's output projection.
  attention = 4 * compute * tokens * width + _FLOAT32 * scores
  if config.attn_pdrop or compute != _FLOAT32:
    attention += compute * scores
  mlp = (_ACTIVATION_KEPT[config.activation_function] + 1) * (
      compute * tokens * inner)
  return layer_norms + attention + mlp + masks + weight_copies


def rerun_block_bytes(config, batch, length, compute):
  """Under recomputation, what the block being rerun holds beyond what every
  recomputed block keeps anyway (its input, masks and weight copies)."""
  return (_block_activation_bytes(config, batch, length, compute, False) -
          _block_activation_bytes(config, batch, length, compute, True) +
          _FLOAT32 * batch * length * config.n_embd)


def _head_activation_bytes(config, batch, window, compute, copies_embedding):
  """Bytes the final LayerNorm and the tied head keep over the window."""
  width, scored = config.n_embd, batch * window
  layer_norm = (3 * _FLOAT32 + compute) * scored * width + _FLOAT32 * scored
  cross_entropy_gradient = _FLOAT32 * scored * config.vocab_size
  embedding_copy = 0
  if copies_embedding or compute != _FLOAT32:
    embedding_copy = compute * config.vocab_size * width
  return layer_norm + cross_entropy_gradient + embedding_copy


def _embedding_activation_bytes(config, batch, length):
  """The embedding dropout's bool mask and the causal mask."""
  mask = batch * length * config.n_embd if config.embd_pdrop else 0
  return mask + length * length


def plan(gpt2_config, *, sequence_length, micro_batch, optimizer, precision,
         recompute, batch_split, num_stages, answer_window=None):
  """The bytes of a training step, per stage of one replica.

  Args:
    gpt2_config: a transformers.GPT2Config, or a dict of its fields.
    sequence_length: tokens per sequence.
    micro_batch: sequences per micro-batch on this replica (the per-replica
      batch / batch_split).
    optimizer: one of OPTIMIZERS.
    precision: "fp32", or "bf16" (bf16 compute, float32 master weights).
    recompute: the model's `recompute` (blocks rerun in the backward pass).
    batch_split: micro-batches per step (> 1 allocates the accumulator).
    num_stages: devices the layers are split over (model parallelism).
    answer_window: positions the head scores per sequence
      (`Layout.max_labels`), or None for every position but the last.

  Returns:
    A Plan.
  """
  config = model_config(gpt2_config)
  _check(config, sequence_length, micro_batch, optimizer, precision,
         batch_split, num_stages, answer_window)
  compute = _COMPUTE_BYTES[precision]
  window = answer_window or sequence_length - 1
  layers = placement.stage_layers(config.n_layer, num_stages)
  shapes = gpt2_weights.weight_shapes(config)
  block = _block_activation_bytes(config, micro_batch, sequence_length,
                                  compute, recompute)
  rerun = (rerun_block_bytes(config, micro_batch, sequence_length, compute)
           if recompute else 0)
  block_gradients = _FLOAT32 * sum(
      math.prod(shape) for name, shape in shapes.items()
      if name.startswith("transformer.h.0."))
  stages = []
  for stage, (first, last) in enumerate(layers):
    names = [name for name in shapes if _stage_of(name, layers) == stage]
    parameters = sum(math.prod(shapes[name]) for name in names)
    num_blocks = last - first + 1
    # Outside the blocks: the embeddings' dropout mask, the head's tensors.
    other_activations = 0
    if stage == 0:
      other_activations += _embedding_activation_bytes(config, micro_batch,
                                                       sequence_length)
    if stage == num_stages - 1:
      other_activations += _head_activation_bytes(
          config, micro_batch, window, compute, copies_embedding=stage > 0)
    usage = Usage(
        weights=_FLOAT32 * parameters,
        gradients=_FLOAT32 * parameters,
        accumulator=_FLOAT32 * parameters if batch_split > 1 else 0,
        optimizer=sum(_optimizer_bytes(optimizer, shapes[name])
                      for name in names),
        activations=num_blocks * block + rerun + other_activations)
    other_gradients = usage.gradients - num_blocks * block_gradients
    # The backward pass runs from the last block to the first, turning each
    # block's activations into its gradients: the peak is at one end, with
    # every activation and the first block's gradients, or every gradient
    # and the last block's activations (plus, on the first stage, the
    # embedding gather's gradient made dense beside the head's).
    embedding_gradient = (_FLOAT32 * config.vocab_size * config.n_embd
                          if stage == 0 else 0)
    backward = max(num_blocks * block + block_gradients,
                   num_blocks * block_gradients + block + embedding_gradient)
    stages.append(dataclasses.replace(usage, total=(
        usage.weights + usage.optimizer + usage.accumulator + other_gradients
        + other_activations + rerun + backward)))
  return Plan(stages=tuple(stages), layers=layers)


def _stage_of(name, layers):
  """The stage holding weight `name` (a Hugging Face name)."""
  if name.startswith("transformer.h."):
    layer = int(name.split(".")[2])
    return next(stage for stage, (first, last) in enumerate(layers)
                if first <= layer <= last)
  if name.startswith("transformer.ln_f."):
    return len(layers) - 1
  return 0  # wte, wpe


def stages_to_fit(gpt2_config, device_bytes, **plan_arguments):
  """The fewest stages whose fullest device fits in `device_bytes`, or None
  (`plan`'s keyword arguments but num_stages)."""
  config = model_config(gpt2_config)
  for num_stages in range(1, config.n_layer + 1):
    usage = plan(config, num_stages=num_stages, **plan_arguments).per_device
    if usage.total <= device_bytes:
      return num_stages
  return None


def gigabytes(num_bytes):
  """GiB, the unit TPU and GPU memory sizes are quoted in."""
  return num_bytes / _GIB


def markdown_table(result):
  """The per-stage table of a Plan (GiB), with the replica's total."""
  header = ("| stage | blocks | " + " | ".join(COMPONENTS) + " | peak |\n"
            "| --- | --- | " + " | ".join("---" for _ in COMPONENTS) +
            " | --- |")
  rows = [header]
  named = [(str(stage), f"{first}-{last}", usage)
           for stage, ((first, last), usage)
           in enumerate(zip(result.layers, result.stages))]
  if len(result.stages) > 1:
    named.append(("replica", "all", result.replica))
  for name, blocks, usage in named:
    cells = [f"{gigabytes(getattr(usage, c)):.2f}" for c in COMPONENTS]
    rows.append(f"| {name} | {blocks} | " + " | ".join(cells) +
                f" | {gigabytes(usage.total):.2f} |")
  return "\n".join(rows)


@dataclasses.dataclass(frozen=True)
class PlanConfig:
  """util_scripts/memory_plan.py's settings."""
  config: typing.Optional[str] = setting(
      None, "Required. The GPT-2: one of " + ", ".join(KNOWN_SHAPES) +
      " (their shapes are built in), a directory holding config.json, or a "
      "config.json path.")
  seq: int = setting(1024, "Tokens per sequence.")
  micro_batch: int = setting(
      1, "Sequences per micro-batch per replica (the per-replica batch / "
      "--batch_split).")
  optimizer: str = setting("adafactor", "The optimizer (tf_utils's).",
                           choices=OPTIMIZERS)
  precision: str = setting(
      "bf16", "fp32, or bf16 compute over float32 master weights (main.py's "
      "bf16 setting).", choices=PRECISIONS)
  recompute: bool = setting(
      False, "Blocks rerun in the backward pass (main.py's recompute setting).")
  batch_split: int = setting(
      1, "Micro-batches per step; > 1 allocates a gradient accumulator.")
  stages: int = setting(
      1, "Devices per replica the layers are split over.")
  answer_window: int = setting(
      0, "Positions the head scores per sequence: the layout's "
      "max_answer_tokens + 1 (main.py's loss window); 0 for every position.")
  device_gb: float = setting(
      0.0, "Also say how many stages fit devices of this many GiB, and on "
      "TPU v3 (16 GiB) and v4 (32 GiB) cores; 0: do not.")


def report(config):
  """The text util_scripts/memory_plan.py prints for a PlanConfig."""
  if not config.config:
    raise utils.UserError(
        "--config is required (" + ", ".join(KNOWN_SHAPES) +
        ", a directory with config.json, or a config.json path)")
  if config.device_gb < 0:
    raise utils.UserError(
        f"--device_gb={config.device_gb}: expected a size in GiB > 0 (or 0)")
  if config.answer_window < 0:
    raise utils.UserError(
        f"--answer_window={config.answer_window}: expected >= 0")
  gpt2_config = resolve_config(config.config)
  plan_arguments = dict(
      sequence_length=config.seq, micro_batch=config.micro_batch,
      optimizer=config.optimizer, precision=config.precision,
      recompute=config.recompute, batch_split=config.batch_split,
      answer_window=config.answer_window or None)
  result = plan(gpt2_config, num_stages=config.stages, **plan_arguments)
  parameters = sum(math.prod(shape) for shape
                   in gpt2_weights.weight_shapes(gpt2_config).values())
  lines = [
      f"{config.config}: {parameters / 1e9:.3f}B parameters, "
      f"{gpt2_config.n_layer} x {gpt2_config.n_embd}, "
      f"{gpt2_config.n_head} heads; sequence {config.seq}, micro-batch "
      f"{config.micro_batch}, {config.optimizer}, {config.precision}, "
      f"recompute {'on' if config.recompute else 'off'}, batch_split "
      f"{config.batch_split}, answer window "
      f"{config.answer_window or config.seq - 1}; GiB per device",
      "", markdown_table(result), ""]
  sizes = dict(DEVICE_GB)
  if config.device_gb:
    if config.device_gb not in DEVICE_GB.values():
      sizes = {f"{config.device_gb:g} GiB": config.device_gb, **sizes}
    for name, size in sizes.items():
      label = f"TPU {name} core ({size} GiB)" if name in DEVICE_GB else name
      needed = stages_to_fit(gpt2_config, size * _GIB, **plan_arguments)
      lines.append(
          f"{label}: " + (f"{needed} stage(s) per replica" if needed else
                         f"does not fit even over {gpt2_config.n_layer} "
                         "stages"))
  return "\n".join(lines)
