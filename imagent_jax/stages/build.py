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
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from imagent_jax import parallel
from imagent_jax.rl import masks, rewards
from imagent_jax.agent import protocol
from imagent_jax.agent import rollout as rollout_lib
from imagent_jax.agent import tools
from imagent_jax.models import hf_io, registry, tree
from imagent_jax.processing import Processor, build_tiny_tokenizer
from imagent_jax.processing import images as images_lib

log = logging.getLogger(__name__)

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
  else:
    model_config = registry.get_preset(m.preset)
    params = parallel.init_sharded_params(model_config, jax.random.key(config.seed), mesh, param_dtype=param_dtype)
    params = tree.rescale_init(params, m.init)
  tok_dir = tokenizer_dir(config, workdir, random_init=random_init)
  if not m.tokenizer and not source and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
    build_tiny_tokenizer(tok_dir, vocab_size=model_config.vocab_size, min_pixels=config.processor.min_pixels,
                         max_pixels=config.processor.max_pixels)
  return model_config, params, run_processor(config, tok_dir), tok_dir


def tokenizer_dir(config, workdir: str, *, random_init: bool = False) -> str:
  """The tokenizer folder of a run: ``config.model.tokenizer``, else the folder the weights come from
  (``model_source``; none with ``random_init``), else ``<workdir>/tokenizer``, where runs from
  random weights build the tiny tokenizer (``load_model_and_processor``)."""
  source = None if random_init else model_source(config, workdir)
  return os.path.expanduser(config.model.tokenizer or source or os.path.join(workdir, "tokenizer"))


def run_processor(config, tok_dir: str) -> Processor:
  """The ``Processor`` of the tokenizer folder ``tok_dir`` showing images within ``config.processor``'s
  pixel limits (they replace the folder's preprocessor_config.json values)."""
  processor = Processor.from_pretrained(tok_dir)
  processor.image_settings.update(min_pixels=config.processor.min_pixels, max_pixels=config.processor.max_pixels)
  return processor


def build_model(config, model_config, *, remat: bool | str = "none"):
  """The family's module of a run (``family.module``): dtypes and the decoder's attention
  (``model.attention``, ``model.attention_block``, ``model.scan_layers``) from ``config.model``, the remat policy ``remat``
  (the rl stage passes ``config.rl.remat``), and vision attention bands bounded by the processor's
  ``max_pixels`` (no input or tool view has a larger frame)."""
  family = registry.family_of(model_config)
  m = config.model
  return family.module(model_config, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype], remat=remat,
                       max_frame_patches=family.geometry(model_config).patches(config.processor.max_pixels),
                       attention=m.attention, attention_block=m.attention_block, scan_layers=m.scan_layers)


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
           "minibatch_image_slots", "length_bucket", "image_bucket", "logprob_gap_every", "eval_every", "eval_examples",
           "test_examples", "checkpoint_every", "keep_checkpoints", "progress_bar", "prefetch"),
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


def question_prompt(config) -> Callable[[Any], list]:
  """``prompt(example) -> messages``: the opening conversation of a question in every stage that
  rolls out the agent (rl, eval): its images, question and options, the tools of
  ``listed_tool_schemas`` in ``config.tools.prompt_style``. ``example`` is an example dict or a
  ``benchmarks.Example`` (its images are counted, not decoded)."""
  return functools.partial(_question_prompt, tools=listed_tool_schemas(config), style=config.tools.prompt_style)


def _question_prompt(example, *, tools, style):
  if isinstance(example, dict):
    question, images, options = example["question"], example["images"], example.get("options")
  else:
    question, images, options = example.question, example.image_refs, example.options
  return protocol.build_prompt_messages(question, len(images), list(options) if options else None, tools=tools,
                                        system_style=style)


def listed_tool_schemas(config) -> list[dict]:
  """JSON schemas of the tools the system prompt lists: ``config.tools.listed``, or the enabled
  ``config.tools.names`` when it is empty (the default)."""
  return tools.tool_schemas(config.tools.listed or config.tools.names)


# --------------------------------------------------------------------------------------------
# Static budgets: the shapes every compiled program is padded to, and what they must hold.

