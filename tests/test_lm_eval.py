"""Sliding-window scoring (lm_eval.py, util_scripts/eval_lm.py) and long answers (task_specific.lay_out_answer_windows).

The reference is brute force: every token scored by a model run on exactly
its context, on a model whose n_positions holds the whole sequence.
"""

import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cache_fixtures
import gpt2_fixtures
import lm_eval
import modeling_tf_gpt2_model_par as gpt2
import run_dir
import task_specific
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG_POSITIONS = 96
EOS = gpt2_fixtures.VOCAB - 1


@pytest.fixture(scope="module")
def long_model():
  """A tiny GPT-2 that holds every test sequence whole."""
  return gpt2.GPT2LMHeadModel.from_config(
      gpt2_fixtures.config(n_positions=LONG_POSITIONS), seed=3)


@functools.cache
def last_logits_fn(model):
  """Logits at the last position of one unpadded row, traced once for any
  length."""
  return tf.function(lambda ids: model(ids)[0, -1],
                     input_signature=[tf.TensorSpec([1, None], tf.int32)])


def next_token_nll(model, context, target):
  """NLL of `target` after exactly `context` (no padding, no window)."""
  logits = last_logits_fn(model)(tf.constant([context], tf.int32))
  return float(-tf.nn.log_softmax(logits)[target])


def full_context_nlls(model, sequence):
  """NLL of each token of `sequence` after all the tokens before it."""
  logits = model(tf.constant([sequence[:-1]], tf.int32))[0]
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.constant(sequence[1:], tf.int32), logits=logits).numpy()


# ---------------------------------------------------------------------------
# The windows


def test_windows_score_every_token_once_with_bounded_context():
  for num_tokens in range(0, 40):
    for window in range(1, 13):
      for stride in range(1, window + 1):
        spans = lm_eval.windows(num_tokens, window, stride)
        scored = [t for _, end, score_from in spans
                  for t in range(score_from, end)]
        assert scored == list(range(1, num_tokens)), (num_tokens, window,
                                                      stride)
        for begin, end, score_from in spans:
          assert 0 <= begin < score_from < end <= num_tokens
          assert end - score_from <= stride
          assert end - 1 - begin <= window  # tokens the model reads
          for t in range(score_from, end):
            context = t - begin
            assert context <= window
            assert context >= min(t, window - stride + 1)


def test_stride_equal_to_window_gives_disjoint_windows():
  for num_tokens in (2, 9, 10, 11, 33):
    for window in (1, 3, 5, 10):
      spans = lm_eval.windows(num_tokens, window, window)
      read = [t for begin, end, _ in spans for t in range(begin, end - 1)]
      # Each token is read by one window only, and every token but the
      # last (which predicts nothing) is read.
      assert read == list(range(num_tokens - 1))
      assert all(end - 1 - begin == window for begin, end, _ in spans[:-1])


@pytest.mark.parametrize("window, stride, fragment", [
    (4, 5, "--stride=5: expected an integer between 1 and --window=4"),
    (4, 0, "--stride=0: expected an integer between 1 and --window=4"),
    (4, -2, "--stride=-2:"),
    (0, 1, "--window=0: expected an integer >= 1"),
])
def test_bad_window_or_stride_is_one_line(window, stride, fragment):
  with pytest.raises(utils.UserError, match=fragment) as error:
    lm_eval.windows(10, window, stride)
  assert "\n" not in str(error.value)


def test_window_beyond_the_model_is_one_line(long_model):
  with pytest.raises(utils.UserError, match=(
      f"--window=97: longer than the model's n_positions={LONG_POSITIONS}")):
    lm_eval.score_token_ids(long_model, [1, 2, 3], 97, 8, 2)


# ---------------------------------------------------------------------------
# Sliding-window NLLs


@pytest.mark.parametrize("window, stride, batch_size", [
    (8, 3, 4), (8, 8, 3), (5, 1, 16), (12, 5, 2)])
