"""Log-probs of tokens under the sampling distribution, and the training-side log-prob pass.

``logprobs_of`` is the one definition of a token's log-prob: ``log softmax(logits / t)`` with the
suppressed tokens made impossible, ``t = 0`` (greedy) read as 1. The rollout's forced tokens, the
host turn loop, the training pass below and the supervised warmup loss (``t = 1``, nothing
suppressed) all call it.

``token_logprobs`` is the only way training computes log-probs of trajectories: one full forward
pass over finished trajectories — prompt images and tool views included, with positions from the
family's ``positions`` over the whole sequence — under the same distribution the rollout sampled
from. The rollout's log-probs must equal these (tests/agent/test_rollout.py); the trainer logs the
gap every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagent_jax.models.registry import family_of
from imagent_jax.sampling import sampler


def logprobs_of(logits, tokens, temperature: float = 1.0, banned: tuple[int, ...] = (), *,
                with_entropy: bool = False):
  """Log-probs of ``tokens`` under ``softmax(logits / t)`` with ``banned`` tokens impossible.

  Args:
    logits: ``[..., V]`` float32 (the row of the next-token logits each token was drawn from).
    tokens: ``[...]`` int, the drawn tokens.
    temperature: the sampling temperature ``t``; 0 (greedy) is read as 1, and at 1 the logits are
      used as they are.
    banned: tokens that could not be drawn (``sampler.suppress_tokens``).
    with_entropy: also return the entropy of each distribution.

  Returns:
    ``logp [...]`` float32; with ``with_entropy``, ``(logp, entropy [...])``.
  """
  t = 1.0 if temperature == 0.0 else temperature
  scaled = logits if t == 1.0 else logits / t
  logp_all = jax.nn.log_softmax(sampler.suppress_tokens(scaled, banned), axis=-1)  # [..., V]
  logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
  if not with_entropy:
    return logp
  probs = jnp.exp(logp_all)
  return logp, -jnp.sum(jnp.where(probs > 0, probs * logp_all, 0.0), axis=-1)


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
                       image_grid_thw=image_grid_thw)  # [R, S, V]
  banned = family_of(model.config).banned_token_ids(model.config) if banned is None else banned
  out = logprobs_of(logits[:, :-1], tokens[:, 1:], temperature, banned, with_entropy=with_entropy)
  valid = attention_mask.astype(bool)
  pad = lambda x: jnp.where(valid, jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), 0.0)
  if not with_entropy:
    return pad(out)
  return pad(out[0]), pad(out[1])


@functools.partial(jax.jit, static_argnames=("model", "temperature", "banned"))
def sequence_logprobs(model, params, tokens, attention_mask, pixel_values, image_grid_thw,
                      temperature: float = 1.0, banned: tuple[int, ...] | None = None):
  """Jitted ``token_logprobs``: ``[R, S]`` log-probs of finished trajectories (see there)."""
  return token_logprobs(model, params, tokens, attention_mask, pixel_values, image_grid_thw, temperature=temperature,
                        banned=banned)
