"""GPT-2 in TF2: parity with transformers, placement, precision, decoding, bad inputs."""

import itertools
import os

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
import tensorflow as tf
import transformers

from conftest import LOGICAL_CPUS
import modeling_tf_gpt2_model_par as gpt2
import utils

VOCAB = 64


def _config(**overrides):
  values = dict(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB,
                n_positions=32, initializer_range=0.1, bos_token_id=VOCAB - 1,
                eos_token_id=VOCAB - 1)
  values.update(overrides)
  return transformers.GPT2Config(**values)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
  """A random transformers TF GPT-2 saved as safetensors and as tf_model.h5."""
  model = transformers.TFGPT2LMHeadModel(_config())
  model(tf.constant([[1, 2, 3]]))
  # Weights from a seeded numpy stream: independent of TF's global RNG state,
  # which depends on whatever ran before in the session.
  rng = np.random.RandomState(1)
  for weight in model.weights:
    value = rng.normal(0.0, 0.1, weight.shape).astype(np.float32)
    weight.assign(value + 1.0 if "gamma" in weight.name else value)
  root = tmp_path_factory.mktemp("hf")
  model.save_pretrained(str(root / "safetensors"), safe_serialization=True)
  model.save_pretrained(str(root / "h5"))
  assert os.listdir(root / "h5").count("tf_model.h5") == 1
  return {"model": model, "safetensors": str(root / "safetensors"),
          "h5": str(root / "h5")}


@pytest.fixture(scope="session")
def ours(hf_dirs):
  return gpt2.GPT2LMHeadModel.from_pretrained(hf_dirs["safetensors"])


def _batch():
  """Three prompts of lengths 9, 6 and 3, left padded to 9."""
  ids = np.random.RandomState(0).randint(0, VOCAB - 1, size=(3, 9))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :6] = 0
  ids = np.where(mask == 1, ids, 0)
  return tf.constant(ids, tf.int32), tf.constant(mask, tf.int32)


def _hf_positions(mask):
  return tf.maximum(tf.cumsum(mask, axis=-1) - 1, 0)


# -- acceptance 1: parity with transformers, both directions ----------------


@pytest.mark.parametrize("fmt", ["safetensors", "h5"])
def test_hf_checkpoint_loads_with_equal_logits(hf_dirs, fmt):
  model = gpt2.GPT2LMHeadModel.from_pretrained(hf_dirs[fmt])
  ids, mask = _batch()
  hf_logits = hf_dirs["model"](ids).logits
  np.testing.assert_allclose(model(ids), hf_logits, atol=1e-4, rtol=0)
  hf_masked = hf_dirs["model"](ids, attention_mask=mask,
                               position_ids=_hf_positions(mask)).logits
  # Padded rows included: the masking arithmetic is transformers'.
  np.testing.assert_allclose(model(ids, attention_mask=mask), hf_masked,
                             atol=1e-4, rtol=0)


def test_pytorch_layout_safetensors_load(ours, tmp_path):
  """The hub's layout: bare GPT2Model names, causal-mask buffers, biases [n]."""
  tensors = {name[len("transformer."):]: variable.numpy()
             for name, variable in ours.named_weights().items()}
  tensors["h.0.attn.bias"] = np.tril(np.ones([1, 1, 32, 32], np.float32))
  safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"),
                              metadata={"format": "pt"})
  utils.atomic_write_text(str(tmp_path / "config.json"),
                          ours.config.to_json_string())
  loaded = gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path))
  ids, _ = _batch()
  np.testing.assert_array_equal(loaded(ids), ours(ids))


def test_saved_model_loads_in_transformers_without_warnings(tmp_path):
  model = gpt2.GPT2LMHeadModel.from_config(_config(), seed=3)
  model.save_pretrained(str(tmp_path))
  hf, info = transformers.TFGPT2LMHeadModel.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert info == {"missing_keys": [], "unexpected_keys": [],
                  "mismatched_keys": []}
  ids, mask = _batch()
  np.testing.assert_allclose(
      model(ids, attention_mask=mask),
      hf(ids, attention_mask=mask, position_ids=_hf_positions(mask)).logits,
      atol=1e-4, rtol=0)
  reloaded = gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(model(ids), reloaded(ids))


