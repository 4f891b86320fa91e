r"""Contrastive training of REALM's query embedder (and optionally its block embedder).

  import retriever_training
  retriever_training.train(retriever_training.RetrieverTrainConfig(
      retriever_config_path=W + "/retriever_config.json",
      train_path=W + "/kilt/eli5-train-kilt.jsonl",
      kilt_title_map=TITLE_MAP, output_dir=OUT, max_steps=300))

Training pairs, one per question:
- a KILT jsonl (`train_format=kilt`): the question and the first block of its
  gold provenance page (the page's `wikipedia_id` -> its title through the
  KILT title map -> the blocks of that title in titles.tfr); a question
  whose provenance names no block is paired with its first answer instead
  (c-REALM's question <-> answer objective), the answer embedded as a block
  without title;
- DPR's JSON (`train_format=dpr`): `question`, `positive_ctxs[0]` as the
  positive, `hard_negative_ctxs` (then `negative_ctxs`) as hard negatives,
  each context a `{"title", "text"}`.
With `index_hard_negatives` (KILT), each question's hard negatives are the
blocks the starting query embedder ranks highest in the index, its positive
left out. The loss is the in-batch softmax over the global batch (`grad_cache.
contrastive_loss`): every other positive and every hard negative of the
batch is a negative. Blocks are embedded from their text by the block
embedder, frozen unless `train_block_embedder` (REALM's retriever is
then trained on both sides, and the index must be refreshed).

With `grad_cache`, each step's gradient is computed by the gradient cache
(`grad_cache.cached_gradients`, chunks of `query_chunk_size` /
`block_chunk_size` examples per replica), else by one forward per replica
(`grad_cache.full_batch_gradients`): the same update, the cache at the
memory of a chunk. Dropout (`dropout_rate`, on the embeddings, as ORQA's
ict_model) draws each example's mask from a seed of (random_seed, step,
the example's index in the global batch), so both ways give the same update.

The output directory holds: `config.json` (the run's settings; a rerun
with others is refused, but for those in `_RESUMABLE_CHANGES`),
`checkpoints/` (embedders, optimizer, step; rerunning the same command
resumes from the latest, with the same batches and dropout),
`tensorboard/` (loss, learning rate, retrieval metrics),
`exports/query_embedder-{step:08d}/` (and `block_embedder-...` when it
trains) in the format `query_embedder.QueryEmbedder` loads, with
`exports/latest.json` (`step`, `query_embedder`, `block_embedder`) written
last, and `retriever_eval.json`: KILT's retrieval metrics (R-Prec,
recall@k, ... of provenance pages, `kilt_metrics.corpus_retrieval_metrics`)
of `eval_path`'s questions before training and after it, by exact search
over the block embeddings (the index's, or the trained block embedder's).
"""

import dataclasses
import json
import os
import typing

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

import block_store
import grad_cache
import kilt_files
import kilt_metrics
import query_embedder
import realm_embedder
import retrievers
import settings
import tf_utils
import utils

setting = settings.setting

