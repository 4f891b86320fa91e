"""The sequence layout and the input pipeline of task_specific.py (acceptance 4, 5)."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import transformers

import cache_fixtures
import neighbour_cache
import task_specific
import utils

VOCAB = 300
NUM_NEIGHBOURS = 6


def reference_contexts(contexts, budget, layout):
  """The budget rule, written plainly: greedy, in draw order, last one cut."""
  ids = []
  for index, context in enumerate(contexts):
    helper = list(layout.context_helper) if (
        layout.context_helper_mode == "each" or index == 0) else []
    slot = helper + list(context[:layout.max_context_tokens])
    room = budget - len(ids)
    if room <= len(helper):
      break
    ids += slot[:room]
    if len(slot) > room:
      break
  return ids


def random_layout(rng):
  helpers = rng.random() < 0.75
  return task_specific.Layout(
      sequence_length=int(rng.integers(24, 64)),
      max_question_tokens=int(rng.integers(1, 8)),
      max_answer_tokens=int(rng.integers(1, 10)),
      max_context_tokens=int(rng.integers(1, 16)),
      eos_id=0,
      question_helper=(1, 2) if helpers else (),
      context_helper=(3,) if helpers else (),
      answer_helper=(4, 5) if helpers else (),
      context_helper_mode=str(rng.choice(task_specific.CONTEXT_HELPER_MODES)))


@pytest.mark.slow
def test_layout_on_many_generated_examples():
  """Acceptance 5: labels, length, masking and budget on 300 random examples."""
  rng = np.random.default_rng(0)
  counts = collections.Counter()
  for _ in range(300):
    layout = random_layout(rng)
    question = rng.integers(6, VOCAB, rng.integers(0, 12)).tolist()
    answer = rng.integers(6, VOCAB, rng.integers(0, 14)).tolist()
    contexts = [rng.integers(6, VOCAB, rng.integers(1, 20)).tolist()
                for _ in range(rng.integers(0, 6))]
    features = task_specific.lay_out_example(
        tf.constant(question, tf.int32),
        tf.ragged.constant(contexts, tf.int32, ragged_rank=1,
                           row_splits_dtype=tf.int64) if contexts
        else task_specific.no_contexts(),
        tf.constant(answer, tf.int32), layout)
    ids, attention, labels = (features[name].numpy() for name in (
        "input_ids", "attention_mask", "label_mask"))
    length = int(attention.sum())
    assert ids.shape == attention.shape == labels.shape == (
        layout.sequence_length,)
    # Real tokens first, then padding; never longer than the sequence.
    assert attention.tolist() == [1] * length + [0] * (
        layout.sequence_length - length)
    # Labels cover exactly the (cut) answer, at the end, and the EOS when the
    # answer is whole.
    expected_answer = answer[:layout.max_answer_tokens] + (
        [layout.eos_id] if len(answer) <= layout.max_answer_tokens else [])
    label_positions = np.flatnonzero(labels)
    assert ids[label_positions].tolist() == expected_answer
    assert label_positions.tolist() == list(
        range(length - len(expected_answer), length))
    # Everything before the answer is unlabelled and is, in order: the
    # question helper, the cut question, the contexts, the answer helper.
    prompt = ids[:length - len(expected_answer)].tolist()
    question_part = list(layout.question_helper) + question[
        :layout.max_question_tokens]
    assert prompt[:len(question_part)] == question_part
    assert prompt[len(prompt) - len(layout.answer_helper):] == list(
        layout.answer_helper)
    budget = (layout.sequence_length - len(question_part) -
              len(layout.answer_helper) - layout.max_answer_tokens - 1)
    context_part = prompt[len(question_part):len(prompt) -
                          len(layout.answer_helper)]
    assert context_part == reference_contexts(contexts, budget, layout)
    assert len(context_part) <= budget
    # The answer reserve is kept whatever the answer's length.
    assert len(prompt) + layout.max_answer_tokens + 1 <= layout.sequence_length
    counts["cut"] += 0 < len(context_part) == budget
    counts["whole"] += bool(contexts) and len(context_part) == sum(
        min(len(c), layout.max_context_tokens) for c in contexts) + (
            len(contexts) * len(layout.context_helper)
            if layout.context_helper_mode == "each"
            else len(layout.context_helper))
    counts["once"] += (layout.context_helper_mode == "once" and
                       len(contexts) > 1 and bool(context_part))
    counts["cut answer"] += len(answer) > layout.max_answer_tokens
  # The generated cases exercise cut, whole and shared-helper contexts.
  assert min(counts.values()) >= 20, counts


def test_a_cut_answer_has_no_eos_and_a_whole_one_does():
  """Issue 11: an answer cut at max_answer_tokens must not teach a stop."""
  layout = task_specific.Layout(
      sequence_length=16, max_question_tokens=2, max_answer_tokens=3,
      max_context_tokens=2, eos_id=0)

  def labelled(answer):
    features = task_specific.lay_out_example(
        tf.constant([7, 8], tf.int32), task_specific.no_contexts(),
        tf.constant(answer, tf.int32), layout)
    return features["input_ids"].numpy()[
        features["label_mask"].numpy() == 1].tolist()

  assert labelled([11, 12, 13]) == [11, 12, 13, 0]  # whole: ends with EOS
  assert labelled([11, 12, 13, 14]) == [11, 12, 13]  # cut: no EOS
  assert labelled([]) == [0]


def test_reference_rule_drops_a_context_when_only_its_helper_fits():
  layout = task_specific.Layout(
      sequence_length=30, max_question_tokens=4, max_answer_tokens=4,
      max_context_tokens=10, eos_id=0, context_helper=(3, 3))
  ids, kept = task_specific.fit_contexts(
      tf.ragged.constant([[7, 7, 7], [8, 8, 8]], tf.int32), 7, layout)
  assert ids.numpy().tolist() == [3, 3, 7, 7, 7]
  assert kept.numpy().tolist() == [5, 0]
  ids, kept = task_specific.fit_contexts(
      tf.ragged.constant([[7, 7, 7], [8, 8, 8]], tf.int32), 8, layout)
  assert ids.numpy().tolist() == [3, 3, 7, 7, 7, 3, 3, 8]
  assert kept.numpy().tolist() == [5, 3]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tokenizer")
  cache_fixtures.write_tokenizer(directory)
  return task_specific.load_tokenizer(str(directory))


def test_make_layout_helper_words_and_budget(tokenizer):
  def layout_of(n_positions=1024, **values):
    return task_specific.make_layout(
        tokenizer, task_specific.LayoutConfig(**values), n_positions)

  layout = layout_of(sequence_length=64, max_question_tokens=8,
                     max_answer_tokens=8, max_context_tokens=8,
                     use_helper_words=True, context_helper_mode="once")
  assert tokenizer.decode(layout.question_helper) == "Question:"
  assert tokenizer.decode(layout.context_helper) == " Context:"
  assert tokenizer.decode(layout.answer_helper) == " Answer:"
  assert layout.eos_id == tokenizer.eos_token_id
  assert layout.prompt_length == 64 - 8 - 1
  bare = layout_of(sequence_length=17, max_question_tokens=8,
                   max_answer_tokens=8, max_context_tokens=8,
                   use_helper_words=False)
  assert bare.question_helper == bare.context_helper == bare.answer_helper == ()
  # 0: the model's n_positions.
  assert layout_of(n_positions=512, max_answer_tokens=8).sequence_length == 512
  with pytest.raises(utils.UserError, match="exceed the sequence length 16"):
    layout_of(sequence_length=16, max_question_tokens=8, max_answer_tokens=8,
              max_context_tokens=8, use_helper_words=False)
  with pytest.raises(utils.UserError, match="exceeds the model's n_positions"):
    layout_of(n_positions=32, sequence_length=64)
  with pytest.raises(utils.UserError, match="--max_answer_tokens=0: must be"):
    layout_of(max_answer_tokens=0)


def test_load_tokenizer_missing_is_a_user_error(tmp_path):
  with pytest.raises(utils.UserError, match="GPT2TokenizerFast"):
    task_specific.load_tokenizer(str(tmp_path / "nothing"))


# ---------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------

# Helper ids outside the fixture's content ids (1 .. VOCAB - 1).
QUESTION_HELPER, CONTEXT_HELPER, ANSWER_HELPER = (1001, 1002), (1003,), (1004,)
LAYOUT = task_specific.Layout(
    sequence_length=48, max_question_tokens=6, max_answer_tokens=8,
    max_context_tokens=8, eos_id=0, question_helper=QUESTION_HELPER,
    context_helper=CONTEXT_HELPER, answer_helper=ANSWER_HELPER)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("cache"))
  records = {
      "train": cache_fixtures.random_records(
          30, num_neighbours=NUM_NEIGHBOURS, vocab_size=VOCAB, seed=0),
      "validation": cache_fixtures.random_records(
          9, num_neighbours=NUM_NEIGHBOURS, vocab_size=VOCAB, seed=1,
          id_prefix="v"),
  }
  manifest = cache_fixtures.write_cache(
      directory, records, num_neighbours=NUM_NEIGHBOURS, vocab_size=VOCAB,
      num_shards=3)
  return directory, manifest, records


def config(approach="cached_pretok", **overrides):
  values = dict(approach=approach, num_retrievals=3, retrieval_temperature=1.0,
                seed=5, shuffle_buffer_size=50)
  values.update(overrides)
  return task_specific.DataConfig(**values)


def batches(cache, data_config, *, split="train", training=True, take=4,
            batch_size=4, input_context=None):
  directory, manifest, _ = cache
  dataset = task_specific.make_dataset(
      neighbour_cache.split_files(directory, manifest, split), data_config,
      LAYOUT, batch_size=batch_size, training=training,
      input_context=input_context)
  if take:
    dataset = dataset.take(take)
  return [{k: v.numpy() for k, v in batch.items()} for batch in dataset]


def context_part(row):
  """The laid-out context ids of one row (between the question and `Answer:`)."""
  ids = row.tolist()
  end = ids.index(ANSWER_HELPER[0])
  start = ids.index(CONTEXT_HELPER[0]) if CONTEXT_HELPER[0] in ids else end
  return ids[start:end]


def prompt_key(row):
  """The question part (helper + question ids) of a row, as a key."""
  ids = row.tolist()
  end = ids.index(CONTEXT_HELPER[0] if CONTEXT_HELPER[0] in ids
                  else ANSWER_HELPER[0])
  return tuple(ids[:end])


@pytest.mark.slow
def test_shapes_and_reproducibility(cache):
  first = batches(cache, config())
  again = batches(cache, config())
  other_seed = batches(cache, config(seed=6))
  for batch in first:
    for name in ("input_ids", "attention_mask", "label_mask"):
      assert batch[name].shape == (4, LAYOUT.sequence_length)
      assert batch[name].dtype == np.int32
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  assert any(not np.array_equal(a["input_ids"], b["input_ids"])
             for a, b in zip(first, other_seed))


def test_contexts_come_from_the_own_or_another_question(cache):
  """cached_pretok uses the question's neighbours; random_context another's."""
  _, _, records = cache
  by_question = {tuple(list(QUESTION_HELPER) +
                       r["question_ids"][:LAYOUT.max_question_tokens]): r
                 for r in records["train"]}

  def own_blocks(record):
    return {tuple(block[:LAYOUT.max_context_tokens])
            for block in record["neighbour_ids"]}

  def contexts_of(row):
    part = context_part(row)
    pieces, current = [], None
    for token in part:
      if token == CONTEXT_HELPER[0]:
        current = []
        pieces.append(current)
      else:
        current.append(token)
    return pieces

  for approach, expect_own in (("cached_pretok", True),
                               ("random_context", False)):
    checked = 0
    for batch in batches(cache, config(approach), take=6):
      for row in batch["input_ids"]:
        record = by_question[prompt_key(row)]
        pieces = contexts_of(row)
        assert pieces
        own = own_blocks(record)
        for piece in pieces:
          # A piece cut to a token or two may start another block by chance.
          if not expect_own and len(piece) < 3:
            continue
          checked += 1
          whole = [b for b in own if b[:len(piece)] == tuple(piece)]
          assert bool(whole) == expect_own, (approach, piece)
    assert checked >= 24
  for batch in batches(cache, config("naked_lm"), take=2):
    for row in batch["input_ids"]:
      assert context_part(row) == []


def test_first_answer_or_every_answer(cache):
  _, _, records = cache
  first = batches(cache, config(), split="validation", training=False,
                  take=None)
  every = batches(cache, config(every_answer=True), split="validation",
                  training=False, take=None)
  rows = lambda bs: sum(int((b["label_mask"].sum(1) > 0).sum()) for b in bs)
  assert rows(first) == len(records["validation"])
  assert rows(every) == sum(len(r["answer_ids"]) for r in records["validation"])
  # The last batch is padded with label-free rows that still attend.
  assert first[-1]["input_ids"].shape == (4, LAYOUT.sequence_length)
  assert (first[-1]["attention_mask"].sum(1) > 0).all()


def test_evaluation_is_one_pass_in_file_order_and_reproducible(cache):
  a = batches(cache, config(), split="validation", training=False, take=None)
  b = batches(cache, config(), split="validation", training=False, take=None)
  assert len(a) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_training_pipelines_share_the_shards(cache):
  """Two training workers (by file: 3 shards) read disjoint parts that cover
  the split."""
  keys = []
  for pipeline in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=pipeline)
    got = batches(cache, config(shuffle_buffer_size=1), take=8, batch_size=1,
                  input_context=context)
    keys.append({prompt_key(b["input_ids"][0]) for b in got})
  assert not keys[0] & keys[1]
  # Shards of 10 records: one worker reads two of them, the other one.
  assert len(keys[0]) == 8 and len(keys[1]) == 8


def _evaluation_rows(cache, replicas, pipelines, number_examples=0):
  """{pipeline: [(example key, answer index) of its labelled rows]} and each
  pipeline's number of per-replica batches."""
  directory, manifest, _ = cache
  files = neighbour_cache.split_files(directory, manifest, "validation")
  rows, counts = {}, {}
  for pipeline in range(pipelines):
    context = tf.distribute.InputContext(
        num_input_pipelines=pipelines, input_pipeline_id=pipeline,
        num_replicas_in_sync=replicas)
    got = list(task_specific.make_dataset(
        files, config(every_answer=True), LAYOUT, batch_size=2,
        training=False, input_context=context,
        number_examples=number_examples).as_numpy_iterator())
    counts[pipeline] = len(got)
    rows[pipeline] = [(key, index) for batch in got for key, index, labels in
                      zip(batch["example_key"], batch["answer_index"],
                          batch["label_mask"].sum(1)) if labels]
  return rows, counts


