"""Qwen2.5-VL-7B from a local Hugging Face folder (nothing is downloaded).

    python -m imagent_jax.main --config configs/qwen2_5_vl_7b.py --workdir runs/7b \
        --config.model.checkpoint=/path/to/Qwen2.5-VL-7B-Instruct

Parameters are loaded tensor by tensor straight into their shards on the mesh below; bf16
params and compute. Multi-host: start one process per host; jax.distributed is initialised from
the environment (TPU pods, SLURM).
"""

from imagent_jax import default_config


def get_config(arg=None):
  c = default_config.get_config(arg)
  with c.unlocked():
    c.model.preset = "qwen2_5_vl_7b"
    c.model.checkpoint = ""  # set with --config.model.checkpoint=/path/to/folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.export_hf = False
    c.tools.prompt_style = "full"  # the JSON tool schemas the released models were tuned on
    c.tools.view_max_pixels = 28 * 28 * 256
    c.rollout.max_prompt_len = 4096
    c.rollout.prompt_patches = 4 * 5120
    c.rollout.max_new_tokens = 2048
    c.rollout.obs_max_tokens = 384
    c.processor.max_pixels = 28 * 28 * 1280  # the released processor's default
    c.demo.max_side = 1024
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
  return c
