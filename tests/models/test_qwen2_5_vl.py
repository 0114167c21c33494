"""Numerical parity of our Flax Qwen2.5-VL with transformers' PyTorch implementation.

A tiny random model (window attention + full-attention vision blocks, GQA, uneven mrope_section,
random non-zero biases and norm weights) is built and saved by transformers, loaded by our
``load_pretrained``, and both are run on the same inputs. Pixel values come from transformers' own
image processor, so these tests isolate the model from our processor.
"""

import functools

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from imagent_jax.models import hf_io
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.models.qwen2_5_vl.positions import mrope_positions

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _forward(config, dtype=jnp.float32, max_frame_patches=0, attention="dense"):
  """Jitted apply: compiling once per shape is much faster than op-by-op eager dispatch on CPU."""
  model = qvl.Qwen25VL(config, dtype=dtype, param_dtype=dtype, max_frame_patches=max_frame_patches,
                       attention=attention, attention_block=16)
  return jax.jit(lambda p, ids, m, pv, g: model.apply({"params": p}, input_ids=ids, attention_mask=m,
                                                       pixel_values=pv, image_grid_thw=g))
IMAGE_SIZES = [(60, 90), (200, 56), (150, 330), (84, 84)]  # (height, width): wide, tall, odd, square


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = hf_fixtures.save_tiny_hf_checkpoint(tmp_path_factory.mktemp("parity"), seed=3)
  torch_model = hf_fixtures.make_tiny_hf_model(seed=3)
  config, params = hf_io.load_pretrained(path)
  return config, params, torch_model


@pytest.fixture(scope="module")
def images():
  from transformers import Qwen2VLImageProcessor
  rng = np.random.RandomState(0)
  pil = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
  proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
  out = proc(images=pil, return_tensors="np")
  grid = out["image_grid_thw"].astype(np.int32)
  bounds = np.concatenate([[0], np.cumsum(grid.prod(-1))])
  return [(out["pixel_values"][bounds[i]:bounds[i + 1]], grid[i]) for i in range(len(pil))]


_row = hf_fixtures.token_row
_batch = hf_fixtures.padded_batch


def _torch_logits(model, config, ids, mask, pixel_values, grid):
  ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
  grid_t = None if grid is None else torch.tensor(grid)
  # transformers only builds 3-D positions itself when images are present; take them from its own
  # get_rope_index in every case so that left-padded text rows are positioned the same way too.
  pos, _ = model.model.get_rope_index(ids_t, (ids_t == config.image_token_id).int(), image_grid_thw=grid_t,
                                      attention_mask=mask_t)
  with torch.no_grad():
    out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, image_grid_thw=grid_t,
                pixel_values=None if pixel_values is None else torch.tensor(pixel_values))
  return out.logits.numpy(), pos.numpy()


def _compare(models, ids, mask, imgs, max_frame_patches=0, attention="dense"):
  config, params, torch_model = models
  pv = np.concatenate([p for p, _ in imgs]) if imgs else None
  grid = np.stack([g for _, g in imgs]) if imgs else None
  ref, _ = _torch_logits(torch_model, config, ids, mask, pv, grid)
  ours = _forward(config, max_frame_patches=max_frame_patches, attention=attention)(params, ids, mask, pv, grid)
  ours = np.asarray(ours)
  valid = mask.astype(bool)
  assert ours.shape == ref.shape
  err = np.abs(ours[valid] - ref[valid]).max()
  assert err < TOL, f"max |logit diff| {err:.2e} over {valid.sum()} tokens (logit scale {np.abs(ref).max():.2f})"
  return ours


def test_text_only(models):
  config = models[0]
  ids, mask = _batch(config, [_row(config, np.random.RandomState(1), [12])])
  _compare(models, ids, mask, [])


def test_text_only_left_padded_batch(models):
  config = models[0]
  rng = np.random.RandomState(2)
  ids, mask = _batch(config, [_row(config, rng, [5]), _row(config, rng, [11])])
  _compare(models, ids, mask, [])


