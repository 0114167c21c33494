"""The warmup's read-zoom probe: prompts built from real examples, answers scored by the reward's matcher."""

import collections
import json
import os

import jax
import numpy as np
import pytest

from imagent_jax.stages import build, warmup
from imagent_jax.config import schema
from imagent_jax.agent import protocol, tools
from imagent_jax.data import synthetic
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.processing import Processor, build_tiny_tokenizer


def test_read_zoom_probe_scores_scripted_answers(tmp_path, monkeypatch):
  config = schema.get_config("smoke")
  model_config = get_preset("tiny")
  build_tiny_tokenizer(str(tmp_path), vocab_size=model_config.vocab_size, max_pixels=config.processor.max_pixels)
  processor = Processor.from_pretrained(str(tmp_path))
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  examples = [synthetic.generate_example(0, i, build.difficulty(config)) for i in range(3)]
  seen = {}

  def scripted(cfg, params, inputs, *, max_new_tokens, stop_token_ids):
    seen["images"] = len(inputs["image_grid_thw"])
    texts = [f"<think>x</think><answer>{examples[0]['answer']}</answer>", "<answer>(Z)</answer>", "no answer"]
    ids = [processor.tokenizer.encode(t) + [cfg.eos_token_id] for t in texts]
    width = max(map(len, ids))
    tokens = np.array([r + [cfg.pad_token_id] * (width - len(r)) for r in ids])
    return {"tokens": tokens, "lengths": np.array([len(r) for r in ids])}

  from imagent_jax.sampling import sampler
  monkeypatch.setattr(sampler, "generate", scripted)
  params = qvl.init_params(model_config, jax.random.key(0))
  out = warmup.read_zoom_probe(model_config, params, processor, examples, tcfg, system)
  assert out == {"read_zoom_accuracy": 1 / 3, "read_zoom_format": 2 / 3}
  assert seen["images"] == sum(len(e["images"]) + 1 for e in examples)  # every question got its zoom


def test_warmup_tasks_match_the_rl_prompt_and_tool_layout():
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
    messages, images, response, task = warmup.make_example(config, index, tcfg, system)
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


def test_warmup_without_call_share_never_calls_unasked():
  config = schema.get_config("smoke")
  config.warmup.tasks = "direct"
  config.warmup.call_share = 0.0
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  for index in range(12):
    _, _, response, _ = warmup.make_example(config, index, tcfg, system)
    assert protocol.parse_turn(response).tool_call is None


def test_warmup_zooms_use_the_category_zoom_box():
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
    messages, _, response, task = warmup.make_example(config, index, tcfg, system)
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
def test_warmup_zoom_request_share(share):
  """``zoom_request_share`` 1: every tool_syntax request asks to zoom on the detail, and the call
  names the asked image; 0: every request names a tool and a random image."""
  config = schema.get_config("smoke")
  config.warmup.tasks = "tool_syntax"
  config.warmup.zoom_request_share = share
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  for index in range(12):
    messages, _, response, _ = warmup.make_example(config, index, tcfg, system)
    source = synthetic.generate_example(config.data.seed + 7919, index, build.difficulty(config))
    request = messages[-1]["content"][-1]["text"].split("\n")[-1]
    call = protocol.parse_turn(response).tool_call
    if share == 1.0:
      assert request == "Zoom in on the detail the question is about."
      assert call.name == "confirm" and call.arguments["image"] == source["target_image"] + 1
    else:
      assert request.startswith(f"Call the {call.name} tool on image {call.arguments['image']}")


def test_warmup_zoom_request_share_is_validated():
  config = schema.get_config("smoke")
  config.warmup.zoom_request_share = 1.5
  with pytest.raises(ValueError, match="zoom_request_share"):
    schema.validate(config)


