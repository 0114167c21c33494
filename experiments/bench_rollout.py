"""Throughput of the jitted sampler and of the jitted multi-turn rollout, on one set of weights.

Everything runs on JAX's default backend: the CPU, or a GPU where JAX sees one (transformers then
runs on the same GPU through torch's CUDA, and float32 matmuls use full precision on both sides:
no TF32, so greedy tokens can be compared).

Two comparisons, both on the same random Qwen2.5-VL weights (created once in JAX, written with
``hf_io.save_pretrained`` and read back by both our loader and transformers):

(a) Decode. ``sampler.generate`` (greedy, one jitted prefill + ``while_loop``) against
    transformers' ``generate(do_sample=False)`` in float32 on a left-padded, text-only batch with
    prompts of 32..64 tokens and no stop token, so every row decodes ``--new-tokens`` tokens. The
    greedy tokens of the two are compared.

(b) Multi-turn rollout with image tools. ``Rollout.__call__`` (the whole agent loop as one
    jitted program, tool calls through ``io_callback``, observations prefilled into the KV
    cache) against a host turn loop built from the same jitted pieces, the way host-driven
    stacks do it without cache surgery: a jitted prefill of the whole sequence so far (prompt,
    earlier turns and observations, every image re-encoded), a jitted ``while_loop`` that decodes
    until every row closed a tool call or ended, the tools on the host (``tools.run_tool_call``,
    restating what the jitted rollout's callback does), and again until every row answered.
    Both are driven by the same scripted policy (forced tokens: two tool calls, then an answer),
    so they produce the same trajectories; the script checks the token sequences and log-probs
    agree. The host loop pads sequence lengths and patch counts to buckets; the distinct shapes it
    compiled are reported.

Compile time is what JAX reports (``jax.monitoring``) for tracing, lowering and XLA compilation
during the first call; timed calls must compile nothing.

Usage::

  python experiments/bench_rollout.py                 # ~58M-parameter model, batch 8, 128 new tokens
  python experiments/bench_rollout.py --quick         # tiny model, a few tokens: a smoke test

Part (a) also prints a roofline: the bytes of weights a decode step reads, over the fastest rate
at which XLA or torch streams a matrix that size through a batch-B matmul on this machine, is
the least time a step can take in float32, and bounds the speedup any implementation can have.

The last two lines printed are ``decode_speedup_vs_transformers=<x>`` (our tokens/s over
transformers' tokens/s) and ``rollout_speedup_vs_host_loop=<y>`` (host loop wall over ours).
"""

from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch too
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import bench_models  # experiments/bench_models.py (the script's folder is on sys.path)

from imagent_jax.rl import masks as masks_lib
from imagent_jax.agent import protocol
from imagent_jax.agent import rollout as rl
from imagent_jax.agent import tools as tools_lib
from imagent_jax.data import synthetic
from imagent_jax.models import get_preset
from imagent_jax.models import hf_io
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.processing import Processor, build_tiny_tokenizer
from imagent_jax.processing import chat
from imagent_jax.processing import images as images_lib
from imagent_jax.sampling import sampler


# ------------------------------------------------------------------------------------ settings


def model_config(quick: bool):
  """The benchmark model: the ``tiny`` preset widened to ~58M parameters (``--quick``: as is).

  The tiny tokenizer has 512 ids (special tokens at 502..511); the full model pads the
  vocabulary to 4096 rows, as real checkpoints pad theirs.
  """
  if quick:
    return get_preset("tiny")
  return bench_models.widened_tiny(num_hidden_layers=8)


def rollout_settings(quick: bool, batch: int) -> dict[str, Any]:
  """Image budgets and rollout limits of part (b)."""
  if quick:
    return dict(pix=dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16), view_max_patches=64, obs_max_tokens=96,
                max_new_tokens=320, turn_budget=96, images_per_prompt=(2,), batch=min(batch, 2))
  return dict(pix=dict(min_pixels=56 * 56, max_pixels=28 * 28 * 32), view_max_patches=128, obs_max_tokens=112,
              max_new_tokens=384, turn_budget=96, images_per_prompt=(3, 2), batch=batch)


def _round_up(x: int, m: int) -> int:
  return -(-int(x) // m) * m


class CompileClock:
  """Seconds JAX spends tracing, lowering and compiling, from its ``jax.monitoring`` events.

  The first call of a workload also pays one-off costs that are not compilation (first touch of
  buffers, thread pools, load from other processes), so ``first call - steady call`` overstates
  compile time; these events count only the compiler's work.
  """

  EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
            "/jax/core/compile/backend_compile_duration": "compile"}

  def __init__(self):
    self.seconds = dict.fromkeys(self.EVENTS.values(), 0.0)
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **_):
    if event in self.EVENTS:
      self.seconds[self.EVENTS[event]] += duration

  def total(self) -> float:
    return sum(self.seconds.values())


