"""KILT ELI5 for a causal LM: tokenizer, sequence layout and loss mask, input pipeline, model and loss.

One example is laid out as

  Question: {q} Context: {c1} Context: {c2} ... Answer: {a}<|endoftext|>

(helper words optional; one `Context:` before each context or one before all),
right-padded to a fixed length so every batch has the same shape (XLA, TPU).
The labels are the answer tokens and, when the answer was not cut, the final
EOS: an answer cut at `max_answer_tokens` ends without EOS, so the model is
never taught to stop mid-sentence. The loss is summed over the labels and
divided by their number in the GLOBAL batch (`tf_utils.make_train_step`).

Budget, in tokens, for a sequence of `sequence_length`: the question is cut to
`max_question_tokens`; `max_answer_tokens` + 1 (EOS) are reserved for the
answer whatever its length (so the prompt of an example does not depend on its
answer, as at generation time); each context is cut to `max_context_tokens`;
the contexts, in the order drawn, fill what is left, the last one possibly cut.

Contexts are drawn per example from the cached neighbours by
`context_draw.sample_neighbours` with a seed from (run seed, epoch, example id,
answer index), so a resumed run sees the contexts an uninterrupted one would.
Knows nothing about strategies: the pipeline takes a `tf.distribute.InputContext`.
"""

import dataclasses
import os

import tensorflow as tf
import transformers

import context_draw
import gpt2_weights
import live_retrieval
import modeling_tf_gpt2_model_par
import neighbour_cache
import settings
import utils

CONTEXT_HELPER_MODES = ("each", "once")
QUESTION_HELPER = "Question:"
CONTEXT_HELPER = " Context:"
ANSWER_HELPER = " Answer:"
# Files read at once when interleaving shards; fixed (not AUTOTUNE) because
# the order of the records depends on it, and runs must be reproducible.
_INTERLEAVE_CYCLE = 4
# Epoch e of a run seeded s shuffles with seed s * this + e.
_EPOCH_SEED_STRIDE = 1_000_003


# ---------------------------------------------------------------------------
# Tokenizer and layout
# ---------------------------------------------------------------------------


def load_tokenizer(key_or_dir, flag="--tokenizer"):
  """The GPT-2 tokenizer at a hub key or in a local directory (`flag`: what
  named it, for the message; a hub key offline is refused at once)."""
  gpt2_weights.check_hub_name(key_or_dir, flag,
                              gpt2_weights.TOKENIZER_VOCAB_NAME)
  try:
    return transformers.GPT2TokenizerFast.from_pretrained(key_or_dir)
  except (OSError, ValueError) as error:
    raise utils.UserError(
        f"tokenizer {key_or_dir!r}: cannot be loaded as a GPT2TokenizerFast "
        f"({utils.error_reason(error)})") from None


def text_token_ids(tokenizer, texts):
  """GPT-2 ids of " " + each text (no special tokens, no length limit).

  The leading space makes the ids those the text has inside the laid-out
  sequence `Question: {q} Context: {c} Answer: {a}`: GPT-2's pre-tokenizer
  attaches a space to the word after it, so `Question:` + ids(" " + q)
  tokenizes exactly like the joined text. The cacher stores questions,
  answers and blocks this way; the length notebooks count them this way.
  """
  if not texts:
    return []
  return [encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch(
      [" " + text for text in texts], add_special_tokens=False)]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one example becomes a fixed-length sequence (see the module doc)."""
  sequence_length: int
  max_question_tokens: int
  max_answer_tokens: int
  max_context_tokens: int
  eos_id: int
  question_helper: tuple = ()
  context_helper: tuple = ()
  answer_helper: tuple = ()
  context_helper_mode: str = "each"

  @property
  def max_labels(self):
    """The most labelled tokens of a sequence: the answer and its EOS."""
    return self.max_answer_tokens + 1

  @property
  def prompt_length(self):
    """The longest prompt: the sequence minus the answer reserve and its EOS."""
    return self.sequence_length - self.max_answer_tokens - 1

  @property
  def fixed_tokens(self):
    """Tokens of the longest question, the answer reserve and their helpers."""
    return (len(self.question_helper) + self.max_question_tokens +
            len(self.answer_helper) + self.max_answer_tokens + 1)


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """The layout's settings, as a run records them; `make_layout` checks them."""
  sequence_length: int = settings.setting(
      0, "Tokens per example; 0: the model's n_positions.")
  max_question_tokens: int = settings.setting(
      64, "The question is cut to this many tokens.")
  max_answer_tokens: int = settings.setting(
      350, "Tokens reserved for the answer (cut to this), before the EOS that "
      "ends a whole answer (a cut one gets none).")
  max_context_tokens: int = settings.setting(
      288, "Each context is cut to this many tokens.")
  use_helper_words: bool = settings.setting(
      True, "Lay out 'Question:', 'Context:', 'Answer:'.")
  context_helper_mode: str = settings.setting(
      "each", "One 'Context:' before each context, or once before all of "
      "them.", choices=CONTEXT_HELPER_MODES)


