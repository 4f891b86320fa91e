"""GPT-2 in TF2: the forward pass, placement over devices, precision, recomputation, the KV-cache step, bad inputs."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import LOGICAL_CPUS
import decoding
import gpt2_fixtures
import gpt2_weights
import modeling_tf_gpt2_model_par as gpt2
import utils


@pytest.fixture(scope="module")
def ours():
  return gpt2_fixtures.shared_model()


def test_left_padding_does_not_change_real_positions(ours):
  ids, mask = gpt2_fixtures.batch()
  padded = ours(ids, attention_mask=mask).numpy()
  alone = ours(ids[2:, 6:]).numpy()
  np.testing.assert_allclose(padded[2, 6:], alone[0], atol=1e-5, rtol=0)


def test_score_positions_gives_the_logits_at_those_positions(ours):
  ids, mask = gpt2_fixtures.batch()
  every = ours(ids, attention_mask=mask).numpy()
  positions = np.array([[0, 8], [3, 5], [8, 8]], np.int32)
  some = ours(ids, attention_mask=mask, score_positions=positions).numpy()
  np.testing.assert_allclose(
      some, np.take_along_axis(every, positions[:, :, None], axis=1),
      atol=1e-5, rtol=0)


def test_variables_are_checkpointable_under_hf_paths(tmp_path):
  model = gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(n_layer=1),
                                           seed=1)
  path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
  names = [name for name, _ in tf.train.list_variables(path)]
  assert "model/transformer/h/0/attn/c_attn/weight/.ATTRIBUTES/VARIABLE_VALUE" in names
  assert len(model.trainable_variables) == len(
      gpt2_weights.weight_shapes(model.config))


# -- placement over devices ---------------------------------------------------


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


@pytest.fixture(scope="module")
def reference_grads(ours):
  """Logits and gradients of the single-device float32 model, with dropout."""
  return _loss_and_grads(ours, *gpt2_fixtures.batch())


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.slow
def test_split_model_matches_single_device(ours, reference_grads,
                                           num_devices):
  split = gpt2_fixtures.our_model(devices=LOGICAL_CPUS[:num_devices])
  ids, mask = gpt2_fixtures.batch()
  logits, grads = reference_grads
  split_logits, split_grads = _loss_and_grads(split, ids, mask)
  np.testing.assert_allclose(split_logits, logits, atol=1e-5, rtol=0)
  greedy = decoding.DecodeSettings(max_new_tokens=8)
  np.testing.assert_array_equal(  # decoding on the split model, without XLA
      decoding.generate(split, ids, greedy, attention_mask=mask,
                        pad_token_id=0),
      decoding.generate(ours, ids, greedy, attention_mask=mask,
                        pad_token_id=0))
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
  split = gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(n_layer=2),
                                           devices=LOGICAL_CPUS[2:4])
  ids, mask = gpt2_fixtures.batch()

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
    model = gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(n_layer=2),
                                             seed=2)
  assert isinstance(model.transformer.wte.weight,
                    tf.distribute.DistributedValues)
  ids, mask = gpt2_fixtures.batch()

  @tf.function
  def replica_step(ids, mask):
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(model(ids, attention_mask=mask, training=True,
                                  dropout_seed=tf.constant([1, 1])))
    return tape.gradient(loss, model.transformer.wte.weight)

  grads = strategy.run(replica_step, args=(ids, mask))
  local = strategy.experimental_local_results(grads)
  np.testing.assert_allclose(local[0], local[1], atol=1e-6)


def test_bad_devices_are_refused():
  with pytest.raises(utils.UserError,
                     match="5 stages for a model of n_layer=4 layers"):
    gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(),
                                     devices=LOGICAL_CPUS + ["/cpu:0"])
  with pytest.raises(utils.UserError, match="device '/device:GPU:7' not found"):
    gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(),
                                     devices=["/device:GPU:7"])


# -- bf16, recomputation, dropout ---------------------------------------------

BF16_LOGIT_TOLERANCE = 0.1  # documented in the README (section "model")


def test_bf16_logits_are_close_to_float32(ours):
  bf16 = gpt2_fixtures.our_model(dtype="bfloat16")
  assert bf16.transformer.wte.weight.dtype == tf.float32
  ids, mask = gpt2_fixtures.batch()
  logits = bf16(ids, attention_mask=mask)
  assert logits.dtype == tf.float32
  reference = ours(ids, attention_mask=mask).numpy()
  real = mask.numpy() == 1
  error = np.abs(logits.numpy() - reference)[real].max()
  assert error < BF16_LOGIT_TOLERANCE
  assert error > 0  # the computation really ran in bf16


@pytest.mark.parametrize("devices", [None, LOGICAL_CPUS[:2]])
@pytest.mark.slow
def test_recomputation_gives_the_same_gradients(reference_grads, devices):
  recomputed = gpt2_fixtures.our_model(devices=devices, recompute=True)
  ids, mask = gpt2_fixtures.batch()
  _, grads = reference_grads
  _, recomputed_grads = _loss_and_grads(recomputed, ids, mask)
  for grad, other in zip(grads, recomputed_grads):
    np.testing.assert_allclose(other, grad, atol=1e-6, rtol=0)


def test_dropout_is_stateless_in_its_seed(ours):
  ids, mask = gpt2_fixtures.batch()

  def run(seed):
    return ours(ids, attention_mask=mask, training=True,
                dropout_seed=tf.constant(seed)).numpy()

  np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
  assert np.abs(run([1, 2]) - run([1, 3])).max() > 1e-3
  assert np.abs(run([1, 2]) - ours(ids, attention_mask=mask).numpy()).max() > 1e-3


# -- the KV-cache step and bad inputs -----------------------------------------


def test_cached_decoding_matches_full_recomputation(ours):
  ids, mask = gpt2_fixtures.batch()
  full = ours(ids, attention_mask=mask).numpy()
  total = ids.shape[1] + 2
  cache = ours.empty_cache(3, total)
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


def test_input_longer_than_n_positions_is_refused(ours):
  with pytest.raises(utils.UserError, match="longer than the model's n_positions=32"):
    ours(tf.zeros([1, 33], tf.int32))


def test_unsupported_configs_are_refused():
  with pytest.raises(utils.UserError, match="n_embd=30 is not a multiple of n_head=4"):
    gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(n_embd=30))
  with pytest.raises(utils.UserError, match="add_cross_attention=true"):
    gpt2.GPT2LMHeadModel.from_config(
        gpt2_fixtures.config(add_cross_attention=True))
