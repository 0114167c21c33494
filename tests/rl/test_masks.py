"""Tests for imagent_jax.agent.masks: token mask, trajectory rules, zero-variance groups, loss mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagent_jax.rl import masks
from imagent_jax.rl.masks import STATUS_ANSWERED, STATUS_NO_ANSWER, STATUS_TRUNCATED, STATUS_TURN_LIMIT

ALL_OFF = dict(mask_turn_limit=False, mask_truncated=False, mask_malformed=False)

# One trajectory per situation:      status             malformed calls
TRAJECTORIES = [(STATUS_ANSWERED, 0),  # 0 clean answer
                (STATUS_TRUNCATED, 0),  # 1 cut by the length limit
                (STATUS_TURN_LIMIT, 0),  # 2 turn limit while calling tools
                (STATUS_NO_ANSWER, 0),  # 3 stopped without answering: never masked
                (STATUS_ANSWERED, 2),  # 4 answered, but with malformed calls
                (STATUS_TURN_LIMIT, 1)]  # 5 hit by two rules
STATUS = np.array([s for s, _ in TRAJECTORIES], np.int32)
MALFORMED = np.array([m for _, m in TRAJECTORIES], np.int32)


def test_status_constants_and_names():
  assert (STATUS_ANSWERED, STATUS_TRUNCATED, STATUS_TURN_LIMIT, STATUS_NO_ANSWER) == (0, 1, 2, 3)
  assert masks.STATUS_NAMES[STATUS_TURN_LIMIT] == "turn_limit"
  assert masks.STATUS_NAMES[STATUS_NO_ANSWER] == "no_answer"
  assert len(masks.STATUS_NAMES) == masks.NUM_STATUSES == 4


def test_token_mask_only_sampled_real_tokens():
  action = np.array([[0, 1, 1, 0, 1], [1, 1, 0, 1, 1]], bool)
  attention = np.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], np.int32)
  got = masks.token_mask(action, attention)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, [[0, 1, 1, 0, 0], [0, 1, 0, 1, 1]])
  np.testing.assert_array_equal(masks.token_mask(action), action.astype(np.float32))


@pytest.mark.parametrize("flags, keep, counts", [
    (dict(ALL_OFF), [1, 1, 1, 1, 1, 1], dict(turn_limit=0, truncated=0, malformed=0, masked_total=0)),
    (dict(ALL_OFF, mask_turn_limit=True), [1, 1, 0, 1, 1, 0],
     dict(turn_limit=2, truncated=0, malformed=0, masked_total=2)),
    (dict(ALL_OFF, mask_truncated=True), [1, 0, 1, 1, 1, 1],
     dict(turn_limit=0, truncated=1, malformed=0, masked_total=1)),
    (dict(ALL_OFF, mask_malformed=True), [1, 1, 1, 1, 0, 0],
     dict(turn_limit=0, truncated=0, malformed=2, masked_total=2)),
    ({}, [1, 0, 0, 1, 0, 0], dict(turn_limit=2, truncated=1, malformed=2, masked_total=4)),  # defaults: all on
])
def test_trajectory_mask_rules(flags, keep, counts):
  cfg = masks.MaskConfig(group_size=2, **flags)
  got_keep, got_counts = masks.trajectory_mask(STATUS, MALFORMED, cfg)
  assert got_keep.dtype == jnp.float32
  np.testing.assert_array_equal(got_keep, keep)
  assert {k: int(v) for k, v in got_counts.items()} == counts


def test_trajectory_rules_registry_matches_config_flags():
  fields = {f.name for f in dataclasses.fields(masks.MaskConfig)}
  assert masks.TRAJECTORY_RULES.names() == ("turn_limit", "truncated", "malformed")  # the metrics' order
  for name, rule in masks.TRAJECTORY_RULES.items():
    assert rule.flag in fields, name


def test_zero_variance_groups_drops_equal_keeps_tiny_variance():
  rewards = np.array([1.0, 1.0, 1.0, 1.0,  # all equal: dropped
                      0.0, 1.0, 0.0, 0.0,  # signal: kept
                      0.5, 0.5, 0.5, 0.5001,  # tiny but real variance (1e-4 > 1e-6): kept
                      0.2, 0.2, 0.2 + 5e-7, 0.2],  # equal within 1e-6: dropped
                     np.float32)
  keep, dropped = masks.zero_variance_groups(rewards, 4)
  np.testing.assert_array_equal(keep, [0] * 4 + [1] * 4 + [1] * 4 + [0] * 4)
  assert int(dropped) == 2


def test_zero_variance_groups_tolerance_is_the_configs():
  rewards = np.array([0.5, 0.52, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0], np.float32)  # spreads 0.02 and 1.0
  np.testing.assert_array_equal(masks.zero_variance_groups(rewards, 4)[0], [1] * 8)  # default ZERO_VARIANCE_TOL
  keep, dropped = masks.zero_variance_groups(rewards, 4, None, 0.05)
  np.testing.assert_array_equal(keep, [0] * 4 + [1] * 4)
  assert int(dropped) == 1
  cfg = masks.MaskConfig(group_size=4, zero_variance_tol=0.05, **ALL_OFF)
  mask, metrics = masks.loss_mask(np.ones((8, 2), bool), None, np.zeros(8, np.int32), np.zeros(8, np.int32), rewards,
                                  cfg)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), [0] * 4 + [2] * 4)  # the config's tolerance reaches the test
  assert masks.MaskConfig(group_size=4).zero_variance_tol == masks.ZERO_VARIANCE_TOL
  with pytest.raises(ValueError, match=">= 0"):
    masks.zero_variance_groups(rewards, 4, None, -1.0)
  with pytest.raises(ValueError, match="zero_variance_tol"):
    masks.MaskConfig(group_size=4, zero_variance_tol=-1.0)


def test_zero_variance_groups_with_valid_rows():
  rewards = np.array([1.0, 1.0, 0.0, 0.0,  # valid rows equal (1, 1): dropped
                      1.0, 0.0, 0.0, 0.0,  # one valid row only: nothing to compare, dropped
                      1.0, 0.0, 1.0, 1.0], np.float32)  # valid rows differ: kept
  valid = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0], bool)
  keep, dropped = masks.zero_variance_groups(rewards, 4, valid)
  np.testing.assert_array_equal(keep, [0] * 8 + [1] * 4)
  assert int(dropped) == 2
  keep_all, dropped_all = masks.zero_variance_groups(rewards, 4)  # without valid: all three vary
  np.testing.assert_array_equal(keep_all, [1] * 12)
  assert int(dropped_all) == 0


def test_group_size_must_divide_rows():
  with pytest.raises(ValueError, match="group_size=4"):
    masks.zero_variance_groups(np.zeros(6, np.float32), 4)
  with pytest.raises(ValueError, match="group_size"):
    masks.MaskConfig(group_size=0)


# Loss-mask batch: 3 groups of 4, T = 6. Tokens: 2 prompt, 2 sampled, 1 tool response, 1 sampled;
# the right end of rows 1, 4, 7, 10 (one pad) and 2, 5, 8, 11 (two pads) is padding.
GROUP_SIZE, T = 4, 6
ACTION = np.tile(np.array([0, 0, 1, 1, 0, 1], bool), (12, 1))
ATTENTION = (np.arange(T)[None, :] < (T - np.arange(12) % 3)[:, None]).astype(np.int32)
TOKENS = np.array([[0, 0, 1, 1, 0, 1], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]] * 4, np.float32)
LM_STATUS = np.array([STATUS_ANSWERED, STATUS_TRUNCATED, STATUS_ANSWERED, STATUS_NO_ANSWER,  # group 0
                      STATUS_ANSWERED, STATUS_ANSWERED, STATUS_TURN_LIMIT, STATUS_ANSWERED,  # group 1
                      STATUS_ANSWERED, STATUS_ANSWERED, STATUS_ANSWERED, STATUS_ANSWERED], np.int32)  # group 2
LM_MALFORMED = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0], np.int32)
LM_REWARDS = np.array([1.0, 0.0, 0.2, 0.0,  # varies with or without the truncated row
                       1.0, 1.0, 0.0, 1.0,  # varies only through the masked rows 6 (turn limit), 7 (malformed)
                       1.0, 1.0, 1.0, 1.0], np.float32)  # zero variance


@pytest.mark.parametrize("options, row_keep, expected_metrics", [
    (dict(), [1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
     {"mask/zero_variance_groups": 1, "mask/zero_variance_trajectories": 4, "mask/kept_trajectories": 5}),
    (dict(group_stats_include_masked=False), [1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
     {"mask/zero_variance_groups": 2, "mask/zero_variance_trajectories": 6, "mask/kept_trajectories": 3}),
    (dict(drop_zero_variance_groups=False), [1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1],
     {"mask/zero_variance_groups": 0, "mask/zero_variance_trajectories": 0, "mask/kept_trajectories": 9}),
])
def test_loss_mask_exact(options, row_keep, expected_metrics):
  np.testing.assert_array_equal(masks.token_mask(ACTION, ATTENTION), TOKENS)  # the batch is what we think
  cfg = masks.MaskConfig(group_size=GROUP_SIZE, **options)
  mask, metrics = masks.loss_mask(ACTION, ATTENTION, LM_STATUS, LM_MALFORMED, LM_REWARDS, cfg)
  expected = TOKENS * np.array(row_keep, np.float32)[:, None]
  np.testing.assert_array_equal(mask, expected)
  assert mask.dtype == jnp.float32 and mask.shape == (12, T)
  want = {"mask/turn_limit": 1, "mask/truncated": 1, "mask/malformed": 1, "mask/masked_total": 3,
          "mask/action_tokens": int(TOKENS.sum()), "mask/loss_tokens": int(expected.sum()),
          "mask/status/answered": 9, "mask/status/truncated": 1, "mask/status/turn_limit": 1,
          "mask/status/no_answer": 1,
          **expected_metrics}
  for key, value in want.items():
    assert int(metrics[key]) == value, key
  assert float(metrics["mask/kept_fraction"]) == pytest.approx(sum(row_keep) / 12)


def test_loss_mask_rules_off_keep_everything_with_signal():
  cfg = masks.MaskConfig(group_size=GROUP_SIZE, drop_zero_variance_groups=False, **ALL_OFF)
  mask, metrics = masks.loss_mask(ACTION, ATTENTION, LM_STATUS, LM_MALFORMED, None, cfg)
  np.testing.assert_array_equal(mask, TOKENS)
  assert int(metrics["mask/masked_total"]) == 0


def test_loss_mask_needs_rewards_for_zero_variance():
  cfg = masks.MaskConfig(group_size=GROUP_SIZE)
  with pytest.raises(ValueError, match="rewards"):
    masks.loss_mask(ACTION, ATTENTION, LM_STATUS, LM_MALFORMED, None, cfg)


def test_group_stats_mask_option():
  include = masks.MaskConfig(group_size=GROUP_SIZE)
  exclude = masks.MaskConfig(group_size=GROUP_SIZE, group_stats_include_masked=False)
  np.testing.assert_array_equal(masks.group_stats_mask(LM_STATUS, LM_MALFORMED, include), np.ones(12))
  np.testing.assert_array_equal(masks.group_stats_mask(LM_STATUS, LM_MALFORMED, exclude),
                                [1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1])


def test_mask_functions_jit_inside_an_outer_program_and_match_eager():
  cfg = masks.MaskConfig(group_size=GROUP_SIZE)

  @jax.jit
  def step(action, attention, status, malformed, rewards):
    mask, metrics = masks.loss_mask(action, attention, status, malformed, rewards, cfg)
    keep, counts = masks.trajectory_mask(status, malformed, cfg)
    zv_keep, dropped = masks.zero_variance_groups(rewards, cfg.group_size)
    return mask, metrics, keep, counts, zv_keep, dropped

  args = (ACTION, ATTENTION, LM_STATUS, LM_MALFORMED, LM_REWARDS)
  jitted = step(*args)
  with jax.disable_jit():
    eager = step(*args)
  for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  # The config is static and hashable: equal configs reuse the compiled program.
  assert hash(cfg) == hash(masks.MaskConfig(group_size=GROUP_SIZE))