TRAIN_FORMATS = ("kilt", "dpr")
LOCK_NAME = "lock"
EVAL_FILE = "retriever_eval.json"
LATEST_EXPORT_FILE = "latest.json"
_DPR_FIELDS = ("question", "positive_ctxs")
_CONTEXT_FIELDS = ("title", "text")
_EMBED_BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class RetrieverTrainConfig:
  """Every setting of a retriever training run (train_retriever.py's flags)."""
  retriever_config_path: typing.Optional[str] = setting(
      None,
      "Required. Retriever config JSON (query_embedder_path, text_records, "
      "title_records, num_block_records): the embedder both towers start "
      "from, the blocks and their index.")
  train_path: typing.Optional[str] = setting(
      None, "Required. Training questions: a KILT jsonl or DPR's JSON.")
  train_format: str = setting(
      "kilt",
      "kilt: question <-> its gold provenance block (else its answer); dpr: "
      "DPR's JSON (question, positive_ctxs, hard_negative_ctxs, "
      "negative_ctxs).", choices=TRAIN_FORMATS)
  kilt_title_map: typing.Optional[str] = setting(
      None,
      "KILT title -> wikipedia_id JSON (util_scripts/kilt_title_map.py): "
      "maps provenance pages to blocks (--train_format=kilt) and retrieved "
      "blocks to pages (--eval_path). Without it KILT questions pair with "
      "their answers.")
  eval_path: typing.Optional[str] = setting(
      None,
      "Optional KILT jsonl with provenance: retrieval metrics of its "
      "questions before and after training (needs --kilt_title_map).")
  output_dir: typing.Optional[str] = setting(
      None, "Required. Directory of the run (checkpoints, exports, metrics).")
  max_steps: int = setting(1000, "Training steps (updates).")
  batch_size: int = setting(
      32, "Questions per step, over all replicas (the in-batch negatives).")
  num_hard_negatives: int = setting(
      0, "Hard negative blocks per question (DPR's hard_negative_ctxs, then "
      "negative_ctxs).")
  index_hard_negatives: bool = setting(
      False,
      "--train_format=kilt: mine --num_hard_negatives per question from the "
      "index: the blocks the starting query embedder ranks highest, its "
      "positive left out.")
  grad_cache: bool = setting(
      False, "Compute each step's gradient with the gradient cache.")
  query_chunk_size: int = setting(
      8, "--grad_cache: questions encoded at once per replica.")
  block_chunk_size: int = setting(
      8, "--grad_cache: blocks encoded at once per replica.")
  train_block_embedder: bool = setting(
      False, "Train the block embedder too (else it is frozen).")
  block_embedder_path: typing.Optional[str] = setting(
      None,
      "The block embedder to start from, the one that made the index's block "
      "embeddings (e.g. an export of an earlier run). Default: the retriever "
      "config's embedder (REALM's embeds both sides).")
  max_query_length: int = setting(
      64, "Wordpieces of a training question, [CLS] and [SEP] included.")
  max_block_length: int = setting(
      query_embedder.BLOCK_MAX_LENGTH,
      "Wordpieces of a block, [CLS] title [SEP] text [SEP] (ORQA: 288).")
  dropout_rate: float = setting(
      realm_embedder.ORQA_DROPOUT_RATE,
      "Dropout on the embeddings while training (ORQA's ict_model: 0.1).")
  optimizer_type: str = setting("adam", "Optimizer.",
                                choices=tf_utils.OPTIMIZERS)
  learning_rate: float = setting(1e-5, "Peak learning rate.")
  warmup_steps: int = setting(0, "Linear warmup steps.")
  random_seed: int = setting(0, "Seed of the data order and of dropout.")
  checkpoint_every: int = setting(
      100, "Steps between checkpoints (and exports).")
  summary_every: int = setting(10, "Steps between TensorBoard scalars.")
  eval_batch_size: int = setting(
      _EMBED_BATCH_SIZE, "Questions (and blocks) embedded at once to evaluate.")
  strategy: tf_utils.StrategyConfig = tf_utils.StrategyConfig()


# ---------------------------------------------------------------------------
# Training pairs
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
  """A question, its positive block and hard negatives: (title, text) each.

  `positive_block`: the positive's block id when it is a block of the index.
  """
  question: str
  positive: tuple
  hard_negatives: tuple
  positive_block: typing.Optional[int] = None


def _json_objects(path):
  """(line number, object) of each element of a JSON array, or of a jsonl file."""
  if not tf.io.gfile.exists(path):
    raise utils.UserError(f"{path}: DPR training file does not exist")
  with tf.io.gfile.GFile(path, "r") as f:
    text = f.read()
  if not text.lstrip().startswith("["):
    yield from kilt_files.read_jsonl(path, "DPR training file")
    return
  decoder = json.JSONDecoder()
  position = text.index("[") + 1
  while True:
    while position < len(text) and text[position] in " \t\r\n,":
      position += 1
    if position >= len(text) or text[position] == "]":
      return
    line = text.count("\n", 0, position) + 1
    try:
      value, position = decoder.raw_decode(text, position)
    except json.JSONDecodeError as error:
      raise utils.UserError(f"{path}: line {error.lineno}: malformed JSON "
                            f"({error.msg})") from None
    yield line, value


