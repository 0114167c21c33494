"""Jitted prefill + decode over a preallocated KV cache.

``generate`` is the public contract (DESIGN.md §5). It is built from three pure pieces that the
agent rollout reuses: ``prefill`` (prompt, images and all, into a fresh cache), ``decode_step``
(one token for every row) and ``sample_logits``. The G rollouts of one prompt share one prefill:
the prompt is prefilled once and its cache broadcast to the group (``group_size``).

Log-probs: ``logprobs[b, i]`` is ``log softmax(logits / temperature)`` of the sampled token
(plain ``log softmax`` for greedy); top-k / top-p shape which token is drawn but not the
reported log-prob, which is what the training forward pass recomputes.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from imagent_jax.models.registry import family_of

_NEG = -1e30


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries. Shapes: ``B`` rows, ``S`` cache slots, ``V`` vocabulary."""

  cache: Any  # the family's KV cache (family.init_cache), e.g. one {'k', 'v'} per decoder layer
  key_mask: jax.Array  # [B, S] bool: cache slots that hold real tokens
  index: jax.Array  # [B] int32: next cache slot to write, per row
  next_pos: jax.Array  # [B] int32: position of the next text token (all M-RoPE streams)
  logits: jax.Array  # [B, V] float32: next-token logits


def suppress_tokens(logits, token_ids: Sequence[int]):
  """``logits [..., V]`` with ``token_ids`` made impossible (the policy must never emit image
  placeholders: a sampled ``<|image_pad|>`` would have no image behind it)."""
  if not token_ids:
    return logits
  return logits.at[..., jnp.asarray(token_ids, jnp.int32)].set(_NEG)


