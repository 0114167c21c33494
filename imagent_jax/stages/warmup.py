"""The ``warmup`` stage: train the tiny VLM from scratch into a tool-naive base.

Offline there is no pretrained VLM to start RL from, so the embedded default first trains one by
supervised next-token prediction on generated tasks that teach what a pretrained base would
know — and nothing about *when* to use a tool:

* ``read_zoom``: an RL trajectory cut after its first tool call: the RL prompt, an assistant turn
  that calls ``confirm`` on the region holding the answer (or, a ``1 - confirm_share`` part of
  the time, ``reflect`` on a random image), and the tool's response turn with the returned view
  → think, then answer. Only the answer is trained: the model learns to read a returned view
  exactly where the rollout puts it, not to call.
* ``direct``: the RL prompt exactly → think, then answer. The model learns the answer format for
  the plain question; where the base view cannot show the detail this is a guess. A
  ``call_share`` part of these prompts is answered with a tool call instead (``confirm`` on the
  region it would ``locate``, or ``reflect``): the base's exploration prior. It calls as often
  where a call helps as where it does not, and it never sees that a call pays.
* ``locate``: "where is the detail this question is about?" → the image number and its box in the
  pixels the model sees. The model learns to ground, which good ``confirm`` boxes need.
* ``tool_syntax``: the RL prompt plus an explicit instruction → the tool call, alone: "Zoom in on
  the detail the question is about." (a ``zoom_request_share`` part of the time; the default 1.0
  always) → ``confirm`` on the asked image's detail, else "Call the confirm tool on image 2 with
  box [...]" or "Call the reflect tool on image 3" (a random image and box). The model learns the
  call syntax and to follow a request to zoom, naming the image the question asks about, as an
  instruction-tuned VLM would (``image_choice_probe`` measures it).

No warmup task rewards a call or shows the answer after a call being better than without: the RL
stage must discover when calling pays and raise the call rate from the prior. The trained base is saved as a Hugging Face folder under
``<workdir>/base`` and reused by later runs in the same workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from imagent_jax import parallel
from imagent_jax.stages import build
from imagent_jax.agent import protocol, tools
from imagent_jax.data import synthetic
from imagent_jax.models import hf_io
from imagent_jax.processing import images as images_lib
from imagent_jax.reporting import MetricsWriter, Report, markdown_table

TaskFn = Callable[[dict, tools.ToolContext, np.random.Generator, "TaskOptions"], tuple[list, list, str]]
TASKS: dict[str, TaskFn] = {}


def register_task(name: str):
  """Registers a warmup task: ``fn(example, ctx, rng, options) -> (images, messages, response_text)``.

  ``messages`` are the conversation after the system prompt (the user turn, and for multi-turn
  tasks the assistant and tool turns before the trained response); ``rng`` is None for a
  deterministic variant (the probe).
  """

  def deco(fn: TaskFn) -> TaskFn:
    TASKS[name] = fn
    return fn

  return deco


def _shown_box(example, ctx: tools.ToolContext, pad: int | None = None) -> tuple[int, list[int]]:
  """The target region, padded (default: by its category's ``zoom_pad``), in the pixels of the
  target image as the model sees it (the question's box when it has a hint:
  ``synthetic.DifficultyConfig.box_hint_pixels``)."""
  k = example["target_image"]
  size, shown = ctx.views[k].size, ctx.shown_sizes[k]
  if pad is None:
    return k, synthetic.zoom_box(example, size, shown)
  return k, synthetic.view_box(example["target_box"], size, shown, pad)


def _user_content(example, num_images: int) -> list:
  """The user turn of the RL prompt for ``example`` (``protocol.build_prompt_messages``)."""
  messages = protocol.build_prompt_messages(example["question"], num_images, example.get("options"), tools=())
  return messages[1]["content"]


def _with_instruction(content: list, text: str) -> list:
  """``content`` with ``text`` appended to its last (question) item."""
  last = dict(content[-1], text=content[-1]["text"] + "\n" + text)
  return content[:-1] + [last]


@dataclasses.dataclass(frozen=True)
class TaskOptions:
  """Warmup task knobs (``config.warmup``).

  Attributes:
    call_share: share of ``direct`` prompts answered with a tool call (the base's call prior).
    confirm_share: share of the base's calls (``direct``) and of ``read_zoom``'s calls that are
      ``confirm`` on the answer's region; the rest are ``reflect`` on a random input image.
    zoom_request_share: share of ``tool_syntax`` requests that ask to zoom on the detail the
      question is about (the call names the asked image); the rest ask, in equal parts, for
      ``reflect`` or ``confirm`` on a named random image (and box).
  """
  call_share: float = 0.0
  confirm_share: float = 1.0
  zoom_request_share: float = 1.0


ANSWER_THOUGHT = "<think>I look at the images.</think>"
VIEW_THOUGHTS = {"confirm": "<think>The zoom shows the detail.</think>",
                 "reflect": "<think>I look at the image again.</think>"}


def _zoom_call(example, ctx) -> protocol.ToolCall:
  """``confirm`` on the answer's padded region (the question's box where it gives one)."""
  k, box = _shown_box(example, ctx)
  return protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})


def _base_call(example, ctx, rng, options: TaskOptions) -> protocol.ToolCall:
  """A call of the base's prior: ``_zoom_call``, or ``reflect`` on a random input image; always
  the zoom when ``rng`` is None."""
  if rng is None or rng.random() < options.confirm_share:
    return _zoom_call(example, ctx)
  return protocol.ToolCall("reflect", {"image": int(rng.integers(len(example["images"]))) + 1})


@register_task("read_zoom")
def _read_zoom(example, ctx, rng, options):
  """The RL prompt, a call, its tool response with the view → answer (the rollout's exact layout)."""
  call = _base_call(example, ctx, rng, options)
  result = tools.run_tool_call(ctx, call)
  n = len(example["images"])
  messages = [{"role": "user", "content": _user_content(example, n)},
              {"role": "assistant", "content": ANSWER_THOUGHT + protocol.render_tool_call(call)},
              protocol.tool_response_message(result.text, result.image is not None)]
  response = f"{VIEW_THOUGHTS[call.name]}<answer>{example['answer']}</answer>"
  view = [result.image] if result.image is not None else []  # a refused call (tools disabled) returns none
  return list(example["images"]) + view, messages, response


@register_task("direct")
def _direct(example, ctx, rng, options):
  """The RL prompt exactly, answered without tools (the answer format, and a guess where the base
  view cannot show the detail), or a ``call_share`` part of the time with the base's call."""
  images = list(example["images"])
  messages = [{"role": "user", "content": _user_content(example, len(images))}]
  if rng is not None and rng.random() < options.call_share:
    return images, messages, ANSWER_THOUGHT + protocol.render_tool_call(_base_call(example, ctx, rng, options))
  return images, messages, f"{ANSWER_THOUGHT}<answer>{example['answer']}</answer>"


@register_task("locate")
def _locate(example, ctx, rng, options):
  k, box = _shown_box(example, ctx, pad=0)
  images = list(example["images"])
  content = _user_content(dict(example, options=None), len(images))
  content = _with_instruction(content, "Which image holds the detail this is about, and where? Give the image "
                                       "number and the box [x0, y0, x1, y1] in its pixels.")
  response = f"<think>The detail is small.</think><answer>image {k + 1} {json.dumps(box)}</answer>"
  return images, [{"role": "user", "content": content}], response


@register_task("tool_syntax")
def _tool_syntax(example, ctx, rng, options):
  """The RL prompt plus an explicit instruction to call a tool → the call, alone.

  A ``zoom_request_share`` part of the time (by default always) "Zoom in on the detail the
  question is about." (``confirm`` on the answer's region: the question's box where it gives
  one); otherwise a named tool on a random image (and box).
  """
  n = len(example["images"])
  k = int(rng.integers(n))
  draw, zoom = rng.random(), options.zoom_request_share
  if draw < zoom:
    call = _zoom_call(example, ctx)
    text = "Zoom in on the detail the question is about."
  elif draw < (1 + zoom) / 2:  # the rest: half reflect, half confirm
    call = protocol.ToolCall("reflect", {"image": k + 1})
    text = f"Call the reflect tool on image {k + 1}."
  else:
    w, h = ctx.shown_sizes[k]
    x0, y0 = int(rng.integers(0, max(1, w - 28))), int(rng.integers(0, max(1, h - 28)))
    box = [x0, y0, min(w, x0 + int(rng.integers(28, 96))), min(h, y0 + int(rng.integers(28, 96)))]
    call = protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})
    text = f"Call the confirm tool on image {k + 1} with box {json.dumps(box)}."
  response = f"<think>As asked.</think>{protocol.render_tool_call(call)}"
  content = _with_instruction(_user_content(example, n), text)
  return list(example["images"]), [{"role": "user", "content": content}], response


