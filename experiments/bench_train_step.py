"""CPU throughput and model-FLOPs utilisation (MFU) of the jitted GRPO update step.

One ``grpo.train_step`` (the log-prob forward through ``token_logprobs``, the PPO-clip loss, the
backward pass, global-norm clipping and the AdamW update with its non-finite guard) jitted with
params and optimiser state donated, on a synthetic rollout batch with images: ``--rows`` rows of
``--seq`` tokens in groups of 4, each row holding two images (64 and 60 merged tokens, 496 patches)
and a response over its last half that carries the loss. The default model is the ``tiny`` preset
widened to about 52M parameters (``model_config``).

MFU = model FLOPs per step / (median step time × peak), with the peak measured *in the same
run*: the best rate of a jitted chain of ``--peak-n`` × ``--peak-n`` float32 ``jnp.dot``s, timed
before and after the step benchmark (the higher of the two is used, so load from other processes
during the peak measurement cannot inflate the MFU). ``mfu`` uses the median step time;
``mfu_best_step`` the fastest one (on a shared machine, the figure least exposed to other load).

Model FLOPs per step (fwd + bwd = 3 × fwd; a multiply-add is 2 FLOPs):

  decoder   R·S · (6·N_dec + 12·L·S·H·hd)
            N_dec: weights of every decoder matmul (q/k/v/o, gate/up/down, lm_head; the input
            embedding is a gather and is left out unless tied to the head); 12·L·S·H·hd: the
            QKᵀ and AV products of ``L`` layers over the full length ``S`` (the step computes
            full masked attention, causal halving is not taken).
  vision    6·N_blocks·P + 6·N_merger·P/4 + 12·Dv·Σ_blocks Σ_p K_p
            N_blocks: patch embedding and block matmul weights, applied to each of the ``P``
            real patches; N_merger: the merger's two matmuls, applied per merged token; K_p: the
            patches patch ``p`` attends to (its window in window blocks, its frame in full
            blocks), counted exactly from the grids.
  Biases, norms, rotary, softmax, the loss and the optimiser update are not counted. The model is
  built as the stages build it (``stages.build.build_model`` with the default config: the
  decoder's ``blocked`` attention, which skips the blocks above the causal diagonal, and one
  vision slot per image, whose window blocks attend in bands of three windows); the attention
  work done beyond the model FLOPs is printed as ``vision_attention_overhead``, not counted. With
  ``--plain`` it is the bare module instead (dense decoder attention, and every vision block one
  dense masked P×P product over all the batch's patches): what this script measured before.

Usage::

  python experiments/bench_train_step.py            # ~52M parameters, 8 × 512 tokens, 5 timed steps
  python experiments/bench_train_step.py --quick    # tiny model, seconds: a smoke run

The last line printed is ``mfu=<x>``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_models  # experiments/bench_models.py (the script's folder is on sys.path)

from imagent_jax.rl import masks as masks_lib
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.rl import advantages, grpo, optim
from imagent_jax.rl import logprobs
from imagent_jax.config import schema
from imagent_jax.stages import build

GROUP = 4
# --quick compiles with LLVM's cheap pipeline: the smoke run is about compile time, not speed.
FAST_COMPILE = dict(compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def model_config(quick: bool):
  """The benchmark model: ``tiny`` widened to ~52M parameters (``--quick``: ``tiny`` as is)."""
  if quick:
    return get_preset("tiny")
  return bench_models.widened_tiny(num_hidden_layers=7)


def synthetic_batch(config, rows: int, seq: int, grids, seed: int = 0) -> dict[str, np.ndarray]:
  """A GRPO batch: per row ``grids`` images after a text token, prompt text, then a response.

  The response (the last ``seq // 2`` tokens) is what the policy sampled; rewards alternate so
  every group has signal, advantages come from ``advantages.compute_advantages`` and the loss mask from
  ``masks.loss_mask``. ``old_logp`` is filled in by the caller.
  """
  rng = np.random.RandomState(seed)
  text_hi = min(config.vocab_size, config.bos_token_id) - 1
  merge = config.vision.merge_unit
  image_run = []
  for g in grids:
    image_run += [config.vision_start_token_id] + [config.image_token_id] * (int(np.prod(g)) // merge)
    image_run += [config.vision_end_token_id]
  prompt_len = seq - seq // 2
  if 1 + len(image_run) >= prompt_len:
    raise ValueError(f"the images need {len(image_run)} tokens; a prompt of {prompt_len} cannot hold them")
  tokens = rng.randint(0, text_hi, (rows, seq)).astype(np.int32)
  tokens[:, 1:1 + len(image_run)] = image_run
  attention = np.ones((rows, seq), np.int32)
  action = np.zeros((rows, seq), bool)
  action[:, prompt_len:] = True
  patches = [rng.randn(int(np.prod(g)), config.vision.patch_dim).astype(np.float32) for g in grids]
  pixel_values = np.concatenate(patches * rows)
  grid = np.array(list(grids) * rows, np.int32)
  rewards = np.tile(np.array([1.0, 0.0, 0.5, 0.0], np.float32), rows // GROUP + 1)[:rows]
  status = np.zeros(rows, np.int32)
  mcfg = masks_lib.MaskConfig(group_size=GROUP)
  loss_mask, _ = masks_lib.loss_mask(action, attention, status, np.zeros(rows, np.int32), rewards, mcfg)
  cfg = grpo.GRPOConfig(group_size=GROUP)
  return dict(tokens=tokens, attention_mask=attention, loss_mask=np.asarray(loss_mask),
              advantages=np.asarray(advantages.compute_advantages(cfg, rewards)), pixel_values=pixel_values,
              image_grid_thw=grid)


def _window_sizes(grid, cfg) -> list[int]:
  """Patches in each attention window of one image ``(t, h, w)`` (window blocks of the tower)."""
  t, h, w = (int(x) for x in grid)
  m, ws = cfg.spatial_merge_size, cfg.window_units
  uh, uw = h // m, w // m
  sizes = []
  for r0 in range(0, uh, ws):
    for c0 in range(0, uw, ws):
      sizes.append(min(ws, uh - r0) * min(ws, uw - c0) * m * m)
  return sizes * t


def model_flops(config, params, rows: int, seq: int, grids, frame_patches: int = 0) -> dict[str, float]:
  """Model FLOPs of one training step (fwd + bwd), by part; formula in the module docstring.
  ``frame_patches``: the module's ``max_frame_patches`` (one vision slot of that many patches per
  image, windows in bands), or 0 (one dense attention over all patches); it sets only the
  ``vision_attention_overhead`` figure, the attention work done beyond the model FLOPs."""
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.size(x)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}
  dec = sum(n for k, n in flat.items() if k.endswith("kernel") and (k.startswith("layers_") or k.startswith("lm_head")))
  if config.tie_word_embeddings:
    dec += flat["embed_tokens/embedding"]
  vis_blocks = sum(n for k, n in flat.items() if k.startswith("visual/") and k.endswith("kernel")
                   and "merger" not in k)
  vis_merger = sum(n for k, n in flat.items() if k.startswith("visual/merger") and k.endswith("kernel"))
  v = config.vision
  tokens = rows * seq
  out = {"decoder_dense": 6.0 * dec * tokens,
         "decoder_attention": 12.0 * config.num_hidden_layers * seq * config.num_attention_heads * config.head_dim
         * tokens}
  patches = rows * sum(int(np.prod(g)) for g in grids)
  window = rows * sum(s * s for g in grids for s in _window_sizes(g, v))  # sum over patches of their window size
  frame = rows * sum(int(np.prod(g[1:])) ** 2 * int(g[0]) for g in grids)
  n_full = len(v.fullatt_block_indexes)
  out["vision_dense"] = 6.0 * vis_blocks * patches + 6.0 * vis_merger * patches / v.merge_unit
  out["vision_attention"] = 12.0 * v.hidden_size * ((v.depth - n_full) * window + n_full * frame)
  out["total"] = sum(out.values())
  if frame_patches:  # per image slot: window blocks in bands of 3 windows, full blocks over the slot
    window_patches = (v.window_units * v.spatial_merge_size) ** 2
    images = rows * len(grids)
    executed = 12.0 * v.hidden_size * images * frame_patches * (
        (v.depth - n_full) * 3 * window_patches + n_full * frame_patches)
  else:
    executed = 12.0 * v.hidden_size * v.depth * patches * patches  # dense masked P x P in every block
  out["vision_attention_overhead"] = executed - out["vision_attention"]
  return out


def matmul_peak(n: int, chain: int = 8, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted chain of ``chain`` float32 ``[n, n] @ [n, n]`` products."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / np.sqrt(n)

  @jax.jit
  def run(x, w):
    return jax.lax.fori_loop(0, chain, lambda i, x: jnp.dot(x, w), x)

  jax.block_until_ready(run(a, w))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(a, w))
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 * chain / best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny model and batch: a seconds-long smoke run")
  parser.add_argument("--rows", type=int, default=None, help="rows per step (default 8; quick 4)")
  parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 512; quick 96)")
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; quick 2)")
  parser.add_argument("--peak-n", type=int, default=None, help="matmul side for the peak (default 2048; quick 512)")
  parser.add_argument("--plain", action="store_true",
                      help="the bare module (dense decoder attention, one dense vision attention over all patches) "
                           "instead of the model as the stages build it; what this script measured before session 18")
  args = parser.parse_args()
  q = args.quick
  rows = args.rows or (4 if q else 8)
  seq = args.seq or (96 if q else 512)
  steps = args.steps or (2 if q else 5)
  peak_n = args.peak_n or (512 if q else 2048)
  grids = [(1, 8, 8), (1, 4, 8)] if q else [(1, 16, 16), (1, 12, 20)]
  if rows % GROUP:
    raise SystemExit(f"--rows must be a multiple of the group size {GROUP}")

  print(f"jax {jax.__version__} backend={jax.default_backend()} devices={jax.device_count()}")
  peak_before = matmul_peak(peak_n)
  print(f"matmul_peak_before={peak_before / 1e9:.1f} GFLOP/s ({peak_n}x{peak_n} float32 jnp.dot)")

  config = model_config(q)
  if args.plain:  # the bare module: dense decoder attention, one dense attention over all patches
    model = qvl.Qwen25VL(config)
  else:  # as the stages build it: the default's decoder attention, one vision slot per image
    model = build.build_model(schema.get_config(), config)
  params = qvl.init_params(config, jax.random.key(0))
  vision = (f"one slot of {model.max_frame_patches} patches per image" if model.max_frame_patches
            else "one dense attention over all patches")
  print(f"model: {'bare module' if args.plain else 'as the stages build it'}; decoder attention={model.attention} "
        f"(blocks of {model.attention_block}); vision: {vision}")
  n_params = qvl.count_params(params)
  cfg = grpo.GRPOConfig(group_size=GROUP, learning_rate=1e-6, warmup_steps=10, total_steps=1000)
  batch = synthetic_batch(config, rows, seq, grids)
  jit_kwargs = FAST_COMPILE if q else {}
  forward = jax.jit(lambda p, b: logprobs.token_logprobs(model, p, b["tokens"], b["attention_mask"],
                                                         b["pixel_values"], b["image_grid_thw"]), **jit_kwargs)
  batch["old_logp"] = np.asarray(forward(params, batch))  # on-policy: the rollout sampled with these params
  batch = jax.device_put(batch)
  opt_state = optim.make_optimizer(cfg).init(params)
  step = grpo.jit_train_step(model, cfg, donate=True, jit_kwargs=jit_kwargs)
  flops = model_flops(config, params, rows, seq, grids, model.max_frame_patches)
  print(f"params={n_params / 1e6:.2f}M rows={rows} seq={seq} tokens/step={rows * seq} "
        f"loss_tokens/step={int(np.asarray(batch['loss_mask']).sum())} patches/step={len(batch['pixel_values'])}")
  print("model_flops/step: " + " ".join(f"{k}={v / 1e9:.1f}G" for k, v in flops.items()))

  t = time.perf_counter()
  params, opt_state, metrics = step(params, opt_state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t
  walls = []
  for _ in range(steps):
    t = time.perf_counter()
    params, opt_state, metrics = step(params, opt_state, batch)
    jax.block_until_ready((params, metrics))
    walls.append(time.perf_counter() - t)
  step_time = statistics.median(walls)
  print(f"compile+first_step={first:.1f}s step_times=[{', '.join(f'{w:.2f}' for w in walls)}]s "
        f"median={step_time:.3f}s (compile ~{first - step_time:.1f}s)")
  print(f"last_step: loss={float(metrics['loss']):.4f} grad_norm={float(metrics['grad_norm']):.3f} "
        f"ratio_mean={float(metrics['ratio_mean']):.4f} skipped={float(metrics['skipped']):.0f}")

  peak_after = matmul_peak(peak_n)
  peak = max(peak_before, peak_after)
  achieved = flops["total"] / step_time
  print(f"matmul_peak_after={peak_after / 1e9:.1f} GFLOP/s; peak used={peak / 1e9:.1f} GFLOP/s")
  print(f"tokens_per_s={rows * seq / step_time:.1f}")
  print(f"achieved={achieved / 1e9:.1f} GFLOP/s (model FLOPs, median step)")
  print(f"mfu_best_step={flops['total'] / min(walls) / peak:.4f} (fastest step; less exposed to other load)")
  print(f"mfu={achieved / peak:.4f}")


if __name__ == "__main__":
  main()
