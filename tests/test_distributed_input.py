"""The distributed input pipeline (issue 14, acceptance 2 and 3): training and
evaluation input through `distribute_datasets_from_function`, each replica
its own rows, a resumed run reading the examples an uninterrupted one reads,
and two workers scoring exactly the examples one worker scores.

On a tiny GPT-2 and cache (`cache_fixtures.write_training_world`); the
pytest process has four logical CPUs (conftest.py), so two replicas run
here. Only the multi-worker test starts processes (main.py, one per worker).
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

import cache_fixtures
import context_draw
import distributed_fixtures
import evaluation
import task_specific
import tf_utils
import training

TWO_REPLICAS = dict(distribute_mode="MirroredStrategy",
                    devices=["/device:CPU:0", "/device:CPU:1"])
# 4 steps of a run whose longer answers make several rows with
# --eval_stride=2 (the fixture's answers are 6 tokens long).
RUN = dict(max_steps=4, checkpoint_every_steps=2,
           approach_type="random_context", max_answer_tokens=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return cache_fixtures.write_training_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def straight_run(world, tmp_path_factory):
  """The output directory of a RUN named "straight", trained without a stop."""
  output_dir = tmp_path_factory.mktemp("runs")
  training.train(cache_fixtures.training_config(world, output_dir, "straight",
                                                **RUN))
  return output_dir


class _Recorded:
  """Wraps a strategy's `distribute_datasets_from_function`, recording the
  InputContexts it hands the dataset function."""

  def __init__(self, strategy):
    self.contexts = []
    distribute = strategy.distribute_datasets_from_function

    def recording(dataset_fn, options=None):
      def recorded_fn(input_context):
        self.contexts.append(input_context)
        return dataset_fn(input_context)
      return distribute(recorded_fn, options=options)

    strategy.distribute_datasets_from_function = recording


def _setup(world, output_dir, **overrides):
  setup = training.Setup(cache_fixtures.training_config(
      world, output_dir, "input", **overrides))
  return setup, _Recorded(setup.strategy)


def _replica_rows(strategy, batch, name):
  """[(device, numpy rows of feature `name`)] of each local replica."""
  return [(value.device, value.numpy())
          for value in strategy.experimental_local_results(batch[name])]


@pytest.mark.slow
def test_training_input_is_distributed_per_replica_and_resumes_by_position(
    world, tmp_path):
  setup, recorded = _setup(world, tmp_path, **TWO_REPLICAS)
  files = setup.files("train")
  data_config = setup.data_config(setup.config.approach_type,
                                  setup.config.retrieval_temperature)
  # The global batches one device reads: 4 examples a step.
  single = [batch["input_ids"].numpy() for batch in task_specific.make_dataset(
      files, data_config, setup.layout, batch_size=4, training=True).take(5)]

  next_batch = training._train_input(setup, files, data_config, 0)
  assert len(recorded.contexts) == 1
  context = recorded.contexts[0]
  assert (context.num_input_pipelines, context.num_replicas_in_sync) == (1, 2)
  for step in range(3):
    replicas = _replica_rows(setup.strategy, next_batch(), "input_ids")
    assert [device.split("/")[-1] for device, _ in replicas] == [
        "device:CPU:0", "device:CPU:1"]
    # Replica 0 the first two rows of the global batch, replica 1 the last.
    assert [rows.shape[0] for _, rows in replicas] == [2, 2]
    np.testing.assert_array_equal(
        np.concatenate([rows for _, rows in replicas]), single[step])

  # Resumed after 3 steps (12 examples read): the uninterrupted stream's
  # steps 4 and 5.
  resumed = training._train_input(setup, files, data_config, 12)
  for step in (3, 4):
    np.testing.assert_array_equal(np.concatenate(
        [rows for _, rows in _replica_rows(setup.strategy, resumed(),
                                           "input_ids")]), single[step])


@pytest.mark.slow
def test_evaluation_input_is_distributed_and_each_row_scored_once(
    world, tmp_path):
  setup, recorded = _setup(world, tmp_path, **TWO_REPLICAS)
  data_config = setup.data_config(context_draw.Approach.NAKED_LM, 0.0)
  num_validation = setup.manifest["splits"]["validation"]["num_records"]
  for number_batches, expected in ((0, num_validation), (2, 8)):
    keys = []
    for batch in setup.eval_dataset(data_config, "validation",
                                    number_batches):
      replicas = _replica_rows(setup.strategy, batch, "example_key")
      assert [rows.shape[0] for _, rows in replicas] == [2, 2]
      keys += [key for _, rows in replicas for key in rows if key >= 0]
    assert len(keys) == len(set(keys)) == expected, number_batches
  assert len(recorded.contexts) == 2


def _drop_position(run_dir, config):
  """Rewrites the run's latest checkpoint as the older runs wrote it: model,
  optimizer, step and a tf.data iterator, no input position."""
  setup = training.Setup(config)
  optimizer = tf_utils.make_optimizer(
      config.optimizer_type, tf_utils.make_learning_rate_schedule(
          config.learning_rate_schedule, config.learning_rate,
          warmup_steps=config.warmup_steps, total_steps=config.max_steps))
  optimizer.build(setup.model.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64, trainable=False)
  old = tf.train.Checkpoint(model=setup.model, optimizer=optimizer, step=step,
                            iterator=iter(tf.data.Dataset.range(3)))
  path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
  old.restore(path).expect_partial()
  old.write(path)
  assert not any(name.startswith("examples_read/")
                 for name, _ in tf.train.list_variables(path))


@pytest.mark.slow
def test_a_resumed_run_trains_on_the_examples_of_an_uninterrupted_one(
    world, straight_run, tmp_path):
  """4 steps straight, or 2 steps and then 2 more resumed under two
  replicas (the number of replicas may change on resume): the same
  weights and losses. A checkpoint of before the input's position resumes
  at its step's examples."""
  training.train(cache_fixtures.training_config(
      world, tmp_path, "resumed", **{**RUN, "max_steps": 2}))
  shutil.copytree(tmp_path / "resumed", tmp_path / "older")
  _drop_position(tmp_path / "older", cache_fixtures.training_config(
      world, tmp_path, "older", **RUN))
  training.train(cache_fixtures.training_config(world, tmp_path, "resumed",
                                                **RUN, **TWO_REPLICAS))
  training.train(cache_fixtures.training_config(world, tmp_path, "older",
                                                **RUN))
  straight = cache_fixtures.final_weights(straight_run / "straight")
  for run in ("resumed", "older"):
    resumed = cache_fixtures.final_weights(tmp_path / run)
    for name, value in straight.items():
      np.testing.assert_allclose(resumed[name], value, atol=1e-5,
                                 err_msg=f"{run}: {name}")
  losses = [[m["loss"] for m in cache_fixtures.read_metrics(run_dir)]
            for run_dir in (straight_run / "straight", tmp_path / "resumed")]
  assert len(losses[0]) == 4
  np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)


