"""The multi-turn agent rollout as one jitted program.

``lax.while_loop`` decodes one token for every row. When a row closes a tool call
(``</tool_call>``), ``io_callback`` runs the host side for the rows that need it: it decodes the
turn, parses the call, runs the tool on the original images and returns a fixed-shape
observation — token ids (the turn end, the tool response with the image placeholders expanded,
the next assistant header), patches, grid and a stop flag. In-graph, the vision tower encodes the
view and the observation is prefilled into the KV cache at each row's own slot, marked as
non-action tokens, with positions continued by the family's ``positions`` (M-RoPE for Qwen2.5-VL).

Every shape is static: prompts padded to ``max_prompt_len`` and ``prompt_patches``, each
observation to ``obs_max_tokens`` and ``view_max_patches``. One compiled program serves every
batch of the same config.

The host side keeps per-trajectory state (``ToolContext``: views and provenance) in a registry
keyed by an episode id passed through the jitted program, so the callback is one module-level
function and the rollout compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from imagent_jax.agent import protocol
from imagent_jax.agent import trajectory as trajectory_lib
from imagent_jax.agent import tools as tools_lib
from imagent_jax.agent.trajectory import Call, Trajectory
from imagent_jax.models.registry import family_of
from imagent_jax.processing import chat
from imagent_jax.processing import images as images_lib
from imagent_jax.rl.logprobs import logprobs_of
from imagent_jax.sampling import sampler

RUNNING = -1  # in-graph status of a row still going
_ENDED = 100  # in-graph: the row emitted end-of-turn; the host decides answered / no answer


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Static limits and sampling settings of a rollout (hashable: it keys the compiled program).

  Attributes:
    group_size: rollouts per prompt (G), sharing one prefill.
    max_prompt_len: prompts are left-padded to this many tokens.
    prompt_patches: pixel patches of all prompt images of a batch are padded to this budget.
    max_prompt_images: image slots of a batch (grids padded with zero rows).
    max_new_tokens: per trajectory, generated plus observation tokens.
    max_tool_calls: a tool call beyond this ends the trajectory (``STATUS_TURN_LIMIT``).
    obs_max_tokens: static size of one observation chunk (text + image tokens).
    view_max_patches: static patch slot of one returned view (its pixel budget over the pixels of a patch).
    temperature, top_k, top_p: sampling (see ``sampler.sample_logits``).
    insert_wait: decode steps a row that closed a tool call may wait for other rows' calls, so
      that one observation insert (a host call, the vision tower and a prefill for the whole
      batch) serves several calls. 0 inserts at once; the wait ends early when every row still
      going is waiting. Sampling is unchanged: a waiting row samples nothing.
    insert_rows: rows one observation insert computes. 0: all ``R`` rows of the batch, whether
      or not they closed a call (one vision pass over ``R`` view slots and one ``[R,
      obs_max_tokens]`` prefill). ``m > 0``: the rows that closed a call are gathered ``m`` at a
      time, with their cache rows, and each group is one insert (host call, vision pass over
      ``m`` view slots, ``[m, obs_max_tokens]`` prefill), one after another on the same decode
      step; rows that need nothing cost nothing, and a lone row left over is a one-row insert.
      Each row's insert reads and writes only its own cache row, so the trajectories are those
      of whole-batch inserts up to the float rounding of dots over fewer rows (sampling
      log-probs within 4e-6 in the embedded default).
  """

  group_size: int = 4
  max_prompt_len: int = 512
  prompt_patches: int = 2048
  max_prompt_images: int = 4
  max_new_tokens: int = 256
  max_tool_calls: int = 3
  obs_max_tokens: int = 128
  view_max_patches: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  insert_wait: int = 0
  insert_rows: int = 0
  share_prefix: bool = True

  def __post_init__(self):
    for name, low in (("group_size", 1), ("max_prompt_len", 1), ("prompt_patches", 0), ("max_prompt_images", 0),
                      ("max_new_tokens", 1), ("max_tool_calls", 0), ("top_k", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}"
                         + (" (0: no top-k filter)" if name == "top_k" else ""))
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1] (1: no nucleus filter), got {self.top_p}")
    if self.insert_wait < 0:
      raise ValueError(f"insert_wait must be >= 0, got {self.insert_wait}")
    if self.insert_rows < 0:
      raise ValueError(f"insert_rows must be >= 0 (0: every row in each insert), got {self.insert_rows}")
    if self.view_max_patches % 4:
      raise ValueError("view_max_patches must be a multiple of 4 (2x2 merge units)")
    if self.obs_max_tokens < self.view_max_patches // 4 + 16:
      raise ValueError(f"obs_max_tokens={self.obs_max_tokens} cannot hold a view of {self.view_max_patches // 4} "
                       "image tokens plus the tool response text; raise it")