def make_layout(tokenizer, config, n_positions):
  """The checked `Layout` of a `LayoutConfig` for a model of `n_positions`;
  the budget must leave room for the fixed parts."""
  if config.context_helper_mode not in CONTEXT_HELPER_MODES:
    raise utils.UserError(
        f"--context_helper_mode={config.context_helper_mode!r}: expected one "
        f"of {', '.join(CONTEXT_HELPER_MODES)}")
  for name in ("sequence_length", "max_question_tokens", "max_answer_tokens",
               "max_context_tokens"):
    value = getattr(config, name)
    minimum = 0 if name == "sequence_length" else 1
    if not (isinstance(value, int) and value >= minimum):
      raise utils.UserError(f"--{name}={value}: must be >= {minimum}")
  sequence_length = config.sequence_length or n_positions
  if sequence_length > n_positions:
    raise utils.UserError(
        f"--sequence_length={sequence_length} exceeds the model's "
        f"n_positions={n_positions}")

  def ids(text):
    return tuple(tokenizer.encode(text)) if config.use_helper_words else ()

  layout = Layout(
      sequence_length=sequence_length,
      max_question_tokens=config.max_question_tokens,
      max_answer_tokens=config.max_answer_tokens,
      max_context_tokens=config.max_context_tokens,
      eos_id=tokenizer.eos_token_id,
      question_helper=ids(QUESTION_HELPER),
      context_helper=ids(CONTEXT_HELPER),
      answer_helper=ids(ANSWER_HELPER),
      context_helper_mode=config.context_helper_mode)
  if layout.fixed_tokens > sequence_length:
    raise utils.UserError(
        f"budget: --max_question_tokens={config.max_question_tokens} + "
        f"--max_answer_tokens={config.max_answer_tokens} + EOS + helper words "
        f"({layout.fixed_tokens} tokens) exceed the sequence length "
        f"{sequence_length}")
  return layout


def fit_contexts(contexts, budget, layout):
  """The contexts, each cut to `max_context_tokens`, that fit in `budget`.

  Args:
    contexts: int32 ragged [k, None], the GPT-2 ids of the contexts, in the
      order drawn.
    budget: int32 scalar, tokens available for contexts and their helpers.
    layout: a `Layout`.

  Returns:
    (ids, kept): int32 [n] the helper words and context ids that fit, and
    int64 [k] how many tokens of each context's slot (helper + ids) were kept.
    A slot is dropped when only its helper words would fit.
  """
  contexts = contexts[:, :layout.max_context_tokens]
  num_contexts = contexts.nrows(out_type=tf.int32)
  helper = tf.constant(layout.context_helper, tf.int32, [len(
      layout.context_helper)])
  if layout.context_helper_mode == "each":
    helpers_before = tf.ones([num_contexts], tf.int32)
  else:
    helpers_before = tf.one_hot(0, num_contexts, dtype=tf.int32)
  helpers = tf.RaggedTensor.from_row_lengths(
      tf.tile(helper, [tf.reduce_sum(helpers_before)]),
      tf.cast(helpers_before * tf.size(helper), tf.int64))
  slots = tf.concat([helpers, tf.cast(contexts, tf.int32)], axis=1)
  lengths = slots.row_lengths()
  starts = tf.cumsum(lengths, exclusive=True)
  kept = tf.clip_by_value(tf.cast(budget, tf.int64) - starts, 0, lengths)
  kept = tf.where(kept > helpers.row_lengths(), kept, 0)
  dense = slots.to_tensor()
  ids = tf.boolean_mask(dense, tf.sequence_mask(kept, tf.shape(dense)[1]))
  return ids, kept