CLOCK = CompileClock()


def torch_device() -> str:
  """Where transformers runs: ``cuda`` when JAX's default backend is a GPU (and torch sees one)."""
  import torch  # pylint: disable=import-outside-toplevel
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_sync() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  if torch_device() == "cuda":
    torch.cuda.synchronize()


def _timed_pair(fn_a: Callable[[], Any], fn_b: Callable[[], Any], repeats: int,
                warm_b: Callable[[], Any] | None = None) -> dict[str, Any]:
  """Times two workloads: a first (compiling) call of each, then ``repeats`` alternating calls.

  Alternating spreads any background load on the machine over both sides. Each ``fn`` must block
  until its result is on the host. ``warm_b`` (default ``fn_b``) is ``b``'s first call, e.g. a
  shorter one when ``b`` compiles nothing. Returns a dict with ``out_a``, ``first_a`` (wall of
  the first call), ``compile_a`` (JAX compile seconds during the first call), ``walls_a`` (the
  timed calls), and the same for ``b``. A timed call that compiled anything raises.
  """
  def once(fn):
    c0, t = CLOCK.total(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, CLOCK.total() - c0

  res = {}
  res["out_a"], res["first_a"], res["compile_a"] = once(fn_a)
  res["out_b"], res["first_b"], res["compile_b"] = once(warm_b or fn_b)
  res["walls_a"], res["walls_b"] = [], []
  for _ in range(repeats):
    for side, fn in (("a", fn_a), ("b", fn_b)):
      res[f"out_{side}"], wall, compiled = once(fn)
      if compiled > 0.5:
        raise RuntimeError(f"a timed call compiled for {compiled:.1f} s: shapes are not static")
      res[f"walls_{side}"].append(wall)
  return res


# ------------------------------------------------------------------------------------ weights


def make_checkpoint(config, folder: str):
  """Random weights, written as a Hugging Face folder; returns our params loaded back from it."""
  params = qvl.init_params(config, jax.random.key(0))
  # normal(0.02) everywhere gives near-uniform logits; widen the head a little so greedy decoding
  # is not decided by float noise between near-ties.
  params = jax.tree_util.tree_map(lambda x: x, params)  # a copy we may edit
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 5.0
  hf_io.save_pretrained(folder, config, params)
  _, loaded = hf_io.load_pretrained(folder)
  return loaded


def load_torch_model(folder: str):
  """transformers' Qwen2.5-VL from the same folder, float32, eval mode, SDPA attention."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  transformers.logging.set_verbosity_error()
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="sdpa").eval().to(torch_device())
  model.generation_config.eos_token_id = None
  return model


# ------------------------------------------------------------------------------------ (a) decode


def text_batch(config, batch: int, lo: int = 32, hi: int = 64, seed: int = 0):
  """Left-padded random text prompts of ``lo..hi`` tokens (ids below the special tokens)."""
  rng = np.random.RandomState(seed)
  lengths = rng.randint(lo, hi + 1, size=batch)
  width = int(lengths.max())
  ids = np.full((batch, width), config.pad_token_id, np.int32)
  mask = np.zeros((batch, width), np.int32)
  for r, n in enumerate(lengths):
    ids[r, width - n:] = rng.randint(0, config.vision_start_token_id - 3, size=n)
    mask[r, width - n:] = 1
  return ids, mask


def bench_decode(config, params, torch_model, batch: int, new_tokens: int, repeats: int) -> dict[str, Any]:
  """Part (a): our jitted greedy ``generate`` against transformers' ``generate``."""
  import torch  # pylint: disable=import-outside-toplevel

  ids, mask = text_batch(config, batch)
  inputs = dict(input_ids=ids, attention_mask=mask)

  def ours():
    return np.asarray(sampler.generate(config, params, inputs, max_new_tokens=new_tokens)["tokens"])

  dev = torch_device()

  def theirs(n=new_tokens):
    with torch.no_grad():
      out = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
                                 attention_mask=torch.tensor(mask, device=dev), max_new_tokens=n, do_sample=False,
                                 pad_token_id=config.pad_token_id, eos_token_id=None)
    return out[:, ids.shape[1]:].cpu().numpy()

  # transformers compiles nothing: its warm-up is a 2-token call.
  res = _timed_pair(ours, theirs, repeats, warm_b=lambda: theirs(2))
  ours_tokens, ours_walls, hf_tokens, hf_walls = res["out_a"], res["walls_a"], res["out_b"], res["walls_b"]
  n = batch * new_tokens
  agree = hf_tokens.shape == ours_tokens.shape and bool((hf_tokens == ours_tokens).all())
  same = int((hf_tokens == ours_tokens).sum()) if hf_tokens.shape == ours_tokens.shape else 0
  first_diff = None
  if not agree and hf_tokens.shape == ours_tokens.shape:
    cols = np.flatnonzero((hf_tokens != ours_tokens).any(0))
    first_diff = int(cols[0])
  ours_wall, hf_wall = statistics.median(ours_walls), statistics.median(hf_walls)
  return dict(prompt_lengths=mask.sum(1).tolist(), ours_wall=ours_wall, ours_walls=ours_walls,
              ours_compile=res["compile_a"], ours_first=res["first_a"], hf_wall=hf_wall, hf_walls=hf_walls,
              hf_compile=float("nan"), tokens=n, agree=agree, same=same,
              hf_shape=tuple(hf_tokens.shape), first_diff=first_diff)


