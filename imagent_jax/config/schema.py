"""The embedded default config (synthetic data, tiny model, CPU) and the config schema.

Every config file under ``configs/`` starts from ``get_config()`` here and changes values; the
returned ``ConfigDict`` is locked, so ``--config.some.typo=1`` fails at start instead of being
ignored. ``validate`` checks impossible combinations before anything compiles.
"""

from __future__ import annotations

import os

import ml_collections

STAGES = ("model", "warmup", "rollout", "rl")  # stages that exist so far; eval / analyze come next
DTYPES = ("float32", "bfloat16", "float16")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The embedded default: the tiny Qwen2.5-VL on procedural multi-image inputs, on CPU.

  Args:
    arg: ``"smoke"`` shrinks everything to the fastest run that still exercises each stage.
  """
  c = ml_collections.ConfigDict()
  c.stages = "model,warmup,rollout,rl"  # comma-separated, run in order (see README)
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # imagent_jax.models.presets name; ignored when checkpoint is set
  c.model.checkpoint = ""  # local Hugging Face Qwen2.5-VL folder (config.json + *.safetensors)
  c.model.tokenizer = ""  # local tokenizer folder; default: the checkpoint's, or a tiny one built in the workdir
  c.model.dtype = "float32"  # compute dtype
  c.model.param_dtype = "float32"
  c.model.export_hf = True  # model stage: save_pretrained into <workdir>/hf_export and check the reload
  c.model.init = "fan_in"  # random init (no checkpoint): "fan_in" (std 1/sqrt(fan_in): trains from scratch) or "hf"
  c.model.from_warmup_base = True  # without a checkpoint, start from <workdir>/base when the warmup made one

  c.processor = ml_collections.ConfigDict()
  c.processor.min_pixels = 56 * 56
  c.processor.max_pixels = 28 * 28 * 64  # small images: tiny model, CPU

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1  # -1: all remaining devices
  c.mesh.tensor = 1

  c.data = ml_collections.ConfigDict()  # imagent_jax.data: what the warmup, RL and evaluation read
  c.data.source = "synthetic_mifg"  # tfds/array_record build of the synthetic set; "synthetic" (on the fly); "jsonl"
  c.data.data_dir = ""  # tfds folder; default <workdir>/data
  c.data.train_size = 10000
  c.data.validation_size = 500
  c.data.test_size = 500
  c.data.seed = 0
  c.data.image_side = "896,896"  # "min,max" pixels ("": sized so the details hide at the base view); 896 = 4 x 224
  c.data.images_per_question = "1,4"
  c.data.categories = "mosaic"  # comma list of synthetic categories; "": all (see README: what the tiny model can read)
  c.data.option_order = "canonical"  # synthetic options: "random" or "canonical" (DifficultyConfig.option_order)
  c.data.box_hint = False  # synthetic questions end with where the detail is, in the pixels the model sees
  c.data.train_path = ""  # jsonl: file or folder (schema in imagent_jax/data/builders/jsonl.py)
  c.data.validation_path = ""
  c.data.test_path = ""
  c.data.on_error = "raise"  # jsonl bad records: "raise" or "skip" (counted)

  c.demo = ml_collections.ConfigDict()  # the model stage's synthetic prompt
  c.demo.num_images = 3
  c.demo.min_side = 64
  c.demo.max_side = 320
  c.demo.batch_size = 2

  c.warmup = ml_collections.ConfigDict()  # imagent_jax/warmup.py: the tool-naive base, trained from scratch
  c.warmup.steps = 450
  c.warmup.batch_size = 8
  c.warmup.learning_rate = 1e-3
  c.warmup.warmup_steps = 20
  c.warmup.weight_decay = 0.0
  c.warmup.tasks = "read_zoom,read_zoom,direct,tool_syntax"  # registered in warmup.TASKS; cycled in this order
  c.warmup.call_share = 0.3  # share of `direct` prompts answered with a tool call: the base's call prior
  c.warmup.confirm_share = 0.8  # share of the base's calls that are confirm on the answer's region (else reflect)
  c.warmup.zoom_request_share = 1.0  # share of tool_syntax requests "zoom on the detail" (else a named tool/image)
  c.warmup.max_len = 896  # static sequence length (tokens)
  c.warmup.patch_budget = 8 * 5 * 256  # static patches per batch (read_zoom rows: 4 images + the view)
  c.warmup.image_slots = 8 * 5
  c.warmup.log_every = 10
  c.warmup.progress_bar = True
  c.warmup.probe_examples = 64  # after training: reading a handed zoom, and which image a zoom names (warmup probes)

  c.rollout = ml_collections.ConfigDict()  # imagent_jax.agent.rollout.RolloutConfig
  c.rollout.num_prompts = 2
  c.rollout.group_size = 4
  c.rollout.max_prompt_len = 640  # static prompt budget (tokens)
  c.rollout.prompt_patches = 4 * 4 * 256  # static patch budget of a batch's prompt images (questions x images x patches)
  c.rollout.max_prompt_images = 16
  c.rollout.max_new_tokens = 512  # per trajectory: sampled + observation tokens
  c.rollout.max_tool_calls = 3
  c.rollout.obs_max_tokens = 240  # static observation slot: tool response text + view tokens
  c.rollout.temperature = 1.0
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0
  c.rollout.insert_wait = 0  # steps a row that closed a tool call may wait so one insert serves several calls
  c.rollout.scripted_rows = -1  # rollout stage: rows per group that follow a demo script; -1: 1 with random weights

  c.tools = ml_collections.ConfigDict()  # imagent_jax.agent.tools.ToolConfig
  c.tools.names = "all"  # "all", "none", or a comma list: "reflect", "confirm"
  # Tools the system prompt lists: "" = the enabled ones (tools.names). "all" with a smaller
  # tools.names keeps a base's prompt while calls to the others fail ("disabled_tool"): the tool
  # ablations of experiments/run_cpu_claim.py, for bases that never saw another prompt.
  c.tools.listed = ""
  c.tools.prompt_style = "compact"  # system prompt: "full" JSON schemas (pretrained Qwen) or "compact" (tiny models)
  c.tools.max_tool_images = 4
  c.tools.view_max_pixels = 28 * 28 * 64  # visual-token budget of a returned view (<= processor.max_pixels)
  c.tools.min_box_side = 2.0  # root pixels; the mosaic's squares are 2 pixels (released configs: 28)
  c.tools.max_aspect = 8.0

  c.reward = ml_collections.ConfigDict()  # imagent_jax.agent.rewards.RewardConfig
  c.reward.name = "tool_gain"
  c.reward.w_acc = 0.8
  c.reward.w_fmt = 0.2
  c.reward.gain = 1.2

  c.masks = ml_collections.ConfigDict()  # imagent_jax.agent.masks.MaskConfig
  c.masks.mask_turn_limit = True
  c.masks.mask_truncated = True
  c.masks.mask_malformed = True
  c.masks.drop_zero_variance_groups = True

  c.rl = ml_collections.ConfigDict()  # imagent_jax/rl: GRPO and the trainer
  c.rl.steps = 100
  c.rl.batch_size = 4  # questions per step; each gets rollout.group_size trajectories
  c.rl.learning_rate = 1e-4
  c.rl.warmup_steps = 5
  c.rl.end_lr_ratio = 0.1
  c.rl.weight_decay = 0.0
  c.rl.max_grad_norm = 1.0
  c.rl.advantage = "grpo"  # "grpo" (group mean/std) or "grpo_unnormalized"
  c.rl.clip_eps_low = 0.2
  c.rl.clip_eps_high = 0.28
  c.rl.loss_agg = "token_mean"  # or "seq_mean"
  c.rl.kl_coef = 0.1  # k3 KL to the frozen start policy (keeps the tiny base's call syntax intact)
  c.rl.entropy_coef = 0.0
  c.rl.num_minibatches = 1
  c.rl.ppo_epochs = 1
  c.rl.remat = False
  c.rl.patch_budget = 4 * 4 * 6 * 256  # static patches of one rollout batch's training pass (16 rows, ~6 images each)
  c.rl.image_slots = 4 * 4 * 7
  c.rl.minibatch_patch_budget = 0  # 0: patch_budget // num_minibatches
  c.rl.minibatch_image_slots = 0
  c.rl.length_bucket = 256  # training pass over the used token span, rounded up to this (0: full static length)
  c.rl.logprob_gap_every = 10  # steps between checks that rollout and training log-probs agree (1 forward; 0: never)
  c.rl.eval_every = 25
  c.rl.eval_examples = 16
  c.rl.test_examples = 64  # rl stage: greedy test-split accuracy and tool use of the base and of the result
  c.rl.checkpoint_every = 25
  c.rl.keep_checkpoints = 2
  c.rl.progress_bar = True

  if arg == "smoke":
    c.model.preset = "micro"  # tiny with one decoder layer and two vision blocks: half the compile time
    c.demo.num_images = 2
    c.demo.max_side = 160
    c.warmup.steps = 3
    c.warmup.batch_size = 2
    c.warmup.patch_budget = 2 * 3 * 256
    c.warmup.image_slots = 2 * 3
    c.warmup.probe_examples = 2
    c.rollout.scripted_rows = 1
    c.rollout.group_size = 2
    c.data.train_size = 16
    c.data.validation_size = 4
    c.data.test_size = 4
    c.data.images_per_question = "1,2"
    c.rl.steps = 2
    c.rl.warmup_steps = 1
    c.rl.logprob_gap_every = 1
    c.rl.batch_size = 2
    c.rl.eval_every = 2
    c.rl.eval_examples = 2
    c.rl.test_examples = 2
    c.rl.checkpoint_every = 1
    c.rl.patch_budget = 2 * 2 * 3 * 256
    c.rl.image_slots = 2 * 2 * 6
  elif arg not in (None, ""):
    raise ValueError(f"unknown config argument {arg!r}; use 'smoke' or nothing")
  c.lock()
  return c


def released_qwen_config(preset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The default with a released Qwen2.5-VL (``preset``, e.g. ``"qwen2_5_vl_7b"``) read from a
  local folder (``--config.model.checkpoint``): bf16, the released processor's pixel budget, the
  JSON tool schemas those models were tuned on, prompt and response budgets of real questions,
  and a local JSONL dataset (``--config.data.train_path`` etc.)."""
  c = get_config(arg)
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


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raises ``ValueError`` naming every problem of ``config`` (before anything compiles)."""
  from imagent_jax import parallel
  from imagent_jax.models import hf_io, registry, tree
  from imagent_jax.models.presets import TINY_TOKENIZER_PRESETS

  errors = []
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if not stages:
    errors.append("config.stages is empty")
  if unknown:
    errors.append(f"unknown stages {unknown}; available: {list(STAGES)}")
  m = config.model
  model_config = None  # the architecture the run will have, when it can be known without weights
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
  geometry = None if model_config is None else registry.family_of(model_config).geometry(model_config)
  if m.init not in tree.INITS:
    errors.append(f"config.model.init={m.init!r} is not one of {tree.INITS}")
  for name in ("dtype", "param_dtype"):
    if m[name] not in DTYPES:
      errors.append(f"config.model.{name}={m[name]!r} is not one of {DTYPES}")
  if not 0 < config.processor.min_pixels <= config.processor.max_pixels:
    errors.append("need 0 < config.processor.min_pixels <= config.processor.max_pixels")
  if config.demo.num_images < 0 or config.demo.batch_size < 1:
    errors.append("config.demo.num_images must be >= 0 and config.demo.batch_size >= 1")
  if not 0 < config.demo.min_side <= config.demo.max_side:
    errors.append("need 0 < config.demo.min_side <= config.demo.max_side")
  if config.tools.view_max_pixels > config.processor.max_pixels:
    errors.append(f"config.tools.view_max_pixels={config.tools.view_max_pixels} exceeds config.processor.max_pixels="
                  f"{config.processor.max_pixels}: the processor would shrink tool views again")
  view_tokens = 0 if geometry is None else geometry.tokens(config.tools.view_max_pixels)
  if config.rollout.obs_max_tokens < view_tokens + 16:
    errors.append(f"config.rollout.obs_max_tokens={config.rollout.obs_max_tokens} cannot hold a view of "
                  f"{view_tokens} tokens plus the tool response text")
  if config.rollout.group_size < 1 or config.rollout.num_prompts < 1:
    errors.append("config.rollout.group_size and num_prompts must be >= 1")
  if config.rollout.insert_wait < 0:
    errors.append(f"config.rollout.insert_wait={config.rollout.insert_wait} must be >= 0")
  if not -1 <= config.rollout.scripted_rows <= config.rollout.group_size:
    errors.append("config.rollout.scripted_rows must lie in [-1, group_size]")
  try:
    from imagent_jax.agent import tools
    from imagent_jax.rl import rewards
    tools.available_tools(config.tools.names)
    tools.available_tools(config.tools.listed or config.tools.names)
    from imagent_jax.agent import protocol
    protocol.system_prompt(tools.tool_schemas(), config.tools.prompt_style)
    rewards.RewardConfig(**config.reward)
  except (ValueError, KeyError, TypeError) as e:
    errors.append(f"config.tools / config.reward: {e}")
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
  for name in ("call_share", "confirm_share", "zoom_request_share"):
    if not 0.0 <= config.warmup[name] <= 1.0:
      errors.append(f"config.warmup.{name}={config.warmup[name]} must lie in [0, 1]")
  if config.rl.logprob_gap_every < 0:
    errors.append("config.rl.logprob_gap_every must be >= 0 (0: never check)")
  if config.rl.length_bucket < 0:
    errors.append("config.rl.length_bucket must be >= 0 (0: train on the full static length)")
  try:
    from imagent_jax.stages import build
    build.grpo_config(config)
  except (ValueError, KeyError, TypeError) as e:
    errors.append(f"config.rl: {e}")
  if num_devices is not None:
    try:
      parallel.mesh_shape(dict(config.mesh), num_devices)
    except ValueError as e:
      errors.append(f"config.mesh: {e}")
  if errors:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
