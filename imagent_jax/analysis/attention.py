"""Where a VLM's attention goes: the decoder's softmax attention probabilities.

``attention_probs(model_config, params, inputs, *, layers=None)`` runs the model's analysis variant
(``record_attention=True``: every decoder layer's probabilities are sown as intermediates, dense
math in float32) on a short input and returns them as ``[layers, batch, heads, length, length]``,
transformers' ``output_attentions=True`` layout (eager attention). It is for parity checks and
small plots: the array is ``heads x length^2`` per layer. The normal forward, sampler and rollout
are untouched (the variant is a separate program).
"""

from __future__ import annotations

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