def decode_weight_bytes(params) -> int:
  """Bytes of weights one decode step reads: every language-model weight, except the embedding
  table (a step gathers only B of its rows; with tied embeddings it is the head and counts)."""
  skip = {"visual"} | ({"embed_tokens"} if "lm_head" in params else set())
  return sum(int(x.nbytes) for key, sub in params.items() if key not in skip for x in jax.tree_util.tree_leaves(sub))


def weight_stream_rates(nbytes: int, batch: int, repeats: int = 5) -> dict[str, float]:
  """Bytes/s at which each framework streams a float32 weight matrix of ``nbytes`` through a
  ``[batch, in] @ [in, out]`` matmul, the access pattern of a weight-bound decode step (best of
  ``repeats``). The faster of the two is what this machine sustains: a decode step cannot take
  less than ``decode_weight_bytes / rate``."""
  import torch  # pylint: disable=import-outside-toplevel

  rows = 4096
  cols = max(nbytes // 4 // rows, 1)
  w = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
  x = np.ones((batch, rows), np.float32)
  wj, xj = jnp.asarray(w), jnp.asarray(x)
  mm = jax.jit(jnp.matmul)
  wt, xt = torch.from_numpy(w).to(torch_device()), torch.from_numpy(x).to(torch_device())

  def torch_mm():
    torch.mm(xt, wt)
    _torch_sync()

  rates = {}
  for name, fn in (("xla", lambda: mm(xj, wj).block_until_ready()), ("torch", torch_mm)):
    fn()
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      best = min(best, time.perf_counter() - t)
    rates[name] = w.nbytes / best
  return rates


# ----------------------------------------------------------------------------------- (b) rollout


def rollout_inputs(processor, batch: int, images_per_prompt, seed: int = 0):
  """``batch`` multi-image prompts (2-3 synthetic scenes each) with the tool system prompt."""
  rng = np.random.default_rng(seed)
  prompts, images = [], []
  for r in range(batch):
    n = images_per_prompt[r % len(images_per_prompt)]
    imgs = [synthetic.random_scene(rng, int(rng.integers(80, 260)), int(rng.integers(80, 260))) for _ in range(n)]
    names = [f"scene {k + 1}" for k in range(n)]
    prompts.append(protocol.build_prompt_messages("Which image has the most red shapes?", n, names,
                                                  tools=tools_lib.tool_schemas()))
    images.append(imgs)
  return prompts, images


def _call(name: str, **arguments) -> str:
  return protocol.render_tool_call(protocol.ToolCall(name, arguments))


def scripted_policy(processor, config, prompts, images) -> tuple[np.ndarray, list[list[int]]]:
  """Forced tokens ``[R, F]``: every row zooms, calls a second tool, then answers.

  The think text differs in length from row to row, so rows reach their tool calls at different
  decode steps, as sampled rows do. Returns the forced tokens and each row's turn lengths.
  """
  tok = processor.tokenizer
  rows, lengths = [], []
  for r, imgs in enumerate(images):
    grid = processor(prompts[r:r + 1], [imgs])["image_grid_thw"]
    k = 1 + r % len(imgs)
    h, w = int(grid[k - 1][1]) * 14, int(grid[k - 1][2]) * 14  # image k as the model was shown it
    box = [int(w * 0.1), int(h * 0.15), int(w * 0.6), int(h * 0.7)]
    filler = " let me look" * (r % 4)
    second = (_call("confirm", image=len(imgs) + 1, bbox_2d=[0, 0, 60, 60]) if r % 2 == 0
              else _call("reflect", image=1))
    turns = [f"<think>zoom on image {k}{filler}</think>" + _call("confirm", image=k, bbox_2d=box),
             f"<think>again{filler[:6 * (r % 3)]}</think>" + second,
             "<think>done</think><answer>" + "ABC"[r % 3] + "</answer>"]
    ids = [tok.encode(t) for t in turns]
    ids[-1] = ids[-1] + [config.eos_token_id]
    rows.append([i for t in ids for i in t])
    lengths.append([len(t) for t in ids])
  forced = np.full((len(rows), max(map(len, rows))), -1, np.int32)
  for r, ids in enumerate(rows):
    forced[r, :len(ids)] = ids
  return forced, lengths


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _host_prefill(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, *, cache_len):
  return sampler.prefill(model, params, input_ids, attention_mask, pixel_values, image_grid_thw, cache_len,
                         num_image_features=qvl.num_real_features(image_grid_thw, model.config))


@functools.partial(jax.jit, static_argnames=("model", "budget", "temperature", "special"))
def _host_decode_turn(model, params, state, forced, num_sampled, done, rng, *, budget, temperature, special):
  """Decodes until every row closed a tool call, ended its turn or spent ``budget`` tokens.

  Mirrors the body of ``rollout._rollout_program`` (banned tokens, forced tokens, log-probs of
  ``softmax(logits / temperature)``) without the in-graph observation insert.
  """
  eos_id, call_end_id, pad_id = special[:3]
  banned = special[3:]
  r = done.shape[0]

  def cond(c):
    i, _, _, _, _, paused, _, _, _ = c
    return (i < budget) & ~jnp.all(paused)

  def body(c):
    i, state, out, logps, n, paused, ended, called, rng = c
    rng, sub = jax.random.split(rng)
    logits = sampler.suppress_tokens(state.logits, banned)
    tok, _ = sampler.sample_logits(logits, sub, temperature)
    k = num_sampled + n
    f = jnp.take_along_axis(forced, jnp.minimum(k, forced.shape[1] - 1)[:, None], axis=1)[:, 0]
    tok = jnp.where((k < forced.shape[1]) & (f >= 0), f, tok)
    t = 1.0 if temperature == 0.0 else temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits / t, axis=-1), tok[:, None], axis=1)[:, 0]
    active = ~paused
    tok = jnp.where(active, tok, pad_id)
    out = out.at[:, i].set(tok)
    logps = logps.at[:, i].set(jnp.where(active, logp, 0.0))
    state = sampler.decode_step(model, params, state, tok, active)
    is_end, is_call = active & (tok == eos_id), active & (tok == call_end_id)
    return (i + 1, state, out, logps, n + active.astype(jnp.int32), paused | is_end | is_call, ended | is_end,
            called | is_call, rng)

  init = (jnp.int32(0), state, jnp.full((r, budget), pad_id, jnp.int32), jnp.zeros((r, budget), jnp.float32),
          jnp.zeros((r,), jnp.int32), done, jnp.zeros((r,), bool), jnp.zeros((r,), bool), rng)
  _, _, out, logps, n, _, ended, called, _ = jax.lax.while_loop(cond, body, init)
  return out, logps, n, ended, called


