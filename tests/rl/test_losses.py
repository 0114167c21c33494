"""The policy loss by hand: PPO-clip (clip-higher) with both aggregations, k3 KL and entropy, and
exactly zero gradients on masked and clipped tokens."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagent_jax.registry import Registry
from imagent_jax.rl import grpo, losses

# ------------------------------------------------------------------------- the loss by hand

# 2 groups x 2 rows x 3 tokens. Ratios are chosen so that clipping is active on both sides:
# row 0 (A=+1):  1.5 -> clipped at 1.28 (high) | 1.0 | 0.5 (A>0: the unclipped branch is the max)
# row 1 (A=-1):  0.5 -> clipped at 0.8 (low)   | 1.2 | masked (log-prob -1e30 there)
# row 2 (A=+2):  1.1 | 1.4 -> clipped (high)   | 0.9
# row 3 (A=-.5): 0.7 -> clipped (low)          | masked | masked
RATIOS = np.array([[1.5, 1.0, 0.5], [0.5, 1.2, 2.0], [1.1, 1.4, 0.9], [0.7, 1.0, 1.0]])
MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], np.float32)
ADV = np.array([1.0, -1.0, 2.0, -0.5], np.float32)
OLD = np.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -2.0], [-0.7, -1.3, -2.2], [-0.4, -1.0, -1.0]], np.float32)
# Per-token clipped surrogate, worked out by hand (max(-A r, -A clip(r, 0.8, 1.28))):
#   row 0: -1.28, -1.0, -0.5 (sum -2.78) | row 1: 0.8, 1.2 (sum 2.0)
#   row 2: -2.2, -2.56, -1.8 (sum -6.56) | row 3: 0.4
TOKEN_MEAN = -6.94 / 9  # 9 loss tokens
SEQ_MEAN = (-2.78 / 3 + 2.0 / 2 - 6.56 / 3 + 0.4 / 1) / 4


def _logp():
  logp = (OLD + np.log(RATIOS)).astype(np.float32)
  logp[MASK == 0] = -1e30  # masked positions may hold huge negative log-probs (image placeholders)
  return jnp.asarray(logp)


@pytest.mark.parametrize("agg,expected", [("token_mean", TOKEN_MEAN), ("seq_mean", SEQ_MEAN)])
def test_policy_loss_by_hand(agg, expected):
  cfg = grpo.GRPOConfig(group_size=2, loss_agg=agg)
  loss, m = losses.policy_loss(_logp(), OLD, ADV, MASK, cfg)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m["pg_loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m["clip_fraction_high"]), 2 / 9, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_fraction_low"]), 2 / 9, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_fraction"]), 4 / 9, rtol=1e-6)
  np.testing.assert_allclose(float(m["ratio_mean"]), 8.8 / 9, rtol=1e-5)
  np.testing.assert_allclose(float(m["ratio_max"]), 1.5, rtol=1e-5)
  r = RATIOS[MASK > 0]
  np.testing.assert_allclose(float(m["approx_kl"]), np.mean(r - 1 - np.log(r)), rtol=1e-4)
  assert float(m["tokens"]) == 9.0


def test_seq_mean_leaves_out_fully_masked_rows():
  cfg = grpo.GRPOConfig(group_size=2, loss_agg="seq_mean")
  mask = MASK.copy()
  mask[3] = 0  # row 3 leaves the loss: the mean runs over the other three rows
  loss, _ = losses.policy_loss(_logp(), OLD, ADV, mask, cfg)
  np.testing.assert_allclose(float(loss), (-2.78 / 3 + 1.0 - 6.56 / 3) / 3, rtol=1e-5)


def test_masked_and_clipped_tokens_get_exactly_zero_gradient():
  cfg = grpo.GRPOConfig(group_size=2)
  old = OLD.copy()
  old[3, 1:] = -1e30  # garbage on both sides of masked positions: exp(logp - old) would overflow there
  grad = np.asarray(jax.grad(lambda lp: losses.policy_loss(lp, old, ADV, MASK, cfg)[0])(_logp()))
  assert np.all(grad[MASK == 0] == 0.0)  # exactly zero, and no NaN from the +-1e30 entries
  assert grad[0, 0] == 0.0 and grad[1, 0] == 0.0 and grad[2, 1] == 0.0 and grad[3, 0] == 0.0  # clipped
  # Unclipped tokens: d/dlogp (-A r) / 9 = -A r / 9.
  for (i, j) in [(0, 1), (0, 2), (1, 1), (2, 0), (2, 2)]:
    np.testing.assert_allclose(grad[i, j], -ADV[i] * RATIOS[i, j] / 9, rtol=1e-5)
  # A fully masked trajectory, even with a non-finite advantage, contributes nothing.
  mask = MASK.copy()
  mask[1] = 0
  adv = ADV.copy()
  adv[1] = np.nan
  loss, g = jax.value_and_grad(lambda lp: losses.policy_loss(lp, OLD, adv, mask, cfg)[0])(_logp())
  assert np.isfinite(float(loss)) and np.all(np.asarray(g)[1] == 0.0)


def test_k3_kl_and_entropy_by_hand():
  cfg = grpo.GRPOConfig(group_size=2, kl_coef=0.5, entropy_coef=0.1)
  logp = jnp.array([[-1.0, -1.0, -1.0, -1e30]])
  ref = jnp.array([[-1.0, -1.0 + math.log(2), -1.0 - math.log(2), 5.0]])
  mask = np.array([[1, 1, 1, 0]], np.float32)
  entropy = jnp.array([[0.3, 0.6, 0.9, 100.0]])
  # k3 = exp(d) - d - 1 with d = ref - logp = 0, ln 2, -ln 2:  0, 1 - ln 2, ln 2 - 1/2.
  kl = np.array([0.0, 1 - math.log(2), math.log(2) - 0.5])
  loss, m = losses.policy_loss(logp, logp, np.zeros(1), mask, cfg, ref_logp=ref, entropy=entropy)
  np.testing.assert_allclose(float(m["kl"]), kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["entropy"]), 0.6, rtol=1e-6)
  np.testing.assert_allclose(float(loss), 0.5 * kl.mean() - 0.1 * 0.6, rtol=1e-5)
  assert float(m["pg_loss"]) == 0.0
  with pytest.raises(ValueError, match="ref_logp"):
    losses.policy_loss(logp, logp, np.zeros(1), mask, cfg)


def test_aggregations_are_registered_by_name():
  assert isinstance(losses.LOSS_AGGREGATIONS, Registry)
  assert losses.LOSS_AGGREGATIONS.names() == ("token_mean", "seq_mean")
  per_token = jnp.array([[1.0, 2.0, 4.0], [8.0, 0.0, 0.0]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  # Each is a (total, count) ratio, so micro-batches of rows add up to the whole (loss_normalizer).
  assert [float(x) for x in losses.LOSS_AGGREGATIONS["token_mean"](per_token, mask)] == [11.0, 3.0]
  assert [float(x) for x in losses.LOSS_AGGREGATIONS["seq_mean"](per_token, mask)] == [9.5, 2.0]
  assert float(losses.aggregate("token_mean", per_token, mask)) == pytest.approx(11 / 3)
  assert float(losses.aggregate("seq_mean", per_token, mask)) == pytest.approx((1.5 + 8) / 2)
  # A part of a batch, normalised by the whole: its share; the shares of the rows sum to the mean.
  stacked = mask.reshape(2, 1, 3)
  assert [float(x) for x in losses.loss_normalizer("seq_mean", stacked)] == [2.0, 3.0]
  count, _ = losses.loss_normalizer("token_mean", stacked)
  shares = [float(losses.aggregate("token_mean", per_token[i:i + 1], mask[i:i + 1], count)) for i in range(2)]
  assert shares == pytest.approx([3 / 3, 8 / 3]) and sum(shares) == pytest.approx(11 / 3)
  assert float(losses.aggregate("seq_mean", per_token, jnp.zeros_like(mask))) == 0.0  # nothing to train on
  with pytest.raises(ValueError, match="already registered"):
    losses.LOSS_AGGREGATIONS.register("token_mean")(lambda p, m: p.sum())


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean"])
def test_entropy_is_reported_like_the_loss_and_enters_it_only_with_a_coefficient(agg):
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
  entropy = jnp.array([[0.3, 0.6, 0.9, 100.0], [2.0, 50.0, 50.0, 50.0]])
  logp = jnp.full((2, 4), -1.0)
  adv = np.array([1.0, -1.0], np.float32)
  want = {"token_mean": (0.3 + 0.6 + 0.9 + 2.0) / 4, "seq_mean": (0.6 + 2.0) / 2}[agg]
  cfg = grpo.GRPOConfig(group_size=2, loss_agg=agg)
  loss_of = lambda c, ent: losses.policy_loss(logp, logp - 0.1, adv, mask, c, entropy=ent)
  (loss, m), d_entropy = jax.value_and_grad(lambda ent: loss_of(cfg, ent), has_aux=True)(entropy)
  np.testing.assert_allclose(float(m["entropy"]), want, rtol=1e-6)
  assert float(loss) == float(loss_of(cfg, None)[0])  # reported, not in the loss
  assert not np.asarray(d_entropy).any()
  bonus = dataclasses.replace(cfg, entropy_coef=0.5)
  loss_b, m_b = loss_of(bonus, entropy)
  np.testing.assert_allclose(float(loss_b), float(loss) - 0.5 * want, rtol=1e-6)
  assert float(m_b["entropy"]) == float(m["entropy"])
  assert "entropy" not in loss_of(cfg, None)[1]
