"""Generation from a trained run: the run read back, prompts laid out as in training, batched decoding, KILT records, a resumable output.

`generation.py` is the command line over this module; `util_scripts/export_hf.py`
uses its run loading. No flags here, so tests and other scripts can import it.

A run directory (written by main.py) holds `config.json` ({"flags": every
training flag, "model_config": the GPT-2 config keys that decide the weights})
and `checkpoints/` (tf.train.Checkpoint of `model`, optimizer, step and data
iterator); only the model is restored.

Prompts are `task_specific.prompt_and_kept` of the question and the contexts
drawn by `retrievers.sample_neighbours` with the seed training's evaluation
uses (epoch 0, first answer), so a prompt is the training sequence of the same
example up to and including `Answer:`. Truncation is the layout's: the question
is cut to `max_question_tokens`, each context to `max_context_tokens`, and the
contexts fill the room left by the question, the answer reserve and the helper
words in the order drawn, the last one cut and any without room dropped. A
prompt therefore never exceeds `sequence_length - max_answer_tokens - 1`
tokens; prompts are left-padded to that length so decoding compiles once.
"""

import dataclasses
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf
import transformers

import kilt_metrics
import modeling_tf_gpt2_model_par as modeling
import neighbour_cache
import retrievers
import task_specific
import utils

RUN_CONFIG_NAME = "config.json"
RUN_CHECKPOINT_DIR = "checkpoints"
_MODEL_CONFIG_NAME = "config.json"  # Of a Hugging Face model directory.
GENERATION_CONFIG_NAME = "generation_config.json"
METRICS_NAME = "kilt_metrics.json"
PARTIAL_SUFFIX = ".partial"
# Approaches a prompt can be laid out for (random_context is an evaluation
# control, not a system to generate with).
APPROACHES = ("naked_lm", "cached_pretok")
DECODINGS = ("greedy", "sampling", "beam")
# The layout flags of main.py and their defaults there: a Hugging Face model
# has no run config to take them from.
LAYOUT_DEFAULTS = {
    "sequence_length": 0, "max_question_tokens": 64, "max_answer_tokens": 350,
    "max_context_tokens": 288, "use_helper_words": True,
    "context_helper_mode": "each",
}
# A context budget no prompt reaches: `fit_contexts` then keeps every slot
# whole, which gives each slot's untruncated length.
_UNLIMITED_BUDGET = 2**30


# ---------------------------------------------------------------------------
# A run directory, read back
# ---------------------------------------------------------------------------


def read_run_config(run_dir):
  """The run's config.json: {"flags": {...}, "model_config": {...}}."""
  path = os.path.join(run_dir, RUN_CONFIG_NAME)
  if not tf.io.gfile.exists(path):
    raise utils.UserError(
        f"--run_dir={run_dir}: no {RUN_CONFIG_NAME}; expected a run directory "
        "written by main.py")
  config = utils.read_json(path, "run config")
  for key in ("flags", "model_config"):
    if not isinstance(config.get(key), dict):
      raise utils.UserError(
          f"{path}: no {key!r} object; expected the config.json main.py "
          "writes")
  return config


def run_tokenizer_key(run_config):
  """The tokenizer the run trained with: as main.py chose it, its --tokenizer
  or else its cache's."""
  run_flags = run_config["flags"]
  return (run_flags.get("tokenizer") or
          neighbour_cache.read_manifest(run_flags["cache_dir"])["tokenizer"])


def run_model_config(run_config, tokenizer):
  """The run's GPT2Config.

  The run records the keys that decide the weights; the rest (dropout,
  special token ids, ...) comes from the config.json of the directory the
  run started from when it is still there (a hub key is not fetched), and
  the special token ids otherwise from the tokenizer.
  """
  start_config = os.path.join(run_config["flags"].get("model_key") or "",
                              _MODEL_CONFIG_NAME)
  values = {}
  if tf.io.gfile.exists(start_config):
    values = utils.read_json(start_config, "GPT-2 config")
  values.update(run_config["model_config"])
  values.setdefault("bos_token_id", tokenizer.eos_token_id)
  values.setdefault("eos_token_id", tokenizer.eos_token_id)
  return transformers.GPT2Config.from_dict(values)


