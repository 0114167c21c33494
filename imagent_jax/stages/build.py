"""Builds a run's components from its config: model and processor, rollout, tools, reward, masks.

Every stage (model check, rollout, warmup, RL, evaluation) gets its objects here, so a config key
means the same thing everywhere.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from imagent_jax import parallel
from imagent_jax.rl import masks, rewards
from imagent_jax.agent import rollout as rl
from imagent_jax.agent import tools
from imagent_jax.models import hf_io, registry, tree
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
    model_config = registry.get_preset(m.preset)
    params = parallel.init_sharded_params(model_config, jax.random.key(config.seed), mesh, param_dtype=param_dtype)
    params = tree.rescale_init(params, m.init)
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


def build_model(config, model_config, *, remat: bool = False):
  """The family's module of a run (``family.module``): dtypes from ``config.model``, and vision
  attention bands bounded by the processor's ``max_pixels`` (no input or tool view has a larger frame)."""
  family = registry.family_of(model_config)
  return family.module(model_config, dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
                       remat=remat, max_frame_patches=family.geometry(model_config).patches(config.processor.max_pixels))


def rollout_config(config, model_config=None) -> rl.RolloutConfig:
  """``RolloutConfig`` from ``config.rollout``; the view slot in patches from ``config.tools.view_max_pixels``
  and the model's patch geometry (the default family's preset when ``model_config`` is None)."""
  r = config.rollout
  geometry = _geometry(config, model_config)
  return rl.RolloutConfig(group_size=r.group_size, max_prompt_len=r.max_prompt_len, prompt_patches=r.prompt_patches,
                          max_prompt_images=r.max_prompt_images, max_new_tokens=r.max_new_tokens,
                          max_tool_calls=r.max_tool_calls, obs_max_tokens=r.obs_max_tokens,
                          view_max_patches=geometry.patches(config.tools.view_max_pixels), temperature=r.temperature,
                          top_k=r.top_k, top_p=r.top_p, insert_wait=r.insert_wait)


def listed_tool_schemas(config) -> list[dict]:
  """JSON schemas of the tools the system prompt lists: ``config.tools.listed``, or the enabled
  ``config.tools.names`` when it is empty (the default)."""
  return tools.tool_schemas(config.tools.listed or config.tools.names)


def _geometry(config, model_config=None):
  """The model's patch geometry (of the preset's family when ``model_config`` is None)."""
  model_config = model_config or registry.get_preset(config.model.preset)
  return registry.family_of(model_config).geometry(model_config)


def tool_config(config, model_config=None) -> tools.ToolConfig:
  """``ToolConfig`` from ``config.tools`` and the processor's pixel limits; views are sized in
  multiples of the model's ``PatchGeometry.factor``."""
  t = config.tools
  return tools.ToolConfig(tools=tools.available_tools(t.names), max_tool_images=t.max_tool_images,
                          view_max_pixels=t.view_max_pixels, input_min_pixels=config.processor.min_pixels,
                          input_max_pixels=config.processor.max_pixels, min_box_side=t.min_box_side,
                          max_aspect=t.max_aspect, factor=_geometry(config, model_config).factor)


def reward_config(config) -> rewards.RewardConfig:
  return rewards.RewardConfig(**config.reward)


def mask_config(config) -> masks.MaskConfig:
  return masks.MaskConfig(group_size=config.rollout.group_size, **config.masks)


def grpo_config(config):
  """``rl.grpo.GRPOConfig`` from ``config.rl`` (group size and temperature from ``config.rollout``)."""
  from imagent_jax.rl import grpo  # local: grpo imports the model stack
  r = config.rl
  return grpo.GRPOConfig(group_size=config.rollout.group_size, advantage=r.advantage, clip_eps_low=r.clip_eps_low,
                         clip_eps_high=r.clip_eps_high, loss_agg=r.loss_agg, kl_coef=r.kl_coef,
                         entropy_coef=r.entropy_coef, temperature=config.rollout.temperature,
                         learning_rate=r.learning_rate, warmup_steps=r.warmup_steps, total_steps=max(r.steps, 1),
                         end_lr_ratio=r.end_lr_ratio, weight_decay=r.weight_decay, max_grad_norm=r.max_grad_norm,
                         num_minibatches=r.num_minibatches, ppo_epochs=r.ppo_epochs)


