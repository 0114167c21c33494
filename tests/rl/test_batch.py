"""The rollout-to-batch pipeline (``prepare_batch``) and the batch's minibatches, by hand.

No model here: trajectories are built on the host with real tool contexts (one ``confirm`` zoom),
the rollout's arrays are written out, and every number the pipeline returns is worked out below.
"""

import math

import numpy as np
import pytest
from PIL import Image

from imagent_jax.agent import protocol, tools
from imagent_jax.agent.trajectory import Call, Trajectory, trajectory_images
from imagent_jax.agent import trajectory as trajectory_lib
from imagent_jax.processing import images as images_lib
from imagent_jax.rl import batch as batch_lib
from imagent_jax.rl import grpo, masks, rewards

# ------------------------------------------------------------------------- images of each row

IMG = 9  # the placeholder id of these hand-made batches
MERGE = 4


def _spans_batch():
  """3 rows: row 0 owns a 2x2 and a 2x4 grid (1 + 2 features), row 1 none, row 2 a 4x4 (4)."""
  tokens = np.array([[0, IMG, IMG, IMG, 5, 6, IMG],  # the last placeholder is padding: not counted
                     [0, 1, 2, 3, 4, 5, 6],
                     [IMG, IMG, IMG, IMG, 1, 2, 3]], np.int32)
  attention = np.array([[1, 1, 1, 1, 1, 1, 0], [1] * 7, [1] * 7], np.int32)
  grid = np.array([[1, 2, 2], [1, 2, 4], [1, 4, 4], [0, 0, 0]], np.int32)  # one unused slot
  pv = np.arange(32, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)  # patch k holds k; 28 used
  return dict(tokens=tokens, attention_mask=attention, loss_mask=attention.astype(np.float32),
              advantages=np.array([1.0, 2.0, 3.0], np.float32), old_logp=np.zeros((3, 7), np.float32),
              pixel_values=pv, image_grid_thw=grid, images_per_row=np.array([2, 0, 1], np.int32))


def test_row_image_spans_by_hand():
  b = _spans_batch()
  spans = batch_lib.row_image_spans(b["tokens"], b["attention_mask"], b["image_grid_thw"], b["images_per_row"],
                                    image_token_id=IMG, merge_unit=MERGE)
  assert spans == [(0, 2, 0, 12), (2, 2, 12, 12), (2, 3, 12, 28)]
  with pytest.raises(ValueError, match="row 0 has 3 image placeholder tokens but its 1 image"):
    batch_lib.row_image_spans(b["tokens"], b["attention_mask"], b["image_grid_thw"], [1, 1, 1], image_token_id=IMG,
                              merge_unit=MERGE)
  with pytest.raises(ValueError, match="counts 2 images but image_grid_thw holds 3"):
    batch_lib.row_image_spans(b["tokens"], b["attention_mask"], b["image_grid_thw"], [2, 0, 0], image_token_id=IMG,
                              merge_unit=MERGE)
  with pytest.raises(ValueError, match="counts 4 images"):
    batch_lib.row_image_spans(b["tokens"], b["attention_mask"], b["image_grid_thw"], [2, 1, 1], image_token_id=IMG,
                              merge_unit=MERGE)
  with pytest.raises(ValueError, match="each of the 3 rows"):
    batch_lib.row_image_spans(b["tokens"], b["attention_mask"], b["image_grid_thw"], [2, 1], image_token_id=IMG,
                              merge_unit=MERGE)


