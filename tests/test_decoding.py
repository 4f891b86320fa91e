"""Decoding: the settings and their checks, greedy / sampling / beam search against transformers, decoding over replicas."""

import dataclasses
import itertools

import numpy as np
import pytest
import tensorflow as tf

from conftest import LOGICAL_CPUS
import decoding
import gpt2_fixtures
import modeling_tf_gpt2_model_par as gpt2
import settings
import task_specific
import utils

GREEDY = decoding.DecodeSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def ours():
  """Our model with the weights of `gpt2_fixtures.hf_model()`."""
  return gpt2_fixtures.shared_model()


@pytest.fixture(scope="module")
def small_model():
  """A 1-layer model: cheap to compile, for what needs no transformers peer."""
  return gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(n_layer=1),
                                          seed=6)


# -- the settings -------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    (dict(method="beam", num_beams=4, temperature=0.7),
     "--temperature=0.7 applies only to --decoding=sampling"),
    (dict(method="sampling", num_beams=4), "beam sampling is not supported"),
    (dict(method="sampling", top_p=1.5), "--top_p=1.5: must be in (0, 1]"),
    (dict(method="sampling", top_p=0.0), "--top_p=0.0: must be in (0, 1]"),
    (dict(method="sampling", temperature=0.0), "--temperature=0.0: must be > 0"),
    (dict(method="greedy", top_k=5), "--top_k=5 applies only to"),
    (dict(method="sampling", top_k=-1), "--top_k=-1: must be >= 0"),
    (dict(method="greedy", length_penalty=0.5), "--length_penalty=0.5"),
    (dict(method="beam"), "--decoding=beam needs >= 2"),
    (dict(method="beam", num_beams=2, repetition_penalty=0.0),
     "--repetition_penalty=0.0"),
    (dict(max_new_tokens=-1), "--max_new_tokens=-1"),
    (dict(method="nucleus"), "--decoding='nucleus': expected one of greedy"),
])
def test_unknown_decoding_combinations_are_refused(values, message):
  with pytest.raises(utils.UserError) as error:
    decoding.DecodeSettings(**values)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_a_changed_setting_is_checked_again():
  with pytest.raises(utils.UserError, match="--top_k=3 applies only to"):
    dataclasses.replace(GREEDY, top_k=3)


def test_fields_carry_their_flags():
  flags = {settings.flag_name(field): field
           for field in dataclasses.fields(decoding.DecodeSettings)}
  assert set(flags) == {
      "decoding", "max_new_tokens", "temperature", "top_k", "top_p",
      "num_beams", "repetition_penalty", "length_penalty", "sampling_seed"}
  assert flags["decoding"].metadata["choices"] == decoding.METHODS
  assert all(field.metadata["help"] for field in flags.values())
  assert settings.from_flat(decoding.DecodeSettings,
                            {"decoding": "beam", "num_beams": 3}, "test") == (
                                decoding.DecodeSettings(method="beam",
                                                        num_beams=3))


def test_answers_longer_than_the_model_allows_are_refused():
  layout = task_specific.Layout(sequence_length=96, max_question_tokens=16,
                                max_answer_tokens=8, max_context_tokens=24,
                                eos_id=0)
  resolved = decoding.resolve_max_new_tokens(decoding.DecodeSettings(),
                                             layout, 256)
  assert resolved.max_new_tokens == 9  # the answer reserve and its EOS
  assert decoding.resolve_max_new_tokens(
      GREEDY, layout, 256).max_new_tokens == 8
  with pytest.raises(utils.UserError, match="at most 169 new tokens"):
    decoding.resolve_max_new_tokens(
        decoding.DecodeSettings(max_new_tokens=170), layout, 256)


# -- greedy and sampling ------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_tokens(ours):
  ids, mask = gpt2_fixtures.batch()
  return decoding.generate(ours, ids, GREEDY, attention_mask=mask,
                           pad_token_id=0)


@pytest.mark.slow
def test_greedy_matches_transformers_generate(greedy_tokens):
  ids, mask = gpt2_fixtures.batch()
  hf_tokens = gpt2_fixtures.hf_model().generate(
      ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
      pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
  assert greedy_tokens.dtype == tf.int32
  np.testing.assert_array_equal(greedy_tokens, hf_tokens)
  assert len(set(greedy_tokens.numpy().ravel())) > 3  # not a degenerate model


def test_rows_stop_at_eos_and_are_padded(ours, greedy_tokens):
  ids, mask = gpt2_fixtures.batch()
  free = greedy_tokens.numpy()
  eos = int(free[0, 2])
  stopped = decoding.generate(ours, ids, GREEDY, attention_mask=mask,
                              eos_token_id=eos, pad_token_id=7).numpy()
  for row, free_row in zip(stopped, free):
    hits = np.flatnonzero(free_row == eos)
    end = hits[0] + 1 if hits.size else len(free_row)
    np.testing.assert_array_equal(row[:end], free_row[:end])
    assert (row[end:] == 7).all()
  assert (stopped[0, 3:] == 7).all()


def test_sampling_is_reproducible(small_model):
  ids, mask = gpt2_fixtures.batch()
  sampling = decoding.DecodeSettings(method="sampling", max_new_tokens=8,
                                     temperature=1.5, top_k=5, top_p=0.9,
                                     seed=11)

  def sample(**seed):
    return decoding.generate(small_model, ids, sampling, attention_mask=mask,
                             pad_token_id=0, **seed).numpy()

  first = sample()
  np.testing.assert_array_equal(first, sample(seed=11))
  assert (first != sample(seed=12)).any()


def test_filter_top_k_keeps_the_k_largest():
  logits = tf.constant([[0.1, 3.0, -1.0, 2.0]])
  kept = decoding.filter_top_k_top_p(logits, 2, 1.0).numpy()
  np.testing.assert_array_equal(kept > -1e8, [[False, True, False, True]])


def test_filter_top_p_keeps_the_smallest_nucleus():
  logits = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]]))
  kept = decoding.filter_top_k_top_p(logits, 0, 0.7).numpy()
  assert (kept[0, :2] > -1e8).all() and (kept[0, 2:] < -1e8).all()