@pytest.mark.slow
def test_evaluation_pipelines_share_the_rows_of_each_global_batch(cache):
  """Every row of the requested set on exactly one replica, in global batch
  order; every pipeline runs the same number of steps."""
  _, _, records = cache
  answers = sum(len(r["answer_ids"]) for r in records["validation"])
  alone, alone_counts = _evaluation_rows(cache, replicas=1, pipelines=1)
  assert len(alone[0]) == len(set(alone[0])) == answers
  # 4 replicas over 2 pipelines: global batches of 4 x 2 rows, pipeline 0
  # the first 4 of each, pipeline 1 the last 4.
  shared, counts = _evaluation_rows(cache, replicas=4, pipelines=2)
  assert counts[0] == counts[1] and counts[0] % 2 == 0
  by_step = [alone[0][i:i + 8] for i in range(0, answers, 8)]
  assert shared[0] == [row for rows in by_step for row in rows[:4]]
  assert shared[1] == [row for rows in by_step for row in rows[4:]]
  # The first examples only: the same set, whatever the pipelines.
  first, _ = _evaluation_rows(cache, replicas=1, pipelines=1,
                              number_examples=5)
  split, _ = _evaluation_rows(cache, replicas=2, pipelines=2,
                              number_examples=5)
  assert first[0] == alone[0][:5]
  assert sorted(split[0] + split[1]) == sorted(first[0])
  assert not set(split[0]) & set(split[1])