def _dpr_context(context, where, field):
  if not isinstance(context, dict):
    raise utils.UserError(f"{where}: an entry of {field!r} is not an object, "
                          "expected {\"title\", \"text\"}")
  for name in _CONTEXT_FIELDS:
    if not isinstance(context.get(name), str):
      raise utils.UserError(
          f"{where}: an entry of {field!r} has no string {name!r}, expected "
          "{\"title\", \"text\"}")
  return context["title"], context["text"]


def dpr_examples(path, num_hard_negatives):
  """The Examples of a DPR training file (a JSON array, or jsonl)."""
  examples = []
  for line, record in _json_objects(path):
    where = f"{path}: line {line}"
    if not isinstance(record, dict):
      raise utils.UserError(f"{where}: expected a JSON object")
    for field in _DPR_FIELDS:
      if field not in record:
        raise utils.UserError(f"{where}: no {field!r} field (a DPR example "
                              "has question, positive_ctxs, "
                              "hard_negative_ctxs, negative_ctxs)")
    if not isinstance(record["question"], str):
      raise utils.UserError(f"{where}: 'question' is not a string")
    contexts = {}
    for field in ("positive_ctxs", "hard_negative_ctxs", "negative_ctxs"):
      entries = record.get(field, [])
      if not isinstance(entries, list):
        raise utils.UserError(f"{where}: {field!r} is not a list")
      contexts[field] = [_dpr_context(c, where, field) for c in entries]
    if not contexts["positive_ctxs"]:
      raise utils.UserError(f"{where}: 'positive_ctxs' is empty, expected at "
                            "least one positive context")
    negatives = contexts["hard_negative_ctxs"] + contexts["negative_ctxs"]
    if len(negatives) < num_hard_negatives:
      raise utils.UserError(
          f"{where}: {len(negatives)} hard_negative_ctxs + negative_ctxs, "
          f"expected at least --num_hard_negatives={num_hard_negatives}")
    examples.append(Example(record["question"], contexts["positive_ctxs"][0],
                            tuple(negatives[:num_hard_negatives])))
  return examples


def first_block_of_page(store, title_map):
  """{wikipedia_id: the first block id whose title maps to it}."""
  titles = store.titles(range(store.num_blocks))
  first = {}
  for block_id, title in enumerate(titles):
    page = title_map.get(title)
    if page is not None:
      first.setdefault(page, block_id)
  return first


def kilt_examples(path, store, block_of_page):
  """The Examples of a KILT jsonl: gold provenance block, else first answer."""
  examples = []
  num_by_answer = 0
  for line, record in kilt_files.read_jsonl(path, "KILT training file"):
    where = f"{path}: line {line}"
    if not isinstance(record.get("input"), str):
      raise utils.UserError(f"{where}: no string 'input' (the question)")
    pages = [page for output_pages in kilt_metrics.gold_pages(record)
             for page in output_pages if page in block_of_page]
    block_id = None
    if pages:
      block_id = block_of_page[pages[0]]
      positive = (store.title(block_id) or "", store.text(block_id))
    else:
      answers = kilt_metrics.gold_answers(record)
      if not answers:
        raise utils.UserError(
            f"{where}: no provenance block and no answer, expected a gold "
            "page of the blocks (through --kilt_title_map) or an answer")
      positive = ("", answers[0])
      num_by_answer += 1
    examples.append(Example(record["input"], positive, (), block_id))
  if num_by_answer:
    logging.info("%s: %d of %d questions paired with their answer (no "
                 "provenance block)", path, num_by_answer, len(examples))
  return examples


def with_index_hard_negatives(examples, query_embeddings, block_embeddings,
                              store, count):
  """`examples` with their `count` top-ranked blocks of the index but their
  positive as hard negatives (ranked by exact search)."""
  _, ids = retrievers.exact_search(query_embeddings, block_embeddings,
                                   count + 1)
  mined = []
  for example, ranked in zip(examples, np.asarray(ids)):
    negatives = [int(b) for b in ranked if b != example.positive_block][:count]
    mined.append(dataclasses.replace(example, hard_negatives=tuple(
        (title or "", text) for title, text in zip(store.titles(negatives),
                                                   store.texts(negatives)))))
  return mined


@dataclasses.dataclass(frozen=True)
class Features:
  """The training set as int32 arrays: queries [N, Lq], blocks [N, 1 + h, Lb]."""
  queries: dict
  blocks: dict


