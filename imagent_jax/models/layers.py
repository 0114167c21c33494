"""Building blocks shared by the vision tower and the text decoder.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) so that
``imagent_jax.parallel`` can shard it by a rule table; ``init_params`` strips the boxes, so the
parameter pytree a user sees is plain arrays.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_INIT_STD = 0.02
# A large finite negative instead of -inf, so that rows with nothing to attend to give a uniform
# softmax rather than NaN (padding rows; their outputs are never used).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Logit of the keys ``blocked_attention`` appends to fill its last block: below ``_MASK_VALUE``, so
# they take no weight even in a row that may attend to nothing (there, as in the dense path, the
# weight spreads evenly over the real keys).
_PAD_KEY_VALUE = -float(jnp.finfo(jnp.float32).max)


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


def attention_weights(q, k, mask, *, scale: float, k_axes: str = "bskd"):
  """The softmax attention probabilities of grouped-query attention (float32).

  Args:
    q: ``[B, Lq, Hkv, G, hd]`` queries (``G`` query heads share one kv head).
    k: ``[B, S, Hkv, hd]`` keys (``k_axes`` names another layout).
    mask: ``[B, Lq, S]`` boolean; True where query may attend to key.
    scale: logit multiplier (``hd ** -0.5``).
    k_axes: the einsum letters of ``k``'s layout.

  Returns:
    ``[B, Hkv, G, Lq, S]`` float32; query head ``h`` is ``[:, h // G, h % G]``.
  """
  logits = jnp.einsum(f"bqkgd,{k_axes}->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


def weighted_values(probs, v, *, v_axes: str = "bskd"):
  """``attention_weights``' probabilities ``[B, Hkv, G, Lq, S]`` applied to values -> ``[B, Lq, Hkv, G, hd]``."""
  return jnp.einsum(f"bkgqs,{v_axes}->bqkgd", probs.astype(v.dtype), v)


def attention_shares(q, k, v, mask, key_segments, *, scale: float, chunk: int = 512):
  """Grouped-query attention that also says where each query's attention goes, a chunk of queries at a time.

  For each chunk of ``chunk`` queries it takes ``attention_weights`` (float32), applies them to
  the values, and sums them over the keys of each segment, averaged over the query heads. Only one
  chunk's ``[B, Hkv, G, chunk, S]`` probabilities exist at once (``jax.lax.map``), never the
  ``[B, H, Lq, S]`` of the whole sequence: the attention analysis of a long trajectory
  (``analysis.attention.attention_shares``). Forward only (no custom backward).

  Args:
    q: ``[B, Lq, Hkv, G, hd]`` queries.
    k, v: ``[B, S, Hkv, hd]`` keys and values.
    mask: ``[B, Lq, S]`` boolean; True where query may attend to key.
    key_segments: ``[B, S, C]`` float32 one-hot: which of ``C`` segments each key belongs to (a
      row of zeros: counted nowhere, e.g. padding, which takes no weight anyway).
    scale: logit multiplier.
    chunk: queries per chunk (the last chunk is padded; padding is dropped).

  Returns:
    ``(out [B, Lq, Hkv, G, hd]`` in ``q``'s dtype, equal to ``masked_softmax_attention``;
    ``shares [B, Lq, C]`` float32: ``shares[b, i, c]`` is the head-mean of query ``i``'s attention
    mass on the keys of segment ``c``; over ``c`` it sums to 1 for a query that may attend to
    something when every key it may attend to is in a segment).
  """
  b, lq, hkv, g, hd = q.shape
  c = max(1, min(int(chunk), lq))
  n = -(-lq // c)
  pad = n * c - lq
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad)) + ((0, 0),) * 3)
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  segments = key_segments.astype(jnp.float32)

  def one(i):
    qi = jax.lax.dynamic_slice_in_dim(q, i * c, c, axis=1)
    mi = jax.lax.dynamic_slice_in_dim(mask, i * c, c, axis=1)
    probs = attention_weights(qi, k, mi, scale=scale)  # [B, Hkv, G, c, S]
    shares = jnp.einsum("bkgqs,bsc->bqc", probs, segments, preferred_element_type=jnp.float32) / (hkv * g)
    return weighted_values(probs, v), shares

  out, shares = jax.lax.map(one, jnp.arange(n))  # [n, B, c, Hkv, G, hd], [n, B, c, C]
  out = jnp.moveaxis(out, 0, 1).reshape((b, n * c) + out.shape[3:])[:, :lq]
  shares = jnp.moveaxis(shares, 0, 1).reshape(b, n * c, -1)[:, :lq]
  return out, shares