def task_options(config) -> TaskOptions:
  """``TaskOptions`` from ``config.warmup``."""
  w = config.warmup
  return TaskOptions(call_share=float(w.call_share), confirm_share=float(w.confirm_share),
                     zoom_request_share=float(w.zoom_request_share))


def make_example(config, index: int, tool_config: tools.ToolConfig, system: str):
  """Warmup example ``index`` (deterministic in ``(config.seed, index)``): messages, images, response."""
  rng = np.random.default_rng([config.seed, 7, index])
  w = config.warmup
  # Its own seed stream: warmup never sees the RL or evaluation questions.
  source = synthetic.generate_example(config.data.seed + 7919, index, build.difficulty(config))
  names = [t.strip() for t in w.tasks.split(",")]
  task = names[index % len(names)]
  ctx = tools.ToolContext(source["images"], tool_config)
  images, turns, response = TASKS[task](source, ctx, rng, task_options(config))
  return [{"role": "system", "content": system}] + turns, images, response, task


def encode_batch(processor, examples, max_len: int, patch_budget: int, image_slots: int, pad_id: int, eos_id: int):
  """Right-padded ``input_ids``/``attention_mask``/``loss_mask [B, max_len]`` + padded images.

  ``loss_mask`` is 1 on the response tokens (and the closing ``<|im_end|>``): the only tokens
  the model is trained to predict.
  """
  b = len(examples)
  ids = np.full((b, max_len), pad_id, np.int32)
  attn = np.zeros((b, max_len), np.int32)
  loss = np.zeros((b, max_len), np.float32)
  patches, grids = [], []
  for i, (messages, images, response, _) in enumerate(examples):
    inputs = processor([messages], [images])
    prompt = inputs["input_ids"][0].tolist()
    target = processor.tokenizer.encode(response) + [eos_id]
    seq = prompt + target
    if len(seq) > max_len:
      raise ValueError(f"warmup example of {len(seq)} tokens exceeds config.warmup.max_len={max_len}")
    ids[i, :len(seq)] = seq
    attn[i, :len(seq)] = 1
    loss[i, len(prompt):len(seq)] = 1.0
    if "pixel_values" in inputs:
      patches.append(inputs["pixel_values"])
      grids.append(inputs["image_grid_thw"])
  s = processor.image_settings
  pv, grid = images_lib.pack_patches(patches, grids, patch_budget=patch_budget, image_slots=image_slots,
                                     patch_dim=3 * s["temporal_patch_size"] * s["patch_size"] ** 2,
                                     what="the warmup batch (config.warmup.patch_budget, image_slots)")
  return dict(input_ids=ids, attention_mask=attn, loss_mask=loss, pixel_values=pv, image_grid_thw=grid)


