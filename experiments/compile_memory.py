"""What each compiled GRPO train-step program keeps resident on the host (XLA:CPU), per batch shape.

The rl stage of the embedded default compiles its training programs once per (sequence bucket,
image bucket) pair its batches fall into (``rl.length_bucket``, ``rl.image_bucket``), and keeps
every one for the rest of the run. This script compiles ``grpo.train_step`` of the default's
``tiny`` model for those pairs (16 rows; 768 / 1024 / 1152 tokens; 2 / 3 / 4 images of 256
patches a row, i.e. 32 / 48 / 64 vision slots), keeps each executable as JAX's cache would, and
prints after each compile:

* ``resident_mb``: the growth of this process's anonymous resident memory (``RssAnon``, measured
  after ``malloc_trim``, so freed heap pages do not count) since the previous compile: what the
  executable itself costs while it is cached;
* ``temp_mb``: XLA's own plan of the temporaries one execution of it allocates
  (``compiled.memory_analysis()``), which come and go with each step.

At the end it drops every executable (``host_memory.release``) and prints what came back. The
sum of ``resident_mb`` over the pairs a run meets, plus the largest ``temp_mb``, is what the
buckets add to the rl stage's peak RSS.

Usage::

  python experiments/compile_memory.py              # 3 x 3 pairs, ~70 s of compiles
  python experiments/compile_memory.py --quick      # 1 x 2 pairs
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import bench_train_step  # experiments/bench_train_step.py (the script's folder is on sys.path)

from imagent_jax import host_memory
from imagent_jax.config import schema
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl
from imagent_jax.rl import grpo, optim
from imagent_jax.stages import build


def anon_mb() -> float:
  """``RssAnon`` of this process in MB after returning free heap pages (``host_memory.trim``)."""
  host_memory.trim()
  return host_memory.resident_bytes("RssAnon") / 1e6


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="two pairs instead of nine")
  parser.add_argument("--rows", type=int, default=16, help="rows per step (the default's 4 questions x 4)")
  args = parser.parse_args()
  seqs = (768,) if args.quick else (768, 1024, 1152)
  images = (2, 4) if args.quick else (2, 3, 4)
  config = get_preset("tiny")
  model = build.build_model(schema.get_config(), config)  # as the rl stage builds it: one vision slot per image
  params = qvl.init_params(config, jax.random.key(0))
  cfg = grpo.GRPOConfig(group_size=bench_train_step.GROUP)
  opt_state = optim.make_optimizer(cfg).init(params)
  step = grpo.jit_train_step(model, cfg)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)
  print(f"jax {jax.__version__} backend={jax.default_backend()} model=tiny rows={args.rows}")
  print(f"{'tokens':>6} {'slots':>5} {'compile_s':>9} {'temp_mb':>8} {'resident_mb':>11}")

  def compile_for(seq, n):
    batch = bench_train_step.synthetic_batch(config, args.rows, seq, [(1, 16, 16)] * n)
    batch["old_logp"] = np.zeros(batch["tokens"].shape, np.float32)
    return step.lower(abstract(params), abstract(opt_state), abstract(batch)).compile()

  compile_for(seqs[0], images[0])  # the compiler's own one-time state is not any executable's
  host_memory.release()
  kept, before = [], anon_mb()
  start = before
  for seq in seqs:
    for n in images:
      t = time.perf_counter()
      compiled = compile_for(seq, n)
      seconds = time.perf_counter() - t
      kept.append(compiled)
      now = anon_mb()
      temp = compiled.memory_analysis().temp_size_in_bytes / 1e6
      print(f"{seq:>6} {args.rows * n:>5} {seconds:>9.1f} {temp:>8.0f} {now - before:>11.0f}", flush=True)
      before = now
  total = before - start
  kept.clear()
  host_memory.release()
  back = before - anon_mb()
  print(f"executables_kept={len(images) * len(seqs)} resident_total_mb={total:.0f} "
        f"resident_per_executable_mb={total / (len(images) * len(seqs)):.0f}")
  print(f"returned_after_release_mb={back:.0f}")


if __name__ == "__main__":
  main()
