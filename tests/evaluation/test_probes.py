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


def _probe_setup(tmp_path, config, preset="tiny"):
  """``(model_config, processor, tool_config, system)`` of a tiny model with its tokenizer in ``tmp_path``."""
  model_config = get_preset(preset)
  build_tiny_tokenizer(str(tmp_path), vocab_size=model_config.vocab_size, max_pixels=config.processor.max_pixels)
  tcfg = build.tool_config(config)
  return (model_config, Processor.from_pretrained(str(tmp_path)), tcfg,
          protocol.system_prompt(tools.tool_schemas(tcfg.enabled()), "compact"))


def _generated(processor, cfg, texts):
  """What ``sampler.generate`` returns for rows that answered ``texts`` (each closed by eos)."""
  ids = [processor.tokenizer.encode(t) + [cfg.eos_token_id] for t in texts]
  width = max(map(len, ids))
  tokens = np.array([r + [cfg.pad_token_id] * (width - len(r)) for r in ids])
  return {"tokens": tokens, "lengths": np.array([len(r) for r in ids])}


def test_read_zoom_probe_scores_scripted_answers(tmp_path, monkeypatch):
  config = schema.get_config("smoke")
  model_config, processor, tcfg, system = _probe_setup(tmp_path, config)
  examples = [synthetic.generate_example(0, i, build.difficulty(config)) for i in range(3)]
  seen = {}

  def scripted(cfg, params, inputs, *, max_new_tokens, stop_token_ids, max_image_patches):
    seen["images"] = int((np.prod(inputs["image_grid_thw"], axis=-1) > 0).sum())
    texts = [f"<think>x</think><answer>{examples[0]['answer']}</answer>", "<answer>(Z)</answer>", "no answer"]
    return _generated(processor, cfg, texts)

  from imagent_jax.sampling import sampler
  monkeypatch.setattr(sampler, "generate", scripted)
  params = qvl.init_params(model_config, jax.random.key(0))
  out = probes.read_zoom_probe(model_config, params, processor, examples, tcfg, system)
  assert out == {"read_zoom_accuracy": 1 / 3, "read_zoom_format": 2 / 3}
  assert seen["images"] == sum(len(e["images"]) + 1 for e in examples)  # every question got its zoom


def test_read_zoom_probe_compiles_one_shape_and_reads_each_chunk(tmp_path, monkeypatch):
  """Chunks of different prompt lengths and image counts reach ``generate`` with one shape (one
  compiled program), the last chunk filled with copies whose answers are not counted; the
  padding is left padding, zero patches and empty grid rows, so each row keeps its own images."""
  config = schema.get_config("smoke")
  config.data.images_per_question = "1,3"
  model_config, processor, tcfg, system = _probe_setup(tmp_path, config)
  examples = [synthetic.generate_example(0, i, build.difficulty(config)) for i in range(5)]
  assert len({len(e["images"]) for e in examples}) > 1
  calls = []

  def scripted(cfg, params, inputs, *, max_new_tokens, stop_token_ids, max_image_patches):
    calls.append(dict(shapes={k: np.shape(v) for k, v in inputs.items()}, slot=max_image_patches,
                      images=int((np.prod(inputs["image_grid_thw"], axis=-1) > 0).sum()),
                      real_tokens=np.asarray(inputs["attention_mask"]).sum(-1)))
    first = len(calls) * 2 - 2  # chunk k answers its questions right only when they are its own
    texts = [f"<answer>{examples[min(first + r, 4)]['answer']}</answer>" for r in range(len(inputs["input_ids"]))]
    return _generated(processor, cfg, texts)

  from imagent_jax.sampling import sampler
  monkeypatch.setattr(sampler, "generate", scripted)
  out = probes.read_zoom_probe(model_config, None, processor, examples, tcfg, system, batch_size=2)
  assert out == {"read_zoom_accuracy": 1.0, "read_zoom_format": 1.0}
  assert len(calls) == 3 and all(c["shapes"] == calls[0]["shapes"] for c in calls)
  assert len({c["slot"] for c in calls}) == 1
  assert calls[0]["shapes"]["input_ids"][0] == 2  # the last chunk: example 4 and its copy
  assert [c["images"] for c in calls] == [sum(len(examples[i]["images"]) + 1 for i in rows)
                                          for rows in ([0, 1], [2, 3], [4, 4])]
  assert len({tuple(c["real_tokens"]) for c in calls}) > 1  # the chunks' prompts differ in length
  calls.clear()
  assert probes.read_zoom_probe(model_config, None, processor, [], tcfg, system) == {
      "read_zoom_accuracy": 0.0, "read_zoom_format": 0.0} and not calls


def test_image_choice_probe_matches_per_question_softmax(tmp_path):
  """The batched probe equals, question by question, the softmax over image numbers of each call's
  response log-prob computed alone (unpadded, one row per forward); one-image questions are skipped."""
  config = schema.get_config("smoke")
  config.data.images_per_question = "1,3"
  model_config, processor, tcfg, system = _probe_setup(tmp_path, config, "micro")
  model = qvl.Qwen25VL(model_config)
  params = qvl.init_params(model_config, jax.random.key(3))
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