def test_split_gives_each_minibatch_its_rows_images():
  b = _spans_batch()
  mbs = batch_lib.split_minibatches(b, 3, image_token_id=IMG, merge_unit=MERGE, perm=[2, 0, 1], patch_budget=28,
                                    image_slots=3)
  assert [mb["advantages"].tolist() for mb in mbs] == [[3.0], [1.0], [2.0]]
  assert all(set(mb) == {"tokens", "attention_mask", "loss_mask", "advantages", "old_logp", "pixel_values",
                         "image_grid_thw"} for mb in mbs)  # train_step's fields: images_per_row is used up
  np.testing.assert_array_equal(mbs[0]["image_grid_thw"], [[1, 4, 4], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(mbs[0]["pixel_values"][:16, 0], np.arange(12, 28))
  np.testing.assert_array_equal(mbs[0]["pixel_values"][16:], 0.0)
  np.testing.assert_array_equal(mbs[1]["image_grid_thw"], [[1, 2, 2], [1, 2, 4], [0, 0, 0]])
  np.testing.assert_array_equal(mbs[1]["pixel_values"][:12, 0], np.arange(12))
  np.testing.assert_array_equal(mbs[2]["image_grid_thw"], 0)  # a row without images
  assert mbs[2]["pixel_values"].shape == (28, 3) and not mbs[2]["pixel_values"].any()
  with pytest.raises(ValueError, match="needs images_per_row"):
    batch_lib.split_minibatches({k: v for k, v in b.items() if k != "images_per_row"}, 1, image_token_id=IMG,
                                merge_unit=MERGE)
  with pytest.raises(ValueError, match="budgets"):
    batch_lib.split_minibatches(b, 3, image_token_id=IMG, merge_unit=MERGE, image_slots=1)


def test_gather_rows_orders_rows_and_their_images_by_global_id():
  """One process: the rows in the order of their global ids, each with its own images (what
  split_minibatches gives for that permutation as one minibatch)."""
  b = _spans_batch()
  out = batch_lib.gather_rows(b, [5, 1, 3], patch_budget=32, image_slots=4)  # global order: rows 1, 2, 0
  want = batch_lib.split_minibatches(b, 1, image_token_id=IMG, merge_unit=MERGE, perm=[1, 2, 0], patch_budget=32,
                                     image_slots=4)[0]
  assert out["images_per_row"].tolist() == [0, 1, 2]
  for k, v in want.items():
    np.testing.assert_array_equal(out[k], v, err_msg=k)
  with pytest.raises(ValueError, match="budgets"):
    batch_lib.gather_rows(b, [0, 1, 2], patch_budget=20, image_slots=4)


def test_split_text_only_batch_and_bad_inputs():
  tokens = np.arange(24, dtype=np.int32).reshape(6, 4)
  batch = dict(tokens=tokens, attention_mask=np.ones_like(tokens), loss_mask=np.ones((6, 4), np.float32),
               advantages=np.arange(6, dtype=np.float32), old_logp=np.zeros((6, 4), np.float32),
               images_per_row=np.zeros(6, np.int32))
  mbs = batch_lib.split_minibatches(batch, 3, image_token_id=999, merge_unit=4, perm=[5, 4, 3, 2, 1, 0])
  assert [mb["advantages"].tolist() for mb in mbs] == [[5, 4], [3, 2], [1, 0]]
  assert "pixel_values" not in mbs[0] and "images_per_row" not in mbs[0]
  with pytest.raises(ValueError, match="do not split"):
    batch_lib.split_minibatches(batch, 4, image_token_id=999, merge_unit=4)
  with pytest.raises(ValueError, match="permutation"):
    batch_lib.split_minibatches(batch, 2, image_token_id=999, merge_unit=4, perm=[0, 0, 1, 2, 3, 4])
  with pytest.raises(ValueError, match="no pixel_values"):
    batch_lib.split_minibatches(batch, 2, image_token_id=5, merge_unit=4)


def test_trim_padding_columns_by_hand():
  attention = np.zeros((2, 10), np.int32)
  attention[0, 3:6] = 1
  attention[1, 4:7] = 1  # columns 3..6 are used: 4 wide
  tokens = np.arange(20, dtype=np.int32).reshape(2, 10)
  batch = dict(tokens=tokens, attention_mask=attention, advantages=np.array([1.0, 2.0]),
               pixel_values=np.ones((8, 3)), image_grid_thw=np.ones((2, 3)), images_per_row=np.array([1, 1]))
  four = batch_lib.trim_padding_columns(batch, multiple=4)
  np.testing.assert_array_equal(four["tokens"], tokens[:, 3:7])
  np.testing.assert_array_equal(four["attention_mask"], attention[:, 3:7])
  for key in ("advantages", "pixel_values", "image_grid_thw", "images_per_row"):  # not per-token: kept whole
    np.testing.assert_array_equal(four[key], batch[key])
  eight = batch_lib.trim_padding_columns(batch, multiple=8)  # 8 wide from column 2: the span ends in the array
  np.testing.assert_array_equal(eight["tokens"], tokens[:, 2:10])
  assert batch_lib.trim_padding_columns(batch, multiple=0)["tokens"].shape == (2, 10)
  assert batch_lib.trim_padding_columns(batch, multiple=16)["tokens"].shape == (2, 10)


# ----------------------------------------------------------------------- prepare_batch by hand

SIDE = 112  # 8 x 8 patches of 14 pixels: 16 merged tokens per input image
SETTINGS = dict(min_pixels=56 * 56, max_pixels=SIDE * SIDE, patch_size=14, merge_size=2, temporal_patch_size=2)
TOOLS = tools.ToolConfig(input_min_pixels=56 * 56, input_max_pixels=SIDE * SIDE, view_min_pixels=56 * 56,
                         view_max_pixels=56 * 56, factor=28, min_box_side=28.0, max_aspect=2.0)
G = 2
EXAMPLES = [dict(question="q0", answer="A", options=["red", "blue"]),
            dict(question="q1", answer="B", options=["red", "blue"])]
THINK_ANSWER = "<think>I see it.</think><answer>{}</answer>"


def _image(colour):
  return Image.new("RGB", (SIDE, SIDE), colour)


def _trajectories():
  """Row 0: zooms (``confirm``), answers right. Row 1: answers wrong. Row 2: cut by the length
  limit. Row 3: answers right without a tool. Questions 0 (two images) and 1 (one image)."""
  inputs = [[_image("red"), _image("blue")]] * G + [[_image("green")]] * G
  ctxs = [tools.ToolContext(images, TOOLS) for images in inputs]
  zoom = protocol.render_tool_call(protocol.ToolCall("confirm", {"image": 2, "bbox_2d": [0, 0, 56, 56]}))
  result = tools.run_tool_call(ctxs[0], protocol.parse_turn(zoom))
  assert result.ok and result.view_index == 3
  turns = [["<think>Zoom in.</think>" + zoom, THINK_ANSWER.format("A")], [THINK_ANSWER.format("B")],
           ["<think>Still looking"], [THINK_ANSWER.format("B")]]
  calls = [[Call("confirm", True, None, 3, True)], [], [], []]
  status = [masks.STATUS_ANSWERED, masks.STATUS_ANSWERED, masks.STATUS_TRUNCATED, masks.STATUS_ANSWERED]
  return [Trajectory(prompt_index=r // G, status=status[r], response="".join(turns[r]), turns=turns[r],
                     answer=None, calls=calls[r], context=ctxs[r]) for r in range(4)]


def _rollout_arrays(trajs, width=64, prompt_len=48):
  """The rollout's arrays: left-padded prompts holding each row's placeholders, 5 sampled tokens."""
  tokens = np.zeros((len(trajs), width), np.int32)
  attention = np.zeros((len(trajs), width), np.int32)
  action = np.zeros((len(trajs), width), bool)
  for r, t in enumerate(trajs):
    _, grids = trajectory_images(t, SETTINGS, TOOLS.view_max_pixels)
    n_image = sum(int(np.prod(g)) // 4 for g in grids)
    row = [IMG] * n_image + [1]
    tokens[r, prompt_len - len(row):prompt_len] = row
    tokens[r, prompt_len:prompt_len + 5] = 2
    attention[r, prompt_len - len(row):prompt_len + 5] = 1
    action[r, prompt_len:prompt_len + 5] = True
  logp = np.where(action, -0.5, 0.0).astype(np.float32)
  return dict(tokens=tokens, attention_mask=attention, action_mask=action, logprobs=logp,
              status=np.array([t.status for t in trajs], np.int32))


def _configs(**mask_options):
  return dict(reward_cfg=rewards.RewardConfig(), mask_cfg=masks.MaskConfig(group_size=G, **mask_options),
              grpo_cfg=grpo.GRPOConfig(group_size=G))


def test_prepare_batch_by_hand():
  trajs = _trajectories()
  out = _rollout_arrays(trajs)
  bcfg = batch_lib.BatchConfig(patch_budget=4 * 64 * 2 + 16 + 8, image_slots=8, image_settings=SETTINGS,
                               view_max_pixels=TOOLS.view_max_pixels, length_bucket=8)
  prep = batch_lib.prepare_batch(out, trajs, EXAMPLES, batch_cfg=bcfg, **_configs())

  # Rewards 0.8 acc + 0.2 fmt + 1.2 [acc and an image call]: 2.2, 0.2 | 0 (no answer), 1.0.
  np.testing.assert_allclose(prep.rewards["total"], [2.2, 0.2, 0.0, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(prep.rewards["accuracy"], [1, 0, 0, 1])
  # Layer 2 masks the truncated row 2; both groups vary, so the others keep their 5 sampled tokens.
  np.testing.assert_array_equal(prep.loss_mask.sum(1), [5, 5, 0, 5])
  np.testing.assert_array_equal(prep.loss_mask, out["action_mask"] * np.array([1, 1, 0, 1])[:, None])
  assert int(prep.mask_metrics["mask/truncated"]) == 1 and int(prep.mask_metrics["mask/kept_trajectories"]) == 3
  # Group statistics count the masked row (default): each group of two is +-1 / (sqrt(2) + 1e-6) std.
  a0, a1 = 1.0 / (math.sqrt(2) + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6)  # centred +-1 and +-0.5
  np.testing.assert_allclose(prep.advantages, [a0, -a0, -a1, a1], rtol=1e-6)

  b = prep.batch
  assert set(b) == {"tokens", "attention_mask", "loss_mask", "advantages", "old_logp", "pixel_values",
                    "image_grid_thw", "images_per_row", "action_mask"}  # action_mask: where the update checks log-probs
  np.testing.assert_array_equal(b["action_mask"], prep.sampled)
  np.testing.assert_array_equal(b["images_per_row"], [3, 2, 1, 1])  # row 0: two inputs and its zoom
  used = np.flatnonzero(out["attention_mask"].any(0))
  width = -(-(used[-1] - used[0] + 1) // 8) * 8
  assert b["tokens"].shape == (4, width) and prep.sampled.shape == (4, width)
  assert prep.sampled.sum() == out["action_mask"].sum() and b["loss_mask"].sum() == prep.loss_mask.sum()
  np.testing.assert_array_equal(b["advantages"], prep.advantages)
  red, red_grid = images_lib.preprocess_image(_image("red"), **SETTINGS)
  np.testing.assert_array_equal(b["pixel_values"][:len(red)], red)  # row 0's first image, re-rendered
  np.testing.assert_array_equal(b["image_grid_thw"][:7], [[1, 8, 8]] * 2 + [[1, 4, 4]] + [[1, 8, 8]] * 4)
  assert b["pixel_values"].shape[0] == bcfg.patch_budget and not b["image_grid_thw"][7:].any()
  # The batch splits into minibatches whose images match their placeholders.
  mbs = batch_lib.split_minibatches(b, 2, image_token_id=IMG, merge_unit=4, perm=[3, 0, 1, 2])
  np.testing.assert_array_equal(mbs[0]["image_grid_thw"][:4], [[1, 8, 8], [1, 8, 8], [1, 8, 8], [1, 4, 4]])


def test_prepare_batch_uses_the_masks_tolerance_and_group_size():
  trajs = _trajectories()
  out = _rollout_arrays(trajs)
  # Spreads: group 0 2.0, group 1 1.0. A tolerance of 1.5 drops group 1 in the masks and in the advantages.
  prep = batch_lib.prepare_batch(out, trajs, EXAMPLES, **_configs(zero_variance_tol=1.5))
  assert prep.batch is None and prep.sampled is None  # no BatchConfig: rewards, masks, advantages only
  np.testing.assert_array_equal(prep.loss_mask.sum(1), [5, 5, 0, 0])
  assert prep.advantages[0] > 0 > prep.advantages[1]
  np.testing.assert_array_equal(prep.advantages[2:], 0.0)
  assert int(prep.mask_metrics["mask/zero_variance_groups"]) == 1
  with pytest.raises(ValueError, match="group_size"):
    batch_lib.prepare_batch(out, trajs, EXAMPLES, reward_cfg=rewards.RewardConfig(),
                            mask_cfg=masks.MaskConfig(group_size=4), grpo_cfg=grpo.GRPOConfig(group_size=2))


def test_trim_image_budget_keeps_the_used_images_in_bucketed_slots():
  from imagent_jax.rl.batch import trim_image_budget
  grid = np.zeros((12, 3), np.int64)
  grid[:5] = [1, 4, 4]  # 5 images of 16 patches
  pv = np.arange(12 * 16 * 2, dtype=np.float32).reshape(-1, 2)  # 192 patch rows, 80 used
  out = trim_image_budget({"image_grid_thw": grid, "pixel_values": pv, "tokens": np.ones((2, 3))}, 4, 16)
  assert out["image_grid_thw"].shape == (8, 3) and out["pixel_values"].shape == (128, 2)  # 5 -> 8 slots of 16
  np.testing.assert_array_equal(out["image_grid_thw"], grid[:8])
  np.testing.assert_array_equal(out["pixel_values"], pv[:128])
  assert out["tokens"].shape == (2, 3)
  same = trim_image_budget({"image_grid_thw": grid, "pixel_values": pv}, 0, 16)
  assert same["image_grid_thw"].shape == (12, 3) and same["pixel_values"].shape == (192, 2)
  full = trim_image_budget({"image_grid_thw": grid, "pixel_values": pv}, 32, 16)  # never more than the budgets
  assert full["image_grid_thw"].shape == (12, 3) and full["pixel_values"].shape == (192, 2)
  with pytest.raises(ValueError, match="more than"):
    trim_image_budget({"image_grid_thw": grid, "pixel_values": pv}, 1, 8)  # 16-patch images in 8-patch slots


def test_training_images_preprocess_each_prompt_image_once(monkeypatch):
  """A group's trajectories share their question's images: ``training_images`` preprocesses each
  image object once (the views of each trajectory are still rendered), and lays out the same
  pixels as ``trajectory_images`` row by row."""
  trajs = _trajectories()  # 2 questions x 2 rows: images (red, blue) and (green); row 0 has a zoom
  expected = [trajectory_images(t, SETTINGS, TOOLS.view_max_pixels) for t in trajs]
  calls = []
  real = images_lib.preprocess_image
  monkeypatch.setattr(images_lib, "preprocess_image", lambda image, **kw: calls.append(image) or real(image, **kw))
  pv, grid, per_row = trajectory_lib.training_images(trajs, patch_budget=4 * 64 * 2 + 16 + 8, image_slots=8,
                                                     image_settings=SETTINGS, view_max_pixels=TOOLS.view_max_pixels)
  assert len(calls) == 3 + 1  # red, blue, green, and row 0's zoom
  np.testing.assert_array_equal(per_row, [3, 2, 1, 1])
  patches = np.concatenate([p for ps, _ in expected for p in ps])
  np.testing.assert_array_equal(pv[:len(patches)], patches)
  assert not pv[len(patches):].any()
  np.testing.assert_array_equal(grid[:7], np.concatenate([np.stack(g) for _, g in expected]))