def featurize(examples, wordpieces, config):
  queries = realm_embedder.query_features(
      wordpieces, [e.question for e in examples], config.max_query_length)
  per = 1 + config.num_hard_negatives
  blocks = realm_embedder.block_features(
      wordpieces, [pair for e in examples
                   for pair in (e.positive,) + e.hard_negatives],
      config.max_block_length)
  return Features(queries, {name: value.reshape(len(examples), per, -1)
                            for name, value in blocks.items()})


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def batch_indices(num_examples, batch_size, seed, step):
  """The examples of step `step`: a seeded shuffle per epoch, no remainder."""
  steps_per_epoch = num_examples // batch_size
  epoch, position = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * batch_size:(position + 1) * batch_size]


def example_seeds(seed, step, count):
  """int32 [count]: the dropout seed of each row of a step (by global index)."""
  return np.random.default_rng([seed, step, 1]).integers(
      0, 2**31 - 1, count).astype(np.int32)


def replica_batch(features, indices, seeds, replica, num_replicas):
  """One replica's (query, block) inputs: (features, seeds) each.

  Its questions are rows replica * n ... of the global batch; its blocks are
  their positives then their hard negatives (`grad_cache.contrastive_loss`).
  """
  per_replica = len(indices) // num_replicas
  rows = slice(replica * per_replica, (replica + 1) * per_replica)
  mine = indices[rows]
  queries = {name: value[mine] for name, value in features.queries.items()}
  blocks = {}
  for name, value in features.blocks.items():
    chosen = value[mine]  # [n, 1 + h, Lb]
    blocks[name] = np.concatenate([chosen[:, 0], chosen[:, 1:].reshape(
        -1, chosen.shape[-1])])
  num_queries = len(indices)
  query_seeds = seeds[:num_queries][rows]
  block_seeds = seeds[num_queries:].reshape(num_queries, -1)[rows]
  block_seeds = np.concatenate([block_seeds[:, 0],
                                block_seeds[:, 1:].reshape(-1)])
  return (queries, query_seeds), (blocks, block_seeds)


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


def _embed_fn(embedder):
  return tf.function(
      lambda ids, mask, segments: embedder(ids, mask, segments),
      input_signature=[tf.TensorSpec([None, None], tf.int32)] * 3)


def embed_questions(embedder, questions, batch_size):
  """float32 [Q, D]: questions as the query embedder's export embeds them
  (`QueryEmbedder`: [CLS] q [SEP], not cut, no dropout)."""
  embed = _embed_fn(embedder)
  outputs = []
  for start in range(0, len(questions), batch_size):
    ids = embedder.wordpieces.query_ids(questions[start:start + batch_size])
    features = query_embedder.pad_features(ids)
    outputs.append(embed(features["input_ids"], features["input_mask"],
                         features["segment_ids"]).numpy())
  return np.concatenate(outputs) if outputs else np.zeros([0, 0], np.float32)


def embed_blocks(embedder, store, max_length, batch_size):
  """float32 [N, D]: every block of `store`, as ORQA's encode_blocks.py."""
  embed = _embed_fn(embedder)
  outputs = []
  for start in tqdm.trange(0, store.num_blocks, batch_size, desc="blocks",
                           disable=None, leave=False):
    ids = range(start, min(start + batch_size, store.num_blocks))
    features = realm_embedder.block_features(
        embedder.wordpieces, zip([t or "" for t in store.titles(ids)],
                                 store.texts(ids)), max_length)
    outputs.append(embed(features["input_ids"], features["input_mask"],
                         features["segment_ids"]).numpy())
  return np.concatenate(outputs)