def sample_logits(logits, rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, row_ids=None):
  """Draws one token per row and returns ``(tokens [B], logprobs [B])``.

  Row ``b`` draws with its own key ``fold_in(rng, row_ids[b])``, so what a row samples depends
  only on ``rng``, its id and its logits, never on the other rows: a batch split over processes
  (each rolling out its own rows, ``agent.rollout.Rollout(..., row_ids=...)``) samples exactly what
  one process with the whole batch samples.

  Args:
    logits: ``[B, V]`` float32.
    rng: PRNG key (unused when ``temperature == 0``).
    temperature: 0 for greedy (argmax), else the softmax temperature.
    top_k: keep the ``k`` most likely tokens (0 = all).
    top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1 = all).
    row_ids: ``[B]`` int, each row's id in the global batch (default ``arange(B)``).
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    tokens = jnp.argmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
  else:
    scaled = logits / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    masked = scaled
    if top_k and top_k > 0:
      kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
      masked = jnp.where(scaled < kth, _NEG, masked)
    if top_p < 1.0:
      order = jnp.argsort(-masked, axis=-1)
      sorted_logits = jnp.take_along_axis(masked, order, axis=-1)
      probs = jax.nn.softmax(sorted_logits, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
      drop_sorted = before >= top_p
      drop = jnp.zeros_like(drop_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(drop_sorted)
      masked = jnp.where(drop, _NEG, masked)
    ids = jnp.arange(logits.shape[0], dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, ids)
    tokens = jax.vmap(jax.random.categorical)(keys, masked)
  return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def prefill(model, params, input_ids, attention_mask, pixel_values, image_grid_thw,
            cache_len: int, num_image_features=None, shared_prefix: int = 0) -> DecodeState:
  """Runs the prompt through the model into a fresh cache of ``cache_len`` slots.

  Args:
    model: the family's module (``family.module``: its config and dtypes).
    params: parameters.
    input_ids: ``[B, L]`` left-padded prompt ids.
    attention_mask: ``[B, L]``.
    pixel_values: ``[P, C*T*p*p]`` or None.
    image_grid_thw: ``[N, 3]`` or None.
    cache_len: ``S >= L`` slots; slots ``L..S-1`` are left for generated (or inserted) tokens.
    num_image_features: real merged features; default: counted from ``image_grid_thw``, so
      ``pixel_values`` and the grid may be padded to a static budget (zero patches after the
      images', all-zero grid rows).
    shared_prefix: ``K > 0`` when every row's first ``K`` real tokens are the same text (a
      system prompt; no image tokens; the caller checks, e.g. ``shared_prefix_length``): they
      are prefilled once, as one row, and their keys and values written into every row's
      slots; then each row's slots ``K..L-1`` are prefilled over that cache (a row whose
      prompt starts after slot ``K`` recomputes the prefix tokens it has there). The state is
      the whole prefill's up to float rounding, for ``1/B`` of the prefix's compute.

  Only each row's last real position goes through the vocabulary projection.
  """
  c = model.config
  family = family_of(c)
  b, l = input_ids.shape
  features = None
  if pixel_values is not None:
    features = model.apply({"params": params}, pixel_values, image_grid_thw, method="encode_images")
    if num_image_features is None:  # padded patches are not features
      num_image_features = family.num_real_features(c, image_grid_thw)
  mask = jnp.asarray(attention_mask).astype(bool)
  key_mask = jnp.zeros((b, cache_len), bool).at[:, :l].set(mask)
  last = l - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # [B] last real position
  cache = family.init_cache(c, b, cache_len, model.dtype)
  start = 0
  offset = None
  if shared_prefix:
    k = int(shared_prefix)
    if not 0 < k < l:
      raise ValueError(f"shared_prefix={k} must lie in (0, {l}) for prompts of {l} slots")
    first = jnp.argmax(mask, axis=1).astype(jnp.int32)  # [B] slot of each row's first real token
    ids = jax.lax.dynamic_slice(jnp.asarray(input_ids)[0], (first[0],), (k,))[None]  # [1, K] row 0's prefix
    one = family.init_cache(c, 1, k, model.dtype)
    pos = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (3, 1, k))  # text only: all streams at 0..K-1
    embeds = model.apply({"params": params}, ids, None, method="embed")
    _, one = model.apply({"params": params}, embeds, pos, jnp.ones((1, k), bool), one, 0,
                         logits_at=jnp.zeros((1,), jnp.int32), method="decode")
    cache = family.place_prefix(c, cache, one, first)
    start = k
    offset = jnp.maximum(k - first, 0)  # real tokens of each row before slot K: the prefix's first ones
  ids, window = jnp.asarray(input_ids)[:, start:], mask[:, start:]
  embeds = model.apply({"params": params}, ids, features, num_image_features, method="embed")
  positions, deltas = family.positions(c, ids, window, image_grid_thw, offset=offset)
  logits, cache = model.apply({"params": params}, embeds, positions, key_mask, cache, start, logits_at=last - start,
                              method="decode")
  return DecodeState(cache=cache, key_mask=key_mask, index=jnp.full((b,), l, jnp.int32),
                     next_pos=(l - start) + deltas, logits=logits)


def shared_prefix_length(input_ids, attention_mask, end_id: int, image_ids: Sequence[int]) -> int:
  """The prefix ``sampler.prefill(..., shared_prefix=K)`` may share: every row's real tokens up
  to and including the first ``end_id`` (the system turn's ``<|im_end|>``), when all rows of
  ``input_ids [B, L]`` (left-padded, ``attention_mask [B, L]``; numpy) start with the same such
  turn and it holds no token of ``image_ids``; else 0 (also for ``B == 1``: nothing to share).
  Depends only on the prompts' common opening, so every batch of a config gets the same ``K``."""
  ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
  if ids.shape[0] < 2:
    return 0
  rows = [r[m] for r, m in zip(ids, mask)]
  ends = np.flatnonzero(rows[0] == end_id)
  if not len(ends):
    return 0
  k = int(ends[0]) + 1
  head = rows[0][:k]
  if k >= ids.shape[1] or np.isin(head, list(image_ids)).any():
    return 0
  return k if all(len(r) > k and np.array_equal(r[:k], head) for r in rows[1:]) else 0


def decode_model(model, backend: str | None = None):
  """The module decode steps run with, over the same parameters: the family's ``for_decoding`` on
  ``backend`` (default ``jax.default_backend()``; on CPU Qwen2.5-VL's steps attend over the used
  part of the cache). The prompt's prefill keeps ``model``."""
  return family_of(model.config).for_decoding(model, backend or jax.default_backend())


def decode_step(model, params, state: DecodeState, tokens, active=None) -> DecodeState:
  """Writes ``tokens [B]`` at each row's slot ``state.index`` and computes the next logits.

  Rows with ``active [B] == False`` compute but do not advance: their slot stays masked and is
  overwritten by their next real token.
  """
  b = tokens.shape[0]
  active = jnp.ones((b,), bool) if active is None else active
  embeds = model.apply({"params": params}, tokens[:, None], None, method="embed")
  pos = jnp.broadcast_to(state.next_pos[None, :, None], (3, b, 1))
  slot = jax.nn.one_hot(state.index, state.key_mask.shape[1], dtype=bool) & active[:, None]
  key_mask = state.key_mask | slot
  logits, cache = model.apply({"params": params}, embeds, pos, key_mask, state.cache, state.index,
                              method="decode")
  step = active.astype(jnp.int32)
  return state.replace(cache=cache, key_mask=key_mask, index=state.index + step, next_pos=state.next_pos + step,
                       logits=jnp.where(active[:, None], logits[:, -1], state.logits))


def repeat_rows(state: DecodeState, group_size: int) -> DecodeState:
  """Broadcasts a prefilled state to ``group_size`` consecutive copies of every row."""
  if group_size == 1:
    return state
  rep = lambda x: jnp.repeat(x, group_size, axis=0) if getattr(x, "ndim", 0) >= 1 else x
  return jax.tree_util.tree_map(rep, state)


def take_rows(state: DecodeState, rows) -> DecodeState:
  """The decode state of ``rows [m]`` (int indices into the ``B`` rows), cache rows included:
  every leaf with a leading row axis, as ``repeat_rows`` reads them."""
  return jax.tree_util.tree_map(lambda x: x[rows], state)


def put_rows(state: DecodeState, rows, part: DecodeState) -> DecodeState:
  """Writes ``part`` (``m`` rows, e.g. from ``take_rows``) back at ``rows [m]``; indices outside
  ``0..B-1`` (padding) are dropped."""
  return jax.tree_util.tree_map(lambda full, new: full.at[rows].set(new, mode="drop"), state, part)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "stop_token_ids", "pad_id", "group_size"))