def prompt_and_kept(question_ids, contexts, layout):
  """The prompt and how much of each context it holds.

  Returns:
    (ids, kept): int32 [n], `Question: q Context: c… Answer:`, the ids that
    precede the answer; int64 [k], the tokens of each context's slot (helper
    + ids) in the prompt, 0 for a context dropped for lack of room (what
    generation reports as provenance).
  """
  question = question_ids[:layout.max_question_tokens]
  budget = layout.sequence_length - layout.fixed_tokens - (
      tf.size(question) - layout.max_question_tokens)
  context_ids, kept = fit_contexts(contexts, budget, layout)
  return tf.concat([
      tf.constant(layout.question_helper, tf.int32,
                  [len(layout.question_helper)]),
      question, context_ids,
      tf.constant(layout.answer_helper, tf.int32, [len(layout.answer_helper)]),
  ], axis=0), kept


def prompt_ids(question_ids, contexts, layout):
  """`Question: q Context: c… Answer:`: the ids that precede the answer."""
  return prompt_and_kept(question_ids, contexts, layout)[0]


def lay_out_example(question_ids, contexts, answer_ids, layout):
  """One training/evaluation sequence, padded to `layout.sequence_length`.

  Returns:
    A dict of int32 [sequence_length] tensors: `input_ids` (padded with EOS),
    `attention_mask` (1 on real tokens), `label_mask` (1 on the answer tokens
    and, for an answer that fits whole, its EOS: the positions the loss is
    computed on). A cut answer gets no EOS: it did not end there.
  """
  prompt = prompt_ids(question_ids, contexts, layout)
  answer_fits = tf.size(answer_ids) <= layout.max_answer_tokens
  eos = tf.fill([tf.cast(answer_fits, tf.int32)], layout.eos_id)
  answer = tf.concat([answer_ids[:layout.max_answer_tokens], eos], axis=0)
  ids = tf.concat([prompt, answer], axis=0)
  length = tf.size(ids)
  padding = layout.sequence_length - length
  positions = tf.range(layout.sequence_length)
  features = {
      "input_ids": tf.pad(ids, [[0, padding]], constant_values=layout.eos_id),
      "attention_mask": tf.cast(positions < length, tf.int32),
      "label_mask": tf.cast((positions >= tf.size(prompt)) &
                            (positions < length), tf.int32),
  }
  for tensor in features.values():
    tensor.set_shape([layout.sequence_length])
  return features


def check_eval_stride(stride, max_answer_tokens):
  """A UserError unless 1 <= stride <= max_answer_tokens."""
  if not (isinstance(stride, int) and 1 <= stride <= max_answer_tokens):
    raise utils.UserError(
        f"--eval_stride={stride}: expected an integer between 1 and "
        f"--max_answer_tokens={max_answer_tokens}")


