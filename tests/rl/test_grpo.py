"""GRPO: hand-computed loss, advantages and KL; exact zero gradients under the masks; skipped
non-finite steps; minibatch image splitting; learning on the tiny model; sharded == unsharded.

The tiny-model steps compile with LLVM's cheap pipeline (``FAST_COMPILE``): on a 2-core CPU the
optimised pipeline more than doubles the file's run time, and the programs' semantics are the same.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagent_jax import parallel
from imagent_jax.rl import masks
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.rl import grpo
from imagent_jax.rl import logprobs

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
  loss, m = grpo.policy_loss(_logp(), OLD, ADV, MASK, cfg)
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
  loss, _ = grpo.policy_loss(_logp(), OLD, ADV, mask, cfg)
  np.testing.assert_allclose(float(loss), (-2.78 / 3 + 1.0 - 6.56 / 3) / 3, rtol=1e-5)


def test_masked_and_clipped_tokens_get_exactly_zero_gradient():
  cfg = grpo.GRPOConfig(group_size=2)
  old = OLD.copy()
  old[3, 1:] = -1e30  # garbage on both sides of masked positions: exp(logp - old) would overflow there
  grad = np.asarray(jax.grad(lambda lp: grpo.policy_loss(lp, old, ADV, MASK, cfg)[0])(_logp()))
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
  loss, g = jax.value_and_grad(lambda lp: grpo.policy_loss(lp, OLD, adv, mask, cfg)[0])(_logp())
  assert np.isfinite(float(loss)) and np.all(np.asarray(g)[1] == 0.0)


def test_k3_kl_and_entropy_by_hand():
  cfg = grpo.GRPOConfig(group_size=2, kl_coef=0.5, entropy_coef=0.1)
  logp = jnp.array([[-1.0, -1.0, -1.0, -1e30]])
  ref = jnp.array([[-1.0, -1.0 + math.log(2), -1.0 - math.log(2), 5.0]])
  mask = np.array([[1, 1, 1, 0]], np.float32)
  entropy = jnp.array([[0.3, 0.6, 0.9, 100.0]])
  # k3 = exp(d) - d - 1 with d = ref - logp = 0, ln 2, -ln 2:  0, 1 - ln 2, ln 2 - 1/2.
  kl = np.array([0.0, 1 - math.log(2), math.log(2) - 0.5])
  loss, m = grpo.policy_loss(logp, logp, np.zeros(1), mask, cfg, ref_logp=ref, entropy=entropy)
  np.testing.assert_allclose(float(m["kl"]), kl.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["entropy"]), 0.6, rtol=1e-6)
  np.testing.assert_allclose(float(loss), 0.5 * kl.mean() - 0.1 * 0.6, rtol=1e-5)
  assert float(m["pg_loss"]) == 0.0
  with pytest.raises(ValueError, match="ref_logp"):
    grpo.policy_loss(logp, logp, np.zeros(1), mask, cfg)


# ---------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
  rewards = np.array([1.0, 0.0, 0.5, 0.5,  # mean 0.5, sample std sqrt(1/6)
                      0.1, 0.1, 0.1, 0.1,  # zero variance
                      2.0, 0.0, 1.0, 5.0], np.float32)  # with stats_mask: the 5.0 does not count
  adv = np.asarray(grpo.group_advantages(rewards, 4))
  s = math.sqrt(6)  # 0.5 / sqrt(1/6)
  np.testing.assert_allclose(adv[:4], [0.5 * s, -0.5 * s, 0, 0], rtol=1e-5, atol=1e-7)
  assert np.all(adv[4:8] == 0.0)
  flat = np.asarray(grpo.group_advantages(rewards, 4, normalize=False))
  np.testing.assert_allclose(flat[:4], [0.5, -0.5, 0, 0], atol=1e-7)
  assert np.all(flat[4:8] == 0.0)

  stats = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], np.float32)
  adv = np.asarray(grpo.group_advantages(rewards, 4, stats_mask=stats))
  np.testing.assert_allclose(adv[8:], [1.0, -1.0, 0.0, 0.0], rtol=1e-5, atol=1e-7)  # mean 1, std 1
  assert np.all(np.isfinite(adv))
  # A group with one counted row has no baseline: zeros, not NaN.
  one = np.asarray(grpo.group_advantages(np.array([3.0, 1.0]), 2, stats_mask=np.array([1, 0])))
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
    adv = np.asarray(grpo.compute_advantages(gcfg, rewards, stats))
    no_signal = np.asarray(keep) == 0
    assert np.all(adv[no_signal] == 0.0)
    assert np.all(np.abs(adv[~no_signal & (np.asarray(stats) > 0)]) > 0)
  # With masked rows out of the statistics, groups 0 and 3 are zero-variance.
  assert np.all(adv[[0, 1, 2, 9, 10, 11]] == 0.0)


@pytest.mark.parametrize("kw,msg", [
    (dict(group_size=1), "group_size=1"),
    (dict(group_size=1, advantage="grpo_unnormalized"), "group_size=1"),
    (dict(group_size=4, advantage="ppo"), "unknown advantage"),
    (dict(group_size=4, loss_agg="sum"), "unknown loss_agg"),
    (dict(group_size=4, clip_eps_low=1.0), "clip_eps_low"),
    (dict(group_size=4, warmup_steps=10, total_steps=5), "warmup_steps"),
    (dict(group_size=4, num_minibatches=0), "num_minibatches"),
    (dict(group_size=4, max_grad_norm=0.0), "max_grad_norm"),
])
def test_config_rejects_impossible_settings(kw, msg):
  with pytest.raises(ValueError, match=msg):
    grpo.GRPOConfig(**kw)


# ---------------------------------------------------------------------------------- optimiser


def test_schedule_warmup_then_cosine():
  cfg = grpo.GRPOConfig(group_size=2, learning_rate=1.0, warmup_steps=4, total_steps=12, end_lr_ratio=0.1,
                        max_grad_norm=None)
  expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 8: 0.1 + 0.9 * 0.5, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
              12: 0.1, 30: 0.1}
  for step, lr in expected.items():
    np.testing.assert_allclose(grpo.learning_rate(cfg, step), lr, rtol=1e-6)
  # The optimiser follows the schedule: Adam's first steps move a parameter by about lr * sign(grad).
  tx = grpo.make_optimizer(cfg)
  p = {"w": jnp.zeros(())}
  state = tx.init(p)
  moves = []
  for _ in range(3):
    upd, state = tx.update({"w": jnp.ones(())}, state, p)
    moves.append(float(upd["w"]))
  np.testing.assert_allclose(moves, [-0.25, -0.5, -0.75], rtol=1e-4)
  assert int(grpo.optimizer_step(state)) == 3


# ------------------------------------------------------------------- the tiny model, end to end

FAST_COMPILE = dict(compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})

GROUP = 2
ROWS = 8
SEQ = 40
RESPONSE_START = 24
M = 2  # spatial merge size of the tiny preset
IMAGES = {"A": (1, 2 * M, 2 * M), "B": (1, 2 * M, 3 * M), "C": (1, M, 2 * M), "D": (1, 3 * M, 2 * M)}
ROW_IMAGES = [["A"], ["A"], ["B", "C"], ["B", "C"], [], [], ["D"], ["D"]]  # a group shares its prompt images


def _synthetic_batch(config):
  """8 rows in 4 groups: left padding, 0-2 images per row, responses from RESPONSE_START on."""
  rng = np.random.RandomState(0)
  pixels = {k: rng.randn(int(np.prod(g)), config.vision.patch_dim).astype(np.float32) for k, g in IMAGES.items()}
  tokens = np.full((ROWS, SEQ), config.pad_token_id, np.int32)
  attn = np.zeros((ROWS, SEQ), np.int32)
  prompt_text = {g: rng.randint(0, 400, 24) for g in range(ROWS // GROUP)}
  for r in range(ROWS):
    row = [int(prompt_text[r // GROUP][0])]
    for name in ROW_IMAGES[r]:
      row += [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(IMAGES[name])) // 4)
      row += [config.vision_end_token_id]
    row += list(prompt_text[r // GROUP][1:RESPONSE_START - len(row) - (r % 3)])
    pad = RESPONSE_START - len(row)
    tokens[r, pad:RESPONSE_START] = row
    attn[r, pad:] = 1
    tokens[r, RESPONSE_START:] = rng.randint(0, 400, SEQ - RESPONSE_START)
  action = np.zeros((ROWS, SEQ), bool)
  action[:, RESPONSE_START:] = True
  pv = np.concatenate([pixels[n] for imgs in ROW_IMAGES for n in imgs])
  grid = np.array([IMAGES[n] for imgs in ROW_IMAGES for n in imgs] + [(0, 0, 0)], np.int32)  # one unused slot
  rewards = np.array([1.0, 0.0, 0.2, 1.0, 0.5, 0.5, 0.0, 1.0], np.float32)  # group 2 has no signal
  status = np.array([0, 0, 0, 0, 0, 0, 0, 1], np.int32)  # row 7 truncated: masked trajectory
  mcfg = masks.MaskConfig(group_size=GROUP)
  loss_mask, _ = masks.loss_mask(action, attn, status, np.zeros(ROWS, np.int32), rewards, mcfg)
  stats = masks.group_stats_mask(status, np.zeros(ROWS, np.int32), mcfg)
  return dict(tokens=tokens, attention_mask=attn, loss_mask=np.asarray(loss_mask), pixel_values=pv,
              image_grid_thw=grid), rewards, stats


@pytest.fixture(scope="module")
def env():
  config = get_preset("tiny")
  model = qvl.Qwen25VL(config)
  params = qvl.init_params(config, jax.random.key(0))
  # adam_eps 1e-5 (not 1e-8) keeps Adam's first steps Lipschitz in the gradient, so the sharded
  # and unsharded steps, whose gradients differ by float reassociation, agree within 1e-5.
  cfg = grpo.GRPOConfig(group_size=GROUP, learning_rate=3e-3, warmup_steps=0, total_steps=100, num_minibatches=2,
                        ppo_epochs=2, adam_eps=1e-5)
  batch, rewards, stats = _synthetic_batch(config)
  batch["advantages"] = np.asarray(grpo.compute_advantages(cfg, rewards, stats))
  forward = lambda p: np.asarray(logprobs.sequence_logprobs(model, p, batch["tokens"], batch["attention_mask"],
                                                            batch["pixel_values"], batch["image_grid_thw"]))
  batch["old_logp"] = forward(params)  # on-policy: the "rollout" sampled with these params
  split = lambda b, perm=None: grpo.split_minibatches(b, 2, image_token_id=config.image_token_id,
                                                      merge_unit=config.vision.merge_unit, perm=perm)
  step = grpo.jit_train_step(model, cfg, jit_kwargs=FAST_COMPILE)
  return dict(config=config, model=model, params=params, cfg=cfg, batch=batch, forward=forward, split=split,
              step=step, opt_state=grpo.make_optimizer(cfg).init(params))


def _equal_trees(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_minibatches_carry_their_own_images(env):
  # A shuffled split: each minibatch's forward pass (images re-laid out on the host) gives the
  # same log-probs as the full batch, so the first on-policy step sees ratio 1 everywhere.
  perm = np.array([7, 2, 4, 1, 0, 6, 3, 5])
  mbs = env["split"](env["batch"], perm)
  assert [len(mb["tokens"]) for mb in mbs] == [4, 4]
  np.testing.assert_array_equal(mbs[0]["tokens"], env["batch"]["tokens"][perm[:4]])
  assert mbs[0]["pixel_values"].shape == env["batch"]["pixel_values"].shape  # static budget
  np.testing.assert_array_equal(mbs[0]["image_grid_thw"][:4], [IMAGES[n] for r in perm[:4] for n in ROW_IMAGES[r]])
  for mb in mbs:
    _, _, m = env["step"](env["params"], env["opt_state"], mb)
    assert float(m["tokens"]) > 0
    np.testing.assert_allclose(float(m["ratio_max"]), 1.0, atol=1e-4)
    assert float(m["approx_kl"]) < 1e-8 and float(m["skipped"]) == 0.0
    assert float(m["learning_rate"]) == pytest.approx(env["cfg"].learning_rate)
  with pytest.raises(ValueError, match="image placeholder"):
    bad = dict(env["batch"], image_grid_thw=env["batch"]["image_grid_thw"][1:])
    env["split"](bad)
  with pytest.raises(ValueError, match="budgets"):
    grpo.split_minibatches(env["batch"], 2, image_token_id=env["config"].image_token_id, merge_unit=4,
                           patch_budget=16)


def test_split_text_only_batch_and_bad_inputs():
  tokens = np.arange(24, dtype=np.int32).reshape(6, 4)
  batch = dict(tokens=tokens, attention_mask=np.ones_like(tokens), loss_mask=np.ones((6, 4), np.float32),
               advantages=np.arange(6, dtype=np.float32), old_logp=np.zeros((6, 4), np.float32))
  mbs = grpo.split_minibatches(batch, 3, image_token_id=999, merge_unit=4, perm=[5, 4, 3, 2, 1, 0])
  assert [mb["advantages"].tolist() for mb in mbs] == [[5, 4], [3, 2], [1, 0]]
  assert "pixel_values" not in mbs[0]
  with pytest.raises(ValueError, match="do not split"):
    grpo.split_minibatches(batch, 4, image_token_id=999, merge_unit=4)
  with pytest.raises(ValueError, match="permutation"):
    grpo.split_minibatches(batch, 2, image_token_id=999, merge_unit=4, perm=[0, 0, 1, 2, 3, 4])
  with pytest.raises(ValueError, match="no pixel_values"):
    grpo.split_minibatches(batch, 2, image_token_id=5, merge_unit=4)


def test_non_finite_loss_skips_the_update(env):
  mb = env["split"](env["batch"])[0]
  assert mb["loss_mask"][0].sum() > 0
  mb["advantages"] = mb["advantages"].copy()
  mb["advantages"][0] = np.nan
  params, opt_state, m = env["step"](env["params"], env["opt_state"], mb)
  assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
  assert _equal_trees(params, env["params"]) and _equal_trees(opt_state, env["opt_state"])
  assert int(grpo.optimizer_step(opt_state)) == 0
  assert "grad_norm" in m


def test_masked_tokens_and_trajectories_do_not_touch_the_param_gradient(env):
  # One step from a fresh optimiser state: Adam's new first moment is (1 - b1) x the clipped
  # gradient, so bit-identical optimiser states mean bit-identical gradients.
  step, params, opt_state = env["step"], env["params"], env["opt_state"]
  mb = env["split"](env["batch"], np.array([0, 7, 2, 3, 1, 4, 5, 6]))[0]  # rows 0 (kept), 7 (masked), 2, 3
  assert mb["loss_mask"][1].sum() == 0 and mb["loss_mask"][0].sum() > 0
  mb["loss_mask"] = mb["loss_mask"].copy()
  mb["loss_mask"][0, -1] = 0.0  # the last token of a kept row leaves the loss
  base_params, base_state, base_m = step(params, opt_state, mb)
  assert float(base_m["skipped"]) == 0.0 and float(base_m["grad_norm"]) > 0

  pert = {k: v.copy() for k, v in mb.items()}
  pert["tokens"][0, -1] = (mb["tokens"][0, -1] + 17) % 400  # a masked token's target
  text = (pert["attention_mask"][1] > 0) & (pert["tokens"][1] < 400)
  pert["tokens"][1, text] = (pert["tokens"][1, text] + 5) % 400  # a masked trajectory, every text token
  pert["advantages"][1] = 1e6
  pert["old_logp"][1] = -1e30
  pert["old_logp"][0, -1] = 1e30
  pert["old_logp"][pert["loss_mask"] == 0] = np.float32(-1e30)
  got_params, got_state, got_m = step(params, opt_state, pert)
  assert float(got_m["grad_norm"]) == float(base_m["grad_norm"])
  assert _equal_trees(got_state, base_state) and _equal_trees(got_params, base_params)
  # Control: the same kind of change on a loss token does change the gradient.
  ctrl = {k: v.copy() for k, v in mb.items()}
  ctrl["tokens"][0, -2] = (mb["tokens"][0, -2] + 17) % 400
  _, ctrl_state, _ = step(params, opt_state, ctrl)
  assert not _equal_trees(ctrl_state, base_state)


def test_update_steps_raise_positive_advantage_tokens(env):
  cfg, batch = env["cfg"], env["batch"]
  params = jax.tree_util.tree_map(jnp.array, env["params"])  # a copy
  opt_state = grpo.make_optimizer(cfg).init(params)
  loss0, _ = grpo.policy_loss(batch["old_logp"], batch["old_logp"], batch["advantages"], batch["loss_mask"], cfg)
  for i in range(3):
    params, opt_state, m = grpo.update(env["model"], cfg, params, opt_state, batch, jax.random.key(i),
                                       step_fn=env["step"])
    assert m["steps"] == cfg.num_minibatches * cfg.ppo_epochs and m["skipped"] == 0
  assert int(grpo.optimizer_step(opt_state)) == 12
  logp = env["forward"](params)
  loss1, m1 = grpo.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"], cfg)
  assert float(loss1) < float(loss0) - 0.05
  mask = batch["loss_mask"] > 0
  delta = (logp - batch["old_logp"])
  adv = batch["advantages"][:, None] * np.ones_like(delta)
  assert delta[mask & (adv > 0)].mean() > 0.05
  assert delta[mask & (adv < 0)].mean() < -0.05
  assert float(m1["clip_fraction"]) > 0  # later steps ran against the stored sampling log-probs


def test_sharded_step_equals_unsharded(env):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  step = grpo.sharded_train_step(env["model"], env["cfg"], mesh, jit_kwargs=FAST_COMPILE)
  mb0, mb1 = env["split"](env["batch"], np.array([3, 0, 6, 1, 2, 5, 4, 7]))
  params, opt_state, m = env["step"](env["params"], env["opt_state"], mb0)
  # Fresh copies: the sharded step donates its params and optimiser state.
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  s_params = jax.device_put(copy(env["params"]), step.param_shardings)
  s_opt = jax.device_put(copy(env["opt_state"]), step.opt_state_shardings)
  s_params, s_opt, sm = step(s_params, s_opt, mb0)
  for k in ("loss", "grad_norm", "clip_fraction", "tokens"):
    np.testing.assert_allclose(float(sm[k]), float(m[k]), rtol=1e-5, atol=1e-7)
  q = s_params["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.size * 8 == q.size
  mu = s_opt[1][0].mu["layers_0"]["mlp"]["gate_proj"]["kernel"]  # Adam moments are sharded like the params
  assert mu.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0),
                         s_params, params)
  # The sharded state round-trips through a second step.
  params, _, m = env["step"](params, opt_state, mb1)
  s_params, s_opt, sm = step(s_params, s_opt, mb1)
  np.testing.assert_allclose(float(sm["loss"]), float(m["loss"]), rtol=1e-5, atol=1e-7)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0),
                         s_params, params)
  assert int(grpo.optimizer_step(s_opt)) == 2


def test_trimming_all_padding_columns_keeps_the_logprobs(env):
  b, config = env["batch"], env["config"]
  left, right = 37, 50
  wide = {k: (np.pad(v, ((0, 0), (left, right)), constant_values=config.pad_token_id if k == "tokens" else 0)
              if k in ("tokens", "attention_mask", "loss_mask", "old_logp") else v) for k, v in b.items()}
  used = b["attention_mask"].astype(bool).any(0)
  span = int(np.nonzero(used)[0][-1] - np.nonzero(used)[0][0] + 1)
  trimmed = grpo.trim_padding_columns(wide, multiple=16)
  assert trimmed["tokens"].shape == (b["tokens"].shape[0], -(-span // 16) * 16)
  assert trimmed["pixel_values"] is wide["pixel_values"] or np.array_equal(trimmed["pixel_values"], b["pixel_values"])
  for k in ("tokens", "attention_mask", "loss_mask", "old_logp"):  # nothing used is cut
    assert (trimmed[k] * trimmed["attention_mask"]).sum() == pytest.approx((b[k] * b["attention_mask"]).sum())
  logp = np.asarray(logprobs.sequence_logprobs(env["model"], env["params"], trimmed["tokens"],
                                               trimmed["attention_mask"], b["pixel_values"], b["image_grid_thw"]))
  # Every real token after the first of its row (the first has no prefix; it is never trained on).
  after_first = lambda m: m.astype(bool) & (np.cumsum(m, axis=1) > 1)
  np.testing.assert_allclose(logp[after_first(trimmed["attention_mask"])], b["old_logp"][after_first(b["attention_mask"])],
                             atol=1e-5)
  assert grpo.trim_padding_columns(wide, multiple=0)["tokens"].shape == wide["tokens"].shape


def test_equal_settings_share_one_sharded_step(env):
  """A second Trainer of the same settings reuses the compiled update (no recompile)."""
  mesh, again = (parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}) for _ in range(2))
  model_again = qvl.Qwen25VL(env["model"].config)
  cfg_again = dataclasses.replace(env["cfg"])
  step = grpo.sharded_train_step(env["model"], env["cfg"], mesh)
  assert grpo.sharded_train_step(model_again, cfg_again, again) is step
  assert grpo.sharded_train_step(env["model"], dataclasses.replace(env["cfg"], clip_eps_low=0.3), mesh) is not step
  assert grpo.sharded_train_step(env["model"], env["cfg"], parallel.make_mesh({"data": 8})) is not step
  assert grpo.sharded_train_step(env["model"], env["cfg"], mesh, jit_kwargs=FAST_COMPILE) is not step
  rules = list(parallel.DEFAULT_RULES)  # unhashable: built for the caller, not shared
  assert grpo.sharded_train_step(env["model"], env["cfg"], mesh, rules) is not grpo.sharded_train_step(
      env["model"], env["cfg"], mesh, rules)
