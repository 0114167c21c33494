"""GRPO's outcome advantages, one registered estimator per name (``ADVANTAGES``).

Each trajectory's advantage is its reward minus its group's mean, optionally divided by the
group's standard deviation (``grpo``; ``grpo_unnormalized`` is Dr. GRPO's unnormalised one).
The group population can be restricted with ``stats_mask`` (``masks.group_stats_mask``), the
population the masks' zero-variance test uses; and that test is the masks' own function
(``masks.zero_variance_groups``, one tolerance), so a group the loss mask drops as
zero-variance gets advantages of exactly 0 here too.

Shapes: ``R`` rows (trajectories); groups are contiguous rows (row ``r`` is in group
``r // group_size``).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from imagent_jax.registry import Registry
from imagent_jax.rl import masks


class AdvantageEstimator(NamedTuple):
  """A registered advantage estimator.

  Attributes:
    fn: ``fn(rewards [R], group_size, stats_mask [R] | None, eps, zero_variance_tol) -> [R]``.
    min_group_size: the smallest group the estimator gives a signal for (checked by
      ``grpo.GRPOConfig``).
  """
  fn: Callable[..., jax.Array]
  min_group_size: int


ADVANTAGES: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_advantage(name: str, min_group_size: int = 2):
  """Registers ``fn(rewards, group_size, stats_mask, eps, zero_variance_tol) -> [R]`` under ``name``."""
  return lambda fn: ADVANTAGES.add(name, AdvantageEstimator(fn, min_group_size)).fn


@functools.partial(jax.jit, static_argnames=("group_size", "normalize", "eps", "zero_variance_tol"))
def group_advantages(rewards, group_size: int, *, normalize: bool = True, stats_mask=None, eps: float = 1e-6,
                     zero_variance_tol: float = masks.ZERO_VARIANCE_TOL):
  """GRPO outcome advantages: reward minus group mean, optionally over the group std.

  ``A_r = (x_r - mean_g) / (std_g + eps)`` with ``normalize`` (the GRPO paper's estimator), else
  ``A_r = x_r - mean_g`` (Dr. GRPO's unnormalised one). Mean and std run over the group's rows in
  ``stats_mask`` only; std is the sample standard deviation (``ddof = 1``, as verl and Tunix
  compute it). A group without signal by ``masks.zero_variance_groups`` (counted rewards spanning
  at most ``zero_variance_tol``, or fewer than two counted rows) gives exactly 0 on all its rows,
  never NaN. Rows outside ``stats_mask`` get 0 (they are out of the loss anyway: they are the
  layer-2-masked trajectories).

  Args:
    rewards: ``[R]`` float total reward per trajectory.
    group_size: G (static); ``R`` must be a multiple of it.
    normalize: divide by the group std (static).
    stats_mask: ``[R]`` bool/float, the rows that count in the group statistics
      (``masks.group_stats_mask``), or None (all rows).
    eps: added to the std (static).
    zero_variance_tol: the zero-variance test's tolerance (static; ``MaskConfig.zero_variance_tol``).

  Returns:
    ``[R]`` float32 advantages.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} trajectories do not split into groups of group_size={group_size}")
  x = rewards.reshape(-1, group_size)  # [Gs, G]
  ok = (jnp.ones_like(x, bool) if stats_mask is None
        else jnp.asarray(stats_mask).reshape(-1, group_size).astype(bool))
  n = jnp.sum(ok, axis=1, keepdims=True)  # [Gs, 1]
  mean = jnp.sum(jnp.where(ok, x, 0.0), axis=1, keepdims=True) / jnp.maximum(n, 1)
  centred = jnp.where(ok, x - mean, 0.0)
  keep, _ = masks.zero_variance_groups(rewards, group_size, stats_mask, zero_variance_tol)
  signal = keep.reshape(-1, group_size) > 0  # [Gs, G], constant over a group
  if normalize:
    var = jnp.sum(centred ** 2, axis=1, keepdims=True) / jnp.maximum(n - 1, 1)
    centred = centred / (jnp.sqrt(var) + eps)
  return jnp.where(signal & ok, centred, 0.0).reshape(-1)


@register_advantage("grpo")
def _grpo_advantages(rewards, group_size, stats_mask, eps, zero_variance_tol):
  return group_advantages(rewards, group_size, normalize=True, stats_mask=stats_mask, eps=eps,
                          zero_variance_tol=zero_variance_tol)


@register_advantage("grpo_unnormalized")
def _grpo_unnormalized_advantages(rewards, group_size, stats_mask, eps, zero_variance_tol):
  return group_advantages(rewards, group_size, normalize=False, stats_mask=stats_mask, eps=eps,
                          zero_variance_tol=zero_variance_tol)


def compute_advantages(cfg, rewards, stats_mask=None, zero_variance_tol: float = masks.ZERO_VARIANCE_TOL):
  """``[R]`` advantages of ``rewards [R]`` by the estimator ``cfg.advantage``.

  Args:
    cfg: a ``grpo.GRPOConfig`` (``advantage``, ``group_size``, ``adv_eps``).
    rewards: ``[R]`` total rewards.
    stats_mask: ``[R]`` rows counted in the group statistics, or None (see ``group_advantages``).
    zero_variance_tol: the masks' tolerance (pass ``MaskConfig.zero_variance_tol``).

  Returns:
    ``[R]`` float32 advantages.
  """
  return ADVANTAGES[cfg.advantage].fn(rewards, cfg.group_size, stats_mask, cfg.adv_eps, zero_variance_tol)
