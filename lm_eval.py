"""Language-model evaluation of plain text: sliding-window scoring, perplexity per token, word and byte.

A text longer than the model's positions is scored with a sliding window, as
Megatron-LM does it (lm-evaluation-harness's `get_rolling_token_windows`
differs only in its last window, see `windows`), with an EOS put before the
text as the first context token, as lm-evaluation-harness does, so every
token of the text is scored, each exactly once, with at most `window` tokens
of context and, once the text is longer than `window`, at least
`window - stride + 1`.
`stride` = `window` gives disjoint windows (every model position predicts a
scored token); a smaller stride gives each scored token more context at the
cost of `window / stride` times the model runs.

The figures name their normaliser, as `eval_stats.perplexities` computes
them for every report: `token_perplexity` (exp of the mean NLL per token of
the model's tokenizer), `word_perplexity` (Megatron-LM's: exp(Σ NLL /
whitespace words of the original text)) and `bits_per_byte` (Σ NLL / (ln 2 ·
UTF-8 bytes of the text)); the last two do not depend on the tokenizer, so
models with different vocabularies compare on them.
"""

import os

import numpy as np
import tensorflow as tf
import tqdm

import eval_stats
import run_dir as run_directory
import task_specific
import utils


def check_window_and_stride(window, stride):
  """A UserError unless 1 <= stride <= window."""
  if not (isinstance(window, int) and window >= 1):
    raise utils.UserError(f"--window={window}: expected an integer >= 1")
  if not (isinstance(stride, int) and 1 <= stride <= window):
    raise utils.UserError(
        f"--stride={stride}: expected an integer between 1 and --window="
        f"{window}")


def windows(num_tokens, window, stride):
  """The sliding windows that score tokens 1 .. num_tokens - 1 of a sequence.

  Token 0 has no predecessor and is only context (`score_token_ids` puts an
  EOS there). Window i is (begin, end, score_from): tokens score_from .. end - 1
  are scored, token t given the tokens begin .. t - 1, so the model reads
  tokens begin .. end - 2 (at most `window` of them). The windows are
  Megatron-LM's grid: window k reads tokens k·stride .. k·stride + window - 1
  and scores the tokens it predicts that no earlier window did (the first
  all of them; the last reads only to the end), so `stride` = `window` reads
  every token once. lm-evaluation-harness's rolling windows give every
  token the same context but in the last window, where they read a whole
  `window`. Here the first `window` tokens are scored in chunks of `stride`
  over growing prefixes (each token still sees all before it), so that no
  window scores more than `stride` tokens: the head runs on `stride`
  positions per window, and one function of fixed shapes serves them all.

  Args:
    num_tokens: tokens in the sequence, the context-only token 0 included.
    window: the most tokens the model reads at once (>= 1).
    stride: the most tokens a window scores (1 .. window); `window` gives
      disjoint windows.

  Returns:
    A list of (begin, end, score_from) int triples, in order.
  """
  check_window_and_stride(window, stride)
  result = []
  score_from = 1
  while score_from < num_tokens:
    end = min(score_from + stride, num_tokens)
    if score_from <= window:
      # The growing prefixes end at token `window`, where the grid's first
      # window ends, so that every later chunk is one window of the grid.
      begin, end = 0, min(end, window + 1)
    else:
      begin = score_from - 1 - (window - stride)
    result.append((begin, end, score_from))
    score_from = end
  return result


def score_token_ids(model, token_ids, window, stride, batch_size, *,
                    prefix_id=None, progress=False):
  """Per-token NLLs (nats) of a token sequence, by sliding windows (`windows`).

  Args:
    model: a `modeling_tf_gpt2_model_par.GPT2LMHeadModel`.
    token_ids: the sequence's ids (any length).
    window: tokens the model reads at once (<= the model's n_positions).
    stride: tokens each window scores (1 .. window).
    batch_size: windows per model call; the last batch is padded, so the
      scoring function is traced once.
    prefix_id: the context-only token put before the sequence; default the
      model's EOS (`eos_token_id`), as lm-evaluation-harness does.
    progress: show a progress bar over the windows.

  Returns:
    float32 numpy [len(token_ids)]: the NLL of each token given the tokens
    before it in its window.
  """
  if not (isinstance(batch_size, int) and batch_size >= 1):
    raise utils.UserError(f"--batch_size={batch_size}: expected an integer "
                          ">= 1")
  n_positions = model.config.n_positions
  if window > n_positions:
    raise utils.UserError(
        f"--window={window}: longer than the model's n_positions="
        f"{n_positions}, expected at most {n_positions}")
  if prefix_id is None:
    prefix_id = model.config.eos_token_id
  sequence = np.concatenate([[prefix_id], np.asarray(token_ids, np.int64)])
  vocab_size = model.config.vocab_size
  outside = sequence[(sequence < 0) | (sequence >= vocab_size)]
  if outside.size:
    raise utils.UserError(
        f"token id {int(outside[0])}: outside the model's vocabulary of "
        f"{vocab_size}, expected the tokenizer the model was trained with")
  spans = windows(len(sequence), window, stride)
  if not spans:
    return np.zeros([0], np.float32)
  # A short text needs no padding up to `window`.
  width = min(window, len(sequence) - 1)
  num_scored = min(stride, width)
  num_rows = -(-len(spans) // batch_size) * batch_size
  # Padding (after a row's tokens, or whole rows) is invisible to the real
  # tokens under the causal mask, so no attention mask is needed; unscored
  # positions score position 0 against token 0 and are dropped below.
  input_ids = np.full([num_rows, width], prefix_id, np.int32)
  score_positions = np.zeros([num_rows, num_scored], np.int32)
  targets = np.zeros([num_rows, num_scored], np.int32)
  for row, (begin, end, score_from) in enumerate(spans):
    input_ids[row, :end - 1 - begin] = sequence[begin:end - 1]
    score_positions[row, :end - score_from] = np.arange(
        score_from - 1 - begin, end - 1 - begin)
    targets[row, :end - score_from] = sequence[score_from:end]

  @tf.function(input_signature=[
      tf.TensorSpec([batch_size, width], tf.int32),
      tf.TensorSpec([batch_size, num_scored], tf.int32),
      tf.TensorSpec([batch_size, num_scored], tf.int32)])
  def token_nlls(input_ids, score_positions, targets):
    logits = model(input_ids, score_positions=score_positions)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets,
                                                          logits=logits)

  nlls = np.zeros([len(sequence) - 1], np.float32)
  with tqdm.tqdm(total=len(spans), desc="windows", unit="window",
                 disable=not progress) as bar:
    for start in range(0, num_rows, batch_size):
      rows = slice(start, start + batch_size)
      batch_nlls = token_nlls(input_ids[rows], score_positions[rows],
                              targets[rows]).numpy()
      for row, (_, end, score_from) in enumerate(spans[rows]):
        nlls[score_from - 1:end - 1] = batch_nlls[row, :end - score_from]
      bar.update(len(spans[rows]))
  return nlls


