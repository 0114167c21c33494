"""The jitted multi-turn rollout, driven by a scripted policy (forced tokens) so tool calls happen.

The central check: the log-probs the rollout sampled with equal the training-side forward pass
over the finished trajectories (prompt images and tool views re-rendered from provenance), so
rollout and training agree on tokens, images and M-RoPE positions.
"""

import jax
import numpy as np
import pytest

from imagent_jax.agent import protocol
from imagent_jax.rl import masks
from imagent_jax.agent import rollout as rl
from imagent_jax.rl import logprobs
from imagent_jax.agent import tools, trajectory
from imagent_jax.data import synthetic
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.processing import Processor, build_tiny_tokenizer, chat

PIX = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
CFG = rl.RolloutConfig(group_size=2, max_prompt_len=900, prompt_patches=768, max_prompt_images=3, max_new_tokens=700,
                       max_tool_calls=3, obs_max_tokens=240, view_max_patches=256, temperature=1.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  config = get_preset("tiny")
  params = qvl.init_params(config, jax.random.key(0))
  folder = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), **PIX)
  processor = Processor.from_pretrained(folder)
  tool_config = tools.ToolConfig(input_min_pixels=PIX["min_pixels"], input_max_pixels=PIX["max_pixels"],
                                 view_max_pixels=PIX["max_pixels"])
  ro = rl.Rollout(qvl.Qwen25VL(config), processor, CFG, tool_config)
  rng = np.random.default_rng(0)
  images = [[synthetic.random_scene(rng, 200, 150), synthetic.random_scene(rng, 120, 260),
             synthetic.random_scene(rng, 90, 90)]]
  prompt = [protocol.build_prompt_messages("Which image has the most red shapes?", 3, ["first", "second", "third"],
                                           tools=tools.tool_schemas())]
  return config, params, processor, ro, prompt, images


def _script(processor, config, turns, rows=2, end=True):
  ids = []
  for t in turns:
    ids += processor.tokenizer.encode(t)
  if end:
    ids.append(config.eos_token_id)
  forced = np.full((rows, len(ids)), -1, np.int32)
  forced[0] = ids
  return forced


def _call(name, **arguments):
  return protocol.render_tool_call(protocol.ToolCall(name, arguments))


def test_rollout_logprobs_equal_training_forward_with_tool_views(env):
  config, params, processor, ro, prompt, images = env
  turns = ["<think>zoom on the second image</think>" + _call("confirm", image=2, bbox_2d=[10, 10, 90, 70]),
           "<think>and again on that zoom</think>" + _call("confirm", image=4, bbox_2d=[0, 0, 120, 100]),
           _call("reflect", image=1),
           "<think>done</think><answer>B</answer>"]
  out, trajs = ro(params, prompt, images, jax.random.key(1), forced_tokens=_script(processor, config, turns))
  t0 = trajs[0]
  assert t0.status == masks.STATUS_ANSWERED and t0.answer == "B"
  assert [(c.name, c.ok, c.view_index, c.entered) for c in t0.calls] == [
      ("confirm", True, 4, True), ("confirm", True, 5, True), ("reflect", True, 6, True)]
  assert t0.num_successful_image_calls == 3 and t0.num_malformed_calls == 0
  # Provenance: view 5 is a zoom of view 4, itself a zoom of input image 2.
  assert t0.context.refs[4].source == 4 and t0.context.refs[4].root == 2
  # Observation tokens (and every image token) are never actions; the scripted text is.
  act = out["action_mask"].astype(bool)
  assert not (act & (out["tokens"] == config.image_token_id)).any()
  assert (out["tokens"][1] == config.image_token_id).sum() == (out["tokens"][0][:CFG.max_prompt_len] ==
                                                               config.image_token_id).sum()  # row 1: no tool views
  n_images_row0 = (out["tokens"][0] == config.image_token_id).sum()
  assert n_images_row0 > (out["tokens"][0][:CFG.max_prompt_len] == config.image_token_id).sum()
  assert processor.tokenizer.decode(out["tokens"][0][act[0]].tolist()).startswith("<think>zoom on the second")
  assert "<tool_response>" in t0.response and "Image 4: zoom of image 2" in t0.response

  pv, grid = trajectory.training_images(trajs, patch_budget=4096, image_slots=16, image_settings=processor.image_settings,
                                           view_max_pixels=PIX["max_pixels"])[:2]
  lp = np.asarray(logprobs.sequence_logprobs(ro.model, params, out["tokens"], out["attention_mask"], pv, grid,
                                       temperature=CFG.temperature))
  assert act.sum(1).min() > 10
  err = np.abs(lp[act] - out["logprobs"][act]).max()
  assert err < 1e-4, f"rollout vs training log-prob gap {err:.2e}"


