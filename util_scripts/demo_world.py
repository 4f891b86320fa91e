r"""The demo world, flag-free: `build_world` writes every artefact of it.

`util_scripts/make_demo_data.py` is its command line; its docstring (its
`--help`) lists the files and says how the world and its toy REALM embedder
are made. `run_demo.py` and the tests call `build_world` in-process. The
files are a pure function of the seed and the sizes.
"""

import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
import tokenizers
import tqdm
import transformers

import evaluation
import kilt_files
import kilt_metrics
import query_embedder
import retrievers
import tf_utils
import utils

# The world's default sizes (make_demo_data.py's flags default to them).
DEFAULT_SIZES = dict(num_train=30000, num_validation=400, num_test=150,
                     num_distractor_blocks=10000, gpt2_vocab_size=3000)
EMBEDDING_SIZE = 128
# The norm of every embedding, so scores lie in [-16, 16]. Unit vectors would
# give cosines whose gold-to-runner-up gap (median 0.19 at the default size)
# vanishes in a softmax at retrieval temperature 1; at norm 4 the gap is ~3
# nats, so sampling contexts at temperature 1 mostly draws the gold block first.
EMBEDDING_NORM = 4.0
DO_LOWER_CASE = True
GPT2_SPECIAL_TOKEN = "<|endoftext|>"
# What a TF1 Hub export writes as tfhub_module.pb: a ModuleDef of format 3.
HUB_MODULE_DEF = b"\x08\x03"
# The TF1 Hub module's tag sets: with dropout ({"train"}) and inference ({}).
# The toy embedder has no dropout, so both hold the same graph.
HUB_TAG_SETS = (["train"], [])
# A small GPT-2, as measured in DESIGN.md ("The embedded default"). Dropout is
# off: facts never repeat, so there is nothing to over-fit, and dropout only
# slows down learning to copy from the context in the demo's few steps.
MODEL_CONFIG = dict(n_layer=2, n_embd=128, n_head=4, n_positions=256,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
_EMBED_BATCH_SIZE = 1024
# Blocks (and questions, and answers) the GPT-2 tokenizer is trained on. Names
# are random strings of syllables, so a sample teaches the same merges as the
# whole text, in a fraction of the time.
_GPT2_TOKENIZER_SAMPLE = 8000

# ---------------------------------------------------------------------------
# The world: made-up entities, their blocks, questions and answers
# ---------------------------------------------------------------------------

# Names are strings of syllables, so that they split into several BPE pieces
# and no name is a single token the model could learn as a unit.
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m",
           "n", "p", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "n", "r", "l", "s", "th", "nd", "m", "k")
SYLLABLES = tuple(o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS)

# (name suffix, what it is, verb of its founder/builder).
_KINDS = (
    ("Society", "a learned society", "founded"),
    ("Museum", "a museum", "founded"),
    ("Library", "a library", "founded"),
    ("Academy", "an academy", "founded"),
    ("Orchestra", "an orchestra", "founded"),
    ("Bridge", "a bridge", "built"),
    ("Observatory", "an observatory", "built"),
    ("Lighthouse", "a lighthouse", "built"),
    ("Canal", "a canal", "built"),
    ("Railway", "a railway", "built"),
    ("Theatre", "a theatre", "designed"),
    ("Cathedral", "a cathedral", "designed"),
)
_FIRST_YEAR, _LAST_YEAR = 1100, 1999

# Several phrasings, each stating all three facts in a different order. Each
# fact follows its own marker word, which appears nowhere else in the block
# (`in {year}`, `by {person}`, `city of {city}`), and the answer repeats the
# markers: answering is "find the marker just written in the block, copy what
# follows it", the induction pattern a 2-layer GPT-2 can learn.
_BLOCK_TEMPLATES = (
    "The {name} is {what} from the city of {city}. It was {verb} in {year} "
    "by {person}.",
    "From the city of {city}, the {name} is {what} {verb} by {person} in "
    "{year}.",
    "The {name}, {what} from the city of {city}, was {verb} by {person} in "
    "{year}.",
    "It was in {year} that the {name}, {what} from the city of {city}, was "
    "{verb} by {person}.",
)
# Every question asks for all three facts, and the answer states them after
# their marker words in a fixed order. Answers are marker words and facts:
# every other predictable word would be as easy with or without the context
# and dilute the perplexity ratio the demo measures (DESIGN.md). Three facts
# per answer, not one, triple the tokens that can only be copied from the
# context: a 2-layer GPT-2 learns to copy after a number of such tokens, not
# of steps, so this is what makes the demo's few steps enough.
_QUESTION_TEMPLATES = (
    "Who {verb} the {name}, when, and where is it?",
    "When and by whom was the {name} {verb}, and in which city is it?",
    "Where is the {name}, who {verb} it, and in what year?",
    "Tell me about the {name}: who {verb} it, when, and where?",
)
ANSWER_TEMPLATE = "by {person}, in {year}, city of {city}."
# What an answer states (a counterfactual passage swaps them).
_FACTS = ("person", "year", "city")