@flax.struct.dataclass
class _Carry:
  dec: sampler.DecodeState
  tokens: jax.Array  # [R, S + K] int32 sequence buffer (slot = cache slot)
  action: jax.Array  # [R, S + K] bool: sampled by the policy
  logprobs: jax.Array  # [R, S + K] float32 sampling log-probs at action slots
  turn_start: jax.Array  # [R] slot where the current assistant turn starts
  num_sampled: jax.Array  # [R] tokens sampled so far (indexes forced tokens)
  done: jax.Array  # [R] bool
  pending: jax.Array  # [R] bool: closed a tool call, waiting for its observation
  waited: jax.Array  # [] int32: steps the oldest pending call has waited
  inserts: jax.Array  # [] int32: observation inserts so far (groups of ``insert_rows`` rows each)
  status: jax.Array  # [R] int32
  step: jax.Array  # [] int32
  rng: jax.Array


# ------------------------------------------------------------------------------------ host side


@dataclasses.dataclass
class _Episode:
  """Host state of one rollout call."""

  contexts: list  # [R] ToolContext
  tokenizer: Any
  tool_config: tools_lib.ToolConfig
  cfg: RolloutConfig
  seq_len: int
  merge_size: int
  image_pad_id: int
  view_settings: dict  # preprocess_image arguments of a returned view (the processor's geometry)
  patch_dim: int
  turns: list  # [R] list of assistant turn texts that ended in a tool call
  calls: list  # [R] list of Call
  host_stopped: list  # [R] bool: the host ended the row at a tool call (turn limit / no room)


_EPISODES: dict[int, _Episode] = {}
_EPISODE_IDS = itertools.count(1)
_LOCK = threading.Lock()


def _observation(ep: _Episode, row: int, turn_text: str, cursor: int):
  """Runs one row's tool call; returns ``(ids, patches, grid, stop_status)`` (ids None to stop)."""
  ctx = ep.contexts[row]
  turn = protocol.parse_turn(turn_text)
  ep.turns[row].append(turn_text)
  name = turn.tool_call.name if turn.tool_call is not None else None
  if len(ep.calls[row]) >= ep.cfg.max_tool_calls:
    ep.calls[row].append(Call(name, False, "turn_limit", None, False))
    ep.host_stopped[row] = True
    return None, None, None, trajectory_lib.STATUS_TURN_LIMIT
  result = tools_lib.run_tool_call(ctx, turn)
  patches, grid = None, None
  if result.image is not None:
    patches, grid = images_lib.preprocess_image(result.image, **ep.view_settings)
    grid = np.asarray(grid, np.int64)
  def encode(text: str) -> list[int]:
    ids = ep.tokenizer.encode(protocol.observation_suffix(text, result.image is not None))
    if grid is None:
      return ids
    return chat.expand_image_placeholders(ids, grid[None], merge_size=ep.merge_size, image_pad_id=ep.image_pad_id)

  ids = encode(result.text)
  if len(ids) > ep.cfg.obs_max_tokens:  # a text too long for the observation slot: shorten it, keep the image
    ids = encode(result.text[:80])
  fits = len(ids) <= ep.cfg.obs_max_tokens and cursor + len(ids) + 1 <= ep.seq_len
  ep.calls[row].append(Call(name, result.ok, result.error_kind, result.view_index,
                            fits and result.image is not None))
  if not fits:
    ep.host_stopped[row] = True
    return None, None, None, trajectory_lib.STATUS_TRUNCATED
  return list(ids), patches, grid, None