def test_epochs_reshuffle_and_every_example_is_seen(cache):
  # Without a shuffle buffer, epochs stay apart: each is the whole split, and
  # the files are read in a new order.
  got = batches(cache, config(shuffle_buffer_size=1), take=15)  # 2 epochs
  keys = [prompt_key(row) for batch in got for row in batch["input_ids"]]
  assert len(set(keys[:30])) == 30 and set(keys[:30]) == set(keys[30:60])
  assert keys[:30] != keys[30:60]


@pytest.mark.slow
def test_a_resumed_stream_skips_to_the_examples_an_uninterrupted_one_reads(
    cache):
  """Acceptance 4 (issue 14: by position, not a checkpointed iterator): the
  stream from 36 examples on is the uninterrupted stream's from batch 9,
  contexts and random-context partners included, in a later epoch (30
  questions, 60 answers) and within the first."""
  directory, manifest, _ = cache
  files = neighbour_cache.split_files(directory, manifest, "train")

  def stream(data_config, skip_examples, batches):
    return [b["input_ids"].numpy() for b in task_specific.make_dataset(
        files, data_config, LAYOUT, batch_size=4, training=True,
        skip_examples=skip_examples).take(batches)]

  for data_config in (config("random_context"),
                      config(every_answer=True)):
    uninterrupted = stream(data_config, 0, 14)
    for got, expected in zip(stream(data_config, 36, 5), uninterrupted[9:]):
      np.testing.assert_array_equal(got, expected, err_msg=str(data_config))