def test_sliding_window_nlls_equal_brute_force(long_model, window, stride,
                                               batch_size):
  token_ids = np.random.default_rng(window + stride).integers(
      0, EOS, 37).tolist()
  nlls = lm_eval.score_token_ids(long_model, token_ids, window, stride,
                                 batch_size)
  sequence = [EOS] + token_ids
  expected = [next_token_nll(long_model, sequence[begin:t], sequence[t])
              for begin, end, score_from in lm_eval.windows(
                  len(sequence), window, stride)
              for t in range(score_from, end)]
  assert nlls.shape == (len(token_ids),)
  np.testing.assert_allclose(nlls, expected, atol=1e-4)


@pytest.mark.parametrize("stride", [7, 64])
def test_window_holding_the_sequence_is_full_context_scoring(long_model,
                                                             stride):
  token_ids = np.random.default_rng(1).integers(0, EOS, 50).tolist()
  nlls = lm_eval.score_token_ids(long_model, token_ids, 64, stride, 3)
  np.testing.assert_allclose(
      nlls, full_context_nlls(long_model, [EOS] + token_ids), atol=1e-4)


# ---------------------------------------------------------------------------
# Long answers in the layout

LAYOUT = task_specific.Layout(
    sequence_length=24, max_question_tokens=4, max_answer_tokens=6,
    max_context_tokens=5, eos_id=EOS, question_helper=(1, 2),
    context_helper=(3,), answer_helper=(4, 5))


def example(rng, answer_length):
  question = tf.constant(rng.integers(6, EOS, 5), tf.int32)
  contexts = tf.ragged.constant(
      [rng.integers(6, EOS, 4).tolist(), rng.integers(6, EOS, 7).tolist()],
      dtype=tf.int32)
  answer = tf.constant(rng.integers(6, EOS, answer_length), tf.int32)
  return question, contexts, answer


def window_features(answer_length, stride, seed=0):
  question, contexts, answer = example(np.random.default_rng(seed),
                                       answer_length)
  windows = task_specific.lay_out_answer_windows(question, contexts, answer,
                                                 LAYOUT, stride)
  prompt = task_specific.prompt_ids(question, contexts, LAYOUT).numpy()
  return ({name: tensor.numpy() for name, tensor in windows.items()},
          prompt, answer.numpy(), (question, contexts, answer))


@pytest.mark.parametrize("answer_length", [0, 1, 5, 6])
def test_an_answer_that_fits_is_lay_out_example(answer_length):
  windows, _, _, (question, contexts, answer) = window_features(
      answer_length, stride=2)
  expected = task_specific.lay_out_example(question, contexts, answer, LAYOUT)
  assert windows["input_ids"].shape == (1, LAYOUT.sequence_length)
  for name, tensor in expected.items():
    np.testing.assert_array_equal(windows[name][0], tensor.numpy(), name)


@pytest.mark.parametrize("answer_length, stride", [
    (7, 1), (7, 6), (13, 2), (13, 4), (20, 3), (20, 6)])
def test_long_answer_windows_label_every_token_once(answer_length, stride):
  windows, prompt, answer, (question, contexts, _) = window_features(
      answer_length, stride)
  labels = windows["label_mask"].astype(bool)
  # Every answer token and the EOS, once each, in order.
  np.testing.assert_array_equal(windows["input_ids"][labels],
                                np.append(answer, EOS))
  cut = task_specific.lay_out_example(question, contexts,
                                      tf.constant(answer), LAYOUT)
  for name, tensor in cut.items():
    np.testing.assert_array_equal(windows[name][0], tensor.numpy(), name)
  for row in range(len(labels)):
    length = int(windows["attention_mask"][row].sum())
    np.testing.assert_array_equal(windows["input_ids"][row, :len(prompt)],
                                  prompt)
    assert not windows["attention_mask"][row, length:].any()
    assert (windows["input_ids"][row, length:] == EOS).all()
    assert length - len(prompt) <= LAYOUT.max_labels
    if row:
      num_labels = int(labels[row].sum())
      assert 1 <= num_labels <= stride
      context = length - len(prompt) - num_labels
      # A window labelling `stride` tokens keeps max_answer_tokens - stride
      # of context; the last one (with the EOS) keeps at least that.
      if row < len(labels) - 1:
        assert context == LAYOUT.max_answer_tokens - stride
      else:
        assert context >= LAYOUT.max_answer_tokens - stride


