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
