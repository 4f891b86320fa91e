"""eval_stats: normalised perplexities by hand, bootstrap coverage and permutation-test calibration by simulation."""

import math
import time

import numpy as np
import pytest

import eval_stats

# Per-example rows as the context-condition grid writes them.
ANSWERS = ["Paris is the capital.", "Über 9000 — ja!", "one", "a  b\tc\nd"]
NLL_SUMS = [7.5, 12.0, 0.25, 9.0]
TOKENS = [6, 9, 1, 5]


def test_words_and_bytes_of_an_answer():
  assert [eval_stats.answer_words(text) for text in ANSWERS] == [4, 4, 1, 4]
  # Ü and — are 2 and 3 bytes in UTF-8.
  assert eval_stats.answer_bytes("Über 9000 — ja!") == 18


def test_normalised_perplexities_equal_their_formulas_by_hand():
  words = [eval_stats.answer_words(text) for text in ANSWERS]
  num_bytes = [eval_stats.answer_bytes(text) for text in ANSWERS]
  result = eval_stats.perplexities(NLL_SUMS, TOKENS, words, num_bytes)
  total = 7.5 + 12.0 + 0.25 + 9.0
  assert result["word_perplexity"] == pytest.approx(
      math.exp(total / (4 + 4 + 1 + 4)), rel=1e-12)
  assert result["token_perplexity"] == pytest.approx(
      math.exp(total / 21), rel=1e-12)
  assert result["bits_per_byte"] == pytest.approx(
      total / (math.log(2) * sum(num_bytes)), rel=1e-12)
  assert (result["tokens"], result["words"]) == (21, 13)
  # No count: no figure (never perplexity 1.0).
  assert eval_stats.normalised_score([0.0], [0], "word") is None
  with pytest.raises(ValueError, match="normaliser 'char'"):
    eval_stats.normalised_score([1.0], [1], "char")


def test_bootstrap_interval_of_a_mean_covers_at_the_nominal_rate():
  """400 simulated datasets of 60 skewed scores: the 95 % interval covers
  the true mean in 91-98 % of them."""
  rng = np.random.default_rng(0)
  true_mean = 0.3
  covered = 0
  config = eval_stats.Bootstrap(num_resamples=500)
  for index in range(400):
    scores = rng.beta(3, 7, size=60)  # Mean 0.3.
    interval = eval_stats.mean_interval(
        scores, eval_stats.Bootstrap(num_resamples=500, seed=index))
    assert interval["low"] <= interval["estimate"] <= interval["high"]
    covered += interval["low"] <= true_mean <= interval["high"]
  assert 0.91 <= covered / 400 <= 0.98, covered
  assert config.num_resamples == interval["num_resamples"]


def test_perplexity_interval_resamples_pairs_and_is_fast():
  rng = np.random.default_rng(1)
  tokens = rng.integers(5, 50, size=1000)
  nll = tokens * rng.gamma(4.0, 0.5, size=1000)
  start = time.perf_counter()
  interval = eval_stats.normalised_interval(nll, tokens, "token")
  elapsed = time.perf_counter() - start
  assert elapsed < 1.0, elapsed
  assert interval["estimate"] == pytest.approx(
      math.exp(nll.sum() / tokens.sum()))
  assert interval["low"] < interval["estimate"] < interval["high"]
  assert interval["num_resamples"] == 2000 and interval["num_examples"] == 1000
  # Seeded: the same interval again.
  assert eval_stats.normalised_interval(nll, tokens, "token") == interval


def test_paired_difference_of_conditions_on_the_same_examples():
  """Pairing removes the between-example spread: the paired interval of a
  small, consistent improvement excludes 0."""
  rng = np.random.default_rng(2)
  tokens = rng.integers(5, 50, size=300)
  difficulty = rng.gamma(2.0, 1.0, size=300)  # Large spread over examples.
  nll_none = tokens * difficulty
  nll_real = nll_none - tokens * 0.1 * rng.uniform(0.5, 1.5, size=300)
  result = eval_stats.paired_normalised_difference(
      nll_none, tokens, nll_real, tokens, "token")
  assert 0 < result["low"] < result["estimate"] < result["high"]
  assert result["ratio"]["low"] > 1.0
  assert result["p_value"] < 0.01
  # The unpaired intervals overlap: pairing is what shows the effect.
  none = eval_stats.normalised_interval(nll_none, tokens, "token")
  real = eval_stats.normalised_interval(nll_real, tokens, "token")
  assert real["high"] > none["low"]


def test_permutation_p_values_are_uniform_under_the_null():
  """300 null datasets (differences symmetric about 0): the p-values'
  Kolmogorov-Smirnov distance to the uniform is below its 1 % critical
  value, and about 5 % of them are below 0.05."""
  rng = np.random.default_rng(3)
  p_values = np.array([
      eval_stats.permutation_p_value(
          rng.standard_t(3, size=40),
          eval_stats.Bootstrap(num_resamples=999, seed=index))
      for index in range(300)])
  p_values.sort()
  grid = np.arange(1, 301) / 300
  distance = max(np.max(grid - p_values), np.max(p_values - (grid - 1 / 300)))
  assert distance < 1.63 / math.sqrt(300), distance
  assert 0.02 <= np.mean(p_values < 0.05) <= 0.09
  assert p_values.min() > 0  # The +1 correction.


def test_clear_effects_give_small_p_values():
  rng = np.random.default_rng(4)
  differences = rng.normal(0.5, 1.0, size=100)
  config = eval_stats.Bootstrap(num_resamples=1999)
  assert eval_stats.permutation_p_value(differences, config) == 1 / 2000
  assert eval_stats.sign_test_p_value(differences) < 0.05
  assert eval_stats.permutation_p_value(np.zeros(10), config) == 1.0
  assert eval_stats.sign_test_p_value([0.0, 0.0]) == 1.0
  # The sign test by hand: 1 negative of 6 non-zero, 2 * 7 / 64.
  assert eval_stats.sign_test_p_value([1, 2, 3, 4, 5, -1, 0]) == pytest.approx(
      2 * 7 / 64)
  mean_difference = eval_stats.paired_mean_difference(
      differences + 1.0, np.ones(100), config)
  assert mean_difference["low"] > 0 and mean_difference["p_value"] < 0.01


def test_format_and_empty_inputs():
  interval = eval_stats.mean_interval([])
  assert interval["estimate"] is None and interval["low"] is None
  assert eval_stats.format_interval(interval) == "n/a [n/a, n/a]"
  shown = eval_stats.format_interval(
      {"estimate": 0.1234, "low": 0.1, "high": 0.15}, scale=100)
  assert shown == "12.34 [10.00, 15.00]"
  with pytest.raises(ValueError, match="confidence=1.5"):
    eval_stats.mean_interval([1.0], eval_stats.Bootstrap(confidence=1.5))