def _gqa_softmax_attention(q, k, v, mask, scale: float, k_axes: str, v_axes: str):
  """The one grouped-query attention; ``k_axes`` / ``v_axes`` name the key and value layouts."""
  return weighted_values(attention_weights(q, k, mask, scale=scale, k_axes=k_axes), v, v_axes=v_axes)


def cache_windows(slots: int, windows: int, multiple: int = 8) -> tuple[int, ...]:
  """The cache prefixes ``cached_attention`` chooses from: ``windows`` lengths spread evenly up
  to ``slots`` (rounded up to ``multiple``, duplicates dropped), increasing, the last ``slots``."""
  windows = max(int(windows), 1)
  step = -(-slots // windows)
  round_up = lambda n: -(-n // multiple) * multiple
  return tuple(sorted({min(slots, round_up(step * (i + 1))) for i in range(windows)}))  # the last is slots


def cached_attention(q, k, v, mask, *, scale: float, windows: int = 1, used=None):
  """``masked_softmax_attention`` over a KV cache kept in the layouts the two dots read.

  Keys are stored ``[B, Hkv, S, hd]`` and values ``[B, Hkv, hd, S]`` (the layout of
  ``qwen2_5_vl.init_cache``). With ``[B, S, Hkv, hd]`` XLA:CPU transposes every layer's whole
  cache on every decode step to feed its dot kernels; in these layouts it reads them as they are.

  With ``windows > 1`` and ``used`` given, only the first ``w`` slots are read, ``w`` the smallest
  of ``cache_windows(S, windows)`` that is at least ``used`` (one ``lax.switch`` branch per
  length): a decode loop's cache fills from the left, so early steps skip the empty slots
  (``mask`` must be False from slot ``used`` on). The result is the whole cache's up to the
  rounding of sums over fewer terms: masked keys take exactly zero weight either way.

  Args:
    q: ``[B, Lq, Hkv, G, hd]`` queries (``G`` query heads share one kv head).
    k: ``[B, Hkv, S, hd]`` cached keys.
    v: ``[B, Hkv, hd, S]`` cached values.
    mask: ``[B, Lq, S]`` boolean; True where query may attend to key.
    scale: logit multiplier (``hd ** -0.5``).
    windows: how many cache prefixes to choose from (1: always the whole cache).
    used: scalar int, the slots in use (may be traced): every key at or past it is masked.

  Returns:
    ``[B, Lq, Hkv, G, hd]`` in the dtype of ``q``.
  """
  attend = lambda w, q, k, v, mask: _gqa_softmax_attention(q, k[:, :, :w], v[..., :w], mask[..., :w], scale,
                                                           "bksd", "bkds")
  sizes = cache_windows(k.shape[2], windows)
  if used is None or len(sizes) == 1:
    return attend(k.shape[2], q, k, v, mask)
  branch = jnp.sum(jnp.asarray(used, jnp.int32) > jnp.asarray(sizes[:-1], jnp.int32))  # first size >= used
  return jax.lax.switch(branch, [functools.partial(attend, w) for w in sizes], q, k, v, mask)


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
  windows after window reordering): such a run spans at most two consecutive blocks,
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


# ------------------------------------------------------------------ attention implementations

# ``config.model.attention``: how the decoder attends when it runs over a whole sequence (training,
# log-probs, prefill). Decode steps (one query against a KV cache) always use ``cached_attention``.
ATTENTION_IMPLS = ("dense", "blocked", "xla", "cudnn")


def check_attention(implementation: str, *, backend: str | None = None, dtype: Any = None) -> None:
  """Raises ``ValueError`` unless ``implementation`` is one of ``ATTENTION_IMPLS`` and can run here.

  ``"cudnn"`` is cuDNN's fused flash attention: it needs a CUDA GPU (``backend``, default
  ``jax.default_backend()``, must be ``"gpu"``) and a 16-bit compute ``dtype`` (when given).
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention={implementation!r} is not one of {ATTENTION_IMPLS}")
  if implementation != "cudnn":
    return
  backend = backend or jax.default_backend()
  if backend != "gpu":
    raise ValueError(f"attention='cudnn' (cuDNN flash attention) needs a CUDA GPU, but JAX runs on {backend!r}; "
                     "use attention='blocked' (the same memory saving in plain jnp, on any backend)")
  if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"attention='cudnn' needs a bfloat16 or float16 compute dtype, not {jnp.dtype(dtype).name}")


def attention(q, k, v, mask, *, scale: float, implementation: str = "dense", block: int = 512):
  """Grouped-query attention over a whole sequence, by ``implementation`` (``ATTENTION_IMPLS``).

  Every implementation computes ``masked_softmax_attention`` (softmax in float32):

  * ``"dense"``: ``masked_softmax_attention`` itself; holds ``[B, H, Lq, S]`` float32 scores.
  * ``"blocked"``: ``blocked_attention``, ``block`` queries x ``block`` keys at a time with an
    online softmax and a recomputing backward pass: memory ``O((Lq + S) * hd + block**2)`` per
    row and head; any backend.
  * ``"xla"``: ``jax.nn.dot_product_attention(..., implementation="xla")`` with the mask.
  * ``"cudnn"``: ``jax.nn.dot_product_attention(..., implementation="cudnn")``, cuDNN's flash
    attention (GPU, 16-bit; ``check_attention``). It is told the mask as causal plus one run of
    real tokens per row (``causal_padded_attention``), so ``mask`` must be the decoder's
    ``causal_mask`` without a cache: ``S == Lq`` and each row's real tokens contiguous (left or
    right padding).

  Rows that may attend to nothing (padding queries) give finite outputs that callers ignore;
  they are the only outputs where implementations may differ.

  Args:
    q: ``[B, Lq, Hkv, G, hd]`` queries (``G`` query heads share one kv head).
    k: ``[B, S, Hkv, hd]`` keys.
    v: ``[B, S, Hkv, hd]`` values.
    mask: ``[B, Lq, S]`` boolean; True where query may attend to key.
    scale: logit multiplier (``hd ** -0.5``).
    implementation: one of ``ATTENTION_IMPLS``.
    block: the query and key block of ``"blocked"``.

  Returns:
    ``[B, Lq, Hkv, G, hd]`` in the dtype of ``q``.
  """
  if implementation == "dense":
    return masked_softmax_attention(q, k, v, mask, scale=scale)
  if implementation == "blocked":
    return blocked_attention(q, k, v, mask, scale=scale, block_q=block, block_k=block)
  if implementation == "xla":
    b, lq, hkv, g, hd = q.shape
    out = jax.nn.dot_product_attention(q.reshape(b, lq, hkv * g, hd), k, v, mask=mask[:, None], scale=scale,
                                       implementation="xla")
    return out.reshape(q.shape)
  if implementation == "cudnn":
    return causal_padded_attention(q, k, v, mask, scale=scale, implementation="cudnn")
  raise ValueError(f"attention={implementation!r} is not one of {ATTENTION_IMPLS}")


def causal_padded_attention(q, k, v, mask, *, scale: float, implementation: str = "cudnn"):
  """``jax.nn.dot_product_attention`` of the decoder's causal, padded self-attention, without a dense mask.

  A fused kernel's ``is_causal`` counts query and key positions from 0 and its sequence lengths
  cut rows at the right, while our rows may be left-padded. Each row is therefore rolled so that
  its real tokens start at slot 0 (rotary positions are already in ``q`` and ``k``, so moving
  the rows changes nothing else), attended with ``is_causal`` and ``query/key_value_seq_lengths``
  (the number of real tokens), and rolled back; padding queries give 0.

  Args:
    q: ``[B, L, Hkv, G, hd]``.
    k, v: ``[B, L, Hkv, hd]``.
    mask: ``[B, L, L]`` the decoder's ``causal_mask(attention_mask, L)``: its last row is the key
      mask, whose real tokens must be one contiguous run per row (left or right padding).
    scale: logit multiplier.
    implementation: ``"cudnn"``; ``"xla"`` runs the same expression on any backend (tests).

  Returns:
    ``[B, L, Hkv, G, hd]`` in the dtype of ``q``.
  """
  b, l, hkv, g, hd = q.shape
  key_mask = mask[:, -1, :]  # [B, L]: the last query sees every real key
  lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)  # [B]
  start = jnp.argmax(key_mask, axis=-1).astype(jnp.int32)  # [B] first real token (0 for an empty row)
  slots = jnp.arange(l, dtype=jnp.int32)
  gather = (slots[None, :] + start[:, None]) % l  # [B, L]: rolled slot i holds token start + i

  def roll(x, index):
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  out = jax.nn.dot_product_attention(roll(q, gather).reshape(b, l, hkv * g, hd), roll(k, gather), roll(v, gather),
                                     scale=scale, is_causal=True, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  out = jnp.where((slots[None, :] < lengths[:, None])[:, :, None, None], out, 0).astype(q.dtype)
  return roll(out.reshape(q.shape), (slots[None, :] - start[:, None]) % l)


def blocked_attention(q, k, v, mask, *, scale: float, block_q: int = 512, block_k: int = 512):
  """``masked_softmax_attention`` a block of queries and keys at a time (flash attention in ``jnp``).

  The forward pass walks ``block_k`` keys at a time for each block of ``block_q`` queries,
  keeping a running maximum, normaliser and weighted sum (an online softmax in float32); it saves
  only the output and each row's log-sum-exp. The backward pass (``jax.custom_vjp``) recomputes
  each block's probabilities from them, so neither pass ever holds more than one
  ``[B, Hkv, G, block_q, block_k]`` block of scores. Blocks whose mask is False everywhere (above
  the causal diagonal, all-padding) are skipped. Runs on any backend (``lax.scan`` / ``lax.cond``).

  Equal to the dense path up to float rounding for every row that may attend to at least one
  key; a row that may attend to nothing gets an average of the values of the blocks that were
  not skipped (finite; the dense path averages all values).

  Args:
    q: ``[B, Lq, Hkv, G, hd]`` queries.
    k: ``[B, S, Hkv, hd]`` keys.
    v: ``[B, S, Hkv, hd]`` values.
    mask: ``[B, Lq, S]`` boolean; True where query may attend to key.
    scale: logit multiplier.
    block_q, block_k: rows of a query / key block (at most ``Lq`` / ``S``; the last block is padded).

  Returns:
    ``[B, Lq, Hkv, G, hd]`` in the dtype of ``q``.
  """
  lq, s = q.shape[1], k.shape[1]
  bq, bk = max(1, min(block_q, lq)), max(1, min(block_k, s))
  pad_q, pad_k = -lq % bq, -s % bk
  if pad_q or pad_k:
    q = jnp.pad(q, ((0, 0), (0, pad_q)) + ((0, 0),) * 3)
    k = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad_q), (0, pad_k)))
  out = _blocked(q, k, v, mask.astype(bool), float(scale), bq, bk, s)
  return out[:, :lq]


def _block_logits(qi, kj, mask_ij, j, scale, bk, num_keys):
  """Scores ``[B, Hkv, G, bq, bk]`` float32 of one block: masked to ``_MASK_VALUE``, appended keys lower."""
  logits = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  real = j * bk + jnp.arange(bk) < num_keys  # [bk]
  fill = jnp.where(real, _MASK_VALUE, _PAD_KEY_VALUE).astype(jnp.float32)
  return jnp.where(mask_ij[:, None, None], logits, fill)


def _live_blocks(mask, bq, bk):
  """``[nq, nk]`` bool: the blocks where some row of some batch element may attend."""
  b, lq, s = mask.shape
  return jnp.any(mask.reshape(b, lq // bq, bq, s // bk, bk), axis=(0, 2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _blocked(q, k, v, mask, scale, bq, bk, num_keys):
  return _blocked_fwd(q, k, v, mask, scale, bq, bk, num_keys)[0]


def _blocked_fwd(q, k, v, mask, scale, bq, bk, num_keys):
  b, lq, hkv, g, hd = q.shape
  nq, nk = lq // bq, k.shape[1] // bk
  live = _live_blocks(mask, bq, bk)

  def query_block(i):
    qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)

    def key_block(carry, j):
      def update(carry):
        m, l, acc = carry  # [B, Hkv, G, bq] x2, [B, Hkv, G, bq, hd], float32
        kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
        mask_ij = jax.lax.dynamic_slice(mask, (0, i * bq, j * bk), (b, bq, bk))
        logits = _block_logits(qi, kj, mask_ij, j, scale, bk, num_keys)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        p = jnp.exp(logits - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

      return jax.lax.cond(live[i, j], update, lambda c: c, carry), None

    init = (jnp.full((b, hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, bq), jnp.float32),
            jnp.zeros((b, hkv, g, bq, hd), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(nk))
    seen = l > 0  # False only where every key block was skipped
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return jnp.einsum("bkgqd->bqkgd", out).astype(q.dtype), lse

  # Under a scan over layers (``layer_scan``) JAX linearises this forward pass too and would keep
  # every block's scores for it; the checkpoint keeps only each query block's inputs.
  out, lse = jax.lax.map(jax.checkpoint(query_block), jnp.arange(nq))  # [nq, B, bq, Hkv, G, hd], [nq, B, Hkv, G, bq]
  out = jnp.moveaxis(out, 0, 1).reshape(q.shape)
  lse = jnp.moveaxis(lse, 0, -2).reshape(b, hkv, g, lq)
  return out, (q, k, v, mask, out, lse)


def _blocked_bwd(scale, bq, bk, num_keys, residuals, dout):
  q, k, v, mask, out, lse = residuals
  b, lq, hkv, g, hd = q.shape
  nq, nk = lq // bq, k.shape[1] // bk
  live = _live_blocks(mask, bq, bk)
  dout = dout.astype(q.dtype)
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(jnp.float32), out.astype(jnp.float32))  # [B, Hkv, G, Lq]

  def key_block(dq, j):
    kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
    vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)

    def query_block(carry, i):
      def update(carry):
        dk, dv = carry  # [B, bk, Hkv, hd] float32
        qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
        doi = jax.lax.dynamic_slice_in_dim(dout, i * bq, bq, axis=1)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
        mask_ij = jax.lax.dynamic_slice(mask, (0, i * bq, j * bk), (b, bq, bk))
        p = jnp.exp(_block_logits(qi, kj, mask_ij, j, scale, bk, num_keys) - lse_i[..., None])
        dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), doi, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        ds = jnp.where(mask_ij[:, None, None], p * (dp - delta_i[..., None]), 0.0) * scale
        ds = ds.astype(q.dtype)
        dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
        return (dk, dv), dq_i

      skip = lambda c: (c, jnp.zeros((b, bq, hkv, g, hd), jnp.float32))
      return jax.lax.cond(live[i, j], update, skip, carry)

    zeros = jnp.zeros((b, bk, hkv, hd), jnp.float32)
    (dk, dv), dq_blocks = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(nq))
    return dq + jnp.moveaxis(dq_blocks, 0, 1).reshape(dq.shape), (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# ------------------------------------------------------------------------------ scanned layers


def layer_scan(layer: nn.Module, params: Sequence[Any], x, *args, remat: str = "none"):
  """Applies ``layer`` once per entry of ``params``, in order, as one ``lax.scan``.

  The entries (one layer's parameter tree each, all of the same structure) are stacked into
  ``[len(params), ...]`` arrays on the fly, so callers keep their per-layer parameter trees
  (``layers_0``, ``layers_1``, ...); the stacked arrays take the layers' sharding (with a leading
  unsharded layer axis) by XLA's propagation. Inside the loop each iteration gathers one layer's
  sharded weights and reduces its gradients, and XLA reuses one iteration's buffers for the next:
  memory stays flat in depth where an unrolled loop lets the compiler keep every layer's
  temporaries, and compile time no longer grows with depth.

  Args:
    layer: an unbound module (``parent=None``); ``layer.apply({'params': p}, x, *args)`` returns
      the next ``x`` (same shape and dtype), or a tuple whose first element is it.
    params: the layers' parameter trees.
    x: the carried activations.
    *args: inputs every layer gets unchanged (masks, rotary tables).
    remat: a ``REMAT_POLICIES`` name: what each iteration keeps for the backward pass.

  Returns:
    ``x`` after the last layer.
  """
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params)

  def body(h, p):
    out = layer.apply({"params": p}, h, *args)
    return (out[0] if isinstance(out, tuple) else out), None

  if remat_name(remat) != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_name(remat)], prevent_cse=False)
  x, _ = jax.lax.scan(body, x, stacked)
  return x


# ------------------------------------------------------------------------------ remat policies

# ``config.rl.remat``: what each decoder layer keeps for the backward pass. "none": everything
# (no rematerialisation); "full": only its inputs (the whole layer is recomputed); "dots": the
# results of its matmuls (``jax.checkpoint_policies.checkpoint_dots``; the elementwise work is
# recomputed); "dots_no_batch": the matmul results without batch dimensions, i.e. the projections
# but not the attention scores (``dots_with_no_batch_dims_saveable``).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(remat: bool | str) -> str:
  """The remat policy name of ``remat``: a ``REMAT_POLICIES`` name, or the old bools (False -> "none",
  True -> "full", also as the strings "False" / "True"); raises ``ValueError`` for anything else."""
  if isinstance(remat, bool) or remat is None:
    return "full" if remat else "none"
  if isinstance(remat, str) and remat.lower() in ("true", "false"):  # --config.rl.remat=True, as before
    return "full" if remat.lower() == "true" else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is not one of {tuple(REMAT_POLICIES)} (or a bool: False = 'none', "
                     "True = 'full')")
  return remat
