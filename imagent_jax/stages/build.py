"""Builds a run's components from its config: model and processor, rollout, tools, reward, masks,
GRPO, data, checkpoints.

Every stage (model check, rollout, warmup, RL, evaluation) gets its objects here, so a config key
means the same thing everywhere. A component's config section maps onto its dataclass field by
field (``from_section``): ``config.rollout`` -> ``agent.rollout.RolloutConfig``, ``config.tools``
-> ``agent.tools.ToolConfig``, ``config.reward`` -> ``rl.rewards.RewardConfig``, ``config.masks``
-> ``rl.masks.MaskConfig``, ``config.rl`` -> ``rl.grpo.GRPOConfig`` (then the trainer's settings).
The few fields computed from other keys are ``DERIVED``, in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from imagent_jax import parallel
from imagent_jax.rl import masks, rewards
from imagent_jax.agent import rollout as rollout_lib
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


# --------------------------------------------------------------------------------------------
# Components: each a dataclass filled from its config section by field name.


COMPONENT_SECTIONS = ("rollout", "tools", "reward", "masks", "rl")  # the sections that configure a dataclass


def component_classes():
  """Config section -> the dataclass it configures (imported here: grpo imports the model stack)."""
  from imagent_jax.rl import grpo
  return {"rollout": rollout_lib.RolloutConfig, "tools": tools.ToolConfig, "reward": rewards.RewardConfig,
          "masks": masks.MaskConfig, "rl": grpo.GRPOConfig}


# The component fields that no key of their section sets: computed from other keys (and the model's
# patch geometry), here and nowhere else. Section -> field -> fn(config, geometry) where geometry()
# is the model's ``PatchGeometry``.
DERIVED: dict[str, dict[str, Callable[[Any, Callable[[], Any]], Any]]] = {
    "rollout": {
        # the static patch slot of a tool view: its pixel budget over the model's pixels per patch
        "view_max_patches": lambda c, geometry: geometry().patches(c.tools.view_max_pixels),
    },
    "tools": {
        "tools": lambda c, geometry: tools.available_tools(c.tools.names),  # the enabled tools
        "input_min_pixels": lambda c, geometry: c.processor.min_pixels,  # how the inputs were shown
        "input_max_pixels": lambda c, geometry: c.processor.max_pixels,
        "factor": lambda c, geometry: geometry().factor,  # views are sized in multiples of it
    },
    "masks": {
        "group_size": lambda c, geometry: c.rollout.group_size,
    },
    "rl": {
        "group_size": lambda c, geometry: c.rollout.group_size,
        "temperature": lambda c, geometry: c.rollout.temperature,  # log-probs under the sampling temperature
        "total_steps": lambda c, geometry: max(c.rl.steps, 1),  # the learning-rate schedule's length
    },
}

# Keys of a component's section that are not fields of its dataclass: settings of a stage (or of
# the system prompt) that read the section too, and ``tools.names`` (ToolConfig.tools, derived).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "rollout": ("num_prompts", "scripted_rows"),
    "tools": ("names", "listed", "prompt_style"),
    "reward": (),
    "masks": (),
    "rl": ("steps", "batch_size", "remat", "patch_budget", "image_slots", "minibatch_patch_budget",
           "minibatch_image_slots", "length_bucket", "logprob_gap_every", "eval_every", "eval_examples",
           "test_examples", "checkpoint_every", "keep_checkpoints", "progress_bar"),
}


def from_section(cls, section, **derived):
  """An instance of the dataclass ``cls`` whose fields come from the config ``section`` by name.

  A field takes ``derived[name]`` when given, else ``section[name]`` when the section has that
  key, else its default; keys of ``section`` that are no field are left to their stage. The
  dataclass checks its own values (``__post_init__``) and raises ``ValueError``.

  Raises:
    TypeError: a ``derived`` name that is not a field of ``cls``.
  """
  names = [f.name for f in dataclasses.fields(cls) if f.init]
  unknown = sorted(set(derived) - set(names))
  if unknown:
    raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
  kwargs = {name: section[name] for name in names if name not in derived and name in section}
  kwargs.update(derived)
  return cls(**kwargs)


def component(config, section: str, model_config=None):
  """The component of ``config.<section>`` (``rollout``, ``tools``, ``reward``, ``masks``, ``rl``):
  its dataclass filled by ``from_section``, with the ``DERIVED`` fields the dataclass has."""
  cls = component_classes()[section]
  fields = {f.name for f in dataclasses.fields(cls)}
  geometry = functools.partial(_geometry, config, model_config)
  derived = {name: fn(config, geometry) for name, fn in DERIVED.get(section, {}).items() if name in fields}
  return from_section(cls, config[section], **derived)


def _geometry(config, model_config=None):
  """The model's patch geometry: of ``model_config``, else of the architecture the run will load
  (the checkpoint's ``config.json``, or the preset)."""
  if model_config is None:
    source = model_source(config, "") if config.model.checkpoint else None
    model_config = hf_io.load_config(source) if source else registry.get_preset(config.model.preset)
  return registry.family_of(model_config).geometry(model_config)


def rollout_config(config, model_config=None) -> rollout_lib.RolloutConfig:
  """``RolloutConfig`` from ``config.rollout``; the view slot in patches from ``config.tools.view_max_pixels``
  and the model's patch geometry (the default family's preset when ``model_config`` is None)."""
  return component(config, "rollout", model_config)


def tool_config(config, model_config=None) -> tools.ToolConfig:
  """``ToolConfig`` from ``config.tools`` and the processor's pixel limits; views are sized in
  multiples of the model's ``PatchGeometry.factor``."""
  return component(config, "tools", model_config)


def reward_config(config) -> rewards.RewardConfig:
  """``RewardConfig`` from ``config.reward``."""
  return component(config, "reward")


def mask_config(config) -> masks.MaskConfig:
  """``MaskConfig`` from ``config.masks`` (group size from ``config.rollout``)."""
  return component(config, "masks")


def grpo_config(config):
  """``rl.grpo.GRPOConfig`` from ``config.rl`` (group size and temperature from ``config.rollout``)."""
  return component(config, "rl")


def eval_rollout_config(config, model_config=None) -> rollout_lib.RolloutConfig:
  """The evaluation rollout: one greedy trajectory per question, same limits as training."""
  return dataclasses.replace(rollout_config(config, model_config), group_size=1, temperature=0.0, top_k=0, top_p=1.0)


def listed_tool_schemas(config) -> list[dict]:
  """JSON schemas of the tools the system prompt lists: ``config.tools.listed``, or the enabled
  ``config.tools.names`` when it is empty (the default)."""
  return tools.tool_schemas(config.tools.listed or config.tools.names)


# --------------------------------------------------------------------------------------------
# Data.


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
  """The random-access source of ``split``: the source registered as ``config.data.source``
  (``data.sources.SOURCES``) asked for that split with the settings of ``config.data``.

  ``synthetic_mifg``: the procedural dataset built once through tfds (array_record) under
  ``config.data.data_dir`` (default ``<workdir>/data``); ``synthetic``: the same examples drawn
  on the fly; ``jsonl``: a local JSONL dataset (``config.data.{train,validation,test}_path``).
  """
  from imagent_jax.data import sources
  d = config.data
  request = sources.SourceRequest(
      split=split, sizes={"train": d.train_size, "validation": d.validation_size, "test": d.test_size},
      seed=d.seed, difficulty=difficulty(config),
      data_dir=os.path.expanduser(d.data_dir) if d.data_dir else os.path.join(workdir, "data"),
      path={"train": d.train_path, "validation": d.validation_path, "test": d.test_path}[split], on_error=d.on_error)
  return sources.make_source(d.source, request)


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