# Text tokens a prompt budget allows beside its image tokens: the system prompt with the tool
# schemas (~400 tokens with Qwen2.5's tokenizer in the "full" style), the image labels and markup,
# the question and its options. ``config.validate`` and the JSONL scan measure the real prompts.
PROMPT_TEXT_TOKENS = 1024
# Text tokens an observation slot allows beside the view's image tokens: the tool response
# markup and its message (longer error texts are shortened to fit, agent.rollout).
OBS_TEXT_TOKENS = 128


def images_per_question(config) -> int:
  """The most images a question of the run's data has: the top of ``config.data.images_per_question``
  for the synthetic sources (they draw no more), else ``config.data.max_images_per_question``."""
  d = config.data
  if d.source in ("synthetic", "synthetic_mifg") and d.images_per_question:
    return int(str(d.images_per_question).split(",")[-1])
  return int(d.max_images_per_question)


def budget_formulas(value: Callable[[str], Any], geometry) -> dict[str, Any]:
  """The static budgets a run's shapes need, by config key, as expressions of the keys they follow from.

  Prompts: ``rl.batch_size`` questions share one prefill, each with up to ``images`` images of up
  to ``processor.max_pixels`` pixels. Training: ``rl.batch_size x rollout.group_size`` rows, each
  re-rendering its prompt images and up to ``rollout.max_tool_calls`` tool views of up to
  ``tools.view_max_pixels`` (``agent.trajectory.training_images``); a minibatch holds
  ``1 / rl.num_minibatches`` of the rows. An image of at most ``p`` pixels has at most
  ``p // geometry.pixels_per_token`` tokens of ``geometry.merge_unit`` patches each.

  Args:
    value: reads a key, e.g. ``value("rl.batch_size")``, and ``value("images")`` for
      ``images_per_question``. With plain values the result is numbers (``required_budgets``);
      with ml_collections ``FieldReference`` s it is lazy references (``config.presets`` derives a
      released config's budgets that way, so ``--config.rl.batch_size=8`` resizes them).
    geometry: the model's ``PatchGeometry``.

  Returns:
    ``{"rollout.max_prompt_images", "rollout.prompt_patches", "rollout.max_prompt_len",
    "rollout.obs_max_tokens", "rl.image_slots", "rl.patch_budget", "rl.minibatch_image_slots",
    "rl.minibatch_patch_budget": ...}``: the worst case with every image at its pixel budget and
    every row making every call, plus ``PROMPT_TEXT_TOKENS`` / ``OBS_TEXT_TOKENS`` of text.
  """
  images, questions, views = value("images"), value("rl.batch_size"), value("rollout.max_tool_calls")
  rows = questions * value("rollout.group_size")
  input_tokens = value("processor.max_pixels") // geometry.pixels_per_token
  view_tokens = value("tools.view_max_pixels") // geometry.pixels_per_token
  row_slots = images + views
  row_patches = (images * input_tokens + views * view_tokens) * geometry.merge_unit
  minibatch_rows = rows // value("rl.num_minibatches")
  return {
      "rollout.max_prompt_images": questions * images,
      "rollout.prompt_patches": questions * images * input_tokens * geometry.merge_unit,
      "rollout.max_prompt_len": images * input_tokens + PROMPT_TEXT_TOKENS,
      "rollout.obs_max_tokens": view_tokens + OBS_TEXT_TOKENS,
      "rl.image_slots": rows * row_slots,
      "rl.patch_budget": rows * row_patches,
      "rl.minibatch_image_slots": minibatch_rows * row_slots,
      "rl.minibatch_patch_budget": minibatch_rows * row_patches,
  }


def required_budgets(config, geometry) -> dict[str, int]:
  """``budget_formulas`` of ``config``'s values (images: ``images_per_question``)."""
  def value(key):
    if key == "images":
      return images_per_question(config)
    section, name = key.split(".")
    return int(config[section][name])
  return budget_formulas(value, geometry)


