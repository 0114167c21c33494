"""GRPO: group advantages, the PPO-clip policy loss and the (sharded) update step (DESIGN §3).

Pieces, each usable alone:

* ``group_advantages`` — GRPO's outcome advantages: each trajectory's reward minus its group's
  mean, optionally divided by the group's standard deviation (``ADVANTAGES`` registry:
  ``grpo`` / ``grpo_unnormalized``). The group population can be restricted with ``stats_mask``
  (``masks.group_stats_mask``), the same population ``masks.zero_variance_groups`` tests, so a
  group the mask drops as zero-variance gets advantages of exactly 0 here too.
* ``policy_loss`` — PPO's clipped surrogate with separate low/high clip ranges (DAPO's
  "clip-higher": ``1 - eps_low <= ratio <= 1 + eps_high``), an optional k3 KL penalty to a frozen
  reference and an optional entropy bonus, aggregated by a ``LOSS_AGGREGATIONS`` entry
  (``token_mean`` / ``seq_mean``).
* ``make_optimizer`` / ``lr_schedule`` — AdamW behind global-norm clipping, linear warmup then
  cosine decay.
* ``train_step`` — one optimiser step on one minibatch; the log-probs come from
  ``imagent_jax.rl.logprobs.token_logprobs``, the one training forward pass. A non-finite loss or
  gradient norm leaves params and optimiser state bit-identical and reports ``skipped = 1``.
* ``sharded_train_step`` — ``train_step`` jitted with shardings from ``imagent_jax.parallel`` and
  params / optimiser state donated.
* ``split_minibatches`` / ``update`` — several minibatch steps (``num_minibatches`` ×
  ``ppo_epochs``) per rollout batch, all against the rollout's sampling log-probs.

Minibatching and images. A rollout batch keeps the patches of all its images in one
``pixel_values [P, D]`` array, row by row (each row's prompt images, then its tool views), with
``image_grid_thw [N, 3]`` in the same order (``rollout.training_images``). Slicing rows therefore
means slicing a data-dependent, contiguous patch range per row, which is host work: ``update``
reshuffles the rows every epoch on the host (numpy, from ``rng``) and ``split_minibatches``
rebuilds each minibatch's own ``pixel_values`` / ``image_grid_thw``, padded to static budgets so
one compiled step serves every minibatch. Which images belong to which row is read from the
tokens themselves (the count of image placeholders in each row), so the caller passes nothing
beyond the batch arrays; a mismatch is a clear error before anything is compiled.

Shapes: ``R`` rows (trajectories), ``T`` tokens per row; groups are contiguous rows
(row ``r`` is in group ``r // group_size``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from imagent_jax import parallel
from imagent_jax.models.registry import family_of
from imagent_jax.rl import logprobs as logprobs_lib

Batch = Mapping[str, Any]

# ---------------------------------------------------------------------------------- advantages


class AdvantageEstimator(NamedTuple):
  """A registered advantage estimator.

  Attributes:
    fn: ``fn(rewards [R], group_size, stats_mask [R] | None, eps, zero_variance_tol) -> [R]``.
    min_group_size: the smallest group the estimator gives a signal for (checked by
      ``GRPOConfig``).
  """
  fn: Callable[..., jax.Array]
  min_group_size: int


ADVANTAGES: dict[str, AdvantageEstimator] = {}


def register_advantage(name: str, min_group_size: int = 2):
  """Registers ``fn(rewards, group_size, stats_mask, eps, zero_variance_tol) -> [R]`` under ``name``."""
  def wrap(fn):
    if name in ADVANTAGES:
      raise ValueError(f"advantage estimator {name!r} is already registered")
    ADVANTAGES[name] = AdvantageEstimator(fn, min_group_size)
    return fn
  return wrap


@functools.partial(jax.jit, static_argnames=("group_size", "normalize", "eps", "zero_variance_tol"))
def group_advantages(rewards, group_size: int, *, normalize: bool = True, stats_mask=None, eps: float = 1e-6,
                     zero_variance_tol: float = 1e-6):
  """GRPO outcome advantages: reward minus group mean, optionally over the group std.

  ``A_r = (x_r - mean_g) / (std_g + eps)`` with ``normalize`` (the GRPO paper's estimator), else
  ``A_r = x_r - mean_g`` (Dr. GRPO's unnormalised one). Mean and std run over the group's rows in
  ``stats_mask`` only; std is the sample standard deviation (``ddof = 1``, as verl and Tunix
  compute it). A group whose counted rewards span at most ``zero_variance_tol`` (all equal), or
  that counts fewer than two rows, gives exactly 0 on all its rows — the same test as
  ``masks.zero_variance_groups``, so the two agree — and never NaN. Rows outside ``stats_mask``
  get 0 (they are out of the loss anyway: they are the layer-2-masked trajectories).

  Args:
    rewards: ``[R]`` float total reward per trajectory.
    group_size: G (static); ``R`` must be a multiple of it.
    normalize: divide by the group std (static).
    stats_mask: ``[R]`` bool/float, the rows that count in the group statistics
      (``masks.group_stats_mask``), or None (all rows).
    eps: added to the std (static).
    zero_variance_tol: groups with ``max - min <= tol`` over counted rows get 0 (static).

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
  hi = jnp.max(jnp.where(ok, x, -jnp.inf), axis=1, keepdims=True)
  lo = jnp.min(jnp.where(ok, x, jnp.inf), axis=1, keepdims=True)
  signal = (n >= 2) & (hi - lo > zero_variance_tol)
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


# -------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
  """Static GRPO config (hashable: a static argument of ``jit``), validated at construction.

  Attributes:
    group_size: rollouts per prompt (G).
    advantage: a key of ``ADVANTAGES``.
    adv_eps: added to the group std by normalised estimators.
    zero_variance_tol: reward spread at or below which a group has no signal (advantages 0);
      keep it equal to ``MaskConfig.zero_variance_tol``.
    clip_eps_low: PPO clip range below 1 (``ratio >= 1 - clip_eps_low`` for negative advantages).
    clip_eps_high: PPO clip range above 1 (DAPO clip-higher; ``ratio <= 1 + clip_eps_high`` for
      positive advantages).
    loss_agg: a key of ``LOSS_AGGREGATIONS``.
    kl_coef: weight of the k3 KL estimate to a frozen reference (0 = no reference needed).
    entropy_coef: weight of the entropy bonus (the loss subtracts ``entropy_coef * entropy``);
      non-zero makes the step compute entropies.
    temperature: the rollout's sampling temperature; log-probs are taken under it.
    learning_rate: peak learning rate.
    warmup_steps: linear warmup steps (optimiser steps, i.e. minibatch updates).
    total_steps: step at which the cosine decay reaches ``end_lr_ratio * learning_rate``.
    end_lr_ratio: final learning rate as a fraction of the peak.
    weight_decay: AdamW decoupled weight decay.
    max_grad_norm: global-norm gradient clipping; None disables it.
    b1, b2, adam_eps: Adam moments and epsilon.
    num_minibatches: optimiser steps per pass over a rollout batch.
    ppo_epochs: passes over each rollout batch.
  """
  group_size: int
  advantage: str = "grpo"
  adv_eps: float = 1e-6
  zero_variance_tol: float = 1e-6
  clip_eps_low: float = 0.2
  clip_eps_high: float = 0.28
  loss_agg: str = "token_mean"
  kl_coef: float = 0.0
  entropy_coef: float = 0.0
  temperature: float = 1.0
  learning_rate: float = 1e-6
  warmup_steps: int = 0
  total_steps: int = 1000
  end_lr_ratio: float = 0.0
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8
  num_minibatches: int = 1
  ppo_epochs: int = 1

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"GRPOConfig: {msg}")

    if int(self.group_size) != self.group_size or self.group_size < 1:
      fail(f"group_size must be a positive integer, got {self.group_size!r}")
    if self.advantage not in ADVANTAGES:
      fail(f"unknown advantage {self.advantage!r}; registered: {sorted(ADVANTAGES)}")
    need = ADVANTAGES[self.advantage].min_group_size
    if self.group_size < need:
      fail(f"group_size={self.group_size} with advantage={self.advantage!r}: the group baseline needs at least "
           f"{need} rollouts per prompt (with one, the std is undefined and every advantage is 0)")
    if self.loss_agg not in LOSS_AGGREGATIONS:
      fail(f"unknown loss_agg {self.loss_agg!r}; registered: {sorted(LOSS_AGGREGATIONS)}")
    if not 0.0 <= self.clip_eps_low < 1.0:
      fail(f"clip_eps_low must be in [0, 1), got {self.clip_eps_low!r}")
    if not self.clip_eps_high >= 0.0:
      fail(f"clip_eps_high must be >= 0, got {self.clip_eps_high!r}")
    if not self.kl_coef >= 0.0:
      fail(f"kl_coef must be >= 0, got {self.kl_coef!r}")
    if not math.isfinite(self.entropy_coef):
      fail(f"entropy_coef must be finite, got {self.entropy_coef!r}")
    if not self.temperature >= 0.0:
      fail(f"temperature must be >= 0 (0 reads as 1), got {self.temperature!r}")
    if not self.learning_rate > 0.0:
      fail(f"learning_rate must be > 0, got {self.learning_rate!r}")
    if self.warmup_steps < 0 or self.total_steps < 1 or self.warmup_steps > self.total_steps:
      fail(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got warmup_steps={self.warmup_steps}, "
           f"total_steps={self.total_steps}")
    if not 0.0 <= self.end_lr_ratio <= 1.0:
      fail(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio!r}")
    if not self.weight_decay >= 0.0:
      fail(f"weight_decay must be >= 0, got {self.weight_decay!r}")
    if self.max_grad_norm is not None and not self.max_grad_norm > 0.0:
      fail(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
    if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0 and self.adam_eps > 0.0):
      fail(f"need 0 <= b1, b2 < 1 and adam_eps > 0, got b1={self.b1}, b2={self.b2}, adam_eps={self.adam_eps}")
    if not self.adv_eps >= 0.0 or not self.zero_variance_tol >= 0.0:
      fail("adv_eps and zero_variance_tol must be >= 0")
    for name in ("num_minibatches", "ppo_epochs"):
      if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
        fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")


def compute_advantages(cfg: GRPOConfig, rewards, stats_mask=None):
  """``[R]`` advantages of ``rewards [R]`` by ``cfg.advantage`` (``stats_mask``: see ``group_advantages``)."""
  return ADVANTAGES[cfg.advantage].fn(rewards, cfg.group_size, stats_mask, cfg.adv_eps, cfg.zero_variance_tol)


# ------------------------------------------------------------------------------------- the loss

LossAggregation = Callable[[jax.Array, jax.Array], jax.Array]  # (per_token [R, T], mask [R, T]) -> []
LOSS_AGGREGATIONS: dict[str, LossAggregation] = {}


def register_loss_agg(name: str):
  """Registers ``fn(per_token [R, T], mask [R, T] float) -> scalar`` under ``name``."""
  def wrap(fn):
    if name in LOSS_AGGREGATIONS:
      raise ValueError(f"loss aggregation {name!r} is already registered")
    LOSS_AGGREGATIONS[name] = fn
    return fn
  return wrap


@register_loss_agg("token_mean")
def _token_mean(per_token, mask):
  """Mean over every loss token of the minibatch: each token weighs the same (DAPO)."""
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@register_loss_agg("seq_mean")
def _seq_mean(per_token, mask):
  """Mean over sequences of each sequence's token mean (the GRPO paper).

  Sequences without loss tokens (masked trajectories, dropped groups) are left out of the mean
  rather than counted as zeros, so masking does not shrink the loss of the rest.
  """
  row_tokens = jnp.sum(mask, axis=1)
  row_mean = jnp.sum(per_token * mask, axis=1) / jnp.maximum(row_tokens, 1.0)
  rows = (row_tokens > 0).astype(per_token.dtype)
  return jnp.sum(row_mean * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def policy_loss(logp, old_logp, advantages, mask, cfg: GRPOConfig, ref_logp=None, entropy=None):
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
    cfg: the config (clip ranges, aggregation, coefficients).
    ref_logp: ``[R, T]`` frozen reference log-probs, or None (no KL term; needs ``kl_coef == 0``
      to be meaningful — with a positive ``kl_coef`` it is an error).
    entropy: ``[R, T]`` entropies of the sampling distributions, or None.

  Returns:
    ``(loss, metrics)``: the scalar loss and, as float32 scalars, ``loss``, ``pg_loss`` (the
    aggregated clipped surrogate), ``clip_fraction`` / ``clip_fraction_low`` /
    ``clip_fraction_high`` (share of loss tokens whose clipped branch is active: ratio above
    ``1 + eps_high`` with ``A > 0``, below ``1 - eps_low`` with ``A < 0``), ``approx_kl`` (k3
    estimate of KL(old || current) on the rollout's samples), ``ratio_mean``, ``ratio_max``,
    ``tokens`` (loss tokens), and ``kl`` / ``entropy`` when those inputs are given. All but
    ``loss`` and ``pg_loss`` are token means over loss tokens, whatever the aggregation.
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

  agg = LOSS_AGGREGATIONS[cfg.loss_agg]
  loss = agg(per_token, mask)
  n = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
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
    metrics["entropy"] = sg(tok_mean(ent))
  return loss, metrics


# ---------------------------------------------------------------------------------- optimiser


def lr_schedule(cfg: GRPOConfig) -> Callable[[Any], jax.Array]:
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


def learning_rate(cfg: GRPOConfig, step) -> float:
  """``lr_schedule(cfg)(step)`` as a Python float, for logging."""
  return float(lr_schedule(cfg)(step))


def make_optimizer(cfg: GRPOConfig) -> optax.GradientTransformation:
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


# --------------------------------------------------------------------------------- train step

BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "advantages", "old_logp")
OPTIONAL_KEYS = ("ref_logp", "pixel_values", "image_grid_thw")


def _check_batch(batch: Batch, cfg: GRPOConfig) -> None:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"the GRPO batch lacks {missing}; it needs {list(BATCH_KEYS)} (+ {list(OPTIONAL_KEYS)})")
  unknown = sorted(set(batch) - set(BATCH_KEYS) - set(OPTIONAL_KEYS))
  if unknown:
    raise ValueError(f"unknown GRPO batch fields {unknown}")
  if cfg.kl_coef > 0 and batch.get("ref_logp") is None:
    raise ValueError(f"kl_coef={cfg.kl_coef} needs batch['ref_logp'] (the frozen reference's log-probs)")


def grpo_loss(model, cfg: GRPOConfig, params, batch: Batch):
  """``(loss, metrics)`` of ``params`` on one minibatch; log-probs from ``token_logprobs``.

  Args:
    model: the model (the family's module).
    cfg: the GRPO config.
    params: parameters (differentiated).
    batch: see ``train_step``.
  """
  with_entropy = cfg.entropy_coef != 0
  out = logprobs_lib.token_logprobs(model, params, batch["tokens"], batch["attention_mask"], batch.get("pixel_values"),
                                    batch.get("image_grid_thw"), temperature=cfg.temperature, with_entropy=with_entropy)
  logp, entropy = out if with_entropy else (out, None)
  return policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"], cfg,
                     ref_logp=batch.get("ref_logp"), entropy=entropy)


