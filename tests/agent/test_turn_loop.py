"""agent.turn_loop: the host turn loop is the reference the jitted rollout must reproduce.

Same weights, prompt and policy (greedy, with one row scripted through two tool calls to an
answer): the rollout's in-graph observation inserts (cache writes, continued M-RoPE positions,
views encoded in-graph) must give the trajectories that re-prefilling the whole conversation
every turn gives.
"""

import dataclasses

import jax
import numpy as np
import pytest

from imagent_jax.agent import protocol, tools
from imagent_jax.agent import rollout as rollout_lib
from imagent_jax.agent import turn_loop
from imagent_jax.rl import masks

from toy import Toy

VIEW_PIXELS = 28 * 28 * 16  # 16 tokens a view


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  toy = Toy.make(tmp_path_factory.mktemp("turn_loop"))
  params = jax.tree_util.tree_map(lambda x: x, toy.params)
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 5.0  # greedy far from float near-ties
  images = [Toy.images(sizes=((120, 90), (80, 140)))]
  prompts = [protocol.build_prompt_messages("Which image has the most red shapes?", 2, ["first", "second"],
                                            tools=tools.tool_schemas(), system_style="compact")]
  prompt_len = toy.processor(prompts, images)["input_ids"].shape[1]
  cfg = rollout_lib.RolloutConfig(group_size=2, max_prompt_len=-(-prompt_len // 32) * 32, prompt_patches=512,
                                  max_prompt_images=2, max_new_tokens=320, max_tool_calls=3, obs_max_tokens=112,
                                  view_max_patches=64, temperature=0.0)
  ro = rollout_lib.Rollout(toy.model(), toy.processor, cfg, toy.tool_config(view_max_pixels=VIEW_PIXELS))
  return toy, params, ro, prompts, images


def _call(name, **arguments):
  return protocol.render_tool_call(protocol.ToolCall(name, arguments))


def _forced(toy, rows):
  """``[R, F]`` forced tokens: each row's turns (None: greedy throughout)."""
  tok = toy.processor.tokenizer
  ids = [[] if turns is None else sum((tok.encode(t) for t in turns), []) + [toy.config.eos_token_id]
         for turns in rows]
  forced = np.full((len(rows), max(map(len, ids))), -1, np.int32)
  for r, seq in enumerate(ids):
    forced[r, :len(seq)] = seq
  return forced


def _assert_same(a, b):
  (out_a, trajs_a), (out_b, trajs_b) = a, b
  for key in ("tokens", "attention_mask", "action_mask", "status", "length"):
    np.testing.assert_array_equal(out_a[key], out_b[key], err_msg=key)
  act = out_a["action_mask"].astype(bool)
  np.testing.assert_allclose(out_a["logprobs"][act], out_b["logprobs"][act], atol=1e-4)
  assert not out_a["logprobs"][~act].any() and not out_b["logprobs"][~act].any()
  for ta, tb in zip(trajs_a, trajs_b):
    assert (ta.status, ta.answer, ta.calls, ta.turns, ta.response) == (tb.status, tb.answer, tb.calls, tb.turns,
                                                                       tb.response)


def test_rollout_reproduces_the_host_turn_loop(env):
  toy, params, ro, prompts, images = env
  script = ["<think>zoom</think>" + _call("confirm", image=2, bbox_2d=[10, 10, 70, 60]),
            "<think>again</think>" + _call("reflect", image=3),
            "<think>done</think><answer>B</answer>"]
  forced = _forced(toy, [script, None])  # row 1: greedy from the start
  host = turn_loop.HostTurnLoop(ro)
  reference = host(params, prompts, images, jax.random.key(0), forced_tokens=forced)
  _assert_same(ro(params, prompts, images, jax.random.key(1), forced_tokens=forced), reference)
  out, trajs = reference
  assert trajs[0].status == masks.STATUS_ANSWERED and trajs[0].answer == "B"
  assert [(c.name, c.ok, c.view_index, c.entered) for c in trajs[0].calls] == [
      ("confirm", True, 3, True), ("reflect", True, 4, True)]
  assert (out["tokens"][0] == toy.config.image_token_id).sum() == (
      (out["tokens"][0][:ro.cfg.max_prompt_len] == toy.config.image_token_id).sum() + 2 * VIEW_PIXELS // 28 ** 2)
  assert out["action_mask"][1].sum() > 20  # the greedy row decoded on its own
  assert host.rounds == 3  # the script's three turns; every turn fits one round

  # A round budget shorter than a turn: turns continue in the next round, re-prefilled.
  short = turn_loop.HostTurnLoop(ro, turn_budget=40, token_bucket=1024, patch_bucket=1024)  # one shape
  _assert_same(short(params, prompts, images, jax.random.key(0), forced_tokens=forced), reference)
  assert short.rounds > host.rounds


def test_length_cut_and_turn_limit_match(env):
  """A call closed on the last slot is cut by the length limit; a fourth call hits the turn limit."""
  toy, params, ro, prompts, images = env
  tok = toy.processor.tokenizer
  call = "<think>t</think>" + _call("reflect", image=1)
  limited = _forced(toy, [[call] * 4, [call] * 4])
  cfg = dataclasses.replace(ro.cfg, max_tool_calls=2)
  small = rollout_lib.Rollout(ro.model, ro.processor, cfg, ro.tool_config)
  out = _run_both(small, params, prompts, images, limited)
  assert [t.status for t in out[1]] == [masks.STATUS_TURN_LIMIT] * 2
  assert [c.error_kind for c in out[1][0].calls] == [None, None, "turn_limit"]
  # The second row's first call ends exactly on the last slot of its sequence.
  cut = dataclasses.replace(ro.cfg, max_new_tokens=len(tok.encode(call)))
  out = _run_both(rollout_lib.Rollout(ro.model, ro.processor, cut, ro.tool_config), params, prompts, images,
                  limited)
  assert [t.status for t in out[1]] == [masks.STATUS_TRUNCATED] * 2 and not out[1][0].calls


def _run_both(ro, params, prompts, images, forced):
  reference = turn_loop.HostTurnLoop(ro)(params, prompts, images, jax.random.key(0), forced_tokens=forced)
  _assert_same(ro(params, prompts, images, jax.random.key(0), forced_tokens=forced), reference)
  return reference
