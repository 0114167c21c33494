"""The optimiser: AdamW behind global-norm clipping, on linear warmup then cosine decay.

Everything reads a ``grpo.GRPOConfig`` (``learning_rate``, ``warmup_steps``, ``total_steps``,
``end_lr_ratio``, ``weight_decay``, ``max_grad_norm``, ``b1``, ``b2``, ``adam_eps``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def lr_schedule(cfg) -> Callable[[Any], jax.Array]:
  """The learning rate at optimiser step ``step`` (0-based; jnp, works traced or concrete).

  Linear warmup reaching the peak on the last warmup step (``peak * (step + 1) / warmup_steps``,
  so the first update already moves), then half a cosine from the peak at ``step = warmup_steps``
  down to ``end_lr_ratio * peak`` at ``step = total_steps``, constant after.
  """
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
  warm, total = cfg.warmup_steps, cfg.total_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = peak * jnp.minimum((step + 1.0) / max(warm, 1), 1.0)
    progress = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warm, warmup, cosine)

  return schedule


def learning_rate(cfg, step) -> float:
  """``lr_schedule(cfg)(step)`` as a Python float, for logging."""
  return float(lr_schedule(cfg)(step))


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Global-norm clipping (``max_grad_norm``), then AdamW on ``lr_schedule(cfg)``."""
  parts = [] if cfg.max_grad_norm is None else [optax.clip_by_global_norm(cfg.max_grad_norm)]
  parts.append(optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def optimizer_step(opt_state) -> jax.Array:
  """The number of updates ``opt_state`` has applied (Adam's step count; skipped steps excluded)."""
  counts = [x for p, x in jax.tree_util.tree_leaves_with_path(opt_state)
            if p and getattr(p[-1], "name", None) == "count"]
  if not counts:
    raise ValueError("the optimiser state holds no step count")
  return counts[0]
