"""M-RoPE position ids: the one function that the processor, the sampler, the rollout and training use.

Qwen2.5-VL rotates each query/key with three position streams (temporal, height, width). Text tokens
advance all three together by one per token. The merged tokens of an image with grid ``(t, h, w)``
(``h' = h // merge``, ``w' = w // merge``) take ``base + (t_idx, h_idx, w_idx)``, where ``base`` is the
text position where the image starts, and the stream then continues at ``base + max(h', w')``.
This matches transformers' ``Qwen2_5_VLModel.get_rope_index`` for text, one image, many images and
left or right padding, and it is written in ``jnp`` with static shapes so that it also runs inside
the jitted rollout (``image_grid_thw`` is data, not a static argument).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("image_token_id", "spatial_merge_size"))
def mrope_positions(input_ids, attention_mask, image_grid_thw, *, image_token_id: int,
                    spatial_merge_size: int = 2, offset=None):
  """Computes M-RoPE positions for a (padded) batch.

  Args:
    input_ids: ``[B, L]`` int token ids; each image appears as a run of ``t*h'*w'`` image tokens.
      Images must be separated by at least one other token (the chat template wraps each one in
      ``<|vision_start|> … <|vision_end|>``).
    attention_mask: ``[B, L]`` 1 for real tokens, 0 for padding (left or right), or None.
    image_grid_thw: ``[N, 3]`` int ``(t, h, w)`` patch grid of every image in the batch, in order of
      appearance (row by row), or None for text only. Extra trailing rows (unused image slots) are
      ignored.
    image_token_id: id of the image placeholder token.
    spatial_merge_size: side of the patch merger (2 for Qwen2.5-VL).
    offset: optional ``[B]`` position at which each row's first real token sits (default 0):
      a chunk appended to a running sequence (a tool observation in the rollout) continues the
      stream where it stopped, exactly as if the whole sequence had been positioned at once.

  Returns:
    ``(positions [3, B, L] int32, deltas [B] int32)``. Padding positions are 0. ``deltas`` is
    ``max(position) + 1 - L`` per row, so the token decoded at cache index ``c`` has position
    ``c + delta`` on all three streams (transformers' ``rope_deltas``).
  """
  input_ids = jnp.asarray(input_ids)
  b, l = input_ids.shape
  valid = jnp.ones((b, l), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if image_grid_thw is None or np.shape(image_grid_thw)[0] == 0:
    grid = jnp.ones((1, 3), jnp.int32)
  else:
    grid = jnp.asarray(image_grid_thw, jnp.int32)
  is_img = (input_ids == image_token_id) & valid
  if image_grid_thw is None or np.shape(image_grid_thw)[0] == 0:
    is_img = jnp.zeros_like(is_img)

  prev = jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
  nxt = jnp.pad(is_img[:, 1:], ((0, 0), (0, 1)))
  run_start = is_img & ~prev
  run_end = is_img & ~nxt
  # Index of the image each token belongs to, counted over the whole batch in row-major order.
  img_idx = jnp.cumsum(run_start.reshape(-1)).reshape(b, l) - 1
  img_idx = jnp.clip(img_idx, 0, grid.shape[0] - 1)
  g = grid[img_idx]  # [B, L, 3]
  hh = g[..., 1] // spatial_merge_size
  ww = g[..., 2] // spatial_merge_size
  # Offset of each image token inside its run.
  ar = jnp.broadcast_to(jnp.arange(l), (b, l))
  start_at = jax.lax.cummax(jnp.where(run_start, ar, -1), axis=1)
  k = ar - start_at
  hw = jnp.maximum(hh * ww, 1)
  t_idx = k // hw
  h_idx = (k % hw) // jnp.maximum(ww, 1)
  w_idx = k % jnp.maximum(ww, 1)

  inc = jnp.where(is_img, jnp.where(run_end, jnp.maximum(hh, ww), 0), valid.astype(jnp.int32))
  base = jnp.cumsum(inc, axis=1) - inc  # exclusive cumsum: position where the token (or its image) starts
  pos = jnp.stack([base + jnp.where(is_img, t_idx, 0),
                   base + jnp.where(is_img, h_idx, 0),
                   base + jnp.where(is_img, w_idx, 0)])
  if offset is not None:
    pos = pos + jnp.asarray(offset, jnp.int32)[None, :, None]
  pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
  deltas = (jnp.max(jnp.where(valid[None], pos, -1), axis=(0, 2)) + 1 - l).astype(jnp.int32)
  return pos, deltas