def _check_checkpoint_weights(path, model, config_path):
  """Refuses a checkpoint whose model weights are not the config's.

  Checked by name and shape before restoring: a checkpoint of a deeper
  model would otherwise silently fill a shallower one, and a failed restore
  leaves TensorFlow warning about every unread value.
  """
  prefix, suffix = "model/", "/.ATTRIBUTES/VARIABLE_VALUE"
  stored = {name[len(prefix):-len(suffix)].replace("/", "."): tuple(shape)
            for name, shape in tf.train.list_variables(path)
            if name.startswith(prefix) and name.endswith(suffix) and
            ".OPTIMIZER_SLOT" not in name}
  expected = {name: tuple(variable.shape)
              for name, variable in model.named_weights().items()}
  if len(stored) != len(expected):
    raise utils.UserError(
        f"{path}: holds {len(stored)} model weights, but the model of "
        f"{config_path} has {len(expected)}; the checkpoint is not this run's")
  for name, shape in expected.items():
    if stored.get(name) != shape:
      raise utils.UserError(
          f"{path}: weight {name} has shape {stored.get(name)} in the "
          f"checkpoint, {shape} in the model of {config_path}; the checkpoint "
          "is not this run's")


def restore_run_model(run_dir, run_config, tokenizer, strategy=None):
  """The model of the run's latest checkpoint.

  Returns:
    (model, checkpoint path, training step). The model's variables are made
    in `strategy`'s scope (mirrored over its replicas).
  """
  config = run_model_config(run_config, tokenizer)
  with (strategy or tf.distribute.get_strategy()).scope():
    model = modeling.GPT2LMHeadModel.from_config(config)
  path = tf.train.latest_checkpoint(os.path.join(run_dir, RUN_CHECKPOINT_DIR))
  if path is None:
    raise utils.UserError(
        f"--run_dir={run_dir}: no checkpoint in {RUN_CHECKPOINT_DIR}/ "
        "(train first)")
  config_path = os.path.join(run_dir, RUN_CONFIG_NAME)
  _check_checkpoint_weights(path, model, config_path)
  try:
    # Partial: the optimizer and data iterator of the checkpoint stay unread.
    tf.train.Checkpoint(model=model).restore(
        path).expect_partial().assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as error:
    raise utils.UserError(
        f"{path}: does not match the model of {config_path}: "
        f"{' '.join(str(error).split())[:300]}") from None
  return model, path, int(path.rsplit("-", 1)[-1])


def make_layout(tokenizer, values, n_positions):
  """The layout of main.py's layout flags (`values`, by flag name)."""
  sequence_length = values["sequence_length"] or n_positions
  if sequence_length > n_positions:
    raise utils.UserError(
        f"--sequence_length={sequence_length} exceeds the model's "
        f"n_positions={n_positions}")
  return task_specific.make_layout(
      tokenizer, sequence_length=sequence_length,
      max_question_tokens=values["max_question_tokens"],
      max_answer_tokens=values["max_answer_tokens"],
      max_context_tokens=values["max_context_tokens"],
      use_helper_words=values["use_helper_words"],
      context_helper_mode=values["context_helper_mode"])


def prompt_length(layout):
  """The longest prompt: the sequence minus the answer reserve and its EOS."""
  return layout.sequence_length - layout.max_answer_tokens - 1


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def context_indices(example, config):
  """Indices of the neighbours an example's prompt holds, in the order drawn.

  The seed is `task_specific.make_example_fn`'s for epoch 0 and the first
  answer (what evaluation sees), so temperature > 0 draws the contexts the
  run's evaluation drew.
  """
  seed = tf.random.experimental.stateless_fold_in(
      retrievers.example_seed(config.seed, tf.constant(0, tf.int64),
                              example["id"]), tf.constant(0, tf.int64))
  return retrievers.sample_neighbours(
      example["neighbour_scores"], config.num_retrievals,
      config.retrieval_temperature, seed,
      bank_size=config.retrieval_bank_size or None)


