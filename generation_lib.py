"""Generation from a trained run: `GenerationConfig`, `generate`, prompts laid out as in training, KILT records, a resumable output.

`generation.py` is the command line over `generate(GenerationConfig(...))`.
The run is read back through `run_dir` alone (its checkpoint, tokenizer and
settings: `training.TrainConfig` from its config.json), or a Hugging Face
GPT-2 is given with the cache and the layout, training's defaults standing in
for a run. Decoding is `decoding`'s.

Prompts are `task_specific.prompt_and_kept` of the question and the contexts
`context_draw` draws with the seed training's evaluation uses (epoch 0, first
answer), so a prompt is the training sequence of the same example up to and
including `Answer:`. Truncation is the layout's: the question is cut to
`max_question_tokens`, each context to `max_context_tokens`, and the
contexts fill the room left by the question, the answer reserve and the
helper words in the order drawn, the last one cut and any without room
dropped. A prompt therefore never exceeds `Layout.prompt_length` tokens;
prompts are left-padded to that length so decoding compiles once.
"""

import dataclasses
import json
import os
import sys
import typing

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

import block_store
import context_draw
import decoding as decoding_lib
import gpt2_weights
import kilt_files
import kilt_metrics
import live_retrieval
import modeling_tf_gpt2_model_par as modeling
import neighbour_cache
import run_dir as run_directory
import settings
import task_specific
import tf_utils
import training
import utils

setting = settings.setting

GENERATION_CONFIG_NAME = "generation_config.json"
METRICS_NAME = "kilt_metrics.json"
PARTIAL_SUFFIX = ".partial"
# The partner's fields a random_context prompt takes: its neighbours, and
# their block ids for the provenance.
_PARTNER_FIELDS = ("neighbours", "neighbour_scores", "neighbour_block_ids")
# The files of a saved GPT2TokenizerFast (either is enough to load it).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# A context budget no prompt reaches: `fit_contexts` then keeps every slot
# whole, which gives each slot's untruncated length.
_UNLIMITED_BUDGET = 2**30


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def context_indices(example, config):
  """Indices of the neighbours an example's prompt holds, in the order drawn:
  the draw of the run's evaluation (`context_draw`'s seed for the evaluation
  epoch and the first answer)."""
  return context_draw.draw(
      example["neighbour_scores"], config,
      context_draw.example_seed(config.seed, context_draw.EVALUATION_EPOCH,
                                example["id"], 0))


def make_prompt_fn(config, layout):
  """Parsed cache example -> left-padded prompt, provenance and truncation counts."""
  length = layout.prompt_length

  # Plain tensor code: nothing for AutoGraph to convert.
  @tf.autograph.experimental.do_not_convert
  def prompt_fn(example):
    if config.approach == context_draw.Approach.NAKED_LM:
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
    # A slot is its helper words and its context cut to max_context_tokens:
    # what the prompt holds of each context is the slot's kept tokens after
    # its helper words.
    cut = contexts[:, :layout.max_context_tokens]
    helper_lengths = whole - cut.row_lengths()
    shown = tf.ragged.boolean_mask(cut, tf.ragged.range(cut.row_lengths()) <
                                   tf.expand_dims(kept - helper_lengths, 1))

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
        # The ids of each context in the prompt, -1 after its end.
        "context_ids": tf.cast(shown, tf.int32).to_tensor(
            default_value=-1, shape=[None, layout.max_context_tokens]),
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


def with_next_questions_neighbours(examples):
  """Each parsed example with the neighbours (ids, scores, block ids) of the
  next question of the split, the last with the first's: the pairing of
  training's evaluation (`task_specific`'s random partners), over the whole
  split, so `--max_examples` does not change a question's partner."""
  partners = examples.skip(1).concatenate(examples.take(1))

  # Plain tensor code: nothing for AutoGraph to convert.
  @tf.autograph.experimental.do_not_convert
  def swap(own, partner):
    return {**own, **{name: partner[name] for name in _PARTNER_FIELDS}}

  return tf.data.Dataset.zip(examples, partners).map(swap)


