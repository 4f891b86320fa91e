"""The gradient cache (issue 17, acceptance 1): the cached update equals the
full-batch update, dropout on, on one device and on two replicas."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import grad_cache
import realm_embedder
import retrieval_fixtures
import tf_utils

TOLERANCE = 1e-5
NUM_QUESTIONS = 8  # The global batch.
NUM_HARD_NEGATIVES = 1
LEARNING_RATE = 0.5


@pytest.fixture(name="module_embedder", scope="module")
def fixture_module_embedder():
  return realm_embedder.load(
      os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder"))


def _features(rng, rows, length, vocab_size):
  lengths = rng.integers(2, length + 1, rows)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return {"input_ids": rng.integers(1, vocab_size, (rows, length)).astype(
              np.int32) * mask,
          "input_mask": mask,
          "segment_ids": (np.arange(length)[None, :] >= 3).astype(
              np.int32) * mask}


def _global_batch(vocab_size):
  """Questions and their blocks (positives, then hard negatives), with seeds."""
  rng = np.random.default_rng(0)
  num_blocks = NUM_QUESTIONS * (1 + NUM_HARD_NEGATIVES)
  return {"query": (_features(rng, NUM_QUESTIONS, 7, vocab_size),
                    np.arange(NUM_QUESTIONS, dtype=np.int32) + 100),
          "block": (_features(rng, num_blocks, 11, vocab_size),
                    np.arange(num_blocks, dtype=np.int32) + 500)}


def _replica_rows(array, replica, num_replicas, num_questions_per_replica):
  """A replica's rows: its questions, or its positives then hard negatives."""
  per = num_questions_per_replica
  if array.shape[0] == per * num_replicas:
    return array[replica * per:(replica + 1) * per]
  positives = array[replica * per:(replica + 1) * per]
  negatives = array[NUM_QUESTIONS:].reshape(
      NUM_QUESTIONS, NUM_HARD_NEGATIVES, *array.shape[1:])[
          replica * per:(replica + 1) * per].reshape(-1, *array.shape[1:])
  return np.concatenate([positives, negatives])


def _replica_inputs(batch, replica, num_replicas):
  per = NUM_QUESTIONS // num_replicas
  take = lambda a: _replica_rows(a, replica, num_replicas, per)  # pylint: disable=unnecessary-lambda-assignment
  return [({name: take(value) for name, value in features.items()}, take(seeds))
          for features, seeds in (batch["query"], batch["block"])]


def _one_step(strategy, module_embedder, *, cached, query_chunk=3,
              block_chunk=5):
  """(weights after one SGD step, loss) of both towers, from the module's."""
  values = {key: v.numpy() for key, v in module_embedder.weights.items()}
  with strategy.scope():
    embedders = [realm_embedder.RealmEmbedder(
        module_embedder.architecture, values, module_embedder.vocab_file,
        module_embedder.do_lower_case) for _ in range(2)]
    optimizer = tf_keras.optimizers.SGD(LEARNING_RATE)
  towers = [grad_cache.Tower(
      lambda f, s, e=embedder: e(f["input_ids"], f["input_mask"],
                                 f["segment_ids"], s),
      tuple(embedder.trainable_variables), chunk)
            for embedder, chunk in zip(embedders, (query_chunk, block_chunk))]
  gradients_fn = (grad_cache.cached_gradients if cached
                  else grad_cache.full_batch_gradients)
  variables = [v for tower in towers for v in tower.variables]

  @tf.function
  def step(inputs):
    def replica_step(inputs):
      loss, gradients = gradients_fn(towers, inputs,
                                     grad_cache.contrastive_loss)
      optimizer.apply_gradients(zip(
          [g for tower_gradients in gradients for g in tower_gradients],
          variables))
      return loss
    return strategy.run(replica_step, args=(inputs,))

  batch = _global_batch(values["module/bert/embeddings/word_embeddings"].shape[0])
  inputs = strategy.experimental_distribute_values_from_function(
      lambda context: _replica_inputs(batch, context.replica_id_in_sync_group,
                                      strategy.num_replicas_in_sync))
  losses = strategy.experimental_local_results(step(inputs))
  return [v.numpy() for v in variables], [float(loss) for loss in losses]


def _strategy(kind):
  if kind == "one_device":
    return tf_utils.make_strategy("OneDeviceStrategy")
  return tf_utils.make_strategy("MirroredStrategy",
                                devices=["/cpu:0", "/cpu:1"])


@pytest.fixture(name="full_batch_step", scope="module")
def fixture_full_batch_step(module_embedder):
  """The reference: one device, each tower's batch encoded in one call."""
  return _one_step(_strategy("one_device"), module_embedder, cached=False)


@pytest.mark.parametrize("kind,cached", [
    ("one_device", True), ("mirrored_2_cpus", True),
    ("mirrored_2_cpus", False)])
@pytest.mark.slow
def test_update_equals_the_full_batch_update(kind, cached, module_embedder,
                                             full_batch_step):
  weights, losses = _one_step(_strategy(kind), module_embedder, cached=cached)
  want_weights, (want_loss,) = full_batch_step
  initial = [v.numpy() for v in module_embedder.trainable_variables] * 2
  # The step moved the weights: otherwise equality would prove nothing.
  assert max(np.abs(w - i).max()
             for w, i in zip(want_weights, initial)) > 1e-3
  for loss in losses:  # Every replica computes the global batch's loss.
    assert loss == pytest.approx(want_loss, abs=TOLERANCE)
  for got, want in zip(weights, want_weights):
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_dropout_is_on_and_replayed_by_seed(module_embedder):
  features, seeds = _global_batch(205)["query"]
  inputs = [features[name] for name in ("input_ids", "input_mask",
                                        "segment_ids")]
  plain = module_embedder(*inputs).numpy()
  dropped = module_embedder(*inputs, seeds).numpy()
  # About a tenth of the values are dropped, the rest scaled by 1 / 0.9.
  assert 0.02 < np.mean(dropped == 0) < 0.3
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], plain[kept] / 0.9, rtol=1e-5)
  # An example's mask is its seed's alone: the same in any chunk.
  chunk = module_embedder(*[x[3:6] for x in inputs], seeds[3:6]).numpy()
  np.testing.assert_allclose(chunk, dropped[3:6], rtol=1e-6, atol=1e-6)
  other_seeds = module_embedder(*inputs, seeds + 1).numpy()
  assert np.any((other_seeds == 0) != (dropped == 0))


def test_chunk_larger_than_the_batch_is_refused():
  with pytest.raises(Exception, match=r"--query_chunk_size=9: expected "
                     r"between 1 and the 8 examples"):
    grad_cache.check_chunk_size(9, 8, "query_chunk_size")