def make_prompt_fn(config, layout):
  """Parsed cache example -> left-padded prompt, provenance and truncation counts."""
  length = prompt_length(layout)

  # Plain tensor code: nothing for AutoGraph to convert.
  @tf.autograph.experimental.do_not_convert
  def prompt_fn(example):
    if config.approach == "naked_lm":
      indices = tf.zeros([0], tf.int32)
      contexts = task_specific.no_contexts()
    else:
      indices = context_indices(example, config)
      contexts = tf.gather(example["neighbours"], indices)
    ids, kept = task_specific.prompt_and_kept(example["question_ids"],
                                              contexts, layout)
    _, whole = task_specific.fit_contexts(contexts, _UNLIMITED_BUDGET, layout)
    in_prompt = kept > 0
    padding = length - tf.size(ids)

    def count(condition):
      return tf.reduce_sum(tf.cast(condition, tf.int32))

    return {
        "id": example["id"],
        "question": example["question"],
        "input_ids": tf.pad(ids, [[padding, 0]], constant_values=layout.eos_id),
        "attention_mask": tf.cast(tf.range(length) >= padding, tf.int32),
        "block_ids": tf.where(
            in_prompt, tf.gather(example["neighbour_block_ids"], indices), -1),
        # The cached retrieval scores of those blocks, for their provenance.
        "block_scores": tf.gather(example["neighbour_scores"], indices),
        "question_cut": count(tf.size(example["question_ids"]) >
                              layout.max_question_tokens),
        "contexts_cut_to_max": count(
            in_prompt & (contexts.row_lengths() > layout.max_context_tokens)),
        "contexts_cut_for_room": count(in_prompt & (kept < whole)),
        "contexts_dropped": count(~in_prompt),
    }

  return prompt_fn


TRUNCATION_COUNTS = ("question_cut", "contexts_cut_to_max",
                     "contexts_cut_for_room", "contexts_dropped")


def read_prompts(files, config, layout, max_examples=0):
  """Every prompt of a split's shards, in file order.

  Returns:
    A dict of numpy arrays, one row per example: `id`, `question` (str),
    `input_ids` and `attention_mask` int32 [N, prompt_length(layout)],
    `block_ids` int64 [N, k] (-1: no room in the prompt), `block_scores`
    float32 [N, k] (the drawn neighbours' cached scores), and the
    TRUNCATION_COUNTS per example.
  """
  dataset = tf.data.TFRecordDataset(files).map(neighbour_cache.parse_example)
  if max_examples:
    dataset = dataset.take(max_examples)
  dataset = dataset.map(make_prompt_fn(config, layout),
                        num_parallel_calls=tf.data.AUTOTUNE)
  columns = {}
  for batch in dataset.batch(256).as_numpy_iterator():
    for name, value in batch.items():
      columns.setdefault(name, []).append(value)
  if not columns:
    raise utils.UserError(f"{files[0] if files else 'split'}: no examples")
  prompts = {name: np.concatenate(parts) for name, parts in columns.items()}
  for name in ("id", "question"):
    prompts[name] = [text.decode("utf-8") for text in prompts[name]]
  return prompts


def truncation_summary(prompts, layout):
  """One line saying how the layout cut the prompts (logged and printed)."""
  counts = {name: int(prompts[name].sum()) for name in TRUNCATION_COUNTS}
  return (
      f"{counts['question_cut']} of {len(prompts['id'])} questions cut to "
      f"{layout.max_question_tokens} tokens; contexts in the prompts: "
      f"{counts['contexts_cut_to_max']} cut to {layout.max_context_tokens} "
      f"tokens, {counts['contexts_cut_for_room']} cut and "
      f"{counts['contexts_dropped']} dropped for lack of room "
      f"(prompts hold at most {prompt_length(layout)} tokens)")


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decoding:
  """How answers are decoded (`max_new_tokens` 0: the layout's answer reserve)."""
  method: str = "greedy"
  max_new_tokens: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 1
  repetition_penalty: float = 1.0
  length_penalty: float = 1.0
  seed: int = 0


