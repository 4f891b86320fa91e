"""REALM's query embedder: question text -> query embedding, with ORQA's BERT wordpieces.

Loads the embedder (REALM's TF1 Hub module or a TF2 SavedModel) through
tensorflow_hub, the one module of the project that imports it, and only when
an embedder is loaded: the wordpieces and BERT features need none of it.
"""

import os

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

import utils


# What a TF-Hub export writes for an asset's path inside the graph; TF1's
# hub.Module rewrites it to the module's assets/ at load, TF2's hub.load does
# not (tensorflow_hub's saved_model_lib).
HUB_ASSET_PLACEHOLDER = "SAVEDMODEL-ASSET"
_VOCAB_ASSET_NAME = "vocab.txt"
_REQUIRED_WORDPIECES = ("[CLS]", "[SEP]", "[UNK]")
# Where BERT keeps its position embeddings [max positions, hidden] in a TF1
# checkpoint (REALM's embedder: module/bert/embeddings/position_embeddings).
_POSITION_EMBEDDINGS_SUFFIX = "bert/embeddings/position_embeddings"


class Wordpieces:
  """BERT wordpieces exactly as ORQA makes them for REALM.

  `tensorflow_text.BertTokenizer` over the vocabulary file (ORQA's
  `bert_utils.get_tf_tokenizer`): with `do_lower_case`, case folding also
  NFKC-normalises and strips accents (`ﬁ` -> `fi`, full-width letters,
  `ß` -> `ss`); a word longer than 100 bytes is [UNK].
  """

  def __init__(self, vocab_file, do_lower_case):
    with tf.io.gfile.GFile(vocab_file, "r") as f:
      # The lookup table's keys are whole lines (TextFileIndex.WHOLE_LINE).
      lines = [line.rstrip("\r\n") for line in f]
    vocab = {}
    for index, line in enumerate(lines):
      vocab.setdefault(line, index)
    missing = [token for token in _REQUIRED_WORDPIECES if token not in vocab]
    if missing:
      raise utils.UserError(f"{vocab_file}: no {', '.join(missing)} in the "
                            "wordpiece vocabulary, expected BERT's vocab.txt")
    self.vocab_file = vocab_file
    self.do_lower_case = do_lower_case
    self._pieces = lines
    self.cls_id = vocab["[CLS]"]
    self.sep_id = vocab["[SEP]"]
    self._tokenizer = tf_text.BertTokenizer(
        vocab_file, lower_case=do_lower_case, token_out_type=tf.int64)

  def ids(self, texts):
    """The wordpiece ids of each text (a list of int lists), words merged."""
    texts = list(texts)
    if not texts:
      return []
    pieces = self._tokenizer.tokenize(tf.constant(texts, tf.string))
    return pieces.merge_dims(-2, -1).to_list()

  def pieces(self, ids):
    """The wordpieces of `ids` as the vocabulary spells them (`##` marks a
    continuation)."""
    return [self._pieces[i] for i in ids]

  def query_ids(self, questions, max_length=None):
    """`[CLS] q [SEP]` ids of each question, cut to `max_length` ids if given."""
    keep = None if max_length is None else max_length - 2
    return [[self.cls_id] + ids[:keep] + [self.sep_id]
            for ids in self.ids(questions)]


def pad_features(sequences, segment_ids=None, length=None):
  """BERT inputs of id sequences: int32 [B, length] `input_ids`, `input_mask`, `segment_ids`.

  Padding is id 0 with mask 0, as REALM pads, to `length` columns (at least
  the longest sequence) or to the longest; `segment_ids` (lists as long as
  the sequences) default to zeros.
  """
  length = max([len(ids) for ids in sequences] + [length or 0])
  features = {name: np.zeros([len(sequences), length], np.int32)
              for name in ("input_ids", "input_mask", "segment_ids")}
  for row, ids in enumerate(sequences):
    features["input_ids"][row, :len(ids)] = ids
    features["input_mask"][row, :len(ids)] = 1
    if segment_ids is not None:
      features["segment_ids"][row, :len(ids)] = segment_ids[row]
  return features


# ORQA's encode_blocks.py: wordpieces per candidate block, [CLS] title [SEP]
# text [SEP].
BLOCK_MAX_LENGTH = 288