def sft_loss(model, params, batch):
  """Mean next-token cross-entropy over ``loss_mask`` tokens.

  Returns:
    ``(loss, aux)``: the scalar loss and ``aux`` with ``token_accuracy`` (scalar) and
    ``row_loss [B]`` (each row's mean over its own response tokens, for per-task curves).
  """
  logits = model.apply({"params": params}, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  targets = batch["input_ids"][:, 1:]
  mask = batch["loss_mask"][:, 1:]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(mask.sum(), 1.0)
  acc = ((logits[:, :-1].argmax(-1) == targets) * mask).sum() / n
  row_loss = (nll * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
  return (nll * mask).sum() / n, dict(token_accuracy=acc, row_loss=row_loss)


def make_step(model, optimizer, mesh):
  """The jitted SFT step ``step(params, opt_state, batch) -> (params, opt_state, metrics)``.

  A non-finite loss or gradient leaves params and optimizer untouched. Params and optimizer
  state keep their logical-axis shardings on ``mesh`` in and out (so the second call does not
  recompile for new layouts) and are donated; batch rows go over ``('data', 'fsdp')``.
  """

  def step(params, opt_state, batch):
    (loss, aux), grads = jax.value_and_grad(lambda p: sft_loss(model, p, batch), has_aux=True)(params)
    gnorm = optax.global_norm(grads)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    return keep(new_params, params), keep(new_opt, opt_state), dict(loss=loss, grad_norm=gnorm,
                                                                   skipped=(~ok).astype(jnp.int32), **aux)

  return parallel.sharded_state_step(step, mesh, parallel.param_shardings(model.config, mesh),
                                     parallel.optimizer_state_shardings(optimizer, model.config, mesh))


def read_zoom_probe(model_config, params, processor, examples, tool_config: tools.ToolConfig, system: str, *,
                    batch_size: int = 8, max_new_tokens: int = 48) -> dict[str, float]:
  """How well a model reads the answer when handed the zoom of its region (greedy).

  Each question is a trajectory cut after its first tool call, in the ``read_zoom`` task's layout
  (the rollout's): the RL prompt, a ``confirm`` call on the target region, and the tool response
  with the zoom. The accuracy is the ceiling that RL with the
  ``confirm`` tool can reach from this base: if the model cannot read a perfect zoom, it gains
  nothing by learning to zoom.

  Args:
    model_config, params: the model.
    processor: its ``Processor``.
    examples: synthetic examples with ``target_image`` / ``target_box`` (``data.synthetic``).
    tool_config: the tools (the zoom is made by ``confirm``).
    system: the system prompt.
    batch_size: questions per ``generate`` call.
    max_new_tokens: response budget.

  Returns:
    ``{"read_zoom_accuracy", "read_zoom_format"}``: the share answered right, and the share
    with an ``<answer>`` block.
  """
  from imagent_jax.rl import rewards
  from imagent_jax.sampling import sampler
  right = answered = 0
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    messages, images = [], []
    for e in chunk:
      imgs, turns, _ = _read_zoom(e, tools.ToolContext(e["images"], tool_config), None, TaskOptions())
      messages.append([{"role": "system", "content": system}] + turns)
      images.append(imgs)
    out = sampler.generate(model_config, params, processor(messages, images), max_new_tokens=max_new_tokens,
                           stop_token_ids=[model_config.eos_token_id])
    for e, toks, n in zip(chunk, np.asarray(out["tokens"]), np.asarray(out["lengths"])):
      answer = rewards.extract_answer(processor.tokenizer.decode(toks[:n], skip_special_tokens=True))
      answered += answer is not None
      right += answer is not None and rewards.match_answer(answer, e["answer"], e.get("options"))
  n = max(len(examples), 1)
  return {"read_zoom_accuracy": right / n, "read_zoom_format": answered / n}


def image_choice_probe(model, params, processor, examples, tool_config: tools.ToolConfig,
                       system: str, *, max_len: int, batch_size: int = 16) -> dict[str, float]:
  """Which image a model's zoom names, given that it zooms (teacher forced).

  For each question with two or more images: the RL prompt, then the base's call of the
  ``direct`` task (``confirm`` on the answer's zoom box) with every possible image number k. The
  softmax over k of the response log-probs is how the model splits the call's image over the
  images. Where the share on the asked image is at chance, RL must learn *which* image to zoom on
  (the place is the category's); where it is high, the base already knows and RL learns *whether*.

  Args:
    model, params: the model (the family's module) and its parameters.
    processor: its ``Processor``.
    examples: synthetic examples with ``target_image`` / ``target_box``; single-image ones are skipped.
    tool_config: the tools (the box is in the pixels the model sees the image at).
    system: the system prompt.
    max_len: static sequence length of a row (tokens).
    batch_size: rows (question x image number) per forward pass.

  Returns:
    ``{"call_on_asked_image", "call_on_asked_image_chance", "call_on_asked_image_argmax"}``: the mean
    probability of the asked image, the mean of 1/number of images, and the share of questions
    where the asked image is the most likely; ``{}`` when no question has two images.
  """
  rows, owner = [], []
  for q, e in enumerate(examples):
    n = len(e["images"])
    if n < 2:
      continue
    _, box = _shown_box(e, tools.ToolContext(e["images"], tool_config))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": _user_content(e, n)}]
    for k in range(n):
      call = protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})
      rows.append((messages, list(e["images"]), ANSWER_THOUGHT + protocol.render_tool_call(call), "probe"))
      owner.append(q)
  if not rows:
    return {}
  most = max(len(r[1]) for r in rows)
  settings = processor.image_settings  # an image is resized to at most max_pixels: its patch count's bound
  patches = most * settings["max_pixels"] // settings["patch_size"] ** 2
  cfg = model.config
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  score = jax.jit(lambda p, b: sft_loss(model, p, b)[1]["row_loss"])
  logp = []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static shapes: one compile
    batch = encode_batch(processor, chunk, max_len, batch_size * patches, batch_size * most, pad, cfg.eos_token_id)
    tokens = batch["loss_mask"][:, 1:].sum(-1)
    logp += (-np.asarray(score(params, batch)) * tokens).tolist()
  logp, owner = np.asarray(logp[:len(rows)]), np.asarray(owner)
  p_asked, chance, argmax = [], [], []
  for q in np.unique(owner):
    lp = logp[owner == q]
    p = np.exp(lp - lp.max())
    p /= p.sum()
    k = examples[q]["target_image"]
    p_asked.append(p[k])
    chance.append(1 / len(lp))
    argmax.append(float(lp.argmax() == k))
  return {"call_on_asked_image": float(np.mean(p_asked)), "call_on_asked_image_chance": float(np.mean(chance)),
          "call_on_asked_image_argmax": float(np.mean(argmax))}


