"""Which cached neighbours an example sees: the approach, the seed, the draw.

One owner for training (`task_specific.make_example_fn`), evaluation and
generation (`generation_lib`): the same example, epoch and answer always
draw the same contexts, so generation sees what the run's evaluation saw and
a resumed run sees what an uninterrupted one would. Plain TensorFlow ops;
knows nothing about GPT-2 or the retriever.
"""

import enum

import numpy as np
import tensorflow as tf


class Approach(str, enum.Enum):
  """How a question gets its contexts (the value is the flag's spelling)."""
  NAKED_LM = "naked_lm"  # No contexts.
  CACHED_PRETOK = "cached_pretok"  # Drawn from its cached neighbours.
  RANDOM_CONTEXT = "random_context"  # Drawn from another question's.
  # Drawn as cached_pretok draws, from neighbours retrieved as the pipeline
  # runs (`live_retrieval`); the data configs of such a run are cached_pretok
  # ones with `live_num_neighbours`.
  LIVE_RETRIEVAL = "live_retrieval"

  def __str__(self):
    return self.value


APPROACHES = tuple(approach.value for approach in Approach)


class Condition(str, enum.Enum):
  """An evaluation's context condition (the value is `--conditions`' spelling).

  The same checkpoint and examples are scored under each; a model that reads
  its contexts does better with `real`/`top_k`/`gold` than with `none`, and
  worse with `random`/`distractor`; `shuffled` shows whether the order
  matters; `counterfactual` (a question with a passage whose facts were
  swapped, scored on the swapped answer) whether it follows what it reads.
  """
  REAL = "real"  # Drawn as the run evaluates (--eval_retrieval_temperature).
  TOP_K = "top_k"  # The k best by score, best first.
  RANDOM = "random"  # Drawn from another question's neighbours.
  NONE = "none"  # No contexts.
  SHUFFLED = "shuffled"  # `real`'s contexts in a random order.
  DISTRACTOR = "distractor"  # Ranks offset .. offset + k - 1 of the neighbours.
  GOLD = "gold"  # The question's gold passages (a contexts file).
  COUNTERFACTUAL = "counterfactual"  # Swapped-facts passages and answers.
  COUNTERFACTUAL_NONE = "counterfactual_none"  # The same answers, no context.

  def __str__(self):
    return self.value


CONDITIONS = tuple(condition.value for condition in Condition)
# What every neighbour cache supports; the others need a deeper cache
# (distractor) or a contexts file (gold, counterfactual).
DEFAULT_CONDITIONS = ("real", "top_k", "random", "none", "shuffled")
# Evaluation and generation read each split once, as epoch 0, first answer.
EVALUATION_EPOCH = 0


def example_seed(run_seed, epoch, example_id, answer_index):
  """A stateless-RNG seed from (run seed, epoch, KILT id, answer index)."""
  id_hash = tf.strings.to_hash_bucket_fast(example_id, 2**31 - 1)
  seed = tf.stack([tf.cast(run_seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(seed, id_hash),
      tf.cast(answer_index, tf.int64))


def dropout_seed(seed):
  """The example's dropout seed: independent of its draw's."""
  return tf.random.experimental.stateless_fold_in(seed, 1)


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
      tf.shape(scores), seed, minval=np.finfo(np.float32).tiny, maxval=1.0)
  gumbel = -tf.math.log(-tf.math.log(uniform))
  keys = tf.cond(temperature > 0.0,
                 lambda: scores / temperature + gumbel,
                 lambda: scores)
  return tf.math.top_k(keys, k=num_samples, sorted=True).indices


def draw(neighbour_scores, config, seed):
  """The indices of the contexts `config` (a `task_specific.DataConfig`)
  draws for one example, in the order drawn.

  The first `config.rank_offset` neighbours are skipped (distractors: ranks
  below the top); `config.shuffle_contexts` puts the drawn contexts in a
  random order; an example with fewer neighbours than `num_retrievals` (a
  contexts file) gets all it has.
  """
  offset = config.rank_offset
  eligible = tf.convert_to_tensor(neighbour_scores, tf.float32)[offset:]
  # The bank is of the best neighbours: distractors are ranked below it.
  bank_size = None if offset else (config.retrieval_bank_size or None)
  available = tf.size(eligible) if bank_size is None else bank_size
  indices = offset + sample_neighbours(
      eligible, tf.minimum(config.num_retrievals, available),
      config.retrieval_temperature, seed, bank_size=bank_size)
  if config.shuffle_contexts:
    indices = tf.gather(indices, tf.argsort(tf.random.stateless_uniform(
        tf.shape(indices), shuffle_seed(seed))))
  return indices


def shuffle_seed(seed):
  """The seed of a `shuffled` draw's order: independent of the draw's."""
  return tf.random.experimental.stateless_fold_in(seed, 2)
