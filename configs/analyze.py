"""The analyze stage on its own: where a checkpoint's generated tokens look (the paper's Figure 1).

    # the embedded default's warmup base against its RL result, on the synthetic test questions
    python -m imagent_jax.main --config configs/analyze.py --workdir runs/tiny

    # a released checkpoint (the argument is its size, as configs/qwen2_5_vl.py) against a run's RL result
    python -m imagent_jax.main --config configs/analyze.py:7b --workdir runs/rl7b \\
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.source=jsonl \\
        --config.data.test_path=/data/mifg/test.jsonl

Without an argument it is the embedded default (``configs/synthetic_tiny.py``) with
``stages="analyze"``: point ``--workdir`` at a finished run. The settings are ``config.analyze``
(imagent_jax/config/schema.py).
"""

from imagent_jax.config import presets, schema
from imagent_jax.models import registry


def get_config(arg=None):
  size, _, variant = (arg or "").partition(",")
  if not size.strip():
    c = schema.get_config(variant.strip() or None)
  else:
    preset = f"qwen2_5_vl_{size.strip().lower()}"
    if preset not in registry.presets():
      raise ValueError(f"configs/analyze.py takes a released size (e.g. configs/analyze.py:7b) or nothing, got {arg!r}")
    c = presets.released_qwen_config(preset, variant.strip() or None)
  c.stages = "analyze"
  return c
