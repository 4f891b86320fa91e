"""Input pipeline vs train step: can tf.data keep the model fed? (acceptance 7)

  python bench/bench_input_pipeline.py [--cache_dir=demo_out/cache \
      --model_key=demo_out/world/model_config \
      --train_config=configs/train_configs/demo_retrieval.json]

Measures, in one run on this machine, the examples per second that
`task_specific.make_dataset` delivers (parse, sample contexts, lay out,
batch) and the examples per second one train step consumes (the step fed from
batches already in memory), with the layout, batch and optimizer of the train
config. Prints both and their ratio; the pipeline should be >= 10x faster.
Each side is timed alone; in training they share the host's cores.
"""

import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import context_draw  # pylint: disable=g-import-not-at-top,wrong-import-position
import neighbour_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
import task_specific  # pylint: disable=g-import-not-at-top,wrong-import-position
import training  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", "demo_out/cache", "Neighbour cache (what `make demo` writes).")
_FLAG_MODEL_KEY = flags.DEFINE_string(
    "model_key", "demo_out/world/model_config", "GPT-2 key or directory.")
_FLAG_TRAIN_CONFIG = flags.DEFINE_string(
    "train_config", "configs/train_configs/demo_retrieval.json",
    "main.py config whose layout, data and optimizer settings are used.")
_FLAG_NUM_BATCHES = flags.DEFINE_integer(
    "num_batches", 40, "Batches timed for each side (after a warm-up).")
_FLAG_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Also write the figures as JSON here.")

_WARMUP_BATCHES = 3


def main(argv):
  del argv
  # The train config's settings, the rest training's defaults.
  config = training.config_from_values(
      settings.read_flat_config(_FLAG_TRAIN_CONFIG.value),
      _FLAG_TRAIN_CONFIG.value)
  manifest = neighbour_cache.read_manifest(_FLAG_CACHE_DIR.value)
  tokenizer = task_specific.load_tokenizer(
      config.tokenizer or manifest["tokenizer"])
  strategy = tf_utils.make_strategy("OneDeviceStrategy")
  with strategy.scope():
    model = task_specific.load_model(_FLAG_MODEL_KEY.value)
    optimizer = tf_utils.make_optimizer(config.optimizer_type,
                                        config.learning_rate)
  layout = task_specific.make_layout(tokenizer, config.layout,
                                     model.config.n_positions)
  data_config = task_specific.DataConfig(
      approach=context_draw.Approach(config.approach_type),
      num_retrievals=config.num_retrievals,
      retrieval_temperature=config.retrieval_temperature,
      retrieval_bank_size=config.retrieval_bank_size,
      every_answer=config.every_answer)
  task_specific.check_data_config(data_config, manifest, _FLAG_CACHE_DIR.value)
  batch_size = config.batch_size
  num_batches = _FLAG_NUM_BATCHES.value
  dataset = task_specific.make_dataset(
      neighbour_cache.split_files(_FLAG_CACHE_DIR.value, manifest, "train"),
      data_config, layout, batch_size=batch_size, training=True)

  iterator = iter(dataset)
  batches = [next(iterator) for _ in range(_WARMUP_BATCHES)]
  started = time.perf_counter()
  batches += [next(iterator) for _ in range(num_batches)]
  pipeline_rate = num_batches * batch_size / (time.perf_counter() - started)

  train_step = tf_utils.make_train_step(
      strategy, lambda batch: task_specific.answer_loss_sum(
          model, batch, layout.max_labels, training=True),
      model.trainable_variables, optimizer,
      batch_split=config.batch_split)
  for batch in batches[:_WARMUP_BATCHES]:
    float(train_step(batch)["loss"])
  started = time.perf_counter()
  for batch in batches[_WARMUP_BATCHES:]:
    outputs = train_step(batch)
  float(outputs["loss"])
  step_rate = num_batches * batch_size / (time.perf_counter() - started)

  result = {
      "pipeline_examples_per_second": pipeline_rate,
      "train_step_examples_per_second": step_rate,
      "ratio": pipeline_rate / step_rate,
      "batch_size": batch_size,
      "sequence_length": layout.sequence_length,
      "model_parameters": model.num_parameters,
      "train_config": _FLAG_TRAIN_CONFIG.value,
  }
  print(f"input pipeline: {pipeline_rate:.0f} examples/s; train step: "
        f"{step_rate:.0f} examples/s; ratio {result['ratio']:.1f}x "
        f"(batch {batch_size}, {layout.sequence_length} tokens, "
        f"{model.num_parameters / 1e6:.1f}M parameters)")
  if _FLAG_OUTPUT_PATH.value:
    utils.atomic_write_json(_FLAG_OUTPUT_PATH.value, result)


if __name__ == "__main__":
  cli.run(main)