def _template_words():
  """The lower-cased words of every fixed template (not the made-up names)."""
  texts = (list(_BLOCK_TEMPLATES) + [w for kind in _KINDS for w in kind] +
           list(_QUESTION_TEMPLATES) + [ANSWER_TEMPLATE])
  words = set()
  for text in texts:
    words.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text.lower())))
  return sorted(words)


def _make_word(rng, min_syllables, max_syllables):
  count = rng.randint(min_syllables, max_syllables)
  return "".join(rng.choice(SYLLABLES) for _ in range(count)).capitalize()


def _make_entity(rng, used_names):
  """A new entity with its facts; its name differs from every earlier one."""
  suffix, what, verb = rng.choice(_KINDS)
  while True:
    words = [_make_word(rng, 2, 3) for _ in range(rng.randint(1, 2))]
    name = " ".join(words + [suffix])
    if name not in used_names:
      used_names.add(name)
      break
  return {
      "name": name, "what": what, "verb": verb,
      "city": _make_word(rng, 2, 3),
      "person": f"{_make_word(rng, 1, 2)} {_make_word(rng, 2, 3)}",
      "year": str(rng.randint(_FIRST_YEAR, _LAST_YEAR)),
  }


def _block_text(rng, entity):
  text = rng.choice(_BLOCK_TEMPLATES).format(**entity)
  return text[0].upper() + text[1:]


def make_world(seed, num_train, num_validation, num_test,
               num_distractor_blocks):
  """The demo world as plain Python data, a pure function of its arguments.

  Returns:
    (blocks, questions): blocks is a list of (title, text) in block-id order;
    questions maps each split to a list of dicts with `id`, `input`,
    `answer`, `block_id` (the gold block) and `facts` (person, year, city).
  """
  rng = random.Random(seed)
  used_names = set()
  sizes = {"train": num_train, "validation": num_validation, "test": num_test}
  entities = []
  questions = {split: [] for split in sizes}
  for split, size in sizes.items():
    for index in range(size):
      entity = _make_entity(rng, used_names)
      questions[split].append({
          "id": f"demo-{split}-{index:06d}",
          "input": rng.choice(_QUESTION_TEMPLATES).format(**entity),
          "answer": ANSWER_TEMPLATE.format(**entity),
          "block_id": len(entities),  # The entity's index until the shuffle.
          "facts": {name: entity[name] for name in _FACTS},
      })
      entities.append(entity)
  for _ in range(num_distractor_blocks):
    entities.append(_make_entity(rng, used_names))
  texts = [(entity["name"], _block_text(rng, entity)) for entity in entities]
  # Shuffled so that a block id says nothing about the split or question.
  order = list(range(len(entities)))
  rng.shuffle(order)
  block_id_of_entity = {entity: block for block, entity in enumerate(order)}
  for question in (q for split in questions.values() for q in split):
    question["block_id"] = block_id_of_entity[question["block_id"]]
  return [texts[entity] for entity in order], questions


def kilt_lines(questions, blocks, with_answers):
  """KILT jsonl text for one split; the test split carries no `output`."""
  lines = []
  for question in questions:
    record = {"id": question["id"], "input": question["input"]}
    if with_answers:
      title = blocks[question["block_id"]][0]
      record = kilt_files.output_record(
          question["id"], question["input"], question["answer"],
          [{"wikipedia_id": str(question["block_id"]), "title": title}])
    lines.append(json.dumps(record) + "\n")
  return "".join(lines)


