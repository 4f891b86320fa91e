"""The context sampler: Gumbel-top-k is an exact Plackett-Luce draw (acceptance 4)."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

import context_draw

NUM_DRAWS = 100_000


def plackett_luce_probabilities(scores, temperature, num_samples):
  """{ordered k-tuple: probability} by enumeration: the exact law of the draw."""
  weights = np.exp(np.asarray(scores, np.float64) / temperature)
  weights /= weights.sum()
  probabilities = {}
  for draw in itertools.permutations(range(len(scores)), num_samples):
    probability, remaining = 1.0, 1.0
    for index in draw:
      probability *= weights[index] / remaining
      remaining -= weights[index]
    probabilities[draw] = probability
  return probabilities


def draw_many(scores, num_samples, temperature, bank_size=None,
              num_draws=NUM_DRAWS):
  """`num_draws` draws, one per seed (run seed 7, epoch 0, ids 0..n-1)."""

  def draw(index):
    seed = context_draw.example_seed(7, 0, tf.strings.as_string(index), 0)
    return context_draw.sample_neighbours(scores, num_samples, temperature, seed,
                                        bank_size=bank_size)

  dataset = tf.data.Dataset.range(num_draws).map(
      draw, num_parallel_calls=tf.data.AUTOTUNE).batch(10_000)
  return np.concatenate([batch.numpy() for batch in dataset])


def chi_square_p_value(observed, expected):
  """Upper tail of the chi-square law (df = categories - 1), by igammac."""
  statistic = float(np.sum((observed - expected) ** 2 / expected))
  degrees = len(observed) - 1
  return float(tf.math.igammac(degrees / 2.0, statistic / 2.0)), statistic


def check_against_plackett_luce(draws, scores, temperature, num_samples):
  probabilities = plackett_luce_probabilities(scores, temperature, num_samples)
  tuples = list(probabilities)
  counts = {draw: 0 for draw in tuples}
  for draw in map(tuple, draws.tolist()):
    counts[draw] += 1
  observed = np.array([counts[draw] for draw in tuples], np.float64)
  expected = np.array([probabilities[draw] for draw in tuples]) * len(draws)
  p_value, _ = chi_square_p_value(observed, expected)
  assert p_value > 0.01, (p_value, observed, expected)
  # The acceptance's figure: how often each neighbour is included, against
  # its exact inclusion probability (within 4 binomial standard errors).
  for neighbour in range(len(scores)):
    inclusion = sum(p for draw, p in probabilities.items() if neighbour in draw)
    frequency = np.mean(np.any(draws == neighbour, axis=1))
    standard_error = np.sqrt(inclusion * (1 - inclusion) / len(draws))
    assert abs(frequency - inclusion) < 4 * standard_error + 1e-12, (
        neighbour, frequency, inclusion)
  return p_value


def test_chi_square_p_value_is_the_chi_square_tail():
  # Known quantiles: P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 23.209) = 0.01.
  def tail(statistic, degrees):
    return float(tf.math.igammac(degrees / 2.0, statistic / 2.0))
  assert abs(tail(3.841, 1) - 0.05) < 1e-3
  assert abs(tail(23.209, 10) - 0.01) < 1e-4


SCORES = [2.0, 1.5, 1.0, 0.2, -0.5]


@pytest.fixture(scope="module")
def draws_at_0_7():
  return draw_many(SCORES, num_samples=3, temperature=0.7)


@pytest.mark.slow
def test_draws_follow_plackett_luce(draws_at_0_7):
  assert draws_at_0_7.shape == (NUM_DRAWS, 3)
  check_against_plackett_luce(draws_at_0_7, SCORES, 0.7, 3)


def test_bank_size_restricts_the_draw_to_the_best():
  scores = [1.0, 0.9, 0.3, 0.2, 5.0]
  draws = draw_many(scores, num_samples=2, temperature=1.0, bank_size=4,
                    num_draws=20_000)
  assert draws.max() < 4
  check_against_plackett_luce(draws, scores[:4], 1.0, 2)


@pytest.mark.slow
def test_a_wrong_law_is_rejected(draws_at_0_7):
  """The test has power: the draws do not fit another temperature."""
  probabilities = plackett_luce_probabilities(SCORES, 0.9, 3)
  tuples = list(probabilities)
  index = {draw: i for i, draw in enumerate(tuples)}
  observed = np.bincount([index[tuple(d)] for d in draws_at_0_7.tolist()],
                         minlength=len(tuples)).astype(np.float64)
  expected = np.array([probabilities[t] for t in tuples]) * NUM_DRAWS
  p_value, _ = chi_square_p_value(observed, expected)
  assert p_value < 1e-6


def test_zero_and_tiny_temperature_give_the_top_k():
  scores = tf.constant([0.1, 3.0, -1.0, 2.0, 2.5])
  for index in range(50):
    seed = context_draw.example_seed(1, 2, str(index), 0)
    for temperature in (0.0, 1e-4):
      drawn = context_draw.sample_neighbours(scores, 3, temperature, seed)
      assert drawn.numpy().tolist() == [1, 4, 3]


def test_same_seed_same_contexts_other_seed_other_contexts():
  scores = tf.zeros([20])

  def draw(run_seed, epoch, example_id):
    seed = context_draw.example_seed(run_seed, epoch, example_id, 0)
    return context_draw.sample_neighbours(scores, 5, 1.0, seed).numpy().tolist()

  assert draw(3, 1, "abc") == draw(3, 1, "abc")
  assert draw(3, 1, "abc") != draw(3, 2, "abc")
  assert draw(3, 1, "abc") != draw(4, 1, "abc")
  assert draw(3, 1, "abc") != draw(3, 1, "abd")
