"""Attention shares of generated tokens: the chunked in-graph reduction (``layers.attention_shares``),
the module's ``key_segments`` pass, the key segments of rollout rows, the trajectory records of a
scripted rollout with tool views, and the summaries (Figure 1 curves, layer maps, around views).

References: the dense probabilities (``layers.attention_weights``; ``attention_probs``, itself equal
to transformers' eager attention in test_attention_probs.py) reduced by hand, and hand-computed
cases (zero queries attend uniformly).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy import Toy

from imagent_jax.agent import protocol, trajectory
from imagent_jax.agent import rollout as rl
from imagent_jax.analysis import attention
from imagent_jax.analysis import trajectory_attention as ta
from imagent_jax.models import layers
from imagent_jax.models.qwen2_5_vl.model import causal_mask


def test_chunked_shares_equal_dense_probabilities_reduced():
  rng = np.random.default_rng(0)
  b, l, hkv, g, hd, c = 2, 37, 2, 3, 8, 5
  q = jnp.asarray(rng.normal(size=(b, l, hkv, g, hd)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, l, hkv, hd)), jnp.float32) for _ in range(2))
  real = np.ones((b, l), np.int32)
  real[1, :5] = 0  # left padding
  mask = causal_mask(jnp.asarray(real), l)
  seg = rng.integers(0, c, size=(b, l))
  seg[1, :5] = -1
  onehot = jnp.asarray(attention.one_hot(seg, c))
  for chunk in (8, 37, 64):  # not dividing L, exactly L, more than L
    out, shares = layers.attention_shares(q, k, v, mask, onehot, scale=hd ** -0.5, chunk=chunk)
    probs = np.asarray(layers.attention_weights(q, k, mask, scale=hd ** -0.5))
    want = np.einsum("bkgqs,bsc->bqc", probs, np.asarray(onehot)) / (hkv * g)
    np.testing.assert_allclose(out, layers.masked_softmax_attention(q, k, v, mask, scale=hd ** -0.5), atol=1e-6)
    np.testing.assert_allclose(shares, want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(shares)[1, 5:].sum(-1), 1.0, atol=1e-6)  # real queries: sums to 1


def test_zero_queries_give_hand_computed_shares():
  """Zero queries attend uniformly to the keys they may see: query i's share of segment c is the
  fraction of keys 0..i in c."""
  l, c = 10, 3
  seg = np.array([[0, 0, 2, 1, 1, 2, 0, 1, 2, 2]])
  q = jnp.zeros((1, l, 1, 2, 4))
  k = jnp.asarray(np.random.default_rng(1).normal(size=(1, l, 1, 4)), jnp.float32)
  _, shares = layers.attention_shares(q, k, k, causal_mask(jnp.ones((1, l), jnp.int32), l),
                                      jnp.asarray(attention.one_hot(seg, c)), scale=0.5, chunk=3)
  want = np.stack([[np.mean(seg[0, :i + 1] == s) for s in range(c)] for i in range(l)])
  np.testing.assert_allclose(np.asarray(shares)[0], want, atol=1e-6)


def test_key_segments_of_a_hand_built_row():
  img, pad = 99, 0
  #          prompt (6 columns, left-padded)   | after the prompt
  tokens = [[pad, 5, img, img, 6, 7, 8, 9, 10, img, img, 11, 12, pad]]
  real = [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]]
  action = [[0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0]]
  seg = attention.key_segments(np.array(tokens), np.array(real), np.array(action), prompt_len=6, image_token_id=img)
  t, g, o, i1, v1 = attention.TEXT, attention.GENERATED, attention.TOOL_TEXT, 3, 4
  assert seg.tolist() == [[-1, t, i1, i1, t, t, g, g, o, v1, v1, o, g, -1]]
  assert attention.one_hot(seg, 5)[0, 0].tolist() == [0.0] * 5  # padding belongs to no segment


def test_module_shares_equal_attention_probs_reduced(tmp_path):
  toy = Toy.make(tmp_path)
  rng = np.random.default_rng(2)
  from imagent_jax.processing import images as images_lib
  imgs = Toy.images(3, sizes=((60, 90), (84, 84)))
  pv, grids = zip(*[images_lib.preprocess_image(x, **toy.processor.image_settings) for x in imgs])
  n_img = [int(np.prod(gr)) // 4 for gr in grids]
  cfg = toy.config
  def row(text):
    ids = list(rng.integers(10, 200, size=text[0]))
    for n, t in zip(n_img, text[1:]):
      ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
      ids += list(rng.integers(10, 200, size=t))
    return ids
  rows = [row([4, 3, 5]), row([2, 1, 3])]
  width = max(map(len, rows)) + 3
  ids = np.zeros((2, width), np.int32)
  mask = np.zeros((2, width), np.int32)
  for r, x in enumerate(rows):  # left padding
    ids[r, width - len(x):], mask[r, width - len(x):] = x, 1
  inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": np.concatenate(pv * 2),
            "image_grid_thw": np.stack(list(grids) * 2).astype(np.int32)}
  seg = attention.key_segments(ids, mask, np.zeros_like(mask), prompt_len=width, image_token_id=cfg.image_token_id)
  seg = np.where((np.arange(width) % 5 == 0) & (seg == attention.TEXT), attention.GENERATED, seg)  # some "generated"
  model = toy.model(attention_block=16)
  shares = attention.attention_shares(model, toy.params, inputs, seg)
  probs = attention.attention_probs(cfg, toy.params, inputs)  # [layers, B, H, L, L]
  want = np.einsum("lbhqs,bsc->lbqc", probs, attention.one_hot(seg, shares.shape[-1])) / probs.shape[2]
  real = mask.astype(bool)
  assert shares.shape == (cfg.num_hidden_layers, 2, width, attention.FIRST_IMAGE + 2)
  for b in range(2):
    np.testing.assert_allclose(shares[:, b, real[b]], want[:, b, real[b]], atol=1e-5)
    np.testing.assert_allclose(shares[:, b, real[b]].sum(-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="do not match"):
    attention.attention_shares(model, toy.params, inputs, seg[:, :-1])


# ------------------------------------------------------------------ a scripted rollout with views


def _call(name, **arguments):
  return protocol.render_tool_call(protocol.ToolCall(name, arguments))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
  toy = Toy.make(tmp_path_factory.mktemp("shares"))
  cfg = rl.RolloutConfig(group_size=2, max_prompt_len=900, prompt_patches=768, max_prompt_images=3,
                         max_new_tokens=600, max_tool_calls=3, obs_max_tokens=240, view_max_patches=256,
                         temperature=1.0)
  tool_cfg = toy.tool_config()
  ro = rl.Rollout(toy.model(), toy.processor, cfg, tool_cfg)
  turns = ["<think>zoom on the second image</think>" + _call("confirm", image=2, bbox_2d=[10, 10, 90, 70]),
           "<think>and on that zoom</think>" + _call("confirm", image=4, bbox_2d=[0, 0, 120, 100]),
           _call("reflect", image=1), "<think>done</think><answer>B</answer>"]
  ids = [i for t in turns for i in toy.processor.tokenizer.encode(t)] + [toy.config.eos_token_id]
  forced = np.full((2, len(ids)), -1, np.int32)
  forced[0] = ids  # row 0 follows the script, row 1 samples
  images = [Toy.images(0)]
  out, trajs = ro(toy.params, [Toy.prompt()], images, jax.random.key(1), forced_tokens=forced)
  examples = [{"target_image": 1}]
  model = toy.model(attention_block=64)
  analyses = ta.analyze_trajectories(model, toy.params, out, trajs, prompt_len=cfg.max_prompt_len,
                                     image_settings=toy.processor.image_settings,
                                     view_max_pixels=tool_cfg.view_max_pixels, examples=examples, rows_per_pass=1)
  return toy, cfg, tool_cfg, out, trajs, analyses


def test_scripted_trajectory_records(scripted):
  toy, cfg, _, out, trajs, analyses = scripted
  assert len(analyses) == 2
  a = analyses[0]
  n_gen = int(out["action_mask"][0].sum())
  assert a.shares.shape == (toy.config.num_hidden_layers, n_gen, len(a.segments))
  assert a.segments == ("text", "generated", "tool_text", "image 1", "image 2", "image 3", "view 1", "view 2",
                        "view 3")
  assert a.num_prompt_images == 3 and a.asked_image == 1
  assert a.view_roots == [1, 1, 0]  # a zoom on image 2, a zoom on that zoom (cut from image 2), image 1 again
  assert len(a.view_starts) == 3 and 0 < a.view_starts[0] < a.view_starts[1] < a.view_starts[2] < n_gen
  np.testing.assert_allclose(a.shares.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(sum(a.category(c) for c in attention.CATEGORIES), 1.0, atol=1e-5)
  np.testing.assert_allclose(a.category("asked_image") + a.category("other_images"), a.category("image"), atol=1e-6)
  np.testing.assert_allclose(a.category("all_images"), a.category("image") + a.category("tool_views"), atol=1e-6)
  np.testing.assert_allclose(a.category("asked_views"), a.shares[..., 6:8].sum(-1), atol=1e-6)
  tokens_before_view = np.cumsum(out["action_mask"][0])[np.argmax(out["tokens"][0][cfg.max_prompt_len:] ==
                                                                    toy.config.image_token_id) + cfg.max_prompt_len]
  assert a.view_starts[0] == tokens_before_view
  views = a.category("tool_views").mean(0)
  assert np.all(views[:a.view_starts[0]] == 0) and np.all(views[a.view_starts[0]:] > 0)  # none before it exists


def test_records_equal_dense_probabilities_at_the_producing_step(scripted):
  """Independent reference: the row's dense attention probabilities (``attention_probs``), at query
  ``t - 1`` of each generated token ``t``, reduced over the row's key segments."""
  toy, cfg, tool_cfg, out, trajs, analyses = scripted
  real = out["attention_mask"][0].astype(bool)
  ids, action = out["tokens"][0][real][None], out["action_mask"][0][real][None]
  prompt_len = int(real[:cfg.max_prompt_len].sum())
  patches, grids = trajectory.trajectory_images(trajs[0], toy.processor.image_settings, tool_cfg.view_max_pixels)
  inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": np.concatenate(patches),
            "image_grid_thw": np.stack(grids).astype(np.int32)}
  probs = attention.attention_probs(toy.config, toy.params, inputs)[:, 0].mean(1)  # [layers, L, L]
  seg = attention.key_segments(ids, np.ones_like(ids), action, prompt_len=prompt_len,
                               image_token_id=toy.config.image_token_id)
  gen = np.flatnonzero(seg[0] == attention.GENERATED)
  want = np.einsum("lqs,sc->lqc", probs[:, gen - 1], attention.one_hot(seg, 9)[0])
  np.testing.assert_allclose(analyses[0].shares, want, atol=1e-5)