def counterfactual_records(questions, blocks):
  """The counterfactual conditions' contexts file (evaluation.py), as records.

  Each question gets its gold block with the three facts swapped for the
  next question's (the last takes the first's), and the answer those
  swapped facts imply: a model that reads its context must now write facts
  it never saw with this question.
  """
  records = []
  for index, question in enumerate(questions):
    swapped = questions[(index + 1) % len(questions)]["facts"]
    own = question["facts"]
    pattern = re.compile("|".join(re.escape(own[name]) for name in _FACTS))
    replacement = {own[name]: swapped[name] for name in _FACTS}
    records.append({
        "id": question["id"], "input": question["input"],
        "answer": ANSWER_TEMPLATE.format(**swapped),
        "contexts": [pattern.sub(lambda match: replacement[match.group(0)],
                                 blocks[question["block_id"]][1])]})
  return records


def knowledge_source_lines(blocks):
  """KILT's knowledge source, a page per block: its `wikipedia_id` is the block id.

  The ids the KILT gold provenance names (`kilt_lines`), so a title ->
  wikipedia_id map built from this file resolves every gold title. A page's
  `text` is its paragraphs, the title first, as in KILT's file.
  """
  return "".join(json.dumps({
      "_id": str(block_id), "wikipedia_id": str(block_id),
      "wikipedia_title": title, "text": [f"{title}\n", f"{text}\n"],
  }) + "\n" for block_id, (title, text) in enumerate(blocks))


# ---------------------------------------------------------------------------
# The toy REALM embedder
# ---------------------------------------------------------------------------


def wordpiece_vocabulary():
  """A BERT wordpiece vocabulary that covers the world without [UNK].

  Template words are whole pieces; made-up names split into syllables (and, as
  a fallback, single letters), digits are single pieces.
  """
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  punctuation = list(".,?!'\"-:;()")
  characters = list("0123456789abcdefghijklmnopqrstuvwxyz")
  words = sorted(set(_template_words()) | set(SYLLABLES) | set(characters))
  continuations = ["##" + piece for piece in sorted(set(SYLLABLES) |
                                                    set(characters))]
  return specials + punctuation + words + continuations


def _projected(input_ids, input_mask, token_weights, projection):
  """The toy embedder: a weighted bag of wordpieces, projected, at norm 4."""
  weights = (tf.gather(token_weights, input_ids) *
             tf.cast(input_mask, tf.float32))
  vectors = tf.gather(projection, input_ids)
  summed = tf.reduce_sum(weights[:, :, tf.newaxis] * vectors, axis=1)
  return EMBEDDING_NORM * tf.math.l2_normalize(summed, axis=-1)


def _clear_asset_paths(saved_model_path):
  """Replaces the asset paths in a saved_model.pb by the Hub placeholder.

  As tensorflow_hub's export does (saved_model_lib): the constant holds the
  file's path at export time, which is neither portable nor deterministic;
  the AssetFileDefs keep the file's name in assets/.
  """
  saved_model = saved_model_pb2.SavedModel()
  with open(saved_model_path, "rb") as f:
    saved_model.ParseFromString(f.read())
  for meta_graph in saved_model.meta_graphs:
    asset_nodes = {
        name.split(":")[0] for name in meta_graph.collection_def[
            tf.compat.v1.GraphKeys.ASSET_FILEPATHS].node_list.value}
    for node in meta_graph.graph_def.node:
      if node.name in asset_nodes:
        node.attr["value"].tensor.string_val[0] = (
            query_embedder.HUB_ASSET_PLACEHOLDER.encode("utf-8"))
  with open(saved_model_path, "wb") as f:
    f.write(saved_model.SerializeToString(deterministic=True))


def export_embedder(embedder_dir, vocab_file, token_weights, projection,
                    blocks_in):
  """Writes the toy embedder as a TF1 Hub module (`export_tf1_module`);
  returns the embeddings of the blocks `blocks_in`
  (`query_embedder.block_features`), as ORQA's encode_blocks.py runs its
  embedder."""

  def bag_of_wordpieces(variables, input_ids, input_mask, segment_ids):
    del segment_ids  # A bag of wordpieces has no segments.
    return _projected(input_ids, input_mask, variables["module/token_weights"],
                      variables["module/projection"])

  return export_tf1_module(
      embedder_dir, vocab_file, {"module/token_weights": token_weights,
                                 "module/projection": projection},
      bag_of_wordpieces, blocks_in)


