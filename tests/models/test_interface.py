"""The family interface's shared pieces: patch geometry, the family registry, parameter trees."""

import jax
import numpy as np
import pytest

from imagent_jax.models import get_preset, registry, tree
from imagent_jax.models.interface import PatchGeometry
from imagent_jax.processing import images as images_lib


def test_patch_geometry_by_hand():
  g = PatchGeometry(patch_size=14, merge_size=2)
  assert (g.factor, g.patch_dim, g.merge_unit, g.pixels_per_patch, g.pixels_per_token) == (28, 1176, 4, 196, 784)
  assert g.patches(28 * 28 * 64) == 256 and g.tokens(28 * 28 * 64) == 64
  g16 = PatchGeometry(patch_size=16, merge_size=2)
  assert (g16.factor, g16.patch_dim, g16.patches(1024), g16.tokens(1024)) == (32, 1536, 4, 1)
  assert g.image_settings() == dict(patch_size=14, merge_size=2, temporal_patch_size=2)


def test_family_lookups():
  tiny = get_preset("tiny")
  family = registry.family_of(tiny)
  assert family.name == "qwen2_5_vl" and registry.get_family("qwen2_5_vl") is family
  assert family.geometry(tiny) == tiny.vision.geometry
  assert registry.family_for_hf({"model_type": "qwen2_5_vl"}) is family
  with pytest.raises(ValueError, match="no registered model family reads model_type='llava'"):
    registry.family_for_hf({"model_type": "llava"})
  with pytest.raises(TypeError, match="no registered model family has config type dict"):
    registry.family_of({})
  with pytest.raises(ValueError, match="unknown model preset 'nope'"):
    registry.get_preset("nope")
  assert {"tiny", "micro", "qwen2_5_vl_7b"} <= set(registry.presets())
  # The placeholder and its brackets can never be sampled.
  assert set(family.banned_token_ids(tiny)) == {tiny.image_token_id, tiny.video_token_id, tiny.vision_token_id,
                                                tiny.vision_start_token_id, tiny.vision_end_token_id}


def test_abstract_params_and_count_agree_with_init():
  tiny = get_preset("micro")
  family = registry.family_of(tiny)
  params = family.init_params(tiny, jax.random.key(0))
  abstract = family.abstract_params(tiny)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
  assert tree.count_params(params) == tree.count_params(abstract) > 0
  flat = tree.flatten(params)
  assert "layers_0/self_attn/q_proj/kernel" in flat and tree.unflatten(flat).keys() == params.keys()
  parts = family.param_parts(params)
  assert sum(tree.count_params(v) for v in parts.values()) == tree.count_params(params)


def test_rescale_init_fan_in_by_hand():
  params = {"dense": {"kernel": np.full((4, 3), 0.02, np.float32), "bias": np.ones(3, np.float32)}}
  out = tree.rescale_init(params, "fan_in")
  np.testing.assert_allclose(out["dense"]["kernel"], np.full((4, 3), 0.5), rtol=1e-6)  # 0.02 / (0.02 * sqrt(4))
  np.testing.assert_array_equal(out["dense"]["bias"], params["dense"]["bias"])
  assert tree.rescale_init(params, "hf") is params
  with pytest.raises(ValueError, match="init must be one of"):
    tree.rescale_init(params, "xavier")


def test_pack_patches_pads_and_checks_budgets():
  a, b = np.ones((8, 6), np.float32), 2 * np.ones((4, 6), np.float32)
  pv, grid = images_lib.pack_patches([a, b], [[1, 2, 4], [1, 2, 2]], patch_budget=16, image_slots=3, patch_dim=6)
  assert pv.shape == (16, 6) and grid.dtype == np.int32
  np.testing.assert_array_equal(pv[:8], a)
  np.testing.assert_array_equal(pv[8:12], b)
  assert not pv[12:].any()
  np.testing.assert_array_equal(grid, [[1, 2, 4], [1, 2, 2], [0, 0, 0]])
  pv, grid = images_lib.pack_patches([], [], patch_budget=4, image_slots=1, patch_dim=6)
  assert pv.shape == (4, 6) and not grid.any()
  with pytest.raises(ValueError, match="the crops need 12 patches in 2 images; the budgets are patch_budget=8"):
    images_lib.pack_patches([a, b], [[1, 2, 4], [1, 2, 2]], patch_budget=8, image_slots=3, patch_dim=6,
                            what="the crops")
