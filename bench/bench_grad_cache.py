"""The gradient cache against the plain contrastive step, as the batch grows.

  python bench/bench_grad_cache.py [--batch_sizes=32,64,128,256,512,1024] \
      [--chunk_size=32] [--quick]

For each batch size, one contrastive step of a small BERT (transformers'
TFBertModel, `--num_layers` x `--hidden_size`, questions of
`--query_length` and blocks of `--block_length` wordpieces, a query and a
block tower, in-batch negatives, Adam) is run with the gradient cache
(`grad_cache.cached_gradients`, chunks of `--chunk_size` per tower) and
without it (`grad_cache.full_batch_gradients`), and prints:

- peak memory of the step: TensorFlow's allocator statistics on the CPU
  (`tf.config.experimental.get_memory_info("CPU:0")`: the peak of live
  tensors during the step minus the live bytes before it, after two warm-up
  steps; weights and optimizer slots are the live bytes, not counted), as
  tests/test_memory_plan.py measures it;
- examples per second, the two steps interleaved `--runs` times (min and
  median, `bench_common.interleaved`);
- the ratios cached / plain of both, the time ratio flagged "not comparable"
  when other processes loaded the machine (`bench_common.ratio_text`);

and, as every bench, the load before and after and the float32 and bfloat16
matmul peaks.

The bench's BERT has no dropout (Keras' dropout layers draw from a state,
which the cache's re-forward would not replay; the retriever's own embedder
replays its dropout from per-example seeds, `realm_embedder`).
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
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import grad_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

setting = settings.setting
_VOCAB_SIZE = 8000
_CPU = "CPU:0"
QUICK_SIZES = dict(batch_sizes=(8, 16), chunk_size=4, num_layers=1,
                   hidden_size=32, query_length=8, block_length=16,
                   peak_size=256)


@dataclasses.dataclass(frozen=True)
class Config:
  """The bench's settings (its flags)."""
  batch_sizes: tuple = setting(
      (32, 64, 128, 256), "Global batch sizes (questions per step), e.g. "
      "32,64,128,256,512,1024.")
  chunk_size: int = setting(
      32, "Gradient cache: examples encoded at once per tower.")
  num_layers: int = setting(2, "BERT layers.")
  hidden_size: int = setting(128, "BERT hidden size (heads of 64).")
  query_length: int = setting(32, "Wordpieces per question.")
  block_length: int = setting(128, "Wordpieces per block.")
  peak_size: int = setting(
      1024, "Side of the square matmuls that measure the peak FLOP/s.")
  runs: int = setting(
      3, "Timed runs of each step, interleaved (>= 3: min and median).")
  quick: bool = setting(
      False, "A smoke run (tiny BERT, batches 8 and 16); overrides the size "
      "flags.")
  output_path: typing.Optional[str] = setting(
      None, "Also write the figures as JSON here.")