def export_tf1_module(embedder_dir, vocab_file, values, forward,
                      features=None):
  """Writes a TF1 Hub module in REALM's layout; returns its embeddings of
  `features` (None without).

  REALM's layout (`hub.Module.export`): `tfhub_module.pb`, `saved_model.pb`
  with tag sets {"train"} and {}, `variables/` (`values`: {variable name:
  array}), `assets/vocab.txt`, and signatures, as in REALM's embedder:
    projected(input_ids, input_mask, segment_ids) -> {"default": [B, D]},
      `forward(variables by name, input_ids, input_mask, segment_ids)`
    tokenization_info() -> {"vocab_file", "do_lower_case"}
  """
  with tf.Graph().as_default() as graph, tf.compat.v1.Session(
      graph=graph) as session:
    inputs = {name: tf.compat.v1.placeholder(tf.int32, [None, None], name=name)
              for name in ("input_ids", "input_mask", "segment_ids")}
    variables = {name: tf.compat.v1.get_variable(
        name, value.shape, tf.float32, tf.compat.v1.zeros_initializer(),
        use_resource=True) for name, value in values.items()}
    default = forward(variables, inputs["input_ids"], inputs["input_mask"],
                      inputs["segment_ids"])
    vocab_path = tf.constant(vocab_file, name="vocab_file")
    tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.ASSET_FILEPATHS,
                                   vocab_path)
    build_info = tf.compat.v1.saved_model.utils.build_tensor_info
    signatures = {
        "projected": tf.compat.v1.saved_model.build_signature_def(
            inputs={name: build_info(tensor)
                    for name, tensor in inputs.items()},
            outputs={"default": build_info(default)}),
        "tokenization_info": tf.compat.v1.saved_model.build_signature_def(
            outputs={"vocab_file": build_info(vocab_path),
                     "do_lower_case": build_info(tf.constant(DO_LOWER_CASE))}),
    }
    # Initialised by feeding their values, so the graph holds no copy of them.
    session.run([variable.initializer for variable in variables.values()], {
        variable.initial_value: values[name]
        for name, variable in variables.items()})
    embeddings = None if features is None else embed(
        lambda batch: session.run(default, {inputs[name]: value
                                            for name, value in batch.items()}),
        features, desc="blocks")

    builder = tf.compat.v1.saved_model.Builder(embedder_dir)
    # One saver for both tag sets: the builder would add one per meta graph.
    saver = tf.compat.v1.train.Saver(sharded=True, allow_empty=True)
    first_tags, *other_tags = HUB_TAG_SETS
    builder.add_meta_graph_and_variables(
        session, first_tags, signature_def_map=signatures,
        assets_collection=tf.compat.v1.get_collection(
            tf.compat.v1.GraphKeys.ASSET_FILEPATHS),
        strip_default_attrs=True, saver=saver)
    # The graph's assets collection already holds the vocabulary's entry.
    for tags in other_tags:
      builder.add_meta_graph(tags, signature_def_map=signatures,
                             strip_default_attrs=True, saver=saver)
    builder.save()
  _clear_asset_paths(os.path.join(embedder_dir, "saved_model.pb"))
  with open(os.path.join(embedder_dir, "tfhub_module.pb"), "wb") as f:
    f.write(HUB_MODULE_DEF)
  return embeddings


def inverse_document_frequencies(block_input_ids, block_mask, vocab_size):
  """log(N / df) per wordpiece over the blocks; 0 for the special tokens.

  A wordpiece in no block (a question word such as `who`) is also 0: it
  matches nothing, and at the largest weight it would only add noise to the
  question's embedding through the random projection.
  """
  num_blocks = block_input_ids.shape[0]
  document_frequency = np.zeros(vocab_size, np.int64)
  for ids, mask in zip(block_input_ids, block_mask):
    document_frequency[np.unique(ids[mask.astype(bool)])] += 1
  idf = np.where(document_frequency > 0,
                 np.log(num_blocks / np.maximum(document_frequency, 1)), 0.0)
  idf[:5] = 0.0  # [PAD], [UNK], [CLS], [SEP], [MASK] carry no content.
  return idf.astype(np.float32)