def image_tokens(size: tuple[int, int], image_settings) -> int:
  """Tokens of an image of ``size = (width, height)`` pixels as the processor shows it
  (``image_settings``: ``Processor.image_settings``, pixel limits and patch geometry)."""
  factor = image_settings["patch_size"] * image_settings["merge_size"]
  height, width = images_lib.smart_resize(size[1], size[0], factor, image_settings["min_pixels"],
                                          image_settings["max_pixels"])
  return (height // factor) * (width // factor)


def prompt_length(config, processor, question: str, options, tokens_per_image: Sequence[int]) -> int:
  """Tokens of the rollout prompt of a question (the conversation ``stages.rl`` opens: the listed
  tools in ``config.tools.prompt_style``) whose images become ``tokens_per_image`` tokens each."""
  messages = protocol.build_prompt_messages(question, len(tokens_per_image), options,
                                            tools=listed_tool_schemas(config), system_style=config.tools.prompt_style)
  return len(processor.tokenizer.encode(processor.render(messages))) + sum(int(t) - 1 for t in tokens_per_image)


def _record_check(config, processor):
  """The check ``JsonlSource.check_records`` applies: a record has at most ``images_per_question``
  images and, with a processor, a prompt within ``rollout.max_prompt_len`` (its images' sizes are
  read from their headers only when the prompt could exceed it with every image at the pixel budget)."""
  most_images, limit = images_per_question(config), config.rollout.max_prompt_len

  def check(record):
    paths = record["images"]
    if len(paths) > most_images:
      return ("too_many_images", f"{len(paths)} images; the run's image budgets hold {most_images} per question "
              "(config.data.max_images_per_question)")
    if processor is None:
      return None
    settings = processor.image_settings
    at_most = settings["max_pixels"] // (settings["patch_size"] * settings["merge_size"]) ** 2
    if prompt_length(config, processor, record["question"], record["options"], [at_most] * len(paths)) <= limit:
      return None
    try:
      sizes = [Image.open(p).size for p in paths]  # the header only: no pixel is decoded
    except Exception as e:  # noqa: BLE001 - reported as the record's problem, as when it is read
      return ("corrupt_image", f"cannot read an image's size ({type(e).__name__}: {e})")
    tokens = [image_tokens(size, processor.image_settings) for size in sizes]
    total = prompt_length(config, processor, record["question"], record["options"], tokens)
    if total > limit:
      return ("prompt_too_long", f"its prompt has {total} tokens ({sum(tokens)} of them image tokens), more than "
              f"config.rollout.max_prompt_len={limit}")
    return None

  return check


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

  A source whose records can be checked before they are read (``check_records``: the JSONL
  source) is scanned against the run's static budgets first, so that a question with more images
  than ``images_per_question`` or a prompt longer than ``config.rollout.max_prompt_len`` is a bad
  record naming its file and line (raised, or skipped under ``config.data.on_error="skip"``)
  before anything compiles. Prompt lengths are measured with the run's tokenizer
  (``tokenizer_dir``) when it exists already.
  """
  from imagent_jax.data import sources
  d = config.data
  request = sources.SourceRequest(
      split=split, sizes={"train": d.train_size, "validation": d.validation_size, "test": d.test_size},
      seed=d.seed, difficulty=difficulty(config),
      data_dir=os.path.expanduser(d.data_dir) if d.data_dir else os.path.join(workdir, "data"),
      path={"train": d.train_path, "validation": d.validation_path, "test": d.test_path}[split], on_error=d.on_error,
      image_root=d.image_root)
  source = sources.make_source(d.source, request)
  if hasattr(source, "check_records"):
    tok_dir = tokenizer_dir(config, workdir)
    processor = run_processor(config, tok_dir) if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")) else None
    source.check_records(_record_check(config, processor))
  return source


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
  """Orbax manager of ``<workdir>/checkpoints`` keeping the last ``config.rl.keep_checkpoints``.

  Orbax writes each step to a temporary folder and renames it when complete, so a run killed
  mid-save leaves no half-written step in the manager's view."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=config.rl.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(manager, step: int, state, meta: dict) -> None:
  """Saves arrays (``state``: params, optimiser, RNG) and JSON ``meta`` (step, data state)."""
  import orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
               force=True)