def _bert_tower(config, chunk_size):
  import transformers  # pylint: disable=g-import-not-at-top
  bert = transformers.TFBertModel(transformers.BertConfig(
      vocab_size=_VOCAB_SIZE, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers,
      num_attention_heads=max(1, config.hidden_size // 64),
      intermediate_size=4 * config.hidden_size,
      max_position_embeddings=max(config.query_length, config.block_length),
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

  def encode(features, seeds):
    del seeds  # No dropout to replay.
    return bert(input_ids=features["input_ids"],
                attention_mask=features["input_mask"],
                token_type_ids=features["segment_ids"],
                training=True).pooler_output

  encode({name: tf.zeros([1, 2], tf.int32) for name in (
      "input_ids", "input_mask", "segment_ids")}, None)  # Builds the weights.
  return grad_cache.Tower(encode, tuple(bert.trainable_variables), chunk_size)


def _features(rng, rows, length):
  return {"input_ids": rng.integers(1, _VOCAB_SIZE, (rows, length)).astype(
              np.int32),
          "input_mask": np.ones([rows, length], np.int32),
          "segment_ids": np.zeros([rows, length], np.int32)}


def _train_step(towers, gradients_fn, optimizer):
  variables = [v for tower in towers for v in tower.variables]

  @tf.function
  def step(inputs):
    loss, gradients = gradients_fn(towers, inputs, grad_cache.contrastive_loss)
    optimizer.apply_gradients(zip([g for tower_gradients in gradients
                                   for g in tower_gradients], variables))
    return loss

  return step


def _step_peak_bytes(step, inputs):
  """Peak live bytes during one step, beyond those live before it."""
  before = tf.config.experimental.get_memory_info(_CPU)["current"]
  tf.config.experimental.reset_memory_stats(_CPU)
  float(step(inputs))
  return tf.config.experimental.get_memory_info(_CPU)["peak"] - before


def measure_batch(config, towers, batch_size):
  """{"plain": {...}, "cached": {...}, ratios} of one global batch size."""
  rng = np.random.default_rng(batch_size)
  seeds = np.zeros([batch_size], np.int32)
  inputs = [(_features(rng, batch_size, config.query_length), seeds),
            (_features(rng, batch_size, config.block_length), seeds)]
  steps = {}
  for name, gradients_fn in (("plain", grad_cache.full_batch_gradients),
                             ("cached", grad_cache.cached_gradients)):
    optimizer = tf_utils.make_optimizer("adam", 1e-5)
    steps[name] = _train_step(towers, gradients_fn, optimizer)
    for _ in range(2):  # Tracing, graph optimisation, optimizer slots.
      float(steps[name](inputs))
  peaks = {name: _step_peak_bytes(step, inputs) for name, step in steps.items()}
  start = bench_common.snapshot()
  timings = bench_common.interleaved(
      {name: lambda step=step: step(inputs) for name, step in steps.items()},
      config.runs)
  load = bench_common.load_since(start)
  result = {"batch_size": batch_size, "load": load.as_dict()}
  for name in steps:
    result[name] = {
        "peak_bytes": int(peaks[name]),
        "examples_per_second": batch_size / timings[name].min,
        "median_examples_per_second": batch_size / timings[name].median}
  result["memory_ratio"] = peaks["cached"] / max(peaks["plain"], 1)
  result["time_ratio"] = timings["cached"].min / timings["plain"].min
  return result, load


def _line(result, load):
  plain, cached = result["plain"], result["cached"]
  return (f"batch {result['batch_size']:>5}: peak memory plain "
          f"{plain['peak_bytes'] / 2**20:8.1f} MiB, cached "
          f"{cached['peak_bytes'] / 2**20:8.1f} MiB "
          f"({result['memory_ratio']:.2f}x); examples/s plain "
          f"{plain['examples_per_second']:8.1f}, cached "
          f"{cached['examples_per_second']:8.1f}; time cached/plain "
          f"{bench_common.ratio_text(result['time_ratio'], load)}")


def run(config):
  """Runs the bench; returns its figures (also written to --output_path)."""
  bench_common.check_repeats(config.runs, "runs")
  if config.quick:
    config = dataclasses.replace(config, **QUICK_SIZES)
  for name in ("peak_size", "chunk_size", "num_layers", "hidden_size", "query_length",
               "block_length"):
    if getattr(config, name) < 1:
      raise utils.UserError(f"--{name}={getattr(config, name)}: expected >= 1")
  try:
    batch_sizes = [int(size) for size in config.batch_sizes]
  except ValueError:
    raise utils.UserError(f"--batch_sizes={','.join(map(str, config.batch_sizes))}"
                          ": expected integers, e.g. 32,64,128") from None
  for batch_size in batch_sizes:
    grad_cache.check_chunk_size(config.chunk_size, batch_size, "chunk_size")
  utils.check_output_path(config.output_path, "--output_path")
  started = bench_common.snapshot()
  print(f"load (1-min) before: {started.load_1min:.2f}", flush=True)
  peaks = bench_common.matmul_peaks(config.peak_size)
  print(bench_common.peaks_text(peaks, config.peak_size), flush=True)
  towers = [_bert_tower(config, config.chunk_size) for _ in range(2)]
  num_parameters = sum(int(np.prod(v.shape)) for v in towers[0].variables)
  print(f"BERT {config.num_layers} x {config.hidden_size} "
        f"({num_parameters / 1e6:.1f}M parameters a tower), questions of "
        f"{config.query_length}, blocks of {config.block_length} wordpieces, "
        f"chunks of {config.chunk_size}; memory: TensorFlow's CPU allocator "
        "peak during a step minus the live bytes before it", flush=True)
  rows = []
  for batch_size in batch_sizes:
    result, load = measure_batch(config, towers, batch_size)
    rows.append(result)
    print(_line(result, load), flush=True)
  print(bench_common.load_since(started).describe())
  results = {"config": dataclasses.asdict(config), "rows": rows,
             "parameters_per_tower": num_parameters, "matmul_peaks": peaks}
  if config.output_path:
    bench_common.write_results(config.output_path, results)
  return results


_FLAGS = cli.define_flags(Config)


def main(argv):
  del argv
  run(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