def test_left_padding_does_not_change_real_positions(ours):
  ids, mask = _batch()
  padded = ours(ids, attention_mask=mask).numpy()
  alone = ours(ids[2:, 6:]).numpy()
  np.testing.assert_allclose(padded[2, 6:], alone[0], atol=1e-5, rtol=0)


def test_score_positions_gives_the_logits_at_those_positions(ours):
  ids, mask = _batch()
  every = ours(ids, attention_mask=mask).numpy()
  positions = np.array([[0, 8], [3, 5], [8, 8]], np.int32)
  some = ours(ids, attention_mask=mask, score_positions=positions).numpy()
  np.testing.assert_allclose(
      some, np.take_along_axis(every, positions[:, :, None], axis=1),
      atol=1e-5, rtol=0)


def test_pytorch_names_and_bare_model_names_map_to_weights():
  assert gpt2.hf_weight_name("h.3.mlp.c_fc.weight") == (
      "transformer.h.3.mlp.c_fc.weight")
  assert gpt2.hf_weight_name("transformer.h.0.attn.bias") is None
  assert gpt2.hf_weight_name("lm_head.weight") is None
  name = "transformer.h.11.ln_2.weight"
  assert gpt2.tf_weight_name(name) == "transformer/h_._11/ln_2/gamma:0"
  assert gpt2.hf_weight_name(gpt2.tf_weight_name(name)) == name


def test_from_config_is_deterministic_and_scaled_like_transformers():
  config = _config(n_layer=2)
  first = gpt2.GPT2LMHeadModel.from_config(config, seed=5).named_weights()
  again = gpt2.GPT2LMHeadModel.from_config(config, seed=5).named_weights()
  for name, variable in first.items():
    np.testing.assert_array_equal(variable, again[name])
  proj = first["transformer.h.0.attn.c_proj.weight"].numpy().std()
  fc = first["transformer.h.0.mlp.c_fc.weight"].numpy().std()
  assert proj == pytest.approx(fc / 2.0, rel=0.1)  # 1 / sqrt(2 * n_layer)
  assert not first["transformer.h.0.attn.c_attn.bias"].numpy().any()


def test_variables_are_checkpointable_under_hf_paths(tmp_path):
  model = gpt2.GPT2LMHeadModel.from_config(_config(n_layer=1), seed=1)
  model.generate(tf.constant([[1, 2]]), max_new_tokens=2)
  path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
  names = [name for name, _ in tf.train.list_variables(path)]
  assert "model/transformer/h/0/attn/c_attn/weight/.ATTRIBUTES/VARIABLE_VALUE" in names
  assert len(model.trainable_variables) == len(gpt2.weight_shapes(model.config))


# -- acceptance 2: placement over devices ------------------------------------


def _loss_and_grads(model, ids, mask):

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      logits = model(ids, attention_mask=mask, training=True,
                     dropout_seed=tf.constant([4, 2]))
      loss = tf.reduce_mean(logits * logits)
    grads = tape.gradient(loss, model.trainable_variables)
    return logits, [tf.convert_to_tensor(grad) for grad in grads]

  return step()


@pytest.fixture(scope="session")
def reference_grads(ours):
  """Logits and gradients of the single-device float32 model, with dropout."""
  return _loss_and_grads(ours, *_batch())