@functools.partial(jax.jit, static_argnames=("model", "temperature", "banned"))
def _teacher_forced_logprobs(model, params, ids, mask, pixel_values, image_grid_thw, *, temperature, banned):
  """``[R, L]``: ``log p(ids[:, t] | ids[:, <t])`` from one full forward pass (the training view)."""
  logits = model.apply({"params": params}, input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                       image_grid_thw=image_grid_thw)
  t = 1.0 if temperature == 0.0 else temperature
  logp = jax.nn.log_softmax(sampler.suppress_tokens(logits[:, :-1], banned) / t, axis=-1)
  picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.concatenate([jnp.zeros_like(picked[:, :1]), picked], axis=1)


class HostTurnLoop:
  """A host-driven agent loop from jitted pieces: re-prefill everything every turn.

  Args:
    ro: the ``Rollout`` whose model, processor, configs and special tokens to share.
    turn_budget: static decode budget of one turn.
    token_bucket: sequence lengths are left-padded up to a multiple of this.
    patch_bucket: pixel patches are zero-padded up to a multiple of this.
    image_slots: static number of ``image_grid_thw`` rows.
  """

  def __init__(self, ro: rl.Rollout, turn_budget: int, token_bucket: int, patch_bucket: int, image_slots: int):
    self.ro, self.turn_budget, self.token_bucket, self.patch_bucket = ro, turn_budget, token_bucket, patch_bucket
    self.image_slots = image_slots
    self.shapes: set[tuple[str, tuple[int, ...]]] = set()  # distinct (function, shape) compiled
    self.turns = 0

  def observation(self, ctx, calls: list, turn_text: str, cursor: int):
    """One row's tool call on the host: ``(ids, patches, grid, stop_status)`` (ids None to stop).

    The host work of the jitted rollout's callback (``rollout._observation``), restated with the
    public pieces: parse the turn, run the tool, preprocess the view, tokenize the observation.
    """
    ro, cfg = self.ro, self.ro.cfg
    tok, merge, pad = ro.processor.tokenizer, ro.model.config.vision.spatial_merge_size, ro.model.config.image_token_id
    turn = protocol.parse_turn(turn_text)
    if len(calls) >= cfg.max_tool_calls:
      calls.append("turn_limit")
      return None, None, None, masks_lib.STATUS_TURN_LIMIT
    result = tools_lib.run_tool_call(ctx, turn)
    patches, grid = None, None
    if result.image is not None:
      patches, grid = images_lib.preprocess_image(result.image, min_pixels=ro.tool_config.view_min_pixels,
                                                  max_pixels=cfg.view_max_patches * 14 * 14)
      grid = np.asarray(grid, np.int64)

    def encode(text):
      ids = tok.encode(protocol.observation_suffix(text, result.image is not None))
      if grid is not None:
        ids = chat.expand_image_placeholders(ids, grid[None], merge_size=merge, image_pad_id=pad)
      return ids

    ids = encode(result.text)
    if len(ids) > cfg.obs_max_tokens:
      ids = encode(result.text[:80])
    calls.append(result.error_kind or "ok")
    if len(ids) > cfg.obs_max_tokens or cursor + len(ids) + 1 > cfg.max_prompt_len + cfg.max_new_tokens:
      return None, None, None, masks_lib.STATUS_TRUNCATED
    return list(ids), patches, grid, None

  def __call__(self, params, prompts, images, rng, forced) -> dict[str, Any]:
    """Runs the batch turn by turn until every row answered (or stopped).

    Returns:
      dict with per-row ``seqs`` (token ids after the left padding), ``action`` and ``logprobs``
      (aligned with ``seqs``), ``status``, ``calls`` and ``batch``: the final sequences packed as
      a training batch ``(ids, mask, pixel_values, image_grid_thw)``.
    """
    ro, cfg, model = self.ro, self.ro.cfg, self.ro.model
    inputs = ro.processor(list(prompts), [list(x) for x in images])
    r = len(prompts)
    seqs = [list(ids[m.astype(bool)]) for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]
    prompt_len = [len(s) for s in seqs]
    action = [[False] * n for n in prompt_len]
    logprobs = [[0.0] * n for n in prompt_len]
    # Each row's images (patch arrays, grids) in placeholder order.
    grids = np.asarray(inputs["image_grid_thw"])
    sizes = grids.prod(-1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    row_pix, row_grid, g = [], [], 0
    for imgs in images:
      row_pix.append([inputs["pixel_values"][starts[g + k]:starts[g + k + 1]] for k in range(len(imgs))])
      row_grid.append([grids[g + k] for k in range(len(imgs))])
      g += len(imgs)
    contexts = [tools_lib.ToolContext(images[i], ro.tool_config) for i in range(r)]
    calls = [[] for _ in range(r)]
    done = np.zeros((r,), bool)
    status = np.full((r,), rl.RUNNING, np.int32)
    num_sampled = np.zeros((r,), np.int32)
    forced = jnp.asarray(forced, jnp.int32)
    special = (int(ro.eos_id), int(ro.call_end_id), int(ro.pad_id)) + ro.banned_token_ids
    while not done.all():
      self.turns += 1
      ids, mask, pv, grid = self.pack(seqs, row_pix, row_grid)
      length = ids.shape[1]
      cache_len = length + self.turn_budget
      self.shapes.add(("prefill", (length, len(pv), cache_len)))
      self.shapes.add(("decode", (cache_len,)))
      state = _host_prefill(model, params, ids, mask, pv, grid, cache_len=cache_len)
      rng, sub = jax.random.split(rng)
      out, lps, n, ended, called = (np.asarray(x) for x in _host_decode_turn(
          model, params, state, forced, jnp.asarray(num_sampled), jnp.asarray(done), sub, budget=self.turn_budget,
          temperature=float(cfg.temperature), special=special))
      for i in np.flatnonzero(~done):
        turn = out[i, :n[i]].tolist()
        seqs[i] += turn
        action[i] += [True] * len(turn)
        logprobs[i] += lps[i, :n[i]].tolist()
        num_sampled[i] += n[i]
        cursor = cfg.max_prompt_len + len(seqs[i]) - prompt_len[i]  # the jitted rollout's cache slot
        if ended[i]:
          done[i], status[i] = True, masks_lib.STATUS_ANSWERED
        elif called[i]:
          text = ro.processor.tokenizer.decode(turn)
          obs, patches, view_grid, stop = self.observation(contexts[i], calls[i], text, cursor)
          if obs is None:
            done[i], status[i] = True, stop
            continue
          seqs[i] += obs
          action[i] += [False] * len(obs)
          logprobs[i] += [0.0] * len(obs)
          if patches is not None:
            row_pix[i].append(patches)
            row_grid[i].append(np.asarray(view_grid, np.int32))
        else:
          done[i], status[i] = True, masks_lib.STATUS_TRUNCATED
    return dict(seqs=seqs, action=action, logprobs=logprobs, status=status, calls=calls,
                batch=self.pack(seqs, row_pix, row_grid))

  def pack(self, seqs, row_pix, row_grid):
    """Left-padded ``ids, mask [R, L]``, patches ``[P, D]`` and grids ``[image_slots, 3]``, bucketed."""
    r = len(seqs)
    length = _round_up(max(len(s) for s in seqs), self.token_bucket)
    ids = np.full((r, length), self.ro.pad_id, np.int32)
    mask = np.zeros((r, length), np.int32)
    for i, s in enumerate(seqs):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
    pv = np.concatenate([p for row in row_pix for p in row])
    pv = np.concatenate([pv, np.zeros((_round_up(len(pv), self.patch_bucket) - len(pv), pv.shape[1]), pv.dtype)])
    grid = np.zeros((self.image_slots, 3), np.int32)
    flat_grid = [x for row in row_grid for x in row]
    grid[:len(flat_grid)] = np.stack(flat_grid)
    return ids, mask, pv, grid


def bench_rollout(config, params, tok_dir: str, quick: bool, batch: int, repeats: int,
                  insert_wait: int = 0) -> dict[str, Any]:
  """Part (b): the jitted rollout against the host turn loop, same prompts, script and weights."""
  s = rollout_settings(quick, batch)
  pix = s["pix"]
  build_tiny_tokenizer(tok_dir, **pix)
  processor = Processor.from_pretrained(tok_dir)
  prompts, images = rollout_inputs(processor, s["batch"], s["images_per_prompt"])
  probe = processor(prompts, images)
  max_prompt_len = _round_up(probe["input_ids"].shape[1], 64)
  prompt_patches = _round_up(len(probe["pixel_values"]), 256)
  cfg = rl.RolloutConfig(group_size=1, max_prompt_len=max_prompt_len, prompt_patches=prompt_patches,
                         max_prompt_images=len(probe["image_grid_thw"]), max_new_tokens=s["max_new_tokens"],
                         max_tool_calls=3, obs_max_tokens=s["obs_max_tokens"], view_max_patches=s["view_max_patches"],
                         temperature=1.0, insert_wait=insert_wait)
  tool_config = tools_lib.ToolConfig(input_min_pixels=pix["min_pixels"], input_max_pixels=pix["max_pixels"],
                                     view_max_pixels=s["view_max_patches"] * 14 * 14)
  ro = rl.Rollout(qvl.Qwen25VL(config), processor, cfg, tool_config)
  forced, turn_lengths = scripted_policy(processor, config, prompts, images)
  # Decode steps at which some row closes a tool call: with insert_wait=0 each distinct step is
  # one in-graph observation insert (host callback + vision + a [R, obs_max_tokens] prefill).
  call_steps = {sum(t[:k + 1]) for t in turn_lengths for k in range(2)}

  def ours():
    return ro(params, prompts, images, jax.random.key(1), forced_tokens=forced)

  host = HostTurnLoop(ro, turn_budget=s["turn_budget"], token_bucket=64, patch_bucket=512,
                      image_slots=len(probe["image_grid_thw"]) + 3 * s["batch"])

  def theirs():
    return host(params, prompts, images, jax.random.key(1), forced)

  res = _timed_pair(ours, theirs, repeats)
  (out, trajs), ours_walls, hres, host_walls = res["out_a"], res["walls_a"], res["out_b"], res["walls_b"]
  host_turns = host.turns // (repeats + 1)

  # The two loops must have produced the same trajectories, with the log-probs of one forward pass
  # over the finished sequences (the training view).
  ids, mask, pv, grid = hres["batch"]
  ref = np.asarray(_teacher_forced_logprobs(ro.model, params, ids, mask, pv, grid, temperature=float(cfg.temperature),
                                            banned=ro.banned_token_ids))
  same_tokens, ours_gap, host_gap = True, [], []
  for i in range(s["batch"]):
    valid = out["attention_mask"][i].astype(bool)
    ours_seq = out["tokens"][i][valid].tolist()
    host_seq = [int(x) for x in hres["seqs"][i]]
    same_tokens &= ours_seq == host_seq
    act = np.asarray(hres["action"][i])
    ref_i = ref[i][mask[i].astype(bool)][act]
    host_gap.append(float(np.abs(np.asarray(hres["logprobs"][i])[act] - ref_i).max()))
    if ours_seq == host_seq:
      ours_gap.append(float(np.abs(out["logprobs"][i][valid][act] - ref_i).max()))
  answered = sum(t.status == masks_lib.STATUS_ANSWERED for t in trajs)
  image_calls = [t.num_successful_image_calls for t in trajs]
  action_tokens = int(out["action_mask"].sum())
  total_tokens = int(out["attention_mask"].sum() - probe["attention_mask"].sum())
  ours_wall, host_wall = statistics.median(ours_walls), statistics.median(host_walls)
  return dict(ours_wall=ours_wall, ours_walls=ours_walls, ours_compile=res["compile_a"], ours_first=res["first_a"],
              host_wall=host_wall, host_walls=host_walls, host_compile=res["compile_b"], host_first=res["first_b"],
              action_tokens=action_tokens, total_tokens=total_tokens, same_tokens=same_tokens, ours_gap=ours_gap,
              host_gap=host_gap, answered=answered, rows=s["batch"], image_calls=image_calls,
              insert_events=int(out["inserts"]), call_steps=len(call_steps), host_turns=host_turns, host_shapes=sorted(host.shapes), cfg=cfg,
              prompt_tokens=probe["attention_mask"].sum(1).tolist(), prompt_patches=len(probe["pixel_values"]))


# ------------------------------------------------------------------------------------------ main


def _print_decode(dec: dict[str, Any], new_tokens: int) -> None:
  print(f"(a) prompts: lengths {dec['prompt_lengths']}, {new_tokens} new tokens each")
  print(f"(a) greedy tokens agree with transformers: {dec['agree']} ({dec['same']}/{dec['tokens']} equal; "
        f"transformers shape {dec['hf_shape']}; first differing step {dec['first_diff']})")
  print(f"(a) timed walls ours {[round(x, 3) for x in dec['ours_walls']]}, "
        f"transformers {[round(x, 3) for x in dec['hf_walls']]}; ours first call {dec['ours_first']:.1f} s")


def _print_rollout(rol: dict[str, Any]) -> None:
  cfg = rol["cfg"]
  print(f"(b) {rol['rows']} rows, prompt tokens {rol['prompt_tokens']} (padded to {cfg.max_prompt_len}), "
        f"{rol['prompt_patches']} prompt patches; max_new_tokens {cfg.max_new_tokens}, obs_max_tokens "
        f"{cfg.obs_max_tokens}, view_max_patches {cfg.view_max_patches}")
  print(f"(b) answered {rol['answered']}/{rol['rows']}, successful image calls per row {rol['image_calls']}, "
        f"{rol['action_tokens']} policy tokens + observations = {rol['total_tokens']} tokens after the prompts")
  print(f"(b) same token sequences in both loops: {rol['same_tokens']}")
  if max(rol["ours_gap"], default=0.0) > 1e-3 >= max(rol["host_gap"], default=0.0):
    print("(b) WARNING: the jitted rollout's log-probs deviate from the teacher-forced forward pass (the host "
          "loop's do not): see experiments/README.md")
  print("(b) max |log-prob - teacher-forced forward| per row: ours "
        f"{[float(f'{x:.1e}') for x in rol['ours_gap']]}, host loop {[float(f'{x:.1e}') for x in rol['host_gap']]}")
  print(f"(b) ours: {rol['insert_events']} in-graph observation inserts (calls close on {rol['call_steps']} "
        f"distinct steps; insert_wait {cfg.insert_wait}); host loop: "
        f"{rol['host_turns']} turns, compiled shapes {rol['host_shapes']}")
  print(f"(b) timed walls ours {[round(x, 3) for x in rol['ours_walls']]}, "
        f"host loop {[round(x, 3) for x in rol['host_walls']]}; first calls ours {rol['ours_first']:.1f} s, "
        f"host loop {rol['host_first']:.1f} s")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--quick", action="store_true", help="tiny model and few tokens (a smoke test)")
  parser.add_argument("--only", choices=("decode", "rollout"), default=None, help="run one part only")
  parser.add_argument("--insert-wait", type=int, default=0,
                      help="(b): steps a row that closed a call may wait so one insert serves several calls")
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel

  # the CPUs this process may run on (``taskset`` narrows them; os.cpu_count() would not see it)
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  torch.set_num_threads(threads)
  if jax.default_backend() == "gpu":  # full float32 on both sides (JAX's GPU default for f32 dots is TF32)
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  new_tokens = 8 if args.quick else args.new_tokens
  repeats = 1 if args.quick else args.repeats
  config = model_config(args.quick)
  t_start = time.perf_counter()
  load_start = os.getloadavg()[0]
  dec = rol = None
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "ckpt")
    params = make_checkpoint(config, ckpt)
    n_params = qvl.count_params(params)
    vision = qvl.count_params(params["visual"])
    print(f"model: {n_params / 1e6:.1f}M parameters ({vision / 1e6:.2f}M vision); hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, heads {config.num_attention_heads}/{config.num_key_value_heads}, "
          f"intermediate {config.intermediate_size}, vocab {config.vocab_size}")
    print(f"devices: {jax.devices()}; torch on {torch_device()}, threads {torch.get_num_threads()}; cpu count "
          f"{threads}")
    if args.only in (None, "decode"):
      torch_model = load_torch_model(ckpt)
      dec = bench_decode(config, params, torch_model, args.batch, new_tokens, repeats)
      dec["weight_bytes"] = decode_weight_bytes(params)
      dec["stream_rates"] = weight_stream_rates(dec["weight_bytes"], args.batch)
      del torch_model
      _print_decode(dec, new_tokens)
    if args.only in (None, "rollout"):
      rol = bench_rollout(config, params, os.path.join(tmp, "tok"), args.quick, args.batch, repeats,
                          insert_wait=args.insert_wait)
      _print_rollout(rol)

  rows = []
  if dec is not None:
    rows += [(f"(a) ours: jitted generate, greedy, B={args.batch}", dec["ours_wall"], dec["tokens"] / dec["ours_wall"],
              dec["ours_compile"]),
             (f"(a) transformers generate, fp32, "
              f"{'cuda' if torch_device() == 'cuda' else f'{torch.get_num_threads()} threads'}", dec["hf_wall"],
              dec["tokens"] / dec["hf_wall"], dec["hf_compile"])]
  if rol is not None:
    rows += [(f"(b) ours: jitted rollout (one program, insert_wait {rol['cfg'].insert_wait})", rol["ours_wall"], rol["action_tokens"] / rol["ours_wall"],
              rol["ours_compile"]),
             ("(b) host turn loop (jitted prefill+decode)", rol["host_wall"], rol["action_tokens"] / rol["host_wall"],
              rol["host_compile"])]
  width = max(len(r[0]) for r in rows)
  print(f"\n{'setting':<{width}}  {'wall s':>8}  {'tokens/s':>9}  {'compile s':>9}")
  for name, wall, tps, comp in rows:
    comp_text = "n/a" if np.isnan(comp) else f"{comp:.2f}"
    print(f"{name:<{width}}  {wall:>8.3f}  {tps:>9.1f}  {comp_text:>9}")
  print("(tokens/s: (a) new tokens of all rows; (b) policy-sampled tokens of all rows; walls are medians of "
        f"{repeats} timed runs; compile = JAX trace + lower + XLA compile in the first call (transformers: nothing "
        f"to compile); total script time "
        f"{time.perf_counter() - t_start:.0f} s; 1-min load average {load_start:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end on {threads} CPUs)")
  if dec is not None and dec["weight_bytes"] < 64e6 and jax.default_backend() == "cpu":
    print(f"(a) roofline skipped: {dec['weight_bytes'] / 1e6:.1f} MB of weights fit in the CPU caches")
  elif dec is not None:
    roof = dec["weight_bytes"] / max(dec["stream_rates"].values())
    ours_step, hf_step = dec["ours_wall"] / new_tokens, dec["hf_wall"] / new_tokens
    print(f"(a) roofline: a decode step reads {dec['weight_bytes'] / 1e6:.0f} MB of weights; a B={args.batch} matmul "
          f"streams a matrix that size at {dec['stream_rates']['xla'] / 1e9:.1f} GB/s in XLA and "
          f"{dec['stream_rates']['torch'] / 1e9:.1f} GB/s in torch, so a step takes at least {roof * 1e3:.1f} ms. "
          f"Per step (wall / new tokens, prefill included): ours {ours_step * 1e3:.1f} ms ({roof / ours_step:.0%} of "
          f"that bound), transformers {hf_step * 1e3:.1f} ms ({roof / hf_step:.0%}); no fp32 decoder can beat "
          f"transformers by more than {hf_step / roof:.2f}x on this machine.")
    print(f"decode_speedup_vs_transformers={dec['hf_wall'] / dec['ours_wall']:.2f}")
  if rol is not None:
    print(f"rollout_speedup_vs_host_loop={rol['host_wall'] / rol['ours_wall']:.2f}")


if __name__ == "__main__":
  main()