def eval_rollout_config(config, model_config=None) -> rl.RolloutConfig:
  """The evaluation rollout: one greedy trajectory per question, same limits as training."""
  import dataclasses
  return dataclasses.replace(rollout_config(config, model_config), group_size=1, temperature=0.0, top_k=0, top_p=1.0)


def difficulty(config):
  """``data.synthetic.DifficultyConfig`` for the processor's base view (``config.data``)."""
  from imagent_jax.data import synthetic
  d = config.data
  over = {}
  if d.image_side:
    over["image_side"] = tuple(int(x) for x in d.image_side.split(","))
  if d.images_per_question:
    over["num_images"] = tuple(int(x) for x in d.images_per_question.split(","))
  if d.categories:
    over["categories"] = tuple(c.strip() for c in d.categories.split(","))
  over["option_order"] = d.option_order
  over["box_hint_pixels"] = config.processor.max_pixels if d.box_hint else 0
  return synthetic.DifficultyConfig.for_processor(config.processor.max_pixels, **over)


def data_source(config, workdir: str, split: str):
  """The random-access source of ``split`` named by ``config.data.source``.

  ``synthetic_mifg``: the procedural dataset built once through tfds (array_record) under
  ``config.data.data_dir`` (default ``<workdir>/data``); ``synthetic``: the same examples drawn
  on the fly; ``jsonl``: a local JSONL dataset (``config.data.{train,validation}_path``).
  """
  from imagent_jax.data import sources
  d = config.data
  sizes = {"train": d.train_size, "validation": d.validation_size, "test": d.test_size}
  if d.source == "synthetic_mifg":
    data_dir = os.path.expanduser(d.data_dir) if d.data_dir else os.path.join(workdir, "data")
    return sources.make_source("synthetic_mifg", data_dir=data_dir, split=split, sizes=sizes,
                                difficulty=difficulty(config), seed=d.seed)
  if d.source == "synthetic":
    from imagent_jax.data import synthetic
    return sources.make_source("synthetic", size=sizes[split], seed=synthetic.split_seed(d.seed, split),
                                difficulty=difficulty(config))
  if d.source == "jsonl":
    path = {"train": d.train_path, "validation": d.validation_path, "test": d.test_path}[split]
    if not path:
      raise ValueError(f"config.data.source='jsonl' needs config.data.{split}_path")
    return sources.make_source("jsonl", path=os.path.expanduser(path), on_error=d.on_error)
  raise ValueError(f"unknown config.data.source={d.source!r}")


def example_stream(config, workdir: str, split: str, batch_size: int):
  """A checkpointable grain iterator of batches of ``split`` examples (shuffled, endless)."""
  from imagent_jax.data import pipeline
  return pipeline.make_iterator(data_source(config, workdir, split), batch_size=batch_size, seed=config.data.seed,
                                shard_index=jax.process_index(), shard_count=jax.process_count())


def eval_examples(config, workdir: str, split: str = "validation", count: int | None = None) -> list[dict]:
  """The first ``count`` (default ``config.rl.eval_examples``) examples of ``split``, in order."""
  if config.data.source == "synthetic_mifg":
    # The tfds build stores exactly the generated examples: draw these few on the fly instead of
    # building the whole dataset first.
    with config.unlocked():
      on_the_fly = config.copy_and_resolve_references()
      on_the_fly.data.source = "synthetic"
    source = data_source(on_the_fly, workdir, split)
  else:
    source = data_source(config, workdir, split)
  n = min(len(source), config.rl.eval_examples if count is None else count)
  return [ex for ex in (source[i] for i in range(n)) if ex is not None]


def checkpoint_manager(config, workdir: str):
  """Orbax manager of ``<workdir>/checkpoints`` keeping the last ``config.rl.keep_checkpoints``."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=config.rl.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(manager, step: int, state, meta: dict) -> None:
  """Saves arrays (``state``: params, optimiser, RNG) and JSON ``meta`` (step, data state)."""
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)


def restore_checkpoint(manager, like):
  """``(state, meta)`` of the latest checkpoint, restored with the shapes/shardings of ``like``; or None."""
  import orbax.checkpoint as ocp
  step = manager.latest_step()
  if step is None:
    return None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def wait_for_checkpoints(manager) -> None:
  manager.wait_until_finished()


def tensorboard_writer(workdir: str):
  """A TensorBoard writer for ``<workdir>/tensorboard`` (None when tensorboardX is missing)."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # pragma: no cover - it is in install_requires
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))