@pytest.mark.parametrize("num_devices", [2, 4])
def test_split_model_matches_single_device(hf_dirs, reference_grads,
                                           greedy_tokens, num_devices):
  split = gpt2.GPT2LMHeadModel.from_pretrained(
      hf_dirs["safetensors"], devices=LOGICAL_CPUS[:num_devices])
  ids, mask = _batch()
  logits, grads = reference_grads
  split_logits, split_grads = _loss_and_grads(split, ids, mask)
  np.testing.assert_allclose(split_logits, logits, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(  # decoding on the split model, without XLA
      split.generate(ids, attention_mask=mask, max_new_tokens=8,
                     pad_token_id=0), greedy_tokens)
  for grad, split_grad in zip(grads, split_grads):
    np.testing.assert_allclose(split_grad, grad, atol=1e-5, rtol=0)
  weights = split.named_weights()
  per_device = 4 // num_devices
  for name, variable in weights.items():
    if name.startswith("transformer.h."):
      layer = int(name.split(".")[2])
      expected = LOGICAL_CPUS[layer // per_device]
    elif name.startswith(("transformer.wte", "transformer.wpe")):
      expected = LOGICAL_CPUS[0]
    else:
      expected = LOGICAL_CPUS[num_devices - 1]
    assert variable.device.endswith(expected), name


def test_backward_ops_of_a_block_run_on_its_device():
  split = gpt2.GPT2LMHeadModel.from_config(_config(n_layer=2),
                                           devices=LOGICAL_CPUS[2:4])
  ids, mask = _batch()

  @tf.function
  def grads():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(split(ids, attention_mask=mask))
    return tape.gradient(loss, split.trainable_variables)

  graph = grads.get_concrete_function().graph
  backward_matmul_devices = {
      tf.DeviceSpec.from_string(op.device).to_string()
      for op in graph.get_operations()
      if op.type == "MatMul" and "gradient" in op.name}
  assert backward_matmul_devices == {
      tf.DeviceSpec.from_string(d).to_string() for d in LOGICAL_CPUS[2:4]}


def test_mirrored_strategy_creates_mirrored_variables_and_runs():
  strategy = tf.distribute.MirroredStrategy(LOGICAL_CPUS[:2])
  with strategy.scope():
    model = gpt2.GPT2LMHeadModel.from_config(_config(n_layer=2), seed=2)
  assert isinstance(model.transformer.wte.weight,
                    tf.distribute.DistributedValues)
  ids, mask = _batch()

  @tf.function
  def replica_step(ids, mask):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(model(ids, attention_mask=mask, training=True,
                                  dropout_seed=tf.constant([1, 1])))
    return tape.gradient(loss, model.transformer.wte.weight)

  grads = strategy.run(replica_step, args=(ids, mask))
  local = strategy.experimental_local_results(grads)
  np.testing.assert_allclose(local[0], local[1], atol=1e-6)
  # Decoding inside replicas, as generation.py does: each replica its rows.
  per_replica_ids = strategy.experimental_distribute_values_from_function(
      lambda context: ids[context.replica_id_in_sync_group::2])
  decoded = tf.function(lambda x: strategy.run(
      lambda rows: model.generate(rows, max_new_tokens=3), args=(x,)))(
          per_replica_ids)
  np.testing.assert_array_equal(
      strategy.experimental_local_results(decoded)[1],
      model.generate(ids[1::2], max_new_tokens=3))


# -- acceptance 4: bf16 and recomputation -------------------------------------

BF16_LOGIT_TOLERANCE = 0.1  # documented in the README (section "model")


def test_bf16_logits_are_close_to_float32(hf_dirs, ours):
  bf16 = gpt2.GPT2LMHeadModel.from_pretrained(hf_dirs["safetensors"],
                                              dtype="bfloat16")
  assert bf16.transformer.wte.weight.dtype == tf.float32
  ids, mask = _batch()
  logits = bf16(ids, attention_mask=mask)
  assert logits.dtype == tf.float32
  reference = ours(ids, attention_mask=mask).numpy()
  real = mask.numpy() == 1
  error = np.abs(logits.numpy() - reference)[real].max()
  assert error < BF16_LOGIT_TOLERANCE
  assert error > 0  # the computation really ran in bf16


@pytest.mark.parametrize("devices", [None, LOGICAL_CPUS[:2]])
def test_recomputation_gives_the_same_gradients(hf_dirs, reference_grads,
                                                devices):
  recomputed = gpt2.GPT2LMHeadModel.from_pretrained(
      hf_dirs["safetensors"], devices=devices, recompute=True)
  ids, mask = _batch()
  _, grads = reference_grads
  _, recomputed_grads = _loss_and_grads(recomputed, ids, mask)
  for grad, other in zip(grads, recomputed_grads):
    np.testing.assert_allclose(other, grad, atol=1e-6, rtol=0)


def test_dropout_is_stateless_in_its_seed(ours):
  ids, mask = _batch()

  def run(seed):
    return ours(ids, attention_mask=mask, training=True,
                dropout_seed=tf.constant(seed)).numpy()

  np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
  assert np.abs(run([1, 2]) - run([1, 3])).max() > 1e-3
  assert np.abs(run([1, 2]) - ours(ids, attention_mask=mask).numpy()).max() > 1e-3


# -- acceptance 3: decoding ---------------------------------------------------


def test_cached_decoding_matches_full_recomputation(ours):
  ids, mask = _batch()
  full = ours(ids, attention_mask=mask).numpy()
  total = ids.shape[1] + 2
  cache = ours._empty_cache(3, total)  # pylint: disable=protected-access
  key_mask = tf.concat([mask, tf.ones([3, 2], tf.int32)], axis=1)
  positions = gpt2.default_position_ids(mask, tf.shape(ids))
  logits, cache = ours.decode_step(ids[:, :5], positions[:, :5], key_mask,
                                   cache, tf.constant(0))
  pieces = [logits.numpy()]
  for index in range(5, 9):
    logits, cache = ours.decode_step(ids[:, index:index + 1],
                                     positions[:, index:index + 1], key_mask,
                                     cache, tf.constant(index))
    pieces.append(logits.numpy())
  incremental = np.concatenate(pieces, axis=1)
  real = mask.numpy() == 1
  np.testing.assert_allclose(incremental[real], full[real], atol=1e-5, rtol=0)


@pytest.fixture(scope="session")
def greedy_tokens(ours):
  ids, mask = _batch()
  return ours.generate(ids, attention_mask=mask, max_new_tokens=8,
                       pad_token_id=0)


def test_greedy_matches_transformers_generate(hf_dirs, greedy_tokens):
  ids, mask = _batch()
  ours_tokens = greedy_tokens
  hf_tokens = hf_dirs["model"].generate(
      ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
      pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
  assert ours_tokens.dtype == tf.int32
  np.testing.assert_array_equal(ours_tokens, hf_tokens)
  assert len(set(ours_tokens.numpy().ravel())) > 3  # not a degenerate model


def test_rows_stop_at_eos_and_are_padded(ours, greedy_tokens):
  ids, mask = _batch()
  free = greedy_tokens.numpy()
  eos = int(free[0, 2])
  stopped = ours.generate(ids, attention_mask=mask, max_new_tokens=8,
                          eos_token_id=eos, pad_token_id=7).numpy()
  for row, free_row in zip(stopped, free):
    hits = np.flatnonzero(free_row == eos)
    end = hits[0] + 1 if hits.size else len(free_row)
    np.testing.assert_array_equal(row[:end], free_row[:end])
    assert (row[end:] == 7).all()
  assert (stopped[0, 3:] == 7).all()


def test_sampling_is_reproducible(ours):
  ids, mask = _batch()
  kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True,
                temperature=1.5, top_k=5, top_p=0.9, pad_token_id=0)
  first = ours.generate(ids, seed=11, **kwargs).numpy()
  np.testing.assert_array_equal(first, ours.generate(ids, seed=11, **kwargs))
  assert (first != ours.generate(ids, seed=12, **kwargs).numpy()).any()


def test_filter_top_k_keeps_the_k_largest():
  logits = tf.constant([[0.1, 3.0, -1.0, 2.0]])
  kept = gpt2._filter_top_k_top_p(logits, 2, 1.0).numpy()  # pylint: disable=protected-access
  np.testing.assert_array_equal(kept > -1e8, [[False, True, False, True]])


def test_filter_top_p_keeps_the_smallest_nucleus():
  logits = tf.math.log(tf.constant([[0.5, 0.3, 0.15, 0.05]]))
  kept = gpt2._filter_top_k_top_p(logits, 0, 0.7).numpy()  # pylint: disable=protected-access
  assert (kept[0, :2] > -1e8).all() and (kept[0, 2:] < -1e8).all()


def _sequence_logprobs(model, prompt, continuations):
  """Log-probability of each continuation after `prompt`, in one batch."""
  ids = tf.constant([list(prompt) + list(tokens) for tokens in continuations],
                    tf.int32)
  logprobs = tf.nn.log_softmax(model(ids)).numpy()
  predicting = logprobs[:, len(prompt) - 1:-1]  # the steps that predict them
  chosen = np.take_along_axis(predicting, np.array(continuations)[:, :, None],
                              axis=-1)
  return chosen[:, :, 0].sum(-1)


def test_beam_search_with_every_prefix_kept_finds_the_best_sequence():
  model = gpt2.GPT2LMHeadModel.from_config(
      _config(n_layer=1, vocab_size=6, initializer_range=0.5), seed=4)
  prompt = [1, 2]
  every = list(itertools.product(range(6), repeat=3))
  scores = _sequence_logprobs(model, prompt, every)
  # 36 beams keep every 2-token prefix, so the search is exhaustive.
  beam = model.generate(tf.constant([prompt]), max_new_tokens=3, num_beams=36)
  assert tuple(beam.numpy()[0]) == every[int(np.argmax(scores))]
  greedy = model.generate(tf.constant([prompt]), max_new_tokens=3).numpy()[0]
  assert scores.max() > _sequence_logprobs(model, prompt, [greedy])[0]


def test_beam_search_matches_transformers_beams(hf_dirs, ours):
  ids, mask = _batch()
  ours_tokens = ours.generate(ids, attention_mask=mask, max_new_tokens=4,
                              num_beams=3, pad_token_id=0)
  hf_tokens = hf_dirs["model"].generate(
      ids, attention_mask=mask, max_new_tokens=4, num_beams=3,
      do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
  np.testing.assert_array_equal(ours_tokens, hf_tokens)


def test_repetition_penalty_follows_transformers_rule():
  logits = tf.constant([[2.0, -2.0, 1.0]])
  seen = tf.constant([[True, True, False]])
  penalised = gpt2._apply_repetition_penalty(logits, seen, 2.0)  # pylint: disable=protected-access
  np.testing.assert_allclose(penalised, [[1.0, -4.0, 1.0]])


# -- acceptance 6: bad inputs -------------------------------------------------


def _copy_with_weights(source_dir, target_dir, edit):
  weights = safetensors_numpy.load_file(os.path.join(source_dir,
                                                     "model.safetensors"))
  edit(weights)
  os.makedirs(target_dir)
  safetensors_numpy.save_file(weights,
                              os.path.join(target_dir, "model.safetensors"),
                              metadata={"format": "tf"})
  with open(os.path.join(source_dir, "config.json")) as f:
    config = f.read()
  with open(os.path.join(target_dir, "config.json"), "w") as f:
    f.write(config)
  return target_dir


def test_missing_weight_is_named(hf_dirs, tmp_path):
  name = "transformer/h_._1/mlp/c_fc/weight:0"
  bad = _copy_with_weights(hf_dirs["safetensors"], str(tmp_path / "bad"),
                           lambda weights: weights.pop(name))
  with pytest.raises(utils.UserError,
                     match=r"missing weight transformer\.h\.1\.mlp\.c_fc\.weight"):
    gpt2.GPT2LMHeadModel.from_pretrained(bad)


def test_misshaped_weight_is_named_with_shapes(hf_dirs, tmp_path):
  name = "transformer/wpe/embeddings:0"
  bad = _copy_with_weights(
      hf_dirs["safetensors"], str(tmp_path / "bad"),
      lambda weights: weights.__setitem__(name, weights[name][:16]))
  with pytest.raises(utils.UserError, match=(
      r"transformer\.wpe\.weight has shape \[16, 32\], expected \[32, 32\]")):
    gpt2.GPT2LMHeadModel.from_pretrained(bad)


def test_missing_directory_and_config_only_directory(tmp_path):
  with pytest.raises(utils.UserError, match="no such checkpoint directory"):
    gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path / "nowhere"))
  utils.atomic_write_text(str(tmp_path / "config.json"),
                          _config().to_json_string())
  with pytest.raises(utils.UserError, match="no model.safetensors or tf_model.h5"):
    gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path))


def test_bad_devices_are_refused():
  with pytest.raises(utils.UserError, match="5 devices for 4 layers"):
    gpt2.GPT2LMHeadModel.from_config(_config(), devices=LOGICAL_CPUS + ["/cpu:0"])
  with pytest.raises(utils.UserError, match="unknown device '/device:GPU:7'"):
    gpt2.GPT2LMHeadModel.from_config(_config(), devices=["/device:GPU:7"])


def test_prompt_longer_than_n_positions_is_refused(ours):
  too_long = tf.zeros([1, 33], tf.int32)
  with pytest.raises(utils.UserError, match="longer than the model's n_positions=32"):
    ours(too_long)
  with pytest.raises(utils.UserError, match="longer than the model's n_positions=32"):
    ours.generate(too_long, max_new_tokens=1)
  with pytest.raises(utils.UserError, match="max_new_tokens=10"):
    ours.generate(tf.zeros([1, 30], tf.int32), max_new_tokens=10)
