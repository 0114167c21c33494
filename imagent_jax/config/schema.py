"""The embedded default config (synthetic data, tiny model, CPU) and the config schema.

Every config file under ``configs/`` starts from ``get_config()`` here and changes values; the
returned ``ConfigDict`` is locked, so ``--config.some.typo=1`` fails at start instead of being
ignored. Sections that configure a component name its dataclass, and every field of that
dataclass is a key of the section (``stages.build.from_section`` fills one from the other; the few
fields computed from other keys are ``stages.build.DERIVED``). ``config.validate`` checks the
combinations before anything compiles; ``config.presets`` holds the released-model settings.
"""

from __future__ import annotations

import ml_collections

from imagent_jax.config.validate import validate  # noqa: F401  (``schema.validate``: callers that know the schema)


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
  # The decoder's attention over a whole sequence (training, prefill): "dense" ([B, H, L, L] float32
  # scores), "blocked" (flash-style blocks in jnp, any backend), "xla" or "cudnn" (GPU, 16-bit)
  # through jax.nn.dot_product_attention (imagent_jax.models.layers.attention).
  c.model.attention = "blocked"  # on 2 CPU cores 2x faster than "dense" for the default's training passes
  c.model.attention_block = 128  # query and key block of attention="blocked"
  # Decoder layers of training passes, and runs of same-kind vision blocks, as one lax.scan each
  # (same parameters and values; compile time and memory flat in depth): on for the released sizes.
  c.model.scan_layers = False

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
  c.data.train_path = ""  # jsonl: file or folder (schema in imagent_jax/data/jsonl.py)
  c.data.validation_path = ""
  c.data.test_path = ""
  c.data.on_error = "raise"  # jsonl bad records: "raise" or "skip" (counted)
  c.data.image_root = ""  # jsonl: the folder images must lie in, symlinks followed ("": each JSONL file's folder)
  # jsonl: most images a question may have; the image budgets are sized for it and a record with
  # more is a bad record (too_many_images). Synthetic sources draw data.images_per_question instead.
  c.data.max_images_per_question = 4

  c.demo = ml_collections.ConfigDict()  # the model stage's synthetic prompt
  c.demo.num_images = 3
  c.demo.min_side = 64
  c.demo.max_side = 320
  c.demo.batch_size = 2

  c.warmup = ml_collections.ConfigDict()  # imagent_jax/stages/warmup.py: the tool-naive base, trained from scratch
  c.warmup.steps = 450
  c.warmup.batch_size = 8
  c.warmup.learning_rate = 1e-3
  c.warmup.warmup_steps = 20
  c.warmup.weight_decay = 0.0
  c.warmup.tasks = "read_zoom,read_zoom,direct,tool_syntax"  # registered in rl.warmup_tasks.TASKS; cycled in this order
  c.warmup.call_share = 0.3  # share of `direct` prompts answered with a tool call: the base's call prior
  c.warmup.confirm_share = 0.8  # share of the base's calls that are confirm on the answer's region (else reflect)
  c.warmup.zoom_request_share = 1.0  # share of tool_syntax requests "zoom on the detail" (else a named tool/image)
  c.warmup.max_len = 896  # static sequence length (tokens)
  c.warmup.patch_budget = 8 * 5 * 256  # static patches per batch (read_zoom rows: 4 images + the view)
  c.warmup.image_slots = 8 * 5
  c.warmup.image_bucket = 16  # a batch's vision slots: its images rounded up to this (0: image_slots)
  c.warmup.log_every = 10
  c.warmup.progress_bar = True
  c.warmup.probe_examples = 64  # after training: reading a handed zoom, and which image a zoom names (warmup probes)

  c.rollout = ml_collections.ConfigDict()  # imagent_jax.agent.rollout.RolloutConfig
  c.rollout.num_prompts = 2  # rollout stage: questions of its demo batch
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
  c.rollout.share_prefix = True  # prefill the prompts' common system turn (tool schemas) once per batch, not per row
  c.rollout.insert_rows = 2  # rows one observation insert computes: those that closed a call, 2 at a time (0: the whole batch)
  c.rollout.scripted_rows = -1  # rollout stage: rows per group that follow a demo script; -1: 1 with random weights

  c.tools = ml_collections.ConfigDict()  # imagent_jax.agent.tools.ToolConfig
  c.tools.names = "all"  # the enabled tools (ToolConfig.tools): "all", "none", or a comma list: "reflect", "confirm"
  # Tools the system prompt lists: "" = the enabled ones (tools.names). "all" with a smaller
  # tools.names keeps a base's prompt while calls to the others fail ("disabled_tool"): the tool
  # ablations of experiments/run_cpu_claim.py, for bases that never saw another prompt.
  c.tools.listed = ""
  c.tools.prompt_style = "compact"  # system prompt: "full" JSON schemas (pretrained Qwen) or "compact" (tiny models)
  c.tools.max_tool_images = 4
  c.tools.view_min_pixels = 56 * 56  # smallest returned view (>= processor.min_pixels)
  c.tools.view_max_pixels = 28 * 28 * 64  # visual-token budget of a returned view (<= processor.max_pixels)
  c.tools.min_box_side = 2.0  # root pixels; the mosaic's squares are 2 pixels (released configs: 28)
  c.tools.max_aspect = 8.0

  c.reward = ml_collections.ConfigDict()  # imagent_jax.rl.rewards.RewardConfig
  c.reward.name = "tool_gain"  # rewards.REWARDS: "tool_gain", "tool_gain_helpful", ...
  c.reward.w_acc = 0.8
  c.reward.w_fmt = 0.2
  c.reward.gain = 1.2
  c.reward.min_image_calls = 1  # successful image calls a correct answer needs for the gain
  c.reward.helpful_without_baseline = True  # tool_gain_helpful in an all-tool group: pay the gain
  c.reward.require_think = True  # format needs a <think> block opening every turn
  c.reward.fallback = "none"  # answer extraction fallback (agent.answers.ANSWER_FALLBACKS)
  c.reward.rel_tol = 1e-2  # numeric answers: relative tolerance
  c.reward.abs_tol = 0.0
  c.reward.integer_exact = True  # integer answers must match exactly

  c.masks = ml_collections.ConfigDict()  # imagent_jax.rl.masks.MaskConfig
  c.masks.mask_turn_limit = True
  c.masks.mask_truncated = True
  c.masks.mask_malformed = True
  c.masks.drop_zero_variance_groups = True
  c.masks.group_stats_include_masked = True  # masked trajectories still count in the group mean/std
  c.masks.zero_variance_tol = 1e-6  # a group with reward spread <= this has no signal (GRPO uses it too)

  c.rl = ml_collections.ConfigDict()  # imagent_jax.rl.grpo.GRPOConfig, then the trainer's settings
  c.rl.steps = 100
  c.rl.batch_size = 4  # questions per step; each gets rollout.group_size trajectories
  c.rl.learning_rate = 1e-4
  c.rl.warmup_steps = 5
  c.rl.end_lr_ratio = 0.1
  c.rl.weight_decay = 0.0
  c.rl.max_grad_norm = 1.0
  c.rl.b1 = 0.9  # Adam
  c.rl.b2 = 0.999
  c.rl.adam_eps = 1e-8
  c.rl.advantage = "grpo"  # "grpo" (group mean/std) or "grpo_unnormalized"
  c.rl.adv_eps = 1e-6  # added to the group std
  c.rl.clip_eps_low = 0.2
  c.rl.clip_eps_high = 0.28
  c.rl.loss_agg = "token_mean"  # or "seq_mean"
  c.rl.kl_coef = 0.1  # k3 KL to the frozen start policy (keeps the tiny base's call syntax intact)
  c.rl.entropy_coef = 0.0
  c.rl.num_minibatches = 1
  c.rl.ppo_epochs = 1
  # Micro-batches per optimiser step (gradient accumulation: the same update, 1/k of the rows'
  # activations alive at once). 2 keeps the default's RL step under ~0.5 GB of temporaries.
  c.rl.grad_accum = 2
  # The trainer's settings (rl.trainer, stages/rl.py).
  # What each decoder layer keeps for the backward pass (models.layers.REMAT_POLICIES): "none",
  # "full" (recompute the layer), "dots" (keep matmul results), "dots_no_batch" (keep the
  # projections, recompute attention scores). Any but "none" recomputes the vision blocks whole.
  c.rl.remat = "none"
  # Positions per row projected onto the vocabulary at once when taking log-probs and entropies
  # (training and old-policy passes; 0: all at once). [rows, chunk, vocab] float32 blocks.
  c.rl.logprob_chunk = 1024
  c.rl.patch_budget = 4 * 4 * 6 * 256  # static patches of one rollout batch's training pass (16 rows, ~6 images each)
  c.rl.image_slots = 4 * 4 * 7
  c.rl.minibatch_patch_budget = 0  # 0: patch_budget // num_minibatches
  c.rl.minibatch_image_slots = 0
  c.rl.length_bucket = 256  # training pass over the used token span, rounded up to this (0: full static length)
  c.rl.image_bucket = 16  # training pass over the batch's images, slots rounded up to this (0: the static budgets)
  c.rl.logprob_gap_every = 10  # steps between logging the rollout/training log-prob gap (measured by every update; 0: never)
  c.rl.eval_every = 25
  c.rl.eval_examples = 16
  c.rl.test_examples = 64  # rl stage: greedy test-split accuracy and tool use of the base and of the result
  c.rl.checkpoint_every = 25
  c.rl.keep_checkpoints = 2
  c.rl.progress_bar = True
  c.rl.prefetch = True  # read and preprocess the next batch while the device trains

  c.eval = ml_collections.ConfigDict()  # the eval stage (imagent_jax/stages/eval.py; configs/eval.py)
  # name=path pairs, comma-separated: vstar, hrbench_4k, hrbench_8k, mme_realworld, mme_realworld_lite,
  # muirbench, blink, mmiu, jsonl (evaluation.benchmarks), each the dataset's folder as published;
  # data=<split> is the run's own data (config.data), e.g. the synthetic test questions.
  c.eval.benchmarks = "data=test"
  # "latest": the last RL checkpoint of eval.run_dir, else the model's source; "base": the model's
  # source (model.checkpoint, or the warmup base); "rl": the last RL checkpoint (an error without one).
  c.eval.weights = "latest"
  c.eval.run_dir = ""  # the run whose checkpoints/ "latest" and "rl" read (default: the workdir)
  c.eval.split = ""  # the benchmarks' split ("": each one's default)
  c.eval.option_order = "shuffled"  # "shuffled" (seeded per question) or "as_published"
  c.eval.seed = 0  # option shuffles and Avg@k sampling
  c.eval.circular = "auto"  # every rotation of the options must be right: "auto" (as the benchmark's protocol), "on", "off"
  c.eval.samples = 1  # 1: greedy; k > 1: Avg@k, k rollouts per question at rollout.temperature / top_k / top_p
  c.eval.batch_size = 4  # questions per rollout batch (prompt budgets are sized from the data for it)
  c.eval.limit = 0  # the first N questions of each benchmark (0: all)
  c.eval.answer_fallback = "text"  # responses without <answer>: "text" (the response's own words), "none", "boxed"
  c.eval.progress_bar = True

  c.analyze = ml_collections.ConfigDict()  # the analyze stage (imagent_jax/stages/analyze.py; configs/analyze.py)
  c.analyze.checkpoints = "base,rl"  # compared: "base" (model source / warmup base), "rl" (last RL checkpoint), "latest"
  c.analyze.run_dir = ""  # the run whose checkpoints/ "rl" and "latest" read (default: the workdir)
  c.analyze.split = "test"  # the run's own data split the questions come from
  c.analyze.subsets = "single,multi"  # questions with one image / several ("all": every question)
  c.analyze.questions = 16  # per subset, the first of the split
  c.analyze.batch_size = 4  # questions per rollout batch
  c.analyze.rows_per_pass = 4  # trajectories per attention-shares pass (memory: one pass's activations)
  c.analyze.query_chunk = 256  # queries per attention block of that pass: [rows, heads, chunk, length] probabilities
  c.analyze.bins = 10  # generation-progress bins of the curves
  c.analyze.window = 8  # generated tokens before / after a tool view enters that are compared
  c.analyze.progress_bar = True

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
