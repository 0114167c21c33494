"""The eval stage on its own: a checkpoint on benchmarks read from local copies, judge-free.

    # the embedded default's RL result (or base) on its synthetic test questions and a JSONL set
    python -m imagent_jax.main --config configs/eval.py --workdir runs/tiny \\
        --config.eval.benchmarks=data=test,jsonl=/data/my_set.jsonl

    # a released checkpoint (the argument is its size, as configs/qwen2_5_vl.py) on V* and HR-Bench
    python -m imagent_jax.main --config configs/eval.py:7b --workdir runs/eval7b \\
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.eval.benchmarks=vstar=/data/vstar_bench,hrbench_4k=/data/HR-Bench,hrbench_8k=/data/HR-Bench

Without an argument it is the embedded default (``configs/synthetic_tiny.py``) with
``stages="eval"``: point ``--workdir`` at a finished run to evaluate its RL checkpoint
(``eval.weights="latest"``) or its warmup base (``eval.weights="base"``). ``tools.names=none`` gives
the no-tool baseline. The eval settings are ``config.eval`` (imagent_jax/config/schema.py).
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
      raise ValueError(f"configs/eval.py takes a released size (e.g. configs/eval.py:7b) or nothing, got {arg!r}")
    c = presets.released_qwen_config(preset, variant.strip() or None)
    c.eval.benchmarks = ""  # name=path pairs of the local benchmark copies: required
  c.stages = "eval"
  return c
