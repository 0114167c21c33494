"""Group advantages by hand, their population and the one zero-variance test they share with the masks."""

import dataclasses
import math

import numpy as np
import pytest

from imagent_jax.registry import Registry
from imagent_jax.rl import advantages, grpo, masks

# ---------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
  rewards = np.array([1.0, 0.0, 0.5, 0.5,  # mean 0.5, sample std sqrt(1/6)
                      0.1, 0.1, 0.1, 0.1,  # zero variance
                      2.0, 0.0, 1.0, 5.0], np.float32)  # with stats_mask: the 5.0 does not count
  adv = np.asarray(advantages.group_advantages(rewards, 4))
  s = math.sqrt(6)  # 0.5 / sqrt(1/6)
  np.testing.assert_allclose(adv[:4], [0.5 * s, -0.5 * s, 0, 0], rtol=1e-5, atol=1e-7)
  assert np.all(adv[4:8] == 0.0)
  flat = np.asarray(advantages.group_advantages(rewards, 4, normalize=False))
  np.testing.assert_allclose(flat[:4], [0.5, -0.5, 0, 0], atol=1e-7)
  assert np.all(flat[4:8] == 0.0)

  stats = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], np.float32)
  adv = np.asarray(advantages.group_advantages(rewards, 4, stats_mask=stats))
  np.testing.assert_allclose(adv[8:], [1.0, -1.0, 0.0, 0.0], rtol=1e-5, atol=1e-7)  # mean 1, std 1
  assert np.all(np.isfinite(adv))
  # A group with one counted row has no baseline: zeros, not NaN.
  one = np.asarray(advantages.group_advantages(np.array([3.0, 1.0]), 2, stats_mask=np.array([1, 0])))
  assert np.all(one == 0.0)


def test_advantages_use_the_zero_variance_population_of_the_masks():
  rewards = np.array([1.0, 1.0, 0.0, 0.3, 0.3, 0.7, 0.2, 0.2, 0.2, 0.9, 0.9, 0.0], np.float32)
  status = np.array([0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2], np.int32)  # rows 2 and 11 get masked
  malformed = np.zeros(12, np.int32)
  for include in (True, False):
    mcfg = masks.MaskConfig(group_size=3, group_stats_include_masked=include)
    gcfg = grpo.GRPOConfig(group_size=3)
    stats = masks.group_stats_mask(status, malformed, mcfg)
    keep, _ = masks.zero_variance_groups(rewards, 3, stats, mcfg.zero_variance_tol)
    adv = np.asarray(advantages.compute_advantages(gcfg, rewards, stats))
    no_signal = np.asarray(keep) == 0
    assert np.all(adv[no_signal] == 0.0)
    assert np.all(np.abs(adv[~no_signal & (np.asarray(stats) > 0)]) > 0)
  # With masked rows out of the statistics, groups 0 and 3 are zero-variance.
  assert np.all(adv[[0, 1, 2, 9, 10, 11]] == 0.0)


def test_one_zero_variance_test_with_one_tolerance():
  """The advantages' "no signal -> 0" is ``masks.zero_variance_groups`` with the masks' tolerance."""
  assert "zero_variance_tol" not in {f.name for f in dataclasses.fields(grpo.GRPOConfig)}  # one knob, on the masks
  assert masks.MaskConfig(group_size=2).zero_variance_tol == masks.ZERO_VARIANCE_TOL == 1e-6
  rewards = np.array([0.5, 0.52, 0.5, 0.5,  # spread 0.02: signal at 1e-6, none at 0.05
                      0.0, 1.0, 0.0, 0.0], np.float32)
  cfg = grpo.GRPOConfig(group_size=4, advantage="grpo_unnormalized")
  default = np.asarray(advantages.compute_advantages(cfg, rewards))
  np.testing.assert_allclose(default, [-0.005, 0.015, -0.005, -0.005, -0.25, 0.75, -0.25, -0.25], atol=1e-6)
  coarse = np.asarray(advantages.compute_advantages(cfg, rewards, zero_variance_tol=0.05))
  np.testing.assert_array_equal(coarse[:4], 0.0)
  np.testing.assert_array_equal(coarse[4:], default[4:])
  for tol in (1e-6, 0.05):
    keep, _ = masks.zero_variance_groups(rewards, 4, None, tol)
    adv = np.asarray(advantages.compute_advantages(cfg, rewards, zero_variance_tol=tol))
    assert np.all((adv != 0) <= (np.asarray(keep) > 0))  # no advantage where the masks see no signal
  with pytest.raises(ValueError, match="tolerance"):
    advantages.group_advantages(rewards, 4, zero_variance_tol=-1.0)


def test_estimators_are_registered_by_name():
  assert isinstance(advantages.ADVANTAGES, Registry)
  assert advantages.ADVANTAGES.names() == ("grpo", "grpo_unnormalized")
  assert all(e.min_group_size == 2 for e in advantages.ADVANTAGES.values())
  with pytest.raises(ValueError, match="already registered"):
    advantages.register_advantage("grpo")(lambda *args: None)
  with pytest.raises(KeyError, match="registered"):
    advantages.ADVANTAGES["ppo"]
