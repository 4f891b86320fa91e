"""GPT-2's Hugging Face weights: parity with transformers both ways, names, initial values, bad checkpoints."""

import os

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
import transformers

import gpt2_fixtures
import gpt2_weights
import modeling_tf_gpt2_model_par as gpt2
import utils


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  return gpt2_fixtures.save_hf_checkpoints(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def ours(hf_dirs):
  return gpt2.GPT2LMHeadModel.from_pretrained(hf_dirs["safetensors"])


@pytest.mark.parametrize("fmt", ["safetensors", "h5"])
def test_hf_checkpoint_loads_with_equal_logits(hf_dirs, fmt):
  expected_file = {"safetensors": gpt2_weights.SAFETENSORS_NAME,
                   "h5": gpt2_weights.H5_NAME}[fmt]
  assert expected_file in os.listdir(hf_dirs[fmt])
  model = gpt2.GPT2LMHeadModel.from_pretrained(hf_dirs[fmt])
  ids, mask = gpt2_fixtures.batch()
  hf = gpt2_fixtures.hf_model()
  np.testing.assert_allclose(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
  hf_masked = hf(ids, attention_mask=mask,
                 position_ids=gpt2_fixtures.hf_positions(mask)).logits
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
  ids, _ = gpt2_fixtures.batch()
  np.testing.assert_array_equal(loaded(ids), ours(ids))


def test_saved_model_loads_in_transformers_without_warnings(tmp_path):
  model = gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(n_layer=2),
                                           seed=3)
  model.save_pretrained(str(tmp_path))
  hf, info = transformers.TFGPT2LMHeadModel.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert info == {"missing_keys": [], "unexpected_keys": [],
                  "mismatched_keys": []}
  ids, mask = gpt2_fixtures.batch()
  np.testing.assert_allclose(
      model(ids, attention_mask=mask),
      hf(ids, attention_mask=mask,
         position_ids=gpt2_fixtures.hf_positions(mask)).logits,
      atol=1e-4, rtol=0)
  reloaded = gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(model(ids), reloaded(ids))


def test_pytorch_names_and_bare_model_names_map_to_weights():
  assert gpt2_weights.hf_weight_name("h.3.mlp.c_fc.weight") == (
      "transformer.h.3.mlp.c_fc.weight")
  assert gpt2_weights.hf_weight_name("transformer.h.0.attn.bias") is None
  assert gpt2_weights.hf_weight_name("lm_head.weight") is None
  name = "transformer.h.11.ln_2.weight"
  assert gpt2_weights.tf_weight_name(name) == "transformer/h_._11/ln_2/gamma:0"
  assert gpt2_weights.hf_weight_name(gpt2_weights.tf_weight_name(name)) == name


def test_from_config_is_deterministic_and_scaled_like_transformers():
  config = gpt2_fixtures.config(n_layer=2)
  first = gpt2.GPT2LMHeadModel.from_config(config, seed=5).named_weights()
  again = gpt2.GPT2LMHeadModel.from_config(config, seed=5).named_weights()
  for name, variable in first.items():
    np.testing.assert_array_equal(variable, again[name])
  proj = first["transformer.h.0.attn.c_proj.weight"].numpy().std()
  fc = first["transformer.h.0.mlp.c_fc.weight"].numpy().std()
  assert proj == pytest.approx(fc / 2.0, rel=0.1)  # 1 / sqrt(2 * n_layer)
  assert not first["transformer.h.0.attn.c_attn.bias"].numpy().any()


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
  assert not gpt2_weights.holds_config_only(str(tmp_path))
  utils.atomic_write_text(str(tmp_path / "config.json"),
                          gpt2_fixtures.config().to_json_string())
  assert gpt2_weights.holds_config_only(str(tmp_path))
  with pytest.raises(utils.UserError, match="no model.safetensors or tf_model.h5"):
    gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path))
  # A PyTorch checkpoint is not a config-only directory: it is refused, not
  # replaced by a fresh model.
  (tmp_path / gpt2_weights.PYTORCH_NAME).write_bytes(b"")
  assert not gpt2_weights.holds_config_only(str(tmp_path))


def test_unsupported_config_is_refused_naming_its_file(tmp_path):
  model = gpt2.GPT2LMHeadModel.from_config(gpt2_fixtures.config(n_layer=1))
  model.save_pretrained(str(tmp_path))
  config = utils.read_json(str(tmp_path / "config.json"), "config")
  utils.atomic_write_json(str(tmp_path / "config.json"),
                          dict(config, activation_function="swish"))
  with pytest.raises(utils.UserError, match=(
      r"config\.json: activation_function='swish' is not supported")):
    gpt2.GPT2LMHeadModel.from_pretrained(str(tmp_path))
