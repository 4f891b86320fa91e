"""The statistics of evaluation reports: perplexity by a named normaliser, bootstrap intervals, paired tests.

Plain numpy, no TensorFlow: every report (the context-condition grid,
util_scripts/eval_lm.py, util_scripts/kilt_eval.py) computes its figures
here from per-example values, so a figure means the same wherever it is
printed.

- Perplexity from per-example sums, its normaliser named: per token
  `exp(Σ nll / Σ tokens)`; per word (Megatron-LM's) `exp(Σ nll / Σ words)`,
  words being the whitespace-split words of the original answer text
  (`answer_words`); bits per byte `Σ nll / (ln 2 · Σ bytes)`, bytes being the
  UTF-8 bytes of the answer text (`answer_bytes`). No count: None, never 1.0.
- Percentile bootstrap intervals over examples (resampling whole examples,
  seeded, vectorised): of a mean of per-example scores (ROUGE-L, F1,
  KILT-RL, grounding), of a perplexity (the (nll, count) pairs resampled and
  the ratio of sums recomputed), and of the paired difference between two
  conditions on the same examples (one resample of the examples for both).
- Paired tests of per-example differences: a sign-flip permutation test of
  their mean (two-sided, with the +1 correction, so p > 0) and an exact sign
  test. For perplexities on the same answers, test the per-example NLL sums:
  with equal token counts, Σ(nll_a − nll_b) / Σ tokens is exactly the
  difference of the two log perplexities.
"""

import dataclasses
import math

import numpy as np

# The normalisers a perplexity is reported by: name -> the per-example count.
NORMALISERS = ("token", "word", "byte")
# Resampled index arrays are built in chunks of at most this many entries,
# so a large split does not need resamples x examples integers at once.
_CHUNK_ENTRIES = 1 << 20
# p-values and intervals: differences within this (relative) tolerance of
# the observed one count as ties (sums in another order differ by round-off).
_TIE_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """How intervals and permutation tests are computed."""
  num_resamples: int = 2000
  confidence: float = 0.95
  seed: int = 0

  def check(self, where="bootstrap"):
    if self.num_resamples < 1:
      raise ValueError(f"{where}: num_resamples={self.num_resamples}, "
                       "expected >= 1")
    if not 0.0 < self.confidence < 1.0:
      raise ValueError(f"{where}: confidence={self.confidence}, expected a "
                       "fraction in (0, 1)")


DEFAULT_BOOTSTRAP = Bootstrap()


# ---------------------------------------------------------------------------
# Counts and normalisers
# ---------------------------------------------------------------------------


def answer_words(text):
  """Whitespace-split words of an answer text (Megatron-LM's word count)."""
  return len(text.split())


def answer_bytes(text):
  """UTF-8 bytes of an answer text (the bits-per-byte denominator)."""
  return len(text.encode("utf-8"))


def _ratio(nll_sums, counts, normaliser):
  """The normalised figure of summed NLL over summed counts, elementwise
  (arrays of sums over examples); NaN where a count is 0."""
  nll_sums = np.asarray(nll_sums, np.float64)
  counts = np.asarray(counts, np.float64)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    mean = np.where(counts > 0, nll_sums / np.where(counts > 0, counts, 1),
                    np.nan)
    if normaliser == "byte":
      return mean / math.log(2)
    if normaliser in ("token", "word"):
      return np.exp(mean)
  raise ValueError(f"normaliser {normaliser!r}, expected one of "
                   f"{', '.join(NORMALISERS)}")


def _as_float(value):
  value = float(value)
  return None if math.isnan(value) else value


def normalised_score(nll_sums, counts, normaliser):
  """The corpus figure of per-example NLL sums and counts: per token or per
  word a perplexity `exp(Σ nll / Σ count)`, per byte bits per byte
  `Σ nll / (ln 2 · Σ count)`; None when Σ count is 0."""
  return _as_float(_ratio(np.sum(nll_sums), np.sum(counts), normaliser))


