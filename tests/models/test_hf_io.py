"""Hugging Face checkpoint interop: load transformers-written folders, write folders transformers loads."""

import json
import os
import pickle
import shutil

import hf_fixtures
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from imagent_jax import parallel
from imagent_jax.models import hf_io
from imagent_jax.models import safetensors as st_io
from imagent_jax.models import tree as tree_lib
from imagent_jax.models import qwen2_5_vl
from imagent_jax.models.qwen2_5_vl.config import ModelConfig
from imagent_jax.models.presets import get_preset


def _flat(tree):
  return tree_lib.flatten(tree)


def _read_all(path):
  """All tensors of one safetensors file as numpy (bf16 via ml_dtypes), with its metadata."""
  reader = st_io.SafetensorsReader(path)
  return {k: np.array(reader.read(k)) for k in reader.entries}, reader.metadata


def _write(path, tensors):
  safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _copy_config(src, dst):
  os.makedirs(dst, exist_ok=True)
  shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def _assert_params_equal(params, reference, dtype=np.float32):
  flat = _flat(params)
  assert sorted(flat) == sorted(reference)
  for path, want in reference.items():
    got = np.asarray(flat[path])
    assert got.dtype == dtype, path
    assert got.shape == want.shape, path
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(dtype).astype(np.float32), err_msg=path)


@pytest.fixture(scope="module")
def hf_model():
  return hf_fixtures.make_tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def reference(hf_model):
  return hf_fixtures.torch_to_param_arrays(hf_model)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return hf_fixtures.save_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf"), seed=0)


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return hf_io.load_pretrained(hf_dir)


# ----------------------------------------------------------------------------- config


def test_tiny_hf_config_round_trips_to_preset():
  for overrides in ({}, {"tie_word_embeddings": True}):
    want = get_preset("tiny", **overrides)
    hf = hf_fixtures.tiny_hf_config(**overrides)
    assert ModelConfig.from_hf_dict(hf.to_dict()) == want
    assert hf.vision_config.fullatt_block_indexes == [1, 3]
    assert hf.text_config.num_key_value_heads == 2
    assert list(hf.text_config.rope_parameters["mrope_section"]) == [2, 3, 3]
    assert hf.tie_word_embeddings == overrides.get("tie_word_embeddings", False)


def test_config_json_written_by_transformers_round_trips(hf_dir, loaded):
  config, _ = loaded
  assert config == get_preset("tiny")
  assert hf_io.load_config(hf_dir) == get_preset("tiny")


# ----------------------------------------------------------------------------- loading


def test_transformers_checkpoint_is_published_layout(hf_dir):
  """transformers 5.x writes the published names (its conversion mapping runs backwards on save)."""
  names = set(_read_all(os.path.join(hf_dir, "model.safetensors"))[0])
  assert "visual.blocks.0.attn.qkv.weight" in names
  assert "model.layers.0.self_attn.q_proj.weight" in names
  assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
  assert not any(n.startswith(("model.visual.", "model.language_model.")) for n in names)


def test_load_matches_every_torch_tensor(loaded, reference):
  config, params = loaded
  _assert_params_equal(params, reference)
  shapes = jax.tree_util.tree_map(lambda s: s.shape, qwen2_5_vl.abstract_params(config))
  assert jax.tree_util.tree_map(lambda x: x.shape, params) == shapes
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))


