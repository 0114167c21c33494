"""rl.warmup_tasks: the warmup's examples lay out the RL prompt and the rollout's tool turns exactly."""

import collections

import numpy as np
import pytest

from imagent_jax.agent import protocol, tools
from imagent_jax.config import schema
from imagent_jax.data import synthetic
from imagent_jax.rl import warmup_tasks
from imagent_jax.stages import build


def test_tasks_match_the_rl_prompt_and_tool_layout():
  from imagent_jax.processing import chat
  config = schema.get_config("smoke")
  config.data.images_per_question = "2,3"
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  config.warmup.tasks = "read_zoom,direct,locate,tool_syntax"
  config.warmup.call_share = 0.5
  config.warmup.confirm_share = 0.5
  seen = collections.Counter()
  for index in range(48):
    messages, images, response, task = warmup_tasks.make_example(config, index, tcfg, system)
    assert task == config.warmup.tasks.split(",")[index % 4]
    source = synthetic.generate_example(config.data.seed + 7919, index, build.difficulty(config))
    n = len(source["images"])
    rl_prompt = protocol.build_prompt_messages(source["question"], n, source["options"],
                                               tools=tools.tool_schemas(tcfg.enabled()), system_style="compact")
    text = chat.apply_chat_template(messages)
    rl_text = chat.apply_chat_template(rl_prompt)
    assert text.count("<|vision_start|>") == len(images)
    turn = protocol.parse_turn(response)
    if task == "direct":
      assert text == rl_text
      if turn.tool_call is not None:  # the base's call prior: confirm on the answer's region, or reflect
        seen["direct_call"] += 1
        ctx = tools.ToolContext(source["images"], tcfg)
        result = tools.run_tool_call(ctx, turn.tool_call)
        assert result.ok, result.text
        if turn.tool_call.name == "confirm":
          seen["confirm"] += 1
          assert turn.tool_call.arguments["image"] == source["target_image"] + 1
          assert _covers(ctx, turn.tool_call.arguments["bbox_2d"], source)
      else:
        seen["direct_answer"] += 1
        assert response.endswith(f"<answer>{source['answer']}</answer>")
    elif task == "read_zoom":
      # The rollout's exact layout: the RL prompt, the assistant's call, the tool response turn with
      # the view (image n + 1) and the opening of the next assistant turn; only the answer is trained.
      call = protocol.parse_turn(text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]).tool_call
      assert call is not None
      ctx = tools.ToolContext(source["images"], tcfg)
      result = tools.run_tool_call(ctx, call)
      assert result.ok and result.text.startswith(f"Image {n + 1}: ")
      prefix = rl_text + text[len(rl_text):].split("</tool_call>")[0] + "</tool_call>"
      assert text.startswith(rl_text) and text == prefix + protocol.observation_suffix(result.text, True)
      assert len(images) == n + 1 and np.array_equal(np.asarray(images[-1]), np.asarray(result.image))
      assert turn.answer == source["answer"] and turn.tool_call is None
      seen["read_" + call.name] += 1
    elif task == "tool_syntax":
      assert text.startswith(rl_text.split("Answer with the option's letter.")[0])
      assert turn.tool_call is not None and turn.answer is None
      result = tools.run_tool_call(tools.ToolContext(source["images"], tcfg), turn.tool_call)
      assert result.ok, result.text
    else:
      assert turn.answer.startswith(f"image {source['target_image'] + 1} [")
  # Both shares are drawn: some direct prompts call, some answer; read_zoom reads both tools' views.
  assert min(seen["direct_call"], seen["direct_answer"], seen["read_confirm"], seen["read_reflect"]) > 0, seen


def _covers(ctx, box, source):
  """Whether ``box`` (shown pixels of the target image) maps onto the target region's pixels."""
  k = source["target_image"] + 1
  (w0, h0), (ws, hs) = ctx.views[k - 1].size, ctx.shown_sizes[k - 1]
  x0, y0, x1, y1 = source["target_box"]
  bx0, by0, bx1, by1 = box
  return bx0 * w0 / ws <= x0 + 1 and by0 * h0 / hs <= y0 + 1 and bx1 * w0 / ws >= x1 - 1 and by1 * h0 / hs >= y1 - 1


def test_without_call_share_never_calls_unasked():
  config = schema.get_config("smoke")
  config.warmup.tasks = "direct"
  config.warmup.call_share = 0.0
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  for index in range(12):
    _, _, response, _ = warmup_tasks.make_example(config, index, tcfg, system)
    assert protocol.parse_turn(response).tool_call is None


def test_zooms_use_the_category_zoom_box():
  """A mosaic question's zoom is its top-left square (zoom_pad 0, exact): half a base-view pixel here."""
  from imagent_jax.processing import chat
  config = schema.get_config()
  config.data.categories, config.data.image_side = "mosaic", "896,896"
  config.tools.min_box_side = 2.0
  config.warmup.tasks = "read_zoom,direct,tool_syntax"
  config.warmup.call_share, config.warmup.confirm_share = 1.0, 1.0
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  confirms = 0
  for index in range(9):
    messages, _, response, task = warmup_tasks.make_example(config, index, tcfg, system)
    source = synthetic.generate_example(config.data.seed + 7919, index, build.difficulty(config))
    k = source["target_image"]
    shown = tools.ToolContext(source["images"], tcfg).shown_sizes[k]
    assert shown == (224, 224)
    text = chat.apply_chat_template(messages) + response
    for call_text in text.split("<|im_start|>user")[1].split("<tool_call>")[1:]:  # past the system prompt
      call = protocol.parse_turn("<tool_call>" + call_text.split("</tool_call>")[0] + "</tool_call>").tool_call
      if task != "tool_syntax" or "Zoom in on the detail the question is about." in text:
        confirms += 1
        assert call.arguments == {"image": k + 1, "bbox_2d": [111, 111, 111.5, 111.5]}, (task, call.arguments)
        assert synthetic.zoom_box(source, source["images"][k].size, shown) == [111, 111, 111.5, 111.5]
  assert confirms >= 6  # 3 read_zoom, 3 direct (call_share 1), and any tool_syntax zoom requests


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_zoom_request_share(share):
  """``zoom_request_share`` 1: every tool_syntax request asks to zoom on the detail, and the call
  names the asked image; 0: every request names a tool and a random image."""
  config = schema.get_config("smoke")
  config.warmup.tasks = "tool_syntax"
  config.warmup.zoom_request_share = share
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  for index in range(12):
    messages, _, response, _ = warmup_tasks.make_example(config, index, tcfg, system)
    source = synthetic.generate_example(config.data.seed + 7919, index, build.difficulty(config))
    request = messages[-1]["content"][-1]["text"].split("\n")[-1]
    call = protocol.parse_turn(response).tool_call
    if share == 1.0:
      assert request == "Zoom in on the detail the question is about."
      assert call.name == "confirm" and call.arguments["image"] == source["target_image"] + 1
    else:
      assert request.startswith(f"Call the {call.name} tool on image {call.arguments['image']}")


def test_tasks_are_registered_by_name():
  assert warmup_tasks.TASKS.names() == ("read_zoom", "direct", "locate", "tool_syntax")
  config = schema.get_config("smoke")
  config.warmup.tasks = "direct,nope"
  tcfg = build.tool_config(config)
  with pytest.raises(KeyError, match="unknown warmup task 'nope'"):
    warmup_tasks.make_example(config, 1, tcfg, "system")