def read_prompts(files, config, layout, max_examples=0, retrieval=None):
  """Every prompt of a split's shards, in file order (with
  `config.live_num_neighbours`, their neighbours retrieved by `retrieval`).

  Returns:
    A dict of numpy arrays, one row per example: `id`, `question` (str),
    `input_ids` and `attention_mask` int32 [N, layout.prompt_length],
    `block_ids` int64 [N, k] (-1: no room in the prompt), `block_scores`
    float32 [N, k] (the drawn neighbours' cached scores), `context_ids`
    int32 [N, k, max_context_tokens] (the ids of each context that the
    prompt holds, -1 after them), and the TRUNCATION_COUNTS per example.
  """
  records = tf.data.TFRecordDataset(files)
  random_partners = config.approach == context_draw.Approach.RANDOM_CONTEXT
  if config.live_num_neighbours:
    if max_examples and not random_partners:
      records = records.take(max_examples)
    dataset = live_retrieval.with_live_neighbours(
        records.map(lambda record: (context_draw.EVALUATION_EPOCH, record)),
        retrieval, config.live_num_neighbours, config.live_batch_size).map(
            lambda epoch, example: example).with_options(
                live_retrieval.pipeline_options())
  else:
    dataset = records.map(neighbour_cache.parse_example)
  if random_partners:
    dataset = with_next_questions_neighbours(dataset)
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
      f"(prompts hold at most {layout.prompt_length} tokens)")


def answer_text(tokenizer, tokens, eos_id):
  """The decoded tokens before the first EOS, stripped."""
  tokens = [int(token) for token in tokens]
  if eos_id in tokens:
    tokens = tokens[:tokens.index(eos_id)]
  return tokenizer.decode(tokens).strip()


def prompt_provenance(prompts, example_index, title_of_block, title_map):
  """KILT provenance of the blocks in one prompt, in the order drawn."""
  in_prompt = prompts["block_ids"][example_index] >= 0
  return kilt_metrics.block_provenance(
      prompts["block_ids"][example_index][in_prompt],
      prompts["block_scores"][example_index][in_prompt], title_of_block,
      title_map)


def prompt_contexts(tokenizer, prompts, example_index):
  """The texts of the contexts in one prompt, as the prompt holds them (cut
  where the layout cut them), in the order of its provenance."""
  in_prompt = prompts["block_ids"][example_index] >= 0
  return [tokenizer.decode(ids[ids >= 0]).strip()
          for ids in prompts["context_ids"][example_index][in_prompt]]


def generation_record(tokenizer, prompts, example_index, tokens,
                      title_of_block, title_map):
  """One line of the output: KILT's record of the answer and its provenance,
  and under `meta.contexts` the texts the answer was generated from (KILT's
  scripts ignore `meta`; kilt_eval.py's grounding reads it)."""
  record = kilt_files.output_record(
      prompts["id"][example_index], prompts["question"][example_index],
      answer_text(tokenizer, tokens, tokenizer.eos_token_id),
      prompt_provenance(prompts, example_index, title_of_block, title_map))
  record["meta"] = {
      "contexts": prompt_contexts(tokenizer, prompts, example_index)}
  return record


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
  """KILT metrics of the generations against the gold records of their ids,
  with their grounding in the contexts they were given and the gold
  answers' grounding in the same contexts (`kilt_metrics.grounding_summary`).

  Generations may cover part of the gold file (`--max_examples`); each of
  their ids must be in it.
  """
  outputs = kilt_metrics.read_guess_outputs(output_path)
  # KILT matches ids as str(id).strip().
  scored = [record for record in gold_records
            if str(record["id"]).strip() in outputs]
  kilt_metrics.check_ids(scored, outputs, gold_path, output_path)
  metrics = kilt_metrics.score_outputs(scored, outputs)
  contexts = kilt_metrics.read_guess_contexts(output_path)
  metrics["grounding"] = kilt_metrics.grounding_summary(
      kilt_metrics.grounding_scores(
          scored, {record_id: output["answer"]
                   for record_id, output in outputs.items()}, contexts))
  metrics["gold_answer_grounding"] = kilt_metrics.grounding_summary(
      kilt_metrics.gold_answer_grounding_scores(scored, contexts))
  metrics.update(gold_path=gold_path, guess_path=output_path,
                 num_gold_records=len(gold_records))
  logging.info("scored %d of the %d questions of %s", len(scored),
               len(gold_records), gold_path)
  return metrics