RECIPE_FILE = "warmup_recipe.json"  # beside the base's weights: the config entries it was trained with
_NOT_IN_RECIPE = {"model": ("checkpoint", "export_hf", "from_warmup_base"),
                  "data": ("source", "data_dir", "train_size", "validation_size", "test_size", "train_path",
                           "validation_path", "test_path", "on_error"),
                  "warmup": ("progress_bar", "log_every", "probe_examples")}


def recipe(config) -> dict:
  """The config entries that shape the warmup base: ``seed`` and the ``model``, ``processor``,
  ``data``, ``tools`` and ``warmup`` sections, without paths, dataset sizes and logging.

  Args:
    config: a ``ConfigDict`` or its plain-dict form (e.g. a run's ``config.json``).

  Returns:
    ``{"seed": ..., "model": {...}, ...}`` with JSON values (two recipes compare with ``==``).
  """
  plain = config.to_dict() if hasattr(config, "to_dict") else config
  out = {"seed": plain["seed"]}
  for section in ("model", "processor", "data", "tools", "warmup"):
    out[section] = {k: v for k, v in plain[section].items() if k not in _NOT_IN_RECIPE.get(section, ())}
  if not out["tools"].get("listed"):  # "" lists the enabled tools: the prompt of bases older than the key
    out["tools"].pop("listed", None)
  return json.loads(json.dumps(out))