def train_step(model, cfg: GRPOConfig, params, opt_state, batch: Batch):
  """One optimiser step on one minibatch; jit with ``static_argnums=(0, 1)`` (see ``jit_train_step``).

  A non-finite loss or gradient norm skips the update: the new params and optimiser state are
  selected with ``jnp.where`` against the old ones, so a skipped step returns them bit-identical
  (the optimiser's step count, and so the schedule, do not advance either).

  Args:
    model: the model (the family's module) (static).
    cfg: the GRPO config (static).
    params: parameters.
    opt_state: ``make_optimizer(cfg).init(params)``.
    batch: dict with ``tokens [R, T]`` int, ``attention_mask [R, T]``, ``loss_mask [R, T]`` float
      (``masks.loss_mask``), ``advantages [R]``, ``old_logp [R, T]`` (the rollout's sampling
      log-probs), optionally ``ref_logp [R, T]``, and the minibatch's images ``pixel_values [P, D]``
      and ``image_grid_thw [N, 3]`` (absent or None for a text-only batch).

  Returns:
    ``(params, opt_state, metrics)``; metrics are ``policy_loss``'s plus ``grad_norm`` (before
    clipping), ``learning_rate`` (used by this step), ``skipped`` (1.0 when skipped, else 0.0).
  """
  _check_batch(batch, cfg)
  tx = make_optimizer(cfg)
  (loss, metrics), grads = jax.value_and_grad(lambda p: grpo_loss(model, cfg, p, batch), has_aux=True)(params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep_new = lambda new, old: jnp.where(finite, new, old)
  metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(cfg)(optimizer_step(opt_state)),
                 skipped=1.0 - finite.astype(jnp.float32))
  return (jax.tree_util.tree_map(keep_new, new_params, params),
          jax.tree_util.tree_map(keep_new, new_opt_state, opt_state), metrics)


