"""Decoding GPT-2: the settings, the samplers (greedy, sampling, beam search) and the compiled loop.

`DecodeSettings` is the one description of how to decode, checked once when
it is made; its fields carry their command-line names and help, from which
`generation.py` defines its flags, so a new decoding method or knob is added
here alone. `generate` runs one of the loops below over the model's
`decode_step` and fixed-shape KV cache, compiled once per model and settings;
`make_batch_generator` runs it over the replicas of a strategy.
"""

import dataclasses
import weakref

import numpy as np
import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla

import modeling_tf_gpt2_model_par as modeling
import settings
import utils

METHODS = ("greedy", "sampling", "beam")
# Score of an impossible beam; finite so that arithmetic on it stays finite.
_NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How answers are decoded; a UserError names the flag of a setting that
  does not apply to the method or is out of range."""
  method: str = settings.setting(
      "greedy", "greedy; sampling (--temperature, --top_k, --top_p, "
      "--sampling_seed); beam (--num_beams, --length_penalty).",
      flag="decoding", choices=METHODS)
  max_new_tokens: int = settings.setting(
      0, "Tokens generated per answer; 0: the layout's answer reserve "
      "(--max_answer_tokens + EOS).")
  temperature: float = settings.setting(
      1.0, "Sampling: softmax temperature (> 0).")
  top_k: int = settings.setting(
      0, "Sampling: keep the k most likely tokens; 0: off.")
  top_p: float = settings.setting(
      1.0, "Sampling: nucleus mass in (0, 1]; 1: off.")
  num_beams: int = settings.setting(
      1, "Beam search: beams (>= 2 with --decoding=beam).")
  repetition_penalty: float = settings.setting(
      1.0, "Divides positive (multiplies negative) logits of tokens already "
      "in the prompt or answer, as transformers does; 1: off.")
  length_penalty: float = settings.setting(
      1.0, "Beam search: a finished beam scores log-prob / length**this.")
  seed: int = settings.setting(
      0, "Sampling: seed (with the batch index).", flag="sampling_seed")

  def __post_init__(self):
    if self.method not in METHODS:
      raise utils.UserError(f"--decoding={self.method!r}: expected one of "
                            f"{', '.join(METHODS)}")
    sampling_only = {"temperature": self.temperature != 1.0,
                     "top_k": self.top_k != 0,
                     "top_p": self.top_p != 1.0}
    for name, is_set in sampling_only.items():
      if is_set and self.method != "sampling":
        raise utils.UserError(
            f"--{name}={getattr(self, name)} applies only to "
            f"--decoding=sampling, not --decoding={self.method}")
    if self.method == "beam":
      if self.num_beams < 2:
        raise utils.UserError(
            f"--num_beams={self.num_beams}: --decoding=beam needs >= 2")
    elif self.num_beams != 1:
      raise utils.UserError(
          f"--num_beams={self.num_beams} applies only to --decoding=beam "
          f"(beam sampling is not supported), not --decoding={self.method}")
    if self.length_penalty != 1.0 and self.method != "beam":
      raise utils.UserError(
          f"--length_penalty={self.length_penalty} applies only to "
          f"--decoding=beam, not --decoding={self.method}")
    if self.method == "sampling" and not self.temperature > 0:
      raise utils.UserError(
          f"--temperature={self.temperature}: must be > 0 (use "
          "--decoding=greedy for the argmax)")
    if self.top_k < 0:
      raise utils.UserError(f"--top_k={self.top_k}: must be >= 0 (0: off)")
    if not 0.0 < self.top_p <= 1.0:
      raise utils.UserError(f"--top_p={self.top_p}: must be in (0, 1]")
    if not self.repetition_penalty > 0:
      raise utils.UserError(
          f"--repetition_penalty={self.repetition_penalty}: must be > 0 "
          "(1: off)")
    if self.max_new_tokens < 0:
      raise utils.UserError(
          f"--max_new_tokens={self.max_new_tokens}: must be >= 0 (0: the "
          "layout's answer reserve)")


def resolve_max_new_tokens(decode_settings, layout, n_positions):
  """`decode_settings` with max_new_tokens set (0: the layout's answer
  reserve); a UserError when the answers cannot fit after the prompts."""
  max_new_tokens = (decode_settings.max_new_tokens or
                    layout.max_answer_tokens + 1)
  room = n_positions - layout.prompt_length
  if max_new_tokens > room:
    raise utils.UserError(
        f"--max_new_tokens={max_new_tokens}: prompts take up to "
        f"{layout.prompt_length} tokens (--sequence_length="
        f"{layout.sequence_length} minus the answer reserve "
        f"--max_answer_tokens={layout.max_answer_tokens} and EOS), so at most "
        f"{room} new tokens fit the model's n_positions={n_positions}; lower "
        "it, or lay prompts out with a smaller --sequence_length")
  return dataclasses.replace(decode_settings, max_new_tokens=max_new_tokens)


# ---------------------------------------------------------------------------
# Decoding a batch
# ---------------------------------------------------------------------------


# {model: {settings: compiled loop}}; weak, so that the loops of a model go
# with it.
_COMPILED_LOOPS = weakref.WeakKeyDictionary()


@tf.autograph.experimental.do_not_convert
def generate(model, input_ids, decode_settings, *, attention_mask=None,
             eos_token_id=None, pad_token_id=None, seed=None):
  """New tokens int32 [B, max_new_tokens] after left-padded prompts.

  Greedy, sampling (temperature / top_k / top_p, reproducible for a given
  seed: `seed`, else `decode_settings.seed`) or beam search (returning the
  beam with the best length-penalised log-probability, as transformers
  scores beams). The repetition penalty divides positive and multiplies
  negative logits of tokens already in the prompt or output (as in
  transformers, but padding tokens do not count). A row stops at
  `eos_token_id` and is padded with `pad_token_id` (default: eos, else 0).
  The whole loop is one XLA computation with a fixed-shape KV cache when the
  model is on one device; shapes (batch, prompt length, max_new_tokens) are
  compiled once each, so pad prompts to a few fixed lengths.

  Args:
    model: a `modeling_tf_gpt2_model_par.GPT2LMHeadModel`.
    input_ids: int [B, P], P static.
    decode_settings: a `DecodeSettings` with max_new_tokens >= 1
      (`resolve_max_new_tokens` sets it from a layout).
    attention_mask: optional [B, P], 0 for (left) padding.
    eos_token_id, pad_token_id: optional ints or int scalar tensors.
    seed: optional int or int scalar tensor (sampling only).
  """
  input_ids = tf.convert_to_tensor(input_ids, tf.int32)
  if attention_mask is None:
    attention_mask = tf.ones_like(input_ids)
  attention_mask = tf.cast(attention_mask, tf.int32)
  prompt_length = input_ids.shape[1]
  if prompt_length is None:
    raise utils.UserError("generate: the prompt length must be static (pad "
                          "prompts to a fixed length)")
  max_new_tokens = decode_settings.max_new_tokens
  if max_new_tokens < 1:
    raise utils.UserError(
        f"max_new_tokens: {max_new_tokens}; expected >= 1 "
        "(resolve_max_new_tokens sets it from the layout)")
  model.check_length(prompt_length, "input_ids (prompt)")
  model.check_length(prompt_length + max_new_tokens,
                     f"prompt + max_new_tokens={max_new_tokens}")
  if pad_token_id is None:
    pad_token_id = eos_token_id if eos_token_id is not None else 0
  if eos_token_id is None:
    eos_token_id = -1  # No token is -1: no row stops early.
  seed = decode_settings.seed if seed is None else seed
  loop = _compiled_loop(model, decode_settings)
  return loop(input_ids, attention_mask, tf.cast(tf.stack([0, seed]), tf.int64),
              tf.cast(eos_token_id, tf.int32), tf.cast(pad_token_id, tf.int32))


def _compiled_loop(model, decode_settings):
  """fn(ids, mask, seed, eos, pad): the compiled decoding loop of `model` for
  these settings (cached; the seed and special tokens are arguments, not
  part of what is compiled)."""
  key = dataclasses.replace(decode_settings, seed=0)
  loops = _COMPILED_LOOPS.setdefault(model, {})
  if key not in loops:
    search = (_beam_search if decode_settings.method == "beam"
              else _sample_or_greedy)
    one_device = model.devices is None or len(set(model.devices)) == 1
    # A weak reference: the loop must not keep its model (the cache's key)
    # alive.
    model_ref = weakref.ref(model)
    loops[key] = tf.function(
        lambda ids, mask, seed, eos, pad: search(
            model_ref(), key, eos, pad, ids, mask, seed),
        jit_compile=one_device, autograph=False)
  return loops[key]


def make_batch_generator(strategy, model, decode_settings, eos_id):
  """fn(input_ids [B, P], attention_mask [B, P], batch_index) -> int32 [B, new].

  The global batch is cut into one slice per replica, in replica order, and
  the outputs are joined in the same order, so rows keep their places
  whatever the number of replicas. Sampling draws from a seed made of
  (`decode_settings.seed`, batch index), the same on a resumed run; the seed
  is an argument of the traced function, so every method traces once.
  """
  num_replicas = strategy.num_replicas_in_sync

  def replica_generate(batch, seed):
    return generate(model, batch["input_ids"], decode_settings,
                    attention_mask=batch["attention_mask"],
                    eos_token_id=eos_id, pad_token_id=eos_id, seed=seed)

  distributed_generate = tf.function(
      lambda inputs, seed: strategy.run(replica_generate, args=(inputs, seed)),
      autograph=False)

  def generate_batch(input_ids, attention_mask, batch_index):
    per_replica = len(input_ids) // num_replicas

    def replica_inputs(context):
      start = context.replica_id_in_sync_group * per_replica
      return {"input_ids": tf.constant(input_ids[start:start + per_replica]),
              "attention_mask": tf.constant(
                  attention_mask[start:start + per_replica])}

    inputs = strategy.experimental_distribute_values_from_function(
        replica_inputs)
    seed = int(np.random.SeedSequence(
        [decode_settings.seed, batch_index]).generate_state(1)[0])
    outputs = distributed_generate(inputs, tf.constant(seed, tf.int64))
    return np.concatenate([output.numpy() for output in
                           strategy.experimental_local_results(outputs)])

  return generate_batch


# ---------------------------------------------------------------------------
# Samplers and loops (traced inside one tf.function per settings)
# ---------------------------------------------------------------------------


def apply_repetition_penalty(logits, seen, penalty):
  """transformers' rule for `seen` tokens: positive logits / penalty,
  negative ones * penalty."""
  if penalty == 1.0:
    return logits
  penalised = tf.where(logits > 0, logits / penalty, logits * penalty)
  return tf.where(seen, penalised, logits)


def filter_top_k_top_p(logits, top_k, top_p):
  """Masks logits outside the top_k and outside the top_p nucleus."""
  if top_k > 0:
    kth = tf.math.top_k(logits, k=min(top_k, logits.shape[-1])).values[:, -1:]
    logits = tf.where(logits < kth, _NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = tf.sort(logits, direction="DESCENDING", axis=-1)
    cumulative = tf.cumsum(tf.nn.softmax(sorted_logits), axis=-1,
                           exclusive=True)
    # The smallest kept logit: the last one whose preceding mass is < top_p.
    kept = tf.cast(cumulative < top_p, tf.int32)
    threshold = tf.gather(sorted_logits, tf.reduce_sum(kept, -1) - 1,
                          batch_dims=1)[:, None]
    logits = tf.where(logits < threshold, _NEG_INF, logits)
  return logits


def _static_or_dynamic_batch(input_ids):
  """The batch size, static when known (beam bookkeeping needs fixed shapes)."""
  return input_ids.shape[0] or tf.shape(input_ids)[0]


def _prefill(model, input_ids, attention_mask, total_length):
  """Runs the prompt into a fresh cache; returns (last logits, cache, key
  mask)."""
  batch_size = _static_or_dynamic_batch(input_ids)
  prompt_length = input_ids.shape[1]
  key_mask = tf.concat(
      [attention_mask,
       tf.ones([batch_size, total_length - prompt_length], tf.int32)], axis=1)
  cache = model.empty_cache(batch_size, total_length)
  positions = modeling.default_position_ids(attention_mask,
                                            tf.shape(input_ids))
  logits, cache = model.decode_step(input_ids, positions, key_mask, cache,
                                    tf.constant(0))
  return logits[:, -1], cache, key_mask


def _seen_tokens(input_ids, attention_mask, vocab_size, penalty):
  """[B, V] bool: tokens present in the (unpadded) prompt.

  Without a repetition penalty nothing is tracked ([B, 0]), so the decoding
  loop carries no per-step vocabulary-sized work.
  """
  if penalty == 1.0:
    return tf.zeros([tf.shape(input_ids)[0], 0], tf.bool)
  counts = tf.reduce_sum(
      tf.one_hot(input_ids, vocab_size) *
      tf.cast(attention_mask, tf.float32)[:, :, None], axis=1)
  return counts > 0


def _mark_seen(seen, token, vocab_size):
  if seen.shape[-1] == 0:
    return seen
  return seen | tf.cast(tf.one_hot(token, vocab_size), tf.bool)


def _sample_or_greedy(model, decode_settings, eos_token_id, pad_token_id,
                      input_ids, attention_mask, seed):
  """Greedy or sampled decoding; one while_loop over a fixed-shape cache."""
  prompt_length = input_ids.shape[1]
  batch_size = _static_or_dynamic_batch(input_ids)
  vocab_size = model.config.vocab_size
  logits, cache, key_mask = _prefill(
      model, input_ids, attention_mask,
      prompt_length + decode_settings.max_new_tokens)
  next_position = tf.reduce_sum(attention_mask, axis=1)

  def choose(step, logits, seen, output, done):
    """Picks the token of `step`; returns it with the updated state."""
    scores = apply_repetition_penalty(logits, seen,
                                       decode_settings.repetition_penalty)
    if decode_settings.method == "sampling":
      scores = filter_top_k_top_p(scores / decode_settings.temperature,
                                  decode_settings.top_k,
                                  decode_settings.top_p)
      token = tf.random.stateless_categorical(
          scores, 1, seed=tf.random.experimental.stateless_fold_in(seed, step),
          dtype=tf.int32)[:, 0]
    else:
      token = tf.argmax(scores, axis=-1, output_type=tf.int32)
    token = tf.where(done, pad_token_id, token)
    output = xla.dynamic_update_slice(output, token[:, None], [0, step])
    done = done | tf.equal(token, eos_token_id)
    return token, _mark_seen(seen, token, vocab_size), output, done

  def body(step, logits, cache, seen, output, done):
    token, seen, output, done = choose(step, logits, seen, output, done)
    logits, cache = model.decode_step(
        token[:, None], (next_position + step)[:, None], key_mask, cache,
        prompt_length + step)
    return step + 1, logits[:, -1], cache, seen, output, done

  def cond(step, unused_logits, unused_cache, unused_seen, unused_output,
           done):
    return (step < decode_settings.max_new_tokens - 1) & ~tf.reduce_all(done)

  state = (tf.constant(0), logits, cache,
           _seen_tokens(input_ids, attention_mask, vocab_size,
                        decode_settings.repetition_penalty),
           tf.fill([batch_size, decode_settings.max_new_tokens],
                   pad_token_id),
           tf.zeros([batch_size], tf.bool))
  step, logits, _, seen, output, done = tf.while_loop(cond, body, state)
  # The last token needs no forward pass; rows already done keep their padding.
  return choose(step, logits, seen, output, done)[2]


def _beam_search(model, decode_settings, eos_token_id, pad_token_id,
                 input_ids, attention_mask, unused_seed):
  """Fixed-shape beam search with separate alive and finished beams.

  Each step extends the K alive beams of every row by every token, keeps the
  2K best candidates, moves those ending in EOS to the finished set (scored
  as transformers does: sum of log-probs / generated_length**length_penalty)
  and keeps the K best others alive. At the end, alive beams join the
  finished set and the best-scoring beam of each row is returned.
  """
  beams = decode_settings.num_beams
  prompt_length = input_ids.shape[1]
  new_tokens = decode_settings.max_new_tokens
  batch_size = _static_or_dynamic_batch(input_ids)
  vocab_size = model.config.vocab_size

  flat_ids = tf.repeat(input_ids, beams, axis=0)  # [B * K, T], row-major
  flat_mask = tf.repeat(attention_mask, beams, axis=0)
  logits, cache, key_mask = _prefill(model, flat_ids, flat_mask,
                                     prompt_length + new_tokens)
  next_position = tf.reduce_sum(flat_mask, axis=1)

  def gather_beams(t, indices):  # t [B, K', ...], indices [B, K] -> [B, K, ...]
    return tf.gather(t, indices, batch_dims=1)

  def extend(step, logits, seen, beam_state):
    """One beam step; returns (the new state, flat parents, flat tokens)."""
    alive_logprob, alive_tokens, finished_tokens, finished_score = beam_state
    scores = apply_repetition_penalty(logits, seen,
                                       decode_settings.repetition_penalty)
    logprobs = tf.reshape(tf.nn.log_softmax(scores),
                          [batch_size, beams, vocab_size])
    candidates = tf.reshape(alive_logprob[:, :, None] + logprobs,
                            [batch_size, beams * vocab_size])
    top_logprob, top_index = tf.math.top_k(candidates, k=2 * beams)
    parent = top_index // vocab_size
    token = top_index % vocab_size
    candidate_tokens = xla.dynamic_update_slice(
        gather_beams(alive_tokens, parent),
        tf.reshape(token, [batch_size, 2 * beams, 1]), [0, 0, step])
    is_eos = tf.equal(token, eos_token_id)
    # Candidates ending in EOS are scored and merged with the finished set.
    length = tf.cast(step + 1, tf.float32)
    eos_score = tf.where(
        is_eos, top_logprob / length ** decode_settings.length_penalty,
        _NEG_INF)
    finished_score, keep = tf.math.top_k(
        tf.concat([finished_score, eos_score], axis=1), k=beams)
    finished_tokens = gather_beams(
        tf.concat([finished_tokens, candidate_tokens], axis=1), keep)
    # The best K candidates that did not end in EOS stay alive.
    alive_logprob, keep = tf.math.top_k(
        tf.where(is_eos, _NEG_INF, top_logprob), k=beams)
    alive_tokens = gather_beams(candidate_tokens, keep)
    flat_parent = tf.reshape(
        gather_beams(parent, keep) + beams * tf.range(batch_size)[:, None],
        [-1])
    flat_token = tf.reshape(gather_beams(token, keep), [-1])
    return ((alive_logprob, alive_tokens, finished_tokens, finished_score),
            flat_parent, flat_token)

  def body(step, logits, cache, seen, beam_state):
    beam_state, flat_parent, flat_token = extend(step, logits, seen,
                                                 beam_state)
    cache = [(tf.gather(k, flat_parent), tf.gather(v, flat_parent))
             for k, v in cache]
    seen = _mark_seen(tf.gather(seen, flat_parent), flat_token, vocab_size)
    logits, cache = model.decode_step(
        flat_token[:, None], (next_position + step)[:, None], key_mask, cache,
        prompt_length + step)
    return step + 1, logits[:, -1], cache, seen, beam_state

  def cond(step, *unused_state):
    return step < new_tokens - 1

  # Only the first of each row's K identical beams is live at the start.
  beam_state = (
      tf.tile(tf.constant([0.0] + [_NEG_INF] * (beams - 1))[None],
              [batch_size, 1]),
      tf.fill([batch_size, beams, new_tokens], pad_token_id),
      tf.fill([batch_size, beams, new_tokens], pad_token_id),
      tf.fill([batch_size, beams], _NEG_INF))
  state = (tf.constant(0), logits, cache,
           _seen_tokens(flat_ids, flat_mask, vocab_size,
                        decode_settings.repetition_penalty), beam_state)
  step, logits, _, seen, beam_state = tf.while_loop(cond, body, state)
  # The last step needs no forward pass.
  alive_logprob, alive_tokens, finished_tokens, finished_score = extend(
      step, logits, seen, beam_state)[0]
  alive_score = (alive_logprob /
                 float(new_tokens) ** decode_settings.length_penalty)
  pool_score = tf.concat([finished_score, alive_score], axis=1)
  pool_tokens = tf.concat([finished_tokens, alive_tokens], axis=1)
  best = tf.argmax(pool_score, axis=1, output_type=tf.int32)
  return tf.gather(pool_tokens, best, batch_dims=1)