def test_tool_view_on_a_later_row_keeps_positions(env):
  """Row 1 calls a tool while row 0 does not: views and grids must stay packed in the same order."""
  config, params, processor, ro, prompt, images = env
  forced = _script(processor, config, [_call("confirm", image=1, bbox_2d=[0, 0, 60, 60]), "<answer>A</answer>"])
  forced = forced[::-1].copy()  # the script on row 1, row 0 samples freely
  out, trajs = ro(params, prompt, images, jax.random.key(4), forced_tokens=forced)
  assert trajs[1].calls and trajs[1].calls[0].entered
  pv, grid = trajectory.training_images(trajs, patch_budget=4096, image_slots=16, image_settings=processor.image_settings,
                                           view_max_pixels=PIX["max_pixels"])[:2]
  lp = np.asarray(logprobs.sequence_logprobs(ro.model, params, out["tokens"], out["attention_mask"], pv, grid,
                                             temperature=CFG.temperature))
  act = out["action_mask"].astype(bool)
  assert np.abs(lp[act] - out["logprobs"][act]).max() < 1e-4


def test_insert_wait_serves_several_calls_with_one_insert(env):
  """Rows that close calls a few steps apart: with ``insert_wait`` one insert (host call, vision
  pass, prefill) serves both, and every trajectory is the same as with immediate inserts."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config, params, processor, ro, prompt, images = env
  scripts = [[_call("confirm", image=1, bbox_2d=[0, 0, 60, 60]), "<answer>A</answer>"],
             ["<think>a longer thought before the call</think>" + _call("reflect", image=2), "<answer>B</answer>"]]
  ids = [sum((processor.tokenizer.encode(t) for t in turns), []) + [config.eos_token_id] for turns in scripts]
  forced = np.full((2, max(map(len, ids))), -1, np.int32)
  for row, seq in enumerate(ids):
    forced[row, :len(seq)] = seq
  gap = len(processor.tokenizer.encode(scripts[1][0])) - len(processor.tokenizer.encode(scripts[0][0]))
  assert 0 < gap < 40  # the calls close on different steps, within the wait below
  waiting = rl.Rollout(ro.model, processor, dataclasses.replace(CFG, insert_wait=40), ro.tool_config)
  out0, trajs0 = ro(params, prompt, images, jax.random.key(5), forced_tokens=forced)  # CFG: insert_wait 0
  out1, trajs1 = waiting(params, prompt, images, jax.random.key(5), forced_tokens=forced)
  assert out0["inserts"] == 2  # each call inserted on the step it closed
  assert out1["inserts"] == 1  # row 0 waited for row 1: one insert for both
  for key in ("tokens", "attention_mask", "action_mask", "status", "length"):
    np.testing.assert_array_equal(out0[key], out1[key], err_msg=key)
  np.testing.assert_allclose(out0["logprobs"], out1["logprobs"], atol=1e-5)
  assert [t.answer for t in trajs1] == ["A", "B"] and all(t.calls[0].entered for t in trajs1)
  with pytest.raises(ValueError, match="insert_wait"):
    rl.RolloutConfig(insert_wait=-1)


def test_failed_calls_become_error_observations(env):
  config, params, processor, ro, prompt, images = env
  turns = ['<tool_call>{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [10, 10</tool_call>',  # bad JSON
           _call("zoom", image=1),  # unknown tool
           _call("confirm", image=9, bbox_2d=[0, 0, 10, 10]),  # bad index
           _call("reflect", image=1)]  # fourth call: over the limit of three
  out, trajs = ro(params, prompt, images, jax.random.key(2), forced_tokens=_script(processor, config, turns, end=False))
  t0 = trajs[0]
  assert [c.error_kind for c in t0.calls] == ["parse_error", "unknown_tool", "bad_image_index", "turn_limit"]
  assert t0.status == masks.STATUS_TURN_LIMIT
  assert t0.num_malformed_calls == 2 and t0.num_successful_image_calls == 0
  assert t0.response.count("Error:") == 3
  assert out["status"][0] == masks.STATUS_TURN_LIMIT


def test_sampled_rollouts_finish_with_a_status(env):
  config, params, processor, ro, prompt, images = env
  out, trajs = ro(params, prompt, images, jax.random.key(3))
  assert len(trajs) == CFG.group_size
  assert set(out["status"].tolist()) <= {masks.STATUS_ANSWERED, masks.STATUS_NO_ANSWER, masks.STATUS_TRUNCATED,
                                         masks.STATUS_TURN_LIMIT}
  assert (out["length"] <= CFG.max_prompt_len + CFG.max_new_tokens).all()
  valid = out["attention_mask"].astype(bool)
  assert (out["action_mask"].astype(bool) <= valid).all()
  assert np.isfinite(out["logprobs"]).all() and (out["logprobs"][out["action_mask"].astype(bool)] <= 0).all()


def test_prompt_budgets_are_checked(env):
  config, params, processor, ro, prompt, images = env
  small = rl.Rollout(ro.model, processor, rl.RolloutConfig(max_prompt_len=100), ro.tool_config)
  with pytest.raises(ValueError, match="max_prompt_len is 100"):
    small.prepare(prompt, images)
  with pytest.raises(ValueError, match="obs_max_tokens"):
    rl.RolloutConfig(obs_max_tokens=20, view_max_patches=256)


@pytest.mark.parametrize("insert_rows", [1, 2, 3])
def test_insert_rows_gives_the_same_trajectories_with_one_insert_per_group(env, insert_rows, monkeypatch):
  """One prompt x 4 rows (R=4); rows 0 and 3 close calls on the same step, row 1 later, row 2
  never. With ``insert_rows`` the inserts work on gathered groups of rows: the trajectories are
  those of whole-batch inserts, the count is one per group, and a lone waiting row is a
  one-row insert (the host call sees one row)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config, params, processor, ro, prompt, images = env
  call = _call("confirm", image=1, bbox_2d=[0, 0, 60, 60])
  scripts = [[call, "<answer>A</answer>"],
             ["<think>a longer thought before the call</think>" + _call("reflect", image=2), "<answer>B</answer>"],
             ["<answer>C</answer>"],
             [call, "<think>and again</think>" + _call("confirm", image=2, bbox_2d=[5, 5, 50, 70]),
              "<answer>D</answer>"]]
  ids = [sum((processor.tokenizer.encode(t) for t in turns), []) + [config.eos_token_id] for turns in scripts]
  forced = np.full((4, max(map(len, ids))), -1, np.int32)
  for row, seq in enumerate(ids):
    forced[row, :len(seq)] = seq
  whole = rl.Rollout(ro.model, processor, dataclasses.replace(CFG, group_size=4), ro.tool_config)
  grouped = rl.Rollout(ro.model, processor, dataclasses.replace(CFG, group_size=4, insert_rows=insert_rows),
                       ro.tool_config)
  out0, trajs0 = whole(params, prompt, images, jax.random.key(6), forced_tokens=forced)  # insert_rows 0
  sizes, host_step = [], rl._host_step  # pylint: disable=protected-access
  def spy(episode_id, rows, *args):
    sizes.append(len(rows))
    return host_step(episode_id, rows, *args)
  monkeypatch.setattr(rl, "_host_step", spy)  # read when the grouped config's program is traced
  out1, trajs1 = grouped(params, prompt, images, jax.random.key(6), forced_tokens=forced)
  # whole-batch inserts: rows 0 and 3 on one step, row 1 on a later one, row 3's second call later still
  assert out0["inserts"] == 3
  assert out1["inserts"] == (4 if insert_rows == 1 else 3)  # rows 0 and 3: two groups of one, or one group
  assert sizes == ([1, 1, 1, 1] if insert_rows == 1 else [insert_rows, 1, 1])  # row 1, then row 3, alone
  for key in ("tokens", "attention_mask", "action_mask", "status", "length"):
    np.testing.assert_array_equal(out0[key], out1[key], err_msg=key)
  np.testing.assert_allclose(out0["logprobs"], out1["logprobs"], atol=1e-5)
  assert [t.answer for t in trajs1] == ["A", "B", "C", "D"]
  assert [len(t.calls) for t in trajs1] == [1, 1, 0, 2] and all(c.entered for t in trajs1 for c in t.calls)
  assert [[c.view_index for c in t.calls] for t in trajs1] == [[c.view_index for c in t.calls] for t in trajs0]
  with pytest.raises(ValueError, match="insert_rows"):
    rl.RolloutConfig(insert_rows=-1)


