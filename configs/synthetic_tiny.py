"""The embedded default: tiny Qwen2.5-VL, synthetic multi-image data, CPU.

    python -m imagent_jax.main --config configs/synthetic_tiny.py --workdir runs/tiny
"""

from imagent_jax.config import schema


def get_config(arg=None):
  return schema.get_config(arg)
