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


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None) -> None:
  """Raises ``ValueError`` naming every problem of ``config`` (before anything compiles).

  Args:
    config: the run config.
    num_devices: the devices the mesh must fit (None: not checked).
    num_processes: the processes of a multi-host run (None or 1: one).
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
  errors += _memory_setting_errors(config)
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
  if config.seed < 0:
    errors.append(f"config.seed={config.seed} must be >= 0")
  from imagent_jax.rl import warmup_tasks
  unknown_tasks = [t.strip() for t in str(config.warmup.tasks).split(",") if t.strip() not in warmup_tasks.TASKS]
  if unknown_tasks or not str(config.warmup.tasks).strip():
    errors.append(f"config.warmup.tasks={config.warmup.tasks!r}: unknown or empty task(s) {unknown_tasks}; "
                  f"registered: {list(warmup_tasks.TASKS.names())}")
  if config.warmup.steps < 1 and "warmup" in names:
    errors.append(f"config.warmup.steps={config.warmup.steps} must be >= 1 (drop 'warmup' from config.stages to skip it)")
  if config.warmup.batch_size < 1:
    errors.append(f"config.warmup.batch_size={config.warmup.batch_size} must be >= 1")
  if config.rl.steps < 1 and "rl" in names:
    errors.append(f"config.rl.steps={config.rl.steps} must be >= 1 (drop 'rl' from config.stages to skip it)")
  if config.rl.keep_checkpoints < 1:
    errors.append(f"config.rl.keep_checkpoints={config.rl.keep_checkpoints} must be >= 1 (a resume needs one)")
  if config.rl.checkpoint_every < 0:
    errors.append(f"config.rl.checkpoint_every={config.rl.checkpoint_every} must be >= 0 (0: only at the end)")
  if config.rl.logprob_gap_every < 0:
    errors.append("config.rl.logprob_gap_every must be >= 0 (0: never check)")
  if config.rl.length_bucket < 0:
    errors.append("config.rl.length_bucket must be >= 0 (0: train on the full static length)")
  if config.warmup.image_bucket < 0:
    errors.append("config.warmup.image_bucket must be >= 0 (0: the static image_slots)")
  if config.rl.image_bucket < 0:
    errors.append("config.rl.image_bucket must be >= 0 (0: train with the static image budgets)")

  errors += _eval_errors(config, names)
  errors += _analyze_errors(config, names)

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
  try:
    sources.SourceRequest(on_error=config.data.on_error, seed=config.data.seed)
  except ValueError as e:
    errors.append(f"config.data: {e}")
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
  errors += _stage_errors(config, names)
  if geometry is not None:
    errors += _budget_errors(config, geometry, names)
  if num_devices is not None:
    try:
      parallel.mesh_shape(dict(config.mesh), num_devices)
    except ValueError as e:
      errors.append(f"config.mesh: {e}")
  if num_processes and num_processes > 1:
    errors += _multihost_errors(config, names, num_processes)
  if errors:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))


def _stage_errors(config, names: list[str]) -> list[str]:
  """Stages that make no sense with the model or the data of ``config``: a warmup (training from
  random weights) beside a checkpoint or for a released-size preset, RL or a rollout of a
  released-size model from random weights, data files that do not exist, images per question."""
  from imagent_jax.models.presets import TINY_TOKENIZER_PRESETS

  errors = []
  m, d = config.model, config.data
  released_size = not m.checkpoint and m.preset not in TINY_TOKENIZER_PRESETS
  if "warmup" in names and m.checkpoint:
    errors.append(f"config.stages has 'warmup' with config.model.checkpoint={m.checkpoint!r}: the warmup trains a "
                  "tiny model from random weights and would ignore the checkpoint; drop 'warmup' from config.stages "
                  "(a released model runs config.stages='rl')")
  elif "warmup" in names and released_size:
    errors.append(f"config.stages has 'warmup' with config.model.preset={m.preset!r}: the warmup trains the tiny "
                  f"presets ({', '.join(TINY_TOKENIZER_PRESETS)}) from random weights, not a released-size model; "
                  "start from its checkpoint (config.model.checkpoint) instead")
  started = [s for s in ("rollout", "rl", "eval", "analyze") if s in names]
  if started and released_size:
    errors.append(f"config.stages {started} with config.model.preset={m.preset!r} and no config.model.checkpoint "
                  "would roll out and train random weights; set config.model.checkpoint to the local folder of the "
                  "released model")
  if d.source == "jsonl":
    needed = {"train": "rl" in names,
              "validation": "rollout" in names or ("rl" in names and config.rl.eval_every > 0
                                                   and config.rl.eval_examples > 0),
              "test": "rl" in names and config.rl.test_examples > 0}
    for name, path in _eval_data_splits(config, names):
      needed[path] = True
    if "analyze" in names and config.analyze.split in needed:
      needed[config.analyze.split] = True
    missing = [s for s, need in needed.items() if need and not d[f"{s}_path"]]
    if missing:
      errors.append(f"config.data.source='jsonl' needs {', '.join(f'config.data.{s}_path' for s in missing)} "
                    f"(the stages {names} read those splits)")
  for split in ("train", "validation", "test"):
    path = d[f"{split}_path"]
    if d.source == "jsonl" and path and not os.path.exists(os.path.expanduser(path)):
      errors.append(f"config.data.{split}_path={path!r} does not exist (a .jsonl file or a folder of them)")
  if d.source == "jsonl" and d.image_root and not os.path.isdir(os.path.expanduser(d.image_root)):
    errors.append(f"config.data.image_root={d.image_root!r} is not a folder")
  if d.max_images_per_question < 1:
    errors.append(f"config.data.max_images_per_question={d.max_images_per_question} must be >= 1")
  if "rollout" in names and config.rollout.num_prompts > config.rl.batch_size:
    errors.append(f"config.rollout.num_prompts={config.rollout.num_prompts} > rl.batch_size={config.rl.batch_size}: "
                  "the rollout's prompt budgets hold rl.batch_size questions")
  return errors


def _budget_errors(config, geometry, names: list[str]) -> list[str]:
  """The static budgets of ``config`` against what its questions, batch and tool views need
  (``stages.build.budget_formulas``): each prompt budget must hold ``rl.batch_size`` questions of
  ``images_per_question`` images at ``processor.max_pixels`` (and the prompt's text, measured with
  the tokenizer when its folder is known), the training budgets every row's prompt images (a
  config's ``rl.patch_budget`` may count on fewer tool views than the worst case) and image slots
  for every view, and the minibatches whole rows."""
  from imagent_jax.stages import build

  errors = []
  try:
    images = build.images_per_question(config)
  except ValueError:
    return [f"config.data.images_per_question={config.data.images_per_question!r} is not 'min,max'"]
  if images < 1:
    return []  # reported with the data settings
  need = build.required_budgets(config, geometry)
  r, ro = config.rl, config.rollout
  questions = f"rl.batch_size={r.batch_size} questions of {images} images"
  per_image = geometry.tokens(config.processor.max_pixels)
  if ro.max_prompt_images < need["rollout.max_prompt_images"]:
    errors.append(f"config.rollout.max_prompt_images={ro.max_prompt_images} < rl.batch_size x {images} images per "
                  f"question = {need['rollout.max_prompt_images']}")
  if ro.prompt_patches < need["rollout.prompt_patches"]:
    errors.append(f"config.rollout.prompt_patches={ro.prompt_patches} cannot hold {questions} of up to "
                  f"{per_image * geometry.merge_unit} patches ({need['rollout.prompt_patches']})")
  text = _prompt_text_tokens(config, images)
  if ro.max_prompt_len < images * per_image + text:
    what = f"and the prompt's {text} text tokens without a question" if text else "before any text"
    errors.append(f"config.rollout.max_prompt_len={ro.max_prompt_len} cannot hold {images} images of up to "
                  f"{per_image} tokens {what} (need >= {images * per_image + text}; derived: "
                  f"{need['rollout.max_prompt_len']})")
  rows = r.batch_size * ro.group_size
  if r.num_minibatches < 1 or rows % r.num_minibatches:
    errors.append(f"config.rl.num_minibatches={r.num_minibatches} must divide the {rows} rows of a step "
                  "(rl.batch_size x rollout.group_size)")
    return errors
  minibatch_rows = rows // r.num_minibatches
  if r.grad_accum < 1 or minibatch_rows % r.grad_accum:
    errors.append(f"config.rl.grad_accum={r.grad_accum} must divide the {minibatch_rows} rows of a minibatch "
                  "(rl.batch_size x rollout.group_size / rl.num_minibatches)")
  row_prompt_patches = images * per_image * geometry.merge_unit
  for prefix, count in (("", rows), ("minibatch_", rows // r.num_minibatches)):
    slots, patches = r[f"{prefix}image_slots"], r[f"{prefix}patch_budget"]
    if prefix and not slots and not patches:
      continue  # 0: the batch's own budgets
    what = f"{count} rows" if not prefix else f"{count} rows (1/rl.num_minibatches)"
    if slots < need[f"rl.{prefix}image_slots"]:
      errors.append(f"config.rl.{prefix}image_slots={slots} cannot hold {what} of {images} prompt images and "
                    f"rollout.max_tool_calls={ro.max_tool_calls} views (need {need[f'rl.{prefix}image_slots']})")
    if patches < count * row_prompt_patches:
      errors.append(f"config.rl.{prefix}patch_budget={patches} cannot hold even the prompt images of {what} "
                    f"({count * row_prompt_patches} patches; with every tool view: {need[f'rl.{prefix}patch_budget']})")
  return errors


def _prompt_text_tokens(config, images: int) -> int:
  """Text tokens of the prompt of an empty question with ``images`` images (system prompt, image
  labels, markup), measured with the tokenizer of ``config.model.tokenizer`` or the checkpoint
  when that folder has one; 0 when it is not known before the run (e.g. built in the workdir)."""
  from imagent_jax.stages import build

  folder = os.path.expanduser(config.model.tokenizer or config.model.checkpoint)
  if not folder or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
    return 0
  try:
    processor = build.run_processor(config, folder)
  except (ValueError, OSError):
    return 0  # a broken tokenizer folder is the model stage's to report
  return build.prompt_length(config, processor, "", None, [1] * images) - images


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


def _eval_data_splits(config, names: list[str]) -> list[tuple[str, str]]:
  """The ``data=<split>`` entries of ``config.eval.benchmarks`` when the eval stage runs."""
  if "eval" not in names:
    return []
  from imagent_jax.stages import eval as eval_stage
  try:
    return [(n, p) for n, p in eval_stage.parse_benchmarks(config.eval.benchmarks) if n == eval_stage.DATA]
  except ValueError:
    return []  # reported by _eval_errors


def _analyze_errors(config, names: list[str]) -> list[str]:
  """``config.analyze``: known checkpoints and subsets, a data split, positive sizes."""
  from imagent_jax.stages import analyze

  a, errors = config.analyze, []
  for what, allowed in (("checkpoints", analyze.CHECKPOINTS), ("subsets", analyze.SUBSETS)):
    try:
      analyze.parse_list(a[what], allowed, what)
    except ValueError as e:
      errors.append(str(e))
  if a.split not in ("train", "validation", "test"):
    errors.append(f"config.analyze.split={a.split!r} must be train, validation or test")
  for key in ("questions", "batch_size", "rows_per_pass", "query_chunk", "bins", "window"):
    if a[key] < 1:
      errors.append(f"config.analyze.{key}={a[key]} must be >= 1")
  if "analyze" in names and a.run_dir and not os.path.isdir(os.path.expanduser(a.run_dir)):
    errors.append(f"config.analyze.run_dir={a.run_dir!r} is not a folder")
  return errors


def _eval_errors(config, names: list[str]) -> list[str]:
  """``config.eval``: known benchmarks as ``name=path`` with existing paths (when the stage runs),
  and values in range."""
  from imagent_jax.evaluation.benchmarks import base
  from imagent_jax.evaluation.scoring import _FALLBACKS
  from imagent_jax.stages import eval as eval_stage

  e, errors = config.eval, []
  try:
    specs = eval_stage.parse_benchmarks(e.benchmarks)
  except ValueError as err:
    errors.append(str(err))
    specs = []
  if "eval" in names:
    if not specs:
      errors.append("config.eval.benchmarks is empty: name=path pairs (or data=test)")
    for name, path in specs:
      if name != eval_stage.DATA and not os.path.exists(os.path.expanduser(path)):
        errors.append(f"config.eval.benchmarks: {name}={path}: no such file or folder")
  checks = [(e.weights in eval_stage.WEIGHTS, f"config.eval.weights={e.weights!r} is not one of {eval_stage.WEIGHTS}"),
            (e.option_order in base.OPTION_ORDERS,
             f"config.eval.option_order={e.option_order!r} is not one of {base.OPTION_ORDERS}"),
            (e.circular in eval_stage.CIRCULAR, f"config.eval.circular={e.circular!r} is not one of {eval_stage.CIRCULAR}"),
            (e.answer_fallback in _FALLBACKS, f"config.eval.answer_fallback={e.answer_fallback!r} is not one of {_FALLBACKS}"),
            (e.samples >= 1, f"config.eval.samples={e.samples} must be >= 1 (1: greedy)"),
            (e.batch_size >= 1, f"config.eval.batch_size={e.batch_size} must be >= 1"),
            (e.limit >= 0, f"config.eval.limit={e.limit} must be >= 0 (0: all questions)"),
            (e.seed >= 0, f"config.eval.seed={e.seed} must be >= 0")]
  errors += [message for ok, message in checks if not ok]
  if e.samples > 1 and config.rollout.temperature <= 0:
    errors.append(f"config.eval.samples={e.samples} samples at config.rollout.temperature={config.rollout.temperature}:"
                  " Avg@k needs a temperature > 0")
  return errors


def _multihost_errors(config, names: list[str], processes: int) -> list[str]:
  """What a run of several processes needs: only the stage that trains across hosts, whole
  questions per process, and tensor parallelism within a host (``parallel.local_mesh``)."""
  import jax

  errors = []
  single = [s for s in names if s != "rl"]
  if single:
    errors.append(f"stages {single} run on one process; a multi-host run ({processes} processes) runs 'rl' "
                  "(run the others on one host first)")
  if config.rl.batch_size % processes:
    errors.append(f"config.rl.batch_size={config.rl.batch_size} must be a multiple of the {processes} processes "
                  "(each process rolls out its share of the questions)")
  if config.mesh.tensor > 0 and jax.local_device_count() % config.mesh.tensor:
    errors.append(f"config.mesh.tensor={config.mesh.tensor} must divide the {jax.local_device_count()} devices of a "
                  "process: each process rolls out on its own devices")
  return errors


def _memory_setting_errors(config) -> list[str]:
  """``config.model.attention`` (a known implementation that runs on this backend with this dtype:
  "cudnn" needs a GPU and a 16-bit ``model.dtype``), its block, and ``config.rl.remat``."""
  from imagent_jax.models import layers
  from imagent_jax.stages import build

  errors = []
  try:
    layers.check_attention(config.model.attention, dtype=build.DTYPES.get(config.model.dtype))
  except ValueError as e:
    errors.append(f"config.model.{e}")
  if config.model.attention_block < 1:
    errors.append(f"config.model.attention_block={config.model.attention_block} must be >= 1")
  try:
    layers.remat_name(config.rl.remat)
  except ValueError as e:
    errors.append(f"config.rl.{e}")
  return errors
