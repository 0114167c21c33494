"""Two-layer masking (IMAgent §"two-layer masking"): which sampled tokens carry the policy loss.

Layer 1, token level (``token_mask``): only tokens the policy sampled carry loss; the prompt,
tool-response text, image tokens and padding never do.

Layer 2, trajectory level (``trajectory_mask``): a whole trajectory leaves the loss when it
  * hit the turn / tool-call limit while still calling tools (``turn_limit``),
  * was cut by the length limit before it answered (``truncated``), or
  * contains a malformed tool call — unparsable, or naming an unknown tool (``malformed``).
The first two are not the policy's fault in a way a 0 reward would teach well (the run was cut
short, Mini-o3's "over-turn masking"); the third keeps broken calls from being reinforced when the
final answer happens to be right. Each rule is switchable and every step logs how many
trajectories each rule masked. ``STATUS_NO_ANSWER`` (the model stopped without answering) is
deliberately *not* masked: that is a choice of the policy and its 0 accuracy reward is the signal.

Groups whose rewards are all equal carry no GRPO signal (every advantage is 0) and are dropped
from the loss (``zero_variance_groups``), so that they do not dilute the token-mean loss. That
function is the one zero-variance test: the advantage estimators (``rl.advantages``) call it too,
with the same tolerance (``MaskConfig.zero_variance_tol``, default ``ZERO_VARIANCE_TOL``), so a
group the mask drops gets advantages of exactly 0.

Group statistics. Verl-based peers (Mini-o3's over-turn masking) apply the trajectory mask to the
response mask only: GRPO's group mean/std are still computed over *all* rollouts of the prompt,
masked ones included (their reward, usually 0, lowers the mean and so raises the advantage of the
rollouts that finished). ``MaskConfig.group_stats_include_masked`` (default True) follows them;
False computes mean/std, and the zero-variance test, only over the trajectories that stay in the
loss. ``group_stats_mask`` gives the GRPO code that population so both agree.

Everything here is ``jnp`` with static shapes and a static, hashable config: it runs under ``jit``.
Rows are ``R = num_prompts * group_size`` trajectories; the rows of one group are contiguous
(row ``r`` belongs to group ``r // group_size``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from imagent_jax.registry import Registry

# Per-trajectory end status: a property of the trajectory (agent.trajectory), read by the rules here.
from imagent_jax.agent.trajectory import (STATUS_ANSWERED, STATUS_NAMES, STATUS_NO_ANSWER,  # noqa: E402,F401
                                          STATUS_TRUNCATED, STATUS_TURN_LIMIT)
NUM_STATUSES = len(STATUS_NAMES)

# Reward spread (max - min over a group's counted rows) at or below which a group is "zero variance".
ZERO_VARIANCE_TOL = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskConfig:
  """Static masking config (hashable, so it can be a static argument of ``jit``).

  Attributes:
    group_size: rollouts per prompt (G); rows of a group are contiguous.
    mask_turn_limit: layer 2 drops trajectories with ``STATUS_TURN_LIMIT``.
    mask_truncated: layer 2 drops trajectories with ``STATUS_TRUNCATED``.
    mask_malformed: layer 2 drops trajectories with at least one malformed tool call.
    drop_zero_variance_groups: drop groups whose rewards are all equal (no GRPO signal).
    group_stats_include_masked: layer-2-masked trajectories still count in the group mean/std
      and in the zero-variance test (Mini-o3 / verl behaviour). False: only kept ones count.
    zero_variance_tol: a group is "zero variance" when ``max - min <= tol`` over its rewards; the
      one tolerance of that test, for the masks and the advantages alike.
  """
  group_size: int
  mask_turn_limit: bool = True
  mask_truncated: bool = True
  mask_malformed: bool = True
  drop_zero_variance_groups: bool = True
  group_stats_include_masked: bool = True
  zero_variance_tol: float = ZERO_VARIANCE_TOL

  def __post_init__(self):
    if int(self.group_size) != self.group_size or self.group_size < 1:
      raise ValueError(f"MaskConfig.group_size must be a positive integer, got {self.group_size!r}")
    if not self.zero_variance_tol >= 0:
      raise ValueError(f"MaskConfig.zero_variance_tol must be >= 0, got {self.zero_variance_tol!r}")


class TrajectoryRule(NamedTuple):
  """A layer-2 rule: the ``MaskConfig`` flag that switches it and which trajectories it hits."""
  flag: str
  hits: Callable[[jax.Array, jax.Array], jax.Array]  # (status [R], num_malformed_calls [R]) -> [R] bool


# Name -> rule. The name is the key of the rule's count in the logged metrics.
TRAJECTORY_RULES: Registry[TrajectoryRule] = Registry("trajectory rule")
TRAJECTORY_RULES.add("turn_limit", TrajectoryRule("mask_turn_limit", lambda status, _: status == STATUS_TURN_LIMIT))
TRAJECTORY_RULES.add("truncated", TrajectoryRule("mask_truncated", lambda status, _: status == STATUS_TRUNCATED))
TRAJECTORY_RULES.add("malformed", TrajectoryRule("mask_malformed", lambda _, malformed: malformed > 0))


def _num_groups(num_rows: int, group_size: int) -> int:
  if num_rows % group_size:
    raise ValueError(f"{num_rows} trajectories do not split into groups of group_size={group_size}")
  return num_rows // group_size


@jax.jit
def token_mask(action_mask, attention_mask=None):
  """Layer 1: tokens the policy sampled that are real (not padding).

  Args:
    action_mask: ``[R, T]`` bool, True on tokens the policy sampled.
    attention_mask: ``[R, T]`` 1/True on real tokens, or None (all real).

  Returns:
    ``[R, T]`` float32, 1 where the token carries loss.
  """
  mask = jnp.asarray(action_mask).astype(bool)
  if attention_mask is not None:
    mask = mask & jnp.asarray(attention_mask).astype(bool)
  return mask.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def trajectory_mask(status, num_malformed_calls, cfg: MaskConfig):
  """Layer 2: which whole trajectories stay in the loss.

  Args:
    status: ``[R]`` int, one of the ``STATUS_*`` codes.
    num_malformed_calls: ``[R]`` int, tool calls that failed to parse or named an unknown tool.
    cfg: the masking config (static).

  Returns:
    ``(keep [R] float32, counts)``. ``counts`` maps each rule name in ``TRAJECTORY_RULES`` to the
    number of trajectories it masked (int32 scalar; 0 when the rule is off; a trajectory hit by
    several rules counts in each) and ``"masked_total"`` to the number masked by any rule.
  """
  status = jnp.asarray(status)
  malformed = jnp.asarray(num_malformed_calls)
  masked = jnp.zeros(status.shape, bool)
  counts = {}
  for name, rule in TRAJECTORY_RULES.items():
    hit = rule.hits(status, malformed) & getattr(cfg, rule.flag)
    counts[name] = jnp.sum(hit, dtype=jnp.int32)
    masked = masked | hit
  counts["masked_total"] = jnp.sum(masked, dtype=jnp.int32)
  return (~masked).astype(jnp.float32), counts


@functools.partial(jax.jit, static_argnames=("group_size", "tol"))
def zero_variance_groups(rewards, group_size: int, valid=None, tol: float = ZERO_VARIANCE_TOL):
  """Finds groups whose rewards carry no GRPO signal: the one zero-variance test.

  A group carries no signal when all its (valid) rewards are equal within ``tol``
  (``max - min <= tol``); with ``valid``, so does a group with fewer than two valid rows. The
  loss mask drops such groups (``loss_mask``) and the advantage estimators give them 0
  (``advantages.group_advantages``), both through this function.

  Args:
    rewards: ``[R]`` float total reward per trajectory.
    group_size: rollouts per prompt (static); ``R`` must be a multiple of it.
    valid: ``[R]`` bool/float, the rows that count in the group statistics, or None (all).
    tol: equality tolerance (static), ``>= 0``.

  Returns:
    ``(keep [R] float32, num_dropped_groups int32 scalar)``; ``keep`` is 0 on every row of a
    dropped group and 1 elsewhere.
  """
  if not tol >= 0:
    raise ValueError(f"the zero-variance tolerance must be >= 0, got {tol!r}")
  rewards = jnp.asarray(rewards, jnp.float32)
  g = _num_groups(rewards.shape[0], group_size)
  r = rewards.reshape(g, group_size)
  ok = jnp.ones_like(r, bool) if valid is None else jnp.asarray(valid).astype(bool).reshape(g, group_size)
  hi = jnp.max(jnp.where(ok, r, -jnp.inf), axis=1)
  lo = jnp.min(jnp.where(ok, r, jnp.inf), axis=1)
  has_signal = hi - lo > tol  # -inf for a group without valid rows
  keep = jnp.repeat(has_signal, group_size).astype(jnp.float32)
  return keep, jnp.sum(~has_signal, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def group_stats_mask(status, num_malformed_calls, cfg: MaskConfig):
  """The trajectories that count in GRPO's group mean/std (see the module docstring).

  Args:
    status: ``[R]`` int status codes.
    num_malformed_calls: ``[R]`` int.
    cfg: the masking config (static).

  Returns:
    ``[R]`` float32: all ones when ``cfg.group_stats_include_masked``, else the layer-2 keep mask.
  """
  if cfg.group_stats_include_masked:
    return jnp.ones(jnp.shape(status), jnp.float32)
  return trajectory_mask(status, num_malformed_calls, cfg)[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def loss_mask(action_mask, attention_mask, status, num_malformed_calls, rewards, cfg: MaskConfig):
  """The final loss mask: layer 1 x layer 2 x zero-variance groups.

  Args:
    action_mask: ``[R, T]`` bool, True on tokens the policy sampled.
    attention_mask: ``[R, T]`` real-token mask, or None.
    status: ``[R]`` int status codes.
    num_malformed_calls: ``[R]`` int.
    rewards: ``[R]`` float total rewards (may be None when ``cfg.drop_zero_variance_groups`` is off).
    cfg: the masking config (static).

  Returns:
    ``(mask [R, T] float32, metrics)``; ``metrics`` maps names to scalars for logging:
    ``mask/<rule>`` and ``mask/masked_total`` (trajectories masked by layer 2),
    ``mask/zero_variance_groups`` (groups dropped; 0 when the rule is off),
    ``mask/zero_variance_trajectories`` (trajectories dropped only by that rule),
    ``mask/kept_trajectories``, ``mask/kept_fraction``, ``mask/action_tokens`` (layer 1 tokens),
    ``mask/loss_tokens`` (tokens in the final mask) and ``mask/status/<name>`` (the number of
    trajectories with each status; the trainer logs the fractions as ``status/<name>``).
  """
  tokens = token_mask(action_mask, attention_mask)
  keep, counts = trajectory_mask(status, num_malformed_calls, cfg)
  num_rows = tokens.shape[0]
  _num_groups(num_rows, cfg.group_size)
  if cfg.drop_zero_variance_groups:
    if rewards is None:
      raise ValueError("loss_mask needs rewards when cfg.drop_zero_variance_groups is on")
    stats = group_stats_mask(status, num_malformed_calls, cfg)
    group_keep, dropped = zero_variance_groups(rewards, cfg.group_size, stats, cfg.zero_variance_tol)
  else:
    group_keep, dropped = jnp.ones((num_rows,), jnp.float32), jnp.zeros((), jnp.int32)
  row_keep = keep * group_keep
  mask = tokens * row_keep[:, None]

  metrics = {f"mask/{k}": v for k, v in counts.items()}
  metrics["mask/zero_variance_groups"] = dropped
  metrics["mask/zero_variance_trajectories"] = jnp.sum((keep > 0) & (group_keep == 0), dtype=jnp.int32)
  metrics["mask/kept_trajectories"] = jnp.sum(row_keep > 0, dtype=jnp.int32)
  metrics["mask/kept_fraction"] = jnp.mean(row_keep)
  metrics["mask/action_tokens"] = jnp.sum(tokens > 0, dtype=jnp.int32)
  metrics["mask/loss_tokens"] = jnp.sum(mask > 0, dtype=jnp.int32)
  status = jnp.asarray(status)
  for code, name in enumerate(STATUS_NAMES):
    metrics[f"mask/status/{name}"] = jnp.sum(status == code, dtype=jnp.int32)
  return mask, metrics