def test_image_choice_probe_matches_per_question_softmax(tmp_path):
  """The batched probe equals, question by question, the softmax over image numbers of each call's
  response log-prob computed alone (unpadded, one row per forward); one-image questions are skipped."""
  config = schema.get_config("smoke")
  config.data.images_per_question = "1,3"
  model_config = get_preset("micro")
  build_tiny_tokenizer(str(tmp_path), vocab_size=model_config.vocab_size, max_pixels=config.processor.max_pixels)
  processor = Processor.from_pretrained(str(tmp_path))
  model = qvl.Qwen25VL(model_config)
  params = qvl.init_params(model_config, jax.random.key(3))
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  examples = [synthetic.generate_example(0, i, build.difficulty(config)) for i in range(8)]
  multi = [e for e in examples if len(e["images"]) > 1]
  assert 0 < len(multi) < len(examples)
  out = warmup.image_choice_probe(model, params, processor, examples, tcfg, system, max_len=768, batch_size=4)

  def response_logp(e, k):
    _, box = warmup._shown_box(e, tools.ToolContext(e["images"], tcfg))
    call = protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": warmup._user_content(e, len(e["images"]))}]
    inputs = processor([messages], [list(e["images"])])
    prompt = inputs["input_ids"][0].tolist()
    target = processor.tokenizer.encode(warmup.ANSWER_THOUGHT + protocol.render_tool_call(call)) + [
        model_config.eos_token_id]
    ids = np.array([prompt + target])
    logits = model.apply({"params": params}, input_ids=ids, attention_mask=np.ones_like(ids),
                         pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    logp = jax.nn.log_softmax(np.asarray(logits[0, :-1], np.float64), axis=-1)
    return sum(logp[i, ids[0, i + 1]] for i in range(len(prompt) - 1, ids.shape[1] - 1))

  asked, argmax = [], []
  for e in multi:
    lp = np.array([response_logp(e, k) for k in range(len(e["images"]))])
    p = np.exp(lp - lp.max()) / np.exp(lp - lp.max()).sum()
    asked.append(p[e["target_image"]])
    argmax.append(lp.argmax() == e["target_image"])
  assert out["call_on_asked_image"] == pytest.approx(np.mean(asked), abs=1e-4)
  assert out["call_on_asked_image_argmax"] == pytest.approx(np.mean(argmax))
  assert out["call_on_asked_image_chance"] == pytest.approx(np.mean([1 / len(e["images"]) for e in multi]))
  assert warmup.image_choice_probe(model, params, processor, [e for e in examples if len(e["images"]) == 1], tcfg,
                                   system, max_len=768) == {}


def test_warmup_refuses_a_base_trained_with_another_recipe(tmp_path, capsys):
  from imagent_jax.reporting import MetricsWriter, Report
  config = schema.get_config("smoke")
  base = build.base_dir(str(tmp_path))
  os.makedirs(base)
  open(os.path.join(base, "config.json"), "w").write("{}")
  args = (config, str(tmp_path), Report(str(tmp_path), "t"), MetricsWriter(str(tmp_path)))
  assert warmup.run(*args) == {"reused": True}  # no recipe file: an older base, reused unchecked
  assert "cannot be checked" in capsys.readouterr().out
  with open(os.path.join(base, warmup.RECIPE_FILE), "w") as f:
    json.dump(warmup.recipe(config), f)
  assert warmup.run(*args) == {"reused": True}
  config.warmup.zoom_request_share = 0.5
  config.data.categories = "color"
  with pytest.raises(ValueError, match=r"invalid config: .*data.categories: base 'mosaic', config 'color'; "
                                       r"warmup.zoom_request_share: base 1.0, config 0.5"):
    warmup.run(*args)
  config.warmup.progress_bar, config.data.data_dir = False, "/elsewhere"  # not part of the recipe
  config.warmup.zoom_request_share, config.data.categories = 1.0, "mosaic"
  assert warmup.run(*args) == {"reused": True}
  recipe = json.load(open(os.path.join(base, warmup.RECIPE_FILE)))
  assert "listed" not in recipe["tools"]  # the default lists the enabled tools: bases older than the key match
  config.tools.listed = "reflect"  # another system prompt: another recipe
  with pytest.raises(ValueError, match=r"tools.listed: base '\(unset\)', config 'reflect'"):
    warmup.run(*args)


def test_the_prompt_lists_tools_listed_while_only_enabled_ones_run():
  config = schema.get_config("smoke")
  assert [s["function"]["name"] for s in build.listed_tool_schemas(config)] == ["reflect", "confirm"]
  config.tools.names = "confirm"
  assert [s["function"]["name"] for s in build.listed_tool_schemas(config)] == ["confirm"]
  config.tools.listed = "all"  # the ablation: the base's prompt, one tool that works
  assert [s["function"]["name"] for s in build.listed_tool_schemas(config)] == ["reflect", "confirm"]
  assert build.tool_config(config).enabled() == ("confirm",)
  schema.validate(config)
  config.tools.listed = "zoom"
  with pytest.raises(ValueError, match="unknown tool"):
    schema.validate(config)
