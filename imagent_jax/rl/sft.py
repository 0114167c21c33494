"""Supervised next-token training on (conversation, response) examples: the warmup's learner.

``encode_batch`` lays examples out as right-padded rows whose ``loss_mask`` covers the response
only; ``sft_loss`` is the mean cross-entropy over those tokens (log-probs from
``rl.logprobs.logprobs_of`` at temperature 1, nothing suppressed); ``make_step`` is the jitted,
sharded optimiser step. ``stages.warmup`` drives them on the ``rl.warmup_tasks`` examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagent_jax import parallel
from imagent_jax.processing import images as images_lib
from imagent_jax.rl import logprobs as logprobs_lib


def encode_batch(processor, examples, max_len: int, patch_budget: int, image_slots: int, pad_id: int, eos_id: int):
  """Right-padded ``input_ids``/``attention_mask``/``loss_mask [B, max_len]`` + padded images.

  Args:
    processor: the ``Processor`` (chat template, tokenizer, image settings).
    examples: ``(messages, images, response, name)`` tuples (``warmup_tasks.make_example``).
    max_len: static row length (tokens); a longer example raises ``ValueError``.
    patch_budget, image_slots: static ``pixel_values [patch_budget, D]`` and
      ``image_grid_thw [image_slots, 3]`` (``images.pack_patches``).
    pad_id: padding token.
    eos_id: the token that closes the response (``<|im_end|>``).

  Returns:
    dict with ``input_ids``, ``attention_mask`` (int32), ``loss_mask`` (float32, 1 on the
    response tokens and the closing ``eos_id``: the only tokens the model is trained to predict),
    ``pixel_values`` and ``image_grid_thw``.
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
                                     patch_dim=images_lib.patch_dim(s),
                                     what="the warmup batch (config.warmup.patch_budget, image_slots)")
  return dict(input_ids=ids, attention_mask=attn, loss_mask=loss, pixel_values=pv, image_grid_thw=grid)


def sft_loss(model, params, batch):
  """Mean next-token cross-entropy over ``loss_mask`` tokens.

  Args:
    model: the family's module.
    params: parameters.
    batch: ``encode_batch``'s dict (``[B, L]`` rows).

  Returns:
    ``(loss, aux)``: the scalar loss and ``aux`` with ``token_accuracy`` (scalar) and
    ``row_loss [B]`` (each row's mean over its own response tokens, for per-task curves).
  """
  logits = model.apply({"params": params}, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])  # [B, L, V]
  targets = batch["input_ids"][:, 1:]
  mask = batch["loss_mask"][:, 1:]
  nll = -logprobs_lib.logprobs_of(logits[:, :-1], targets)  # [B, L - 1]
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
