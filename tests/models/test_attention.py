"""The decoder's attention implementations (``config.model.attention``) against the dense path,
and the remat policies (``config.rl.remat``) against no remat.

``"dense"`` (``masked_softmax_attention``) is the reference: every other implementation must give
the same outputs and gradients on every row that may attend to something, for the decoder's own
masks (causal and key padding, left or right) with grouped-query heads, and the same logits for
the whole model (text, images, M-RoPE positions, a left-padded batch, a prefill into a KV cache).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagent_jax.models import get_preset, layers, registry
from imagent_jax.models.qwen2_5_vl import model as qmodel

ATOL = 1e-5
IMPLS = ["blocked", "xla"]  # "cudnn" needs a GPU: its mask expression is tested with "xla" below


def _inputs(b=3, l=37, hkv=2, g=3, hd=8, pads=((0, 0), (9, 0), (0, 7)), seed=0):
  """q, k, v and the decoder's mask (``causal_mask``) for rows padded ``(left, right)`` by ``pads``."""
  rng = np.random.RandomState(seed)
  q = jnp.asarray(rng.randn(b, l, hkv, g, hd), jnp.float32)
  k = jnp.asarray(rng.randn(b, l, hkv, hd), jnp.float32)
  v = jnp.asarray(rng.randn(b, l, hkv, hd), jnp.float32)
  am = np.ones((b, l), np.int32)
  for row, (left, right) in enumerate(pads[:b]):
    am[row, :left] = 0
    am[row, l - right:] = 0
  return q, k, v, qmodel.causal_mask(jnp.asarray(am), l), am.astype(bool)


def _dense(q, k, v, mask):
  return layers.masked_softmax_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5)


# blocks that split L=37 unevenly, and one block (the block only matters to "blocked")
@pytest.mark.parametrize("impl,block", [("blocked", 8), ("blocked", 16), ("blocked", 64), ("xla", 0)])
def test_outputs_equal_dense_with_padding_and_gqa(impl, block):
  q, k, v, mask, real = _inputs()
  ours = layers.attention(q, k, v, mask, scale=8 ** -0.5, implementation=impl, block=block)
  ref = _dense(q, k, v, mask)
  assert ours.shape == ref.shape and ours.dtype == ref.dtype
  assert np.isfinite(np.asarray(ours)).all()  # padding queries attend to nothing: finite, unused
  np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], atol=ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_equal_dense(impl):
  q, k, v, mask, real = _inputs(seed=1)
  w = jnp.asarray(np.random.RandomState(2).randn(*q.shape), jnp.float32) * real[:, :, None, None, None]

  def loss(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask) * w), argnums=(0, 1, 2)))

  ours = loss(lambda q, k, v, m: layers.attention(q, k, v, m, scale=8 ** -0.5, implementation=impl, block=8))
  for name, a, b in zip("qkv", ours(q, k, v), loss(_dense)(q, k, v)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, err_msg=f"d{name}")


def test_blocked_handles_a_general_mask_and_keys_longer_than_queries():
  """A prefill into a KV cache: 12 queries at slots 5..16 of 30, random holes in the key mask."""
  rng = np.random.RandomState(3)
  q = jnp.asarray(rng.randn(2, 12, 1, 4, 8), jnp.float32)
  k, v = (jnp.asarray(rng.randn(2, 30, 1, 8), jnp.float32) for _ in range(2))
  key_mask = jnp.asarray(rng.rand(2, 30) > 0.3) | (jnp.arange(30) == 5)
  mask = qmodel.causal_mask(key_mask, 12, cache_index=5)
  ours = layers.blocked_attention(q, k, v, mask, scale=0.3, block_q=5, block_k=7)
  ref = layers.masked_softmax_attention(q, k, v, mask, scale=0.3)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=ATOL)


def test_cudnn_mask_expression_equals_dense_on_xla():
  """cuDNN is told the mask as causal + per-row lengths after rolling left padding away; the same
  expression through XLA's kernel must equal the dense path (right, left and no padding)."""
  q, k, v, mask, real = _inputs(pads=((0, 0), (11, 0), (0, 5)))
  ours = layers.causal_padded_attention(q, k, v, mask, scale=8 ** -0.5, implementation="xla")
  np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(_dense(q, k, v, mask))[real], atol=ATOL)
  assert np.isfinite(np.asarray(ours)).all()


def test_blocked_bfloat16_is_close_to_dense():
  q, k, v, mask, real = _inputs(seed=4)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  ours = layers.attention(q, k, v, mask, scale=8 ** -0.5, implementation="blocked", block=16)
  assert ours.dtype == jnp.bfloat16
  diff = np.abs(np.asarray(ours, np.float32) - np.asarray(_dense(q, k, v, mask), np.float32))[real]
  assert diff.max() < 0.05


