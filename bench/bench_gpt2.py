"""Benchmarks our GPT-2 against transformers' TFGPT2LMHeadModel, in one process.

(a) Training: tokens/s of one tf.function train step (next-token loss over
    every position and the full vocabulary, Adam) for both models with the
    same config, weights, batch, sequence length and optimizer. Each side is
    timed at every setting of float32 / bfloat16 (ours: `dtype="bfloat16"`,
    float32 weights and residual stream; transformers: Keras'
    `mixed_bfloat16` policy) x XLA on / off, and compared at its best; the
    FLOP/s achieved (6 * params * tokens + attention) is put against the
    matmul peak of the precision that setting computes in, measured in this
    process (MFU).
(b) Decoding: greedy new tokens/s for the same weights and left-padded
    prompts, ours (`decoding.generate`, one XLA loop, float32 and bfloat16)
    vs transformers' TF `generate` compiled with XLA
    (`tf.function(model.generate, jit_compile=True)`, as transformers
    documents) and eager, float32 and bfloat16; float32 tokens must be the
    same on both sides, bfloat16's agreement with float32 is reported.

Calls of all settings are interleaved, each timed --train_steps / --decode_runs
times (min and median); the machine's load is printed before and after each
part and a ratio measured under load is flagged "not comparable"
(`bench_common`). Shapes: `--shape=small` (4 x 256, vocab 8,192; minutes)
or `--shape=gpt2` (gpt2-small: 12 x 768, vocab 50,257, 1,024 positions);
`--quick` is a smoke run of tiny shapes.

  python bench/bench_gpt2.py [--shape=gpt2] [--quick] [--output_path=x.json]
"""

import copy
import dataclasses
import os
import sys
import tempfile
import time
import typing

# Run as a script from the repository root or anywhere, or imported as a
# module (the tests do): the library lives one up, bench_common here.
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
sys.path[:0] = [REPO, BENCH_DIR]

# cli first: the start-up environment it sets must precede TensorFlow's import.
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
import tf_keras  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import decoding  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt2_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
import modeling_tf_gpt2_model_par as gpt2  # pylint: disable=g-import-not-at-top,wrong-import-position
import settings  # pylint: disable=g-import-not-at-top,wrong-import-position
import utils  # pylint: disable=g-import-not-at-top,wrong-import-position

setting = settings.setting

# The model of each --shape, and its positions (None: what the run needs).
SHAPES = {
    "small": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
}
SHAPE_POSITIONS = {"small": None, "gpt2": 1024}
# --quick: a smoke run of every code path in well under a minute.
QUICK = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, batch_size=2,
             seq_len=32, decode_batch=2, prompt_len=8, new_tokens=8,
             peak_size=512)
SIDES = ("ours", "transformers")


@dataclasses.dataclass(frozen=True)
class Config:
  """The bench's settings (its flags)."""
  shape: str = setting(
      "small", "small: 4 layers x 256, vocab 8,192; gpt2: gpt2-small, 12 x "
      "768, vocab 50,257, 1,024 positions.", choices=tuple(SHAPES))
  quick: bool = setting(
      False, "A smoke run of tiny shapes (2 x 64, vocab 512, batch 2 x 32, "
      "8 new tokens, 512^3 peak); overrides the size flags.")
  n_layer: typing.Optional[int] = setting(
      None, "GPT-2 layers (default: the --shape's).")
  n_embd: typing.Optional[int] = setting(
      None, "GPT-2 width (default: the --shape's).")
  n_head: typing.Optional[int] = setting(
      None, "Attention heads (default: the --shape's).")
  vocab_size: typing.Optional[int] = setting(
      None, "Vocabulary size (default: the --shape's).")
  batch_size: int = setting(8, "Training batch size (sequences).")
  seq_len: int = setting(128, "Training sequence length.")
  train_steps: int = setting(
      3, "Timed training steps per setting (after one warm-up), >= 3.")
  decode_batch: int = setting(8, "Prompts decoded together.")
  prompt_len: int = setting(
      32, "Padded prompt length (rows are left padded).")
  new_tokens: int = setting(64, "Greedy new tokens per prompt.")
  decode_runs: int = setting(
      3, "Timed generate calls per setting (after one warm-up), >= 3.")
  peak_size: int = setting(
      2048, "Side of the square matmuls that measure the peak FLOP/s.")
  output_path: typing.Optional[str] = setting(
      None, "Optional: write the results here as JSON.")


