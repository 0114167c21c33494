"""Where a VLM's attention goes: the decoder's softmax attention probabilities.

``attention_probs(model_config, params, inputs, *, layers=None)`` runs the model's analysis variant
(``record_attention=True``: every decoder layer's probabilities are sown as intermediates, dense
math in float32) on a short input and returns them as ``[layers, batch, heads, length, length]``,
transformers' ``output_attentions=True`` layout (eager attention). It is for parity checks and
small plots: the array is ``heads x length^2`` per layer. The normal forward, sampler and rollout
are untouched (the variant is a separate program).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagent_jax.models import registry

_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def attention_probs(model_config, params, inputs: Mapping[str, Any], *,
                    layers: Optional[Sequence[int]] = None) -> np.ndarray:
  """The decoder's softmax attention probabilities of ``inputs``.

  Args:
    model_config: the model's config (any registered family).
    params: its parameters.
    inputs: as the model takes them: ``input_ids [B, L]``, ``attention_mask [B, L]`` (optional),
      ``pixel_values [P, D]`` and ``image_grid_thw [N, 3]`` (optional), numpy or jax arrays.
    layers: the decoder layers to return, in this order (default: all).

  Returns:
    ``[len(layers), B, heads, L, L]`` float32: entry ``[l, b, h, i, j]`` is the share of query
    ``i``'s attention that head ``h`` of layer ``l`` gives key ``j`` (rows of padding queries are
    meaningless; masked keys get 0).

  Raises:
    ValueError: an unknown input name or a layer index out of range.
  """
  unknown = sorted(set(inputs) - set(_INPUTS))
  if unknown:
    raise ValueError(f"unknown inputs {unknown}; the model takes {list(_INPUTS)}")
  n = model_config.num_hidden_layers
  layers = list(range(n)) if layers is None else [int(i) for i in layers]
  bad = [i for i in layers if not 0 <= i < n]
  if bad:
    raise ValueError(f"layers {bad} out of range: the decoder has {n} layers")
  module = registry.family_of(model_config).module(model_config, record_attention=True)
  arrays = {k: (None if v is None else jnp.asarray(v)) for k, v in inputs.items()}
  _, state = jax.jit(lambda p, x: module.apply({"params": p}, **x, mutable=["intermediates"]))(params, arrays)
  inter = state["intermediates"]
  out = []
  for i in layers:
    probs = np.asarray(inter[f"layers_{i}"]["self_attn"]["attention_probs"][0])  # sow keeps a tuple
    b, hkv, g, lq, s = probs.shape  # query head h = kv head h // G, index h % G (transformers' repeat_kv)
    out.append(probs.reshape(b, hkv * g, lq, s))
  return np.stack(out)


# ------------------------------------------------------------------------ shares of trajectories

# Key segments of a trajectory (``key_segments``): three fixed ones, then one per image in the
# order the images appear in the row (its prompt images, then the tool views that entered).
TEXT, GENERATED, TOOL_TEXT = 0, 1, 2
FIXED_SEGMENTS = ("text", "generated", "tool_text")
FIRST_IMAGE = len(FIXED_SEGMENTS)

# What the figures and metrics group the segments into. "text" is the system prompt and the
# question (with the chat template and the image markers around the prompt images); "tool_text"
# is every token after the prompt that the policy did not sample (tool responses, their image
# markers, the turn templates around them). The first five add up to 1.
CATEGORIES = ("text", "image", "generated", "tool_views", "tool_text")
# Overlapping views of the same mass: every image token (prompt images and tool views); "image" split
# into the prompt image holding the answer (the example's ``target_image``) and the others; the
# tool views cut from the asked image.
DETAIL = ("all_images", "asked_image", "other_images", "asked_views")


@functools.partial(jax.jit, static_argnums=0)
def _shares_program(model, params, inputs, key_segments):
  _, state = model.apply({"params": params}, **inputs, key_segments=key_segments, mutable=["intermediates"])
  inter = state["intermediates"]
  n = len([k for k in inter if k.startswith("layers_")])
  return jnp.stack([inter[f"layers_{i}"]["self_attn"]["attention_shares"][0] for i in range(n)])


def attention_shares(model, params, inputs: Mapping[str, Any], key_segments) -> np.ndarray:
  """Where each query's attention goes, per decoder layer: shares of its mass on key segments.

  Computed in-graph by the family's module with ``key_segments``: each layer attends
  ``model.attention_block`` queries at a time (``layers.attention_shares``) and keeps only
  ``[B, L, C]``, so memory is one chunk's ``[B, heads, chunk, L]`` probabilities plus
  ``[layers, B, L, C]``, never ``[layers, heads, L, L]``.

  Args:
    model: the family's module (``family.module``; its dtypes, and ``attention_block`` as the
      query chunk).
    params: its parameters.
    inputs: ``input_ids [B, L]``, ``attention_mask [B, L]``, ``pixel_values [P, D]``,
      ``image_grid_thw [N, 3]`` (the last two optional).
    key_segments: ``[B, L]`` int segment of each key (``-1``: none, e.g. padding), or ``[B, L, C]``
      one-hot float32.

  Returns:
    ``[layers, B, L, C]`` float32: entry ``[l, b, i, c]`` is the mean over heads of layer ``l``
    of the attention query ``i`` gives the keys of segment ``c`` (sums to 1 over ``c`` at every
    real query whose keys all have a segment; padding queries are meaningless).
  """
  unknown = sorted(set(inputs) - set(_INPUTS))
  if unknown:
    raise ValueError(f"unknown inputs {unknown}; the model takes {list(_INPUTS)}")
  seg = np.asarray(key_segments)
  if seg.ndim == 2:
    seg = one_hot(seg, int(seg.max(initial=-1)) + 1)
  ids = np.asarray(inputs["input_ids"])
  if seg.shape[:2] != ids.shape:
    raise ValueError(f"key_segments {seg.shape[:2]} do not match input_ids {ids.shape}")
  arrays = {k: (None if v is None else jnp.asarray(v)) for k, v in inputs.items()}
  return np.asarray(_shares_program(model, params, arrays, jnp.asarray(seg, jnp.float32)))


def one_hot(segments, num_segments: int) -> np.ndarray:
  """``[B, L]`` int segments (``-1``: none) -> ``[B, L, num_segments]`` float32 one-hot rows."""
  segments = np.asarray(segments)
  eye = np.concatenate([np.eye(num_segments, dtype=np.float32), np.zeros((1, num_segments), np.float32)])
  return eye[np.where(segments < 0, num_segments, segments)]


def key_segments(tokens, attention_mask, action_mask, *, prompt_len: int, image_token_id: int) -> np.ndarray:
  """The segment of every key of rollout rows (host side, numpy).

  Args:
    tokens, attention_mask, action_mask: ``[R, T]`` the rollout's arrays (``action_mask``: the
      tokens the policy sampled).
    prompt_len: columns ``[0, prompt_len)`` hold the (left-padded) prompts.
    image_token_id: the family's image placeholder token.

  Returns:
    ``[R, T]`` int32: ``TEXT`` for prompt tokens that are not image tokens, ``GENERATED`` for
    sampled tokens, ``TOOL_TEXT`` for the other tokens after the prompt, ``FIRST_IMAGE + k`` for
    the tokens of the row's ``k``-th image (0-based, in order: prompt images, then tool views),
    ``-1`` for padding.
  """
  tokens = np.asarray(tokens)
  real = np.asarray(attention_mask).astype(bool)
  is_img = (tokens == image_token_id) & real
  starts = is_img & ~np.concatenate([np.zeros_like(is_img[:, :1]), is_img[:, :-1]], axis=1)
  image_index = np.cumsum(starts, axis=1) - 1
  after = np.arange(tokens.shape[1])[None, :] >= prompt_len
  seg = np.where(after, np.where(np.asarray(action_mask).astype(bool), GENERATED, TOOL_TEXT), TEXT)
  seg = np.where(is_img, FIRST_IMAGE + image_index, seg)
  return np.where(real, seg, -1).astype(np.int32)