def restore_checkpoint(manager, like):
  """``(state, meta)`` of the newest intact checkpoint, restored with the shapes/shardings of
  ``like``; None when there is none.

  A step that does not restore (truncated or zeroed array file, broken JSON metadata, a missing
  manifest: any error reading it) is logged in one line and the next newest is tried. Once one
  restores, the newer steps that did not are set aside to ``<checkpoints>_corrupt/<step>`` (moved,
  never deleted; by process 0 only) and ``manager`` is reloaded, so later saves and restores no
  longer see them. When no step restores, nothing is moved (a changed model config fails every
  step the same way) and a ``RuntimeError`` names the steps tried and how to start fresh. Every
  process tries the same steps in the same order and they agree on each outcome."""
  import orbax.checkpoint as ocp
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
  found = _restore_newest_intact(manager, lambda step: manager.restore(step, args=args), set_aside=True)
  if found is None:
    return None
  restored, _ = found
  return restored["state"], restored["meta"]


def restore_params(directory: str, like):
  """``(params, step)`` of the newest intact checkpoint under ``directory`` (a run's ``checkpoints``
  folder), only the parameters read (partial restore: no optimiser state is built), with the
  shapes and shardings of ``like``; None when there is no checkpoint.

  Like ``restore_checkpoint`` a step that does not restore is skipped with a warning, but nothing
  is moved: evaluating a run never changes it."""
  import orbax.checkpoint as ocp
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  abstract = {"params": jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)}
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
  found = _restore_newest_intact(manager, lambda step: manager.restore(step, args=args), set_aside=False)
  if found is None:
    return None
  restored, step = found
  return restored["state"]["params"], int(step)


def _restore_newest_intact(manager, restore: Callable[[int], Any], *, set_aside: bool):
  """``(restore(step), step)`` for the newest step of ``manager`` that restores; None when it has
  no step. See ``restore_checkpoint``."""
  directory = os.fspath(manager.directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failed: list[tuple[int, str]] = []
  for step in steps:
    try:
      restored, error = restore(step), None
    except Exception as e:  # noqa: BLE001 - orbax, tensorstore, json and OS errors all mean "unreadable"
      restored, error = None, _one_line(e)
    # Every process must take the same branch: a step any of them cannot read counts as unreadable.
    failures = parallel.allgather(np.int32(error is not None))
    if error is None and failures.any():
      error = "it did not restore on another process"
    if error is None:
      break
    log.warning("checkpoint %s does not restore (%s); trying an older one",
                os.path.join(directory, str(step)), error)
    failed.append((step, error))
  else:
    tried = ", ".join(f"{s} ({e})" for s, e in failed)
    raise RuntimeError(
        f"no checkpoint in {directory} restores: tried steps {tried}; nothing was moved. If the run's model or "
        f"optimiser config changed since they were written, restore it; else start fresh with a new --workdir "
        f"or after removing {directory}")
  if failed and set_aside:
    _set_aside(manager, [s for s, _ in failed])
  return restored, step


def _set_aside(manager, steps: Sequence[int]) -> None:
  """Moves step folders of ``manager`` to ``<its directory>_corrupt/`` (process 0; the others wait)
  and reloads ``manager`` so that it no longer lists them."""
  import time
  directory = os.fspath(manager.directory).rstrip(os.sep)
  aside = directory + "_corrupt"
  if parallel.is_primary():
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      src = os.path.join(directory, str(step))
      if not os.path.exists(src):
        continue
      dst = os.path.join(aside, str(step))
      if os.path.exists(dst):  # set aside before: keep both
        dst += time.strftime(".%Y%m%d-%H%M%S")
      os.rename(src, dst)
      log.warning("set aside the unreadable checkpoint %s as %s", src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("imagent_jax.build.set_aside_checkpoints")
  manager.reload()


def _one_line(error: BaseException, limit: int = 300) -> str:
  """``Type: first line of the message``, without tensorstore's spec dump, at most ``limit`` characters."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" [tensorstore_spec=")[0]
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def wait_for_checkpoints(manager) -> None:
  manager.wait_until_finished()


def tensorboard_writer(workdir: str):
  """A TensorBoard writer for ``<workdir>/tensorboard`` (None when tensorboardX is missing)."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:  # pragma: no cover - it is in install_requires
    return None
  return SummaryWriter(os.path.join(workdir, "tensorboard"))