def evaluate(records, query_embeddings, block_embeddings, store, title_map):
  """KILT's retrieval metrics of exact search for `records`' questions."""
  k = max(kilt_metrics.RETRIEVAL_KS)
  scores, ids = retrievers.exact_search(query_embeddings, block_embeddings, k)
  provenance = {
      str(record["id"]).strip(): kilt_metrics.block_provenance(
          block_ids, block_scores, store.title, title_map)
      for record, block_ids, block_scores in zip(records, np.asarray(ids),
                                                 np.asarray(scores))}
  return kilt_metrics.corpus_retrieval_metrics(records, provenance)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _check_config(config):
  for name in ("retriever_config_path", "train_path", "output_dir"):
    if not getattr(config, name):
      raise utils.UserError(f"--{name} is required")
  if config.eval_path and not config.kilt_title_map:
    raise utils.UserError("--eval_path needs --kilt_title_map (retrieved "
                          "blocks are scored by their pages)")
  for name in ("max_steps", "batch_size", "checkpoint_every", "summary_every",
               "eval_batch_size"):
    utils.check_at_least(name, getattr(config, name), 1)
  utils.check_at_least("num_hard_negatives", config.num_hard_negatives, 0)
  if config.max_query_length < 2 or config.max_block_length < 3:
    raise utils.UserError(
        "--max_query_length must be >= 2 and --max_block_length >= 3 (room "
        "for [CLS] and [SEP])")
  if not 0 <= config.dropout_rate < 1:
    raise utils.UserError(
        f"--dropout_rate={config.dropout_rate}: expected in [0, 1)")
  utils.check_output_path(config.output_dir, "--output_dir", directory=True)


def _check_batch(config, num_replicas):
  if config.batch_size % num_replicas:
    raise utils.UserError(
        f"--batch_size={config.batch_size}: expected a multiple of the "
        f"{num_replicas} replicas")
  if config.grad_cache:
    per_replica = config.batch_size // num_replicas
    grad_cache.check_chunk_size(config.query_chunk_size, per_replica,
                                "query_chunk_size")
    grad_cache.check_chunk_size(
        config.block_chunk_size, per_replica * (1 + config.num_hard_negatives),
        "block_chunk_size")


def _examples(config, store, title_map, query_embedder, index_embeddings):
  if config.train_format == "dpr":
    if config.index_hard_negatives:
      raise utils.UserError("--index_hard_negatives: DPR files bring their "
                            "own (hard_negative_ctxs); expected "
                            "--train_format=kilt")
    return dpr_examples(config.train_path, config.num_hard_negatives)
  if config.num_hard_negatives and not config.index_hard_negatives:
    raise utils.UserError(
        f"--num_hard_negatives={config.num_hard_negatives}: a KILT file has "
        "no hard negatives, expected --index_hard_negatives (mined from the "
        "index) or --train_format=dpr")
  block_of_page = first_block_of_page(store, title_map) if title_map else {}
  examples = kilt_examples(config.train_path, store, block_of_page)
  if config.index_hard_negatives and config.num_hard_negatives:
    examples = with_index_hard_negatives(
        examples, embed_questions(query_embedder, [e.question for e in examples],
                                  config.eval_batch_size),
        index_embeddings(), store, config.num_hard_negatives)
  return examples


def _tower(embedder, chunk_size, trainable):
  def encode(features, seeds):
    return embedder(features["input_ids"], features["input_mask"],
                    features["segment_ids"], seeds if trainable else None)
  variables = tuple(embedder.trainable_variables) if trainable else ()
  return grad_cache.Tower(encode, variables, chunk_size)


def _make_train_step(strategy, config, towers, optimizer):
  gradients_fn = (grad_cache.cached_gradients if config.grad_cache
                  else grad_cache.full_batch_gradients)
  variables = [v for tower in towers for v in tower.variables]

  def replica_step(inputs):
    loss, gradients = gradients_fn(towers, inputs, grad_cache.contrastive_loss)
    optimizer.apply_gradients(zip(
        [g for tower_gradients in gradients for g in tower_gradients],
        variables))
    return loss

  @tf.function
  def step(inputs):
    losses = strategy.run(replica_step, args=(inputs,))
    # Every replica computed the same global loss.
    return strategy.experimental_local_results(losses)[0]

  return step


def _export_all(config, embedders, step):
  exports_dir = utils.makedirs(os.path.join(config.output_dir, "exports"))
  latest = {"step": step}
  for name, embedder in embedders.items():
    path = os.path.join(exports_dir, f"{name}-{step:08d}")
    realm_embedder.export(embedder, path)
    latest[name] = path
  latest.setdefault("block_embedder", None)
  utils.atomic_write_json(os.path.join(exports_dir, LATEST_EXPORT_FILE), latest)
  return latest