def test_long_answer_nlls_equal_brute_force(long_model):
  windows, prompt, answer, _ = window_features(17, stride=2, seed=4)
  logits = long_model(tf.constant(windows["input_ids"]),
                      attention_mask=tf.constant(windows["attention_mask"]))
  losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.constant(windows["input_ids"][:, 1:]),
      logits=logits[:, :-1]).numpy()
  windowed = losses[windows["label_mask"][:, 1:].astype(bool)]
  expected = []
  for row in range(len(windows["input_ids"])):
    ids = windows["input_ids"][row].tolist()
    for position in np.flatnonzero(windows["label_mask"][row]):
      expected.append(next_token_nll(long_model, ids[:position],
                                     ids[position]))
  np.testing.assert_allclose(windowed, expected, atol=1e-4)
  # The first window keeps the whole prefix: full-context scoring of the
  # uncut answer, on a model that holds it all.
  full = full_context_nlls(long_model, prompt.tolist() + answer.tolist() +
                           [EOS])[len(prompt) - 1:]
  first = int(windows["label_mask"][0].sum())
  np.testing.assert_allclose(windowed[:first], full[:first], atol=1e-4)


def test_answer_stride_out_of_range_is_one_line():
  question, contexts, answer = example(np.random.default_rng(0), 9)
  for stride in (0, LAYOUT.max_answer_tokens + 1):
    with pytest.raises(utils.UserError, match=(
        f"--eval_stride={stride}: expected an integer between 1 and "
        f"--max_answer_tokens={LAYOUT.max_answer_tokens}")):
      task_specific.lay_out_answer_windows(question, contexts, answer, LAYOUT,
                                           stride)


def test_answer_windows_in_a_dataset_flat_map():
  rng = np.random.default_rng(2)
  first, second = (tf.data.Dataset.from_tensors(example(rng, length))
                   for length in (3, 15))
  rows = list(first.concatenate(second).flat_map(
      lambda question, contexts, answer: tf.data.Dataset.from_tensor_slices(
          task_specific.lay_out_answer_windows(question, contexts, answer,
                                               LAYOUT, 3))))
  # 3 tokens fit: one window; 15 + EOS: 6 first, then 3, 3, 3 and 1.
  assert len(rows) == 1 + 5
  assert all(row["input_ids"].shape == (LAYOUT.sequence_length,)
             for row in rows)


