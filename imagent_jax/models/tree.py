"""Parameter pytrees of any family: counting, flattening to ``/``-joined paths, and the random
init rescaling used to train a small model from scratch."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

INITS = ("hf", "fan_in")


def count_params(params) -> int:
  """Number of scalars in a pytree of arrays (or ``ShapeDtypeStruct``)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': x}}`` -> ``{'a/b': x}`` (nested dicts only)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of ``flatten``."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def rescale_init(params, init: str = "fan_in", hf_std: float = 0.02):
  """Random parameters drawn with normal(``hf_std``) kernels, rescaled for training from scratch.

  The released models' ``initializer_range`` (0.02) is right for widths in the thousands, but at
  the tiny presets' widths (32-128) every layer shrinks its input about 5-10 times, and the image
  features reach the decoder ~0.001 apart from one image to the next, so a model trained from
  scratch learns to ignore them. ``"fan_in"`` redraws (by rescaling: the same distribution) every
  kernel ``[in, out]`` to normal(1/sqrt(in)), the LeCun init; embeddings, biases and norms are
  unchanged. ``"hf"`` returns ``params`` as they are.

  Args:
    params: random parameters (shardings kept).
    init: ``"hf"`` or ``"fan_in"``.
    hf_std: the std the kernels were drawn with.

  Returns:
    The rescaled parameter pytree.
  """
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  if init == "hf":
    return params

  def rescale(path, x):
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      return x * jnp.asarray(1.0 / (hf_std * np.sqrt(x.shape[0])), x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(rescale, params)