def token_weights(idf):
  """The embedder's weight of each wordpiece: the square root of its IDF.

  Measured on the default world, the gold block is in the top 5 for 98.5% of
  questions with sqrt(IDF), 89% with IDF and 40% with IDF^2: the random
  projection to 128 dimensions adds noise that grows with the norm of the
  whole bag, and flatter weights leave more of that norm on the name the
  question and its block share.
  """
  return np.sqrt(idf)


def embed(projected, features, batch_size=_EMBED_BATCH_SIZE, desc=None):
  """Embeds features in batches: float32 [N, 128].

  Args:
    projected: fn({input_ids, input_mask, segment_ids: int32 arrays}) ->
      float32 [B, 128] array.
    features: the whole inputs (`query_embedder.block_features`).
  """
  num_rows = features["input_ids"].shape[0]
  outputs = []
  for start in tqdm.trange(0, num_rows, batch_size, desc=desc, disable=None,
                           leave=False):
    outputs.append(projected({name: value[start:start + batch_size]
                              for name, value in features.items()}))
  return np.concatenate(outputs, axis=0)


def recall_at_k(query_embeddings, block_embeddings, gold_block_ids, k=5,
                chunk_size=1024):
  """Fraction of queries whose gold block is among the k highest inner products.

  A gold block is in the top k when fewer than k blocks score strictly higher
  (ties count in its favour); counting is one pass, unlike a partial sort.
  """
  hits = 0
  for start in range(0, len(query_embeddings), chunk_size):
    queries = query_embeddings[start:start + chunk_size]
    gold = np.asarray(gold_block_ids[start:start + chunk_size])
    scores = queries @ block_embeddings.T
    gold_scores = scores[np.arange(len(gold)), gold][:, np.newaxis]
    hits += int(np.sum(np.sum(scores > gold_scores, axis=1) < k))
  return hits / len(query_embeddings)


# ---------------------------------------------------------------------------
# GPT-2 tokenizer and config
# ---------------------------------------------------------------------------


def train_gpt2_tokenizer(texts, vocab_size):
  """A GPT-2-format byte-level BPE tokenizer trained on `texts`."""
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2,
      special_tokens=[GPT2_SPECIAL_TOKEN],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  bpe.train_from_iterator(texts, trainer=trainer)
  return transformers.GPT2TokenizerFast(
      tokenizer_object=bpe, bos_token=GPT2_SPECIAL_TOKEN,
      eos_token=GPT2_SPECIAL_TOKEN, unk_token=GPT2_SPECIAL_TOKEN,
      model_max_length=MODEL_CONFIG["n_positions"])


def gpt2_config(tokenizer):
  special_id = tokenizer.convert_tokens_to_ids(GPT2_SPECIAL_TOKEN)
  return transformers.GPT2Config(vocab_size=len(tokenizer),
                                 bos_token_id=special_id,
                                 eos_token_id=special_id, **MODEL_CONFIG)


# ---------------------------------------------------------------------------
# Writing the world
# ---------------------------------------------------------------------------


def _replace_directory(staging, final):
  """Moves a finished directory into place, replacing an earlier one."""
  if os.path.exists(final):
    shutil.rmtree(final)
  os.rename(staging, final)


def _check_sizes(sizes, gpt2_vocab_size):
  for name, value in sizes.items():
    minimum = 0 if name == "num_distractor_blocks" else 1
    if value < minimum:
      raise utils.UserError(f"--{name}={value}: expected at least {minimum}")
  if gpt2_vocab_size < 300:
    raise utils.UserError(
        f"--gpt2_vocab_size={gpt2_vocab_size}: expected at least 300")


def spelled_out_names(wordpieces, names):
  """{name: the name with each word spelled out by its wordpieces, hyphened}
  ("Brakunda Society" -> "bra-kun-da Society")."""
  words = sorted({word for name in names for word in name.split()})
  spelled = {}
  for word, ids in zip(words, wordpieces.ids(words)):
    pieces = [piece.removeprefix("##") for piece in wordpieces.pieces(ids)]
    spelled[word] = "-".join(pieces) if len(pieces) > 1 else word
  return {name: " ".join(spelled[word] for word in name.split())
          for name in names}