def jit_train_step(model, cfg: GRPOConfig, donate: bool = False, jit_kwargs: Mapping[str, Any] | None = None):
  """``train_step`` jitted for one model and config: ``step(params, opt_state, batch)``.

  Args:
    model: the model (the family's module).
    cfg: the GRPO config.
    donate: donate params and optimiser state (the caller must not reuse what it passed in).
    jit_kwargs: extra ``jax.jit`` arguments (e.g. ``compiler_options``).
  """
  fn = functools.partial(train_step, model, cfg)
  return jax.jit(fn, donate_argnums=(0, 1) if donate else (), **dict(jit_kwargs or {}))


# ----------------------------------------------------------------------------------- sharding


def opt_state_shardings(cfg: GRPOConfig, model_config, mesh: Mesh, rules=None):
  """``NamedSharding`` pytree of ``make_optimizer(cfg)``'s state: moments like their params, scalars replicated."""
  return parallel.optimizer_state_shardings(make_optimizer(cfg), model_config, mesh, rules)


def sharded_train_step(model, cfg: GRPOConfig, mesh: Mesh, rules=None, jit_kwargs: Mapping[str, Any] | None = None):
  """``step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted with shardings.

  Params and optimiser state are sharded by ``parallel.param_shardings`` (in and out) and donated;
  batch rows go over ``('data', 'fsdp')`` when the row count divides that product (replicated
  otherwise), images are replicated, metrics come back replicated. One compiled program per
  batch layout (set of fields and row count), cached. Calls with equal ``model``, ``cfg``,
  ``mesh`` and ``rules`` (and no ``jit_kwargs``) return the same step
  (``parallel.cached_by_settings``), so a second ``Trainer`` of the same run settings in one
  process (a notebook, a resume) reuses its compiled programs.

  Args:
    model: the model (the family's module).
    cfg: the GRPO config.
    mesh: the device mesh (``parallel.make_mesh``).
    rules: logical-axis rules (default ``parallel.DEFAULT_RULES``).
    jit_kwargs: extra ``jax.jit`` arguments (e.g. ``compiler_options``); a dict of them makes a
      step that is not shared.

  Returns:
    The step function, with attributes ``param_shardings`` and ``opt_state_shardings`` (to
    ``jax.device_put`` a state onto; the step donates what it is given, and ``device_put`` may
    alias a replicated leaf with its source, so pass arrays nothing else still uses).
  """
  return _train_step_for(model, cfg, mesh, rules, jit_kwargs)