def test_blocked_never_holds_the_whole_score_matrix():
  """Compiled memory of forward + backward: the dense path's temporaries grow with L**2, the
  blocked path's with L (8 MB of float32 scores at L=1024 vs. blocks of 128 x 128)."""
  b, l, hkv, g, hd = 1, 1024, 1, 2, 8
  spec = [jax.ShapeDtypeStruct((b, l, hkv, g, hd), jnp.float32)] + [jax.ShapeDtypeStruct((b, l, hkv, hd),
                                                                                         jnp.float32)] * 2
  mask = jax.ShapeDtypeStruct((b, l, l), jnp.bool_)

  def temp_bytes(fn):
    step = jax.jit(jax.grad(lambda q, k, v, m: jnp.sum(fn(q, k, v, m)), argnums=(0, 1, 2)))
    return step.lower(*spec, mask).compile().memory_analysis().temp_size_in_bytes

  scores = b * hkv * g * l * l * 4
  dense = temp_bytes(_dense)
  blocked = temp_bytes(lambda q, k, v, m: layers.blocked_attention(q, k, v, m, scale=0.3, block_q=128, block_k=128))
  assert dense >= scores
  assert blocked < scores / 4, (blocked, dense)


def test_cudnn_is_refused_off_gpu_with_a_clear_error():
  if jax.default_backend() == "gpu":
    pytest.skip("the error path is for other backends")
  with pytest.raises(ValueError, match="attention='cudnn'.*needs a CUDA GPU.*'blocked'"):
    layers.check_attention("cudnn")
  with pytest.raises(ValueError, match="not one of"):
    layers.check_attention("flash")
  layers.check_attention("cudnn", backend="gpu", dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    layers.check_attention("cudnn", backend="gpu", dtype=jnp.float32)
  config = get_preset("micro")
  with pytest.raises(ValueError, match="needs a CUDA GPU"):
    registry.family_of(config).module(config, attention="cudnn", dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="needs a CUDA GPU"):  # built directly: refused at setup
    qmodel.Qwen25VL(config, attention="cudnn").init(jax.random.key(0), **qmodel._dummy_inputs(config))


def test_config_validation_names_the_attention_and_remat_settings():
  from imagent_jax.config import schema
  config = schema.get_config("smoke")
  config.model.attention, config.rl.remat = "blocked", "dots"
  schema.validate(config)
  config.model.attention, config.rl.remat = "flash", "some"
  with pytest.raises(ValueError, match=r"config.model.attention='flash' is not one of(?s:.*)config.rl.remat='some'"):
    schema.validate(config)
  if jax.default_backend() != "gpu":
    config.model.attention, config.rl.remat = "cudnn", "True"  # --config.rl.remat=True, as before: "full"
    with pytest.raises(ValueError, match=r"config.model.attention='cudnn' \(cuDNN flash attention\) needs a CUDA GPU"):
      schema.validate(config)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a CUDA GPU")
def test_cudnn_equals_dense_on_gpu():
  q, k, v, mask, real = _inputs(l=128, hd=64)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  ours = layers.attention(q, k, v, mask, scale=64 ** -0.5, implementation="cudnn")
  diff = np.abs(np.asarray(ours, np.float32) - np.asarray(_dense(q, k, v, mask), np.float32))[real]
  assert diff.max() < 0.05


def test_remat_names():
  assert [layers.remat_name(x) for x in (False, True, "False", "True", "none", "dots")] == [
      "none", "full", "none", "full", "none", "dots"]
  with pytest.raises(ValueError, match="remat='some'.*dots_no_batch"):
    layers.remat_name("some")


# ------------------------------------------------------------------------------- the whole model


@functools.lru_cache(maxsize=None)
def _toy():
  """The micro preset (tiny with one decoder layer) with random weights, and a left-padded batch
  of two rows with three images."""
  config = get_preset("micro")
  params = registry.family_of(config).init_params(config, jax.random.key(0))
  m = config.vision.spatial_merge_size
  grids = np.array([[1, 2 * m, 3 * m], [1, 4 * m, 2 * m], [1, 2 * m, 2 * m]], np.int32)
  rng = np.random.RandomState(0)
  pixels = rng.randn(int(grids.prod(-1).sum()), config.vision.patch_dim).astype(np.float32)

  def image(grid):
    return [config.vision_start_token_id] + [config.image_token_id] * (int(grid.prod()) // m ** 2) + [
        config.vision_end_token_id]

  text = lambda n: list(rng.randint(0, config.vocab_size - 16, size=n))
  rows = [text(3) + image(grids[0]) + text(5) + image(grids[1]) + text(2), text(7) + image(grids[2]) + text(4)]
  width = max(map(len, rows))
  ids = np.full((2, width), config.pad_token_id, np.int32)
  mask = np.zeros((2, width), np.int32)
  for i, r in enumerate(rows):  # left padding, as the sampler and rollout lay prompts out
    ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
  assert (mask == 0).any()
  return config, params, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grids)


