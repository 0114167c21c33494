"""The sampler: greedy equals transformers' generate, log-probs equal the forward pass, options work."""

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from imagent_jax.models import hf_io
from imagent_jax.models.registry import family_of
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.models.qwen2_5_vl.positions import mrope_positions
from imagent_jax.sampling import sampler

N_NEW = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from transformers import Qwen2VLImageProcessor
  path = hf_fixtures.save_tiny_hf_checkpoint(tmp_path_factory.mktemp("gen"), seed=3)
  config, params = hf_io.load_pretrained(path)
  rng = np.random.RandomState(0)
  proc = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
  imgs = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(60, 90), (200, 56), (90, 150)]]
  out = proc(images=imgs, return_tensors="np")
  return config, params, hf_fixtures.make_tiny_hf_model(seed=3), out["pixel_values"], out["image_grid_thw"]


def _batch(config, rng, rows_parts):
  rows = []
  for parts in rows_parts:
    ids = []
    for p in parts:
      if isinstance(p, int):
        ids += list(rng.randint(0, 400, size=p))
      else:
        ids += [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(p)) // 4) + [
            config.vision_end_token_id]
    rows.append(ids)
  width = max(map(len, rows))
  ids = np.array([[config.pad_token_id] * (width - len(r)) + r for r in rows])
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
  return ids, mask


def _hf_greedy(model, config, ids, mask, pv=None, grid=None):
  ids_t = torch.tensor(ids)
  kw = {}
  if pv is not None:
    kw = dict(pixel_values=torch.tensor(pv), image_grid_thw=torch.tensor(grid),
              mm_token_type_ids=(ids_t == config.image_token_id).int())
  with torch.no_grad():
    out = model.generate(input_ids=ids_t, attention_mask=torch.tensor(mask), max_new_tokens=N_NEW, do_sample=False,
                         pad_token_id=config.pad_token_id, eos_token_id=None, **kw)
  return out[:, ids.shape[1]:].numpy()


def test_greedy_equals_transformers_text_left_padded(setup):
  config, params, torch_model, _, _ = setup
  ids, mask = _batch(config, np.random.RandomState(1), [[5], [9], [2]])
  ours = sampler.generate(config, params, dict(input_ids=ids, attention_mask=mask), max_new_tokens=N_NEW)
  np.testing.assert_array_equal(np.asarray(ours["tokens"]), _hf_greedy(torch_model, config, ids, mask))
  np.testing.assert_array_equal(np.asarray(ours["lengths"]), [N_NEW] * 3)


def test_greedy_equals_transformers_multi_image_left_padded(setup):
  config, params, torch_model, pv, grid = setup
  ids, mask = _batch(config, np.random.RandomState(2), [[3, grid[0], 4, grid[1], 2], [2, grid[2], 2]])
  inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
  ours = sampler.generate(config, params, inputs, max_new_tokens=N_NEW)
  np.testing.assert_array_equal(np.asarray(ours["tokens"]), _hf_greedy(torch_model, config, ids, mask, pv, grid))