@parallel.cached_by_settings
def _train_step_for(model, cfg: GRPOConfig, mesh: Mesh, rules, jit_kwargs):
  return parallel.sharded_state_step(functools.partial(train_step, model, cfg), mesh,
                                     parallel.param_shardings(model.config, mesh, rules),
                                     opt_state_shardings(cfg, model.config, mesh, rules), jit_kwargs)


# ------------------------------------------------------------------------- minibatches, update


def row_image_spans(tokens, attention_mask, image_grid_thw, *, image_token_id: int, merge_unit: int):
  """Which images (and patches) each row owns, read from the rows' image placeholder counts.

  Images are laid out row by row (``rollout.training_images``): row ``r`` owns the next images
  of ``image_grid_thw`` whose merged features add up to its placeholder count.

  Args:
    tokens: ``[R, T]`` int (numpy).
    attention_mask: ``[R, T]``.
    image_grid_thw: ``[N, 3]``; all-zero rows are unused slots (at the end).
    image_token_id: the placeholder id.
    merge_unit: patches per merged feature (``vision.merge_unit``).

  Returns:
    ``[(first_image, end_image, first_patch, end_patch)]``, one per row.

  Raises:
    ValueError: the placeholders and the grids do not line up.
  """
  tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask).astype(bool)
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  patches = grid.prod(-1)
  need = ((tokens == image_token_id) & attention_mask).sum(1)
  spans, img, patch = [], 0, 0
  for r, n_feat in enumerate(need):
    first_img, first_patch, got = img, patch, 0
    while got < n_feat and img < len(grid) and patches[img] > 0:
      got += patches[img] // merge_unit
      patch += patches[img]
      img += 1
    if got != n_feat:
      raise ValueError(f"row {r} has {n_feat} image placeholder tokens but its images give {got} merged features: "
                       "pixel_values/image_grid_thw must hold each row's images contiguously, in row order")
    spans.append((first_img, img, first_patch, patch))
  if np.any(patches[img:] > 0):
    raise ValueError(f"image_grid_thw holds {int((patches[img:] > 0).sum())} images no row has placeholders for")
  return spans