# ---------------------------------------------------------------------------
# util_scripts/eval_lm.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny GPT-2 and its tokenizer, as a save_pretrained directory and as
  a run directory of the same weights."""
  root = tmp_path_factory.mktemp("eval_lm")
  model_dir = str(root / "model")
  tokenizer = cache_fixtures.write_tokenizer(model_dir, vocab_size=300)
  model = gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(
      vocab_size=300, n_positions=32, eos_token_id=tokenizer.eos_token_id,
      bos_token_id=tokenizer.eos_token_id), seed=5)
  model.save_pretrained(model_dir)
  run = str(root / "run")
  os.makedirs(run)
  tokenizer.save_pretrained(os.path.join(run, run_dir.TOKENIZER_DIR))
  run_dir.write_config(run, {"flags": {}, "model_config": model.config.to_dict(),
                             "tokenizer": run_dir.TOKENIZER_DIR})
  tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                             run_dir.checkpoint_dir(run), 1).save(
                                 checkpoint_number=7)
  text_path = str(root / "text.txt")
  text = "\n".join(cache_fixtures.fixture_text(num_lines=12, seed=3))
  with open(text_path, "w", encoding="utf-8") as f:
    f.write(text + "\n  Straße café\n")
  return {"model_dir": model_dir, "run": run, "text_path": text_path,
          "model": model, "tokenizer": tokenizer, "root": root}


@pytest.mark.slow
def test_eval_lm_writes_the_three_figures(checkpoint):
  output_path = str(checkpoint["root"] / "out" / "lm_eval.json")
  figures = lm_eval.evaluate_file(
      checkpoint["text_path"], window=16, stride=8, batch_size=4,
      model_key=checkpoint["model_dir"], output_path=output_path)
  with open(output_path, encoding="utf-8") as f:
    assert json.load(f) == figures
  with open(checkpoint["text_path"], encoding="utf-8") as f:
    text = f.read()
  token_ids = checkpoint["tokenizer"].backend_tokenizer.encode(
      text, add_special_tokens=False).ids
  nll_sum = float(np.sum(lm_eval.score_token_ids(
      checkpoint["model"], token_ids, 16, 8, 4), dtype=np.float64))
  assert figures["tokens"] == len(token_ids) > 16
  assert figures["words"] == 12 * 12 + 2
  assert figures["bytes"] == len(text.encode("utf-8"))
  assert figures["nll_sum"] == pytest.approx(nll_sum, rel=1e-6)
  assert figures["token_perplexity"] == pytest.approx(
      np.exp(nll_sum / len(token_ids)), rel=1e-6)
  assert figures["word_perplexity"] == pytest.approx(
      np.exp(nll_sum / figures["words"]), rel=1e-6)
  assert figures["bits_per_byte"] == pytest.approx(
      nll_sum / (np.log(2) * figures["bytes"]), rel=1e-6)
  assert (figures["window"], figures["stride"]) == (16, 8)
  assert figures["windows"] == len(lm_eval.windows(len(token_ids) + 1, 16, 8))
  # A run directory of the same weights gives the same figures.
  from_run = lm_eval.evaluate_file(checkpoint["text_path"], window=16,
                                   stride=8, batch_size=4,
                                   run_dir=checkpoint["run"])
  assert from_run["step"] == 7
  assert from_run["nll_sum"] == pytest.approx(nll_sum, rel=1e-5)


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file, expected a UTF-8 text file"),
    (b" \n\t\n", "holds no text, expected a non-empty UTF-8 text file"),
    (b"fine\nbad \xff byte\n", "line 2: not UTF-8 (byte 0xff at offset 9)"),
])
def test_bad_text_file_is_one_line(checkpoint, tmp_path, content, fragment):
  text_path = str(tmp_path / "text.txt")
  if content is not None:
    with open(text_path, "wb") as f:
      f.write(content)
  with pytest.raises(utils.UserError, match=re.escape(fragment)) as error:
    lm_eval.evaluate_file(text_path, window=16, stride=8, batch_size=4,
                          model_key=checkpoint["model_dir"])
  assert str(error.value).startswith(f"--text_path={text_path}: ")
  assert "\n" not in str(error.value)


def test_eval_lm_refuses_a_window_beyond_the_model(checkpoint):
  with pytest.raises(utils.UserError, match=(
      "--window=33: longer than the model's n_positions=32")):
    lm_eval.evaluate_file(checkpoint["text_path"], window=33, stride=8,
                          batch_size=4, model_key=checkpoint["model_dir"])


@pytest.mark.slow  # a TensorFlow start-up: 10-30 s on a shared machine
def test_eval_lm_command_line(checkpoint, tmp_path):
  """The script prints the figures and writes them (a stride beyond the
  window is refused in one line before any work: the tests above)."""
  output_path = str(tmp_path / "lm_eval.json")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "util_scripts", "eval_lm.py"),
       f"--model_key={checkpoint['model_dir']}",
       f"--text_path={checkpoint['text_path']}", "--window=16", "--stride=8",
       f"--output_path={output_path}"],
      capture_output=True, text=True, timeout=300, check=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  with open(output_path, encoding="utf-8") as f:
    figures = json.load(f)
  assert result.stdout.splitlines() == [
      f"{figures['windows']} windows of 16 tokens, stride 8",
      f"token_perplexity {figures['token_perplexity']:.4f} "
      f"({figures['tokens']} tokens)",
      f"word_perplexity {figures['word_perplexity']:.4f} "
      f"({figures['words']} words)",
      f"bits_per_byte {figures['bits_per_byte']:.4f} ({figures['bytes']} "
      "bytes)"]