def test_per_image_vision_slots_equal_one_slot(setup):
  """The default (each image in a slot of the batch's largest image) samples what one slot over
  every patch does, with less memory: the vision tower's scores grow with the images, not with the
  square of the batch's patches."""
  config, params, _, pv, grid = setup
  ids, mask = _batch(config, np.random.RandomState(2), [[3, grid[0], 4, grid[1], 2], [2, grid[2], 2]])
  inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid)
  slots = sampler.generate(config, params, inputs, max_new_tokens=N_NEW, temperature=1.0, rng=jax.random.key(3))
  one = sampler.generate(config, params, inputs, max_new_tokens=N_NEW, temperature=1.0, rng=jax.random.key(3),
                         max_image_patches=0)
  np.testing.assert_array_equal(np.asarray(slots["tokens"]), np.asarray(one["tokens"]))
  np.testing.assert_allclose(np.asarray(slots["logprobs"]), np.asarray(one["logprobs"]), atol=1e-5)
  assert int(np.prod(grid, axis=-1).max()) < pv.shape[0]  # slots smaller than the batch: the test can tell

  # XLA's plan for 16 images of 16x16 patches: one slot holds [heads, 4096, 4096] scores
  n, side = 16, 16
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  ids_spec = spec((2, n * side * side // 4 + 8), jnp.int32)
  def temp_bytes(patches):
    model = family_of(config).module(config, max_frame_patches=patches)
    compiled = sampler._generate.lower(
        model, params, ids_spec, ids_spec, spec((n * side * side, pv.shape[1]), jnp.float32), spec((n, 3), jnp.int32),
        jax.random.key(0), max_new_tokens=2, temperature=0.0, top_k=0, top_p=1.0, stop_token_ids=(), pad_id=0,
        group_size=1).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(side * side) * 4 < temp_bytes(0)


def test_padded_image_budgets_sample_what_the_exact_images_do(setup):
  """Patches and grid rows padded to a static budget (zero patches, all-zero grid rows, as
  ``images.pack_patches`` lays them out) sample the same tokens and log-probs as the exact images:
  callers with batches of several sizes compile one program."""
  config, params, _, pv, grid = setup
  ids, mask = _batch(config, np.random.RandomState(2), [[3, grid[0], 4, grid[1], 2], [2, grid[2], 2]])
  exact = sampler.generate(config, params, dict(input_ids=ids, attention_mask=mask, pixel_values=pv,
                                                image_grid_thw=grid), max_new_tokens=N_NEW)
  padded = dict(input_ids=ids, attention_mask=mask, pixel_values=np.pad(pv, ((0, 64), (0, 0))),
                image_grid_thw=np.pad(grid, ((0, 2), (0, 0))))
  ours = sampler.generate(config, params, padded, max_new_tokens=N_NEW,
                          max_image_patches=int(np.prod(grid, axis=-1).max()))
  np.testing.assert_array_equal(np.asarray(ours["tokens"]), np.asarray(exact["tokens"]))
  np.testing.assert_allclose(np.asarray(ours["logprobs"]), np.asarray(exact["logprobs"]), atol=1e-5)


def test_logprobs_equal_the_forward_pass_and_stop_tokens(setup):
  config, params, _, pv, grid = setup
  ids, mask = _batch(config, np.random.RandomState(3), [[3, grid[2], 4], [6]])
  inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pv[-int(grid[2].prod()):], image_grid_thw=grid[2:])
  free = sampler.generate(config, params, inputs, max_new_tokens=12, temperature=1.0, rng=jax.random.key(5))
  stop = int(np.asarray(free["tokens"])[0, 4])  # make row 0 stop at its 5th token (or earlier)
  out = sampler.generate(config, params, inputs, max_new_tokens=12, temperature=1.0, rng=jax.random.key(5),
                         stop_token_ids=(stop,))
  toks, logps, lens = (np.asarray(out[k]) for k in ("tokens", "logprobs", "lengths"))
  first = int(np.flatnonzero(toks[0] == stop)[0])
  assert lens[0] == first + 1 <= 5
  assert (toks[0, lens[0]:] == config.pad_token_id).all() and (logps[0, lens[0]:] == 0).all()
  np.testing.assert_array_equal(toks[0, :lens[0]], np.asarray(free["tokens"])[0, :lens[0]])
  # Teacher-forced forward pass over prompt + sampled tokens reproduces the sampling log-probs.
  full = np.concatenate([ids, toks], axis=1)
  fmask = np.concatenate([mask, np.ones_like(toks)], axis=1)
  model = qvl.Qwen25VL(config)
  logits = jax.jit(lambda p, i, m, x, g: model.apply({"params": p}, input_ids=i, attention_mask=m, pixel_values=x,
                                                     image_grid_thw=g))(
      params, full, fmask, inputs["pixel_values"], inputs["image_grid_thw"])
  lp = jax.nn.log_softmax(np.asarray(logits)[:, ids.shape[1] - 1:-1], axis=-1)
  ref = np.take_along_axis(np.asarray(lp), toks[..., None], axis=-1)[..., 0]
  for r in range(2):
    np.testing.assert_allclose(logps[r, :lens[r]], ref[r, :lens[r]], atol=1e-4)


def test_group_rows_share_one_prefill(setup):
  config, params, _, _, _ = setup
  ids, mask = _batch(config, np.random.RandomState(4), [[4], [7]])
  inputs = dict(input_ids=ids, attention_mask=mask)
  greedy = np.asarray(sampler.generate(config, params, inputs, max_new_tokens=8)["tokens"])
  grouped = np.asarray(sampler.generate(config, params, inputs, max_new_tokens=8, group_size=3)["tokens"])
  np.testing.assert_array_equal(grouped, np.repeat(greedy, 3, axis=0))
  sampled = np.asarray(sampler.generate(config, params, inputs, max_new_tokens=8, group_size=4, temperature=2.0,
                                        rng=jax.random.key(1))["tokens"])
  assert sampled.shape == (8, 8)
  assert len({tuple(r) for r in sampled[:4]}) > 1  # the group's samples differ


def test_prefill_logits_are_the_forward_logits_at_each_rows_last_token(setup):
  """Prefill sends only each row's last real position through the head; it must be the forward's."""
  config, params, _, pv, grid = setup
  ids, mask = _batch(config, np.random.RandomState(8), [[3, grid[2], 4], [6], [11]])  # left-padded, 3 lengths
  pv, grid = pv[-int(grid[2].prod()):], grid[2:]
  model = qvl.Qwen25VL(config)
  state = jax.jit(lambda p, i, m, x, g: sampler.prefill(model, p, i, m, x, g, ids.shape[1] + 4))(
      params, ids, mask, pv, grid)
  full = np.asarray(jax.jit(lambda p, i, m, x, g: model.apply({"params": p}, input_ids=i, attention_mask=m,
                                                              pixel_values=x, image_grid_thw=g))(
      params, ids, mask, pv, grid))
  assert state.logits.shape == (3, config.vocab_size)
  np.testing.assert_allclose(np.asarray(state.logits), full[:, -1], atol=1e-4)
  assert np.abs(full[:, -2] - full[:, -1]).max() > 1e-2  # another position would fail the check above
  # decode(logits_at=...) picks any position of each row, e.g. each row's first real token.
  embeds = model.apply({"params": params}, ids, model.apply({"params": params}, pv, grid,
                                                            method=qvl.Qwen25VL.encode_images),
                       method=qvl.Qwen25VL.embed)
  pos, _ = mrope_positions(ids, mask, grid, image_token_id=config.image_token_id,
                           spatial_merge_size=config.vision.spatial_merge_size)
  first = np.argmax(mask, axis=1)
  picked, _ = model.apply({"params": params}, embeds, pos, mask, logits_at=first, method=qvl.Qwen25VL.decode)
  np.testing.assert_allclose(np.asarray(picked), full[np.arange(3), first], atol=1e-4)


@pytest.mark.parametrize("attention", ["dense", "blocked"])
def test_shared_prefix_prefill_equals_the_whole_prefill(setup, attention):
  """Rows that open with the same text (a system turn) may prefill it once: the decode state (cache
  at every real slot, logits, positions) is the whole prefill's, for rows whose prompt starts
  before, at and after the window's first slot, with images after the prefix; then decoding on
  from it gives the same tokens."""
  config, params, _, pv, grid = setup
  rng = np.random.RandomState(5)
  end = config.eos_token_id  # stands for <|im_end|>, the system turn's last token
  head = list(rng.randint(0, 400, size=9)) + [end]
  rows = [head + list(rng.randint(0, 400, size=3)) + [config.vision_start_token_id]
          + [config.image_token_id] * (int(grid[0].prod()) // 4) + [config.vision_end_token_id, 7],
          head + [5, 6],
          head + list(rng.randint(0, 400, size=4)) + [config.vision_start_token_id]
          + [config.image_token_id] * (int(grid[2].prod()) // 4) + [config.vision_end_token_id]]
  width = max(map(len, rows))
  ids = np.array([[config.pad_token_id] * (width - len(r)) + r for r in rows], np.int32)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
  pv2 = np.concatenate([pv[:int(grid[0].prod())], pv[-int(grid[2].prod()):]])
  grid2 = np.stack([grid[0], grid[2]])
  k = sampler.shared_prefix_length(ids, mask, end, [config.image_token_id, config.vision_start_token_id])
  assert k == 10
  first = np.argmax(mask, axis=1)
  assert first.min() < k < first.max()  # one row's prompt starts inside the window
  model = qvl.Qwen25VL(config, attention=attention, attention_block=8)
  run = jax.jit(lambda p, i, m, x, g, shared: sampler.prefill(model, p, i, m, x, g, width + 6, shared_prefix=shared),
                static_argnums=5)
  whole, shared = run(params, ids, mask, pv2, grid2, 0), run(params, ids, mask, pv2, grid2, k)
  np.testing.assert_allclose(np.asarray(shared.logits), np.asarray(whole.logits), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(shared.next_pos), np.asarray(whole.next_pos))
  np.testing.assert_array_equal(np.asarray(shared.key_mask), np.asarray(whole.key_mask))
  real = np.asarray(whole.key_mask)
  slots_first = {"k": (0, 2, 1, 3), "v": (0, 3, 1, 2)}  # [B, S, Hkv, hd] from the cache layouts
  for a, b in zip(whole.cache, shared.cache):
    for name, axes in slots_first.items():
      np.testing.assert_allclose(np.asarray(b[name]).transpose(axes)[real], np.asarray(a[name]).transpose(axes)[real],
                                 atol=1e-4, err_msg=name)
  step = jax.jit(lambda p, st, t: sampler.decode_step(model, p, st, t))
  tok = jnp.argmax(whole.logits, -1).astype(jnp.int32)
  np.testing.assert_allclose(np.asarray(step(params, shared, tok).logits), np.asarray(step(params, whole, tok).logits),
                             atol=1e-4)
  # No shared opening: another first turn, a single row, images in the prefix, no end token.
  other = ids.copy()
  other[1, first[1] + 2] += 1
  assert sampler.shared_prefix_length(other, mask, end, [config.image_token_id]) == 0
  assert sampler.shared_prefix_length(ids[:1], mask[:1], end, [config.image_token_id]) == 0
  assert sampler.shared_prefix_length(ids, mask, end, [int(head[3])]) == 0
  assert sampler.shared_prefix_length(ids, mask, 401, [config.image_token_id]) == 0


def test_decode_model_steps_like_the_model(setup):
  """``sampler.decode_model`` (the form decode loops step with; on CPU attention over the used
  cache prefix) gives the plain model's logits step after step, and is the model itself off CPU."""
  config, params, _, _, _ = setup
  ids, mask = _batch(config, np.random.RandomState(5), [[9], [3, 4], [17]])
  model = family_of(config).module(config)
  fast = sampler.decode_model(model, "cpu")
  assert fast.decode_windows > 1
  assert sampler.decode_model(model, "gpu") is model
  state = sampler.prefill(model, params, ids, mask, None, None, ids.shape[1] + 40)
  step = jax.jit(lambda m, p, st, tok, active: sampler.decode_step(m, p, st, tok, active), static_argnums=0)
  ref = got = state
  active = jnp.asarray([True, False, True])  # a paused row keeps its slot
  for i in range(36):  # the used slots cross several of the cache's prefixes
    tok = jnp.argmax(ref.logits, -1).astype(jnp.int32)
    ref = step(model, params, ref, tok, active)
    got = step(fast, params, got, tok, active)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(ref.logits), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.index), np.asarray(ref.index))


def test_top_k_one_and_tiny_top_p_are_greedy(setup):
  config, params, _, _, _ = setup
  ids, mask = _batch(config, np.random.RandomState(5), [[6]])
  inputs = dict(input_ids=ids, attention_mask=mask)
  greedy = np.asarray(sampler.generate(config, params, inputs, max_new_tokens=10)["tokens"])
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    out = sampler.generate(config, params, inputs, max_new_tokens=10, temperature=1.5, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), greedy)


def test_sample_logits_follows_the_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draw = jax.jit(jax.vmap(lambda k: sampler.sample_logits(logits, k, 1.0)[0][0]))
  counts = np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 20000))), minlength=4) / 20000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)
  # top-p 0.7 keeps the two most likely tokens (0.5 + 0.3 >= 0.7), renormalised.
  draw_p = jax.jit(jax.vmap(lambda k: sampler.sample_logits(logits, k, 1.0, top_p=0.7)[0][0]))
  counts = np.bincount(np.asarray(draw_p(jax.random.split(jax.random.key(1), 20000))), minlength=4) / 20000
  np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.015)
  draw_k = jax.jit(jax.vmap(lambda k: sampler.sample_logits(logits, k, 1.0, top_k=3)[0][0]))
  counts = np.bincount(np.asarray(draw_k(jax.random.split(jax.random.key(2), 20000))), minlength=4) / 20000
  np.testing.assert_allclose(counts, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)
  # the reported log-prob is the untruncated one
  tok, lp = sampler.sample_logits(logits, jax.random.key(3), 1.0, top_k=1)
  np.testing.assert_allclose(np.asarray(lp), np.log(0.5), rtol=1e-5)