# ------------------------------------------------------------------------------------ summaries


def _hand_built(shares_image, view_start=None, layers_=2):
  """A trajectory whose image share at generated token i is ``shares_image[i]`` (the rest on text)."""
  n = len(shares_image)
  s = np.zeros((layers_, n, 4), np.float32)
  s[:, :, attention.FIRST_IMAGE] = shares_image
  s[:, :, attention.TEXT] = 1 - np.asarray(shares_image)
  s[1, :, attention.FIRST_IMAGE] *= 0.5  # layer 1 looks half as much
  s[1, :, attention.TEXT] = 1 - s[1, :, attention.FIRST_IMAGE]
  return ta.TrajectoryAttention(shares=s, segments=attention.FIXED_SEGMENTS + ("image 1",), num_prompt_images=1,
                                asked_image=0, view_starts=[] if view_start is None else [view_start])


def test_progress_curves_layer_maps_and_around_views_by_hand():
  a = _hand_built([0.4, 0.4, 0.2, 0.2])  # two bins: 0.4 then 0.2 (layer 0), halved in layer 1
  b = _hand_built([0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], view_start=4)
  curves = ta.progress_curves([a, b], bins=2)
  np.testing.assert_allclose(curves["image"], [(0.3 + 0.6) / 2, (0.15 + 0.6) / 2])  # mean over layers, then rows
  np.testing.assert_allclose(curves["text"] + curves["image"], 1.0)
  np.testing.assert_allclose(curves["asked_image"], curves["image"])
  assert np.all(curves["tool_views"] == 0)
  np.testing.assert_allclose(ta.progress_curves([a], bins=2, layer=0)["image"], [0.4, 0.2])
  np.testing.assert_allclose(ta.layer_progress([a], "image", bins=2), [[0.4, 0.2], [0.2, 0.1]])
  around = ta.around_views([a, b], window=2)
  assert around["image"] == {"before": pytest.approx(0.6), "after": pytest.approx(0.6), "views": 1}
  assert np.isnan(ta.around_views([a], window=2)["image"]["before"])
  with pytest.raises(ValueError, match="unknown category"):
    a.category("pixels")