def perplexities(nll_sums, tokens, words, num_bytes):
  """Every normalised figure of per-example sums, each labelled by its
  normaliser: {"token_perplexity", "word_perplexity", "bits_per_byte",
  "nll_sum", "tokens", "words", "bytes"}."""
  return {
      "token_perplexity": normalised_score(nll_sums, tokens, "token"),
      "word_perplexity": normalised_score(nll_sums, words, "word"),
      "bits_per_byte": normalised_score(nll_sums, num_bytes, "byte"),
      "nll_sum": float(np.sum(nll_sums)), "tokens": int(np.sum(tokens)),
      "words": int(np.sum(words)), "bytes": int(np.sum(num_bytes)),
  }


# ---------------------------------------------------------------------------
# The bootstrap
# ---------------------------------------------------------------------------


def _columns(*columns):
  arrays = [np.asarray(column, np.float64) for column in columns]
  sizes = {array.shape for array in arrays}
  if len(sizes) != 1 or len(arrays[0].shape) != 1:
    raise ValueError(f"per-example columns of shapes {sorted(sizes)}, "
                     "expected one length for all")
  return arrays


def resampled_sums(columns, config=DEFAULT_BOOTSTRAP):
  """Σ over a bootstrap resample of the examples, per column and resample.

  Args:
    columns: per-example arrays of one length n (the examples, aligned).
    config: a `Bootstrap`.

  Returns:
    float64 [len(columns), num_resamples]: each resample draws n examples
    with replacement (the same draw for every column, which keeps the
    examples' pairing) and sums each column over them.
  """
  config.check()
  arrays = _columns(*columns)
  num_examples = len(arrays[0])
  rng = np.random.default_rng(config.seed)
  sums = np.empty([len(arrays), config.num_resamples])
  if num_examples == 0:
    sums.fill(0.0)
    return sums
  chunk = max(1, _CHUNK_ENTRIES // num_examples)
  for start in range(0, config.num_resamples, chunk):
    stop = min(start + chunk, config.num_resamples)
    indices = rng.integers(0, num_examples, size=(stop - start, num_examples))
    for column, array in enumerate(arrays):
      # np.take is many times faster here than fancy indexing.
      sums[column, start:stop] = np.take(array, indices).sum(axis=-1)
  return sums


def _interval(estimate, resampled, config, num_examples):
  """{"estimate", "low", "high", ...}: percentile interval of `resampled`."""
  finite = resampled[np.isfinite(resampled)]
  tail = 100 * (1 - config.confidence) / 2
  low, high = ((None, None) if not finite.size else
               (float(np.percentile(finite, tail)),
                float(np.percentile(finite, 100 - tail))))
  return {"estimate": _as_float(estimate), "low": low, "high": high,
          "confidence": config.confidence, "num_examples": int(num_examples),
          "num_resamples": config.num_resamples, "seed": config.seed}


def mean_interval(scores, config=DEFAULT_BOOTSTRAP):
  """Bootstrap interval of the mean of per-example scores (ROUGE-L, F1, ...).

  Returns:
    {"estimate" (the mean; None without examples), "low", "high",
    "confidence", "num_examples", "num_resamples", "seed"}.
  """
  (scores,) = _columns(scores)
  count = len(scores)
  estimate = scores.mean() if count else np.nan
  resampled = (resampled_sums([scores], config)[0] / count if count
               else np.full(config.num_resamples, np.nan))
  return _interval(estimate, resampled, config, count)


def paired_mean_difference(scores_a, scores_b, config=DEFAULT_BOOTSTRAP):
  """Interval of mean(a) − mean(b) over the same examples (aligned arrays),
  with the permutation test's p-value under `p_value`."""
  scores_a, scores_b = _columns(scores_a, scores_b)
  result = mean_interval(scores_a - scores_b, config)
  result["p_value"] = permutation_p_value(scores_a - scores_b, config)
  return result


def normalised_interval(nll_sums, counts, normaliser,
                        config=DEFAULT_BOOTSTRAP):
  """Bootstrap interval of a perplexity (or bits per byte): the examples'
  (nll, count) pairs resampled and the ratio of sums recomputed."""
  nll_sums, counts = _columns(nll_sums, counts)
  sums = resampled_sums([nll_sums, counts], config)
  return _interval(_ratio(nll_sums.sum(), counts.sum(), normaliser),
                   _ratio(sums[0], sums[1], normaliser), config, len(counts))


def paired_normalised_difference(nll_a, counts_a, nll_b, counts_b, normaliser,
                                 config=DEFAULT_BOOTSTRAP):
  """Interval of figure(a) − figure(b) (perplexity or bits per byte) of two
  conditions over the same examples, one resample for both; also the ratio
  figure(a) / figure(b) with its interval under `ratio`, and the
  permutation test's p-value of the per-example NLL differences."""
  nll_a, counts_a, nll_b, counts_b = _columns(nll_a, counts_a, nll_b,
                                              counts_b)
  sums = resampled_sums([nll_a, counts_a, nll_b, counts_b], config)
  figure_a = _ratio(sums[0], sums[1], normaliser)
  figure_b = _ratio(sums[2], sums[3], normaliser)
  point_a = _ratio(nll_a.sum(), counts_a.sum(), normaliser)
  point_b = _ratio(nll_b.sum(), counts_b.sum(), normaliser)
  with np.errstate(divide="ignore", invalid="ignore"):
    result = _interval(point_a - point_b, figure_a - figure_b, config,
                       len(nll_a))
    ratio = _interval(point_a / point_b, figure_a / figure_b, config,
                      len(nll_a))
  result["ratio"] = {name: ratio[name] for name in ("estimate", "low", "high")}
  result["p_value"] = permutation_p_value(nll_a - nll_b, config)
  return result


# ---------------------------------------------------------------------------
# Paired tests
# ---------------------------------------------------------------------------


def permutation_p_value(differences, config=DEFAULT_BOOTSTRAP):
  """Two-sided sign-flip permutation test that the mean difference is 0.

  Under the null a per-example difference is as likely negative as
  positive: each resample flips the sign of each difference at random, and
  p = (1 + #{|mean of flipped| >= |observed mean|}) / (1 + resamples).
  1.0 without examples.
  """
  config.check()
  (differences,) = _columns(differences)
  count = len(differences)
  if count == 0:
    return 1.0
  observed = abs(differences.sum())
  threshold = observed - _TIE_TOLERANCE * max(
      observed, np.abs(differences).sum())
  rng = np.random.default_rng(config.seed)
  extreme = 0
  chunk = max(1, _CHUNK_ENTRIES // count)
  for start in range(0, config.num_resamples, chunk):
    size = min(chunk, config.num_resamples - start)
    signs = rng.integers(0, 2, size=(size, count)) * 2 - 1
    extreme += int(np.sum(np.abs(signs @ differences) >= threshold))
  return (1 + extreme) / (1 + config.num_resamples)


def sign_test_p_value(differences):
  """Exact two-sided sign test: among the non-zero differences, how unlikely
  so few of one sign are if each sign has probability 1/2 (1.0 if none)."""
  (differences,) = _columns(differences)
  positive = int(np.sum(differences > 0))
  negative = int(np.sum(differences < 0))
  count = positive + negative
  if count == 0:
    return 1.0
  fewer = min(positive, negative)
  tail = sum(math.comb(count, k) for k in range(fewer + 1))
  return min(1.0, 2 * tail / 2**count)


def format_interval(interval, scale=1.0, digits=2):
  """'12.34 [11.02, 13.71]' of an interval dict, values times `scale`;
  'n/a' for a missing value."""

  def shown(value):
    return "n/a" if value is None else f"{scale * value:.{digits}f}"

  return (f"{shown(interval['estimate'])} [{shown(interval['low'])}, "
          f"{shown(interval['high'])}]")
