"""REALM's query embedder: ORQA's wordpieces and layout, the vocabulary asset, bad embedders."""

import json
import os
import shutil

import numpy as np
import pytest

import query_embedder
import retrieval_fixtures
import retrievers
import utils


@pytest.fixture(name="retriever_files", scope="module")
def fixture_retriever_files(tmp_path_factory):
  return retrieval_fixtures.write_retriever(
      str(tmp_path_factory.mktemp("retriever")), num_blocks=50)


def test_query_embedder_layout_and_embedding(retriever_files):
  embedder = query_embedder.QueryEmbedder(retriever_files["embedder"])
  # A TF2 SavedModel names its vocabulary file itself; it has no BERT
  # position embeddings, so nothing is cut.
  assert embedder.wordpieces.vocab_file.startswith(retriever_files["embedder"])
  assert embedder.max_query_length is None
  vocab = {token: i for i, token in enumerate(retrieval_fixtures.VOCAB)}
  input_ids, input_mask = embedder.token_ids(
      ["Why is the SKY blue?", "sky"])
  # Lower-cased wordpieces, [CLS] q [SEP]; "?" is not in the vocabulary; the
  # batch is padded to its longest question with id 0 and mask 0.
  expected = ["[CLS]", "why", "is", "the", "sky", "blue", "[UNK]", "[SEP]"]
  assert input_ids.tolist() == [
      [vocab[t] for t in expected],
      [vocab["[CLS]"], vocab["sky"], vocab["[SEP]"]] + [0] * 5]
  assert input_mask.tolist() == [[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]

  embeddings = embedder.embed(["sky", "Why is the SKY blue?"], batch_size=1)
  table = retriever_files["table"]
  expected_embeddings = np.stack([table[input_ids[1, :3]].mean(0),
                                  table[input_ids[0]].mean(0)])
  np.testing.assert_allclose(embeddings, expected_embeddings, rtol=1e-5,
                             atol=1e-6)
  cut = query_embedder.QueryEmbedder(retriever_files["embedder"],
                                 max_query_length=5)
  long_ids, _ = cut.token_ids(["ice floating bird fly south winter"])
  assert long_ids.tolist() == [[vocab[t] for t in (
      "[CLS]", "ice", "float", "##ing", "[SEP]")]]


def _fixture_questions():
  with open(os.path.join(retrieval_fixtures.REALM_TF1_HUB, "questions.json"),
            encoding="utf-8") as f:
    questions = json.load(f)
  with open(os.path.join(retrieval_fixtures.REALM_TF1_HUB, "reference.json"),
            encoding="utf-8") as f:
    return questions, json.load(f)


def test_realm_tf1_hub_embedder_feeds_orqa_ids_and_gives_orqa_embeddings():
  config = retrievers.load_retriever_config(os.path.join(
      retrieval_fixtures.REALM_TF1_HUB, "retriever_config.json"))
  embedder = query_embedder.QueryEmbedder(config["query_embedder_path"])
  # tokenization_info names SAVEDMODEL-ASSET: the vocabulary is the asset.
  assert embedder.wordpieces.vocab_file == os.path.join(
      config["query_embedder_path"], "assets", "vocab.txt")
  # Not cut but at BERT's 512 positions.
  assert embedder.max_query_length == 512
  questions, reference = _fixture_questions()
  input_ids, input_mask = embedder.token_ids(questions)
  for row, orqa_ids in enumerate(reference["orqa_ids"]):
    length = int(input_mask[row].sum())
    assert input_ids[row, :length].tolist() == orqa_ids, questions[row]
    assert not input_mask[row, length:].any()
    assert not input_ids[row, length:].any()
  # Padded batches of several sizes give each question's own embedding.
  for batch_size in (1, 3, len(questions)):
    np.testing.assert_allclose(
        embedder.embed(questions, batch_size=batch_size),
        np.array(reference["orqa_emb"], np.float32), rtol=0, atol=1e-5)


def test_max_query_length_cuts_and_is_checked():
  embedder_path = os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder")
  questions, reference = _fixture_questions()
  long_question = max(range(len(questions)),
                      key=lambda row: len(reference["orqa_ids"][row]))
  embedder = query_embedder.QueryEmbedder(embedder_path, max_query_length=16)
  input_ids, input_mask = embedder.token_ids([questions[long_question]])
  orqa_ids = reference["orqa_ids"][long_question]
  assert input_ids.tolist() == [orqa_ids[:15] + orqa_ids[-1:]]
  assert input_mask.tolist() == [[1] * 16]
  for bad in (1, -4):
    with pytest.raises(utils.UserError, match=(
        f"max_query_length={bad}: expected 0 .* or at least 2")):
      query_embedder.QueryEmbedder(embedder_path, max_query_length=bad)


def test_position_limit_read_from_the_variables_checkpoint(retriever_files):
  assert query_embedder.position_limit(
      os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder")) == 512
  assert query_embedder.position_limit(retriever_files["embedder"]) is None


def _copy_fixture_embedder(destination, *skipped_names):
  shutil.copytree(os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder"),
                  destination, copy_function=shutil.copyfile,
                  ignore=shutil.ignore_patterns(*skipped_names))
  return str(destination)


def test_hub_module_vocabulary_is_its_one_asset_or_an_error(tmp_path):
  # No vocab.txt, but one asset file: it is the vocabulary.
  renamed = _copy_fixture_embedder(tmp_path / "renamed", "vocab.txt")
  shutil.copyfile(
      os.path.join(retrieval_fixtures.REALM_TF1_HUB, "embedder", "assets",
                   "vocab.txt"), os.path.join(renamed, "assets", "words.txt"))
  embedder = query_embedder.QueryEmbedder(renamed)
  assert embedder.wordpieces.vocab_file == os.path.join(renamed, "assets",
                                                        "words.txt")
  # No asset at all.
  empty = _copy_fixture_embedder(tmp_path / "empty", "vocab.txt")
  with pytest.raises(utils.UserError) as error:
    query_embedder.QueryEmbedder(empty)
  assert str(error.value) == (
      f"{empty}: tokenization_info's vocab_file is 'SAVEDMODEL-ASSET' and "
      "assets/ holds no file, expected the wordpiece vocabulary in "
      "assets/vocab.txt")
  # Several assets, none named vocab.txt.
  shutil.copyfile(os.path.join(renamed, "assets", "words.txt"),
                  os.path.join(empty, "assets", "a.txt"))
  shutil.copyfile(os.path.join(renamed, "assets", "words.txt"),
                  os.path.join(empty, "assets", "b.txt"))
  with pytest.raises(utils.UserError, match="assets/ holds a.txt, b.txt"):
    query_embedder.QueryEmbedder(empty)
  # A vocabulary without BERT's special pieces.
  with open(os.path.join(empty, "assets", "a.txt"), "w",
            encoding="utf-8") as f:
    f.write("the\nsky\n")
  os.remove(os.path.join(empty, "assets", "b.txt"))
  with pytest.raises(utils.UserError,
                     match=r"a.txt: no \[CLS\], \[SEP\], \[UNK\]"):
    query_embedder.QueryEmbedder(empty)


def test_query_embedder_without_projected_signature(tmp_path):
  retrieval_fixtures.write_embedder(str(tmp_path / "embedder"),
                                    with_projected=False)
  with pytest.raises(utils.UserError,
                     match="no 'projected' signature .*tokenization_info"):
    query_embedder.QueryEmbedder(str(tmp_path / "embedder"))
  with pytest.raises(utils.UserError, match="does not exist"):
    query_embedder.QueryEmbedder(str(tmp_path / "missing"))
  (tmp_path / "not_a_model").mkdir()
  with pytest.raises(utils.UserError, match="not a loadable"):
    query_embedder.QueryEmbedder(str(tmp_path / "not_a_model"))