def write_spelled_out_split(world_dir, output_dir):
  """A split of the world's questions that its toy embedder handles poorly
  (for retriever training): each question's entity name, its gold block's
  title, spelled out (`spelled_out_names`), so that its wordpieces are
  word-initial pieces where the block has continuations (`##kun`), which the
  bag of wordpieces projects to unrelated vectors.

  Writes OUTPUT/train.jsonl and OUTPUT/validation.jsonl (KILT lines, the
  provenance kept) and OUTPUT/title_map.json (the knowledge source's title
  -> wikipedia_id); returns their paths.
  """
  paths = world_paths(world_dir)
  wordpieces = query_embedder.QueryEmbedder(paths["embedder"]).wordpieces
  utils.makedirs(output_dir)
  written = {}
  for split in ("train", "validation"):
    source = os.path.join(paths["kilt_dir"], kilt_files.ELI5_SPLIT_FILES[split])
    records = [record for _, record in kilt_files.read_jsonl(source,
                                                             "KILT file")]
    titles = [record["output"][0]["provenance"][0]["title"]
              for record in records]
    spelled = spelled_out_names(wordpieces, set(titles))
    lines = []
    for record, title in zip(records, titles):
      record["input"] = record["input"].replace(title, spelled[title])
      lines.append(json.dumps(record) + "\n")
    written[split] = os.path.join(output_dir, f"{split}.jsonl")
    utils.atomic_write_text(written[split], "".join(lines))
  title_map, _ = kilt_metrics.title_map_from_knowledge_source(
      paths["knowledge_source"])
  written["title_map"] = os.path.join(output_dir, "title_map.json")
  utils.atomic_write_json(written["title_map"], title_map)
  return written


def world_paths(output_dir):
  """{name: path} of the world's files under `output_dir` (world.json's
  `paths`)."""
  output_dir = os.path.abspath(output_dir)
  return {
      "kilt_dir": os.path.join(output_dir, "kilt"),
      "knowledge_source": os.path.join(output_dir, "kilt",
                                       kilt_files.KNOWLEDGE_SOURCE_FILE),
      "blocks": os.path.join(output_dir, "realm", "blocks.tfr"),
      "titles": os.path.join(output_dir, "realm", "titles.tfr"),
      "embedder": os.path.join(output_dir, "realm", "embedder"),
      "retriever_config": os.path.join(output_dir, "retriever_config.json"),
      "tokenizer": os.path.join(output_dir, "tokenizer"),
      "model_config": os.path.join(output_dir, "model_config"),
      # The evaluation's gold and counterfactual conditions (validation).
      "gold_contexts": os.path.join(output_dir, "contexts",
                                    "gold-validation.jsonl"),
      "counterfactual": os.path.join(output_dir, "contexts",
                                     "counterfactual-validation.jsonl"),
  }


