"""Benchmarks our GPT-2 against transformers' TFGPT2LMHeadModel, in one run.

(a) Training: tokens/s of one tf.function train step (next-token loss, Adam)
    for both models with the same config, batch, sequence length and
    optimizer, each with its best compile setting (XLA on and off are both
    timed); our achieved FLOP/s (6 * params * tokens + attention) as a
    fraction of the float32 matmul peak measured in the same process.
(b) Decoding: greedy new tokens/s of `generate` for the same weights and
    left-padded prompts, ours vs transformers' TF `generate` compiled with XLA
    (`tf.function(model.generate, jit_compile=True)`, as transformers
    documents), checking that both produce the same tokens.

The default size runs in a few minutes on 2 CPU cores:

  python bench/bench_gpt2.py
"""

import os
import sys
import tempfile
import time

from absl import flags
import numpy as np
import tensorflow as tf
import tf_keras
import transformers

# Run as a script from the repository root or anywhere: the modules live one up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import decoding  # pylint: disable=g-import-not-at-top,wrong-import-position
import modeling_tf_gpt2_model_par as gpt2  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_FLAG_N_LAYER = flags.DEFINE_integer("n_layer", 4, "GPT-2 layers.")
_FLAG_N_EMBD = flags.DEFINE_integer("n_embd", 256, "GPT-2 width.")
_FLAG_N_HEAD = flags.DEFINE_integer("n_head", 4, "Attention heads.")
_FLAG_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size.")
_FLAG_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8,
                                        "Training batch size (sequences).")
_FLAG_SEQ_LEN = flags.DEFINE_integer("seq_len", 128,
                                     "Training sequence length.")
_FLAG_TRAIN_STEPS = flags.DEFINE_integer(
    "train_steps", 5, "Timed training steps per model (after one warm-up).")
_FLAG_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 8,
                                          "Prompts decoded together.")
_FLAG_PROMPT_LEN = flags.DEFINE_integer(
    "prompt_len", 32, "Padded prompt length (rows are left padded).")
_FLAG_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64,
                                        "Greedy new tokens per prompt.")
_FLAG_DECODE_RUNS = flags.DEFINE_integer(
    "decode_runs", 3, "Timed generate calls per model (after one warm-up).")


def _interleaved_seconds(fns, runs):
  """Median seconds per call of each fn, after one warm-up (compile) call each.

  The calls alternate between the fns, so that load from other processes on a
  shared machine falls on all of them alike; the median is the least
  disturbed summary.
  """
  for fn in fns.values():
    fn()
  seconds = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      # Results are pulled to the host so that asynchronous work is counted.
      tf.nest.map_structure(lambda t: t.numpy(), fn())
      seconds[name].append(time.perf_counter() - start)
  return {name: float(np.median(values)) for name, values in seconds.items()}


def _matmul_peak():
  """float32 FLOP/s of a large square matmul (best of 20), the practical peak here."""
  size = 1024
  a = tf.random.normal([size, size])
  b = tf.random.normal([size, size])
  best = float("inf")
  for jit_compile in (True, False):
    matmul = tf.function(lambda: tf.matmul(a, b), jit_compile=jit_compile)
    matmul()
    for _ in range(20):
      start = time.perf_counter()
      matmul().numpy()
      best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def _next_token_loss(logits, ids):
  return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=ids[:, 1:], logits=logits[:, :-1]))


def _train_step(forward, variables, ids, jit_compile):
  """A no-argument train step: forward, next-token loss, gradients, Adam."""
  optimizer = tf_keras.optimizers.Adam(1e-4)

  @tf.function(jit_compile=jit_compile)
  def step(ids):
    with tf.GradientTape() as tape:
      loss = _next_token_loss(forward(ids), ids)
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return lambda: step(ids)