def lay_out_answer_windows(question_ids, contexts, answer_ids, layout, stride):
  """A whole answer of any length as windows that label each of its tokens once.

  Every window is the prompt (`prompt_ids`) followed by a slice of the answer
  and its EOS (the answer is not cut, so its EOS is always labelled, in the
  last window), padded to `layout.sequence_length`. The first window labels
  the first `max_answer_tokens` tokens; each later one labels the next
  `stride` (the last one what is left), after the already-labelled answer
  tokens that fit before them as unlabelled context: the answer's room is
  `max_answer_tokens` tokens, one more in the last window (for the EOS), so a
  window labelling `stride` tokens holds `max_answer_tokens - stride` tokens of
  context and the last window at least that. An answer that fits whole gets
  one window, `lay_out_example`'s features; a longer one's first window is
  `lay_out_example`'s features of the cut answer. Tensor ops only (for
  `tf.data`'s `flat_map`).

  Args:
    question_ids, contexts: as for `prompt_ids`.
    answer_ids: int32 [n], the whole answer.
    layout: a `Layout`.
    stride: answer tokens labelled per window after the first, 1 ..
      `max_answer_tokens` (which gives disjoint answer slices).

  Returns:
    A dict of int32 [num_windows, sequence_length] tensors: `input_ids`,
    `attention_mask`, `label_mask`, each row as `lay_out_example`'s.
  """
  room = layout.max_answer_tokens
  check_eval_stride(stride, room)
  prompt = prompt_ids(question_ids, contexts, layout)
  labels = tf.concat([answer_ids, [layout.eos_id]], axis=0)
  num_labels = tf.size(labels)
  fits = num_labels <= room + 1
  num_windows = 1 + tf.where(fits, 0, (num_labels - room + stride - 1) //
                             stride)
  window = tf.range(num_windows)
  is_last = window == num_windows - 1
  label_end = tf.where(is_last, num_labels, room + stride * window)
  label_start = tf.concat([[0], label_end[:-1]], axis=0)
  answer_begin = tf.maximum(
      0, label_end - room - tf.cast(is_last, tf.int32))[:, None]
  prompt_length = tf.size(prompt)
  positions = tf.range(layout.sequence_length)[None, :]
  # Position p >= prompt_length holds answer token p - prompt_length +
  # answer_begin, which sits at p + answer_begin in `source`.
  answer_index = positions - prompt_length + answer_begin
  in_answer = (positions >= prompt_length) & (answer_index <
                                             label_end[:, None])
  real = (positions < prompt_length) | in_answer
  source = tf.concat([prompt, labels, tf.fill([layout.sequence_length],
                                              layout.eos_id)], axis=0)
  ids = tf.gather(source, positions + tf.where(positions >= prompt_length,
                                               answer_begin, 0))
  features = {
      "input_ids": tf.where(real, ids, layout.eos_id),
      "attention_mask": tf.cast(real, tf.int32),
      "label_mask": tf.cast(in_answer & (answer_index >= label_start[:, None]),
                            tf.int32),
  }
  for tensor in features.values():
    tensor.set_shape([None, layout.sequence_length])
  return features