def block_sequences(wordpieces, titles_and_texts, max_length=BLOCK_MAX_LENGTH):
  """(ids, segment ids) of `[CLS] title [SEP] text [SEP]` per (title, text).

  As ORQA's encode_blocks.py lays candidates out: segment ids 0 then 1, the
  title cut to `max_length - 3` wordpieces and the text to what is left
  (`bert_utils.pad_or_truncate_pair`).
  """
  titles_and_texts = list(titles_and_texts)
  title_ids = wordpieces.ids(title for title, _ in titles_and_texts)
  text_ids = wordpieces.ids(text for _, text in titles_and_texts)
  sequences, segment_ids = [], []
  for title, text in zip(title_ids, text_ids):
    title = title[:max_length - 3]
    text = text[:max_length - 3 - len(title)]
    sequences.append([wordpieces.cls_id] + title + [wordpieces.sep_id] + text +
                     [wordpieces.sep_id])
    segment_ids.append([0] * (len(title) + 2) + [1] * (len(text) + 1))
  return sequences, segment_ids


def block_features(wordpieces, titles_and_texts, max_length=BLOCK_MAX_LENGTH):
  """REALM candidate inputs of (title, text) pairs (`block_sequences`),
  zero-padded to the longest (`pad_features`)."""
  return pad_features(*block_sequences(wordpieces, titles_and_texts,
                                       max_length))


def _vocabulary_file(embedder_path, vocab_file):
  """The embedder's vocabulary: `vocab_file` if it is a file, else the module's asset.

  A TF2 SavedModel's `tokenization_info()` names the file itself. A TF1 Hub
  module (REALM's export) names the placeholder `SAVEDMODEL-ASSET`, and the
  file is where TF1's hub.Module points it: `assets/vocab.txt`, or the one
  file in `assets/`.
  """
  if vocab_file != HUB_ASSET_PLACEHOLDER and tf.io.gfile.exists(vocab_file):
    return vocab_file
  assets_dir = os.path.join(embedder_path, "assets")
  names = []
  if tf.io.gfile.isdir(assets_dir):
    names = sorted(name for name in tf.io.gfile.listdir(assets_dir)
                   if not tf.io.gfile.isdir(os.path.join(assets_dir, name)))
  if _VOCAB_ASSET_NAME in names:
    return os.path.join(assets_dir, _VOCAB_ASSET_NAME)
  if len(names) == 1:
    return os.path.join(assets_dir, names[0])
  found = ", ".join(names) if names else "no file"
  raise utils.UserError(
      f"{embedder_path}: tokenization_info's vocab_file is {vocab_file!r} and "
      f"assets/ holds {found}, expected the wordpiece vocabulary in "
      f"assets/{_VOCAB_ASSET_NAME}")


def position_limit(embedder_path):
  """Positions the embedder's BERT embeds (rows of its position embeddings), or None.

  Read from the module's variables checkpoint (a TF1 module's variable names,
  or a TF2 export's object paths that spell them, as realm_embedder exports);
  None when it has no BERT position-embedding variable.
  """
  try:
    variables = tf.train.list_variables(
        os.path.join(embedder_path, "variables", "variables"))
  except (tf.errors.OpError, ValueError):
    return None
  for name, shape in variables:
    if (_graph_name(name).endswith(_POSITION_EMBEDDINGS_SUFFIX) and
        len(shape) == 2):
      return int(shape[0])
  return None


def _graph_name(checkpoint_key):
  """A TF2 checkpoint key as the variable name it escapes
  (`a.Sb/.ATTRIBUTES/VARIABLE_VALUE` -> `a/b`); a TF1 name is itself."""
  name = checkpoint_key.removesuffix("/.ATTRIBUTES/VARIABLE_VALUE")
  return name.replace(".S", "/").replace("..", ".")


def check_max_query_length(max_query_length, name="max_query_length"):
  """A UserError unless `max_query_length` is 0 (no cut) or leaves room for [CLS] q [SEP]."""
  if max_query_length != 0 and max_query_length < 2:
    raise utils.UserError(
        f"{name}={max_query_length}: expected 0 (no cut) or at least 2 (room "
        "for [CLS] and [SEP])")


def _load_hub_module(path):
  """`hub.load(path)`, tensorflow_hub imported on first use (it is slow to import)."""
  import tensorflow_hub as hub  # pylint: disable=g-import-not-at-top
  return hub.load(path)