def test_generate_rejects_right_padding_and_mismatched_images(setup):
  config, params, _, pv, grid = setup
  ids, mask = _batch(config, np.random.RandomState(6), [[4], [7]])
  with pytest.raises(ValueError, match="left padding"):
    sampler.generate(config, params, dict(input_ids=ids[:, ::-1], attention_mask=mask[:, ::-1]), max_new_tokens=2)
  ids, mask = _batch(config, np.random.RandomState(7), [[3, grid[0], 2]])
  with pytest.raises(qvl.ImageTokenMismatchError):
    sampler.generate(config, params, dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid),
                     max_new_tokens=2)


def test_take_rows_and_put_rows_move_whole_rows_and_drop_padding():
  b, s = 4, 6
  rng = np.random.default_rng(0)
  state = sampler.DecodeState(
      cache=[{"k": jnp.asarray(rng.normal(size=(b, 2, s, 3)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(b, 2, 3, s)), jnp.float32)}],
      key_mask=jnp.asarray(rng.random((b, s)) < 0.5), index=jnp.arange(b, dtype=jnp.int32),
      next_pos=jnp.arange(b, dtype=jnp.int32) + 10, logits=jnp.asarray(rng.normal(size=(b, 5)), jnp.float32))
  part = sampler.take_rows(state, jnp.array([3, 1]))
  np.testing.assert_array_equal(part.cache[0]["v"], np.asarray(state.cache[0]["v"])[[3, 1]])
  np.testing.assert_array_equal(part.index, [3, 1])
  changed = jax.tree_util.tree_map(lambda x: ~x if x.dtype == bool else x + 1, part)
  out = sampler.put_rows(state, jnp.array([3, b]), changed)  # index b: padding, dropped
  expect = jax.tree_util.tree_map(lambda x: np.asarray(x).copy(), state)
  for leaf_out, leaf_new, leaf_old in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(changed),
                                          jax.tree_util.tree_leaves(expect)):
    leaf_old[3] = np.asarray(leaf_new)[0]
    np.testing.assert_array_equal(leaf_out, leaf_old)
