"""The trainable TF2 REALM embedder (issue 17, acceptance 2): built from the
fixture's TF1 Hub module it gives the module's embeddings; trained, they
change; exported, QueryEmbedder loads it and gives the trained ones. Around a
real BERT (`orqa_bert`) it gives transformers' TFBertModel's embeddings, the
same weights under Google's TF1 names."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
import transformers

import grad_cache
import query_embedder
import realm_embedder
import retrieval_fixtures
from util_scripts import demo_world
import utils

TOLERANCE = 1e-5
MODULE = os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder")


def _fixture_json(name):
  with open(os.path.join(retrieval_fixtures.REALM_TF1_HUB, name),
            encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(name="embedder", scope="module")
def fixture_embedder():
  return realm_embedder.load(MODULE)


def _embed(embedder, ids_list):
  features = query_embedder.pad_features(ids_list)
  return embedder(features["input_ids"], features["input_mask"],
                  features["segment_ids"]).numpy()


def test_embedder_gives_the_tf1_modules_embeddings(embedder):
  assert embedder.architecture == "orqa_standin_bert"
  assert embedder.embedding_size == 8
  reference = _fixture_json("reference.json")
  # One by one (as the TF1 module made them) and padded in one batch.
  for ids, want in zip(reference["orqa_ids"], reference["orqa_emb"]):
    np.testing.assert_allclose(_embed(embedder, [ids])[0], want,
                               atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(_embed(embedder, reference["orqa_ids"]),
                             reference["orqa_emb"], atol=TOLERANCE, rtol=0)


def test_training_changes_the_embeddings_and_the_export_carries_them(
    embedder, tmp_path):
  reference = _fixture_json("reference.json")
  values = {key: v.numpy() for key, v in embedder.weights.items()}
  trained = realm_embedder.RealmEmbedder(
      embedder.architecture, values, embedder.vocab_file,
      embedder.do_lower_case)
  queries = query_embedder.pad_features(reference["orqa_ids"][:4])
  blocks = query_embedder.pad_features(reference["orqa_ids"][4:8])
  tower = grad_cache.Tower(
      lambda f, s: trained(f["input_ids"], f["input_mask"], f["segment_ids"],
                           s), tuple(trained.trainable_variables), 2)
  optimizer = tf_keras.optimizers.Adam(0.05)
  for step in range(3):
    seeds = np.arange(4, dtype=np.int32) + 10 * step
    _, (query_gradients, block_gradients) = grad_cache.cached_gradients(
        [tower, tower], [(queries, seeds), (blocks, seeds + 4)],
        grad_cache.contrastive_loss)
    optimizer.apply_gradients(zip(
        [q + b for q, b in zip(query_gradients, block_gradients)],
        tower.variables))
  after = _embed(trained, reference["orqa_ids"])
  assert np.abs(after - np.asarray(reference["orqa_emb"])).max() > 1e-2

  path = str(tmp_path / "export")
  realm_embedder.export(trained, path)
  assert os.path.isfile(os.path.join(path, "assets", "vocab.txt"))
  loaded = query_embedder.QueryEmbedder(path)
  np.testing.assert_allclose(loaded.embed(_fixture_json("questions.json")),
                             after, atol=TOLERANCE, rtol=0)
  # The export reads back as a trainable embedder with the same weights.
  again = realm_embedder.load(path)
  assert again.architecture == trained.architecture
  np.testing.assert_allclose(_embed(again, reference["orqa_ids"]), after,
                             atol=TOLERANCE, rtol=0)


def test_demo_worlds_bag_of_wordpieces(tmp_path):
  vocab_file = str(tmp_path / "vocab.txt")
  vocabulary = demo_world.wordpiece_vocabulary()
  with open(vocab_file, "w", encoding="utf-8") as f:
    f.write("".join(piece + "\n" for piece in vocabulary))
  wordpieces = query_embedder.Wordpieces(vocab_file, True)
  blocks = [("Bra Kunda Museum", "The Bra Kunda Museum is a museum."),
            ("Shou Bridge", "It was built in 1201 by Tha Mis.")]
  blocks_in = query_embedder.block_features(wordpieces, blocks)
  rng = np.random.default_rng(0)
  module_dir = str(tmp_path / "embedder")
  block_emb = demo_world.export_embedder(
      module_dir, vocab_file, rng.random(len(vocabulary), np.float32),
      rng.standard_normal([len(vocabulary), 16]).astype(np.float32), blocks_in)
  embedder = realm_embedder.load(module_dir)
  assert embedder.architecture == "bag_of_wordpieces"
  ours = realm_embedder.block_features(wordpieces, blocks)
  np.testing.assert_allclose(
      embedder(ours["input_ids"], ours["input_mask"],
               ours["segment_ids"]).numpy(), block_emb, atol=TOLERANCE)
  questions = ["Who founded the Bra Kunda Museum?", "shou bridge"]
  cut = realm_embedder.query_features(wordpieces, questions, 6)
  assert cut["input_ids"].shape == (2, 6)
  assert cut["input_ids"][0].tolist() == wordpieces.query_ids(questions, 6)[0]
  np.testing.assert_allclose(
      _embed(embedder, wordpieces.query_ids(questions)),
      query_embedder.QueryEmbedder(module_dir).embed(questions),
      atol=TOLERANCE)


def _module_with_variables(path, names):
  os.makedirs(os.path.join(path, "variables"))
  with open(os.path.join(path, "tfhub_module.pb"), "wb") as f:
    f.write(demo_world.HUB_MODULE_DEF)
  tf.raw_ops.SaveV2(prefix=os.path.join(path, "variables", "variables"),
                    tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.zeros([2])] * len(names))


def test_unknown_architectures_are_one_line_errors(tmp_path):
  partial_bert = str(tmp_path / "bert")
  _module_with_variables(partial_bert, [
      "module/bert/embeddings/word_embeddings",
      "module/bert/encoder/layer_0/attention/self/query/kernel"])
  with pytest.raises(utils.UserError, match=r"encoder/layer_\{i\}.*without "
                     r"module/bert/embeddings/token_type_embeddings, .* \(25 "
                     "missing\\)") as error:
    realm_embedder.load(partial_bert)
  assert "\n" not in str(error.value)
  other = str(tmp_path / "other")
  _module_with_variables(other, ["module/something"])
  with pytest.raises(utils.UserError, match="module/something are not those "
                     "of an embedder"):
    realm_embedder.load(other)
  odd_bert = str(tmp_path / "odd_bert")
  _module_with_variables(odd_bert, list(realm_embedder.variables_of(
      "orqa_bert", {"module/bert/encoder/layer_0/"})))
  with pytest.raises(utils.UserError, match=r"word_embeddings has shape \[2\], "
                     "expected .* a multiple of BERT's head size 64"):
    realm_embedder.load(odd_bert)


# ---------------------------------------------------------------------------
# orqa_bert against transformers' TFBertModel
# ---------------------------------------------------------------------------

_BERT_VOCABULARY = (
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "is", "it",
    "was", "in", "by", "who", "built", "founded", "museum", "bridge", "bra",
    "kunda", "shou", "tha", "mis", "1201", ".", "?")
_BERT_BLOCKS = (("Bra Kunda Museum", "The Bra Kunda Museum is a museum."),
                ("Shou Bridge", "It was built by Tha Mis."),
                ("Tha Mis", "It is a bridge."),
                ("Shou", "Who?"))
_BERT_QUESTIONS = ["Who founded the Bra Kunda Museum?", "shou bridge"]
_BERT_BLOCK_LENGTH = 24
_ICT_PROJECTION_SIZE = 16


def _google_bert_name(variable):
  """A TFBertModel variable's name as Google's TF1 BERT names it in a module."""
  name = re.sub(r"^tf_bert_model(_\d+)?/", "",
                variable.name).removesuffix(":0")
  name = name.replace("layer_._", "layer_").replace(
      "word_embeddings/weight", "word_embeddings").replace(
          "_embeddings/embeddings", "_embeddings")
  return "module/" + name


def _random_like(rng, shape, name):
  """Weights far from transformers' initial ones (gammas of 1, biases of 0)."""
  value = 0.1 * rng.standard_normal(shape)
  return (value + 1.0 if name.endswith("gamma") else value).astype(np.float32)


