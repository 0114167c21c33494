"""Log-probs of tokens under the sampling distribution, and the training-side log-prob pass.

``logprobs_of`` is the one definition of a token's log-prob: ``log softmax(logits / t)`` with the
suppressed tokens made impossible, ``t = 0`` (greedy) read as 1. The rollout's forced tokens, the
host turn loop, the training pass below and the supervised warmup loss (``t = 1``, nothing
suppressed) all call it.

``token_logprobs`` is the only way training computes log-probs of trajectories: one full forward
pass over finished trajectories — prompt images and tool views included, with positions from the
family's ``positions`` over the whole sequence — under the same distribution the rollout sampled
from. The rollout's log-probs must equal these (tests/agent/test_rollout.py); the trainer logs the
gap every step. The pass never holds the ``[R, S, V]`` float32 logits: the module returns its
final hidden states and ``chunk_logprobs`` projects them a chunk of positions at a time, in the
forward and (recomputing each chunk) the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagent_jax.models.registry import family_of
from imagent_jax.sampling import sampler

# Positions per row whose logits the training pass holds at once (``token_logprobs``): at a
# 152k vocabulary, 1024 positions are 0.6 GB of float32 logits per row on a device.
DEFAULT_CHUNK_SIZE = 1024

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
                   temperature: float = 1.0, banned: tuple[int, ...] | None = None, with_entropy: bool = False,
                   chunk_size: int | None = DEFAULT_CHUNK_SIZE):
  """Per-token log-probs (and optionally entropies) of trajectories; not jitted (call inside jit).

  The forward pass stops at the final hidden states (``return_hidden=True``); ``chunk_logprobs``
  projects them onto the vocabulary ``chunk_size`` positions at a time, so only ``[R, chunk, V]``
  float32 logits exist at once, in the backward pass too.

  Args:
    model: the module.
    params: parameters.
    tokens: ``[R, S]`` int; attention_mask ``[R, S]``.
    pixel_values: ``[P, D]`` (``trajectory.training_images``); image_grid_thw ``[N, 3]``.
    temperature: the rollout's sampling temperature (0 is read as 1).
    banned: tokens the rollout suppressed (default: the family's ``banned_token_ids``).
    with_entropy: also return the entropy of each next-token distribution.
    chunk_size: positions per row projected at once (static); None or 0: all in one piece.

  Returns:
    ``logp [R, S]`` float32 with ``logp[r, t] = log p(tokens[r, t] | tokens[r, <t])`` (0 at
    ``t = 0`` and at padding); with ``with_entropy``, ``(logp, entropy [R, S])`` aligned the same
    way (the entropy of the distribution token ``t`` was drawn from).
  """
  hidden = model.apply({"params": params}, input_ids=tokens, attention_mask=attention_mask, pixel_values=pixel_values,
                       image_grid_thw=image_grid_thw, return_hidden=True)  # [R, S, D]
  banned = family_of(model.config).banned_token_ids(model.config) if banned is None else banned
  project = lambda h: model.apply({"params": params}, h, method="logits")
  out = chunk_logprobs(project, hidden[:, :-1], tokens[:, 1:], temperature, banned, with_entropy=with_entropy,
                       chunk_size=chunk_size)
  valid = attention_mask.astype(bool)
  pad = lambda x: jnp.where(valid, jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), 0.0)
  if not with_entropy:
    return pad(out)
  return pad(out[0]), pad(out[1])


def chunk_logprobs(project, hidden, tokens, temperature: float = 1.0, banned: tuple[int, ...] = (), *,
                   with_entropy: bool = False, chunk_size: int | None = DEFAULT_CHUNK_SIZE):
  """``logprobs_of(project(hidden), tokens, ...)`` computed ``chunk_size`` positions at a time.

  The positions are cut into ``k = ceil(L / chunk_size)`` equal chunks of ``ceil(L / k)``
  (the last padded; padding is dropped), and ``jax.lax.map`` runs one chunk after the other
  through a ``jax.checkpoint``-ed step: the backward pass recomputes each chunk's logits instead
  of saving them, so live memory is ``[R, chunk, V]`` rather than ``[R, L, V]`` (for one more
  vocabulary matmul per chunk). The values equal the unchunked ones up to float summation order.

  Args:
    project: ``hidden [R, c, D] -> logits [R, c, V]`` float32 (the module's ``logits``).
    hidden: ``[R, L, D]`` final hidden states; position ``t`` predicts ``tokens[:, t]``.
    tokens: ``[R, L]`` int, the tokens drawn from each position's distribution.
    temperature, banned: as ``logprobs_of``.
    with_entropy: also return the entropies.
    chunk_size: positions per chunk (static); None, 0 or ``>= L``: one chunk.

  Returns:
    ``logp [R, L]`` float32; with ``with_entropy``, ``(logp, entropy [R, L])``.
  """
  step = jax.checkpoint(lambda h, t: logprobs_of(project(h), t, temperature, banned, with_entropy=with_entropy),
                        prevent_cse=False)
  r, length = tokens.shape
  k = 1 if not chunk_size or chunk_size >= length else -(-length // chunk_size)
  if k == 1:
    return step(hidden, tokens)
  c = -(-length // k)
  extra = k * c - length
  hidden = jnp.pad(hidden, ((0, 0), (0, extra), (0, 0)))
  tokens = jnp.pad(tokens, ((0, 0), (0, extra)))
  chunks = lambda x: jnp.moveaxis(x.reshape(r, k, c, *x.shape[2:]), 1, 0)  # [k, R, c, ...]
  out = jax.lax.map(lambda xs: step(*xs), (chunks(hidden), chunks(tokens)))  # [k, R, c] (each)
  unchunk = lambda y: jnp.moveaxis(y, 0, 1).reshape(r, k * c)[:, :length]
  return jax.tree_util.tree_map(unchunk, out)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "banned", "chunk_size"))
def sequence_logprobs(model, params, tokens, attention_mask, pixel_values, image_grid_thw,
                      temperature: float = 1.0, banned: tuple[int, ...] | None = None,
                      chunk_size: int | None = DEFAULT_CHUNK_SIZE):
  """Jitted ``token_logprobs``: ``[R, S]`` log-probs of finished trajectories (see there)."""
  return token_logprobs(model, params, tokens, attention_mask, pixel_values, image_grid_thw, temperature=temperature,
                        banned=banned, chunk_size=chunk_size)