def _example_rows(run_dir):
  """{(id, answer index, condition): (tokens, NLL sum)} of the grid's rows
  (each row once, or the assertion fails)."""
  rows = {}
  with open(os.path.join(run_dir, "ablation_validation_examples.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      key = (row["id"], row["answer_index"], row["condition"])
      assert key not in rows, key
      rows[key] = (row["tokens"], row["nll_sum"])
  return rows


@pytest.mark.multiworker
@pytest.mark.slow
def test_two_workers_score_exactly_the_examples_of_one(world, straight_run):
  """Issue 14, acceptance 3: with --number_eval_batches=2, two workers
  scored 179 answer tokens where one scored 359. Windows (--eval_stride)
  make an example several rows, which may go to different workers."""
  run_dir = straight_run / "straight"
  grid = dict(RUN, number_eval_batches=2, eval_stride=2, conditions=("real",))
  one = evaluation.evaluate(cache_fixtures.training_config(
      world, straight_run, "straight", **grid))
  one_rows = _example_rows(run_dir)
  command = [sys.executable, os.path.join(distributed_fixtures.REPO,
                                          "main.py"), "--task=evaluate"]
  command += cache_fixtures.training_flags(
      world, straight_run, "straight", **grid,
      distribute_mode="MultiWorkerMirroredStrategy")
  distributed_fixtures.run_workers(command)
  two = json.loads((run_dir / "ablation_validation.json").read_text())
  two_rows = _example_rows(run_dir)
  # The first 2 global batches of 4 examples, scored whole in windows: cut
  # to --max_answer_tokens=4, they would score at most 8 x 5 tokens.
  assert len(one_rows) == one["real"]["examples"] == 8
  assert one["real"]["answer_tokens"] > 8 * 5
  assert two_rows.keys() == one_rows.keys()
  for key, (tokens, nll_sum) in one_rows.items():
    assert two_rows[key][0] == tokens, key
    assert two_rows[key][1] == pytest.approx(nll_sum, rel=1e-5), key
  assert two["real"]["answer_tokens"] == one["real"]["answer_tokens"]
  assert two["real"]["answer_loss"] == pytest.approx(
      one["real"]["answer_loss"], rel=1e-5)