def test_one_image(models, images):
  config = models[0]
  ids, mask = _batch(config, [_row(config, np.random.RandomState(3), [4, images[2][1], 6])])
  _compare(models, ids, mask, [images[2]])


def test_many_images_of_different_sizes_in_one_prompt(models, images):
  config = models[0]
  parts = [3, images[0][1], 2, images[1][1], images[2][1], 4, images[3][1], 5]
  ids, mask = _batch(config, [_row(config, np.random.RandomState(4), parts)])
  _compare(models, ids, mask, images)


def test_banded_vision_attention_matches_transformers(models, images):
  """One slot per image (max_frame_patches set), window blocks in bands: same logits."""
  config = models[0]
  imgs = images * 3
  largest = max(int(g[1] * g[2]) for _, g in imgs)
  total = sum(int(g.prod()) for _, g in imgs)
  window = (config.vision.window_units * config.vision.spatial_merge_size) ** 2
  assert 3 * largest < total and 3 * window < total  # both banded paths run
  parts = [2]
  for _, g in imgs:
    parts += [g, 1]
  ids, mask = _batch(config, [_row(config, np.random.RandomState(11), parts)])
  _compare(models, ids, mask, imgs, max_frame_patches=largest)


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_image_slots_equal_one_packed_slot_with_padding(models, images, attention):
  """The per-image slots give the packed tower's features, with the patch budget padded past
  the images, an unused (all-zero) grid row, and under jit; a tighter ``max_image_patches`` too."""
  config, params, _ = models
  pv = np.concatenate([p for p, _ in images] + [np.ones((40, images[0][0].shape[1]), np.float32)])
  grid = np.stack([g for _, g in images] + [np.zeros(3, np.int32)]).astype(np.int32)
  real = int(sum(g.prod() for _, g in images)) // 4
  largest = max(int(g.prod()) for _, g in images)
  packed = qvl.Qwen25VL(config)
  slotted = qvl.Qwen25VL(config, max_frame_patches=4 * largest, attention=attention, attention_block=16)
  enc = lambda m, *a: jax.jit(lambda p, x, g: m.apply({"params": p}, x, g, *a, method="encode_images"))(params, pv, grid)
  ref = np.asarray(enc(packed))[:real]
  for out in (enc(slotted), enc(slotted, largest)):
    assert out.shape == (pv.shape[0] // 4, config.hidden_size)
    np.testing.assert_allclose(np.asarray(out)[:real], ref, atol=TOL)
    assert np.isfinite(np.asarray(out)).all()


def test_frame_larger_than_the_band_is_refused(models, images):
  config, params, _ = models
  model = qvl.Qwen25VL(config, max_frame_patches=16)
  pv, g = images[2]
  with pytest.raises(ValueError, match="slot of 16 patches"):
    model.apply({"params": params}, pv, g[None], method=model.encode_images)
  feats = jax.jit(lambda p, x, gg: model.apply({"params": p}, x, gg, method=model.encode_images))(params, pv, g[None])
  assert np.isnan(np.asarray(feats)).all()


@pytest.mark.parametrize("block", [1, 5, 16])
def test_local_segment_attention_equals_dense_segment_mask(block):
  from imagent_jax.models.layers import local_segment_attention, masked_softmax_attention
  rng = np.random.RandomState(block)
  lengths, total = [], 0
  while total < 70:
    lengths.append(int(rng.randint(1, block + 1)))
    total += lengths[-1]
  seg = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
  q, k, v = (rng.standard_normal((total, 3, 8)).astype(np.float32) for _ in range(3))
  dense = masked_softmax_attention(q[None, :, :, None], k[None], v[None], (seg[:, None] == seg[None, :])[None],
                                   scale=0.3)[0, :, :, 0]
  banded = local_segment_attention(q, k, v, seg, block=block, scale=0.3)
  np.testing.assert_allclose(np.asarray(banded), np.asarray(dense), atol=1e-5)


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_left_padded_batch_with_different_images(models, images, attention):
  """Also with the decoder's blocked attention (blocks of 16 tokens, config.model.attention)."""
  config = models[0]
  rng = np.random.RandomState(5)
  rows = [_row(config, rng, [3, images[0][1], 7]), _row(config, rng, [2, images[2][1], images[1][1], 2])]
  ids, mask = _batch(config, rows)
  assert (mask == 0).any(axis=1).any()
  _compare(models, ids, mask, [images[0], images[2], images[1]], attention=attention)


def test_jit_matches_eager_and_grids_are_data(models, images):
  """One compiled program serves different image sizes with the same patch count."""
  config, params, _ = models
  model = qvl.Qwen25VL(config)
  fwd = _forward(config)
  rng = np.random.RandomState(6)
  ids, mask = _batch(config, [_row(config, rng, [3, images[0][1], 4])])
  eager = model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=images[0][0],
                      image_grid_thw=images[0][1][None])
  jitted = fwd(params, ids, mask, images[0][0], images[0][1][None])
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)
  # A transposed grid has the same number of patches: same compiled program, different layout.
  grid_t = images[0][1][[0, 2, 1]]
  before = fwd._cache_size()
  transposed = fwd(params, ids, mask, images[0][0], grid_t[None])
  assert fwd._cache_size() == before
  assert not np.allclose(np.asarray(transposed), np.asarray(jitted), atol=1e-3)