def check_decoding(decoding):
  """A UserError for a setting that does not apply or is out of range."""
  if decoding.method not in DECODINGS:
    raise utils.UserError(f"--decoding={decoding.method!r}: expected one of "
                          f"{', '.join(DECODINGS)}")
  sampling_only = {"temperature": decoding.temperature != 1.0,
                   "top_k": decoding.top_k != 0,
                   "top_p": decoding.top_p != 1.0}
  for name, is_set in sampling_only.items():
    if is_set and decoding.method != "sampling":
      raise utils.UserError(
          f"--{name}={getattr(decoding, name)} applies only to "
          f"--decoding=sampling, not --decoding={decoding.method}")
  if decoding.method == "beam":
    if decoding.num_beams < 2:
      raise utils.UserError(
          f"--num_beams={decoding.num_beams}: --decoding=beam needs >= 2")
  elif decoding.num_beams != 1:
    raise utils.UserError(
        f"--num_beams={decoding.num_beams} applies only to --decoding=beam "
        f"(beam sampling is not supported), not --decoding={decoding.method}")
  if decoding.length_penalty != 1.0 and decoding.method != "beam":
    raise utils.UserError(
        f"--length_penalty={decoding.length_penalty} applies only to "
        f"--decoding=beam, not --decoding={decoding.method}")
  if decoding.method == "sampling" and not decoding.temperature > 0:
    raise utils.UserError(
        f"--temperature={decoding.temperature}: must be > 0 (use "
        "--decoding=greedy for the argmax)")
  if decoding.top_k < 0:
    raise utils.UserError(f"--top_k={decoding.top_k}: must be >= 0 (0: off)")
  if not 0.0 < decoding.top_p <= 1.0:
    raise utils.UserError(f"--top_p={decoding.top_p}: must be in (0, 1]")
  if not decoding.repetition_penalty > 0:
    raise utils.UserError(
        f"--repetition_penalty={decoding.repetition_penalty}: must be > 0 "
        "(1: off)")
  if decoding.max_new_tokens < 0:
    raise utils.UserError(
        f"--max_new_tokens={decoding.max_new_tokens}: must be >= 0 (0: the "
        "layout's answer reserve)")


def resolve_max_new_tokens(decoding, layout, n_positions):
  """`decoding` with max_new_tokens set; a UserError when it cannot fit."""
  max_new_tokens = decoding.max_new_tokens or layout.max_answer_tokens + 1
  room = n_positions - prompt_length(layout)
  if max_new_tokens > room:
    raise utils.UserError(
        f"--max_new_tokens={max_new_tokens}: prompts take up to "
        f"{prompt_length(layout)} tokens (--sequence_length="
        f"{layout.sequence_length} minus the answer reserve "
        f"--max_answer_tokens={layout.max_answer_tokens} and EOS), so at most "
        f"{room} new tokens fit the model's n_positions={n_positions}; lower "
        "it, or lay prompts out with a smaller --sequence_length")
  return dataclasses.replace(decoding, max_new_tokens=max_new_tokens)