def build_world(output_dir, *, seed=0,
                num_train=DEFAULT_SIZES["num_train"],
                num_validation=DEFAULT_SIZES["num_validation"],
                num_test=DEFAULT_SIZES["num_test"],
                num_distractor_blocks=DEFAULT_SIZES["num_distractor_blocks"],
                gpt2_vocab_size=DEFAULT_SIZES["gpt2_vocab_size"]):
  """Writes every artefact of the world under `output_dir` (a local path).

  Each file is written under a temporary name and renamed when complete;
  `world.json` is written last, so its presence means the world is complete.

  Returns:
    The contents of `world.json`: sizes, seed, file paths and `recall_at_5`.
  """
  sizes = dict(num_train=num_train, num_validation=num_validation,
               num_test=num_test, num_distractor_blocks=num_distractor_blocks)
  _check_sizes(sizes, gpt2_vocab_size)
  output_dir = os.path.abspath(output_dir)
  paths = world_paths(output_dir)
  for directory in ("kilt", "realm", "model_config"):
    os.makedirs(os.path.join(output_dir, directory), exist_ok=True)

  blocks, questions = make_world(seed, **sizes)
  for split, file_name in kilt_files.ELI5_SPLIT_FILES.items():
    utils.atomic_write_text(
        os.path.join(paths["kilt_dir"], file_name),
        kilt_lines(questions[split], blocks, with_answers=split != "test"))
  utils.atomic_write_text(paths["knowledge_source"],
                          knowledge_source_lines(blocks))
  # Gold passages the way real data gets them: KILT provenance looked up in
  # KILT's knowledge source (util_scripts/gold_contexts.py).
  gold_contexts, _ = evaluation.gold_contexts_from_kilt(
      os.path.join(paths["kilt_dir"],
                   kilt_files.ELI5_SPLIT_FILES["validation"]),
      paths["knowledge_source"])
  evaluation.write_contexts_file(paths["gold_contexts"], gold_contexts)
  evaluation.write_contexts_file(paths["counterfactual"], counterfactual_records(
      questions["validation"], blocks))
  # As ORQA's preprocess_wiki_extractor.py: text and title of block i as
  # record i of two files.
  tf_utils.write_tfrecords(paths["blocks"], (
      text.encode("utf-8") for _, text in blocks))
  tf_utils.write_tfrecords(paths["titles"], (
      title.encode("utf-8") for title, _ in blocks))

  with tempfile.TemporaryDirectory(dir=output_dir,
                                   prefix=".staging-") as staging:
    vocab_file = os.path.join(staging, "vocab.txt")
    vocabulary = wordpiece_vocabulary()
    with open(vocab_file, "w", encoding="utf-8") as f:
      f.write("".join(piece + "\n" for piece in vocabulary))
    blocks_in = query_embedder.block_features(
        query_embedder.Wordpieces(vocab_file, DO_LOWER_CASE), blocks)
    idf = inverse_document_frequencies(blocks_in["input_ids"],
                                       blocks_in["input_mask"], len(vocabulary))
    projection = np.random.default_rng(seed).standard_normal(
        [len(vocabulary), EMBEDDING_SIZE]).astype(np.float32)
    embedder_dir = os.path.join(staging, "embedder")
    block_embeddings = export_embedder(embedder_dir, vocab_file,
                                       token_weights(idf), projection,
                                       blocks_in)
    retrievers.write_block_embeddings(embedder_dir, block_embeddings)
    _replace_directory(embedder_dir, paths["embedder"])

    # The questions as the cacher embeds them: through the exported module.
    all_questions = [q for split in kilt_files.ELI5_SPLIT_FILES for q in questions[split]]
    question_embeddings = query_embedder.QueryEmbedder(paths["embedder"]).embed(
        [q["input"] for q in all_questions], batch_size=_EMBED_BATCH_SIZE)
    recall = recall_at_k(question_embeddings, block_embeddings,
                         [q["block_id"] for q in all_questions], k=5)

    # What GPT-2 reads: block text; question and answer as the model's input
    # lays them out (DESIGN.md).
    sample = _GPT2_TOKENIZER_SAMPLE
    gpt2_texts = ([text for _, text in blocks[:sample]] +
                  [f"Question: {q['input']} Answer: {q['answer']}"
                   for q in questions["train"][:sample]])
    gpt2_tokenizer = train_gpt2_tokenizer(gpt2_texts, gpt2_vocab_size)
    tokenizer_dir = os.path.join(staging, "tokenizer")
    gpt2_tokenizer.save_pretrained(tokenizer_dir)
    _replace_directory(tokenizer_dir, paths["tokenizer"])

  utils.atomic_write_text(
      os.path.join(paths["model_config"], "config.json"),
      gpt2_config(gpt2_tokenizer).to_json_string())
  utils.atomic_write_json(paths["retriever_config"], {
      "query_embedder_path": paths["embedder"],
      "text_records": paths["blocks"],
      "title_records": paths["titles"],
      "num_block_records": len(blocks),
  })
  world = dict(sizes, seed=seed, num_blocks=len(blocks),
               gpt2_vocab_size=len(gpt2_tokenizer),
               wordpiece_vocab_size=len(vocabulary),
               recall_at_5=round(recall, 6), paths=paths)
  utils.atomic_write_json(os.path.join(output_dir, "world.json"), world)
  return world



def summary_lines(world, seconds):
  """What make_demo_data.py prints about a world `build_world` wrote."""
  return [
      f"demo world in {os.path.dirname(world['paths']['kilt_dir'])}: "
      f"{world['num_train']} train / {world['num_validation']} validation / "
      f"{world['num_test']} test questions, {world['num_blocks']} blocks, "
      f"GPT-2 vocabulary {world['gpt2_vocab_size']} ({seconds:.1f} s)",
      f"gold-block recall@5 of the embedder: {world['recall_at_5']:.4f}"]
