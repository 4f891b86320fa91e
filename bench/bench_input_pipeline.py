"""Input pipeline vs train step: can tf.data keep the model fed? (acceptance 7)

  python bench/bench_input_pipeline.py [--cache_dir=demo_out/cache \
      --model_key=demo_out/world/model_config \
      --train_config=configs/train_configs/demo_retrieval.json] [--quick]

Measures, in one run on this machine, the examples per second that
`task_specific.make_dataset` delivers (parse, sample contexts, lay out,
batch) and the examples per second one train step consumes (the step fed from
batches already in memory), with the layout, batch, optimizer and precision
(`bf16`) of the train config. Prints both and their ratio; the pipeline
should be >= 10x faster. Each side is timed alone, the two interleaved
--runs times (min and median); in training they share the host's cores. The
machine's load before and after and the matmul peaks of float32 and bfloat16
are printed beside the ratio, which is flagged "not comparable" when the
load was high (`bench_common`).
"""

import dataclasses
import os
import sys
import typing

# Run as a script from the repository root or anywhere, or imported as a
# module (the tests do): the library lives one up, bench_common here.
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path[:0] = [REPO, BENCH_DIR]

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import context_draw  # pylint: disable=g-import-not-at-top,wrong-import-position
import neighbour_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
import task_specific  # pylint: disable=g-import-not-at-top,wrong-import-position
import training  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

setting = settings.setting
_WARMUP_BATCHES = 3
QUICK_SIZES = dict(num_batches=5, peak_size=512)


@dataclasses.dataclass(frozen=True)
class Config:
  """The bench's settings (its flags)."""
  cache_dir: str = setting(
      "demo_out/cache", "Neighbour cache (what `make demo` writes).")
  model_key: str = setting(
      "demo_out/world/model_config", "GPT-2 key or directory.")
  train_config: str = setting(
      "configs/train_configs/demo_retrieval.json",
      "main.py config whose layout, data, optimizer and precision settings "
      "are used.")
  quick: bool = setting(
      False, "A smoke run (5 batches, 512^3 peak); overrides the size flags.")
  num_batches: int = setting(
      40, "Batches timed for each side in each run (after a warm-up).")
  runs: int = setting(
      3, "Timed runs of each side, interleaved (>= 3: min and median).")
  peak_size: int = setting(
      2048, "Side of the square matmuls that measure the peak FLOP/s.")
  output_path: typing.Optional[str] = setting(
      None, "Also write the figures as JSON here.")


def run(config):
  """Runs the bench; returns its figures (also written to --output_path)."""
  bench_common.check_repeats(config.runs, "runs")
  if config.quick:
    config = dataclasses.replace(config, **QUICK_SIZES)
  for name in ("num_batches", "peak_size"):
    if getattr(config, name) < 1:
      raise utils.UserError(
          f"--{name}={getattr(config, name)}: expected >= 1")
  # The train config's settings, the rest training's defaults.
  train_config = training.config_from_values(
      settings.read_flat_config(config.train_config), config.train_config)
  manifest = neighbour_cache.read_manifest(config.cache_dir)
  utils.check_output_path(config.output_path, "--output_path")
  tokenizer = task_specific.load_tokenizer(
      train_config.tokenizer or manifest["tokenizer"])
  started = bench_common.snapshot()
  print(f"load (1-min) before: {started.load_1min:.2f}", flush=True)
  peaks = bench_common.matmul_peaks(config.peak_size)
  print(bench_common.peaks_text(peaks, config.peak_size), flush=True)
  precision = "bfloat16" if train_config.bf16 else "float32"
  strategy = tf_utils.make_strategy("OneDeviceStrategy")
  with strategy.scope():
    model = task_specific.load_model(
        config.model_key, dtype="bfloat16" if train_config.bf16 else None)
    optimizer = tf_utils.make_optimizer(train_config.optimizer_type,
                                        train_config.learning_rate)
  layout = task_specific.make_layout(tokenizer, train_config.layout,
                                     model.config.n_positions)
  data_config = task_specific.DataConfig(
      approach=context_draw.Approach(train_config.approach_type),
      num_retrievals=train_config.num_retrievals,
      retrieval_temperature=train_config.retrieval_temperature,
      retrieval_bank_size=train_config.retrieval_bank_size,
      every_answer=train_config.every_answer)
  task_specific.check_data_config(data_config, manifest, config.cache_dir)
  batch_size = train_config.batch_size
  num_batches = config.num_batches
  dataset = task_specific.make_dataset(
      neighbour_cache.split_files(config.cache_dir, manifest, "train"),
      data_config, layout, batch_size=batch_size, training=True)

  iterator = iter(dataset)
  warmup = [next(iterator) for _ in range(_WARMUP_BATCHES)]
  batches = [next(iterator) for _ in range(num_batches)]
  train_step = tf_utils.make_train_step(
      strategy, lambda batch: task_specific.answer_loss_sum(
          model, batch, layout.max_labels, training=True),
      model.trainable_variables, optimizer,
      batch_split=train_config.batch_split)
  for batch in warmup:
    float(train_step(batch)["loss"])

  def pull_batches():
    for _ in range(num_batches):
      next(iterator)

  def train_on_batches():
    for batch in batches:
      outputs = train_step(batch)
    return outputs["loss"]

  start = bench_common.snapshot()
  timings = bench_common.interleaved(
      {"pipeline": pull_batches, "train_step": train_on_batches}, config.runs)
  load = bench_common.load_since(start)
  examples = num_batches * batch_size
  pipeline_rate = examples / timings["pipeline"].min
  step_rate = examples / timings["train_step"].min
  result = {
      "pipeline_examples_per_second": pipeline_rate,
      "train_step_examples_per_second": step_rate,
      "median_pipeline_examples_per_second":
          examples / timings["pipeline"].median,
      "median_train_step_examples_per_second":
          examples / timings["train_step"].median,
      "ratio": pipeline_rate / step_rate,
      "batch_size": batch_size,
      "sequence_length": layout.sequence_length,
      "model_parameters": model.num_parameters,
      "precision": precision,
      "train_config": config.train_config,
      "matmul_peaks": peaks,
      "load": load.as_dict(),
  }
  print(f"input pipeline: {pipeline_rate:.0f} examples/s (median "
        f"{result['median_pipeline_examples_per_second']:.0f}); train step "
        f"({precision}): {step_rate:.0f} examples/s (median "
        f"{result['median_train_step_examples_per_second']:.0f}); ratio "
        f"{bench_common.ratio_text(result['ratio'], load)} (batch "
        f"{batch_size}, {layout.sequence_length} tokens, "
        f"{model.num_parameters / 1e6:.1f}M parameters)")
  print(load.describe())
  if config.output_path:
    bench_common.write_results(config.output_path, result)
  return result


_FLAGS = cli.define_flags(Config)


def main(argv):
  del argv
  run(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