def make_batch_generator(strategy, model, decoding, eos_id):
  """fn(input_ids [B, P], attention_mask [B, P], batch_index) -> int32 [B, new].

  The global batch is cut into one slice per replica, in replica order, and
  the outputs are joined in the same order, so rows keep their places
  whatever the number of replicas. Greedy and beam decoding trace one
  function for the whole run; sampling draws from a seed made of
  (`decoding.seed`, batch index), the same on a resumed run, and traces once
  per batch (the model's `generate` takes its seed as a Python int; its
  compiled decoding loop is reused).
  """
  settings = dict(
      max_new_tokens=decoding.max_new_tokens,
      do_sample=decoding.method == "sampling",
      temperature=decoding.temperature, top_k=decoding.top_k,
      top_p=decoding.top_p, num_beams=decoding.num_beams,
      repetition_penalty=decoding.repetition_penalty,
      length_penalty=decoding.length_penalty, eos_token_id=eos_id,
      pad_token_id=eos_id)
  num_replicas = strategy.num_replicas_in_sync

  def distributed_generate(seed):
    def replica_generate(batch):
      return model.generate(batch["input_ids"],
                            attention_mask=batch["attention_mask"], seed=seed,
                            **settings)

    return tf.function(
        lambda inputs: strategy.run(replica_generate, args=(inputs,)),
        autograph=False)

  unseeded = None if settings["do_sample"] else distributed_generate(0)

  def generate(input_ids, attention_mask, batch_index):
    per_replica = len(input_ids) // num_replicas

    def replica_inputs(context):
      start = context.replica_id_in_sync_group * per_replica
      return {"input_ids": tf.constant(input_ids[start:start + per_replica]),
              "attention_mask": tf.constant(
                  attention_mask[start:start + per_replica])}

    inputs = strategy.experimental_distribute_values_from_function(
        replica_inputs)
    run = unseeded or distributed_generate(int(np.random.SeedSequence(
        [decoding.seed, batch_index]).generate_state(1)[0]))
    outputs = run(inputs)
    return np.concatenate([output.numpy() for output in
                           strategy.experimental_local_results(outputs)])

  return generate


def answer_text(tokenizer, tokens, eos_id):
  """The decoded tokens before the first EOS, stripped."""
  tokens = [int(token) for token in tokens]
  if eos_id in tokens:
    tokens = tokens[:tokens.index(eos_id)]
  return tokenizer.decode(tokens).strip()


def kilt_record(example_id, question, answer, provenance):
  """One line of KILT's format; provenance: the prompt's blocks, as
  `kilt_metrics.block_provenance` writes them."""
  return {"id": example_id, "input": question,
          "output": [{"answer": answer, "provenance": provenance}]}


def prompt_provenance(prompts, example_index, title_of_block, title_map):
  """KILT provenance of the blocks in one prompt, in the order drawn."""
  in_prompt = prompts["block_ids"][example_index] >= 0
  return kilt_metrics.block_provenance(
      prompts["block_ids"][example_index][in_prompt],
      prompts["block_scores"][example_index][in_prompt], title_of_block,
      title_map)


# ---------------------------------------------------------------------------
# The resumable output
# ---------------------------------------------------------------------------


def partial_path(output_path):
  return output_path + PARTIAL_SUFFIX


def _first_difference(stored, wanted):
  for key in sorted(set(stored) | set(wanted)):
    if stored.get(key) != wanted.get(key):
      return key, stored.get(key), wanted.get(key)
  return None


def prepare_output(output_path, config):
  """Writes generation_config.json beside the output, or checks it.

  An output (finished or partial) is continued only under the config it was
  started with; a different config for it, or for another output in the same
  directory, is a UserError naming the first difference.

  Returns:
    True when `output_path` is already complete.
  """
  directory = os.path.dirname(output_path) or "."
  config_path = os.path.join(directory, GENERATION_CONFIG_NAME)
  config = json.loads(json.dumps(config))
  existing = [path for path in (output_path, partial_path(output_path))
              if tf.io.gfile.exists(path)]
  if tf.io.gfile.exists(config_path):
    stored = utils.read_json(config_path, "generation config")
    difference = _first_difference(stored, config)
    stored_output = os.path.join(directory, str(stored.get("output_name")))
    if difference and (existing or tf.io.gfile.exists(stored_output)):
      key, before, now = difference
      raise utils.UserError(
          f"{config_path}: the generation in {directory} was made with "
          f"{key}={before!r}, this one has {now!r}; write each generation to "
          "its own directory, or delete the old output to start again")
  elif existing:
    raise utils.UserError(
        f"{existing[0]}: exists without its {GENERATION_CONFIG_NAME}; delete "
        "it or use another --output_path")
  utils.makedirs(directory)
  utils.atomic_write_json(config_path, config)
  return tf.io.gfile.exists(output_path)