# ---------------------------------------------------------------------------
# Contexts
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the pipeline feeds the model, beyond the layout (`approach`: a
  `context_draw.Approach` or its value)."""
  approach: context_draw.Approach
  num_retrievals: int = 0
  # 0 keeps the top `num_retrievals` by score.
  retrieval_temperature: float = 1.0
  # 0 or None: every cached neighbour is eligible.
  retrieval_bank_size: int = 0
  every_answer: bool = False
  seed: int = 0
  shuffle_buffer_size: int = 1000
  # Evaluation conditions (`context_draw.Condition`): skip the best this many
  # neighbours (distractors), and put the drawn contexts in a random order.
  rank_offset: int = 0
  shuffle_contexts: bool = False
  # Evaluation: score a whole long answer in windows (`lay_out_answer_windows`)
  # labelling this many tokens each after the first; 0 cuts it.
  eval_stride: int = 0
  # > 0: each question's neighbours are retrieved as the pipeline runs, this
  # many (`make_dataset`'s `retrieval`), `live_batch_size` questions at a
  # time, instead of read from the cache, whose records give the questions.
  live_num_neighbours: int = 0
  live_batch_size: int = 32


def approach_fields(approach, retrieval_config, live):
  """`DataConfig`'s approach and live-retrieval fields of a job's approach.

  live_retrieval draws as cached_pretok does; when the job retrieves
  (`live`), every approach but naked_lm draws from the neighbours
  `retrieval_config` (a `live_retrieval.RetrievalConfig`) retrieves.
  """
  approach = context_draw.Approach(approach)
  drawn = (context_draw.Approach.CACHED_PRETOK
           if approach == context_draw.Approach.LIVE_RETRIEVAL else approach)
  retrieves = live and drawn != context_draw.Approach.NAKED_LM
  return dict(
      approach=drawn,
      live_num_neighbours=(retrieval_config.live_num_neighbours if retrieves
                           else 0),
      live_batch_size=retrieval_config.retrieval_batch_size)


def check_data_config(config, manifest, cache_dir):
  """A UserError for a config the cache cannot serve."""
  if config.approach not in context_draw.APPROACHES:
    raise utils.UserError(
        f"--approach_type={config.approach!r}: expected one of "
        f"{', '.join(context_draw.APPROACHES)}")
  if config.approach == context_draw.Approach.NAKED_LM:
    return
  if config.num_retrievals < 1:
    raise utils.UserError(
        f"--num_retrievals={config.num_retrievals}: {config.approach} needs "
        ">= 1 context")
  if config.retrieval_temperature < 0:
    raise utils.UserError(
        f"retrieval temperature {config.retrieval_temperature}: must be >= 0")
  needed = config.num_retrievals + config.rank_offset
  if config.live_num_neighbours:
    depth, source = config.live_num_neighbours, "retrieved"
    if needed > depth:
      raise utils.UserError(
          f"--live_num_neighbours={depth}: {needed} neighbours per question "
          "are needed (--num_retrievals plus the distractor offset)")
  else:
    neighbour_cache.check_manifest(manifest, cache_dir, num_neighbours=needed)
    depth, source = manifest["num_neighbours"], "cached"
  bank_size = config.retrieval_bank_size
  if bank_size and not config.num_retrievals <= bank_size <= depth:
    raise utils.UserError(
        f"--retrieval_bank_size={bank_size}: must be between --num_retrievals="
        f"{config.num_retrievals} and the {depth} neighbours {source} per "
        "question")


def select_contexts(neighbours, neighbour_scores, seed, config):
  """Ragged [k, None] ids of the `num_retrievals` contexts drawn for one example."""
  return tf.gather(neighbours, context_draw.draw(neighbour_scores, config,
                                                 seed))


def no_contexts():
  return tf.RaggedTensor.from_row_lengths(
      tf.zeros([0], tf.int32), tf.zeros([0], tf.int64))


# ---------------------------------------------------------------------------
# The input pipeline
# ---------------------------------------------------------------------------

# The pipeline's functions are plain tensor code: AutoGraph has nothing to
# convert in them, and converting reads their source file, so a job whose
# sources are edited while it runs would trace the wrong function.
_plain = tf.autograph.experimental.do_not_convert


def _pipeline_share(files, input_context):
  """(this input pipeline's files, (pipelines, index) to shard each file's
  records by, or None): by file when there are at least as many files as
  pipelines (workers), otherwise by record. Either way a pipeline's records
  are the same whatever the order the files are read in."""
  pipelines = input_context.num_input_pipelines if input_context else 1
  index = input_context.input_pipeline_id if input_context else 0
  if pipelines > 1 and len(files) >= pipelines:
    return files[index::pipelines], None
  return files, ((pipelines, index) if pipelines > 1 else None)


def _read_records(file_names, record_shard):
  """The serialized records of `file_names` (a string tensor), interleaved in
  a fixed order; of each file its `record_shard` (`_pipeline_share`)."""

  def file_records(name):
    records = tf.data.TFRecordDataset(name)
    return records if record_shard is None else records.shard(*record_shard)

  return tf.data.Dataset.from_tensor_slices(file_names).interleave(
      _plain(file_records), cycle_length=_INTERLEAVE_CYCLE,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _serialized_records(files, config, *, training, input_context,
                        first_epoch=0):
  """(epoch, serialized record) pairs: what this pipeline reads of the shards.

  Training: this input pipeline's (worker's) share (`_pipeline_share`),
  epochs `first_epoch`, `first_epoch` + 1, ... forever, each reading the
  files in a new seeded order through its own seeded shuffle buffer, so an
  epoch's stream is a function of the files, the seed and the epoch alone (a
  resumed run starts at its epoch). Evaluation: the whole split once in file
  order, whatever the pipeline (`batch_examples` shares its rows out).
  """
  if not training:
    return _read_records(tf.constant(files), None).map(_plain(
        lambda record: (tf.constant(0, tf.int64), record)))
  files, record_shard = _pipeline_share(files, input_context)
  files = tf.constant(files)

  def one_epoch(epoch):
    order = tf.argsort(tf.random.stateless_uniform(
        tf.shape(files), tf.stack([tf.cast(config.seed, tf.int64), epoch])))
    # No reshuffling per iteration: the random-context partner stream reads
    # the epoch again, in the same order.
    return _read_records(tf.gather(files, order), record_shard).map(_plain(
        lambda record: (epoch, record))).shuffle(
            config.shuffle_buffer_size,
            seed=tf.cast(config.seed, tf.int64) * _EPOCH_SEED_STRIDE + epoch,
            reshuffle_each_iteration=False)

  return tf.data.Dataset.counter(first_epoch).flat_map(_plain(one_epoch))


def _examples_per_epoch(files, every_answer, input_context):
  """The training examples an epoch of this pipeline holds (the same every
  epoch), from the records' answer counts alone."""
  files, record_shard = _pipeline_share(files, input_context)
  counts = _read_records(tf.constant(files), record_shard).batch(1024).map(
      _plain(neighbour_cache.answer_counts))
  if not every_answer:
    counts = counts.map(_plain(lambda count: tf.minimum(count, 1)))
  return int(counts.reduce(tf.constant(0, tf.int64), _plain(
      lambda total, count: total + tf.reduce_sum(count))))