def test_shared_system_turn_is_prefilled_once_with_the_same_trajectories(env):
  """Two prompts (other questions, other image counts) open with the same system turn: with
  ``share_prefix`` it is prefilled once for the batch, and the trajectories are those of
  per-row prefills (tokens, masks, statuses; log-probs up to float rounding)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  config, params, processor, ro, prompt, images = env
  prompts = [protocol.build_prompt_messages("Which image has the most red shapes?", 2, tools=tools.tool_schemas()),
             protocol.build_prompt_messages("Is the circle blue?", 1, tools=tools.tool_schemas())]
  imgs = [images[0][:2], images[0][2:]]
  turns = [_call("confirm", image=1, bbox_2d=[0, 0, 60, 60]), "<answer>A</answer>"]
  seq = sum((processor.tokenizer.encode(t) for t in turns), []) + [config.eos_token_id]
  forced = np.full((4, len(seq)), -1, np.int32)
  forced[0], forced[3] = seq, seq
  cfg = dataclasses.replace(CFG, share_prefix=True)
  shared = rl.Rollout(ro.model, processor, cfg, ro.tool_config)
  plain = rl.Rollout(ro.model, processor, dataclasses.replace(cfg, share_prefix=False), ro.tool_config)
  inputs = shared.prepare(prompts, imgs)
  k = shared.shared_prefix(inputs)
  assert shared.shared_prefix(processor(prompts, imgs)) == k  # the unpadded processor output: the same K
  opening = processor.tokenizer.encode(chat.apply_chat_template(prompts[0][:1], add_generation_prompt=False))
  assert k == len(opening) - 1 > 100  # the system turn up to its <|im_end|>, without the newline after it
  assert plain.shared_prefix(inputs) == 0 and shared.shared_prefix(shared.prepare(prompts[:1], imgs[:1])) == 0
  out0, trajs0 = plain(params, prompts, imgs, jax.random.key(4), forced_tokens=forced)
  out1, trajs1 = shared(params, prompts, imgs, jax.random.key(4), forced_tokens=forced)
  for key in ("tokens", "attention_mask", "action_mask", "status", "length"):
    np.testing.assert_array_equal(out0[key], out1[key], err_msg=key)
  np.testing.assert_allclose(out0["logprobs"], out1["logprobs"], atol=1e-5)
  assert [t.answer for t in trajs1][::3] == ["A", "A"] and trajs1[3].calls[0].entered
