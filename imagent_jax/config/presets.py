"""Released-model settings: the embedded default turned into a run of a released Qwen2.5-VL.

Where the IMAgent paper (arXiv 2512.08980) is silent, the RL settings are those its 7B peers
use with Qwen2.5-VL-7B-Instruct, each named beside its key:

* verl, ``examples/grpo_trainer/run_qwen2_5_vl-7b.sh``: lr 1e-6, 512 questions x n=5, 4 minibatches
  (ppo_mini_batch_size 128), k3 ("low_var_kl") KL loss 0.01, no entropy bonus, prompts 1024 and
  responses 2048 tokens, constant learning rate (verl's default schedule).
* DeepEyes, ``examples/agent/final_merged_v1v8_thinklite.sh``: lr 1e-6, 256 questions x n=16, one
  update per batch, KL 0, no entropy bonus, 5 assistant turns, prompts 8192 / responses 20480 tokens.
* Mini-o3 (README's RL command): lr 1e-6, 256 questions x n=16, 8 minibatches, KL 0, clip
  0.2 / 0.3, 6 rounds, max_pixels 2,000,000, prompts 8192 / responses 8192 tokens.
"""

from __future__ import annotations

import ml_collections

from imagent_jax.config import schema


def released_qwen_config(preset: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The default with a released Qwen2.5-VL (``preset``, e.g. ``"qwen2_5_vl_7b"``) read from a
  local folder (``--config.model.checkpoint``) and a local JSONL dataset (``--config.data.train_path``
  etc.): the ``rl`` stage from the checkpoint (no warmup: that trains tiny models from scratch),
  bf16, the processor's pixel budget of the Qwen2.5-VL model card, the JSON tool schemas those
  models were tuned on, the peers' RL settings (module docstring), and static budgets derived
  from the questions, the batch and the tool views (``derive_budgets``).

  Args:
    preset: a model preset name (``models.registry.presets()``): the architecture whose patch
      geometry sizes the budgets (a checkpoint's own config.json decides the model).
    arg: passed to ``schema.get_config`` (``"smoke"`` or nothing).
  """
  from imagent_jax.models import registry

  c = schema.get_config(arg)
  with c.unlocked():
    c.stages = "rl"  # evaluation comes as its own stage; the warmup would ignore the checkpoint
    c.model.preset = preset
    c.model.checkpoint = ""  # set with --config.model.checkpoint=/path/to/folder
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.export_hf = False
    # Memory at real scale (experiments/plan_memory.py): flash-style attention, the layers as
    # scans, each layer recomputed in the backward pass. On GPUs, model.attention="cudnn".
    c.model.attention = "blocked"
    c.model.attention_block = 512  # the memory plan's block (the tiny default's 128 suits 2 CPU cores)
    c.model.scan_layers = True
    c.rl.remat = "full"
    c.tools.prompt_style = "full"
    c.tools.view_max_pixels = 28 * 28 * 256  # a returned view: at most 256 tokens
    c.tools.min_box_side = 28.0
    c.processor.max_pixels = 28 * 28 * 1280  # the Qwen2.5-VL model card's budget: at most 1280 tokens an image
    c.demo.max_side = 1024
    c.data.source = "jsonl"
    c.data.max_images_per_question = 4  # MIFG-QA-style multi-image questions; raise for larger sets
    # Turns and lengths: DeepEyes allows 5 assistant turns (4 calls, then the answer); Mini-o3
    # trains with 8192 response tokens (here they include the returned views' tokens).
    c.rollout.max_tool_calls = 4
    c.rollout.max_new_tokens = 8192
    c.rollout.group_size = 16  # DeepEyes, Mini-o3: n=16 (verl's example: 5)
    c.rollout.temperature = 1.0  # all three
    c.rollout.insert_rows = 0  # inserts over the whole batch: rows are sharded over devices, and a gather
    # of m rows would move their KV-cache rows (hundreds of MB each at 8k slots) between them
    c.rl.batch_size = 8  # questions per step (the peers take 256-512 on 8+ GPUs; scale with the mesh)
    c.rl.num_minibatches = 4  # verl's example: 4 updates per batch (DeepEyes 1, Mini-o3 8)
    c.rl.grad_accum = 1  # one pass per minibatch (the memory plan's); k > 1 keeps 1/k of its activations alive
    c.rl.learning_rate = 1e-6  # verl, DeepEyes, Mini-o3
    c.rl.warmup_steps = 0  # constant learning rate, as verl's default schedule
    c.rl.end_lr_ratio = 1.0
    c.rl.kl_coef = 0.0  # DeepEyes, Mini-o3 (verl's example: 0.01); no frozen reference copy in memory
    c.rl.entropy_coef = 0.0  # all three
    c.rl.steps = 500
    c.rl.eval_every = 25  # greedy accuracy on data.validation_path
    c.rl.eval_examples = 64
    c.rl.test_examples = 0  # base vs result on data.test_path: set it (> 0) with a test split
    if arg == "smoke":  # the smallest run of every piece
      c.rollout.group_size, c.rollout.max_new_tokens, c.rollout.max_tool_calls = 2, 512, 3
      c.rl.batch_size, c.rl.num_minibatches, c.rl.steps, c.rl.eval_every, c.rl.eval_examples = 2, 1, 2, 2, 2
    derive_budgets(c, registry.get_preset(preset))
  return c


def derive_budgets(c: ml_collections.ConfigDict, model_config) -> None:
  """Sets the static budgets of ``c`` (``stages.build.budget_formulas``: prompt images, patches and
  tokens, observation slot, training and minibatch patches and image slots) to lazy expressions of
  the keys they follow from (``rl.batch_size``, ``rollout.group_size``, ``rollout.max_tool_calls``,
  ``rl.num_minibatches``, ``processor.max_pixels``, ``tools.view_max_pixels``,
  ``data.max_images_per_question``) for the patch geometry of ``model_config``: an override of
  one of those keys resizes the budgets, an override of a budget replaces it (and
  ``config.validate`` checks it).
  """
  from imagent_jax.models import registry
  from imagent_jax.stages import build

  def ref(key):
    section, name = ("data", "max_images_per_question") if key == "images" else key.split(".")
    return c[section].get_ref(name)

  geometry = registry.family_of(model_config).geometry(model_config)
  for key, value in build.budget_formulas(ref, geometry).items():
    section, name = key.split(".")
    c[section][name] = value