@functools.lru_cache(maxsize=None)
def _logits(attention, text_only=False):
  config, params, inputs = _toy()
  if text_only:
    keep = inputs["input_ids"] < config.vision_start_token_id  # no image tokens
    inputs = dict(input_ids=np.where(keep, inputs["input_ids"], 1), attention_mask=inputs["attention_mask"])
  model = registry.family_of(config).module(config, attention=attention, attention_block=16)
  return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, **x))(params, inputs)), inputs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("text_only", [False, True], ids=["images", "text"])
def test_model_logits_equal_dense(impl, text_only):
  """The full forward (vision tower, merged image features, M-RoPE, left padding) of the tiny model."""
  ref, inputs = _logits("dense", text_only=text_only)
  ours, _ = _logits(impl, text_only=text_only)
  real = inputs["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL)


def test_prefill_into_a_cache_equals_dense():
  """A prefill (several queries) into a longer KV cache goes through the blocked kernel."""
  config, params, inputs = _toy()
  family = registry.family_of(config)
  ids, am = inputs["input_ids"], inputs["attention_mask"]
  b, l = ids.shape

  def prefill(attention):
    model = family.module(config, attention=attention, attention_block=16)

    def run(p):
      feats = model.apply({"params": p}, inputs["pixel_values"], inputs["image_grid_thw"], method="encode_images")
      embeds = model.apply({"params": p}, ids, feats, method="embed")
      pos, _ = family.positions(config, ids, am, inputs["image_grid_thw"])
      key_mask = jnp.zeros((b, l + 9), bool).at[:, :l].set(am.astype(bool))
      cache = family.init_cache(config, b, l + 9, jnp.float32)
      logits, cache = model.apply({"params": p}, embeds, pos, key_mask, cache, 0, method="decode")
      return logits, cache
    return jax.jit(run)(params)

  (ref, ref_cache), (ours, our_cache) = prefill("dense"), prefill("blocked")
  real = am.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref)[real], atol=ATOL)
  np.testing.assert_allclose(np.asarray(our_cache[0]["k"]), np.asarray(ref_cache[0]["k"]), atol=ATOL)