def _host_step(episode_id, rows, valid, tokens, turn_start, cursor):
  """io_callback target: observations for ``rows[j]`` where ``valid[j]``. Fixed-shape outputs.

  Args:
    episode_id: the ``_EPISODES`` key.
    rows: ``[m]`` int32 batch rows of this insert, ascending (padding entries are not ``valid``).
    valid: ``[m]`` bool.
    tokens, turn_start, cursor: ``[m, S + K]``, ``[m]``, ``[m]``: those rows' sequence buffers,
      the slot where their current assistant turn starts and their next free slot.

  Returns:
    ``obs [m, K]``, ``obs_len [m]``, ``pixels [m * P, patch_dim]`` (views packed in order,
    padding last), ``grid [m, 3]`` (zero rows for no view), ``stop [m]``, ``stop_status [m]``.
  """
  ep = _EPISODES[int(episode_id)]
  m = rows.shape[0]
  k, p = ep.cfg.obs_max_tokens, ep.cfg.view_max_patches
  obs = np.zeros((m, k), np.int32)
  obs_len = np.zeros((m,), np.int32)
  pixels = np.zeros((m * p, ep.patch_dim), np.float32)
  grid = np.zeros((m, 3), np.int32)
  stop = np.zeros((m,), bool)
  stop_status = np.full((m,), RUNNING, np.int32)
  filled = n_views = 0
  for j in np.flatnonzero(valid):
    text = ep.tokenizer.decode(tokens[j, turn_start[j]:cursor[j]].tolist())
    ids, patches, g, status = _observation(ep, int(rows[j]), text, int(cursor[j]))
    if ids is None:
      stop[j], stop_status[j] = True, status
      continue
    obs[j, :len(ids)] = ids
    obs_len[j] = len(ids)
    if patches is not None:
      # Views and their grids are packed in row order (the order their placeholders appear in
      # the batch, which is how the vision tower and mrope_positions read them); padding last.
      pixels[filled:filled + len(patches)] = patches
      filled += len(patches)
      grid[n_views] = g
      n_views += 1
  return obs, obs_len, pixels, grid, stop, stop_status


# ---------------------------------------------------------------------------------- device side


def _insert_observations(model, params, carry: _Carry, episode_id, need, cfg: RolloutConfig):
  """Host call for the rows in ``need [R]``, then prefill of their observations into the cache:
  all rows in one insert (``cfg.insert_rows == 0``, or at least ``R``), else the rows in ``need``
  in groups of ``cfg.insert_rows``, one insert each; a lone row left over is one single-row
  insert (a second compiled branch), so it costs one row's vision pass and prefill, not ``m``."""
  r, m = need.shape[0], cfg.insert_rows
  if m == 0 or m >= r:
    return _insert_rows(model, params, carry, episode_id, jnp.arange(r, dtype=jnp.int32), need, cfg)

  def group_of(size):
    def insert(state):
      c, left = state
      rows = jnp.nonzero(left, size=size, fill_value=r)[0].astype(jnp.int32)  # the first rows still waiting
      valid = rows < r
      c = _insert_rows(model, params, c, episode_id, rows, valid, cfg)
      return c, left & ~jnp.zeros((r,), bool).at[rows].set(valid, mode="drop")
    return insert

  one_group = group_of(1) if m == 1 else (
      lambda state: jax.lax.cond(jnp.sum(state[1]) == 1, group_of(1), group_of(m), state))
  carry, _ = jax.lax.while_loop(lambda state: jnp.any(state[1]), one_group, (carry, need))
  return carry