def trim_padding_columns(batch: Batch, multiple: int = 256) -> dict[str, np.ndarray]:
  """Host-side: drops the leading and trailing columns that are padding in every row.

  A rollout batch is laid out at its static budget (left-padded prompt, right-padded response);
  most of it is padding early in training. Keeping only the used span, rounded up to a multiple
  of ``multiple`` (so a run compiles a few widths, not one per step), cuts the training pass's
  attention cost. Log-probs and M-RoPE positions do not change: positions come from the
  attention mask, and only all-padding columns go.

  Args:
    batch: ``train_step`` fields (and any other per-token ``[R, T]`` arrays, such as an action
      mask); every 2-D field except ``pixel_values`` / ``image_grid_thw`` is cut the same way.
    multiple: width granularity; 0 keeps the batch as it is.

  Returns:
    the batch with ``[R, T']`` fields, ``T' <= T``.
  """
  host = {k: (None if v is None else np.asarray(v)) for k, v in batch.items()}
  width_all = host["tokens"].shape[1]
  used = host["attention_mask"].astype(bool).any(axis=0)
  if multiple <= 0 or not used.any():
    return host
  first = int(np.argmax(used))
  last = width_all - 1 - int(np.argmax(used[::-1]))
  width = min(width_all, -(-(last - first + 1) // multiple) * multiple)
  start = min(first, width_all - width)
  cut = lambda v: v[:, start:start + width]
  per_token = lambda k, v: v is not None and k not in ("pixel_values", "image_grid_thw") and v.ndim == 2
  return {k: (cut(v) if per_token(k, v) else v) for k, v in host.items()}


def split_minibatches(batch: Batch, num_minibatches: int, *, image_token_id: int, merge_unit: int, perm=None,
                      patch_budget: int | None = None, image_slots: int | None = None) -> list[dict[str, np.ndarray]]:
  """Host-side: splits a rollout batch into minibatches of whole rows, each with its own images.

  Args:
    batch: the ``train_step`` fields for all ``R`` rows (numpy or jax), images laid out row by row
      (``pixel_values`` None for a text-only batch).
    num_minibatches: must divide ``R``.
    image_token_id: the model's image placeholder id.
    merge_unit: patches per merged image feature.
    perm: ``[R]`` row order (a shuffle); minibatch ``k`` takes ``perm[k*R/M:(k+1)*R/M]``.
    patch_budget: static ``pixel_values`` length of every minibatch (default: the batch's own
      ``pixel_values`` length, which always fits). Pass about ``P / num_minibatches`` plus slack
      to save vision compute.
    image_slots: static ``image_grid_thw`` length (default: the batch's).

  Returns:
    ``num_minibatches`` dicts of numpy arrays with the same fields.

  Raises:
    ValueError: rows do not divide, placeholders and grids disagree, or a minibatch's images do
      not fit the budgets.
  """
  host = {k: np.asarray(v) for k, v in batch.items() if v is not None}
  rows = host["tokens"].shape[0]
  if num_minibatches < 1 or rows % num_minibatches:
    raise ValueError(f"{rows} rows do not split into {num_minibatches} minibatches")
  perm = np.arange(rows) if perm is None else np.asarray(perm)
  if sorted(perm.tolist()) != list(range(rows)):
    raise ValueError(f"perm must be a permutation of the {rows} rows")
  size = rows // num_minibatches
  chunks = [perm[k * size:(k + 1) * size] for k in range(num_minibatches)]
  if "pixel_values" not in host:  # a text-only batch
    if np.any((host["tokens"] == image_token_id) & host["attention_mask"].astype(bool)):
      raise ValueError("the batch has image placeholder tokens but no pixel_values")
    return [{key: v[idx] for key, v in host.items()} for idx in chunks]
  pv, grid = host["pixel_values"], host["image_grid_thw"].reshape(-1, 3)
  patch_budget = pv.shape[0] if patch_budget is None else int(patch_budget)
  image_slots = grid.shape[0] if image_slots is None else int(image_slots)
  if patch_budget % merge_unit:
    raise ValueError(f"patch_budget={patch_budget} must be a multiple of merge_unit={merge_unit}")
  spans = row_image_spans(host["tokens"], host["attention_mask"], grid, image_token_id=image_token_id,
                          merge_unit=merge_unit)
  out = []
  for k, idx in enumerate(chunks):
    mb = {key: v[idx] for key, v in host.items() if key not in ("pixel_values", "image_grid_thw")}
    mb_pv = np.concatenate([pv[:0]] + [pv[spans[r][2]:spans[r][3]] for r in idx])
    mb_grid = np.concatenate([grid[:0]] + [grid[spans[r][0]:spans[r][1]] for r in idx])
    if len(mb_pv) > patch_budget or len(mb_grid) > image_slots:
      raise ValueError(f"minibatch {k} needs {len(mb_pv)} patches in {len(mb_grid)} images; the budgets are "
                       f"patch_budget={patch_budget}, image_slots={image_slots}")
    mb["pixel_values"] = np.concatenate([mb_pv, np.zeros((patch_budget - len(mb_pv), pv.shape[1]), pv.dtype)])
    mb["image_grid_thw"] = np.concatenate([mb_grid, np.zeros((image_slots - len(mb_grid), 3), grid.dtype)])
    out.append(mb)
  return out


def update(model, cfg: GRPOConfig, params, opt_state, batch: Batch, rng, *, step_fn: Callable | None = None,
           patch_budget: int | None = None, image_slots: int | None = None):
  """All optimiser steps for one rollout batch: ``ppo_epochs`` passes of ``num_minibatches`` steps.

  Host loop. Each epoch shuffles the rows (a permutation drawn from ``fold_in(rng, epoch)``),
  ``split_minibatches`` builds each minibatch with its own images, and ``step_fn`` runs one
  ``train_step`` on it. Every step is taken against the rollout's stored sampling log-probs
  (``old_logp``), so from the second step on the PPO ratio and clipping are active.

  Args:
    model: the model (the family's module).
    cfg: the GRPO config.
    params: parameters (donated when ``step_fn`` donates).
    opt_state: optimiser state.
    batch: the ``train_step`` fields for the whole rollout batch (images row by row).
    rng: PRNG key for the shuffles.
    step_fn: ``(params, opt_state, minibatch) -> (params, opt_state, metrics)``; default
      ``jit_train_step(model, cfg)`` (build it once and pass it to avoid re-tracing per call, or
      pass ``sharded_train_step(...)``).
    patch_budget, image_slots: static image budgets of a minibatch (see ``split_minibatches``).

  Returns:
    ``(params, opt_state, metrics)``: metrics averaged over the steps (numpy scalars), except
    ``skipped``, the number of skipped steps, plus ``steps`` (steps taken).
  """
  step_fn = step_fn or jit_train_step(model, cfg)
  rows = int(np.shape(batch["tokens"])[0])
  history = []
  for epoch in range(cfg.ppo_epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), rows))
    family = family_of(model.config)
    minibatches = split_minibatches(batch, cfg.num_minibatches, image_token_id=family.image_token_id(model.config),
                                    merge_unit=family.geometry(model.config).merge_unit, perm=perm,
                                    patch_budget=patch_budget, image_slots=image_slots)
    for mb in minibatches:
      params, opt_state, metrics = step_fn(params, opt_state, mb)
      history.append(metrics)
  history = jax.device_get(history)
  out = {k: np.mean([m[k] for m in history]) for k in history[0]}
  out["skipped"] = np.sum([m["skipped"] for m in history])
  out["steps"] = np.float32(len(history))
  return params, opt_state, out