@pytest.fixture(name="bert", scope="module")
def fixture_bert(tmp_path_factory):
  """(A random 2-layer TFBertModel, {TF1 name: its weights and an ict head},
  a vocabulary file)."""
  vocab_file = str(tmp_path_factory.mktemp("bert") / "vocab.txt")
  with open(vocab_file, "w", encoding="utf-8") as f:
    f.write("".join(piece + "\n" for piece in _BERT_VOCABULARY))
  model = transformers.TFBertModel(transformers.BertConfig(
      vocab_size=len(_BERT_VOCABULARY), hidden_size=128, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
  model(model.dummy_inputs)
  rng = np.random.default_rng(0)
  values = {}
  for variable in model.weights:
    name = _google_bert_name(variable)
    values[name] = _random_like(rng, variable.shape, name)
    variable.assign(values[name])
  for name, shape in (("dense/kernel", [128, _ICT_PROJECTION_SIZE]),
                      ("dense/bias", [_ICT_PROJECTION_SIZE]),
                      ("layer_normalization/gamma", [_ICT_PROJECTION_SIZE]),
                      ("layer_normalization/beta", [_ICT_PROJECTION_SIZE])):
    values[name] = _random_like(rng, shape, name)
  return model, values, vocab_file


def _transformers_embeddings(model, values, features):
  """TFBertModel's pooled output through ict_model's head (NumPy)."""
  pooled = model(input_ids=features["input_ids"],
                 attention_mask=features["input_mask"],
                 token_type_ids=features["segment_ids"]).pooler_output.numpy()
  projected = pooled @ values["dense/kernel"] + values["dense/bias"]
  normalised = (projected - projected.mean(-1, keepdims=True)) / np.sqrt(
      projected.var(-1, keepdims=True) + 1e-3)
  return (normalised * values["layer_normalization/gamma"] +
          values["layer_normalization/beta"])


def _bert_block_features(wordpieces):
  features = realm_embedder.block_features(wordpieces, _BERT_BLOCKS,
                                           _BERT_BLOCK_LENGTH)
  lengths = features["input_mask"].sum(axis=1)
  # Padded rows of different lengths, with both segments.
  assert len(set(lengths)) == len(_BERT_BLOCKS)
  assert lengths.max() < _BERT_BLOCK_LENGTH
  assert set(features["segment_ids"].ravel()) == {0, 1}
  return features


def test_orqa_bert_gives_transformers_bert_embeddings(bert):
  model, values, vocab_file = bert
  embedder = realm_embedder.RealmEmbedder("orqa_bert", values, vocab_file, True)
  assert embedder.embedding_size == _ICT_PROJECTION_SIZE
  features = _bert_block_features(embedder.wordpieces)
  with tf.GradientTape() as tape:
    ours = embedder(**features)
    loss = tf.reduce_sum(
        ours * tf.range(_ICT_PROJECTION_SIZE, dtype=tf.float32))
  np.testing.assert_allclose(ours.numpy(),
                             _transformers_embeddings(model, values, features),
                             atol=TOLERANCE, rtol=0)
  # Padding changes nothing: the shortest block alone, unpadded.
  shortest = int(features["input_mask"].sum(axis=1).argmin())
  alone = {name: value[shortest:shortest + 1,
                       :features["input_mask"][shortest].sum()]
           for name, value in features.items()}
  np.testing.assert_allclose(embedder(**alone).numpy()[0], ours[shortest],
                             atol=TOLERANCE, rtol=0)
  # Every weight trains (the word embeddings' gradient is a sparse one).
  gradients = tape.gradient(loss, embedder.trainable_variables)
  assert len(gradients) == len(values)
  assert all(gradient is not None for gradient in gradients)


@pytest.mark.slow
def test_orqa_bert_module_loads_and_its_export_round_trips(bert, tmp_path):
  model, values, vocab_file = bert
  module_dir = str(tmp_path / "embedder")
  forward = realm_embedder._FORWARD["orqa_bert"]  # pylint: disable=protected-access
  demo_world.export_tf1_module(module_dir, vocab_file, values, forward)
  embedder = realm_embedder.load(module_dir)
  assert embedder.architecture == "orqa_bert"
  assert set(embedder.weights) == set(values)
  features = _bert_block_features(embedder.wordpieces)
  want = _transformers_embeddings(model, values, features)
  np.testing.assert_allclose(embedder(**features).numpy(), want,
                             atol=TOLERANCE, rtol=0)
  queries = _embed(embedder, embedder.wordpieces.query_ids(_BERT_QUESTIONS))
  np.testing.assert_allclose(
      query_embedder.QueryEmbedder(module_dir).embed(_BERT_QUESTIONS), queries,
      atol=TOLERANCE, rtol=0)

  path = str(tmp_path / "export")
  realm_embedder.export(embedder, path)
  np.testing.assert_allclose(
      query_embedder.QueryEmbedder(path).embed(_BERT_QUESTIONS), queries,
      atol=TOLERANCE, rtol=0)
  again = realm_embedder.load(path)
  assert again.architecture == "orqa_bert"
  assert set(again.weights) == set(values)
  np.testing.assert_allclose(again(**features).numpy(), want,
                             atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_a_module_with_tanh_gelu_is_read_as_such(bert, tmp_path):
  """Later Google BERTs compute GELU's tanh approximation: the module's graph
  says which (Tanh, not Erf, in layer_0/intermediate), and so does ours."""
  model, values, vocab_file = bert
  tanh_model = transformers.TFBertModel(
      transformers.BertConfig(**{**model.config.to_dict(),
                                 "hidden_act": "gelu_new"}))
  tanh_model(tanh_model.dummy_inputs)
  for variable in tanh_model.weights:
    variable.assign(values[_google_bert_name(variable)])
  module_dir = str(tmp_path / "embedder")
  demo_world.export_tf1_module(
      module_dir, vocab_file, values,
      realm_embedder._FORWARD["orqa_bert_tanh_gelu"])  # pylint: disable=protected-access
  embedder = realm_embedder.load(module_dir)
  assert embedder.architecture == "orqa_bert_tanh_gelu"
  features = _bert_block_features(embedder.wordpieces)
  want = _transformers_embeddings(tanh_model, values, features)
  np.testing.assert_allclose(embedder(**features).numpy(), want,
                             atol=TOLERANCE, rtol=0)
  # Not the exact GELU's embeddings: the test tells the two apart.
  assert np.abs(want - _transformers_embeddings(model, values,
                                                features)).max() > TOLERANCE
  path = str(tmp_path / "export")
  realm_embedder.export(embedder, path)
  assert realm_embedder.load(path).architecture == "orqa_bert_tanh_gelu"

