"""GRPO: the config, the loss of one minibatch and the (sharded) update step (DESIGN §3).

The concepts live in their own modules — advantages (``rl.advantages``), the PPO-clip policy
loss and its aggregations (``rl.losses``), the optimiser and its schedule (``rl.optim``), the
batch and its minibatches (``rl.batch``) — and meet here:

* ``GRPOConfig`` — every GRPO setting, validated against those registries.
* ``grpo_loss`` — ``losses.policy_loss`` of ``params`` on one minibatch; the log-probs and
  entropies come from ``imagent_jax.rl.logprobs.token_logprobs``, the one training forward pass
  (vocabulary projection in chunks of positions).
* ``train_step`` — one optimiser step on one minibatch. A non-finite loss or gradient norm leaves
  params and optimiser state bit-identical and reports ``skipped = 1``. Given the frozen
  reference's parameters it takes the KL term's reference log-probs in the same program (one
  compiled program per batch shape, not two), and it reports how far its own log-probs are from
  the rollout's (``logprob_gap_max``).
* ``jit_train_step`` / ``sharded_train_step`` — ``train_step`` jitted, the latter with
  shardings from ``imagent_jax.parallel`` and params / optimiser state donated.
* ``update`` — several minibatch steps (``num_minibatches`` x ``ppo_epochs``) per rollout batch,
  all against the rollout's sampling log-probs; rows reshuffled every epoch on the host and
  split with their own images by ``batch.split_minibatches``.

Shapes: ``R`` rows (trajectories), ``T`` tokens per row; groups are contiguous rows
(row ``r`` is in group ``r // group_size``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from imagent_jax import parallel
from imagent_jax.models.registry import family_of
from imagent_jax.rl import logprobs as logprobs_lib
from imagent_jax.rl.advantages import ADVANTAGES
from imagent_jax.rl.batch import split_minibatches, stack_micro_batches
from imagent_jax.rl.losses import LOSS_AGGREGATIONS, loss_normalizer, policy_loss
from imagent_jax.rl.optim import lr_schedule, make_optimizer, optimizer_step

Batch = Mapping[str, Any]

# -------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
  """Static GRPO config (hashable: a static argument of ``jit``), validated at construction.

  Attributes:
    group_size: rollouts per prompt (G).
    advantage: a key of ``advantages.ADVANTAGES``.
    adv_eps: added to the group std by normalised estimators.
    clip_eps_low: PPO clip range below 1 (``ratio >= 1 - clip_eps_low`` for negative advantages).
    clip_eps_high: PPO clip range above 1 (DAPO clip-higher; ``ratio <= 1 + clip_eps_high`` for
      positive advantages).
    loss_agg: a key of ``losses.LOSS_AGGREGATIONS``.
    kl_coef: weight of the k3 KL estimate to a frozen reference (0 = no reference needed).
    entropy_coef: weight of the entropy bonus (the loss subtracts ``entropy_coef * entropy``; 0:
      no bonus). The entropy is computed, and logged as the ``entropy`` metric, either way.
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
    logprob_chunk: positions per row projected onto the vocabulary at once when the update and
      the old-policy pass take log-probs and entropies (``rl.logprobs.token_logprobs``); 0: all
      positions at once. Smaller chunks hold smaller ``[R, chunk, V]`` float32 blocks.
    grad_accum: micro-batches per minibatch (gradient accumulation). Each optimiser step adds up
      the gradients of ``grad_accum`` slices of its minibatch's rows, one after the other in one
      program, each normalised by the whole minibatch's count (``losses.loss_normalizer``): the
      same update as one pass over the minibatch up to float summation order, with the
      activations of ``1 / grad_accum`` of the rows alive at once. Must divide the minibatch's rows.
  """
  group_size: int
  advantage: str = "grpo"
  adv_eps: float = 1e-6
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
  logprob_chunk: int = logprobs_lib.DEFAULT_CHUNK_SIZE
  grad_accum: int = 1

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
    if not self.adv_eps >= 0.0:
      fail(f"adv_eps must be >= 0, got {self.adv_eps!r}")
    for name in ("num_minibatches", "ppo_epochs", "grad_accum"):
      if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
        fail(f"{name} must be a positive integer, got {getattr(self, name)!r}")
    if int(self.logprob_chunk) != self.logprob_chunk or self.logprob_chunk < 0:
      fail(f"logprob_chunk must be an integer >= 0 (0: all positions at once), got {self.logprob_chunk!r}")


# --------------------------------------------------------------------------------- train step

BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "advantages", "old_logp")
OPTIONAL_KEYS = ("ref_logp", "pixel_values", "image_grid_thw", "action_mask")


def _check_batch(batch: Batch, cfg: GRPOConfig, with_ref_params: bool = False) -> None:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"the GRPO batch lacks {missing}; it needs {list(BATCH_KEYS)} (+ {list(OPTIONAL_KEYS)})")
  unknown = sorted(set(batch) - set(BATCH_KEYS) - set(OPTIONAL_KEYS))
  if unknown:
    raise ValueError(f"unknown GRPO batch fields {unknown}")
  has_ref_logp = batch.get("ref_logp") is not None
  if has_ref_logp and with_ref_params:
    raise ValueError("give the reference as batch['ref_logp'] or as ref_params, not both")
  if cfg.kl_coef > 0 and not (has_ref_logp or with_ref_params):
    raise ValueError(f"kl_coef={cfg.kl_coef} needs the frozen reference: batch['ref_logp'] (its log-probs) or "
                     "ref_params (its parameters)")


def grpo_loss(model, cfg: GRPOConfig, params, batch: Batch, normalizer=None):
  """``(loss, metrics)`` of ``params`` on one minibatch; log-probs from ``token_logprobs``.

  Log-probs and the policy's entropies come from one chunked projection of the final hidden
  states (``token_logprobs``): the ``[R, T, V]`` logits are never held whole. The entropy is
  always computed (the ``entropy`` metric, ``train/entropy`` in the trainer's log); it enters the
  loss, and so the gradient, only with a non-zero ``cfg.entropy_coef``.

  Args:
    model: the model (the family's module).
    cfg: the GRPO config.
    params: parameters (differentiated).
    batch: see ``train_step`` (``tokens [R, T]`` ...).
    normalizer: ``(count, tokens)`` of the whole minibatch when ``batch`` is a micro-batch of it
      (``losses.loss_normalizer``; see ``policy_loss``), else None.

  Returns:
    ``(loss [], metrics)``: ``losses.policy_loss``'s, plus ``logprob_gap_max``: the largest
    ``|logp - old_logp|`` over the sampled tokens (``batch['action_mask']``; the loss tokens when
    it is absent), 0 when there are none. Before any update it checks that the training pass sees
    what the rollout sampled from (the same tokens, positions, images and distribution).
  """
  logp, entropy = logprobs_lib.token_logprobs(model, params, batch["tokens"], batch["attention_mask"],
                                              batch.get("pixel_values"), batch.get("image_grid_thw"),
                                              temperature=cfg.temperature, with_entropy=True, chunk_size=cfg.logprob_chunk)
  loss, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"], cfg,
                              ref_logp=batch.get("ref_logp"), entropy=entropy, normalizer=normalizer)
  checked = jnp.asarray(batch.get("action_mask", batch["loss_mask"])) > 0
  gap = jnp.where(checked, jnp.abs(jax.lax.stop_gradient(logp) - batch["old_logp"]), 0.0)
  return loss, dict(metrics, logprob_gap_max=jnp.max(gap, initial=0.0))


def reference_logprobs(model, cfg: GRPOConfig, ref_params, batch: Batch):
  """``[R, T]`` log-probs of the batch's tokens under the frozen reference (the KL term's
  ``ref_logp``): ``token_logprobs`` with ``ref_params``, no gradient. Not jitted (``train_step``
  calls it in its own program)."""
  return jax.lax.stop_gradient(logprobs_lib.token_logprobs(
      model, ref_params, batch["tokens"], batch["attention_mask"], batch.get("pixel_values"),
      batch.get("image_grid_thw"), temperature=cfg.temperature, chunk_size=cfg.logprob_chunk))


def train_step(model, cfg: GRPOConfig, params, opt_state, batch: Batch, ref_params=None):
  """One optimiser step on one minibatch; jit with ``static_argnums=(0, 1)`` (see ``jit_train_step``).

  A non-finite loss or gradient norm skips the update: the new params and optimiser state are
  selected with ``jnp.where`` against the old ones, so a skipped step returns them bit-identical
  (the optimiser's step count, and so the schedule, do not advance either).

  Args:
    model: the model (the family's module) (static).
    cfg: the GRPO config (static).
    params: parameters.
    opt_state: ``optim.make_optimizer(cfg).init(params)``.
    batch: (with ``cfg.grad_accum = k > 1``: every field below stacked ``[k, ...]``, one slice per
      micro-batch of ``R`` rows, see ``batch.stack_micro_batches``)
      dict with ``tokens [R, T]`` int, ``attention_mask [R, T]``, ``loss_mask [R, T]`` float
      (``masks.loss_mask``), ``advantages [R]``, ``old_logp [R, T]`` (the rollout's sampling
      log-probs), optionally ``ref_logp [R, T]``, and the minibatch's images ``pixel_values [P, D]``
      and ``image_grid_thw [N, 3]`` (absent or None for a text-only batch), and optionally
      ``action_mask [R, T]`` (the sampled tokens, where ``logprob_gap_max`` is measured).
    ref_params: the frozen reference's parameters, or None. Given (instead of
      ``batch['ref_logp']``), this program takes the reference log-probs itself
      (``reference_logprobs``): one forward pass more per step, and no separate program per
      batch shape to compile and keep.

  Returns:
    ``(params, opt_state, metrics)``; metrics are ``grpo_loss``'s (``entropy`` and
    ``logprob_gap_max`` included) plus ``grad_norm`` (before clipping), ``learning_rate`` (used by
    this step), ``skipped`` (1.0 when skipped, else 0.0).
  """
  _check_batch(batch, cfg, with_ref_params=ref_params is not None)
  tx = make_optimizer(cfg)
  if cfg.grad_accum == 1:
    (loss, metrics), grads = _loss_and_grads(model, cfg, params, batch, ref_params)
  else:
    loss, metrics, grads = _accumulated_grads(model, cfg, params, batch, ref_params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep_new = lambda new, old: jnp.where(finite, new, old)
  metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(cfg)(optimizer_step(opt_state)),
                 skipped=1.0 - finite.astype(jnp.float32))
  return (jax.tree_util.tree_map(keep_new, new_params, params),
          jax.tree_util.tree_map(keep_new, new_opt_state, opt_state), metrics)


_MAX_METRICS = ("ratio_max", "logprob_gap_max")  # combined over micro-batches by max; the rest are shares, summed


def _loss_and_grads(model, cfg: GRPOConfig, params, batch: Batch, ref_params, normalizer=None):
  """``((loss, metrics), grads)`` of ``grpo_loss`` on one batch (a minibatch, or one micro-batch
  of it with the whole minibatch's ``normalizer``), the reference's log-probs taken first when
  ``ref_params`` is given."""
  if ref_params is not None:
    batch = dict(batch, ref_logp=reference_logprobs(model, cfg, ref_params, batch))
  return jax.value_and_grad(lambda p: grpo_loss(model, cfg, p, batch, normalizer), has_aux=True)(params)


def _accumulated_grads(model, cfg: GRPOConfig, params, batch: Batch, ref_params):
  """``(loss, metrics, grads)`` of a minibatch given as ``cfg.grad_accum`` micro-batches stacked
  on a leading axis (``batch.stack_micro_batches``): a ``lax.scan`` over them, each part's loss
  normalised by the whole minibatch's count, gradients and metric shares summed."""
  normalizer = loss_normalizer(cfg.loss_agg, batch["loss_mask"])

  def part(grads, micro):
    (loss, metrics), g = _loss_and_grads(model, cfg, params, micro, ref_params, normalizer)
    return jax.tree_util.tree_map(jnp.add, grads, g), (loss, metrics)

  grads, (losses, metrics) = jax.lax.scan(part, jax.tree_util.tree_map(jnp.zeros_like, params), dict(batch))
  metrics = {k: jnp.max(v) if k in _MAX_METRICS else jnp.sum(v) for k, v in metrics.items()}
  return jnp.sum(losses), metrics, grads


def jit_train_step(model, cfg: GRPOConfig, donate: bool = False, jit_kwargs: Mapping[str, Any] | None = None):
  """``train_step`` jitted for one model and config: ``step(params, opt_state, batch, ref_params=None)``.

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
  """``step(params, opt_state, batch, ref_params=None) -> (params, opt_state, metrics)``, jitted with shardings.

  Params and optimiser state are sharded by ``parallel.param_shardings`` (in and out) and donated
  (``ref_params``, when given, sharded like params and not donated);
  batch rows (axis 1 of stacked micro-batches with ``grad_accum > 1``) go over ``('data', 'fsdp')`` when the row count divides that product (replicated
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
                                     opt_state_shardings(cfg, model.config, mesh, rules), jit_kwargs,
                                     row_axis=batch_row_axis(cfg))


def batch_row_axis(cfg: GRPOConfig) -> int:
  """The axis of ``train_step``'s batch fields that holds rows: 0, or 1 when ``cfg.grad_accum > 1``
  stacks micro-batches on a leading axis (``parallel.batch_shardings(row_axis=)``)."""
  return int(cfg.grad_accum > 1)


# ------------------------------------------------------------------------------------- update


def update(model, cfg: GRPOConfig, params, opt_state, batch: Batch, rng, *, step_fn: Callable | None = None,
           patch_budget: int | None = None, image_slots: int | None = None, ref_params=None,
           image_bucket: int = 0, slot_patches: int = 0):
  """All optimiser steps for one rollout batch: ``ppo_epochs`` passes of ``num_minibatches`` steps.

  Host loop. Each epoch shuffles the rows (a permutation drawn from ``fold_in(rng, epoch)``),
  ``split_minibatches`` builds each minibatch with its own images (with ``grad_accum = k > 1``, its
  k micro-batches, stacked by ``stack_micro_batches``), and ``step_fn`` runs one ``train_step`` on it. Every step is taken against the rollout's stored sampling log-probs
  (``old_logp``), so from the second step on the PPO ratio and clipping are active.

  Args:
    model: the model (the family's module).
    cfg: the GRPO config.
    params: parameters (donated when ``step_fn`` donates).
    opt_state: optimiser state.
    batch: the ``train_step`` fields for the whole rollout batch, images row by row with
      ``images_per_row [R]`` (``batch.prepare_batch``'s batch).
    rng: PRNG key for the shuffles.
    step_fn: ``(params, opt_state, minibatch[, ref_params]) -> (params, opt_state, metrics)``; default
      ``jit_train_step(model, cfg)`` (build it once and pass it to avoid re-tracing per call, or
      pass ``sharded_train_step(...)``).
    patch_budget, image_slots: static image budgets of a minibatch (see ``batch.split_minibatches``);
      with ``grad_accum > 1``, of each micro-batch before ``stack_micro_batches`` cuts them.
    ref_params: the frozen reference's parameters, passed to every step (see ``train_step``), or
      None (then a KL term needs ``batch['ref_logp']``).
    image_bucket, slot_patches: with ``grad_accum > 1``, each micro-batch's image slots are cut to
      the used ones rounded up to ``image_bucket`` (``batch.stack_micro_batches``); 0: not cut.

  Returns:
    ``(params, opt_state, metrics)``: metrics averaged over the steps (numpy scalars), except
    ``skipped``, the number of skipped steps, and ``logprob_gap_max``, the first step's (the only
    one taken before any update, on the first minibatch's rows), plus ``steps`` (steps taken).
  """
  step_fn = step_fn or jit_train_step(model, cfg)
  rows = int(np.shape(batch["tokens"])[0])
  family = family_of(model.config)
  history = []
  k = cfg.grad_accum
  extra = () if ref_params is None else (ref_params,)
  for epoch in range(cfg.ppo_epochs):
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(rng, epoch), rows))
    minibatches = split_minibatches(batch, cfg.num_minibatches * k, image_token_id=family.image_token_id(model.config),
                                    merge_unit=family.geometry(model.config).merge_unit, perm=perm,
                                    patch_budget=patch_budget, image_slots=image_slots)
    if k > 1:  # each minibatch as its k micro-batches, stacked
      minibatches = [stack_micro_batches(minibatches[i:i + k], image_bucket=image_bucket, slot_patches=slot_patches)
                     for i in range(0, len(minibatches), k)]
    for mb in minibatches:
      params, opt_state, metrics = step_fn(params, opt_state, mb, *extra)
      history.append(metrics)
  history = jax.device_get(history)
  out = {k: np.mean([m[k] for m in history]) for k in history[0]}
  out["skipped"] = np.sum([m["skipped"] for m in history])
  if "logprob_gap_max" in history[0]:
    out["logprob_gap_max"] = np.asarray(history[0]["logprob_gap_max"])
  out["steps"] = np.float32(len(history))
  return params, opt_state, out