def resolve(config):
  """The config with --quick and --shape applied: every size set."""
  sizes = QUICK if config.quick else {}
  shape = {name: value for name, value in SHAPES[config.shape].items()
           if getattr(config, name) is None}
  config = dataclasses.replace(config, **{**shape, **sizes})
  for name in ("n_layer", "n_embd", "n_head", "vocab_size", "batch_size",
               "seq_len", "decode_batch", "prompt_len", "new_tokens",
               "peak_size"):
    minimum = 2 if name == "seq_len" else 1  # a next token to predict
    if getattr(config, name) < minimum:
      raise utils.UserError(
          f"--{name}={getattr(config, name)}: expected >= {minimum}")
  bench_common.check_repeats(config.train_steps, "train_steps")
  bench_common.check_repeats(config.decode_runs, "decode_runs")
  return config


def model_config(config):
  """The GPT-2 config (no dropout) of a resolved bench config."""
  needed = max(config.seq_len, config.prompt_len + config.new_tokens)
  n_positions = (None if config.quick else
                 SHAPE_POSITIONS[config.shape]) or needed
  if needed > n_positions or needed > 1024:
    raise utils.UserError(
        f"--seq_len={config.seq_len} / --prompt_len={config.prompt_len} + "
        f"--new_tokens={config.new_tokens}: the model has "
        f"{min(n_positions, 1024)} positions")
  return transformers.GPT2Config(
      n_layer=config.n_layer, n_embd=config.n_embd, n_head=config.n_head,
      vocab_size=config.vocab_size, n_positions=n_positions,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


# ---------------------------------------------------------------------------
# The models at each precision
# ---------------------------------------------------------------------------


def bfloat16_view(model):
  """Our model computing in bfloat16 over the same float32 variables.

  A shallow copy: the weights (and so one optimizer's slots) are shared, only
  the compute dtype differs.
  """
  view = copy.copy(model)
  view.compute_dtype = tf.bfloat16
  return view


def peer_models(directory):
  """{precision: TFGPT2LMHeadModel} of the checkpoint in `directory`; the
  bfloat16 one is built under Keras' mixed_bfloat16 policy (float32
  variables, bfloat16 compute), as transformers' TF models do mixed
  precision."""
  models = {"float32": transformers.TFGPT2LMHeadModel.from_pretrained(
      directory)}
  tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    models["bfloat16"] = transformers.TFGPT2LMHeadModel.from_pretrained(
        directory)
  finally:
    tf_keras.mixed_precision.set_global_policy("float32")
  return models


# ---------------------------------------------------------------------------
# (a) training
# ---------------------------------------------------------------------------


def _next_token_loss(logits, ids):
  return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=ids[:, 1:], logits=tf.cast(logits[:, :-1], tf.float32)))


def _train_step(forward, variables, optimizer, ids, jit_compile):
  """A no-argument train step: forward, next-token loss, gradients, Adam."""

  @tf.function(jit_compile=jit_compile)
  def step(ids):
    with tf.GradientTape() as tape:
      loss = _next_token_loss(forward(ids), ids)
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  return lambda: step(ids)


def _adam(variables):
  optimizer = tf_keras.optimizers.Adam(1e-4)
  optimizer.build(variables)
  return optimizer


def train_steps(ours, peers, ids):
  """{(side, precision, xla): no-argument train step}."""
  ours_optimizer = _adam(ours.trainable_variables)
  forwards = {("ours", "float32"): (ours, ours.trainable_variables,
                                    ours_optimizer),
              ("ours", "bfloat16"): (bfloat16_view(ours),
                                     ours.trainable_variables,
                                     ours_optimizer)}
  for precision, peer in peers.items():
    forwards["transformers", precision] = (
        lambda x, peer=peer: peer(x, training=False).logits,
        peer.trainable_variables, _adam(peer.trainable_variables))
  return {(side, precision, xla): _train_step(forward, variables, optimizer,
                                              ids, xla)
          for (side, precision), (forward, variables, optimizer)
          in forwards.items() for xla in (False, True)}


def train_flops(model_config_, batch, seq):
  """FLOPs of one train step: 6 * matmul params * tokens + attention."""
  c = model_config_
  params = sum(int(np.prod(shape)) for shape in
               gpt2_weights.weight_shapes(c).values())
  matmul_params = params - c.n_positions * c.n_embd
  return batch * seq * (6 * matmul_params + 12 * c.n_layer * seq * c.n_embd)