# ---------------------------------------------------------------------------
# The generation job
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Everything that decides a generation (generation.py's flags)."""
  output_path: typing.Optional[str] = setting(
      None,
      "Required. The generations (.jsonl, local or gs://); "
      "generation_config.json is written beside it, so give each generation "
      "its own directory.")
  run_dir: typing.Optional[str] = setting(
      None,
      "A run directory of main.py: its latest checkpoint, tokenizer and "
      "config.json (the defaults of the settings below) are used. This or "
      "--model_key is required.")
  model_key: typing.Optional[str] = setting(
      None,
      "Instead of --run_dir: a Hugging Face GPT-2 (hub key or directory with "
      "config.json and weights).")
  tokenizer: typing.Optional[str] = setting(
      None,
      "GPT2TokenizerFast key or directory. Default: the run's, else "
      "--model_key's (for an older run's final_model/, which holds none, the "
      "run's).")
  cache_dir: typing.Optional[str] = setting(
      None,
      "Neighbour cache holding the split's questions. Default: the run's; "
      "required with --model_key.")
  split: str = setting("validation", "Split of the cache to answer.",
                       choices=("validation", "test"))
  max_examples: int = setting(
      0, "Answer only the first this many questions; 0: all.")
  batch_size: int = setting(
      8,
      "Global batch: questions decoded at once over all replicas (a multiple "
      "of the number of replicas).")
  blocks_path: typing.Optional[str] = setting(
      None,
      "blocks.tfr of the cache's blocks (the block store the provenance "
      "titles are read through). Default: the cache manifest's.")
  titles_path: typing.Optional[str] = setting(
      None,
      "titles.tfr (record i: the page title of block i) for the provenance "
      "titles. Default: the cache manifest's titles_path; without one, "
      "provenance has no titles.")
  kilt_title_map: typing.Optional[str] = setting(
      None,
      "Title -> wikipedia_id JSON map (util_scripts/kilt_title_map.py): gives "
      "each provenance entry KILT's wikipedia_id, which KILT's R-precision, "
      "recall@5 and KILT-* scores need. Needs block titles (--titles_path or "
      "the manifest's).")
  approach_type: typing.Optional[str] = setting(
      None,
      "naked_lm: no contexts; cached_pretok: contexts from the cached "
      "neighbours; random_context: from the next question's (the last "
      "question takes the first's), as evaluation's random condition. "
      "live_retrieval: from neighbours retrieved now (--retrieval_server or "
      "--retriever_config_path; without either, the run's retrieval "
      "settings). Default: the run's (cached_pretok for a random_context "
      "run), else cached_pretok.", choices=context_draw.APPROACHES)
  num_retrievals: typing.Optional[int] = setting(
      None, "Contexts per prompt. Default: the run's, else 5.")
  retrieval_temperature: float = setting(
      0.0,
      "Contexts are drawn without replacement from softmax(scores / this), "
      "seeded as in training; 0 takes the top --num_retrievals by score.")
  retrieval_bank_size: typing.Optional[int] = setting(
      None,
      "Draw only among the best this many neighbours; 0: all cached. "
      "Default: the run's, else 0.")
  random_seed: typing.Optional[int] = setting(
      None,
      "Seed of the context draw (as in training). Default: the run's, else "
      "0.")
  # The layout settings given (task_specific.LayoutConfig's fields); the
  # others are the run's, else LayoutConfig's defaults.
  layout_overrides: dict = dataclasses.field(default_factory=dict)
  decoding: decoding_lib.DecodeSettings = decoding_lib.DecodeSettings()
  evaluate: bool = setting(
      False, "Score the generations with KILT's metrics against --gold_path.")
  gold_path: typing.Optional[str] = setting(
      None,
      "KILT gold jsonl with answers (e.g. "
      f"{kilt_files.ELI5_SPLIT_FILES['validation']}); required "
      "with --evaluate.")
  retrieval: live_retrieval.RetrievalConfig = live_retrieval.RetrievalConfig()
  strategy: tf_utils.StrategyConfig = tf_utils.StrategyConfig()


def config_from_flat(values, where):
  """The `GenerationConfig` of a flat {flag name: value} (a generation config
  of configs/, say): `task_specific.LayoutConfig`'s settings go to
  `layout_overrides`, as generation.py's layout flags do; an unknown name is
  a UserError naming `where`."""
  layout_names = set(settings.flat_defaults(task_specific.LayoutConfig))
  return settings.from_flat(
      GenerationConfig,
      {**{name: value for name, value in values.items()
          if name not in layout_names},
       "layout_overrides": {name: value for name, value in values.items()
                            if name in layout_names}},
      where)


def _model_and_tokenizer(config, strategy):
  """(model, tokenizer, its key, the run's TrainConfig or None, the weights'
  source)."""
  if bool(config.run_dir) == bool(config.model_key):
    raise utils.UserError(
        "give exactly one of --run_dir (a main.py run) and --model_key (a "
        "Hugging Face GPT-2)")
  if config.run_dir:
    run_config, train_config = training.read_run(config.run_dir)
    tokenizer_key = config.tokenizer or run_directory.tokenizer_dir(
        config.run_dir, run_config)
    tokenizer = task_specific.load_tokenizer(tokenizer_key)
    model, checkpoint, step = run_directory.load_model(
        config.run_dir, run_config, strategy)
    source = {"run_dir": config.run_dir, "checkpoint": checkpoint,
              "step": step}
    return model, tokenizer, tokenizer_key, train_config, source
  # Before the tokenizer, which may be the hub's too.
  gpt2_weights.check_hub_name(config.model_key, "--model_key")
  tokenizer_key = config.tokenizer or _model_tokenizer(config.model_key)
  tokenizer = task_specific.load_tokenizer(tokenizer_key)
  with strategy.scope():
    model = modeling.GPT2LMHeadModel.from_pretrained(config.model_key)
  return model, tokenizer, tokenizer_key, None, {"model_key": config.model_key}


def _model_tokenizer(model_key):
  """The tokenizer of a Hugging Face GPT-2: its own; for a run's
  final_model/ written before it held one, the run's."""
  if not tf.io.gfile.isdir(model_key) or any(
      tf.io.gfile.exists(os.path.join(model_key, name))
      for name in _TOKENIZER_FILES):
    return model_key
  parent = os.path.dirname(os.path.normpath(model_key))
  if run_directory.exists(parent):
    return run_directory.tokenizer_dir(parent,
                                       run_directory.read_config(parent))
  raise utils.UserError(
      f"--model_key={model_key}: holds no tokenizer "
      f"({' or '.join(_TOKENIZER_FILES)}) and is not in a run directory, "
      "expected --tokenizer=KEY_OR_DIR as well")


def _given(value, default):
  return default if value is None else value


def _approach(config, run):
  """The approach asked for, else the run's."""
  approach = context_draw.Approach(config.approach_type or run.approach_type)
  if not config.approach_type and (
      approach == context_draw.Approach.RANDOM_CONTEXT):
    # A random_context run is a control trained on the wrong contexts; it
    # answers from its own question's neighbours unless told otherwise.
    return context_draw.Approach.CACHED_PRETOK
  return approach


def _retrieval_config(config, run):
  """The live retrieval's settings: the flags' when they say where to
  retrieve from, else the run's."""
  given = config.retrieval
  if given.retrieval_server or given.retriever_config_path:
    return given
  return run.retrieval


def _data_config(config, run, approach, retrieval_config):
  """The contexts' settings: the flag's if given, else the run's (`run`: its
  TrainConfig, or the defaults for a Hugging Face model)."""
  return task_specific.DataConfig(
      **task_specific.approach_fields(
          approach, retrieval_config,
          live=approach == context_draw.Approach.LIVE_RETRIEVAL),
      num_retrievals=_given(config.num_retrievals, run.num_retrievals),
      retrieval_temperature=config.retrieval_temperature,
      retrieval_bank_size=_given(config.retrieval_bank_size,
                                 run.retrieval_bank_size),
      seed=_given(config.random_seed, run.random_seed))


def _block_titles(config, data_config, manifest, titles_path, title_map,
                  retrieval):
  """fn(block id) -> title or None; None for prompts without contexts.

  Live neighbours are blocks of the retrieval's corpus: their titles are
  its own when it runs here, else `--titles_path`'s.
  """
  if retrieval is not None and not config.titles_path and hasattr(
      retrieval, "titles"):
    return lambda block_id: retrieval.titles([block_id])[0]
  if title_map is not None and not titles_path:
    raise utils.UserError(
        "--kilt_title_map: the provenance needs block titles to map, but the "
        "cache's manifest has no titles_path; give --titles_path (REALM's "
        "titles.tfr)")
  if data_config.approach == context_draw.Approach.NAKED_LM or (
      retrieval is not None and not config.titles_path):
    return None
  blocks = block_store.BlockStore(
      config.blocks_path or manifest["blocks_path"], manifest["num_blocks"],
      titles_path=titles_path)
  return blocks.title


def generate(config):
  """Writes the generations of `config` (a `GenerationConfig`), resuming a
  killed job, and with `config.evaluate` their KILT metrics.

  Returns:
    The KILT metrics with `evaluate`, else None.
  """
  output_path = config.output_path
  if not output_path:
    raise utils.UserError("--output_path is required (the generations .jsonl)")
  utils.check_output_path(output_path, "--output_path")
  gold_records = None
  if config.evaluate:
    if config.split == "test":
      raise utils.UserError(
          "--evaluate: the test split has no gold answers (KILT scores it on "
          "its leaderboard); evaluate --split=validation")
    if not config.gold_path:
      raise utils.UserError(
          "--evaluate needs --gold_path (a KILT jsonl with answers, e.g. "
          f"{kilt_files.ELI5_SPLIT_FILES['validation']})")
    gold_records = kilt_metrics.read_gold(config.gold_path)
  title_map = (kilt_metrics.read_title_map(config.kilt_title_map)
               if config.kilt_title_map else None)

  strategy = tf_utils.strategy_from_config(config.strategy)
  if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    raise utils.UserError(
        "--distribute_mode=MultiWorkerMirroredStrategy: generation runs on one "
        "host (OneDeviceStrategy, MirroredStrategy or TPUStrategy); run one "
        "job per split or per --max_examples range instead")
  batch_size = config.batch_size
  num_replicas = strategy.num_replicas_in_sync
  if batch_size < 1 or batch_size % num_replicas:
    raise utils.UserError(
        f"--batch_size={batch_size}: must be a positive multiple of the "
        f"{num_replicas} replicas")
  if config.max_examples < 0:
    raise utils.UserError(
        f"--max_examples={config.max_examples}: must be >= 0 (0: all)")

  model, tokenizer, tokenizer_key, train_config, source = (
      _model_and_tokenizer(config, strategy))
  # A Hugging Face model has no run: training's defaults stand in for it.
  run = train_config or training.TrainConfig()
  cache_dir = config.cache_dir or run.cache_dir
  if not cache_dir:
    raise utils.UserError("--cache_dir is required with --model_key")
  manifest = neighbour_cache.read_manifest(cache_dir)
  neighbour_cache.check_manifest(
      manifest, cache_dir, split=config.split,
      vocab_size=model.config.vocab_size,
      tokenizer_fingerprint=neighbour_cache.tokenizer_fingerprint(tokenizer))
  approach = _approach(config, run)
  retrieval_config = _retrieval_config(config, run)
  data_config = _data_config(config, run, approach, retrieval_config)
  task_specific.check_data_config(data_config, manifest, cache_dir)
  retrieval = None
  if data_config.live_num_neighbours:
    retrieval = live_retrieval.open_retrieval(retrieval_config, tokenizer)
  layout_config = settings.from_flat(
      task_specific.LayoutConfig,
      {**settings.flatten(run.layout), **config.layout_overrides}, "layout")
  layout = task_specific.make_layout(tokenizer, layout_config,
                                     model.config.n_positions)
  decode = decoding_lib.resolve_max_new_tokens(
      config.decoding, layout, model.config.n_positions)
  titles_path = config.titles_path or manifest.get("titles_path")
  titles = _block_titles(config, data_config, manifest, titles_path, title_map,
                         retrieval)

  prompts = read_prompts(
      neighbour_cache.split_files(cache_dir, manifest, config.split),
      data_config, layout, config.max_examples, retrieval)
  truncation = truncation_summary(prompts, layout)
  logging.info("prompt layout: %s", truncation)

  record = {
      "output_name": os.path.basename(output_path), "source": source,
      "tokenizer": tokenizer_key, "cache_dir": cache_dir,
      "split": config.split, "max_examples": config.max_examples,
      "num_examples": len(prompts["id"]),
      "approach_type": approach.value,
      # What the neighbours are (a resumed job must retrieve from the same
      # index), not where they were served from.
      "retrieval": retrieval and {
          name: value for name, value in live_retrieval.recorded(
              retrieval).items() if name != "source"},
      "num_retrievals": data_config.num_retrievals,
      "retrieval_temperature": data_config.retrieval_temperature,
      "retrieval_bank_size": data_config.retrieval_bank_size,
      "random_seed": data_config.seed,
      "layout": dict(settings.flatten(layout_config),
                     sequence_length=layout.sequence_length),
      "prompt_length": layout.prompt_length,
      "decoding": dataclasses.asdict(decode),
      "batch_size": batch_size, "num_replicas": num_replicas,
      "titles_path": titles_path,
      "kilt_title_map": config.kilt_title_map,
  }
  # One job at a time writes an output: a second one fails at once.
  with utils.locked_directory(os.path.dirname(output_path) or ".",
                              f"{os.path.basename(output_path)}.lock",
                              f"generation output {output_path}"):
    if prepare_output(output_path, record):
      print(f"{output_path}: already complete", flush=True)
    else:
      generate_batch = decoding_lib.make_batch_generator(
          strategy, model, decode, tokenizer.eos_token_id)

      def format_batch(rows, tokens):
        lines = []
        for example_index, example_tokens in zip(range(rows.start, rows.stop),
                                                 tokens):
          lines.append(json.dumps(generation_record(
              tokenizer, prompts, example_index, example_tokens, titles,
              title_map)) + "\n")
        return "".join(lines)

      num_batches = -(-len(prompts["id"]) // batch_size)
      with tqdm.tqdm(total=num_batches, desc="generate", unit="batch") as bar:
        write_generations(output_path, prompts, batch_size, generate_batch,
                          format_batch, bar)
      print(f"wrote {len(prompts['id'])} generations to {output_path}; "
            f"{truncation}", flush=True)
    if title_map is not None:
      # Counted over the whole file, batches of an earlier, resumed run too.
      warning = kilt_metrics.unmapped_title_warning(
          [output.get("provenance", []) for output in
           kilt_metrics.read_guess_outputs(output_path).values()],
          config.kilt_title_map)
      if warning:
        print(warning, file=sys.stderr, flush=True)
    if gold_records is None:
      return None
    metrics = evaluate_output(gold_records, config.gold_path, output_path)
    utils.atomic_write_json(
        os.path.join(os.path.dirname(output_path) or ".", METRICS_NAME),
        metrics)
    name = os.path.basename(output_path)
    sys.stdout.write(kilt_metrics.markdown_table({name: metrics}) + "\n" +
                     kilt_metrics.grounding_table(metrics, name))
    return metrics