def test_loaded_params_reproduce_torch_logits(loaded, hf_model):
  """End to end: text plus one image (grid 1x4x6, window and full attention blocks) through our model."""
  config, params = loaded
  rng = np.random.default_rng(0)
  grid = np.array([[1, 4, 6]])
  pixels = rng.normal(size=(24, config.vision.patch_dim)).astype(np.float32)
  ids = np.array([[1, 2, config.vision_start_token_id] + [config.image_token_id] * 6
                  + [config.vision_end_token_id, 5, 6, 7]])
  mask = np.ones_like(ids)
  want = hf_fixtures.torch_logits(hf_model, ids, mask, pixels, grid)
  apply = jax.jit(lambda p, **kw: qwen2_5_vl.Qwen25VL(config).apply({"params": p}, **kw))
  got = apply(params, input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_module_layout_loads(tmp_path, hf_model, reference):
  """The transformers >= 4.52 names (model.visual.*, model.language_model.*) load the same."""
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  assert any(k.startswith("model.language_model.") for k in sd) and any(k.startswith("model.visual.") for k in sd)
  folder = str(tmp_path / "layout_b")
  _copy_config(hf_fixtures.save_tiny_hf_checkpoint(tmp_path, seed=0), folder)
  _write(os.path.join(folder, "model.safetensors"), sd)
  _, params = hf_io.load_pretrained(folder)
  _assert_params_equal(params, reference)


def test_sharded_checkpoint_loads(tmp_path, reference):
  folder = hf_fixtures.save_tiny_hf_checkpoint(tmp_path, seed=0, max_shard_size="200KB")
  shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  assert len(shards) > 1 and os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
  _, params = hf_io.load_pretrained(folder)
  _assert_params_equal(params, reference)


def test_bf16_load(hf_dir, reference):
  _, params = hf_io.load_pretrained(hf_dir, dtype=jnp.bfloat16)
  _assert_params_equal(params, reference, dtype=ml_dtypes.bfloat16)


def test_bf16_checkpoint_loads(tmp_path, reference):
  """A checkpoint stored in bfloat16 (as the Qwen releases are) reads without torch or a framework."""
  folder = str(tmp_path / "bf16")
  hf_fixtures.make_tiny_hf_model(seed=0).to(torch.bfloat16).save_pretrained(folder)
  tensors, _ = _read_all(os.path.join(folder, "model.safetensors"))
  assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
  _, params = hf_io.load_pretrained(folder)  # cast up to float32
  rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in reference.items()}
  _assert_params_equal(params, rounded)
  _, params = hf_io.load_pretrained(folder, dtype=None)  # keep the stored dtype
  _assert_params_equal(params, reference, dtype=ml_dtypes.bfloat16)


def test_tied_embeddings_load(tmp_path):
  model = hf_fixtures.make_tiny_hf_model(seed=1, tie=True)
  reference = hf_fixtures.torch_to_param_arrays(model)
  folder = hf_fixtures.save_tiny_hf_checkpoint(tmp_path, seed=1, tie=True)
  config, params = hf_io.load_pretrained(folder)
  assert config.tie_word_embeddings and "lm_head" not in params
  _assert_params_equal(params, reference)
  # Some exporters still write the tied head; it is accepted and ignored.
  filename = os.path.join(folder, "model.safetensors")
  tensors, _ = _read_all(filename)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  _write(filename, tensors)
  _, params = hf_io.load_pretrained(folder)
  assert "lm_head" not in params
  _assert_params_equal(params, reference)


def test_harmless_buffers_are_ignored(tmp_path, hf_dir, reference):
  folder = str(tmp_path / "with_inv_freq")
  _copy_config(hf_dir, folder)
  tensors, _ = _read_all(os.path.join(hf_dir, "model.safetensors"))
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  _write(os.path.join(folder, "model.safetensors"), tensors)
  _, params = hf_io.load_pretrained(folder)
  _assert_params_equal(params, reference)


def test_sharded_load_on_mesh(hf_dir, loaded):
  config, plain = loaded
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, params = hf_io.load_pretrained(hf_dir, mesh=mesh)
  want = _flat(parallel.param_shardings(config, mesh))
  flat, flat_plain = _flat(params), _flat(plain)
  assert sorted(flat) == sorted(want)
  for path, x in flat.items():
    assert x.sharding == want[path], path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_plain[path]), err_msg=path)
  # The mesh really splits something (the test would be vacuous if everything were replicated).
  assert any(not x.sharding.is_fully_replicated for x in flat.values())


# ----------------------------------------------------------------------------- bad input


