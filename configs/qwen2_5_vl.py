"""A released Qwen2.5-VL from a local Hugging Face folder and a local JSONL dataset (nothing is
downloaded). The argument after the colon is the size (``3b``, ``7b``, ``32b``, ``72b``), optionally
followed by ``,smoke``:

    python -m imagent_jax.main --config configs/qwen2_5_vl.py:7b --workdir runs/7b \
        --config.model.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.train_path=/data/mifg/train.jsonl --config.data.validation_path=/data/mifg/val.jsonl

It runs the ``rl`` stage from the checkpoint (the warmup, which trains tiny models from random
weights, is refused beside a checkpoint). Parameters are loaded tensor by tensor straight into
their shards on the mesh (``config.mesh``: fsdp over every device by default); bf16 params and
compute. The static budgets (prompt tokens, patches and image slots, the training pass's patches
and image slots, minibatch ones, the observation slot) are derived from ``rl.batch_size``,
``rollout.group_size``, ``rollout.max_tool_calls``, ``processor.max_pixels``,
``tools.view_max_pixels`` and ``data.max_images_per_question`` (4): overriding one of these
resizes them, and JSONL records with more images or longer prompts are bad records before
anything compiles. RL settings where the paper is silent follow its 7B peers (verl, DeepEyes,
Mini-o3; see the presets module). Multi-host: start one process per host; jax.distributed is
initialised from the environment (TPU pods, SLURM). Settings:
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
