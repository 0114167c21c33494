"""Building blocks shared by the vision tower and the text decoder.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) so that
``imagent_jax.parallel`` can shard it by a rule table; ``init_params`` strips the boxes, so the
parameter pytree a user sees is plain arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_INIT_STD = 0.02
# A large finite negative instead of -inf, so that rows with nothing to attend to give a uniform
# softmax rather than NaN (padding rows; their outputs are never used).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool, dtype: Dtype,
          param_dtype: Dtype, name: str) -> nn.Dense:
  """``nn.Dense`` whose kernel ``[in, out]`` and bias ``[out]`` carry the logical axes ``axes``."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STD), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, scaled by a learned ``scale [D]`` (HF ``weight``)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class GatedMLP(nn.Module):
  """``down(silu(gate(x)) * up(x))``; biases on in the vision tower, off in the decoder."""

  hidden: int
  intermediate: int
  use_bias: bool
  axes: tuple[str, str] = ("embed", "mlp")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = dense(self.intermediate, self.axes, name="gate_proj", **kw)(x)
    up = dense(self.intermediate, self.axes, name="up_proj", **kw)(x)
    return dense(self.hidden, self.axes[::-1], name="down_proj", **kw)(nn.silu(gate) * up)


def rotate_half(x):
  """``[x1, x2] -> [-x2, x1]`` over the last axis (the rotary convention of Qwen/Llama)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
  """Rotates ``x [..., L, H, hd]`` by angles whose ``cos``/``sin`` are ``[..., L, hd]``."""
  return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


def rope_inv_freq(dim: int, theta: float):
  """Inverse frequencies ``[dim // 2]`` of standard RoPE over ``dim`` channels."""
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_cos_sin(positions, head_dim: int, theta: float, mrope_section: Sequence[int]):
  """Multimodal RoPE tables.

  Args:
    positions: ``[3, B, L]`` temporal / height / width position ids.
    head_dim: rotary channels per head.
    theta: RoPE base.
    mrope_section: how many of the ``head_dim // 2`` frequencies follow the t, h and w streams.

  Returns:
    ``(cos, sin)``, each ``[B, L, head_dim]`` float32: frequency band ``i`` of section ``s`` uses
    stream ``s``; the table is duplicated over the two halves as ``rotate_half`` expects.
  """
  inv = rope_inv_freq(head_dim, theta)  # [hd/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [3, B, L, hd/2]
  bounds = [sum(mrope_section[:i]) for i in range(len(mrope_section) + 1)]
  freqs = jnp.concatenate([freqs[s, ..., bounds[s]:bounds[s + 1]] for s in range(len(mrope_section))], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _gqa_softmax_attention(q, k, v, mask, scale: float, k_axes: str, v_axes: str):
  """The one grouped-query attention; ``k_axes`` / ``v_axes`` name the key and value layouts."""
  logits = jnp.einsum(f"bqkgd,{k_axes}->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(f"bkgqs,{v_axes}->bqkgd", probs, v)


def cached_attention(q, k, v, mask, *, scale: float):
  """``masked_softmax_attention`` over a KV cache kept in the layouts the two dots read.

  Keys are stored ``[B, Hkv, S, hd]`` and values ``[B, Hkv, hd, S]`` (the layout of
  ``qwen2_5_vl.init_cache``). With ``[B, S, Hkv, hd]`` XLA:CPU transposes every layer's whole
  cache on every decode step to feed its dot kernels; in these layouts it reads them as they are.

  Args:
    q: ``[B, Lq, Hkv, G, hd]`` queries (``G`` query heads share one kv head).
    k: ``[B, Hkv, S, hd]`` cached keys.
    v: ``[B, Hkv, hd, S]`` cached values.
    mask: ``[B, Lq, S]`` boolean; True where query may attend to key.
    scale: logit multiplier (``hd ** -0.5``).

  Returns:
    ``[B, Lq, Hkv, G, hd]`` in the dtype of ``q``.
  """
  return _gqa_softmax_attention(q, k, v, mask, scale, "bksd", "bkds")


def masked_softmax_attention(q, k, v, mask, *, scale: float):
  """Grouped-query attention with a boolean mask; softmax in float32.

  Args:
    q: ``[B, Lq, Hkv, G, hd]`` queries (``G`` query heads share one kv head).
    k: ``[B, S, Hkv, hd]`` keys.
    v: ``[B, S, Hkv, hd]`` values.
    mask: ``[B, Lq, S]`` boolean; True where query may attend to key.
    scale: logit multiplier (``hd ** -0.5``).

  Returns:
    ``[B, Lq, Hkv, G, hd]`` in the dtype of ``q``.
  """
  return _gqa_softmax_attention(q, k, v, mask, scale, "bskd", "bskd")


def local_segment_attention(q, k, v, segment_ids, *, block: int, scale: float):
  """Attention within segments, computed in bands of ``block`` rows instead of a dense ``[P, P]``.

  Exact when every segment is a contiguous run of at most ``block`` rows (the vision tower's
  windows and frames after window reordering): such a run spans at most two consecutive blocks,
  so each block of queries only needs the keys of itself and its two neighbours. Cost and memory
  are ``P * 3 * block`` scores instead of ``P * P``.

  Args:
    q, k, v: ``[P, H, hd]``.
    segment_ids: ``[P]`` int; a row attends to the rows with the same id (ids must be >= 0;
      rows of one id must be contiguous and at most ``block`` long, except a trailing padding
      segment, whose outputs are meaningless but finite).
    block: the longest segment, in rows.
    scale: logit multiplier.

  Returns:
    ``[P, H, hd]`` in the dtype of ``q``.
  """
  p, h, d = q.shape
  nb = -(-p // block)
  pad = nb * block - p
  seg = jnp.asarray(segment_ids, jnp.int32)
  if pad:
    q, k, v = (jnp.pad(t, ((0, pad), (0, 0), (0, 0))) for t in (q, k, v))
    seg = jnp.pad(seg, (0, pad), constant_values=-1)

  def bands(x, fill):
    x = x.reshape((nb, block) + x.shape[1:])
    edge = jnp.full((1,) + x.shape[1:], fill, x.dtype)
    prev = jnp.concatenate([edge, x[:-1]], axis=0)
    nxt = jnp.concatenate([x[1:], edge], axis=0)
    return jnp.concatenate([prev, x, nxt], axis=1)  # [nb, 3 * block, ...]

  kb, vb, segk = bands(k, 0), bands(v, 0), bands(seg, -2)
  qb, segq = q.reshape(nb, block, h, d), seg.reshape(nb, block)
  logits = jnp.einsum("nqhd,nkhd->nhqk", qb, kb, preferred_element_type=jnp.float32) * scale
  mask = segq[:, :, None] == segk[:, None, :]
  logits = jnp.where(mask[:, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("nhqk,nkhd->nqhd", probs, vb).reshape(nb * block, h, d)
  return out[:p]
