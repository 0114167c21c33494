"""The training-side log-prob pass: the only way training computes log-probs of trajectories.

One full forward pass over finished trajectories — prompt images and tool views included, with
positions from the family's ``positions`` over the whole sequence — under the same distribution
the rollout sampled from (temperature, suppressed placeholder tokens). The rollout's log-probs
must equal these (tests/test_rollout.py); the trainer logs the gap every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagent_jax.models.registry import family_of
from imagent_jax.sampling import sampler


def token_logprobs(model, params, tokens, attention_mask, pixel_values, image_grid_thw, *,
                   temperature: float = 1.0, banned: tuple[int, ...] | None = None, with_entropy: bool = False):
  """Per-token log-probs (and optionally entropies) of trajectories; not jitted (call inside jit).

  Args:
    model: the module.
    params: parameters.
    tokens: ``[R, S]`` int; attention_mask ``[R, S]``.
    pixel_values: ``[P, D]`` (``trajectory.training_images``); image_grid_thw ``[N, 3]``.
    temperature: the rollout's sampling temperature (0 is read as 1).
    banned: tokens the rollout suppressed (default: the family's ``banned_token_ids``).
    with_entropy: also return the entropy of each next-token distribution.

  Returns:
    ``logp [R, S]`` float32 with ``logp[r, t] = log p(tokens[r, t] | tokens[r, <t])`` (0 at
    ``t = 0`` and at padding); with ``with_entropy``, ``(logp, entropy [R, S])`` aligned the same
    way (the entropy of the distribution token ``t`` was drawn from).
  """
  logits = model.apply({"params": params}, input_ids=tokens, attention_mask=attention_mask, pixel_values=pixel_values,
                       image_grid_thw=image_grid_thw)
  t = 1.0 if temperature == 0.0 else temperature
  logits = sampler.suppress_tokens(logits[:, :-1] / t, family_of(model.config).banned_token_ids(model.config) if banned is None else banned)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
  valid = attention_mask.astype(bool)
  pad = lambda x: jnp.where(valid, jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), 0.0)
  logp = pad(picked)
  if not with_entropy:
    return logp
  probs = jnp.exp(logp_all)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * logp_all, 0.0), axis=-1)
  return logp, pad(entropy)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "banned"))
def sequence_logprobs(model, params, tokens, attention_mask, pixel_values, image_grid_thw,
                      temperature: float = 1.0, banned: tuple[int, ...] | None = None):
  """Jitted ``token_logprobs``: ``[R, S]`` log-probs of finished trajectories (see there)."""
  return token_logprobs(model, params, tokens, attention_mask, pixel_values, image_grid_thw, temperature=temperature,
                        banned=banned)