@functools.lru_cache(maxsize=None)
def _grads(remat):
  """Gradients of the log-likelihood of the toy batch (images, blocked attention) under ``remat``."""
  config, params, inputs = _toy()
  model = registry.family_of(config).module(config, attention="blocked", attention_block=16, remat=remat)
  target = jnp.asarray(np.roll(inputs["input_ids"], -1, axis=1))

  def loss(p):
    logits = model.apply({"params": p}, **inputs)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], axis=-1)[..., 0]
    return -jnp.sum(lp * inputs["attention_mask"])
  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(remat):
  """Each remat policy recomputes what it drops: the gradients equal those without remat."""
  ref, ours = _grads("none"), _grads(remat)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------ scanned layers


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_equal_the_loop(remat):
  """``scan_layers``: the decoder layers as one ``lax.scan`` over parameters stacked on the fly give
  the loop's logits and gradients (tiny preset: several layers), with the parameter tree unchanged."""
  config = get_preset("tiny")
  assert config.num_hidden_layers >= 2
  _, _, inputs = _toy()
  params = registry.family_of(config).init_params(config, jax.random.key(1))
  target = jnp.asarray(np.roll(inputs["input_ids"], -1, axis=1))

  def run(scan):
    model = registry.family_of(config).module(config, attention="blocked", attention_block=16, remat=remat,
                                              scan_layers=scan)

    def loss(p):
      logits = model.apply({"params": p}, **inputs)
      lp = jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], axis=-1)[..., 0]
      return -jnp.sum(lp * inputs["attention_mask"]), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  ((ref_loss, ref_logits), ref_grads), ((loss, logits), grads) = run(False), run(True)
  real = inputs["attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real], atol=ATOL)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))
  # The layers really ran in a scan: the lowered program has a while loop over them.
  model = registry.family_of(config).module(config, scan_layers=True)
  text = jax.jit(lambda p: model.apply({"params": p}, **inputs)).lower(params).as_text()
  assert "while" in text


def test_scanned_vision_blocks_equal_the_loop():
  """``scan_layers`` scans runs of same-kind vision blocks (runs of two window blocks around
  full-attention ones): the image features and their gradients equal the unrolled tower's, slots and padding
  included."""
  config = get_preset("tiny").replace(vision=dict(depth=6, fullatt_block_indexes=(2, 5)))
  v = config.vision
  assert any(i + 1 < v.depth and i + 1 not in v.fullatt_block_indexes for i in range(v.depth)
             if i not in v.fullatt_block_indexes)  # some run of window blocks is longer than one
  _, _, inputs = _toy()
  params = registry.family_of(config).init_params(config, jax.random.key(2))
  pixels = np.concatenate([inputs["pixel_values"], np.zeros((8, v.patch_dim), np.float32)])
  grid = inputs["image_grid_thw"]

  def run(scan):
    model = registry.family_of(config).module(config, attention="blocked", attention_block=16, remat="full",
                                              max_frame_patches=int(grid.prod(-1).max()), scan_layers=scan)
    f = lambda p: model.apply({"params": p}, pixels, grid, method="encode_images")
    return jax.jit(lambda p: (f(p), jax.grad(lambda q: jnp.sum(f(q)[:20] ** 2))(p)))(params)

  (ref, ref_grads), (ours, grads) = run(False), run(True)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=ATOL)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads["visual"]),
                          jax.tree_util.tree_leaves(ref_grads["visual"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_cache_windows_spread_evenly_and_end_at_the_cache():
  assert layers.cache_windows(192, 6) == (32, 64, 96, 128, 160, 192)
  assert layers.cache_windows(100, 3) == (40, 72, 100)  # steps of 34, rounded up to 8, capped
  assert layers.cache_windows(20, 6) == (8, 16, 20)  # duplicates dropped
  assert layers.cache_windows(192, 1) == (192,)


@pytest.mark.parametrize("used", [1, 31, 32, 33, 100, 191, 192])
def test_decode_step_over_the_used_cache_prefix_equals_the_whole_cache(used):
  """``cached_attention(windows=6, used=)`` (the CPU decode step) picks the smallest prefix that
  holds ``used`` slots and gives the whole cache's output; what the slots past ``used`` hold
  (stale keys of another row, huge values) cannot leak in."""
  rng = np.random.RandomState(used)
  b, s, hkv, g, hd = 3, 192, 2, 3, 8
  q = jnp.asarray(rng.randn(b, 1, hkv, g, hd), jnp.float32)
  k = rng.randn(b, hkv, s, hd).astype(np.float32)
  v = rng.randn(b, hkv, hd, s).astype(np.float32)
  k[:, :, used:] = 1e4  # masked slots: must take no weight
  v[:, :, :, used:] = 1e4
  mask = np.zeros((b, 1, s), bool)
  mask[0, 0, :used] = True
  mask[1, 0, max(used - 5, 0):used] = True  # a row with fewer real keys, all before used
  mask[2, 0, used - 1] = True
  ref = layers.cached_attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), scale=hd ** -0.5)
  run = jax.jit(lambda u, *a: layers.cached_attention(*a, scale=hd ** -0.5, windows=6, used=u))
  ours = run(jnp.int32(used), q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(ours)).max() < 100  # nothing of the 1e4 slots
  text = jax.jit(lambda u, *a: layers.cached_attention(*a, scale=1.0, windows=6, used=u)).lower(
      jnp.int32(used), q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)).as_text()
  assert text.count("stablehlo.case") == 1  # one switch over the prefixes


def test_the_cpu_decode_loop_attends_over_the_used_cache_only():
  """``family.for_decoding`` (what ``sampler.decode_model`` calls before a decode loop) turns the
  windows on for CPU and nowhere else, and reads the same parameters."""
  config, params, _ = _toy()
  family = registry.family_of(config)
  model = family.module(config)
  assert model.decode_windows == 1
  cpu_model = family.for_decoding(model, "cpu")
  assert cpu_model.decode_windows > 1
  shapes = lambda m: jax.tree_util.tree_map(jnp.shape, nn.unbox(jax.eval_shape(
      lambda: m.init(jax.random.key(0), **qmodel._dummy_inputs(config))["params"])))
  assert shapes(cpu_model) == shapes(model) == jax.tree_util.tree_map(jnp.shape, params)  # same parameter tree
  assert family.for_decoding(cpu_model, "cpu") is cpu_model  # already in decode form
  for backend in ("gpu", "tpu"):
    assert family.for_decoding(model, backend) is model