def test_check_data_config(cache):
  directory, manifest, _ = cache
  task_specific.check_data_config(config(), manifest, directory)
  task_specific.check_data_config(config("naked_lm", num_retrievals=99),
                                  manifest, directory)
  bad = {
      "approach_type": config("retrieval"),
      "neighbours asked for": config(num_retrievals=NUM_NEIGHBOURS + 1),
      "must be >= 0": config(retrieval_temperature=-1.0),
      "retrieval_bank_size": config(retrieval_bank_size=2),
      "needs >= 1 context": config(num_retrievals=0),
  }
  for message, data_config in bad.items():
    with pytest.raises(utils.UserError, match=message):
      task_specific.check_data_config(data_config, manifest, directory)


# ---------------------------------------------------------------------------
# Model and loss
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_model_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fresh_model")
  config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16,
                                   n_layer=2, n_head=2)
  (directory / "config.json").write_text(config.to_json_string())
  return str(directory)


def test_load_model_fresh_from_a_config_dir_then_from_saved_weights(
    fresh_model_dir, tmp_path):
  fresh = task_specific.load_model(fresh_model_dir, seed=3)
  again = task_specific.load_model(fresh_model_dir, seed=3)
  other = task_specific.load_model(fresh_model_dir, seed=4)
  weights = {k: v.numpy() for k, v in fresh.named_weights().items()}
  for name, value in again.named_weights().items():
    np.testing.assert_array_equal(value.numpy(), weights[name])
  assert any(not np.array_equal(v.numpy(), weights[k])
             for k, v in other.named_weights().items())
  fresh.save_pretrained(str(tmp_path / "saved"))
  loaded = task_specific.load_model(str(tmp_path / "saved"))
  for name, value in loaded.named_weights().items():
    np.testing.assert_array_equal(value.numpy(), weights[name])


