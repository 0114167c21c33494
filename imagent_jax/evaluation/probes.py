"""Probes of a base model before RL: can it read a handed zoom, and which image does its zoom name?

Both measure what RL can build on (the warmup stage runs them on held-out questions and logs
them as ``warmup_probe``): ``read_zoom_probe`` is the accuracy ceiling of RL with the ``confirm``
tool, ``image_choice_probe`` whether RL must learn *which* image to zoom on or only *whether* to.
"""

from __future__ import annotations

import jax
import numpy as np

from imagent_jax.agent import answers, protocol, tools
from imagent_jax.processing import images as images_lib
from imagent_jax.rl import sft, warmup_tasks
from imagent_jax.sampling import sampler


def read_zoom_probe(model_config, params, processor, examples, tool_config: tools.ToolConfig, system: str, *,
                    batch_size: int = 8, max_new_tokens: int = 48) -> dict[str, float]:
  """How well a model reads the answer when handed the zoom of its region (greedy).

  Each question is a trajectory cut after its first tool call, in the ``read_zoom`` warmup task's
  layout (the rollout's): the RL prompt, a ``confirm`` call on the target region, and the tool
  response with the zoom. The accuracy is the ceiling that RL with the ``confirm`` tool can reach
  from this base: if the model cannot read a perfect zoom, it gains nothing by learning to zoom.

  Args:
    model_config, params: the model.
    processor: its ``Processor``.
    examples: synthetic examples with ``target_image`` / ``target_box`` (``data.synthetic``).
    tool_config: the tools (the zoom is made by ``confirm``).
    system: the system prompt.
    batch_size: questions per ``generate`` call. Every call gets the same shapes (rows, prompt
      length, patches, images), so ``generate`` compiles once.
    max_new_tokens: response budget.

  Returns:
    ``{"read_zoom_accuracy", "read_zoom_format"}``: the share answered right, and the share
    with an ``<answer>`` block.
  """
  if not examples:
    return {"read_zoom_accuracy": 0.0, "read_zoom_format": 0.0}
  read_zoom = warmup_tasks.TASKS["read_zoom"]
  right = answered = 0
  chunks = []
  rows = min(batch_size, len(examples))  # every chunk's row count (one compiled program)
  for i in range(0, len(examples), rows):
    chunk = examples[i:i + rows]
    messages, images = [], []
    for e in chunk + [chunk[-1]] * (rows - len(chunk)):  # full chunks; the copies' answers are not read
      imgs, turns, _ = read_zoom(e, tools.ToolContext(e["images"], tool_config), None, warmup_tasks.TaskOptions())
      messages.append([{"role": "system", "content": system}] + turns)
      images.append(imgs)
    chunks.append((chunk, processor(messages, images)))
  padded, max_image_patches = _same_shapes([c[1] for c in chunks], model_config.pad_token_id or 0)
  for (chunk, _), inputs in zip(chunks, padded):  # one shape: one compiled program for every chunk
    out = sampler.generate(model_config, params, inputs, max_new_tokens=max_new_tokens,
                           stop_token_ids=[model_config.eos_token_id], max_image_patches=max_image_patches)
    for e, toks, n in zip(chunk, np.asarray(out["tokens"]), np.asarray(out["lengths"])):
      answer = answers.extract_answer(processor.tokenizer.decode(toks[:n], skip_special_tokens=True))
      answered += answer is not None
      right += answer is not None and answers.match_answer(answer, e["answer"], e.get("options"))
  n = len(examples)
  return {"read_zoom_accuracy": right / n, "read_zoom_format": answered / n}


def _same_shapes(batches, pad_id: int):
  """Processor outputs of equal row counts (left-padded ``input_ids`` / ``attention_mask
  [B, L_i]``, packed ``pixel_values [P_i, D]``, ``image_grid_thw [N_i, 3]``) brought to one shape,
  so that ``sampler.generate`` compiles once for all of them: the longest ``L`` (more left
  padding), the most patches and images (zero patches and all-zero grid rows: unused slots).

  Returns:
    ``(padded batches, max_image_patches)``: the patches of the largest image of any batch (the
    vision tower's slot size for every call).
  """
  length = max(b["input_ids"].shape[1] for b in batches)
  grids = [np.asarray(b["image_grid_thw"]).reshape(-1, 3) for b in batches]
  slots = max(len(g) for g in grids)
  patches = max(b["pixel_values"].shape[0] for b in batches)
  largest = max(int(np.prod(g, axis=-1).max(initial=0)) for g in grids)
  out = []
  for b, grid in zip(batches, grids):
    more = length - b["input_ids"].shape[1]
    pv = np.asarray(b["pixel_values"])
    pv, grid = images_lib.pack_patches([pv], [grid], patch_budget=patches, image_slots=slots, patch_dim=pv.shape[1])
    out.append(dict(input_ids=np.pad(np.asarray(b["input_ids"]), ((0, 0), (more, 0)), constant_values=pad_id),
                    attention_mask=np.pad(np.asarray(b["attention_mask"]), ((0, 0), (more, 0))),
                    pixel_values=pv, image_grid_thw=grid))
  return out, largest


def image_choice_probe(model, params, processor, examples, tool_config: tools.ToolConfig,
                       system: str, *, max_len: int, batch_size: int = 16) -> dict[str, float]:
  """Which image a model's zoom names, given that it zooms (teacher forced).

  For each question with two or more images: the RL prompt, then the base's call of the
  ``direct`` warmup task (``confirm`` on the answer's zoom box) with every possible image number
  k. The softmax over k of the response log-probs is how the model splits the call's image over
  the images. Where the share on the asked image is at chance, RL must learn *which* image to
  zoom on (the place is the category's); where it is high, the base already knows and RL learns
  *whether*.

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
    _, box = warmup_tasks.shown_box(e, tools.ToolContext(e["images"], tool_config))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": warmup_tasks.user_content(e, n)}]
    for k in range(n):
      call = protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})
      rows.append((messages, list(e["images"]), warmup_tasks.ANSWER_THOUGHT + protocol.render_tool_call(call),
                   "probe"))
      owner.append(q)
  if not rows:
    return {}
  most = max(len(r[1]) for r in rows)
  settings = processor.image_settings  # an image is resized to at most max_pixels: its patch count's bound
  patches = most * settings["max_pixels"] // settings["patch_size"] ** 2
  cfg = model.config
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  score = jax.jit(lambda p, b: sft.sft_loss(model, p, b)[1]["row_loss"])
  logp = []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # static shapes: one compile
    batch = sft.encode_batch(processor, chunk, max_len, batch_size * patches, batch_size * most, pad,
                             cfg.eos_token_id)
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