def test_repetition_penalty_follows_transformers_rule():
  logits = tf.constant([[2.0, -2.0, 1.0]])
  seen = tf.constant([[True, True, False]])
  penalised = decoding.apply_repetition_penalty(logits, seen, 2.0)
  np.testing.assert_allclose(penalised, [[1.0, -4.0, 1.0]])


# -- beam search --------------------------------------------------------------


def _sequence_logprobs(model, prompt, continuations):
  """Log-probability of each continuation after `prompt`, in one batch."""
  ids = tf.constant([list(prompt) + list(tokens) for tokens in continuations],
                    tf.int32)
  logprobs = tf.nn.log_softmax(model(ids)).numpy()
  predicting = logprobs[:, len(prompt) - 1:-1]  # the steps that predict them
  chosen = np.take_along_axis(predicting, np.array(continuations)[:, :, None],
                              axis=-1)
  return chosen[:, :, 0].sum(-1)


@pytest.mark.slow
def test_beam_search_with_every_prefix_kept_finds_the_best_sequence():
  model = gpt2.GPT2LMHeadModel.from_config(
      gpt2_fixtures.config(n_layer=1, vocab_size=6, initializer_range=0.5),
      seed=4)
  prompt = tf.constant([[1, 2]])
  every = list(itertools.product(range(6), repeat=3))
  scores = _sequence_logprobs(model, [1, 2], every)
  # 36 beams keep every 2-token prefix, so the search is exhaustive.
  beam = decoding.generate(model, prompt, decoding.DecodeSettings(
      method="beam", num_beams=36, max_new_tokens=3))
  assert tuple(beam.numpy()[0]) == every[int(np.argmax(scores))]
  greedy = decoding.generate(model, prompt,
                             decoding.DecodeSettings(max_new_tokens=3))
  assert scores.max() > _sequence_logprobs(model, [1, 2],
                                           [greedy.numpy()[0]])[0]


@pytest.mark.slow
def test_beam_search_matches_transformers_beams(ours):
  ids, mask = gpt2_fixtures.batch()
  ours_tokens = decoding.generate(
      ours, ids, decoding.DecodeSettings(method="beam", num_beams=3,
                                         max_new_tokens=4),
      attention_mask=mask, pad_token_id=0)
  hf_tokens = gpt2_fixtures.hf_model().generate(
      ids, attention_mask=mask, max_new_tokens=4, num_beams=3,
      do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
  np.testing.assert_array_equal(ours_tokens, hf_tokens)


# -- over replicas, and bad inputs --------------------------------------------


@pytest.mark.slow
def test_two_replicas_decode_what_one_does():
  """make_batch_generator as generation.py runs it: each replica its rows."""
  strategy = tf.distribute.MirroredStrategy(LOGICAL_CPUS[:2])
  with strategy.scope():
    mirrored = gpt2.GPT2LMHeadModel.from_config(
        gpt2_fixtures.config(n_layer=1), seed=6)
  ids = np.random.RandomState(3).randint(
      0, gpt2_fixtures.VOCAB, size=(4, 5)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  greedy = decoding.DecodeSettings(max_new_tokens=4)
  two = decoding.make_batch_generator(strategy, mirrored, greedy, eos_id=0)
  np.testing.assert_array_equal(
      two(ids, mask, 0),
      decoding.generate(mirrored, ids, greedy, attention_mask=mask,
                        eos_token_id=0))


def test_batches_sample_from_the_seed_and_their_index(small_model):
  sampling = decoding.DecodeSettings(method="sampling", max_new_tokens=8,
                                     temperature=1.5, top_k=5, top_p=0.9,
                                     seed=11)
  sample = decoding.make_batch_generator(tf.distribute.get_strategy(),
                                         small_model, sampling, eos_id=0)
  ids, mask = (tensor.numpy() for tensor in gpt2_fixtures.batch())
  np.testing.assert_array_equal(sample(ids, mask, 1), sample(ids, mask, 1))
  assert (sample(ids, mask, 1) != sample(ids, mask, 2)).any()


def test_prompts_that_do_not_fit_are_refused(small_model):
  with pytest.raises(utils.UserError, match="longer than the model's n_positions=32"):
    decoding.generate(small_model, tf.zeros([1, 33], tf.int32),
                      decoding.DecodeSettings(max_new_tokens=1))
  with pytest.raises(utils.UserError, match="max_new_tokens=10"):
    decoding.generate(small_model, tf.zeros([1, 30], tf.int32),
                      decoding.DecodeSettings(max_new_tokens=10))
  with pytest.raises(utils.UserError, match="max_new_tokens: 0; expected >= 1"):
    decoding.generate(small_model, tf.zeros([1, 3], tf.int32),
                      decoding.DecodeSettings())