def _generate(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, rng, *, max_new_tokens,
              temperature, top_k, top_p, stop_token_ids, pad_id, group_size):
  l = input_ids.shape[1]
  state = prefill(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, l + max_new_tokens)
  state = repeat_rows(state, group_size)
  model = decode_model(model)
  rows = input_ids.shape[0] * group_size
  stops = jnp.asarray(stop_token_ids if stop_token_ids else (-1,), jnp.int32)

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, state, out, logps, done, rng = carry
    rng, sub = jax.random.split(rng)
    tok, logp = sample_logits(state.logits, sub, temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    logp = jnp.where(done, 0.0, logp)
    out = out.at[:, i].set(tok)
    logps = logps.at[:, i].set(logp)
    done = done | jnp.isin(tok, stops)
    state = decode_step(model, params, state, tok)
    return i + 1, state, out, logps, done, rng

  out = jnp.full((rows, max_new_tokens), pad_id, jnp.int32)
  logps = jnp.zeros((rows, max_new_tokens), jnp.float32)
  init = (jnp.int32(0), state, out, logps, jnp.zeros((rows,), bool), rng)
  _, _, out, logps, _, _ = jax.lax.while_loop(cond, body, init)
  is_stop = jnp.isin(out, stops) & (stops[0] >= 0)
  first_stop = jnp.where(is_stop.any(-1), jnp.argmax(is_stop, axis=-1) + 1, max_new_tokens)
  return {"tokens": out, "logprobs": logps, "lengths": first_stop.astype(jnp.int32)}


def generate(config, params, inputs, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, rng=None, stop_token_ids: Sequence[int] = (), group_size: int = 1,
             dtype=jnp.float32, pad_id: int | None = None, max_image_patches: int | None = None) -> dict:
  """Samples continuations of a left-padded batch (DESIGN.md §5).

  Args:
    config: model config (of any registered family).
    params: parameters (any sharding).
    inputs: dict as the model takes it: ``input_ids [B, L]``, ``attention_mask [B, L]`` (left
      padding), optional ``pixel_values [P, C*T*p*p]`` and ``image_grid_thw [N, 3]`` (either may
      be padded to a static budget: zero patches after the images', all-zero grid rows).
    max_new_tokens: ``N``.
    temperature: 0 = greedy, which equals transformers' ``generate(do_sample=False)``.
    top_k: 0 = off.
    top_p: 1 = off.
    rng: PRNG key for sampling (default ``jax.random.key(0)``).
    stop_token_ids: a row stops after emitting one of these (it is kept in ``tokens``).
    group_size: ``G`` samples per prompt from one shared prefill; rows ``b*G .. b*G+G-1``.
    dtype: compute dtype.
    pad_id: fills ``tokens`` after a stop; default ``config.pad_token_id`` (or 0).
    max_image_patches: the vision tower's per-image slot, in patches (``family.module``'s
      ``max_frame_patches``); default the batch's largest image, so that the tower's memory
      grows with the number of images and never with the square of the batch's patches (one
      slot over all of them held ~1.6 GB of scores for 8 rows of 4 images); 0: one slot.

  Returns:
    dict with ``tokens [B*G, N]`` int32 (new tokens only, ``pad_id`` after a stop),
    ``logprobs [B*G, N]`` float32 (0 after a stop) and ``lengths [B*G]`` (tokens up to and
    including the stop token).
  """
  if "input_ids" not in inputs:
    raise ValueError("inputs must hold input_ids (and attention_mask, pixel_values, image_grid_thw as needed)")
  input_ids = np.asarray(inputs["input_ids"], np.int32)
  attention_mask = np.asarray(inputs.get("attention_mask", np.ones_like(input_ids)), np.int32)
  if (attention_mask[:, -1] == 0).any():
    raise ValueError("generate expects left padding: the last position of every row must be a real token")
  grid = inputs.get("image_grid_thw")
  grid = None if grid is None else np.asarray(grid, np.int32).reshape(-1, 3)
  family = family_of(config)
  family.check_image_tokens(config, input_ids, grid)
  pad = config.pad_token_id if pad_id is None else pad_id
  if max_image_patches is None:  # the batch's largest image
    max_image_patches = 0 if grid is None else int(np.prod(grid, axis=-1).max(initial=0))
  model = family.module(config, dtype=dtype, param_dtype=dtype, max_frame_patches=int(max_image_patches))
  return _generate(model, params, input_ids, attention_mask, inputs.get("pixel_values"), grid,
                   jax.random.key(0) if rng is None else rng, max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   stop_token_ids=tuple(int(t) for t in stop_token_ids), pad_id=int(pad or 0),
                   group_size=int(group_size))
