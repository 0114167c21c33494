"""The checks a config passes before anything compiles (``validate``).

Each component checks its own section: ``validate`` builds the dataclasses through
``stages.build`` (``RolloutConfig``, ``ToolConfig``, ``RewardConfig``, ``MaskConfig``,
``GRPOConfig``, the synthetic data's ``DifficultyConfig``) and reports their ``ValueError``s. What is left
here is what no single dataclass can see: combinations across sections (the mesh and the devices,
images per question and the prompt budgets, tool views and the processor), the model the run will
have, and the settings of sections that configure a stage rather than a component.
"""

from __future__ import annotations

import os

import ml_collections


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ``ValueError`` naming every problem of ``config`` (before anything compiles).

  Args:
    config: the run config.
    num_devices: the devices the mesh must fit (None: not checked).
  """
  from imagent_jax import parallel, stages
  from imagent_jax.agent import protocol, tools
  from imagent_jax.data import sources
  from imagent_jax.models import registry
  from imagent_jax.stages import build

  errors = []
  names = stages.configured(config.stages)
  if not names:
    errors.append("config.stages is empty")
  unknown = [s for s in names if s not in stages.STAGES]
  if unknown:
    errors.append(f"unknown stages {unknown}; available: {list(stages.STAGES.names())}")

  model_config = _model_config(config, errors)
  geometry = None if model_config is None else registry.family_of(model_config).geometry(model_config)

  # Sections that configure a stage, not a component.
  if not 0 < config.processor.min_pixels <= config.processor.max_pixels:
    errors.append("need 0 < config.processor.min_pixels <= config.processor.max_pixels")
  if config.demo.num_images < 0 or config.demo.batch_size < 1:
    errors.append("config.demo.num_images must be >= 0 and config.demo.batch_size >= 1")
  if not 0 < config.demo.min_side <= config.demo.max_side:
    errors.append("need 0 < config.demo.min_side <= config.demo.max_side")
  if config.rollout.num_prompts < 1:
    errors.append("config.rollout.num_prompts must be >= 1")
  if not -1 <= config.rollout.scripted_rows <= config.rollout.group_size:
    errors.append("config.rollout.scripted_rows must lie in [-1, group_size]")
  for name in ("call_share", "confirm_share", "zoom_request_share"):
    if not 0.0 <= config.warmup[name] <= 1.0:
      errors.append(f"config.warmup.{name}={config.warmup[name]} must lie in [0, 1]")
  if config.rl.logprob_gap_every < 0:
    errors.append("config.rl.logprob_gap_every must be >= 0 (0: never check)")
  if config.rl.length_bucket < 0:
    errors.append("config.rl.length_bucket must be >= 0 (0: train on the full static length)")

  # The components, each checking its own section (and the keys it derives from).
  for section in build.COMPONENT_SECTIONS:
    if section in ("rollout", "tools") and model_config is None:
      continue  # sized by the model's patch geometry; the model's problem is reported above
    try:
      build.component(config, section, model_config)
    except (ValueError, KeyError, TypeError) as e:
      errors.append(f"config.{section}: {e}")
  try:
    if config.tools.listed:
      tools.available_tools(config.tools.listed)
    protocol.system_prompt(tools.tool_schemas(), config.tools.prompt_style)
  except (ValueError, KeyError) as e:
    errors.append(f"config.tools: {e}")
  if config.data.source not in sources.SOURCES:
    errors.append(f"config.data.source={config.data.source!r} is not one of {list(sources.SOURCES.names())}")
  try:
    build.difficulty(config)
  except ValueError as e:
    errors.append(f"config.data: {e}")

  # Across sections.
  if config.tools.view_max_pixels > config.processor.max_pixels:
    errors.append(f"config.tools.view_max_pixels={config.tools.view_max_pixels} exceeds config.processor.max_pixels="
                  f"{config.processor.max_pixels}: the processor would shrink tool views again")
  if config.data.source in ("synthetic", "synthetic_mifg") and geometry is not None:
    try:
      most_images = int(str(config.data.images_per_question).split(",")[-1])
    except ValueError:
      most_images = 0
      errors.append(f"config.data.images_per_question={config.data.images_per_question!r} is not 'min,max'")
    need = config.rl.batch_size * most_images
    if need > config.rollout.max_prompt_images:
      errors.append(f"config.rollout.max_prompt_images={config.rollout.max_prompt_images} < rl.batch_size x "
                    f"{most_images} images per question = {need}")
    per_image = geometry.patches(config.processor.max_pixels)
    if need * per_image > config.rollout.prompt_patches:
      errors.append(f"config.rollout.prompt_patches={config.rollout.prompt_patches} cannot hold rl.batch_size="
                    f"{config.rl.batch_size} questions of {most_images} images of up to "
                    f"{per_image} patches ({need * per_image})")
  if num_devices is not None:
    try:
      parallel.mesh_shape(dict(config.mesh), num_devices)
    except ValueError as e:
      errors.append(f"config.mesh: {e}")
  if errors:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


def _model_config(config, errors: list[str]):
  """The architecture the run will have when it can be known without weights (from the
  checkpoint's config.json or the preset), else None; problems of ``config.model`` go to ``errors``."""
  from imagent_jax.models import hf_io, registry, tree
  from imagent_jax.models.presets import TINY_TOKENIZER_PRESETS
  from imagent_jax.stages import build

  m = config.model
  model_config = None
  if m.checkpoint:
    if not os.path.isfile(os.path.join(os.path.expanduser(m.checkpoint), "config.json")):
      errors.append(f"config.model.checkpoint={m.checkpoint!r} is not a folder with a config.json (a local Hugging "
                    "Face checkpoint; nothing is downloaded)")
    else:
      try:
        model_config = hf_io.load_config(os.path.expanduser(m.checkpoint))
      except ValueError as e:
        errors.append(f"config.model.checkpoint: {e}")
  elif m.preset not in registry.presets():
    errors.append(f"config.model.preset={m.preset!r} is not one of {sorted(registry.presets())}")
  else:
    model_config = registry.get_preset(m.preset)
    if m.preset not in TINY_TOKENIZER_PRESETS and not m.tokenizer:
      errors.append(f"config.model.preset={m.preset!r} without a checkpoint needs config.model.tokenizer (a local "
                    f"tokenizer folder); only {', '.join(TINY_TOKENIZER_PRESETS)} build their own")
  if m.init not in tree.INITS:
    errors.append(f"config.model.init={m.init!r} is not one of {tree.INITS}")
  for name in ("dtype", "param_dtype"):
    if m[name] not in build.DTYPES:
      errors.append(f"config.model.{name}={m[name]!r} is not one of {tuple(build.DTYPES)}")
  return model_config