def _write_scalars(writer, step, values):
  with writer.as_default(step=step):
    for name, value in values.items():
      tf.summary.scalar(name, value)
  writer.flush()


class _Evaluation:
  """The eval questions, and their metrics for the current embedders."""

  def __init__(self, config, store, title_map, index_embeddings):
    self._records = kilt_metrics.read_gold(config.eval_path)
    self._config = config
    self._store = store
    self._title_map = title_map
    self._index_embeddings = index_embeddings

  def __call__(self, query_embedder, block_embedder):
    blocks = self._index_embeddings
    if self._config.train_block_embedder:
      blocks = embed_blocks(block_embedder, self._store,
                            self._config.max_block_length,
                            self._config.eval_batch_size)
    queries = embed_questions(query_embedder,
                              [r["input"] for r in self._records],
                              self._config.eval_batch_size)
    return evaluate(self._records, queries, blocks, self._store,
                    self._title_map)


def _summary_of(metrics):
  return {"rprec": metrics["rprec"],
          **{f"recall@{k}": metrics["retrieval"][f"recall@{k}"]
             for k in kilt_metrics.RETRIEVAL_KS if k > 1}}


def summary_lines(results):
  """One line per evaluation of `train`'s results (retriever_eval.json)."""
  return [f"{when} (step {results[when]['step']}): " + ", ".join(
      f"{name} {value:.4f}" for name, value in _summary_of(results[when]).items())
          for when in ("before", "after") if when in results]


# Settings a resumed run may change: they do not change its updates.
_RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "summary_every",
                      "eval_path", "eval_batch_size")
CONFIG_FILE = "config.json"


def _check_resumed_settings(config):
  """Writes the run's settings; a rerun with other settings is refused."""
  path = os.path.join(config.output_dir, CONFIG_FILE)
  flat = settings.flatten(config)
  if tf.io.gfile.exists(path):
    recorded = utils.read_json(path, "run settings")
    for name, value in sorted(flat.items()):
      if name not in _RESUMABLE_CHANGES and recorded.get(name) != value:
        raise utils.UserError(
            f"--{name}={value}: {path} records {recorded.get(name)!r} for this "
            f"run; resume with the same settings (only "
            f"{', '.join(_RESUMABLE_CHANGES)} may change) or use a new "
            "--output_dir")
  utils.atomic_write_json(path, flat)


def train(config):
  """Trains the retriever as `config` says; returns retriever_eval.json's content."""
  _check_config(config)
  strategy = tf_utils.strategy_from_config(config.strategy)
  _check_batch(config, strategy.num_replicas_in_sync)
  retriever = retrievers.load_retriever_config(config.retriever_config_path)
  store = block_store.BlockStore(retriever["text_records"],
                                 retriever["num_block_records"],
                                 retriever["title_records"])
  title_map = (kilt_metrics.read_title_map(config.kilt_title_map)
               if config.kilt_title_map else None)
  with utils.locked_directory(config.output_dir, LOCK_NAME,
                              f"retriever training run {config.output_dir}"):
    _check_resumed_settings(config)
    return _train_locked(config, strategy, retriever, store, title_map)


@dataclasses.dataclass
class _State:
  """What a run trains and checkpoints."""
  query_embedder: realm_embedder.RealmEmbedder
  block_embedder: realm_embedder.RealmEmbedder
  optimizer: typing.Any
  step: tf.Variable

  def trained(self, config):
    """{export name: embedder} of the embedders that train."""
    embedders = {"query_embedder": self.query_embedder}
    if config.train_block_embedder:
      embedders["block_embedder"] = self.block_embedder
    return embedders


def _initial_state(config, strategy, embedder_path):
  paths = {"query_embedder": embedder_path,
           "block_embedder": config.block_embedder_path or embedder_path}
  with strategy.scope():
    embedders = [realm_embedder.load(path, dropout_rate=config.dropout_rate,
                                     name=name)
                 for name, path in paths.items()]
    optimizer = tf_utils.make_optimizer(
        config.optimizer_type, tf_utils.make_learning_rate_schedule(
            "constant", config.learning_rate,
            warmup_steps=config.warmup_steps))
    step = tf.Variable(0, dtype=tf.int64, trainable=False)
  return _State(*embedders, optimizer, step)