def test_bfloat16_params_and_compute(models, images):
  config, params, _ = models
  ids, mask = _batch(config, [_row(config, np.random.RandomState(7), [3, images[1][1], 4])])
  kw = dict(input_ids=ids, attention_mask=mask, pixel_values=images[1][0], image_grid_thw=images[1][1][None])
  f32 = np.asarray(_forward(config)(params, *kw.values()))
  p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  assert p16["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  b16 = _forward(config, jnp.bfloat16)(p16, *kw.values())
  assert b16.dtype == jnp.float32  # logits are returned in float32 for stable log-probs
  assert np.abs(np.asarray(b16) - f32).max() < 0.1 * np.abs(f32).max()
  assert (np.asarray(b16).argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_placeholder_feature_count_mismatch_is_a_clear_error(models, images, caplog):
  config, params, _ = models
  ids, mask = _batch(config, [_row(config, np.random.RandomState(8), [3, images[1][1], 4])])
  keep = np.ones(ids.shape[1], bool)
  keep[np.flatnonzero(ids[0] == config.image_token_id)[0]] = False  # one placeholder too few
  ids, mask = ids[:, keep], mask[:, keep]
  model = qvl.Qwen25VL(config)
  kw = dict(pixel_values=images[1][0], image_grid_thw=images[1][1][None])
  n_feat = int(images[1][1].prod()) // 4
  with pytest.raises(qvl.ImageTokenMismatchError,
                     match=f"do not match: the prompt has {n_feat - 1} image placeholder tokens but the images give "
                           f"{n_feat} merged features"):
    model.apply({"params": params}, input_ids=ids, attention_mask=mask, **kw)
  with pytest.raises(qvl.ImageTokenMismatchError):
    qvl.check_image_tokens(ids, images[1][1][None], config)
  qvl.check_image_tokens(ids[:, ~(ids[0] == config.image_token_id)], None, config)  # text only is fine
  # Image tokens but no images at all.
  with pytest.raises(qvl.ImageTokenMismatchError, match="gives? 0 merged|give 0 merged"):
    model.apply({"params": params}, input_ids=ids, attention_mask=mask)
  # Under jit nothing may raise (it would hang sharded programs); the error is logged and the
  # logits are NaN, so the loss and the trainer's non-finite check see it too.
  with caplog.at_level("ERROR", logger="imagent_jax"):
    out = _forward(config)(params, ids, mask, images[1][0], images[1][1][None])
    out = np.asarray(jax.block_until_ready(out))
    jax.effects_barrier()
  assert np.isnan(out).all()
  assert any("do not match" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_match_transformers_get_rope_index(models, images, side):
  config, _, torch_model = models
  rng = np.random.RandomState(9)
  cases = [
      ([[6]], []),
      ([[4, images[0][1], 3]], [images[0]]),
      ([[2, images[0][1], images[1][1], 1, images[2][1], 2]], images[:3]),
      ([[3, images[2][1], 5], [1, images[1][1], 2, images[3][1], 9]], [images[2], images[1], images[3]]),
      ([[3], [2, images[3][1], 1]], [images[3]]),
  ]
  for rows_parts, imgs in cases:
    ids, mask = _batch(config, [_row(config, rng, p) for p in rows_parts], side=side)
    grid = np.stack([g for _, g in imgs]) if imgs else None
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    ref, ref_delta = torch_model.model.get_rope_index(
        ids_t, (ids_t == config.image_token_id).int(), image_grid_thw=None if grid is None else torch.tensor(grid),
        attention_mask=mask_t)
    pos, delta = mrope_positions(ids, mask, grid, image_token_id=config.image_token_id)
    valid = np.broadcast_to(mask.astype(bool)[None], pos.shape)
    np.testing.assert_array_equal(np.asarray(pos)[valid], ref.numpy()[valid])
    # Our delta is relative to the padded length (cache index); transformers 5 counts real tokens
    # only. Both must place the next decoded token at max(position) + 1.
    np.testing.assert_array_equal(ids.shape[1] + np.asarray(delta),
                                  mask.sum(1) + ref_delta.numpy().reshape(-1))
    np.testing.assert_array_equal(ids.shape[1] + np.asarray(delta), np.asarray(pos).max(axis=(0, 2)) + 1)


def test_static_patch_budget_and_unused_image_slots(models, images):
  """Patches padded to a budget and all-zero grid rows (unused slots) do not change the logits."""
  config, params, _ = models
  ids, mask = _batch(config, [_row(config, np.random.RandomState(10), [3, images[0][1], 2, images[3][1], 4])])
  pv = np.concatenate([images[0][0], images[3][0]])
  grid = np.stack([images[0][1], images[3][1]])
  exact = np.asarray(_forward(config)(params, ids, mask, pv, grid))
  pv_pad = np.concatenate([pv, np.random.RandomState(0).randn(64, pv.shape[1]).astype(np.float32)])
  grid_pad = np.concatenate([grid, np.zeros((2, 3), grid.dtype)])
  padded = np.asarray(_forward(config)(params, ids, mask, pv_pad, grid_pad))
  np.testing.assert_allclose(padded, exact, atol=1e-5)


def test_fan_in_init_lets_image_features_differ_between_images():
  from imagent_jax.models import get_preset
  config = get_preset("tiny")
  hf = qvl.init_params(config, jax.random.key(0))
  fan = qvl.rescale_init(hf, "fan_in")
  assert qvl.rescale_init(hf, "hf") is hf
  with pytest.raises(ValueError, match="init"):
    qvl.rescale_init(hf, "xavier")
  # Kernels get std 1/sqrt(fan_in); embeddings, biases and norms are untouched.
  k = np.asarray(fan["visual"]["patch_embed"]["kernel"])
  assert abs(k.std() * np.sqrt(k.shape[0]) - 1.0) < 0.05
  np.testing.assert_array_equal(fan["embed_tokens"]["embedding"], hf["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(fan["visual"]["blocks_0"]["norm1"]["scale"], hf["visual"]["blocks_0"]["norm1"]["scale"])
  # Two different images: with the released models' std 0.02 the tiny tower's outputs barely
  # differ (the reason a from-scratch model ignored them); with fan_in ~18 times more (measured).
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2 * 64, 3 * 2 * 14 * 14)).astype(np.float32)
  grid = np.array([[1, 8, 8], [1, 8, 8]], np.int32)
  model = qvl.Qwen25VL(config)

  def spread(params):
    out = np.asarray(model.apply({"params": params}, pixels, grid, method=qvl.Qwen25VL.encode_images))
    return np.abs(out[:16].mean(0) - out[16:].mean(0)).mean() / np.abs(params["embed_tokens"]["embedding"]).mean()

  assert spread(fan) > 10 * spread(hf)
