"""GRPO: config validation, the train step and the update on the tiny model — masked tokens get
exactly zero gradient, non-finite steps are skipped, minibatches carry their own images, learning
happens, sharded == unsharded.

The tiny-model steps compile with LLVM's cheap pipeline (``FAST_COMPILE``): on a 2-core CPU the
optimised pipeline more than doubles the file's run time, and the programs' semantics are the same.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from imagent_jax import parallel
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.models.registry import family_of
from imagent_jax.rl import advantages, grpo, logprobs, losses, masks, optim
from imagent_jax.rl import batch as batch_lib

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
  per_row = np.array([len(imgs) for imgs in ROW_IMAGES], np.int32)
  return dict(tokens=tokens, attention_mask=attn, loss_mask=np.asarray(loss_mask), pixel_values=pv,
              image_grid_thw=grid, images_per_row=per_row), rewards, stats


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
  batch["advantages"] = np.asarray(advantages.compute_advantages(cfg, rewards, stats))
  forward = lambda p: np.asarray(logprobs.sequence_logprobs(model, p, batch["tokens"], batch["attention_mask"],
                                                            batch["pixel_values"], batch["image_grid_thw"]))
  batch["old_logp"] = forward(params)  # on-policy: the "rollout" sampled with these params
  split = lambda b, perm=None: batch_lib.split_minibatches(b, 2, image_token_id=config.image_token_id,
                                                           merge_unit=config.vision.merge_unit, perm=perm)
  step = grpo.jit_train_step(model, cfg, jit_kwargs=FAST_COMPILE)
  return dict(config=config, model=model, params=params, cfg=cfg, batch=batch, forward=forward, split=split,
              step=step, opt_state=optim.make_optimizer(cfg).init(params))


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
    assert float(m["tokens"]) > 0 and float(m["entropy"]) > 0  # the policy's entropy, logged every step
    np.testing.assert_allclose(float(m["ratio_max"]), 1.0, atol=1e-4)
    assert float(m["approx_kl"]) < 1e-8 and float(m["skipped"]) == 0.0
    assert float(m["learning_rate"]) == pytest.approx(env["cfg"].learning_rate)
  with pytest.raises(ValueError, match="images_per_row counts 8 images but image_grid_thw holds 7"):
    env["split"](dict(env["batch"], image_grid_thw=env["batch"]["image_grid_thw"][1:]))
  with pytest.raises(ValueError, match="row 0 has 4 image placeholder tokens but its 2 image"):
    env["split"](dict(env["batch"], images_per_row=np.array([2, 0, 2, 2, 0, 0, 1, 1])))
  with pytest.raises(ValueError, match="budgets"):
    batch_lib.split_minibatches(env["batch"], 2, image_token_id=env["config"].image_token_id, merge_unit=4,
                                patch_budget=16)


def test_non_finite_loss_skips_the_update(env):
  mb = env["split"](env["batch"])[0]
  assert mb["loss_mask"][0].sum() > 0
  mb["advantages"] = mb["advantages"].copy()
  mb["advantages"][0] = np.nan
  params, opt_state, m = env["step"](env["params"], env["opt_state"], mb)
  assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
  assert _equal_trees(params, env["params"]) and _equal_trees(opt_state, env["opt_state"])
  assert int(optim.optimizer_step(opt_state)) == 0
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
  opt_state = optim.make_optimizer(cfg).init(params)
  loss0, _ = losses.policy_loss(batch["old_logp"], batch["old_logp"], batch["advantages"], batch["loss_mask"], cfg)
  for i in range(3):
    params, opt_state, m = grpo.update(env["model"], cfg, params, opt_state, batch, jax.random.key(i),
                                       step_fn=env["step"])
    assert m["steps"] == cfg.num_minibatches * cfg.ppo_epochs and m["skipped"] == 0
  assert int(optim.optimizer_step(opt_state)) == 12
  logp = env["forward"](params)
  loss1, m1 = losses.policy_loss(logp, batch["old_logp"], batch["advantages"], batch["loss_mask"], cfg)
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
  assert int(optim.optimizer_step(s_opt)) == 2


def test_trimming_all_padding_columns_keeps_the_logprobs(env):
  b, config = env["batch"], env["config"]
  left, right = 37, 50
  wide = {k: (np.pad(v, ((0, 0), (left, right)), constant_values=config.pad_token_id if k == "tokens" else 0)
              if k in ("tokens", "attention_mask", "loss_mask", "old_logp") else v) for k, v in b.items()}
  used = b["attention_mask"].astype(bool).any(0)
  span = int(np.nonzero(used)[0][-1] - np.nonzero(used)[0][0] + 1)
  trimmed = batch_lib.trim_padding_columns(wide, multiple=16)
  assert trimmed["tokens"].shape == (b["tokens"].shape[0], -(-span // 16) * 16)
  assert trimmed["pixel_values"] is wide["pixel_values"] or np.array_equal(trimmed["pixel_values"], b["pixel_values"])
  for k in ("tokens", "attention_mask", "loss_mask", "old_logp"):  # nothing used is cut
    assert (trimmed[k] * trimmed["attention_mask"]).sum() == pytest.approx((b[k] * b["attention_mask"]).sum())
  logp = np.asarray(logprobs.sequence_logprobs(env["model"], env["params"], trimmed["tokens"],
                                               trimmed["attention_mask"], b["pixel_values"], b["image_grid_thw"]))
  # Every real token after the first of its row (the first has no prefix; it is never trained on).
  after_first = lambda m: m.astype(bool) & (np.cumsum(m, axis=1) > 1)
  np.testing.assert_allclose(logp[after_first(trimmed["attention_mask"])],
                             b["old_logp"][after_first(b["attention_mask"])], atol=1e-5)
  assert batch_lib.trim_padding_columns(wide, multiple=0)["tokens"].shape == wide["tokens"].shape


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


def test_the_loss_reports_the_policy_entropy_and_chunking_changes_nothing(env):
  """``grpo_loss`` always reports ``entropy`` (token mean over loss tokens of the dense pass's
  entropies) without an entropy term in the loss at ``entropy_coef = 0`` (the bonus itself:
  test_losses); a chunked vocabulary projection (7 positions of 39, not dividing) gives the loss,
  metrics and gradient of one chunk."""
  model, params, cfg = env["model"], env["params"], env["cfg"]
  mb = env["split"](env["batch"])[0]

  def run(chunk):  # the config key (rl.logprob_chunk) sets the chunk; 0: all positions at once
    fn = lambda p: grpo.grpo_loss(model, dataclasses.replace(cfg, logprob_chunk=chunk), p, mb)
    return jax.jit(jax.value_and_grad(fn, has_aux=True), **FAST_COMPILE)(params)

  with pytest.raises(ValueError, match="logprob_chunk"):
    dataclasses.replace(cfg, logprob_chunk=-1)
  (loss, m), grads = run(0)
  (loss7, m7), grads7 = run(7)
  logits = jax.jit(lambda p, b: model.apply({"params": p}, input_ids=b["tokens"], attention_mask=b["attention_mask"],
                                            pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"]),
                   **FAST_COMPILE)(params, mb)  # [R, T, V]: the dense pass
  banned = family_of(env["config"]).banned_token_ids(env["config"])
  _, entropy = logprobs.logprobs_of(logits[:, :-1], mb["tokens"][:, 1:], cfg.temperature, banned, with_entropy=True)
  mask = mb["loss_mask"][:, 1:] > 0
  want = float(np.asarray(entropy)[mask].mean())
  assert want > 1.0
  np.testing.assert_allclose(float(m["entropy"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(m["pg_loss"]), rtol=1e-6)  # no entropy term at entropy_coef 0
  np.testing.assert_allclose(float(loss7), float(loss), rtol=1e-5, atol=1e-7)
  for k in m:
    np.testing.assert_allclose(float(m7[k]), float(m[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(optax.tree.norm(grads)) > 0
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads7, grads)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean"])
def test_gradient_accumulation_gives_the_one_pass_update(env, loss_agg):
  # One optimiser step over the whole batch, taken once in one pass and once as 2 and as 4
  # micro-batches (each with its own images, cut to the slots it uses), with a KL reference given
  # as parameters: the same loss, metrics and new params up to float summation order. The rows of
  # the batch differ in loss tokens (a masked trajectory, a dropped group), so a plain mean of the
  # micro-batches' losses would not be the whole batch's.
  config, model, b = env["config"], env["model"], env["batch"]
  ref = jax.tree_util.tree_map(lambda x: x * 0.9, env["params"])
  base = dataclasses.replace(env["cfg"], num_minibatches=1, ppo_epochs=1, loss_agg=loss_agg, kl_coef=0.1)
  results = {}
  for k in (1, 2, 4):
    cfg = dataclasses.replace(base, grad_accum=k)
    opt = optim.make_optimizer(cfg).init(env["params"])
    step = grpo.jit_train_step(model, cfg, jit_kwargs=FAST_COMPILE)
    results[k] = grpo.update(model, cfg, env["params"], opt, dict(b, action_mask=b["loss_mask"] > 0),
                             jax.random.key(3), step_fn=step, ref_params=ref, image_bucket=1,
                             slot_patches=int(np.prod(IMAGES["B"])))
  params1, _, m1 = results[1]
  for k in (2, 4):
    params_k, _, mk = results[k]
    for key in ("loss", "pg_loss", "kl", "entropy", "approx_kl", "clip_fraction", "tokens", "grad_norm"):
      np.testing.assert_allclose(float(mk[key]), float(m1[key]), rtol=2e-5, atol=1e-7, err_msg=f"{key}, k={k}")
    np.testing.assert_allclose(float(mk["logprob_gap_max"]), float(m1["logprob_gap_max"]), atol=1e-5)
    jax.tree_util.tree_map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-6, rtol=0),
                           params_k, params1)
  assert float(m1["kl"]) > 0 and float(m1["tokens"]) > 0
  assert not _equal_trees(params1, env["params"])


def test_stacked_micro_batches_and_their_sharded_step(env):
  # stack_micro_batches cuts each piece's image slots to its own (rounded to the bucket) and pads
  # to the largest; the sharded step puts the rows of the stacked layout (axis 1) over the devices
  # and gives the unsharded step's result.
  cfg = dataclasses.replace(env["cfg"], num_minibatches=1, ppo_epochs=1, grad_accum=2)
  pieces = batch_lib.split_minibatches(env["batch"], 2, image_token_id=env["config"].image_token_id,
                                       merge_unit=env["config"].vision.merge_unit)
  slot = int(np.prod(IMAGES["B"]))
  stacked = batch_lib.stack_micro_batches(pieces, image_bucket=2, slot_patches=slot)
  # rows 0-3 own A, A, B+C, B+C (6 images), rows 4-7 own D, D (2): 6 slots, padded to the larger
  assert stacked["tokens"].shape == (2, 4, SEQ)
  assert stacked["image_grid_thw"].shape == (2, 6, 3) and stacked["pixel_values"].shape[:2] == (2, 6 * slot)
  np.testing.assert_array_equal(stacked["image_grid_thw"][1], [IMAGES["D"]] * 2 + [(0, 0, 0)] * 4)
  np.testing.assert_array_equal(stacked["pixel_values"][0][:len(pieces[0]["pixel_values"])][:10],
                                pieces[0]["pixel_values"][:10])
  shardings = parallel.batch_shardings(stacked, parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), row_axis=1)
  assert shardings["tokens"].spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None)
  assert shardings["pixel_values"].spec == jax.sharding.PartitionSpec(None, None, None)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  step = grpo.sharded_train_step(env["model"], cfg, mesh, jit_kwargs=FAST_COMPILE)
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  s_params, _, sm = step(jax.device_put(copy(env["params"]), step.param_shardings),
                         jax.device_put(copy(env["opt_state"]), step.opt_state_shardings), stacked)
  params, _, m = grpo.jit_train_step(env["model"], cfg, jit_kwargs=FAST_COMPILE)(env["params"], env["opt_state"], stacked)
  np.testing.assert_allclose(float(sm["loss"]), float(m["loss"]), rtol=1e-5, atol=1e-7)
  jax.tree_util.tree_map(lambda a, c: np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=0),
                         s_params, params)


def test_the_reference_given_as_params_is_taken_in_the_step(env):
  # ref_params: the step takes the KL reference's log-probs itself, equal to a separate
  # reference pass given as batch['ref_logp']; giving both, or neither with a KL term, is an error.
  cfg = dataclasses.replace(env["cfg"], kl_coef=0.1)
  model, b = env["model"], env["split"](env["batch"])[0]
  ref = jax.tree_util.tree_map(lambda x: x * 0.9, env["params"])
  step = grpo.jit_train_step(model, cfg, jit_kwargs=FAST_COMPILE)
  ref_logp = np.asarray(logprobs.sequence_logprobs(model, ref, b["tokens"], b["attention_mask"], b["pixel_values"],
                                                   b["image_grid_thw"]))
  p1, _, m1 = step(env["params"], env["opt_state"], dict(b, ref_logp=ref_logp))
  p2, _, m2 = step(env["params"], env["opt_state"], b, ref)
  assert float(m2["kl"]) > 1e-4
  np.testing.assert_allclose(float(m2["kl"]), float(m1["kl"]), rtol=1e-5)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0), p1, p2)
  assert float(m2["logprob_gap_max"]) < 1e-4  # on-policy: the step sees what the "rollout" sampled from
  with pytest.raises(ValueError, match="not both"):
    step(env["params"], env["opt_state"], dict(b, ref_logp=ref_logp), ref)
  with pytest.raises(ValueError, match="needs the frozen reference"):
    step(env["params"], env["opt_state"], b)
