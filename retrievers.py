"""REALM retrieval: query embedder, block store, exact and ScaNN search, context sampling.

Knows nothing about GPT-2: it maps question text to block ids, scores and text,
and chooses which cached neighbours an example sees.
"""

import tensorflow as tf


# ---------------------------------------------------------------------------
# Sampling contexts from cached neighbours
# ---------------------------------------------------------------------------


def example_seed(run_seed, epoch, example_id):
  """A stateless-RNG seed from (run seed, epoch, KILT id).

  The same example in the same epoch of the same run always draws the same
  contexts, so a resumed run sees what an uninterrupted one would.
  """
  id_hash = tf.strings.to_hash_bucket_fast(example_id, 2**31 - 1)
  seed = tf.stack([tf.cast(run_seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(seed, id_hash)


def sample_neighbours(neighbour_scores, num_samples, temperature, seed,
                      bank_size=None):
  """Indices of `num_samples` neighbours drawn without replacement.

  Gumbel-top-k: adding independent Gumbel noise to `scores / temperature` and
  keeping the k largest is an exact draw, without replacement, from the
  softmax over `scores / temperature` (the Plackett-Luce model).
  `temperature == 0` keeps the top k by score. Only the first `bank_size`
  neighbours (the best by score) are eligible when it is given.

  Args:
    neighbour_scores: float [N], one question's neighbour scores.
    num_samples: k; at most N (or bank_size).
    temperature: float scalar >= 0.
    seed: int [2], e.g. from `example_seed`.
    bank_size: optional int, restricts the draw to the first bank_size.

  Returns:
    int32 [k], indices into `neighbour_scores`, in the order drawn.
  """
  scores = tf.convert_to_tensor(neighbour_scores, tf.float32)
  if bank_size is not None:
    scores = scores[:bank_size]
  temperature = tf.convert_to_tensor(temperature, tf.float32)
  uniform = tf.random.stateless_uniform(
      tf.shape(scores), seed, minval=tf.float32.tiny, maxval=1.0)
  gumbel = -tf.math.log(-tf.math.log(uniform))
  keys = tf.cond(temperature > 0.0,
                 lambda: scores / temperature + gumbel,
                 lambda: scores)
  return tf.math.top_k(keys, k=num_samples, sorted=True).indices