def _setting_name(side, precision, xla):
  """A table cell: side, precision, XLA."""
  return f"{side:<13}{precision:<9} XLA {'on ' if xla else 'off'}"


def _best_text(key):
  return f"{key[1]}, XLA {'on' if key[2] else 'off'}"


def best_settings(timings):
  """{side: its setting key with the lowest median time}."""
  return {side: min((key for key in timings if key[0] == side),
                    key=lambda key: timings[key].median)
          for side in SIDES}


def bench_training(config, model_config_, ours, peers, peaks):
  batch, seq = config.batch_size, config.seq_len
  ids = tf.constant(np.random.RandomState(1).randint(
      0, model_config_.vocab_size, size=(batch, seq)), tf.int32)
  tokens = batch * seq
  flops = train_flops(model_config_, batch, seq)
  print(f"\n(a) train step: batch {batch} x {seq} tokens, next-token loss on "
        f"every position, Adam; {config.train_steps} timed steps per setting, "
        "interleaved", flush=True)
  start = bench_common.snapshot()
  timings = bench_common.interleaved(train_steps(ours, peers, ids),
                                     config.train_steps)
  load = bench_common.load_since(start)
  best = best_settings(timings)
  for key, timing in timings.items():
    mfu = flops / timing.median / bench_common.best_peak(peaks, key[1])
    print(f"  {_setting_name(*key)} {tokens / timing.median:10,.0f} tokens/s "
          f"(median; min-time {tokens / timing.min:,.0f}), MFU {mfu:.0%} of "
          f"{key[1]} peak{'   <- best' if best[key[0]] == key else ''}")
  print(f"  {load.describe()}")
  result = {"timings": {" ".join(map(str, key)): list(timing.seconds)
                        for key, timing in timings.items()},
            "load": load.as_dict(), "tokens_per_step": tokens,
            "flops_per_step": flops}
  for side, key in best.items():
    result[side] = {
        "best_setting": {"precision": key[1], "xla": key[2]},
        "tokens_per_second": tokens / timings[key].median,
        "mfu": flops / timings[key].median / bench_common.best_peak(
            peaks, key[1])}
  ratio = timings[best["transformers"]].median / timings[best["ours"]].median
  min_ratio = (min(t.min for k, t in timings.items() if k[0] == "transformers")
               / min(t.min for k, t in timings.items() if k[0] == "ours"))
  result["ratio"], result["min_time_ratio"] = ratio, min_ratio
  print(f"TRAIN tokens/s, each side at its best: ours "
        f"{result['ours']['tokens_per_second']:,.0f} "
        f"({_best_text(best['ours'])}, MFU "
        f"{result['ours']['mfu']:.0%})  transformers "
        f"{result['transformers']['tokens_per_second']:,.0f} "
        f"({_best_text(best['transformers'])}, MFU "
        f"{result['transformers']['mfu']:.0%})  ratio "
        f"{bench_common.ratio_text(ratio, load)} (median), "
        f"{bench_common.ratio_text(min_ratio, load)} (min)")
  return result


# ---------------------------------------------------------------------------
# (b) greedy decoding
# ---------------------------------------------------------------------------