def recipe_differences(trained: dict, wanted: dict) -> list[str]:
  """``"section.key: base X, config Y"`` for every recipe entry where ``trained`` and ``wanted`` differ."""
  out = []
  for section in sorted(set(trained) | set(wanted)):
    a, b = trained.get(section), wanted.get(section)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{section}.{k}: base {a.get(k, '(unset)')!r}, config {b.get(k, '(unset)')!r}"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      out.append(f"{section}: base {a!r}, config {b!r}")
  return out


def check_reused_base(config, base: str) -> None:
  """Raises ``ValueError`` (``"invalid config: ..."``) when the base in ``base`` was trained with
  another recipe than ``config``'s; a base without a recipe file (older runs) is not checked."""
  path = os.path.join(base, RECIPE_FILE)
  if not os.path.isfile(path):
    print(f"  ({base} has no {RECIPE_FILE}: its training config cannot be checked against this one)")
    return
  with open(path) as f:
    diffs = recipe_differences(json.load(f), recipe(config))
  if diffs:
    raise ValueError(f"invalid config: the warmup base in {base} was trained with another recipe "
                     f"({'; '.join(diffs)}); delete that folder to train a base for this config, or use "
                     f"another workdir")


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  """Trains (or reuses) the tool-naive base and saves it under ``<workdir>/base``."""
  out_dir = build.base_dir(workdir)
  if os.path.isfile(os.path.join(out_dir, "config.json")):
    check_reused_base(config, out_dir)
    print(f"Reusing the warmup base in {out_dir} (delete it to train again)")
    report.add("Warmup", f"Reused the tool-naive base in `{out_dir}`.")
    return {"reused": True}
  w = config.warmup
  mesh = parallel.make_mesh(dict(config.mesh))
  model_config, params, processor, tok_dir = build.load_model_and_processor(config, workdir, mesh,
                                                                               random_init=True)
  model = build.build_model(config, model_config)
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(build.listed_tool_schemas(config), config.tools.prompt_style)
  warm = min(w.warmup_steps, max(1, w.steps // 2))
  schedule = optax.warmup_cosine_decay_schedule(0.0, w.learning_rate, warm, max(warm + 1, w.steps),
                                                w.learning_rate * 0.1)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=w.weight_decay))
  step_fn = make_step(model, optimizer, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=step_fn.opt_state_shardings)(params)
  pad = model_config.pad_token_id if model_config.pad_token_id is not None else 0
  t0 = time.perf_counter()
  history = []
  bar = tqdm(range(w.steps), desc="warmup", disable=not w.progress_bar)
  index = 0
  for step in bar:
    examples = []
    for _ in range(w.batch_size):
      examples.append(make_example(config, index, tcfg, system))
      index += 1
    batch = encode_batch(processor, examples, w.max_len, w.patch_budget, w.image_slots, pad, model_config.eos_token_id)
    params, opt_state, m = step_fn(params, opt_state, batch)
    row_loss = np.asarray(m.pop("row_loss"))
    m = {k: float(v) for k, v in m.items()}
    for name in sorted({e[3] for e in examples}):  # each task's mean loss: which skill lags
      m[f"loss/{name}"] = float(np.mean([l for l, e in zip(row_loss, examples) if e[3] == name]))
    history.append(m)
    bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['token_accuracy']:.2f}")
    if step % max(1, w.log_every) == 0 or step == w.steps - 1:
      metrics.write(step, "warmup", **m, learning_rate=float(schedule(step)))
  seconds = time.perf_counter() - t0
  hf_io.save_pretrained(out_dir, model_config, params)
  with open(os.path.join(out_dir, RECIPE_FILE), "w") as f:
    json.dump(recipe(config), f, indent=2)
  for name in os.listdir(tok_dir):  # the tokenizer and image settings travel with the weights
    if not (name.endswith(".safetensors") or name in ("config.json", "generation_config.json",
                                                        "model.safetensors.index.json")):
      shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, name))
  last = history[-1]
  tail = history[-20:]
  task_loss = {k: float(np.mean([h[k] for h in tail if k in h])) for k in sorted({k for h in tail for k in h})
               if k.startswith("loss/")}
  print(f"Warmup: {w.steps} steps in {seconds:.0f}s; final loss {last['loss']:.3f}, "
        f"token accuracy {last['token_accuracy']:.2f}; base saved to {out_dir}")
  print("  loss by task (mean of the last 20 steps): " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in task_loss.items()))
  probe = {}
  if w.probe_examples > 0:
    held_out = build.eval_examples(config, workdir, "validation", w.probe_examples)
    probe = read_zoom_probe(model_config, params, processor, held_out, tcfg, system)
    probe.update(image_choice_probe(model, params, processor, held_out, tcfg, system, max_len=w.max_len))
    metrics.write(w.steps, "warmup_probe", **probe)
    options = held_out[0].get("options") if held_out else None
    chance = f" (chance {1 / len(options):.2f})" if options else ""
    print(f"Reading a handed zoom (the ceiling for RL with confirm): accuracy {probe['read_zoom_accuracy']:.3f} "
          f"on {len(held_out)} validation questions{chance}")
    if "call_on_asked_image" in probe:
      print(f"Which image its zoom names (questions with 2+ images): the asked one with probability "
            f"{probe['call_on_asked_image']:.3f} (chance {probe['call_on_asked_image_chance']:.3f}), the most "
            f"likely one for {probe['call_on_asked_image_argmax']:.0%} of them")
  report.add("Warmup", markdown_table(["measure", "value"], [
      ("steps", w.steps), ("seconds", round(seconds, 1)), ("first loss", round(history[0]["loss"], 4)),
      ("final loss", round(last["loss"], 4)), ("final token accuracy", round(last["token_accuracy"], 4)),
      ("tasks", w.tasks), ("base checkpoint", f"`{out_dir}`")]
      + [(f"{k} (mean of the last 20 steps)", round(v, 4)) for k, v in task_loss.items()]
      + [(f"{k} ({w.probe_examples} validation questions)", round(v, 4)) for k, v in probe.items()]))
  return {"steps": w.steps, "seconds": seconds, **last, **probe}