def _prompts(vocab_size):
  rng = np.random.RandomState(0)
  batch, length = _FLAG_DECODE_BATCH.value, _FLAG_PROMPT_LEN.value
  ids = rng.randint(0, vocab_size, size=(batch, length))
  lengths = rng.randint(length // 2, length + 1, size=batch)
  mask = (np.arange(length)[None] >= (length - lengths)[:, None]).astype(
      np.int32)
  return tf.constant(ids * mask, tf.int32), tf.constant(mask)


def main(argv):
  del argv
  config = transformers.GPT2Config(
      n_layer=_FLAG_N_LAYER.value, n_embd=_FLAG_N_EMBD.value,
      n_head=_FLAG_N_HEAD.value, vocab_size=_FLAG_VOCAB_SIZE.value,
      n_positions=max(_FLAG_SEQ_LEN.value,
                      _FLAG_PROMPT_LEN.value + _FLAG_NEW_TOKENS.value),
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  if config.n_positions > 1024:
    raise utils.UserError("--seq_len / --prompt_len + --new_tokens: GPT-2 "
                          "has at most 1024 positions")
  started = time.perf_counter()
  ours = gpt2.GPT2LMHeadModel.from_config(config, seed=0)
  with tempfile.TemporaryDirectory() as directory:
    ours.save_pretrained(directory)
    peer = transformers.TFGPT2LMHeadModel.from_pretrained(directory)
  print(f"config: n_layer={config.n_layer} n_embd={config.n_embd} "
        f"n_head={config.n_head} vocab={config.vocab_size}, "
        f"{ours.num_parameters / 1e6:.1f}M parameters; "
        f"{os.cpu_count()} CPU cores")

  # (a) training step
  batch, seq = _FLAG_BATCH_SIZE.value, _FLAG_SEQ_LEN.value
  ids = tf.constant(np.random.RandomState(1).randint(
      0, config.vocab_size, size=(batch, seq)), tf.int32)
  print(f"train step: batch {batch} x {seq} tokens, Adam, "
        f"{_FLAG_TRAIN_STEPS.value} timed steps")
  models = {"ours": (ours, ours.trainable_variables),
            "transformers": (lambda x: peer(x, training=False).logits,
                             peer.trainable_variables)}
  steps = {(name, jit): _train_step(forward, variables, ids, jit)
           for name, (forward, variables) in models.items()
           for jit in (True, False)}
  timings = _interleaved_seconds(steps, _FLAG_TRAIN_STEPS.value)
  for (name, jit), seconds in timings.items():
    print(f"  {name:<13} jit_compile={jit!s:<5} {seconds * 1e3:8.1f} ms/step")
  ours_step = min(timings["ours", jit] for jit in (True, False))
  peer_step = min(timings["transformers", jit] for jit in (True, False))
  tokens = batch * seq
  matmul_params = ours.num_parameters - config.n_positions * config.n_embd
  flops = tokens * (6 * matmul_params +
                    12 * config.n_layer * seq * config.n_embd)
  peak = _matmul_peak()
  print(f"  matmul peak (1024^3 float32, best of 40): {peak / 1e9:.1f} GFLOP/s")
  print(f"TRAIN tokens/s: ours {tokens / ours_step:,.0f}  transformers "
        f"{tokens / peer_step:,.0f}  ratio {peer_step / ours_step:.2f}x; "
        f"ours {flops / ours_step / 1e9:.1f} GFLOP/s = "
        f"{flops / ours_step / peak:.0%} of matmul peak")

  # (b) greedy decoding
  prompt_ids, prompt_mask = _prompts(config.vocab_size)
  new_tokens = _FLAG_NEW_TOKENS.value
  print(f"greedy decoding: {prompt_ids.shape[0]} left-padded prompts of "
        f"{prompt_ids.shape[1]} tokens, {new_tokens} new tokens, "
        f"{_FLAG_DECODE_RUNS.value} timed runs")
  peer_generate = tf.function(peer.generate, jit_compile=True)
  decode_settings = decoding.DecodeSettings(max_new_tokens=new_tokens)
  decoders = {
      "ours": lambda: decoding.generate(
          ours, prompt_ids, decode_settings, attention_mask=prompt_mask,
          pad_token_id=0),
      "transformers": lambda: peer_generate(
          prompt_ids, attention_mask=prompt_mask, max_new_tokens=new_tokens,
          do_sample=False, pad_token_id=0, eos_token_id=None),
  }
  timings = _interleaved_seconds(decoders, _FLAG_DECODE_RUNS.value)
  ours_seconds, peer_seconds = timings["ours"], timings["transformers"]
  ours_tokens = decoders["ours"]()
  peer_tokens = decoders["transformers"]()[:, prompt_ids.shape[1]:]
  same = float(np.mean(ours_tokens.numpy() == peer_tokens.numpy()))
  generated = prompt_ids.shape[0] * new_tokens
  print(f"  tokens identical to transformers': {same:.1%}")
  print(f"DECODE new tokens/s: ours {generated / ours_seconds:,.0f}  "
        f"transformers+XLA {generated / peer_seconds:,.0f}  ratio "
        f"{peer_seconds / ours_seconds:.2f}x")
  print(f"total bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  cli.run(main)