def resume_partial(output_path, expected_ids, batch_size):
  """Batches already generated: the partial file, cut to whole batches.

  A killed run can leave a torn last line or an unfinished batch; both are
  removed (through a temporary file and a rename), so the file again holds
  exactly the first `n * batch_size` examples, which are checked against
  `expected_ids`.
  """
  path = partial_path(output_path)
  if not tf.io.gfile.exists(path):
    return 0
  with tf.io.gfile.GFile(path, "r") as f:
    text = f.read()
  lines = text.split("\n")[:-1]  # The piece after the last newline is torn.
  num_batches = len(lines) // batch_size
  kept = lines[:num_batches * batch_size]
  ids = []
  for line_number, line in enumerate(kept, start=1):
    try:
      ids.append(json.loads(line)["id"])
    except (json.JSONDecodeError, KeyError, TypeError):
      raise utils.UserError(
          f"{path}: line {line_number} is not a generation record; delete "
          "the file to start again") from None
  if ids != list(expected_ids[:len(ids)]):
    raise utils.UserError(
        f"{path}: its ids are not this generation's first {len(ids)}; "
        "delete it to start again")
  kept_text = "".join(line + "\n" for line in kept)
  if kept_text != text:
    utils.atomic_write_text(path, kept_text)
  return num_batches


def write_generations(output_path, prompts, batch_size, generate_batch,
                      format_batch, progress):
  """Generates the batches not yet in the partial file, then renames it.

  Each global batch is appended with one write and a flush, so a killed run
  keeps every batch it finished. The last batch is padded with copies of
  its first row (dropped afterwards) so every batch has the same shape.

  Args:
    output_path: the final jsonl path.
    prompts: `read_prompts`' dict.
    batch_size: examples per global batch.
    generate_batch: fn(input_ids, attention_mask, batch_index) -> tokens.
    format_batch: fn(rows (a slice), tokens) -> the batch's jsonl text.
    progress: a tqdm bar over batches (its total already set).
  """
  num_examples = len(prompts["id"])
  done = resume_partial(output_path, prompts["id"], batch_size)
  progress.update(done)
  num_batches = -(-num_examples // batch_size)
  with tf.io.gfile.GFile(partial_path(output_path), "a") as out:
    for batch_index in range(done, num_batches):
      rows = slice(batch_index * batch_size,
                   min((batch_index + 1) * batch_size, num_examples))
      count = rows.stop - rows.start
      padded = {}
      for name in ("input_ids", "attention_mask"):
        values = prompts[name][rows]
        padded[name] = np.concatenate(
            [values, np.repeat(values[:1], batch_size - count, axis=0)])
      tokens = generate_batch(padded["input_ids"], padded["attention_mask"],
                              batch_index)[:count]
      out.write(format_batch(rows, tokens))
      out.flush()
      progress.update(1)
  tf.io.gfile.rename(partial_path(output_path), output_path, overwrite=True)


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


def evaluate_output(gold_records, gold_path, output_path):
  """KILT metrics of the generations against the gold records of their ids.

  Generations may cover part of the gold file (`--max_examples`); each of
  their ids must be in it.
  """
  outputs = kilt_metrics.read_guess_outputs(output_path)
  # KILT matches ids as str(id).strip().
  scored = [record for record in gold_records
            if str(record["id"]).strip() in outputs]
  kilt_metrics.check_ids(scored, outputs, gold_path, output_path)
  metrics = kilt_metrics.score_outputs(scored, outputs)
  metrics.update(gold_path=gold_path, guess_path=output_path,
                 num_gold_records=len(gold_records))
  logging.info("scored %d of the %d questions of %s", len(scored),
               len(gold_records), gold_path)
  return metrics