class QueryEmbedder:
  """Question text -> REALM query embedding, through the embedder's signatures.

  The embedder is REALM's TF1 Hub module as exported (`tfhub_module.pb`,
  `saved_model.pb`, `variables/`, `assets/vocab.txt`) or a TF2 SavedModel,
  local or gs://, with signatures
  `projected(input_ids, input_mask, segment_ids) -> {"default": [B, D]}` and
  `tokenization_info() -> {"vocab_file", "do_lower_case"}`. Questions are laid
  out as ORQA's `retrieve()` does: `Wordpieces`, `[CLS] q [SEP]`, not cut
  (but at the embedder's position limit, or `max_query_length` when given),
  mask of ones, segment ids of zeros. A batch is padded to its longest
  question with mask 0.

  Args:
    embedder_path: the module's directory.
    max_query_length: 0 (ORQA: no cut) or the ids kept per question,
      [CLS] and [SEP] included (>= 2).
  """

  def __init__(self, embedder_path, max_query_length=0):
    check_max_query_length(max_query_length)
    if not tf.io.gfile.exists(embedder_path):
      raise utils.UserError(f"{embedder_path}: embedder does not exist")
    try:
      module = _load_hub_module(embedder_path)
    except (OSError, ValueError, tf.errors.OpError) as error:
      raise utils.UserError(
          f"{embedder_path}: not a loadable TF-Hub module or SavedModel "
          f"({utils.error_reason(error)})") from None
    signatures = getattr(module, "signatures", {})
    for name in ("projected", "tokenization_info"):
      if name not in signatures:
        raise utils.UserError(
            f"{embedder_path}: no {name!r} signature (it has "
            f"{', '.join(sorted(signatures)) or 'none'}); expected a REALM "
            "embedder with projected(input_ids, input_mask, segment_ids) and "
            "tokenization_info()")
    self._module = module  # Keeps the signatures' variables alive.
    self._projected = signatures["projected"]
    self._input_dtypes = {
        name: spec.dtype
        for name, spec in self._projected.structured_input_signature[1].items()}
    if set(self._input_dtypes) != {"input_ids", "input_mask", "segment_ids"}:
      raise utils.UserError(
          f"{embedder_path}: 'projected' takes "
          f"{', '.join(sorted(self._input_dtypes))}, expected input_ids, "
          "input_mask, segment_ids")
    info = signatures["tokenization_info"]()
    self.wordpieces = Wordpieces(
        _vocabulary_file(embedder_path,
                         info["vocab_file"].numpy().decode("utf-8")),
        bool(info["do_lower_case"].numpy()))
    self.embedder_path = embedder_path
    limits = [limit for limit in (max_query_length,
                                  position_limit(embedder_path)) if limit]
    # Ids kept per question ([CLS] and [SEP] included); None: all.
    self.max_query_length = min(limits) if limits else None

  def token_ids(self, questions):
    """(input_ids, input_mask) int32 [Q, longest] of `[CLS] q [SEP]`, zero-padded."""
    features = pad_features(
        self.wordpieces.query_ids(questions, self.max_query_length))
    return features["input_ids"], features["input_mask"]

  def embed(self, questions, batch_size=128):
    """float32 [Q, D] query embeddings of `questions` (a list of str)."""
    embeddings = []
    for start in range(0, len(questions), batch_size):
      input_ids, input_mask = self.token_ids(questions[start:start + batch_size])
      embeddings.append(self.embed_features({
          "input_ids": input_ids, "input_mask": input_mask,
          "segment_ids": np.zeros_like(input_ids)}))
    if not embeddings:
      return np.zeros([0, 0], np.float32)
    return np.concatenate(embeddings)

  def embed_features(self, features):
    """float32 [B, D]: `projected` of int arrays {input_ids, input_mask,
    segment_ids} (questions from `token_ids`, blocks from `block_features`)."""
    outputs = self._projected(**{
        name: tf.cast(value, self._input_dtypes[name])
        for name, value in features.items()})
    if "default" not in outputs:
      raise utils.UserError(
          f"{self.embedder_path}: 'projected' returns "
          f"{', '.join(sorted(outputs))}, expected 'default'")
    return outputs["default"].numpy().astype(np.float32)
