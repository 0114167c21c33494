"""The warmup's read-zoom probe: prompts built from real examples, answers scored by the reward's matcher."""

import jax
import numpy as np

from imagent_jax import components, default_config, warmup
from imagent_jax.agent import protocol, tools
from imagent_jax.data import synthetic
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.processing import Processor, build_tiny_tokenizer


def test_read_zoom_probe_scores_scripted_answers(tmp_path, monkeypatch):
  config = default_config.get_config("smoke")
  model_config = get_preset("tiny")
  build_tiny_tokenizer(str(tmp_path), vocab_size=model_config.vocab_size, max_pixels=config.processor.max_pixels)
  processor = Processor.from_pretrained(str(tmp_path))
  tcfg = components.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  examples = [synthetic.generate_example(0, i, components.difficulty(config)) for i in range(3)]
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
  config = default_config.get_config("smoke")
  config.data.images_per_question = "2,3"
  tcfg = components.tool_config(config)
  system = protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact")
  config.warmup.tasks = "read_zoom,direct,locate,tool_syntax"
  for index in range(8):
    messages, images, response, task = warmup.make_example(config, index, tcfg, system)
    assert task == config.warmup.tasks.split(",")[index % 4]
    source = synthetic.generate_example(config.data.seed + 7919, index, components.difficulty(config))
    n = len(source["images"])
    rl_prompt = protocol.build_prompt_messages(source["question"], n, source["options"],
                                               tools=tools.tool_schemas(tcfg.enabled()), system_style="compact")
    text = chat.apply_chat_template(messages)
    rl_text = chat.apply_chat_template(rl_prompt)
    assert text.count("<|vision_start|>") == len(images)
    if task == "direct":
      assert text == rl_text and response.endswith(f"<answer>{source['answer']}</answer>")
    elif task == "read_zoom":
      # The zoom is image n + 1, labelled with the confirm tool's own observation text, after the inputs.
      k = source["target_image"] + 1
      assert len(images) == n + 1 and f"<|vision_end|>Image {n + 1}: zoom of image {k} at [" in text
      assert text.index(f"Image {n + 1}: zoom") < text.index(source["question"])
      assert response.endswith(f"<answer>{source['answer']}</answer>")
    elif task == "tool_syntax":
      assert text.startswith(rl_text.split("Answer with the option's letter.")[0])
      turn = protocol.parse_turn(response)
      assert turn.tool_call is not None and turn.answer is None
      result = tools.run_tool_call(tools.ToolContext(source["images"], tcfg), turn.tool_call)
      assert result.ok, result.text
    else:
      answer = protocol.parse_turn(response).answer
      assert answer.startswith(f"image {source['target_image'] + 1} [")
