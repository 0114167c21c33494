"""Qwen2.5-VL in Flax linen: vision tower, patch merger and M-RoPE text decoder.

Public contract (DESIGN.md §5)::

    logits = Qwen25VL(config).apply({'params': params}, input_ids=..., attention_mask=...,
                                    pixel_values=..., image_grid_thw=...)   # [B, L, V]

with the inputs laid out exactly as transformers' ``Qwen2_5_VLForConditionalGeneration`` takes
them. The vision tower works on static shapes: the patch layout (window order, 2-D rotary
positions, attention segments) is computed in ``jnp`` from ``image_grid_thw`` as data, so one
compiled program serves every mix of image sizes with the same total patch count, and padded
patch slots (beyond ``sum(t*h*w)``) are allowed and ignored.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagent_jax.models.qwen2_5_vl.config import ModelConfig, VisionConfig
from imagent_jax.models.layers import (REMAT_POLICIES, GatedMLP, RMSNorm, apply_rotary, attention,
                                       attention_shares, attention_weights, weighted_values,
                                       cached_attention, check_attention, dense, local_segment_attention,
                                       masked_softmax_attention, mrope_cos_sin, layer_scan, remat_name, rope_inv_freq)
from imagent_jax.models.qwen2_5_vl.positions import mrope_positions
from imagent_jax.models.tree import INITS, count_params, rescale_init  # noqa: F401  (public here as before)

Dtype = Any
VISION_ROPE_THETA = 10000.0


class ImageTokenMismatchError(ValueError):
  """The number of image placeholder tokens differs from the number of merged image features."""


# ----------------------------------------------------------------------------------------- vision


def vision_layout(image_grid_thw, num_patches: int, cfg: VisionConfig) -> dict[str, jax.Array]:
  """Where every patch goes in the vision tower, computed from the grids as data.

  The processor emits patches image by image, frame by frame, in 2x2 merge-unit order. The tower
  reorders them window by window (``window_units`` merged units a side), runs window attention in
  most blocks and per-frame full attention in ``fullatt_block_indexes``, and restores the order
  after the merger. Patches past ``sum(t*h*w)`` are padding: they form their own segment.

  Args:
    image_grid_thw: ``[N, 3]`` int ``(t, h, w)`` in patches.
    num_patches: ``P``, the static length of ``pixel_values``; a multiple of ``merge_unit``.
    cfg: the vision config.

  Returns:
    dict with ``perm [P]`` (window order: ``x_windowed = x[perm]``), ``row``/``col [P]`` (2-D
    rotary positions, window order), ``window_seg``/``frame_seg [P]`` (attention segment ids,
    window order) and ``unit_inverse [P // merge_unit]`` (merged output back to processor order).
  """
  m = cfg.spatial_merge_size
  ws = cfg.window_units
  g = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
  t, h, w = g[:, 0], g[:, 1], g[:, 2]
  n = t * h * w
  ends = jnp.cumsum(n)
  starts = ends - n
  p = jnp.arange(num_patches, dtype=jnp.int32)
  img = jnp.searchsorted(ends, p, side="right").astype(jnp.int32)
  is_pad = img >= g.shape[0]
  img = jnp.minimum(img, g.shape[0] - 1)
  q = p - starts[img]
  hi, wi = h[img], w[img]
  frame = q // jnp.maximum(hi * wi, 1)
  r = q % jnp.maximum(hi * wi, 1)
  unit, within = r // (m * m), r % (m * m)
  units_w = jnp.maximum(wi // m, 1)
  urow, ucol = unit // units_w, unit % units_w
  row = urow * m + within // m
  col = ucol * m + within % m

  cdiv = lambda a, b: (a + b - 1) // b
  win_rows, win_cols = cdiv(h // m, ws), cdiv(w // m, ws)
  wins_per_img = t * win_rows * win_cols
  win_start = jnp.cumsum(wins_per_img) - wins_per_img
  window_id = (win_start[img] + frame * (win_rows * win_cols)[img] + (urow // ws) * win_cols[img]
               + ucol // ws)
  frames_before = jnp.cumsum(t) - t
  frame_id = frames_before[img] + frame
  big = jnp.int32(2 ** 30)
  window_id = jnp.where(is_pad, big, window_id)
  frame_id = jnp.where(is_pad, big, frame_id)

  perm = jnp.argsort(window_id, stable=True)
  unit_perm = perm[:: m * m] // (m * m)
  return dict(perm=perm, row=row[perm], col=col[perm], window_seg=window_id[perm],
              frame_seg=frame_id[perm], unit_inverse=jnp.argsort(unit_perm))


def vision_rope(row, col, head_dim: int):
  """2-D rotary tables ``(cos, sin) [P, head_dim]``: a quarter of the channels per axis, twice."""
  inv = rope_inv_freq(head_dim // 2, VISION_ROPE_THETA)  # [hd/4]
  f = jnp.concatenate([row[:, None] * inv, col[:, None] * inv], axis=-1).astype(jnp.float32)
  emb = jnp.concatenate([f, f], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def image_slots(image_grid_thw, num_patches: int, capacity: int, merge_unit: int):
  """Where each image's patches sit in the packed ``pixel_values``: one slot of ``capacity`` per image.

  Args:
    image_grid_thw: ``[N, 3]`` int grids (all-zero rows: unused slots).
    num_patches: ``P``, the packed length.
    capacity: patches per slot (no image may have more; a multiple of ``merge_unit``).
    merge_unit: patches merged into one feature (4).

  Returns:
    dict with ``src [N, capacity]`` (the packed row of slot patch ``j`` of image ``n``, clipped into
    range; rows past the image's patches repeat real rows and are masked as padding by the
    layout), and ``image [F]`` / ``unit [F]``, ``F = P // merge_unit``: for each packed merged
    feature, its image and its index within that image (clipped: features past the images' are
    padding).
  """
  g = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
  n = jnp.prod(g, axis=-1)
  starts = jnp.cumsum(n) - n
  j = jnp.arange(capacity, dtype=jnp.int32)
  src = jnp.clip(starts[:, None] + j[None, :], 0, max(num_patches - 1, 0))
  u = jnp.arange(num_patches // merge_unit, dtype=jnp.int32) * merge_unit  # first patch of each feature
  image = jnp.clip(jnp.searchsorted(jnp.cumsum(n), u, side="right").astype(jnp.int32), 0, g.shape[0] - 1)
  unit = jnp.clip((u - starts[image]) // merge_unit, 0, capacity // merge_unit - 1)
  return dict(src=src, image=image, unit=unit)


class VisionAttention(nn.Module):
  """Self-attention of the vision tower over ``[N, S]`` patches (``N`` image slots of ``S``).

  ``block > 0`` and ``3 * block < S``: attention in bands of ``block`` rows
  (``local_segment_attention``; the window blocks). Otherwise over the whole slot with the segment
  mask, by ``attention`` (``layers.attention``: "dense" holds ``[N, H, S, S]`` scores, "blocked"
  a block at a time).
  """

  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  block: int = 0  # longest segment in patches: banded attention (local_segment_attention); 0: whole slot
  attention: str = "dense"
  attention_block: int = 512

  @nn.compact
  def __call__(self, x, cos, sin, seg):
    """``x [N, S, Dv]``, ``cos``/``sin [N, S, hd]``; attention only between patches with equal ``seg [N, S]``."""
    c = self.cfg
    n, s_len = x.shape[:2]
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = dense(3 * c.hidden_size, ("vision_embed", "vision_heads"), name="qkv", **kw)(x)
    qkv = qkv.reshape(n, s_len, 3, c.num_heads, c.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(self.dtype)
    k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(self.dtype)
    scale = c.head_dim ** -0.5
    if 0 < self.block and 3 * self.block < s_len:
      out = jax.vmap(lambda a, b_, v_, sg: local_segment_attention(a, b_, v_, sg, block=self.block, scale=scale))(
          q, k, v, seg)
    else:
      mask = seg[:, :, None] == seg[:, None, :]
      out = attention(q[:, :, :, None], k, v, mask, scale=scale, implementation=self.attention,
                      block=self.attention_block)
    out = out.reshape(n, s_len, c.hidden_size)
    return dense(c.hidden_size, ("vision_heads", "vision_embed"), name="proj", **kw)(out)


class VisionBlock(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  block: int = 0
  attention: str = "dense"
  attention_block: int = 512

  @nn.compact
  def __call__(self, x, cos, sin, seg):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = VisionAttention(c, block=self.block, attention=self.attention, attention_block=self.attention_block,
                           name="attn", **kw)
    x = x + attn(RMSNorm(c.rms_norm_eps, name="norm1", **kw)(x), cos, sin, seg)
    mlp = GatedMLP(c.hidden_size, c.intermediate_size, use_bias=True, axes=("vision_embed", "vision_mlp"),
                   name="mlp", **kw)
    x = x + mlp(RMSNorm(c.rms_norm_eps, name="norm2", **kw)(x))
    return nn.with_logical_constraint(x, ("batch", "length", "embed_act"))


class VisionTower(nn.Module):
  """Patch embedding → blocks (window / full attention) → 2x2 merger, in processor token order.

  With ``max_frame_patches`` set (the processor's ``max_pixels // patch_size**2``: no image is
  larger), every image runs in its own slot of that many patches (``image_slots``): the blocks
  work on ``[N, S, Dv]``, ``N`` images sharded over the batch mesh axes like the decoder's rows,
  window blocks attend in bands of one window and full-attention blocks over their slot (by
  ``attention``), so memory and work grow with the number of images, never with the square of
  the batch's patches. An image larger than a slot raises ``ValueError`` when the grid is
  concrete and makes the features NaN under ``jit``. Without it (0), the whole patch budget is
  one slot holding every image, with dense full attention over it.
  """

  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  max_frame_patches: int = 0
  attention: str = "dense"
  attention_block: int = 512
  scan_layers: bool = False  # each run of same-kind blocks as one layers.layer_scan

  @nn.compact
  def __call__(self, pixel_values, image_grid_thw, max_image_patches=None):
    """``pixel_values [P, C*T*p*p]``, ``image_grid_thw [N, 3]`` -> merged features ``[P // 4, D]``.

    ``max_image_patches``: a tighter bound than ``max_frame_patches`` on every image's patches
    (the rollout's tool views), which sizes the slots.
    """
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    num_patches = pixel_values.shape[0]
    if num_patches % c.merge_unit:
      raise ValueError(f"pixel_values has {num_patches} patches, not a multiple of {c.merge_unit}")
    grid = jnp.asarray(image_grid_thw, jnp.int32).reshape(-1, 3)
    pixels = jnp.asarray(pixel_values, self.dtype)
    bound = max_image_patches or self.max_frame_patches
    if bound:  # one slot per image
      capacity = min(-(-bound // c.merge_unit) * c.merge_unit, num_patches)
      slots = image_slots(grid, num_patches, capacity, c.merge_unit)
      pixels = pixels[slots["src"]]  # [N, S, patch_dim]
      lay = jax.vmap(lambda g: vision_layout(g[None], capacity, c))(grid)
    else:  # one slot holding every image
      capacity = num_patches
      pixels = pixels[None]
      lay = {k: v[None] for k, v in vision_layout(grid, num_patches, c).items()}
    pixels = nn.with_logical_constraint(pixels, ("batch", "length", None))
    x = dense(c.hidden_size, ("patch", "vision_embed"), use_bias=False, name="patch_embed", **kw)(pixels)
    x = jnp.take_along_axis(x, lay["perm"][..., None], axis=1)
    cos, sin = jax.vmap(vision_rope, in_axes=(0, 0, None))(lay["row"], lay["col"], c.head_dim)
    block = nn.remat(VisionBlock) if self.remat else VisionBlock
    window_patches = (c.window_units * c.spatial_merge_size) ** 2
    settings = lambda full: dict(block=0 if full else window_patches, attention=self.attention,
                                 attention_block=self.attention_block, **kw)
    scan = self.scan_layers and not self.is_initializing()
    for full, run in itertools.groupby(range(c.depth), key=lambda i: i in c.fullatt_block_indexes):
      run = list(run)  # consecutive blocks of the same kind (window or full attention)
      seg = lay["frame_seg"] if full else lay["window_seg"]
      if scan and len(run) > 1:  # one scan per run
        params = self.variables["params"]
        x = layer_scan(VisionBlock(c, **settings(full), parent=None), [params[f"blocks_{j}"] for j in run],
                       x, cos, sin, seg, remat="full" if self.remat else "none")
      else:
        for j in run:
          x = block(c, **settings(full), name=f"blocks_{j}")(x, cos, sin, seg)
    x = PatchMerger(c, name="merger", **kw)(x)  # [N, S // 4, D]
    x = jnp.take_along_axis(x, lay["unit_inverse"][..., None], axis=1)
    x = x[slots["image"], slots["unit"]] if bound else x[0]
    if bound:
      x = self._guard_image_size(x, grid, capacity)
    return x

  def _guard_image_size(self, x, grid, capacity):
    largest = jnp.max(jnp.prod(grid, axis=-1), initial=0)
    if not isinstance(largest, jax.core.Tracer):
      if int(largest) > capacity:
        raise ValueError(f"an image of {int(largest)} patches exceeds the vision tower's slot of {capacity} "
                         f"patches (max_frame_patches={self.max_frame_patches}: the processor's max_pixels / "
                         "patch_size**2)")
      return x
    return jnp.where(largest > capacity, jnp.nan, x)


class PatchMerger(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = RMSNorm(1e-6, name="ln_q", **kw)(x)
    x = x.reshape(x.shape[:-2] + (x.shape[-2] // c.merge_unit, c.hidden_size * c.merge_unit))
    x = dense(x.shape[-1], ("vision_merge", "vision_merge_hidden"), use_bias=True, name="mlp_0", **kw)(x)
    x = nn.gelu(x, approximate=False)
    return dense(c.out_hidden_size, ("vision_merge_hidden", "embed"), use_bias=True, name="mlp_2", **kw)(x)


# ------------------------------------------------------------------------------------------- text


class Attention(nn.Module):
  """Grouped-query self-attention with q/k/v bias and M-RoPE; optional KV cache.

  ``attention`` picks how a whole sequence (training, a prefill) attends (``layers.attention``;
  ``attention_block`` is the block of ``"blocked"``). With a KV cache, a prefill of several tokens
  attends over the cache with ``"blocked"`` when ``attention`` is ``"blocked"`` or ``"cudnn"``
  (cuDNN's causal mask cannot place queries at a cache offset) and with ``"xla"`` when it is
  ``"xla"``; single-token decode steps always use ``layers.cached_attention``, over the smallest
  of ``decode_windows`` cache prefixes that holds every row's tokens.
  """

  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "dense"
  attention_block: int = 512
  record_probs: bool = False  # sow the softmax probabilities (dense math) as intermediates/attention_probs
  decode_windows: int = 1  # cache prefixes a decode step may attend over (layers.cached_attention)

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, key_segments=None):
    c = self.cfg
    b, l, _ = x.shape
    hd, hq, hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(hq * hd, ("embed", "heads"), use_bias=True, name="q_proj", **kw)(x).reshape(b, l, hq, hd)
    k = dense(hkv * hd, ("embed", "kv_heads"), use_bias=True, name="k_proj", **kw)(x).reshape(b, l, hkv, hd)
    v = dense(hkv * hd, ("embed", "kv_heads"), use_bias=True, name="v_proj", **kw)(x).reshape(b, l, hkv, hd)
    cos, sin = cos.astype(self.dtype), sin.astype(self.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    q = q.reshape(b, l, hkv, hq // hkv, hd)
    if cache is None:
      new_cache = None
      if key_segments is not None:  # the analysis path (analysis.attention): shares per key segment, chunked
        out, shares = attention_shares(q, k, v, mask, key_segments, scale=hd ** -0.5, chunk=self.attention_block)
        self.sow("intermediates", "attention_shares", shares)
      elif self.record_probs:  # the analysis path (analysis.attention): the dense math, its probabilities kept
        probs = attention_weights(q, k, mask, scale=hd ** -0.5)
        self.sow("intermediates", "attention_probs", probs)
        out = weighted_values(probs, v)
      elif self.attention == "dense":
        out = masked_softmax_attention(q, k, v, mask, scale=hd ** -0.5)
      else:
        out = attention(q, k, v, mask, scale=hd ** -0.5, implementation=self.attention, block=self.attention_block)
    else:
      new_cache = write_cache(cache, k, v, cache_index)
      ck, cv = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
      if l == 1:  # a decode step: keys past the last row's slot are all masked out
        out = cached_attention(q, ck, cv, mask, scale=hd ** -0.5, windows=self.decode_windows,
                               used=jnp.max(cache_index) + 1)
      elif self.attention == "dense":
        out = cached_attention(q, ck, cv, mask, scale=hd ** -0.5)
      else:  # a prefill: keys and values as [B, S, Hkv, hd]
        impl = "xla" if self.attention == "xla" else "blocked"
        out = attention(q, jnp.transpose(ck, (0, 2, 1, 3)), jnp.transpose(cv, (0, 3, 1, 2)), mask,
                        scale=hd ** -0.5, implementation=impl, block=self.attention_block)
    out = dense(c.hidden_size, ("heads", "embed"), use_bias=False, name="o_proj", **kw)(out.reshape(b, l, hq * hd))
    return out, new_cache


class DecoderLayer(nn.Module):
  cfg: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "dense"
  attention_block: int = 512
  record_probs: bool = False
  decode_windows: int = 1

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, key_segments=None):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, new_cache = Attention(c, attention=self.attention, attention_block=self.attention_block,
                             record_probs=self.record_probs, decode_windows=self.decode_windows,
                             name="self_attn", **kw)(
        RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x), cos, sin, mask, cache, cache_index, key_segments)
    x = x + h
    mlp = GatedMLP(c.hidden_size, c.intermediate_size, use_bias=False, name="mlp", **kw)
    x = x + mlp(RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed_act"))
    return x, new_cache


def merge_image_features(inputs_embeds, input_ids, image_features, image_token_id: int, num_features=None):
  """Writes ``image_features [N, D]`` over the image placeholder tokens, in row-major order.

  ``inputs_embeds [B, L, D]``; the count of ``image_token_id`` in ``input_ids [B, L]`` must equal
  the number of real features: ``num_features`` (a scalar, may be traced, for feature arrays
  padded to a static patch budget) or else ``N``. When the inputs are concrete, a mismatch raises
  ``ImageTokenMismatchError`` at once. Under ``jit`` nothing may raise (an exception in one
  device's callback would leave the others waiting in a collective, and the process aborts), so a
  mismatch logs the same message as an error from a host callback and turns every embedding into
  NaN: the logits, the loss and the trainer's non-finite check all show it. Host-side code should
  call ``check_image_tokens`` on its batches before they enter jitted code.
  """
  is_img = input_ids == image_token_id
  n_feat = image_features.shape[0]
  idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
  gathered = image_features[jnp.clip(idx, 0, max(n_feat - 1, 0))].astype(inputs_embeds.dtype)
  out = jnp.where(is_img[..., None], gathered, inputs_embeds)
  return _guard_image_token_count(out, is_img, n_feat if num_features is None else num_features)


def num_real_features(image_grid_thw, config: ModelConfig):
  """Merged features the images of ``image_grid_thw [N, 3]`` give (numpy if concrete, else traced)."""
  if isinstance(image_grid_thw, jax.core.Tracer):
    return jnp.sum(jnp.prod(image_grid_thw, axis=-1)) // config.vision.merge_unit
  return int(np.asarray(image_grid_thw).prod(-1).sum()) // config.vision.merge_unit


def check_image_tokens(input_ids, image_grid_thw, config: ModelConfig) -> None:
  """Host-side check: raises ``ImageTokenMismatchError`` unless the placeholders fit the grids.

  Args:
    input_ids: ``[B, L]`` concrete token ids.
    image_grid_thw: ``[N, 3]`` or None.
    config: model config (image token id, merge size).
  """
  n_tok = int((np.asarray(input_ids) == config.image_token_id).sum())
  n_feat = 0 if image_grid_thw is None else int(np.asarray(image_grid_thw).prod(-1).sum()) // config.vision.merge_unit
  if n_tok != n_feat:
    raise ImageTokenMismatchError(_mismatch_message(n_tok, n_feat))


def _mismatch_message(n_tok: int, n_feat: int) -> str:
  return (f"Image features and image tokens do not match: the prompt has {n_tok} image placeholder "
          f"tokens but the images give {n_feat} merged features (sum of t*h*w/4 over image_grid_thw). "
          "Build prompts with imagent_jax.processing.Processor, which expands each <|image_pad|> to "
          "its image's token count, and pass every image of the batch in order.")


def _guard_image_token_count(x, is_img, n_feat):
  traced = isinstance(is_img, jax.core.Tracer) or isinstance(n_feat, jax.core.Tracer)
  if not traced:
    n_tok = int(np.asarray(is_img).sum())
    if n_tok != int(n_feat):
      raise ImageTokenMismatchError(_mismatch_message(n_tok, int(n_feat)))
    return x

  def report(n, f):
    if int(n) != int(f):
      logging.getLogger("imagent_jax").error("%s (inside jit: logits are NaN)", _mismatch_message(int(n), int(f)))

  n_tok = is_img.sum()
  # The host is called only on a mismatch: an unconditional callback would cost a host round
  # trip on every decode step.
  jax.lax.cond(n_tok == n_feat, lambda: None, lambda: jax.debug.callback(report, n_tok, n_feat))
  return jnp.where(n_tok == n_feat, x, jnp.nan)


def causal_mask(attention_mask, num_queries: int, cache_index=0):
  """``[B, Lq, S]`` mask: key ``s`` is real (``attention_mask [B, S]``) and not after the query.

  Query ``i`` of row ``b`` sits at cache slot ``cache_index[b] + i`` (``cache_index`` is a scalar
  or ``[B]``); without a cache ``S == Lq`` and ``cache_index == 0``.
  """
  b, s = attention_mask.shape
  start = jnp.broadcast_to(jnp.asarray(cache_index, jnp.int32), (b,))
  qpos = start[:, None] + jnp.arange(num_queries)[None, :]  # [B, Lq]
  allowed = jnp.arange(s)[None, None, :] <= qpos[:, :, None]
  return allowed & attention_mask.astype(bool)[:, None, :]


class Qwen25VL(nn.Module):
  """Qwen2.5-VL for conditional generation.

  Attributes:
    config: the architecture.
    dtype: compute dtype (activations, matmuls); norms, softmax and rotary run in float32.
    param_dtype: dtype the parameters are created in (loading casts to the dtype asked for).
    remat: what each decoder layer keeps for the backward pass (training memory): a
      ``layers.REMAT_POLICIES`` name, "none", "full", "dots" or "dots_no_batch", or the old bools
      (False = "none", True = "full"). Any policy but "none" rematerialises the vision blocks whole.
    max_frame_patches: the largest image any input has, in patches (the processor's
      ``max_pixels // patch_size**2``): the vision tower runs each image in a slot of that many
      patches, sharded over images (``VisionTower``). 0: one slot holding the whole patch budget.
    attention: how the decoder attends over a whole sequence (``layers.ATTENTION_IMPLS``: "dense",
      "blocked", "xla", "cudnn"; see ``Attention``). "cudnn" raises ``ValueError`` when the
      module is set up off a GPU or with a 32-bit compute dtype.
    attention_block: query and key block of ``attention="blocked"``.
    scan_layers: run the decoder layers of a pass without a KV cache (training, log-probs) as one
      ``lax.scan`` over their parameters stacked on the fly (``layers.layer_scan``), and each run
      of consecutive window (or full-attention) vision blocks likewise; the parameter tree is
      unchanged. Compile time no longer grows with depth, each layer's weights are gathered and
      its gradients reduced inside its own iteration (FSDP parameters are never whole on a device
      at once), and one iteration's buffers serve the next. Decoder passes with a KV cache (the
      rollout's prefill and decode steps) loop as before.
    record_attention: the analysis path (``analysis.attention``): each decoder layer's softmax
      probabilities ``[B, Hkv, G, L, L]`` (dense math, whatever ``attention`` says) are sown as
      ``intermediates/layers_<i>/self_attn/attention_probs``; layers loop. Off (the default), the
      program is the normal one.
    decode_windows: a decode step (one new token a row) attends over the smallest of this many
      cache prefixes that holds every row's tokens instead of the whole cache (one
      ``lax.switch`` per layer; ``layers.cached_attention``). 1: the whole cache.
  """

  config: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool | str = "none"
  max_frame_patches: int = 0
  attention: str = "dense"
  attention_block: int = 512
  scan_layers: bool = False
  record_attention: bool = False
  decode_windows: int = 1

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    check_attention(self.attention, dtype=self.dtype)
    remat = remat_name(self.remat)
    # The vision tower's full-attention blocks attend over a whole image slot with a segment mask,
    # which cuDNN's causal/length form cannot express: they use "blocked" in its place.
    vision_attention = "blocked" if self.attention == "cudnn" else self.attention
    self.visual = VisionTower(c.vision, remat=remat != "none", max_frame_patches=self.max_frame_patches,
                              attention=vision_attention, attention_block=self.attention_block,
                              scan_layers=self.scan_layers, **kw)
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.hidden_size, **kw,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    layer = DecoderLayer
    if remat != "none":
      layer = nn.remat(DecoderLayer, static_argnums=(5,), policy=REMAT_POLICIES[remat])
    self.layers = [layer(c, attention=self.attention, attention_block=self.attention_block,
                         record_probs=self.record_attention, decode_windows=self.decode_windows, **kw)
                   for _ in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = dense(c.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)

  def encode_images(self, pixel_values, image_grid_thw, max_image_patches=None):
    """``pixel_values [P, C*T*p*p]``, ``image_grid_thw [N, 3]`` -> ``[P // 4, D]`` merged features.

    ``max_image_patches``: optional bound on every image's patches tighter than
    ``max_frame_patches`` (sizes the vision tower's per-image slots; the rollout's tool views).
    """
    return self.visual(pixel_values, image_grid_thw, max_image_patches)

  def embed(self, input_ids, image_features=None, num_image_features=None):
    """Token embeddings ``[B, L, D]`` with ``image_features [N, D]`` over the placeholders.

    ``num_image_features``: how many of the ``N`` features are real when they come from patches
    padded to a static budget (default: all ``N``).
    """
    x = self.embed_tokens(jnp.asarray(input_ids))
    if image_features is not None:
      x = merge_image_features(x, input_ids, image_features, self.config.image_token_id, num_image_features)
    else:
      x = _guard_image_token_count(x, input_ids == self.config.image_token_id, 0)
    return x

  def decode(self, inputs_embeds, positions, attention_mask, cache=None, cache_index=0, logits_at=None,
             return_hidden=False, key_segments=None):
    """Runs the decoder.

    Args:
      inputs_embeds: ``[B, Lq, D]``.
      positions: ``[3, B, Lq]`` M-RoPE positions.
      attention_mask: ``[B, S]`` key mask over the whole cache (``S == Lq`` without a cache).
      cache: optional KV cache (``init_cache``), one entry per layer.
      cache_index: cache slot of the first of the ``Lq`` new tokens: a scalar or ``[B]`` (rows
        may sit at different slots).
      logits_at: optional ``[B]`` int: compute the logits only at query position
        ``logits_at[b]`` of each row (a prefill needs only each row's last real token; the
        vocabulary projection of every position would cost ``[B, Lq, V]``).
      return_hidden: return the final (normed) hidden states instead of the logits, for a caller
        that projects them itself in pieces (``logits``).
      key_segments: the attention analysis (``analysis.attention.attention_shares``; no cache):
        ``[B, L, C]`` one-hot key segments. Each layer then attends ``attention_block`` queries at
        a time (``layers.attention_shares``) and sows ``intermediates/layers_<i>/self_attn/
        attention_shares [B, L, C]``; layers loop.

    Returns:
      ``(logits, new cache or None)``: logits ``[B, Lq, V]`` float32, or ``[B, V]`` with
      ``logits_at``; with ``return_hidden``, hidden states ``[B, Lq, D]`` (or ``[B, D]``) in the
      compute dtype in their place.
    """
    c = self.config
    x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ("batch", "length", "embed_act"))
    cos, sin = mrope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section)
    mask = causal_mask(attention_mask, x.shape[1], cache_index)
    new_cache = [] if cache is not None else None
    if key_segments is not None and cache is not None:
      raise ValueError("key_segments (the attention analysis) is for a pass without a KV cache")
    analysis = self.record_attention or key_segments is not None
    if self.scan_layers and cache is None and not self.is_initializing() and not analysis:
      x = self._scan_decoder(x, cos, sin, mask)
    else:
      for i, layer in enumerate(self.layers):
        x, lc = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_index, key_segments)
        if cache is not None:
          new_cache.append(lc)
    if logits_at is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)[:, 0]  # [B, D]
    x = self.norm(x)
    if return_hidden:
      return x, new_cache
    return self.logits(x), new_cache

  def _scan_decoder(self, x, cos, sin, mask):
    """The decoder layers as one ``layers.layer_scan``: ``x [B, L, D]`` -> ``[B, L, D]``, no cache.

    The layers' parameters (``layers_0``, ``layers_1``, ...) are stacked on the fly and one unbound ``DecoderLayer`` is applied to each slice under the model's
    remat policy. Equal to the loop.
    """
    c = self.config
    params = self.variables["params"]
    layer = DecoderLayer(c, dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
                         attention_block=self.attention_block, parent=None)  # unbound: applied per slice
    return layer_scan(layer, [params[f"layers_{i}"] for i in range(c.num_hidden_layers)], x, cos, sin, mask,
                      remat=self.remat)

  def logits(self, hidden):
    """The vocabulary projection: final (normed) hidden states ``[..., D]`` -> logits ``[..., V]`` float32.

    ``lm_head``, or the token embedding when the embeddings are tied; the matmul runs in the
    compute dtype and its result is cast to float32. ``decode`` ends with it, and the training
    log-prob pass (``rl.logprobs.token_logprobs``) applies it to chunks of ``__call__(...,
    return_hidden=True)``'s output, so both project the same way.
    """
    if self.config.tie_word_embeddings:
      out = self.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
               position_ids=None, return_hidden=False, key_segments=None):
    """Logits ``[B, L, V]`` (float32) for the inputs transformers' forward takes.

    Args:
      input_ids: ``[B, L]`` int, image placeholders already expanded.
      attention_mask: ``[B, L]`` 1 = token, 0 = padding (left or right); default all ones.
      pixel_values: ``[P, C*T*p*p]`` patches of all images of the batch, or None. ``P`` may exceed
        ``sum(t*h*w)`` (a static patch budget): the trailing patches are ignored.
      image_grid_thw: ``[N, 3]`` grid of every image, or None; all-zero rows are unused slots.
      position_ids: ``[3, B, L]`` M-RoPE positions; computed by ``mrope_positions`` when None.
      return_hidden: return the final (normed) hidden states ``[B, L, D]`` (compute dtype) instead
        of the logits; ``logits(hidden)`` turns them into exactly these logits. The training pass
        projects them a chunk of positions at a time and never holds ``[B, L, V]``.
      key_segments: the attention analysis only: ``[B, L, C]`` one-hot key segments; every
        decoder layer sows the head-mean share of each query's attention on each segment
        (``decode``). None (the default): the normal program.
    """
    input_ids = jnp.asarray(input_ids) if not isinstance(input_ids, jax.core.Tracer) else input_ids
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    features = None
    if pixel_values is not None:
      if image_grid_thw is None:
        raise ValueError("pixel_values were given without image_grid_thw")
      features = self.encode_images(pixel_values, image_grid_thw)
    x = self.embed(input_ids, features,
                   None if features is None else num_real_features(image_grid_thw, self.config))
    if position_ids is None:
      position_ids, _ = mrope_positions(input_ids, attention_mask, image_grid_thw,
                                        image_token_id=self.config.image_token_id,
                                        spatial_merge_size=self.config.vision.spatial_merge_size)
    out, _ = self.decode(x, position_ids, attention_mask, return_hidden=return_hidden, key_segments=key_segments)
    return out


# ------------------------------------------------------------------------------- params and cache


def _dummy_inputs(config: ModelConfig):
  m = config.vision.spatial_merge_size
  grid = np.array([[1, m, m]], np.int32)
  pixels = np.zeros((m * m, config.vision.patch_dim), np.float32)
  ids = np.full((1, 1), config.image_token_id, np.int32)
  return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)


def _boxed_init(config: ModelConfig, rng, param_dtype):
  return Qwen25VL(config, param_dtype=param_dtype).init(rng, **_dummy_inputs(config))["params"]


def logical_axes(config: ModelConfig):
  """Pytree (same structure as params) of ``PartitionSpec`` over logical axis names."""
  boxed = jax.eval_shape(lambda r: _boxed_init(config, r, jnp.float32), jax.random.key(0))
  return nn.get_partition_spec(boxed)


def init_params(config: ModelConfig, rng, param_dtype=jnp.float32):
  """Random parameters (a plain pytree of arrays), normal(0.02) weights, zero biases, unit norms."""
  return nn.unbox(jax.jit(lambda r: _boxed_init(config, r, param_dtype))(rng))


def abstract_params(config: ModelConfig, param_dtype=jnp.float32):
  """``jax.ShapeDtypeStruct`` pytree of the parameters, without allocating them."""
  return jax.eval_shape(lambda r: nn.unbox(_boxed_init(config, r, param_dtype)), jax.random.key(0))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32):
  """Empty KV cache: one ``{'k': [B, Hkv, S, hd], 'v': [B, Hkv, hd, S]}`` per decoder layer.

  ``S = max_len`` slots. The layouts are the ones ``layers.cached_attention``'s two dots read
  without transposing the cache (``write_cache`` is the one place that writes them).
  """
  hkv, hd = config.num_key_value_heads, config.head_dim
  return [{"k": jnp.zeros((batch, hkv, max_len, hd), dtype), "v": jnp.zeros((batch, hkv, hd, max_len), dtype)}
          for _ in range(config.num_hidden_layers)]


def write_cache(cache, k, v, index):
  """Writes new keys and values into one layer's cache (``init_cache`` layout).

  Args:
    cache: ``{'k': [B, Hkv, S, hd], 'v': [B, Hkv, hd, S]}``.
    k, v: ``[B, L, Hkv, hd]`` for the ``L`` new tokens.
    index: slot of the first new token: a scalar or ``[B]``. Each row writes at its own slot:
      rows of an agent rollout drift apart as tool observations of different lengths are
      inserted.

  Returns:
    the updated ``{'k', 'v'}`` (same shapes and dtype as ``cache``).
  """
  b = k.shape[0]
  idx = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (b,))
  put = lambda axis: jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice_in_dim(buf, new, i, axis))
  k_new = jnp.transpose(k, (0, 2, 1, 3)).astype(cache["k"].dtype)  # [B, Hkv, L, hd]
  v_new = jnp.transpose(v, (0, 2, 3, 1)).astype(cache["v"].dtype)  # [B, Hkv, hd, L]
  return {"k": put(1)(cache["k"], k_new, idx), "v": put(2)(cache["v"], v_new, idx)}


def place_prefix(cache, prefix, starts):
  """Writes one row's cached prefix into every row of ``cache`` (``init_cache`` layout).

  Args:
    cache: the ``B``-row cache, one ``{'k', 'v'}`` per layer.
    prefix: a 1-row cache of ``K`` slots (the shared prefix's keys and values).
    starts: ``[B]`` slot where each row's copy begins.

  Returns:
    ``cache`` with slots ``starts[b] .. starts[b] + K - 1`` of row ``b`` holding the prefix.
  """
  b = starts.shape[0]
  out = []
  for layer, pre in zip(cache, prefix):
    k = jnp.transpose(pre["k"], (0, 2, 1, 3))  # [1, K, Hkv, hd]: write_cache's input layout
    v = jnp.transpose(pre["v"], (0, 3, 1, 2))
    out.append(write_cache(layer, jnp.broadcast_to(k, (b,) + k.shape[1:]), jnp.broadcast_to(v, (b,) + v.shape[1:]),
                           starts))
  return out