def _with_random_partners(examples, *, training):
  """Gives each example the neighbours of the next question in the stream.

  The stream is in a seeded random order when training; evaluation pairs each
  question with the next one in the file order, and the last with the first,
  so no question is ever paired with itself.
  """
  partners = examples.skip(1)
  if not training:
    partners = partners.concatenate(examples.take(1))

  def swap(own, partner):
    epoch, example = own
    example = dict(example)
    example["neighbours"] = partner[1]["neighbours"]
    example["neighbour_scores"] = partner[1]["neighbour_scores"]
    return epoch, example

  return tf.data.Dataset.zip(examples, partners).map(
      _plain(swap), num_parallel_calls=tf.data.AUTOTUNE)


def _answer_examples(examples, every_answer):
  """(epoch, answer index, example): one per answer, or the first answer only."""
  if every_answer:
    return examples.flat_map(_plain(
        lambda epoch, example: tf.data.Dataset.from_tensors(
            (epoch, example)).repeat(example["answers"].nrows()).enumerate()
    )).map(_plain(lambda index, pair: (pair[0], index, pair[1])))
  return examples.filter(_plain(
      lambda epoch, example: example["answers"].nrows() > 0)).map(_plain(
          lambda epoch, example: (epoch, tf.constant(0, tf.int64), example)))


def make_example_fn(config, layout, *, with_key=False):
  """(epoch, answer index, parsed example) -> laid-out features.

  `with_key` (evaluation) gives the example's sequences along a leading axis
  instead (one, or with `config.eval_stride` one per window of its answer),
  with int64 `example_key` (a hash of the example's id) and `answer_index`,
  by which an evaluation sums its scores per example.
  """

  # Plain tensor code with no data-dependent Python control flow: AutoGraph
  # has nothing to convert, and reading sources mid-edit cannot break it.
  @tf.autograph.experimental.do_not_convert
  def example_fn(epoch, answer_index, example):
    seed = context_draw.example_seed(config.seed, epoch, example["id"],
                                     answer_index)
    if config.approach == context_draw.Approach.NAKED_LM:
      contexts = no_contexts()
    else:
      contexts = select_contexts(example["neighbours"],
                                 example["neighbour_scores"], seed, config)
    answer = example["answers"][answer_index]
    if not with_key:
      features = lay_out_example(example["question_ids"], contexts, answer,
                                 layout)
      features["dropout_seed"] = context_draw.dropout_seed(seed)
      return features
    if config.eval_stride:
      features = lay_out_answer_windows(example["question_ids"], contexts,
                                        answer, layout, config.eval_stride)
    else:
      features = {name: value[tf.newaxis] for name, value in lay_out_example(
          example["question_ids"], contexts, answer, layout).items()}
    windows = tf.shape(features["input_ids"])[0]
    for name, value in (("dropout_seed", context_draw.dropout_seed(seed)),
                        ("example_key", example_key(example["id"])),
                        ("answer_index", answer_index)):
      features[name] = tf.repeat(value[tf.newaxis], windows, axis=0)
    return features

  return example_fn


def example_key(example_id):
  """int64 in [0, 2**62): the key under which an evaluation finds an example
  (`make_dataset`'s `example_key`); padding rows have -1."""
  return tf.strings.to_hash_bucket_fast(example_id, 2**62)


def _pad_batch(features, batch_size):
  """Pads a short batch (axis 0) with rows that carry no label (fixed shapes).

  Padding rows attend to their (EOS) tokens, so no row is fully masked.
  """
  padding = batch_size - tf.shape(features["input_ids"])[0]
  padded = {}
  for name, tensor in features.items():
    value = {"attention_mask": 1, "example_key": -1}.get(name, 0)
    padded[name] = tf.pad(tensor, [[0, padding]] + [[0, 0]] * (
        tensor.shape.rank - 1), constant_values=value)
    padded[name].set_shape([batch_size] + tensor.shape[1:])
  return padded


