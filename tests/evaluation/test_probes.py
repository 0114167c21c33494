"""evaluation.probes: the base probes, on scripted answers and against a per-question reference."""

import jax
import numpy as np
import pytest

from imagent_jax.agent import protocol, tools
from imagent_jax.config import schema
from imagent_jax.data import synthetic
from imagent_jax.evaluation import probes
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.processing import Processor, build_tiny_tokenizer
from imagent_jax.rl import warmup_tasks
from imagent_jax.stages import build


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
  out = probes.read_zoom_probe(model_config, params, processor, examples, tcfg, system)
  assert out == {"read_zoom_accuracy": 1 / 3, "read_zoom_format": 2 / 3}
  assert seen["images"] == sum(len(e["images"]) + 1 for e in examples)  # every question got its zoom


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
  out = probes.image_choice_probe(model, params, processor, examples, tcfg, system, max_len=768, batch_size=4)

  def response_logp(e, k):
    _, box = warmup_tasks.shown_box(e, tools.ToolContext(e["images"], tcfg))
    call = protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": warmup_tasks.user_content(e, len(e["images"]))}]
    inputs = processor([messages], [list(e["images"])])
    prompt = inputs["input_ids"][0].tolist()
    target = processor.tokenizer.encode(warmup_tasks.ANSWER_THOUGHT + protocol.render_tool_call(call)) + [
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
  assert probes.image_choice_probe(model, params, processor, [e for e in examples if len(e["images"]) == 1], tcfg,
                                   system, max_len=768) == {}