# None scores every position; 4 is the most labels of a row; 6 makes the
# window run past the end of row 1, whose labels end the sequence.
@pytest.mark.parametrize("max_labels", [None, 4, 6])
def test_answer_loss_sums_the_labelled_next_token_losses(fresh_model_dir,
                                                         max_labels):
  model = task_specific.load_model(fresh_model_dir)
  rng = np.random.default_rng(0)
  input_ids = rng.integers(1, VOCAB, (3, 16)).astype(np.int32)
  attention_mask = np.ones((3, 16), np.int32)
  attention_mask[2, 10:] = 0
  label_mask = np.zeros((3, 16), np.int32)
  label_mask[0, 5:9] = 1
  label_mask[1, 12:16] = 1
  label_mask[2, 7:10] = 1
  batch = {"input_ids": tf.constant(input_ids),
           "attention_mask": tf.constant(attention_mask),
           "label_mask": tf.constant(label_mask),
           "dropout_seed": tf.zeros([3, 2], tf.int64)}
  loss_sum, num_tokens = task_specific.answer_loss_sum(model, batch,
                                                       max_labels)
  logits = model(input_ids, attention_mask=attention_mask).numpy()
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -sum(log_probs[b, t - 1, input_ids[b, t]]
                  for b in range(3) for t in range(16) if label_mask[b, t])
  assert float(num_tokens) == label_mask.sum() == 11
  assert float(loss_sum) == pytest.approx(expected, rel=1e-5)


def test_format_sample_marks_the_parts_without_loss(tokenizer):
  ids = tokenizer.encode("Question: why Answer:") + tokenizer.encode(
      " blue sky") + [tokenizer.eos_token_id]
  answer_start = len(tokenizer.encode("Question: why Answer:"))
  features = {"input_ids": ids + [0, 0],
              "attention_mask": [1] * len(ids) + [0, 0],
              "label_mask": [0] * answer_start + [1] * (
                  len(ids) - answer_start) + [0, 0]}
  assert task_specific.format_sample(tokenizer, features) == (
      "⟦Question: why Answer:⟧ blue sky<|endoftext|>")