def make_dataset(files, config, layout, *, batch_size, training,
                 input_context=None, skip_examples=0, number_examples=0,
                 retrieval=None):
  """Batches of laid-out examples from cache shards.

  Args:
    files: the split's shard paths (`neighbour_cache.split_files`).
    config: a `DataConfig`.
    layout: a `Layout`.
    batch_size: examples per batch yielded by this pipeline (per replica
      under `distribute_datasets_from_function`).
    training: repeat forever in a seeded order per epoch, drop the last
      partial batch; otherwise one pass in file order, the last batch padded
      with label-free rows.
    input_context: a `tf.distribute.InputContext`: training reads this
      pipeline's (worker's) share of the shards; evaluation shares the rows
      out (`batch_examples`).
    skip_examples: training only: the examples of this pipeline's stream
      already read (a resumed run): the stream starts at their last epoch
      (found from the records' answer counts), whose examples read are
      dropped before they are laid out.
    number_examples: evaluation only: score the first this many examples of
      the split (answers, with `every_answer`); 0: all.
    retrieval: with `config.live_num_neighbours`, what retrieves the
      neighbours (`live_retrieval.open_retrieval`).

  Returns:
    A tf.data.Dataset of dicts: int32 [batch_size, sequence_length]
    `input_ids`, `attention_mask`, `label_mask`, and int64 [batch_size, 2]
    `dropout_seed` (stateless, per example); in evaluation also int64
    [batch_size] `example_key` and `answer_index` (`make_example_fn`).
  """
  first_epoch = 0
  if training and skip_examples:
    per_epoch = _examples_per_epoch(files, config.every_answer, input_context)
    if per_epoch:
      first_epoch, skip_examples = divmod(skip_examples, per_epoch)
  records = _serialized_records(files, config, training=training,
                                input_context=input_context,
                                first_epoch=first_epoch)
  if config.live_num_neighbours:
    examples = live_retrieval.with_live_neighbours(
        records, retrieval, config.live_num_neighbours, config.live_batch_size)
  else:
    examples = records.map(_plain(
        lambda epoch, record: (epoch, neighbour_cache.parse_example(record))),
        num_parallel_calls=tf.data.AUTOTUNE)
  batches = batch_examples(
      examples, config, layout, batch_size=batch_size, training=training,
      input_context=input_context, skip_examples=skip_examples,
      number_examples=number_examples)
  if config.live_num_neighbours:
    batches = batches.with_options(live_retrieval.pipeline_options())
  return batches