def prompts(batch, length, vocab_size):
  """Left-padded random prompts of random lengths in [length / 2, length]."""
  rng = np.random.RandomState(0)
  ids = rng.randint(0, vocab_size, size=(batch, length))
  lengths = rng.randint(length // 2, length + 1, size=batch)
  mask = (np.arange(length)[None] >= (length - lengths)[:, None]).astype(
      np.int32)
  return tf.constant(ids * mask, tf.int32), tf.constant(mask)


def decoders(ours, peers, prompt_ids, prompt_mask, new_tokens):
  """{(side, precision, xla): no-argument call giving the new tokens}.

  Ours always compiles one XLA loop on one device (`decoding.generate`).
  """
  decode_settings = decoding.DecodeSettings(max_new_tokens=new_tokens)
  prompt_len = prompt_ids.shape[1]
  calls = {}
  for precision, model in (("float32", ours),
                           ("bfloat16", bfloat16_view(ours))):
    calls["ours", precision, True] = (
        lambda model=model: decoding.generate(
            model, prompt_ids, decode_settings, attention_mask=prompt_mask,
            pad_token_id=0))
  for precision, peer in peers.items():
    for xla in (False, True):
      generate = (tf.function(peer.generate, jit_compile=True) if xla
                  else peer.generate)
      calls["transformers", precision, xla] = (
          lambda generate=generate: generate(
              prompt_ids, attention_mask=prompt_mask,
              max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              eos_token_id=None)[:, prompt_len:])
  return calls


def bench_decoding(config, model_config_, ours, peers):
  prompt_ids, prompt_mask = prompts(config.decode_batch, config.prompt_len,
                                    model_config_.vocab_size)
  generated = config.decode_batch * config.new_tokens
  print(f"\n(b) greedy decoding: {config.decode_batch} left-padded prompts of "
        f"{config.prompt_len} tokens, {config.new_tokens} new tokens; "
        f"{config.decode_runs} timed runs per setting, interleaved",
        flush=True)
  start = bench_common.snapshot()
  timings = bench_common.interleaved(
      decoders(ours, peers, prompt_ids, prompt_mask, config.new_tokens),
      config.decode_runs)
  load = bench_common.load_since(start)
  best = best_settings(timings)
  reference = {side: timings[side, "float32", True].output for side in SIDES}
  agreement = {" ".join(map(str, key)): float(np.mean(
      timing.output == reference[key[0]])) for key, timing in timings.items()}
  same = float(np.mean(reference["ours"] == reference["transformers"]))
  for key, timing in timings.items():
    print(f"  {_setting_name(*key)} {generated / timing.median:10,.1f} new "
          f"tokens/s (median; min-time {generated / timing.min:,.1f}); tokens "
          f"as its float32 XLA: {agreement[' '.join(map(str, key))]:.1%}"
          f"{'   <- best' if best[key[0]] == key else ''}")
  print(f"  float32 tokens identical to transformers': {same:.1%}")
  print(f"  {load.describe()}")
  ratio = timings[best["transformers"]].median / timings[best["ours"]].median
  result = {"timings": {" ".join(map(str, key)): list(timing.seconds)
                        for key, timing in timings.items()},
            "agreement_with_float32": agreement,
            "float32_tokens_identical": same, "load": load.as_dict(),
            "ratio": ratio}
  for side, key in best.items():
    result[side] = {"best_setting": {"precision": key[1], "xla": key[2]},
                    "new_tokens_per_second": generated / timings[key].median}
  print(f"DECODE new tokens/s, each side at its best: ours "
        f"{result['ours']['new_tokens_per_second']:,.1f} "
        f"({_best_text(best['ours'])})  transformers "
        f"{result['transformers']['new_tokens_per_second']:,.1f} "
        f"({_best_text(best['transformers'])})  ratio "
        f"{bench_common.ratio_text(ratio, load)} (median)")
  return result


def run(config):
  """Runs the bench; returns its results (also written to --output_path)."""
  config = resolve(config)
  model_config_ = model_config(config)
  if config.output_path:
    utils.check_output_path(config.output_path, "--output_path")
  started = bench_common.snapshot()
  print(f"{os.cpu_count()} CPU cores; load (1-min) before: "
        f"{started.load_1min:.2f}", flush=True)
  peaks = bench_common.matmul_peaks(config.peak_size)
  print(bench_common.peaks_text(peaks, config.peak_size))
  ours = gpt2.GPT2LMHeadModel.from_config(model_config_, seed=0)
  with tempfile.TemporaryDirectory() as directory:
    ours.save_pretrained(directory)
    peers = peer_models(directory)
  print(f"config: n_layer={model_config_.n_layer} n_embd="
        f"{model_config_.n_embd} n_head={model_config_.n_head} vocab="
        f"{model_config_.vocab_size} n_positions={model_config_.n_positions}"
        f", {ours.num_parameters / 1e6:.1f}M parameters", flush=True)
  results = {"config": dataclasses.asdict(config),
             "cpu_cores": os.cpu_count(),
             "matmul_peaks": peaks,
             "train": bench_training(config, model_config_, ours, peers,
                                     peaks),
             "decode": bench_decoding(config, model_config_, ours, peers)}
  load = bench_common.load_since(started)
  results["load"] = load.as_dict()
  print(f"\nwhole bench: {load.describe()}; took "
        f"{time.perf_counter() - started.wall_seconds:.0f} s")
  if config.output_path:
    bench_common.write_results(config.output_path, results)
  return results


_FLAGS = cli.define_flags(Config)


def main(argv):
  del argv
  run(_FLAGS.config())


if __name__ == "__main__":
  cli.run(main)