def _insert_rows(model, params, carry: _Carry, episode_id, rows, valid, cfg: RolloutConfig):
  """One insert: the host call for ``rows [m]`` where ``valid [m]``, the vision pass over their
  views and the prefill of their observations into their cache rows. With ``m == R`` (``rows ==
  arange(R)``) it works on the batch in place; with ``m < R`` it gathers those rows' decode
  state, and scatters it back (padding rows, ``rows == R``, are dropped)."""
  r = carry.tokens.shape[0]
  m, k, p = rows.shape[0], cfg.obs_max_tokens, cfg.view_max_patches
  whole = m == r  # rows is arange(R): no gather, no scatter
  safe = jnp.minimum(rows, r - 1)
  take = (lambda x: x) if whole else (lambda x: x[safe])
  dec = carry.dec if whole else sampler.take_rows(carry.dec, safe)
  tokens, turn_start = take(carry.tokens), take(carry.turn_start)
  family = family_of(model.config)
  patch_dim = family.geometry(model.config).patch_dim
  shapes = (jax.ShapeDtypeStruct((m, k), jnp.int32), jax.ShapeDtypeStruct((m,), jnp.int32),
            jax.ShapeDtypeStruct((m * p, patch_dim), jnp.float32), jax.ShapeDtypeStruct((m, 3), jnp.int32),
            jax.ShapeDtypeStruct((m,), bool), jax.ShapeDtypeStruct((m,), jnp.int32))
  obs, obs_len, pixels, grid, stop, stop_status = io_callback(
      _host_step, shapes, episode_id, rows, valid, tokens, turn_start, dec.index, ordered=True)
  obs_mask = jnp.arange(k)[None, :] < obs_len[:, None]
  features = model.apply({"params": params}, pixels, grid, p, method="encode_images")  # views: at most p patches each
  embeds = model.apply({"params": params}, obs, features, family.num_real_features(model.config, grid), method="embed")
  pos, _ = family.positions(model.config, obs, obs_mask, grid, offset=dec.next_pos)
  slots = jnp.arange(dec.key_mask.shape[1])[None, :]
  new_slots = (slots >= dec.index[:, None]) & (slots < (dec.index + obs_len)[:, None])
  key_mask = dec.key_mask | new_slots
  last, cache = model.apply({"params": params}, embeds, pos, key_mask, dec.cache, dec.index,
                            logits_at=jnp.maximum(obs_len - 1, 0), method="decode")  # [m, V]
  has = obs_len > 0
  next_pos = jnp.where(has, jnp.max(jnp.where(obs_mask[None], pos, -1), axis=(0, 2)) + 1, dec.next_pos)
  write = jax.vmap(lambda buf, new, i: jax.lax.dynamic_update_slice(buf, new, (i,)))
  tokens = jnp.where(has[:, None], write(tokens, obs, dec.index), tokens)
  index = dec.index + obs_len
  dec = dec.replace(cache=cache, key_mask=key_mask, index=index, next_pos=next_pos,
                    logits=jnp.where(has[:, None], last, dec.logits))
  turn_start = jnp.where(has, index, turn_start)
  stop_status = jnp.where(stop, stop_status, take(carry.status))
  if whole:
    put = lambda full, part: part
  else:
    dec = sampler.put_rows(carry.dec, rows, dec)
    put = lambda full, part: full.at[rows].set(part, mode="drop")
  return carry.replace(dec=dec, tokens=put(carry.tokens, tokens), turn_start=put(carry.turn_start, turn_start),
                       done=carry.done | put(jnp.zeros((r,), bool), stop), status=put(carry.status, stop_status),
                       pending=carry.pending & ~put(jnp.zeros((r,), bool), valid), waited=jnp.int32(0),
                       inserts=carry.inserts + 1)