def read_text(path):
  """The UTF-8 text of a file (local or gs://); missing, empty or not UTF-8
  is a UserError."""
  if not tf.io.gfile.exists(path):
    raise utils.UserError(f"--text_path={path}: no such file, expected a "
                          "UTF-8 text file")
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as error:
    line = data[:error.start].count(b"\n") + 1
    raise utils.UserError(
        f"--text_path={path}: line {line}: not UTF-8 (byte "
        f"{data[error.start]:#04x} at offset {error.start}), expected a UTF-8 "
        "text file") from None
  if not text.strip():
    raise utils.UserError(f"--text_path={path}: holds no text, expected a "
                          "non-empty UTF-8 text file")
  return text


def evaluate_text(model, tokenizer, text, window, stride, batch_size, *,
                  progress=False):
  """LM figures of a non-empty text, each naming its normaliser (module doc).

  The text is tokenized whole, as it is (no space added, no special tokens),
  and scored by `score_token_ids` with the tokenizer's EOS before it.

  Returns:
    `eval_stats.perplexities`' {"token_perplexity", "word_perplexity",
    "bits_per_byte", "nll_sum", "tokens", "words", "bytes"}, and "windows",
    "window", "stride".
  """
  token_ids = tokenizer.backend_tokenizer.encode(
      text, add_special_tokens=False).ids
  nlls = score_token_ids(model, token_ids, window, stride, batch_size,
                         prefix_id=tokenizer.eos_token_id, progress=progress)
  figures = eval_stats.perplexities(
      [np.sum(nlls, dtype=np.float64)], [len(token_ids)],
      [eval_stats.answer_words(text)], [eval_stats.answer_bytes(text)])
  figures.update(windows=len(windows(len(token_ids) + 1, window, stride)),
                 window=window, stride=stride)
  return figures


def evaluate_file(text_path, *, window, stride, batch_size, model_key=None,
                  run_dir=None, tokenizer=None, output_path=None,
                  progress=False):
  """`evaluate_text` of a UTF-8 text file with a checkpoint (util_scripts/eval_lm.py).

  Args:
    text_path: the text file (local or gs://).
    window, stride, batch_size: as for `score_token_ids`.
    model_key: a Hugging Face GPT-2 (hub key, or a directory written by
      save_pretrained; a directory holding only a config.json is a freshly
      initialised model). Exactly one of this and `run_dir`.
    run_dir: a run directory of main.py: its latest checkpoint.
    tokenizer: a GPT2TokenizerFast key or directory; default the run's, or
      `model_key`'s.
    output_path: where to write the figures as JSON (atomically), if given.
    progress: show a progress bar over the windows.

  Returns:
    The figures of `evaluate_text`, with "text_path", "tokenizer" and the
    weights' source ("model_key", or "run_dir", "checkpoint" and "step").
  """
  check_window_and_stride(window, stride)
  utils.check_output_path(output_path, "--output_path")
  if bool(run_dir) == bool(model_key):
    raise utils.UserError(
        "give exactly one of --run_dir (a main.py run) and --model_key (a "
        "Hugging Face GPT-2)")
  text = read_text(text_path)
  if run_dir:
    config = run_directory.read_config(run_dir)
    tokenizer = tokenizer or run_directory.tokenizer_dir(run_dir, config)
    text_tokenizer = task_specific.load_tokenizer(tokenizer)
    model, checkpoint, step = run_directory.load_model(run_dir, config)
    source = {"run_dir": run_dir, "checkpoint": checkpoint, "step": step}
  else:
    tokenizer = tokenizer or model_key
    text_tokenizer = task_specific.load_tokenizer(tokenizer)
    model = task_specific.load_model(model_key)
    source = {"model_key": model_key}
  figures = evaluate_text(model, text_tokenizer, text, window, stride,
                          batch_size, progress=progress)
  figures.update(source, text_path=text_path, tokenizer=tokenizer)
  if output_path:
    if os.path.dirname(output_path):
      utils.makedirs(os.path.dirname(output_path))
    utils.atomic_write_json(output_path, figures)
  return figures