def test_missing_tensor_is_named(tmp_path, hf_dir):
  folder = str(tmp_path / "missing")
  _copy_config(hf_dir, folder)
  tensors, _ = _read_all(os.path.join(hf_dir, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _write(os.path.join(folder, "model.safetensors"), tensors)
  with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight \[128, 64\]"):
    hf_io.load_pretrained(folder)


def test_all_problems_in_one_error(tmp_path, hf_dir):
  folder = str(tmp_path / "broken")
  _copy_config(hf_dir, folder)
  tensors, _ = _read_all(os.path.join(hf_dir, "model.safetensors"))
  del tensors["visual.blocks.2.attn.qkv.bias"]
  del tensors["model.norm.weight"]
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  _write(os.path.join(folder, "model.safetensors"), tensors)
  with pytest.raises(ValueError) as err:
    hf_io.load_pretrained(folder)
  msg = str(err.value)
  assert "2 missing, 1 unexpected, 1 mis-shaped" in msg
  assert "missing: visual.blocks.2.attn.qkv.bias [96]" in msg
  assert "missing: model.norm.weight [64]" in msg
  assert "unexpected: model.layers.0.self_attn.o_proj.bias [64]" in msg
  assert "wrong shape: model.layers.1.self_attn.k_proj.weight: expected [32, 64], got [64, 64]" in msg


def test_same_tensor_in_both_layouts_is_refused(tmp_path, hf_dir):
  folder = str(tmp_path / "dup")
  _copy_config(hf_dir, folder)
  tensors, _ = _read_all(os.path.join(hf_dir, "model.safetensors"))
  tensors["model.language_model.norm.weight"] = tensors["model.norm.weight"]
  _write(os.path.join(folder, "model.safetensors"), tensors)
  with pytest.raises(ValueError, match=r"duplicated: .*norm\.weight"):
    hf_io.load_pretrained(folder)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, hf_dir, hf_model, monkeypatch, filename):
  folder = str(tmp_path / "pickle")
  _copy_config(hf_dir, folder)
  torch.save(hf_model.state_dict(), os.path.join(folder, filename))

  def forbidden(*args, **kwargs):
    raise AssertionError("something tried to unpickle")

  monkeypatch.setattr(pickle, "load", forbidden)
  monkeypatch.setattr(pickle, "loads", forbidden)
  monkeypatch.setattr(pickle, "Unpickler", forbidden)
  monkeypatch.setattr(torch, "load", forbidden)
  monkeypatch.setattr(np, "load", forbidden)
  with pytest.raises(ValueError) as err:
    hf_io.load_pretrained(folder)
  msg = str(err.value)
  assert filename in msg and "pickle" in msg and "refused" in msg and "safetensors" in msg


def test_missing_config_and_folder(tmp_path, hf_dir):
  folder = str(tmp_path / "no_config")
  os.makedirs(folder)
  shutil.copy(os.path.join(hf_dir, "model.safetensors"), folder)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.load_pretrained(folder)
  with pytest.raises(FileNotFoundError, match="not a local folder"):
    hf_io.load_pretrained(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
    hf_io.load_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")
  empty = str(tmp_path / "no_weights")
  _copy_config(hf_dir, empty)
  with pytest.raises(FileNotFoundError, match="has no weights"):
    hf_io.load_pretrained(empty)


def test_corrupt_files_are_reported(tmp_path, hf_dir):
  folder = str(tmp_path / "truncated")
  _copy_config(hf_dir, folder)
  with open(os.path.join(hf_dir, "model.safetensors"), "rb") as f:
    data = f.read()
  with open(os.path.join(folder, "model.safetensors"), "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    hf_io.load_pretrained(folder)
  with open(os.path.join(folder, "model.safetensors"), "wb") as f:
    f.write(b"\xff" * 64)
  with pytest.raises(ValueError, match="not a safetensors file"):
    hf_io.load_pretrained(folder)
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    hf_io.load_pretrained(folder)


def test_index_naming_absent_shard(tmp_path):
  folder = hf_fixtures.save_tiny_hf_checkpoint(tmp_path, seed=0, max_shard_size="200KB")
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    second = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(folder, second))
  with pytest.raises(FileNotFoundError, match=second):
    hf_io.load_pretrained(folder)


# ----------------------------------------------------------------------------- saving


def _load_in_transformers(folder):
  model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"], info
  assert not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  assert not info.get("error_msgs"), info
  return model.eval()


def _text_logits(model, seed=0):
  ids = np.random.default_rng(seed).integers(0, 500, (2, 11))
  return hf_fixtures.torch_logits(model, ids, np.ones_like(ids))


def test_round_trip_through_transformers(tmp_path, hf_dir, hf_model, loaded):
  config, params = loaded
  folder = str(tmp_path / "ours")
  hf_io.save_pretrained(folder, config, params)
  assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors"]
  tensors, metadata = _read_all(os.path.join(folder, "model.safetensors"))
  assert metadata == {"format": "pt"}
  assert set(tensors) == set(_read_all(os.path.join(hf_dir, "model.safetensors"))[0])  # transformers' names
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "float32"

  reloaded = _load_in_transformers(folder)
  original = hf_model.state_dict()
  for name, value in reloaded.state_dict().items():
    torch.testing.assert_close(value, original[name], rtol=0, atol=0, msg=name)
  np.testing.assert_array_equal(_text_logits(reloaded), _text_logits(hf_model))

  config2, params2 = hf_io.load_pretrained(folder)
  assert config2 == config
  _assert_params_equal(params2, {k: np.asarray(v) for k, v in _flat(params).items()})


def test_tied_round_trip(tmp_path):
  model = hf_fixtures.make_tiny_hf_model(seed=2, tie=True)
  config, params = hf_io.load_pretrained(hf_fixtures.save_tiny_hf_checkpoint(tmp_path, seed=2, tie=True))
  folder = str(tmp_path / "ours_tied")
  hf_io.save_pretrained(folder, config, params)
  assert "lm_head.weight" not in _read_all(os.path.join(folder, "model.safetensors"))[0]
  reloaded = _load_in_transformers(folder)
  assert reloaded.config.tie_word_embeddings
  np.testing.assert_array_equal(_text_logits(reloaded), _text_logits(model))


def test_sharded_save_writes_index(tmp_path, hf_model, loaded):
  config, params = loaded
  folder = str(tmp_path / "ours_sharded")
  os.makedirs(folder)
  with open(os.path.join(folder, "model-00009-of-00009.safetensors"), "wb") as f:
    f.write(b"stale")  # an earlier save's shard must not survive
  hf_io.save_pretrained(folder, config, params, max_shard_size="150KB")
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    index = json.load(f)
  files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
  assert "model-00009-of-00009.safetensors" not in files
  total = 0
  for name in files:
    tensors, metadata = _read_all(os.path.join(folder, name))
    assert metadata == {"format": "pt"}
    assert all(index["weight_map"][k] == name for k in tensors)
    size = sum(t.nbytes for t in tensors.values())
    assert size <= 150_000 or len(tensors) == 1
    total += size
  assert index["metadata"]["total_size"] == total
  reloaded = _load_in_transformers(folder)
  np.testing.assert_array_equal(_text_logits(reloaded), _text_logits(hf_model))
  _, params2 = hf_io.load_pretrained(folder)
  _assert_params_equal(params2, {k: np.asarray(v) for k, v in _flat(params).items()})
  # Saving again unsharded into the same folder leaves no shard or index of the sharded save behind.
  hf_io.save_pretrained(folder, config, params)
  assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors"]
  _, params3 = hf_io.load_pretrained(folder)
  _assert_params_equal(params3, {k: np.asarray(v) for k, v in _flat(params).items()})


def test_bf16_save(tmp_path, loaded, reference):
  config, params = loaded
  folder = str(tmp_path / "ours_bf16")
  hf_io.save_pretrained(folder, config, params, dtype=jnp.bfloat16)
  tensors, _ = _read_all(os.path.join(folder, "model.safetensors"))
  assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  reloaded = _load_in_transformers(folder)
  assert reloaded.dtype == torch.bfloat16
  _, params2 = hf_io.load_pretrained(folder, dtype=None)
  _assert_params_equal(params2, reference, dtype=ml_dtypes.bfloat16)


def test_save_from_mesh(tmp_path, hf_dir, loaded):
  config, plain = loaded
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, params = hf_io.load_pretrained(hf_dir, mesh=mesh)
  folder = str(tmp_path / "ours_from_mesh")
  hf_io.save_pretrained(folder, config, params)
  _, params2 = hf_io.load_pretrained(folder)
  _assert_params_equal(params2, {k: np.asarray(v) for k, v in _flat(plain).items()})


def test_save_rejects_params_of_another_model(tmp_path, loaded):
  config, params = loaded
  bad = jax.tree_util.tree_map(lambda x: x, params)
  del bad["norm"]
  bad["extra"] = {"kernel": jnp.zeros((2, 2))}
  bad["layers_0"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError) as err:
    hf_io.save_pretrained(str(tmp_path / "bad"), config, bad)
  msg = str(err.value)
  assert "missing: norm/scale" in msg and "unexpected: extra/kernel" in msg
  assert "wrong shape: layers_0/mlp/up_proj/kernel: expected [64, 128], got [3, 3]" in msg
  assert not os.path.exists(str(tmp_path / "bad"))


def test_name_table_helpers():
  assert hf_io.hf_key_to_param_path("model.language_model.layers.3.self_attn.q_proj.weight") == \
      "layers_3/self_attn/q_proj/kernel"
  assert hf_io.hf_key_to_param_path("model.visual.merger.mlp.2.bias") == "visual/merger/mlp_2/bias"
  assert hf_io.hf_key_to_param_path("visual.patch_embed.proj.weight") == "visual/patch_embed/kernel"
  assert hf_io.hf_key_to_param_path("model.layers.0.self_attn.rotary_emb.inv_freq") is None
  assert hf_io.param_path_to_hf_key(("layers_1", "post_attention_layernorm", "scale")) == \
      "model.layers.1.post_attention_layernorm.weight"
  assert hf_io.param_path_to_hf_key("visual/blocks_0/norm2/scale") == "visual.blocks.0.norm2.weight"
  for path in _flat(qwen2_5_vl.abstract_params(get_preset("tiny"))):
    assert hf_io.hf_key_to_param_path(hf_io.param_path_to_hf_key(path)) == path
