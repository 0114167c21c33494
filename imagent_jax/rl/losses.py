"""The policy loss: PPO's clipped surrogate (clip-higher) with optional k3 KL and entropy terms,
aggregated over tokens by a registered aggregation (``LOSS_AGGREGATIONS``).

``policy_loss`` is what ``grpo.train_step`` differentiates; it reads its clip ranges,
coefficients and aggregation from a ``grpo.GRPOConfig``. Shapes: ``R`` rows (trajectories),
``T`` tokens per row.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from imagent_jax.registry import Registry

# (per_token [R, T], mask [R, T] float) -> (total [], count []): the loss is total / max(count, 1).
LossAggregation = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation")

# An aggregation is a ratio whose count depends on the mask only: a minibatch cut into micro-batches
# (gradient accumulation) sums each part's total over the whole minibatch's count, and both
# registered aggregations are row-separable, so the count of the whole is the count of its rows
# stacked (``loss_normalizer``).


@LOSS_AGGREGATIONS.register("token_mean")
def _token_mean(per_token, mask):
  """Mean over every loss token of the minibatch: each token weighs the same (DAPO)."""
  return jnp.sum(per_token * mask), jnp.sum(mask)


@LOSS_AGGREGATIONS.register("seq_mean")
def _seq_mean(per_token, mask):
  """Mean over sequences of each sequence's token mean (the GRPO paper).

  Sequences without loss tokens (masked trajectories, dropped groups) are left out of the mean
  rather than counted as zeros, so masking does not shrink the loss of the rest.
  """
  row_tokens = jnp.sum(mask, axis=1)
  row_mean = jnp.sum(per_token * mask, axis=1) / jnp.maximum(row_tokens, 1.0)
  rows = (row_tokens > 0).astype(per_token.dtype)
  return jnp.sum(row_mean * rows), jnp.sum(rows)


def aggregate(name: str, per_token, mask, count=None):
  """``LOSS_AGGREGATIONS[name]``'s mean of ``per_token [R, T]`` over ``mask [R, T]``: its total over
  ``max(count, 1)``; ``count`` defaults to the aggregation's own (pass a whole minibatch's,
  ``loss_normalizer``, when ``per_token`` is one part of it)."""
  total, own = LOSS_AGGREGATIONS[name](per_token, mask)
  return total / jnp.maximum(own if count is None else count, 1.0)


def loss_normalizer(name: str, mask) -> tuple[jax.Array, jax.Array]:
  """``(count, tokens)`` of a whole minibatch: the aggregation's count and the number of loss
  tokens, for ``policy_loss(normalizer=...)``. ``mask`` is ``[R, T]`` or micro-batches stacked
  ``[k, R, T]`` (counted as their ``k * R`` rows)."""
  mask = jnp.asarray(mask, jnp.float32)
  mask = mask.reshape(-1, mask.shape[-1])
  return LOSS_AGGREGATIONS[name](jnp.zeros_like(mask), mask)[1], jnp.sum(mask > 0).astype(jnp.float32)


def policy_loss(logp, old_logp, advantages, mask, cfg, ref_logp=None, entropy=None, normalizer=None):
  """PPO-clip (clip-higher) GRPO loss with optional k3 KL and entropy terms.

  Per loss token, with ``ratio = exp(logp - old_logp)`` and ``A`` its row's advantage::

    pg  = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
    kl  = exp(ref - logp) - (ref - logp) - 1                 (k3; only with ``ref_logp``)
    loss_token = pg + kl_coef * kl - entropy_coef * entropy  (entropy only when given)

  then aggregated by ``LOSS_AGGREGATIONS[cfg.loss_agg]``. Positions with ``mask == 0`` never
  enter any arithmetic that could overflow: the log-ratios are zeroed there *before* ``exp`` (a
  masked prompt or image token may hold a log-prob of -1e30), so masked positions get exactly
  zero gradient and cannot turn the loss into NaN.

  Args:
    logp: ``[R, T]`` log-probs of the policy being trained.
    old_logp: ``[R, T]`` log-probs the rollout sampled with (constant).
    advantages: ``[R]`` per-trajectory advantages (constant).
    mask: ``[R, T]`` float loss mask (``masks.loss_mask``); non-zero entries weight tokens.
    cfg: a ``grpo.GRPOConfig`` (``clip_eps_low``, ``clip_eps_high``, ``loss_agg``, ``kl_coef``,
      ``entropy_coef``).
    ref_logp: ``[R, T]`` frozen reference log-probs, or None (no KL term; needs ``kl_coef == 0``
      to be meaningful — with a positive ``kl_coef`` it is an error).
    entropy: ``[R, T]`` entropies of the sampling distributions, or None. Given, it is reported
      (``entropy``) whatever ``entropy_coef``; it enters the loss only when ``entropy_coef != 0``.
    normalizer: ``(count, tokens)`` of the whole minibatch this is a part of
      (``loss_normalizer``), or None (this is the whole minibatch). Given, the loss and every
      metric but ``ratio_max`` are this part's share: summed over the parts, they are the whole
      minibatch's (gradient accumulation).

  Returns:
    ``(loss, metrics)``: the scalar loss and, as float32 scalars, ``loss``, ``pg_loss`` (the
    aggregated clipped surrogate), ``clip_fraction`` / ``clip_fraction_low`` /
    ``clip_fraction_high`` (share of loss tokens whose clipped branch is active: ratio above
    ``1 + eps_high`` with ``A > 0``, below ``1 - eps_low`` with ``A < 0``), ``approx_kl`` (k3
    estimate of KL(old || current) on the rollout's samples), ``ratio_mean``, ``ratio_max``,
    ``tokens`` (loss tokens), and ``kl`` / ``entropy`` when those inputs are given. ``entropy``
    is aggregated over loss tokens like the loss (``loss_agg``), so the bonus adds exactly
    ``-entropy_coef * entropy`` to the loss; all others but ``loss`` and ``pg_loss`` are token
    means over loss tokens, whatever the aggregation.
  """
  if cfg.kl_coef > 0 and ref_logp is None:
    raise ValueError(f"kl_coef={cfg.kl_coef} needs the reference log-probs (ref_logp)")
  mask = jnp.asarray(mask, jnp.float32)
  valid = mask > 0
  adv = jnp.asarray(advantages, jnp.float32)[:, None]  # [R, 1]
  log_ratio = jnp.where(valid, logp - jax.lax.stop_gradient(old_logp), 0.0)
  ratio = jnp.exp(log_ratio)
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
  pg = jnp.where(valid, jnp.maximum(-adv * ratio, -adv * clipped), 0.0)
  per_token = pg
  kl = None
  if ref_logp is not None:
    d = jnp.where(valid, jax.lax.stop_gradient(ref_logp) - logp, 0.0)
    kl = jnp.where(valid, jnp.exp(d) - d - 1.0, 0.0)
    if cfg.kl_coef > 0:
      per_token = per_token + cfg.kl_coef * kl
  ent = None
  if entropy is not None:
    ent = jnp.where(valid, entropy, 0.0)
    if cfg.entropy_coef != 0:
      per_token = per_token - cfg.entropy_coef * ent

  count, tokens = (None, jnp.sum(valid).astype(jnp.float32)) if normalizer is None else normalizer
  agg = lambda x, m: aggregate(cfg.loss_agg, x, m, count)
  loss = agg(per_token, mask)
  n = jnp.maximum(tokens, 1.0)
  tok_mean = lambda x: jnp.sum(jnp.where(valid, x, 0.0)) / n
  sg = jax.lax.stop_gradient
  high = valid & (adv > 0) & (ratio > 1.0 + cfg.clip_eps_high)
  low = valid & (adv < 0) & (ratio < 1.0 - cfg.clip_eps_low)
  metrics = {
      "loss": sg(loss),
      "pg_loss": sg(agg(pg, mask)),
      "clip_fraction": tok_mean(high | low),
      "clip_fraction_low": tok_mean(low),
      "clip_fraction_high": tok_mean(high),
      "approx_kl": sg(tok_mean(ratio - 1.0 - log_ratio)),
      "ratio_mean": sg(tok_mean(ratio)),
      "ratio_max": sg(jnp.max(jnp.where(valid, ratio, -jnp.inf), initial=0.0)),
      "tokens": jnp.sum(valid).astype(jnp.float32),
  }
  if kl is not None:
    metrics["kl"] = sg(tok_mean(kl))
  if ent is not None:
    metrics["entropy"] = sg(agg(ent, mask))
  return loss, metrics
