"""Bad Hugging Face checkpoints get a clear answer: tensors of a dtype no float parameter takes are
refused, NaN/Inf weights are loaded with a warning, and config.json sizes no model has are refused
before any config or array is built."""

import json
import logging
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from imagent_jax.models import hf_io, registry
from imagent_jax.models.presets import get_preset

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny checkpoint written by ``save_pretrained`` (float32) and its tensors."""
  config = get_preset("tiny")
  folder = str(tmp_path_factory.mktemp("hf") / "base")
  hf_io.save_pretrained(folder, config, registry.family_of(config).init_params(config, jax.random.key(0)))
  return folder, safetensors.numpy.load_file(os.path.join(folder, hf_io.WEIGHTS_NAME))


def _copy(base, tmp_path, tensors=None, config_edit=None):
  folder, original = base
  out = str(tmp_path / "ckpt")
  shutil.copytree(folder, out)
  if tensors is not None:
    safetensors.numpy.save_file({**original, **tensors(original)}, os.path.join(out, hf_io.WEIGHTS_NAME),
                                metadata={"format": "pt"})
  if config_edit is not None:
    filename = os.path.join(out, hf_io.CONFIG_NAME)
    with open(filename) as f:
      config = json.load(f)
    config_edit(config)
    with open(filename, "w") as f:
      json.dump(config, f)
  return out


def _with_nonfinite(t):
  x = t[EMBED].copy()
  x[0, :3] = np.nan
  x[1, 0] = np.inf
  x[2, 0] = -np.inf
  return {EMBED: x}


# (case, new tensors from the originals, the error's pattern or None)
TENSOR_CASES = [
    ("int32", lambda t: {EMBED: t[EMBED].astype(np.int32)}, r"wrong dtype: model\.embed_tokens\.weight "
                                                             r"\(model\.safetensors\): int32"),
    ("int64 norm", lambda t: {"model.norm.weight": t["model.norm.weight"].astype(np.int64)},
     r"wrong dtype: model\.norm\.weight \(model\.safetensors\): int64"),
    ("bool", lambda t: {EMBED: t[EMBED] > 0}, r"wrong dtype: model\.embed_tokens\.weight \(model\.safetensors\): bool"),
    ("float8 (quantised)", lambda t: {EMBED: t[EMBED].astype(ml_dtypes.float8_e4m3fn)},
     r"wrong dtype: model\.embed_tokens\.weight \(model\.safetensors\): float8_e4m3fn"),
    ("float16", lambda t: {EMBED: t[EMBED].astype(np.float16)}, None),
    ("bfloat16", lambda t: {EMBED: t[EMBED].astype(ml_dtypes.bfloat16)}, None),
    ("float64", lambda t: {EMBED: t[EMBED].astype(np.float64)}, None),
]


@pytest.mark.parametrize("case,tensors,error", TENSOR_CASES, ids=[c[0] for c in TENSOR_CASES])
def test_tensor_dtypes(base, tmp_path, caplog, case, tensors, error):
  folder = _copy(base, tmp_path, tensors)
  if error is None:
    with caplog.at_level(logging.WARNING, logger="imagent_jax.models.hf_io"):
      _, params = hf_io.load_pretrained(folder)
    assert np.asarray(params["embed_tokens"]["embedding"]).dtype == np.float32, case
    assert not caplog.records
    return
  with pytest.raises(ValueError, match=error) as info:
    hf_io.load_pretrained(folder)
  assert "1 with a wrong dtype" in str(info.value) and folder in str(info.value)


def test_a_bad_dtype_is_named_with_every_other_mismatch(base, tmp_path):
  folder = _copy(base, tmp_path, lambda t: {EMBED: t[EMBED] > 0, "lm_head.weight": t["lm_head.weight"][:-1]})
  with pytest.raises(ValueError, match="1 mis-shaped, 1 with a wrong dtype") as info:
    hf_io.load_pretrained(folder)
  assert "wrong shape: lm_head.weight" in str(info.value)


def test_nan_and_inf_weights_load_with_a_warning(base, tmp_path, caplog):
  folder = _copy(base, tmp_path, _with_nonfinite)
  with caplog.at_level(logging.WARNING, logger="imagent_jax.models.hf_io"):
    _, params = hf_io.load_pretrained(folder)
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 1, warnings
  size = base[1][EMBED].size
  assert f"tensor {EMBED} has 5 non-finite (NaN or Inf) value(s) of {size}" in warnings[0]
  assert os.path.join(folder, hf_io.WEIGHTS_NAME) in warnings[0]
  assert np.isnan(np.asarray(params["embed_tokens"]["embedding"])).sum() == 3  # loaded as they are


def test_a_cast_that_overflows_is_reported(base, tmp_path, caplog):
  def big(t):
    x = t[EMBED].astype(np.float64)
    x[0, :2] = 1e300  # finite in the file, Inf as float32
    return {EMBED: x}

  folder = _copy(base, tmp_path, big)
  with caplog.at_level(logging.WARNING, logger="imagent_jax.models.hf_io"):
    hf_io.load_pretrained(folder)
  assert "has 2 non-finite (NaN or Inf) value(s)" in caplog.text and "cast from float64 to float32" in caplog.text


def _set(key, value, section=None):
  """Sets ``key`` in config.json (in ``section`` only, or at the top level and in text_config)."""
  def edit(config):
    for part in ([section] if section else [None, "text_config"]):
      target = config[part] if part else config
      target[key] = value
  return edit


# (case, config.json edit, the error's pattern); the pattern always names config.json and the field.
CONFIG_CASES = [
    ("vocab 1e12", _set("vocab_size", 10**12), r"config\.json: vocab_size = 1000000000000 is outside \[1, 16777216\]"),
    ("vocab float", _set("vocab_size", 1e12),
     r"config\.json: vocab_size must be a positive integer, got 1000000000000\.0"),
    ("vocab only in text_config", _set("vocab_size", 2**30, "text_config"),
     r"config\.json: text_config\.vocab_size = 1073741824 is outside"),
    ("hidden as a string", _set("hidden_size", "64"),
     r"config\.json: hidden_size must be a positive integer, got '64'"),
    ("hidden 2**20", _set("hidden_size", 2**20), r"config\.json: hidden_size = 1048576 is outside \[1, 65536\]"),
    ("layers as bool", _set("num_hidden_layers", True), r"config\.json: num_hidden_layers must be a positive integer"),
    ("a million layers", _set("num_hidden_layers", 10**6), r"config\.json: num_hidden_layers = 1000000 is outside"),
    ("zero heads", _set("num_attention_heads", 0), r"config\.json: num_attention_heads = 0 is outside"),
    ("negative vision depth", _set("depth", -1, "vision_config"),
     r"config\.json: vision_config\.depth = -1 is outside"),
    ("heads do not divide hidden", _set("num_attention_heads", 3),
     r"config\.json: hidden_size = 64 is not divisible by num_attention_heads = 3"),
    ("kv heads do not divide heads", _set("num_key_value_heads", 3),
     r"config\.json: num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
    ("vision heads do not divide hidden", _set("num_heads", 5, "vision_config"),
     r"config\.json: vision_config\.hidden_size = \d+ is not divisible by vision_config\.num_heads = 5"),
]


@pytest.mark.parametrize("case,edit,error", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_sizes_are_checked_first(base, tmp_path, case, edit, error):
  folder = _copy(base, tmp_path, config_edit=edit)
  for load in (hf_io.load_config, hf_io.load_pretrained):
    with pytest.raises(ValueError, match=error):
      load(folder)


@pytest.mark.parametrize("preset", ["tiny", "qwen2_5_vl_7b", "qwen2_5_vl_72b"])
def test_real_configs_pass_the_size_check(preset):
  config = get_preset(preset)
  hf_io.check_config_sizes(registry.family_of(config).config_to_hf(config))
