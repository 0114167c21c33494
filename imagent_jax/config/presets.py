"""Released-model settings: the embedded default turned into a run of a released Qwen2.5-VL."""

from __future__ import annotations

import ml_collections

from imagent_jax.config import schema


def released_qwen_config(preset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The default with a released Qwen2.5-VL (``preset``, e.g. ``"qwen2_5_vl_7b"``) read from a
  local folder (``--config.model.checkpoint``): bf16, the released processor's pixel budget, the
  JSON tool schemas those models were tuned on, prompt and response budgets of real questions,
  and a local JSONL dataset (``--config.data.train_path`` etc.).

  Args:
    preset: a model preset name (``models.registry.presets()``).
    arg: passed to ``schema.get_config`` (``"smoke"`` or nothing).
  """
  c = schema.get_config(arg)
  with c.unlocked():
    c.model.preset = preset
    c.model.checkpoint = ""  # set with --config.model.checkpoint=/path/to/folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.export_hf = False
    c.tools.prompt_style = "full"
    c.tools.view_max_pixels = 28 * 28 * 256
    c.tools.min_box_side = 28.0
    c.rollout.max_prompt_len = 4096
    c.rollout.prompt_patches = 4 * 5120
    c.rollout.max_new_tokens = 2048
    c.rollout.obs_max_tokens = 384
    c.processor.max_pixels = 28 * 28 * 1280  # the released processor's default
    c.demo.max_side = 1024
    c.data.source = "jsonl"
  return c
