"""Qwen2.5-VL-7B from a local Hugging Face folder and a local JSONL dataset (nothing is downloaded).

    python -m imagent_jax.main --config configs/qwen2_5_vl_7b.py --workdir runs/7b \
        --config.model.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct \
        --config.data.train_path=/data/mifg/train.jsonl --config.data.validation_path=/data/mifg/val.jsonl

Parameters are loaded tensor by tensor straight into their shards on the mesh (``config.mesh``:
fsdp over every device by default); bf16 params and compute. Multi-host: start one process per
host; jax.distributed is initialised from the environment (TPU pods, SLURM). Settings:
``schema.released_qwen_config``.
"""

from imagent_jax.config import schema


def get_config(arg=None):
  return schema.released_qwen_config("qwen2_5_vl_7b", arg)
