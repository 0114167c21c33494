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
    cache, the prompts' common system turn prefilled once: ``RolloutConfig.share_prefix``)
    against ``agent.turn_loop.HostTurnLoop``, the host turn loop built from the same jitted pieces
    the way host-driven stacks do it without cache surgery: a jitted prefill of the whole
    sequence so far (prompt, earlier turns and observations, every image re-encoded), a
    jitted ``while_loop`` that decodes until every row closed a tool call or ended, the tools on
    the host (the rollout's own host step), and again until every row answered. Both are driven
    by the same scripted policy (forced tokens: two tool calls, then an answer), so they produce
    the same trajectories; the script checks the token sequences agree and compares both loops'
    log-probs with one training forward pass (``rl.logprobs.sequence_logprobs``). The host loop
    pads sequence lengths and patch counts to buckets; the distinct shapes it compiled are
    reported.

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

from imagent_jax import compile_clock
from imagent_jax.agent import protocol
from imagent_jax.agent import rollout as rl
from imagent_jax.agent import tools as tools_lib
from imagent_jax.agent import trajectory
from imagent_jax.agent.turn_loop import HostTurnLoop
from imagent_jax.config import schema
from imagent_jax.data import synthetic
from imagent_jax.models import get_preset
from imagent_jax.models import hf_io
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.models.registry import family_of
from imagent_jax.processing import Processor, build_tiny_tokenizer
from imagent_jax.rl import logprobs
from imagent_jax.rl import masks as masks_lib
from imagent_jax.sampling import sampler
from imagent_jax.stages import build


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
    c0, t = compile_clock.seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, compile_clock.seconds() - c0

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
  params = family_of(config).init_params(config, jax.random.key(0))
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
    side = processor.image_settings["patch_size"]
    h, w = int(grid[k - 1][1]) * side, int(grid[k - 1][2]) * side  # image k as the model was shown it
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


def rollout_module(config, max_pixels: int, plain: bool = False):
  """The module both loops of part (b) run: as the stages build it (``stages.build.build_model``:
  the default config's decoder attention, one vision slot per image of at most ``max_pixels``),
  or with ``plain`` the bare ``family.module(config)`` (dense decoder attention, one dense vision
  attention over all the batch's patches)."""
  if plain:
    return family_of(config).module(config)
  run = schema.get_config()
  run.processor.max_pixels = max_pixels  # the bench's images: the vision slots' size
  return build.build_model(run, config)


def bench_rollout(config, params, tok_dir: str, quick: bool, batch: int, repeats: int,
                  insert_wait: int = 0, plain: bool = False, insert_rows: int = 0,
                  share_prefix: bool = True) -> dict[str, Any]:
  """Part (b): the jitted rollout against the host turn loop, same prompts, script and weights
  (the module of ``rollout_module``)."""
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
                         temperature=1.0, insert_wait=insert_wait, insert_rows=insert_rows,
                         share_prefix=share_prefix)
  family = family_of(config)
  pixels_per_patch = family.geometry(config).pixels_per_patch
  tool_config = tools_lib.ToolConfig(input_min_pixels=pix["min_pixels"], input_max_pixels=pix["max_pixels"],
                                     view_max_pixels=s["view_max_patches"] * pixels_per_patch)
  ro = rl.Rollout(rollout_module(config, pix["max_pixels"], plain), processor, cfg, tool_config)
  forced, turn_lengths = scripted_policy(processor, config, prompts, images)
  # Decode steps at which some row closes a tool call: with insert_wait=0 each distinct step is
  # one in-graph observation insert (host callback + vision + a [R, obs_max_tokens] prefill).
  call_steps = {sum(t[:k + 1]) for t in turn_lengths for k in range(2)}

  def ours():
    return ro(params, prompts, images, jax.random.key(1), forced_tokens=forced)

  host = HostTurnLoop(ro, turn_budget=s["turn_budget"], token_bucket=64, patch_bucket=512)

  def theirs():
    return host(params, prompts, images, jax.random.key(1), forced_tokens=forced)

  res = _timed_pair(ours, theirs, repeats)
  (out, trajs), ours_walls, (hout, _), host_walls = res["out_a"], res["walls_a"], res["out_b"], res["walls_b"]
  host_rounds = host.rounds // (repeats + 1)

  # The two loops must have produced the same trajectories; both are compared with the log-probs
  # of one forward pass over the finished sequences (the training view).
  per_row = [trajectory.trajectory_images(t, processor.image_settings, tool_config.view_max_pixels) for t in trajs]
  pv, grid, _ = trajectory.training_images(trajs, patch_budget=sum(len(p) for ps, _ in per_row for p in ps),
                                           image_slots=sum(len(g) for _, g in per_row),
                                           image_settings=processor.image_settings,
                                           view_max_pixels=tool_config.view_max_pixels)
  ref = np.asarray(logprobs.sequence_logprobs(ro.model, params, out["tokens"], out["attention_mask"], pv, grid,
                                              temperature=float(cfg.temperature)))
  same_tokens = all(np.array_equal(out[k], hout[k]) for k in ("tokens", "attention_mask", "action_mask"))
  ours_gap, host_gap = [], []
  for i in range(s["batch"]):
    act = out["action_mask"][i].astype(bool)
    ours_gap.append(float(np.abs(out["logprobs"][i][act] - ref[i][act]).max()))
    host_act = hout["action_mask"][i].astype(bool)
    if np.array_equal(act, host_act):
      host_gap.append(float(np.abs(hout["logprobs"][i][act] - ref[i][act]).max()))
  answered = sum(t.status == masks_lib.STATUS_ANSWERED for t in trajs)
  image_calls = [t.num_successful_image_calls for t in trajs]
  action_tokens = int(out["action_mask"].sum())
  total_tokens = int(out["attention_mask"].sum() - probe["attention_mask"].sum())
  ours_wall, host_wall = statistics.median(ours_walls), statistics.median(host_walls)
  return dict(ours_wall=ours_wall, ours_walls=ours_walls, ours_compile=res["compile_a"], ours_first=res["first_a"],
              host_wall=host_wall, host_walls=host_walls, host_compile=res["compile_b"], host_first=res["first_b"],
              action_tokens=action_tokens, total_tokens=total_tokens, same_tokens=same_tokens, ours_gap=ours_gap,
              host_gap=host_gap, answered=answered, rows=s["batch"], image_calls=image_calls,
              insert_events=int(out["inserts"]), call_steps=len(call_steps), host_rounds=host_rounds,
              host_shapes=sorted(host.shapes), cfg=cfg, prompt_tokens=probe["attention_mask"].sum(1).tolist(),
              prompt_patches=len(probe["pixel_values"]), shared_prefix=ro.shared_prefix(probe))  # K reads the rows, not their padding


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
        f"distinct steps; insert_wait {cfg.insert_wait}, insert_rows {cfg.insert_rows}; shared system turn "
        f"{rol['shared_prefix']} tokens, prefilled once); host loop: "
        f"{rol['host_rounds']} rounds, compiled shapes {rol['host_shapes']}")
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
  parser.add_argument("--plain", action="store_true",
                      help="(b): the bare module (dense decoder and vision attention) instead of the model as the "
                           "stages build it; what this script measured before session 18")
  parser.add_argument("--insert-wait", type=int, default=0,
                      help="(b): steps a row that closed a call may wait so one insert serves several calls")
  parser.add_argument("--insert-rows", type=int, default=schema.get_config().rollout.insert_rows,
                      help="(b): rows one observation insert computes (0: the whole batch); default: the "
                           "embedded default's rollout.insert_rows")
  parser.add_argument("--no-share-prefix", action="store_true",
                      default=not schema.get_config().rollout.share_prefix,
                      help="(b): prefill every prompt whole in our rollout (default: the embedded default's "
                           "rollout.share_prefix, the common system turn prefilled once)")
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
                          insert_wait=args.insert_wait, plain=args.plain, insert_rows=args.insert_rows,
                          share_prefix=not args.no_share_prefix)
      _print_rollout(rol)

  rows = []
  if dec is not None:
    rows += [(f"(a) ours: jitted generate, greedy, B={args.batch}", dec["ours_wall"], dec["tokens"] / dec["ours_wall"],
              dec["ours_compile"]),
             (f"(a) transformers generate, fp32, "
              f"{'cuda' if torch_device() == 'cuda' else f'{torch.get_num_threads()} threads'}", dec["hf_wall"],
              dec["tokens"] / dec["hf_wall"], dec["hf_compile"])]
  if rol is not None:
    rows += [(f"(b) ours: jitted rollout (one program, insert_wait {rol['cfg'].insert_wait}, insert_rows {rol['cfg'].insert_rows})", rol["ours_wall"], rol["action_tokens"] / rol["ours_wall"],
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
