"""The simplest host turn loop: decode a turn, run its tool on the host, re-prefill, repeat.

Each round prefills every row's whole conversation so far (prompt, earlier turns, observations,
every image re-encoded) with the sampler's ``prefill``, then decodes with ``decode_step`` until
every row closed a tool call, ended its turn or filled its sequence. The host then runs each call
exactly as the jitted rollout's callback does (``rollout._observation``: parse, tool, view,
observation tokens) and appends the observation to the row's tokens. No cache surgery, no
in-graph inserts, no shared system turn (the rollout's ``share_prefix``): positions and image
features come from one prefill of every row's plain sequence.

It is

* the reference the jitted rollout (``agent.rollout``) is tested against: same prompts, same
  weights, a greedy or scripted policy, and the two must give the same trajectories (tokens,
  action masks, statuses, calls, answers) and log-probs up to float error
  (tests/agent/test_turn_loop.py);
* the baseline ``experiments/bench_rollout.py`` times the jitted rollout against.

It reaches the model only through ``models.registry.family_of`` (via the sampler's pieces) and
samples like the rollout: banned tokens suppressed, ``sampler.sample_logits``, forced tokens
scored by ``rl.logprobs.logprobs_of``. Sampled (``temperature > 0``) rows draw other random
numbers than the rollout's, so only greedy and forced tokens are comparable.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagent_jax.agent import rollout as rollout_lib
from imagent_jax.agent import tools as tools_lib
from imagent_jax.agent import trajectory as trajectory_lib
from imagent_jax.agent.trajectory import Trajectory
from imagent_jax.processing import images as images_lib
from imagent_jax.rl.logprobs import logprobs_of
from imagent_jax.sampling import sampler


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _prefill(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, *, cache_len: int):
  """``sampler.prefill`` of left-padded rows ``[R, L]`` into a cache of ``cache_len`` slots."""
  return sampler.prefill(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, cache_len)


@functools.partial(jax.jit, static_argnames=("model", "budget", "temperature", "top_k", "top_p", "special"))
def _decode_turn(model, params, state: sampler.DecodeState, forced, num_sampled, limit, done, rng, *, budget: int,
                 temperature: float, top_k: int, top_p: float, special: tuple[int, ...]):
  """Decodes until every row closed a tool call, ended its turn, filled ``limit`` or spent ``budget``.

  Args:
    state: the prefilled rows (``R``).
    forced: ``[R, F]`` tokens to emit instead of sampling (-1 = sample), indexed by the row's
      sampled-token count (``num_sampled [R]`` before this turn); or None.
    limit: ``[R]`` tokens each row may still write before its sequence is full.
    done: ``[R]`` rows that take no part.
    special: ``(eos_id, call_end_id, pad_id, *banned)``.

  Returns:
    ``(tokens [R, budget], logprobs [R, budget], n [R], ended [R], called [R], full [R])``: each
    row's first ``n`` tokens are this turn's.
  """
  eos_id, call_end_id, pad_id = special[:3]
  banned = special[3:]
  r = done.shape[0]
  model = sampler.decode_model(model)  # the decode form the jitted rollout steps with

  def cond(c):
    return (c[0] < budget) & ~jnp.all(c[5])

  def body(c):
    i, state, out, logps, n, paused, ended, called, full, rng = c
    rng, sub = jax.random.split(rng)
    logits = sampler.suppress_tokens(state.logits, banned)
    tok, logp = sampler.sample_logits(logits, sub, temperature, top_k, top_p)
    if forced is not None:
      k = num_sampled + n
      f = jnp.take_along_axis(forced, jnp.minimum(k, forced.shape[1] - 1)[:, None], axis=1)[:, 0]
      tok = jnp.where((k < forced.shape[1]) & (f >= 0), f, tok)
      logp = logprobs_of(logits, tok, temperature)
    active = ~paused
    tok = jnp.where(active, tok, pad_id)
    out = out.at[:, i].set(tok)
    logps = logps.at[:, i].set(jnp.where(active, logp, 0.0))
    state = sampler.decode_step(model, params, state, tok, active)
    n = n + active.astype(jnp.int32)
    is_end = active & (tok == eos_id)
    is_full = active & ~is_end & (n >= limit)  # the rollout's length cut: a call on the last slot is cut too
    is_call = active & (tok == call_end_id) & ~is_full
    return (i + 1, state, out, logps, n, paused | is_end | is_call | is_full, ended | is_end, called | is_call,
            full | is_full, rng)

  no = jnp.zeros((r,), bool)
  init = (jnp.int32(0), state, jnp.full((r, budget), pad_id, jnp.int32), jnp.zeros((r, budget), jnp.float32),
          jnp.zeros((r,), jnp.int32), done, no, no, no, rng)
  _, _, out, logps, n, _, ended, called, full, _ = jax.lax.while_loop(cond, body, init)
  return out, logps, n, ended, called, full


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


class HostTurnLoop:
  """Runs G rollouts of every prompt turn by turn on the host, with a ``Rollout``'s settings.

  Args:
    ro: the ``agent.rollout.Rollout`` whose model, processor, ``RolloutConfig``, tools and special
      tokens to use (its limits: ``max_prompt_len``, ``max_new_tokens``, ``max_tool_calls``,
      ``obs_max_tokens``, ``view_max_patches``, sampling settings; ``insert_wait`` has no meaning here).
    turn_budget: static decode steps of one round (default ``max_new_tokens``: every turn fits in
      one round; a smaller budget continues a long turn in the next round, re-prefilled).
    token_bucket: sequences are left-padded to a multiple of this (fewer distinct shapes to compile).
    patch_bucket: pixel patches are zero-padded to a multiple of this.

  Attributes:
    rounds: prefill + decode rounds run so far.
    shapes: the distinct ``("prefill", (R, L, P, slots))`` and ``("decode", (R, cache_len))``
      shapes used so far (each one compile).
  """

  def __init__(self, ro: rollout_lib.Rollout, *, turn_budget: int | None = None, token_bucket: int = 64,
               patch_bucket: int = 256):
    self.ro = ro
    self.turn_budget = int(turn_budget or ro.cfg.max_new_tokens)
    self.token_bucket, self.patch_bucket = token_bucket, patch_bucket
    self.rounds = 0
    self.shapes: set[tuple[str, tuple[int, ...]]] = set()

  def _episode(self, images: Sequence[Sequence[Any]], rows: int) -> rollout_lib._Episode:
    """The host state ``rollout._observation`` works on, as ``Rollout.__call__`` builds it."""
    ro, cfg = self.ro, self.ro.cfg
    contexts = [tools_lib.ToolContext(images[i // cfg.group_size], ro.tool_config) for i in range(rows)]
    return rollout_lib._Episode(
        contexts=contexts, tokenizer=ro.processor.tokenizer, tool_config=ro.tool_config, cfg=cfg,
        seq_len=cfg.max_prompt_len + cfg.max_new_tokens, merge_size=ro.geometry.merge_size,
        image_pad_id=ro.family.image_token_id(ro.model.config),
        view_settings={**ro.processor.image_settings, "min_pixels": ro.tool_config.view_min_pixels,
                       "max_pixels": cfg.view_max_patches * ro.geometry.pixels_per_patch},
        patch_dim=ro.geometry.patch_dim, turns=[[] for _ in range(rows)], calls=[[] for _ in range(rows)],
        host_stopped=[False] * rows)

  def _pack(self, seqs, patches, grids, image_slots: int):
    """Left-padded ``ids, mask [R, L]``, ``pixel_values [P, D]`` and ``image_grid_thw [image_slots, 3]``."""
    length = _round_up(max(len(s) for s in seqs), self.token_bucket)
    ids = np.full((len(seqs), length), self.ro.pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
    flat_p = [p for row in patches for p in row]
    if not flat_p:
      return ids, mask, None, None
    budget = _round_up(sum(len(p) for p in flat_p), self.patch_bucket)
    pv, grid = images_lib.pack_patches(flat_p, [g for row in grids for g in row], patch_budget=budget,
                                       image_slots=image_slots, patch_dim=self.ro.geometry.patch_dim,
                                       what="the host turn loop's rows")
    return ids, mask, pv, grid

  def __call__(self, params, prompts: Sequence[Sequence[dict]], images: Sequence[Sequence[Any]], rng,
               forced_tokens=None) -> tuple[dict, list[Trajectory]]:
    """Runs G rollouts of every prompt; the same contract as ``Rollout.__call__``.

    Args:
      params: model parameters.
      prompts: ``B`` conversations (``protocol.build_prompt_messages``).
      images: ``B`` lists of input images.
      rng: PRNG key.
      forced_tokens: optional ``[B*G, F]`` tokens to emit instead of sampling (-1 = sample).

    Returns:
      ``(arrays, trajectories)`` laid out as the rollout's: ``tokens``, ``attention_mask``,
      ``action_mask``, ``logprobs`` ``[R, max_prompt_len + max_new_tokens]`` (prompt left-padded to
      ``max_prompt_len``), ``status [R]``, ``length [R]`` (numpy), and one ``Trajectory`` per row.
    """
    ro, cfg = self.ro, self.ro.cfg
    g = cfg.group_size
    inputs = ro.prepare(prompts, images)  # the rollout's prompt layout and budget checks
    r = len(prompts) * g
    seq_len = cfg.max_prompt_len + cfg.max_new_tokens
    # Each prompt's images: its slice of the packed patches and grids, in placeholder order.
    grid_all = inputs["image_grid_thw"]
    sizes = [int(x) for x in grid_all.prod(-1)]
    starts = np.cumsum([0] + sizes)
    prompt_images, k = [], 0
    for imgs in images:
      prompt_images.append([(inputs["pixel_values"][starts[k + j]:starts[k + j + 1]], grid_all[k + j])
                            for j in range(len(imgs))])
      k += len(imgs)
    patches = [[p for p, _ in prompt_images[i // g]] for i in range(r)]
    grids = [[gr for _, gr in prompt_images[i // g]] for i in range(r)]
    image_slots = sum(len(x) for x in grids) + r * cfg.max_tool_calls
    prompt_mask = inputs["attention_mask"].astype(bool)
    # Per row, the tokens after the prompt (turns and observations), whether the policy sampled
    # them, their log-probs, and where the current assistant turn starts in them.
    prompts_ids = [inputs["input_ids"][i // g][prompt_mask[i // g]].tolist() for i in range(r)]
    new = [[] for _ in range(r)]
    action = [[] for _ in range(r)]
    logps = [[] for _ in range(r)]
    turn_start = [0] * r
    status = np.full((r,), rollout_lib.RUNNING, np.int32)
    num_sampled = np.zeros((r,), np.int32)
    done = np.zeros((r,), bool)
    ep = self._episode(images, r)
    forced = None if forced_tokens is None else jnp.asarray(forced_tokens, jnp.int32)
    special = (int(ro.eos_id), int(ro.call_end_id), int(ro.pad_id)) + tuple(ro.banned_token_ids)
    # One cache length for every round (one decode program): the longest padded row plus a round.
    cache_len = _round_up(seq_len, self.token_bucket) + self.turn_budget
    while not done.all():
      self.rounds += 1
      ids, mask, pv, grid = self._pack([p + n for p, n in zip(prompts_ids, new)], patches, grids, image_slots)
      self.shapes.add(("prefill", (r, ids.shape[1], 0 if pv is None else len(pv), image_slots)))
      self.shapes.add(("decode", (r, cache_len)))
      state = _prefill(ro.model, params, ids, mask, pv, grid, cache_len=cache_len)
      rng, sub = jax.random.split(rng)
      limit = np.array([seq_len - cfg.max_prompt_len - len(n) for n in new], np.int32)
      out, lps, n, ended, called, full = (np.asarray(x) for x in _decode_turn(
          ro.model, params, state, forced, jnp.asarray(num_sampled), jnp.asarray(limit), jnp.asarray(done), sub,
          budget=self.turn_budget, temperature=float(cfg.temperature), top_k=int(cfg.top_k), top_p=float(cfg.top_p),
          special=special))
      for i in np.flatnonzero(~done):
        new[i] += out[i, :n[i]].tolist()
        action[i] += [True] * int(n[i])
        logps[i] += lps[i, :n[i]].tolist()
        num_sampled[i] += n[i]
        if ended[i]:
          done[i], status[i] = True, rollout_lib._ENDED  # answered or not: ``_records`` reads the turn
        elif full[i]:
          done[i], status[i] = True, trajectory_lib.STATUS_TRUNCATED
        elif called[i]:
          cursor = cfg.max_prompt_len + len(new[i])  # the rollout's cache slot after the call
          text = ro.processor.tokenizer.decode(new[i][turn_start[i]:])
          obs, view, view_grid, stop = rollout_lib._observation(ep, int(i), text, cursor)
          if obs is None:
            done[i], status[i] = True, stop
            continue
          new[i] += obs
          action[i] += [False] * len(obs)
          logps[i] += [0.0] * len(obs)
          turn_start[i] = len(new[i])
          if view is not None:
            patches[i] = patches[i] + [view]
            grids[i] = grids[i] + [np.asarray(view_grid, np.int32)]
    arrays = dict(tokens=np.full((r, seq_len), ro.pad_id, np.int32), attention_mask=np.zeros((r, seq_len), np.int32),
                  action_mask=np.zeros((r, seq_len), bool), logprobs=np.zeros((r, seq_len), np.float32),
                  status=status, length=np.zeros((r,), np.int32))
    for i in range(r):
      end = cfg.max_prompt_len + len(new[i])
      arrays["tokens"][i, :cfg.max_prompt_len] = np.where(prompt_mask[i // g], inputs["input_ids"][i // g], ro.pad_id)
      arrays["tokens"][i, cfg.max_prompt_len:end] = new[i]
      arrays["attention_mask"][i, :cfg.max_prompt_len] = prompt_mask[i // g]
      arrays["attention_mask"][i, cfg.max_prompt_len:end] = 1
      arrays["action_mask"][i, cfg.max_prompt_len:end] = action[i]
      arrays["logprobs"][i, cfg.max_prompt_len:end] = logps[i]
      arrays["length"][i] = end
    return arrays, ro._records(arrays, ep)  # pylint: disable=protected-access