def batch_examples(examples, config, layout, *, batch_size, training,
                   input_context=None, skip_examples=0, number_examples=0):
  """`make_dataset`'s batches from a dataset of (epoch, parsed example)
  pairs (`neighbour_cache.parse_example`'s dicts), whatever their source.

  Evaluation (`training` false) with an `input_context`: the per-replica
  batches of all the replicas in sync, in order, are one global batch; the
  number of batches is padded with label-free ones to a whole number of
  global batches, so that every replica of every worker runs the same
  number of steps, and this pipeline keeps its replicas' batches of each
  global batch (pipeline i the i-th run of replicas, as
  `distribute_datasets_from_function` numbers them). Every pipeline lays out
  the same rows; each row is scored by exactly one replica.
  """
  if config.approach == context_draw.Approach.RANDOM_CONTEXT:
    examples = _with_random_partners(examples, training=training)
  examples = _answer_examples(examples, config.every_answer)
  if training and skip_examples:
    examples = examples.skip(skip_examples)
  if not training and number_examples:
    examples = examples.take(number_examples)
  features = examples.map(make_example_fn(config, layout,
                                          with_key=not training),
                          num_parallel_calls=tf.data.AUTOTUNE)
  if training:
    # Endless, and said so: tf.distribute then skips the per-step check,
    # across workers, that every worker still has a batch.
    batches = features.batch(batch_size, drop_remainder=True).apply(
        tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
  else:
    batches = _evaluation_batches(features.unbatch(), batch_size,
                                  input_context)
  options = tf.data.Options()
  options.deterministic = True
  # Sharding is done here, by file, record or row, per input pipeline.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.OFF)
  return batches.prefetch(tf.data.AUTOTUNE).with_options(options)


def _evaluation_batches(rows, batch_size, input_context):
  """Padded per-replica batches of `rows`; with an `input_context`, this
  pipeline's share of every global batch (`batch_examples`)."""
  batches = rows.batch(batch_size).map(_plain(
      lambda batch: _pad_batch(batch, batch_size)))
  replicas = input_context.num_replicas_in_sync if input_context else 1
  if replicas == 1:
    return batches
  local_replicas = replicas // input_context.num_input_pipelines
  first = input_context.input_pipeline_id * local_replicas
  return batches.batch(replicas).map(_plain(
      lambda group: {name: value[first:first + local_replicas]
                     for name, value in _pad_batch(group, replicas).items()}
  )).unbatch()


def format_sample(tokenizer, features):
  """A laid-out example as text, the parts without loss in ⟦ ⟧ (for logs)."""
  length = int(sum(features["attention_mask"]))
  ids = list(features["input_ids"][:length])
  labels = list(features["label_mask"][:length])
  pieces, start = [], 0
  for position in range(1, length + 1):
    if position == length or labels[position] != labels[start]:
      text = tokenizer.decode(ids[start:position])
      pieces.append(text if labels[start] else f"⟦{text}⟧")
      start = position
  return "".join(pieces)


# ---------------------------------------------------------------------------
# Model and loss
# ---------------------------------------------------------------------------


def load_model(model_key, *, devices=None, dtype=None, seed=0,
               recompute=False):
  """GPT-2 from a hub key or checkpoint directory.

  A directory holding a `config.json` and no weights means a freshly
  initialised model of that config (deterministic in `seed`).
  """
  if gpt2_weights.holds_config_only(model_key):
    config = gpt2_weights.read_config(
        os.path.join(model_key, gpt2_weights.CONFIG_NAME))
    return modeling_tf_gpt2_model_par.GPT2LMHeadModel.from_config(
        config, devices=devices, dtype=dtype, seed=seed, recompute=recompute)
  return modeling_tf_gpt2_model_par.GPT2LMHeadModel.from_pretrained(
      model_key, devices=devices, dtype=dtype, recompute=recompute)


def answer_loss_sum(model, batch, max_labels=None, *, training=False):
  """(sum of the answer tokens' cross-entropy, number of answer tokens) over
  the batch (`answer_losses_per_row`'s arguments)."""
  row_loss_sums, row_tokens = answer_losses_per_row(
      model, batch, max_labels, training=training)
  return tf.reduce_sum(row_loss_sums), tf.reduce_sum(row_tokens)


def answer_losses_per_row(model, batch, max_labels=None, *, training=False):
  """float32 [B] sums of each row's answer-token cross-entropy, and float32
  [B] counts of its answer tokens.

  The logits at position t predict token t + 1, so a label at position t + 1
  is scored by the logits at t. Dropout, when training, is stateless in the
  first example's seed.

  Args:
    model: the GPT-2.
    batch: a batch of `make_dataset`.
    max_labels: the most labels a row can have (`Layout.max_labels`). Labels
      are contiguous (answer + EOS), so the head then runs on a fixed window
      of `max_labels` positions per row instead of all of them: the same
      loss, a fraction of the head's cost, and static shapes for XLA. None
      scores every position.
    training: apply dropout.
  """
  input_ids = batch["input_ids"]
  labelled = batch["label_mask"] > 0
  length = tf.shape(input_ids)[1]
  if max_labels is None:
    window = tf.broadcast_to(tf.range(length - 1),
                             [tf.shape(input_ids)[0], length - 1])
  else:
    first_label = tf.argmax(tf.cast(labelled, tf.int32), axis=1,
                            output_type=tf.int32)
    window = first_label[:, None] - 1 + tf.range(max_labels)[None, :]
  score_positions = tf.clip_by_value(window, 0, length - 2)
  targets = tf.gather(input_ids, score_positions + 1, batch_dims=1)
  # Positions clipped at either end repeat another; only in-range ones count.
  in_range = (window >= 0) & (window <= length - 2)
  scored = in_range & tf.gather(labelled, score_positions + 1, batch_dims=1)
  logits = model(input_ids, attention_mask=batch["attention_mask"],
                 training=training,
                 dropout_seed=batch["dropout_seed"][0] if training else None,
                 score_positions=score_positions)
  losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=targets, logits=logits)
  # tf.where, not a product: a non-finite loss on a padded position must not
  # leak into the sum.
  return (tf.reduce_sum(tf.where(scored, losses, 0.0), axis=1),
          tf.reduce_sum(tf.cast(scored, tf.float32), axis=1))
