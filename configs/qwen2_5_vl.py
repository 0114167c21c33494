"""A released Qwen2.5-VL from a local Hugging Face folder and a local JSONL dataset (nothing is
downloaded). The argument after the colon is the size (``3b``, ``7b``, ``32b``, ``72b``), optionally
followed by ``,smoke``:

    python -m imagent_jax.main --config configs/qwen2_5_vl.py:7b --workdir runs/7b \
        --config.model.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.train_path=/data/mifg/train.jsonl --config.data.validation_path=/data/mifg/val.jsonl

Parameters are loaded tensor by tensor straight into their shards on the mesh (``config.mesh``:
fsdp over every device by default); bf16 params and compute. Multi-host: start one process per
host; jax.distributed is initialised from the environment (TPU pods, SLURM). Settings:
``imagent_jax.config.presets.released_qwen_config``.
"""

from imagent_jax.config import presets
from imagent_jax.models import registry


def get_config(arg=None):
  size, _, variant = (arg or "").partition(",")
  preset = f"qwen2_5_vl_{size.strip().lower()}"
  if preset not in registry.presets():
    sizes = sorted((p.rpartition("_")[2] for p in registry.presets() if p.startswith("qwen2_5_vl_")),
                   key=lambda s: float(s.rstrip("b")))
    raise ValueError(f"configs/qwen2_5_vl.py needs a size argument, one of {sizes} "
                     f"(e.g. --config configs/qwen2_5_vl.py:7b), got {arg!r}")
  return presets.released_qwen_config(preset, variant.strip() or None)
