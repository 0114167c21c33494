"""Builds a run's components from its config: model and processor, rollout, tools, reward, masks.

Every stage (model check, rollout, warmup, RL, evaluation) gets its objects here, so a config key
means the same thing everywhere.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from imagent_jax import parallel
from imagent_jax.agent import masks, rewards
from imagent_jax.agent import rollout as rl
from imagent_jax.agent import tools
from imagent_jax.models import hf_io, presets
from imagent_jax.processing import Processor, build_tiny_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def base_dir(workdir: str) -> str:
  """Where the warmup stage saves the tool-naive base (a Hugging Face folder with its tokenizer)."""
  return os.path.join(workdir, "base")


def model_source(config, workdir: str) -> str | None:
  """The checkpoint folder the run starts from: ``config.model.checkpoint``, else the warmup base
  in the workdir when ``config.model.from_warmup_base`` and it exists, else None (random init)."""
  if config.model.checkpoint:
    return os.path.expanduser(config.model.checkpoint)
  base = base_dir(workdir)
  if config.model.from_warmup_base and os.path.isfile(os.path.join(base, "config.json")):
    return base
  return None


def load_model_and_processor(config, workdir: str, mesh, *, random_init: bool = False):
  """``(model_config, params, processor, tokenizer_dir)`` from ``config.model``.

  The weights come from ``model_source`` (a local checkpoint, or the warmup base), or from the
  preset's random init (``random_init`` forces it: the warmup stage trains from scratch).
  Parameters are placed on ``mesh`` directly (loaded tensor by tensor into their shards, or
  initialised in their shards), never whole on one device.
  """
  m = config.model
  param_dtype = DTYPES[m.param_dtype]
  source = None if random_init else model_source(config, workdir)
  if source:
    model_config, params = hf_io.load_pretrained(source, dtype=param_dtype, mesh=mesh)
    tok_dir = m.tokenizer or source
  else:
    model_config = presets.get_preset(m.preset)
    params = parallel.init_sharded_params(model_config, jax.random.key(config.seed), mesh, param_dtype=param_dtype)
    tok_dir = m.tokenizer
    if not tok_dir:
      tok_dir = os.path.join(workdir, "tokenizer")
      if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        build_tiny_tokenizer(tok_dir, vocab_size=model_config.vocab_size, min_pixels=config.processor.min_pixels,
                             max_pixels=config.processor.max_pixels)
  tok_dir = os.path.expanduser(tok_dir)
  processor = Processor.from_pretrained(tok_dir)
  processor.image_settings.update(min_pixels=config.processor.min_pixels, max_pixels=config.processor.max_pixels)
  return model_config, params, processor, tok_dir


def rollout_config(config) -> rl.RolloutConfig:
  r = config.rollout
  return rl.RolloutConfig(group_size=r.group_size, max_prompt_len=r.max_prompt_len, prompt_patches=r.prompt_patches,
                          max_prompt_images=r.max_prompt_images, max_new_tokens=r.max_new_tokens,
                          max_tool_calls=r.max_tool_calls, obs_max_tokens=r.obs_max_tokens,
                          view_max_patches=config.tools.view_max_pixels // (14 * 14), temperature=r.temperature,
                          top_k=r.top_k, top_p=r.top_p)


def tool_config(config) -> tools.ToolConfig:
  t = config.tools
  return tools.ToolConfig(tools=tools.available_tools(t.names), max_tool_images=t.max_tool_images,
                          view_max_pixels=t.view_max_pixels, input_min_pixels=config.processor.min_pixels,
                          input_max_pixels=config.processor.max_pixels, min_box_side=t.min_box_side,
                          max_aspect=t.max_aspect)


def reward_config(config) -> rewards.RewardConfig:
  return rewards.RewardConfig(**config.reward)


def mask_config(config) -> masks.MaskConfig:
  return masks.MaskConfig(group_size=config.rollout.group_size, **config.masks)