@functools.partial(jax.jit, static_argnames=("model", "cfg", "special", "shared_prefix", "decode_backend"))
def _rollout_program(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, forced, rng, episode_id,
                     row_ids, *, cfg: RolloutConfig, special: tuple[int, int, int], shared_prefix: int = 0,
                     decode_backend: str | None = None):
  eos_id, call_end_id, pad_id = special[:3]
  banned = special[3:]
  b, l = input_ids.shape
  seq_len = l + cfg.max_new_tokens
  k = cfg.obs_max_tokens
  dec = sampler.prefill(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, seq_len + k,
                        shared_prefix=shared_prefix)  # the prompt patches' budget padding: counted out by prefill
  dec = sampler.repeat_rows(dec, cfg.group_size)
  model = sampler.decode_model(model, decode_backend)  # decode steps and inserts
  r = b * cfg.group_size
  tokens = jnp.full((r, seq_len + k), pad_id, jnp.int32).at[:, :l].set(jnp.repeat(input_ids, cfg.group_size, 0))
  carry = _Carry(dec=dec, tokens=tokens, action=jnp.zeros((r, seq_len + k), bool),
                 logprobs=jnp.zeros((r, seq_len + k), jnp.float32), turn_start=jnp.full((r,), l, jnp.int32),
                 num_sampled=jnp.zeros((r,), jnp.int32), done=jnp.zeros((r,), bool), pending=jnp.zeros((r,), bool),
                 waited=jnp.int32(0), inserts=jnp.int32(0), status=jnp.full((r,), RUNNING, jnp.int32), step=jnp.int32(0), rng=rng)
  # Every step writes one slot of each running row (or waits); waits add at most insert_wait
  # steps per call, the last one included.
  max_steps = cfg.max_new_tokens + (cfg.max_tool_calls + 1) * cfg.insert_wait

  def cond(c: _Carry):
    return ~jnp.all(c.done) & (c.step < max_steps)

  def body(c: _Carry):
    rng, sub = jax.random.split(c.rng)
    logits = sampler.suppress_tokens(c.dec.logits, banned)
    tok, logp = sampler.sample_logits(logits, sub, cfg.temperature, cfg.top_k, cfg.top_p, row_ids=row_ids)
    if forced is not None:
      f = jnp.take_along_axis(forced, jnp.minimum(c.num_sampled, forced.shape[1] - 1)[:, None], axis=1)[:, 0]
      f = jnp.where(c.num_sampled < forced.shape[1], f, -1)
      tok = jnp.where(f >= 0, f, tok)
      logp = logprobs_of(logits, tok, cfg.temperature)  # logits already suppressed
    active = ~c.done & ~c.pending
    here = (jnp.arange(c.tokens.shape[1])[None, :] == c.dec.index[:, None]) & active[:, None]
    tokens = jnp.where(here, tok[:, None], c.tokens)
    action = c.action | here
    logprobs = jnp.where(here, logp[:, None], c.logprobs)
    dec = sampler.decode_step(model, params, c.dec, tok, active)
    ended = active & (tok == eos_id)
    calls = active & (tok == call_end_id)
    full = active & ~ended & (dec.index >= seq_len)
    status = jnp.where(ended, _ENDED, jnp.where(full, trajectory_lib.STATUS_TRUNCATED, c.status))
    c = c.replace(dec=dec, tokens=tokens, action=action, logprobs=logprobs, num_sampled=c.num_sampled + active,
                  done=c.done | ended | full, status=status, step=c.step + 1, rng=rng)
    pending = c.pending | (calls & ~full)
    waited = jnp.where(jnp.any(c.pending), c.waited + 1, 0)  # 0 on the step the first call closes
    go = jnp.any(pending) & ((waited >= cfg.insert_wait) | jnp.all(c.done | pending))
    need = pending & go
    c = c.replace(pending=pending, waited=waited)
    return jax.lax.cond(go, lambda cc: _insert_observations(model, params, cc, episode_id, need, cfg),
                        lambda cc: cc, c)

  c = jax.lax.while_loop(cond, body, carry)
  status = jnp.where(c.status == RUNNING, trajectory_lib.STATUS_TRUNCATED, c.status)
  key_mask = c.dec.key_mask[:, :seq_len]
  return dict(tokens=jnp.where(key_mask, c.tokens[:, :seq_len], pad_id), attention_mask=key_mask.astype(jnp.int32),
              action_mask=c.action[:, :seq_len] & key_mask, logprobs=jnp.where(key_mask, c.logprobs[:, :seq_len], 0.0),
              status=status, length=c.dec.index, inserts=c.inserts)


# ------------------------------------------------------------------------------------ interface