def _evaluated(evaluation, state, writer):
  metrics = dict(evaluation(state.query_embedder, state.block_embedder),
                 step=int(state.step.numpy()))
  _write_scalars(writer, metrics["step"],
                 {f"eval/{k}": v for k, v in _summary_of(metrics).items()})
  return metrics


def _train_locked(config, strategy, retriever, store, title_map):
  embedder_path = retriever["query_embedder_path"]
  state = _initial_state(config, strategy, embedder_path)
  index = []  # The index's block embeddings, read when first needed.

  def index_embeddings():
    if not index:
      index.append(retrievers.load_block_embeddings(embedder_path,
                                                    store.num_blocks))
    return index[0]

  # Before the checkpoint is restored: hard negatives are mined by the
  # starting query embedder, so a resumed run mines the same.
  examples = _examples(config, store, title_map, state.query_embedder,
                       index_embeddings)
  if len(examples) < config.batch_size:
    raise utils.UserError(
        f"{config.train_path}: {len(examples)} training questions, expected "
        f"at least --batch_size={config.batch_size}")
  features = featurize(examples, state.query_embedder.wordpieces, config)
  trained = state.trained(config)
  checkpoint = tf.train.Checkpoint(optimizer=state.optimizer, step=state.step,
                                   **trained)
  manager = tf_utils.make_checkpoint_manager(
      os.path.join(config.output_dir, "checkpoints"), checkpoint)
  tf_utils.restore_latest(manager, "retriever training state")
  writer = tf.summary.create_file_writer(
      os.path.join(config.output_dir, "tensorboard"))
  eval_path = os.path.join(config.output_dir, EVAL_FILE)
  results = (utils.read_json(eval_path, "retriever evaluation")
             if tf.io.gfile.exists(eval_path) else {})
  evaluation = None
  if config.eval_path:
    evaluation = _Evaluation(config, store, title_map, None if
                             config.train_block_embedder else
                             index_embeddings())
    if "before" not in results:
      results["before"] = _evaluated(evaluation, state, writer)
      utils.atomic_write_json(eval_path, results)

  step = _training_loop(config, strategy, state, features, manager, writer)
  latest_path = os.path.join(config.output_dir, "exports", LATEST_EXPORT_FILE)
  if not tf.io.gfile.exists(latest_path) or utils.read_json(
      latest_path, "latest export")["step"] != step:
    # Killed between the last checkpoint and its export.
    _export_all(config, trained, step)
  if evaluation is not None and results.get("after", {}).get("step") != step:
    results["after"] = _evaluated(evaluation, state, writer)
  results["exports"] = utils.read_json(latest_path, "latest export")
  utils.atomic_write_json(eval_path, results)
  return results


def _training_loop(config, strategy, state, features, manager, writer):
  """Trains from the state's step to max_steps; returns the last step."""
  towers = [_tower(state.query_embedder, config.query_chunk_size, True),
            _tower(state.block_embedder, config.block_chunk_size,
                   config.train_block_embedder)]
  train_step = _make_train_step(strategy, config, towers, state.optimizer)
  num_replicas = strategy.num_replicas_in_sync
  num_examples = features.queries["input_ids"].shape[0]
  step = int(state.step.numpy())
  with tqdm.tqdm(total=config.max_steps, initial=step, desc="retriever",
                 disable=None) as progress:
    while step < config.max_steps:
      indices = batch_indices(num_examples, config.batch_size,
                              config.random_seed, step)
      seeds = example_seeds(config.random_seed, step, config.batch_size * (
          2 + config.num_hard_negatives))
      inputs = strategy.experimental_distribute_values_from_function(
          lambda context: replica_batch(  # pylint: disable=cell-var-from-loop
              features, indices, seeds, context.replica_id_in_sync_group,
              num_replicas))
      loss = float(train_step(inputs))
      step += 1
      state.step.assign(step)
      progress.update(1)
      if step % config.summary_every == 0 or step == config.max_steps:
        _write_scalars(writer, step, {
            "train/loss": loss,
            "train/learning_rate": float(tf.convert_to_tensor(
                state.optimizer.learning_rate))})
      if step % config.checkpoint_every == 0 or step == config.max_steps:
        manager.save(checkpoint_number=step)
        _export_all(config, state.trained(config), step)
  return step