class Rollout:
  """Host wrapper: examples in, trajectories and training arrays out.

  Args:
    model: the family's module (``family.module``: config and dtypes).
    processor: ``imagent_jax.processing.Processor`` (tokenizer and image settings of the prompts).
    cfg: ``RolloutConfig``.
    tool_config: ``tools.ToolConfig``; its view budget must fit ``cfg.view_max_patches``.
  """

  def __init__(self, model, processor, cfg: RolloutConfig, tool_config: tools_lib.ToolConfig):
    c = model.config
    self.family = family_of(c)
    self.geometry = self.family.geometry(c)
    settings = processor.image_settings
    if (settings["patch_size"], settings["merge_size"]) != (self.geometry.patch_size, self.geometry.merge_size):
      raise ValueError(f"the processor cuts {settings['patch_size']}-pixel patches merged {settings['merge_size']}x"
                       f"{settings['merge_size']}, the model {self.geometry.patch_size}-pixel patches merged "
                       f"{self.geometry.merge_size}x{self.geometry.merge_size}: use the checkpoint's own processor")
    view_slot = cfg.view_max_patches * self.geometry.pixels_per_patch
    if tool_config.view_max_pixels > view_slot:
      raise ValueError(f"tool_config.view_max_pixels={tool_config.view_max_pixels} exceeds the view slot of "
                       f"{cfg.view_max_patches} patches ({view_slot} pixels)")
    self.model, self.processor, self.cfg, self.tool_config = model, processor, cfg, tool_config
    tok = processor.tokenizer
    self.eos_id = c.eos_token_id
    self.call_end_id = tok.token_to_id(chat.TOOL_CALL_END)
    if self.call_end_id is None:
      raise ValueError(f"the tokenizer has no single token for {chat.TOOL_CALL_END}")
    self.pad_id = c.pad_token_id if c.pad_token_id is not None else tok.pad_id
    self.banned_token_ids = self.family.banned_token_ids(c)
    self.turn_end_id = tok.token_to_id(chat.IM_END)
    self.last_host_s = 0.0  # the last call's host work outside the program (prompt preprocessing, records)

  def prepare(self, prompts: Sequence[Sequence[dict]], images: Sequence[Sequence[Any]]) -> dict:
    """Processor outputs padded to the config's static prompt budgets."""
    cfg = self.cfg
    inputs = self.processor(list(prompts), [list(x) for x in images])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, l = ids.shape
    if l > cfg.max_prompt_len:
      raise ValueError(f"a prompt has {l} tokens; max_prompt_len is {cfg.max_prompt_len}")
    pad = cfg.max_prompt_len - l
    ids = np.concatenate([np.full((b, pad), self.pad_id, ids.dtype), ids], axis=1)
    mask = np.concatenate([np.zeros((b, pad), mask.dtype), mask], axis=1)
    pv, grid = images_lib.pack_patches([inputs["pixel_values"]] if "pixel_values" in inputs else [],
                                       [inputs["image_grid_thw"]] if "image_grid_thw" in inputs else [],
                                       patch_budget=cfg.prompt_patches, image_slots=cfg.max_prompt_images,
                                       patch_dim=self.geometry.patch_dim, what="the prompts' images")
    return dict(input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32), pixel_values=pv,
                image_grid_thw=grid)

  def __call__(self, params, prompts, images, rng, forced_tokens=None, row_ids=None,
               inputs=None) -> tuple[dict, list[Trajectory]]:
    """Runs G rollouts of every prompt.

    Args:
      params: model parameters.
      prompts: ``B`` conversations (message lists, e.g. ``protocol.build_prompt_messages``).
      images: ``B`` lists of input images (PIL or uint8 arrays).
      rng: PRNG key.
      forced_tokens: optional ``[B*G, F]`` int tokens to emit instead of sampling (-1 = sample);
        entry ``i`` replaces the row's ``i``-th sampled token. A scripted policy for tests.
      row_ids: optional ``[B*G]`` int, each row's index in the global batch (default
        ``arange(B*G)``): row ``r`` samples with ``fold_in(step key, row_ids[r])``
        (``sampler.sample_logits``), so a process rolling out its share of a batch samples what a
        single process with the whole batch would (multi-host training).
      inputs: ``prepare(prompts, images)``, when the caller made it already (the trainer
        prepares the next batch while the device trains).

    Returns:
      ``(arrays, trajectories)``: arrays with ``tokens``, ``attention_mask``, ``action_mask``,
      ``logprobs`` ``[R, S]``, ``status [R]``, ``length [R]`` and ``inserts []`` (observation
      inserts: each one host call, one vision pass and one prefill, of the batch or of
      ``insert_rows`` rows) (numpy); one
      ``Trajectory`` per row.
    """
    cfg = self.cfg
    t0 = time.perf_counter()
    inputs = self.prepare(prompts, images) if inputs is None else inputs
    host = time.perf_counter() - t0
    r = len(prompts) * cfg.group_size
    contexts = [tools_lib.ToolContext(images[i // cfg.group_size], self.tool_config) for i in range(r)]
    ep = _Episode(contexts=contexts, tokenizer=self.processor.tokenizer, tool_config=self.tool_config, cfg=cfg,
                  seq_len=cfg.max_prompt_len + cfg.max_new_tokens, merge_size=self.geometry.merge_size,
                  image_pad_id=self.family.image_token_id(self.model.config),
                  view_settings={**self.processor.image_settings, "min_pixels": self.tool_config.view_min_pixels,
                                 "max_pixels": cfg.view_max_patches * self.geometry.pixels_per_patch},
                  patch_dim=self.geometry.patch_dim, turns=[[] for _ in range(r)],
                  calls=[[] for _ in range(r)], host_stopped=[False] * r)
    with _LOCK:
      episode_id = next(_EPISODE_IDS)
      _EPISODES[episode_id] = ep
    try:
      forced = None if forced_tokens is None else np.asarray(forced_tokens, np.int32)
      row_ids = np.arange(r, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32).reshape(r)
      shared = self.shared_prefix(inputs)
      out = _rollout_program(self.model, params, inputs["input_ids"], inputs["attention_mask"],
                             inputs["pixel_values"], inputs["image_grid_thw"], forced, rng, np.int32(episode_id), row_ids,
                             cfg=cfg, special=(int(self.eos_id), int(self.call_end_id), int(self.pad_id))
                             + self.banned_token_ids, shared_prefix=shared)
      out = {k: np.asarray(v) for k, v in out.items()}
    finally:
      with _LOCK:
        _EPISODES.pop(episode_id, None)
    t0 = time.perf_counter()
    trajs = self._records(out, ep)
    self.last_host_s = host + time.perf_counter() - t0  # prompt preprocessing + decoding the records
    return out, trajs

  def shared_prefix(self, inputs: dict) -> int:
    """Tokens of the system turn every prompt of ``inputs`` (``prepare``'s, or any left-padded
    processor output of the batch: the padding does not matter) opens with, prefilled once for
    the batch (``cfg.share_prefix``); 0 when they do not share one (or it is off)."""
    if not self.cfg.share_prefix or self.turn_end_id is None:
      return 0
    return sampler.shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], self.turn_end_id,
                                        self.banned_token_ids)

  def _records(self, out: dict, ep: _Episode) -> list[Trajectory]:
    tok = self.processor.tokenizer
    trajs = []
    for row in range(out["tokens"].shape[0]):
      valid = out["attention_mask"][row].astype(bool)
      valid[:self.cfg.max_prompt_len] = False
      response = tok.decode(out["tokens"][row][valid].tolist())
      final = response.split(f"{chat.IM_START}assistant\n")[-1]
      turn = protocol.parse_turn(final)
      status = int(out["status"][row])
      if status == _ENDED:
        status = trajectory_lib.STATUS_ANSWERED if turn.answer is not None else trajectory_lib.STATUS_NO_ANSWER
      turns = list(ep.turns[row]) + ([] if ep.host_stopped[row] else [final])
      trajs.append(Trajectory(prompt_index=row // self.cfg.group_size, status=status, response=response,
                              turns=turns, answer=turn.answer, calls=ep.calls[row], context=ep.contexts[row]))
    out["status"] = np.array([t.status for t in trajs], np.int32)
    return trajs
