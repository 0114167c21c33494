"""The share of an RL step the device waits on the host, without and with prefetching (issue 17).

Runs the rl stage's trainer on the embedded default (tiny model, random init unless the workdir
holds a warmup base, synthetic data drawn on the fly) twice in one process — ``rl.prefetch``
off, then on — and prints each step's ``time/host_wait_fraction`` and wall, and the means over
the steps after the first (compiles). ``host_wait_fraction`` = (waiting for the data + the
rollout's prompt preprocessing and records + rewards, masks and training images) / step time.

    python experiments/host_wait.py --steps 6
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from imagent_jax.config import schema
from imagent_jax.stages import rl as rl_stage


def measure(prefetch: bool, steps: int, workdir: str) -> list[dict]:
  """``steps`` RL steps of the default with ``rl.prefetch=prefetch``; each step's metrics."""
  config = schema.get_config()
  with config.unlocked():
    config.data.source = "synthetic"
    config.rl.steps, config.rl.eval_every, config.rl.checkpoint_every = steps, 0, 0
    config.rl.progress_bar, config.rl.prefetch = False, prefetch
  trainer = rl_stage.build_trainer(config, workdir, eval_examples=[])
  return [trainer.train_step() for _ in range(steps)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args()
  rows = []
  for prefetch in (False, True):
    with tempfile.TemporaryDirectory() as tmp:
      out = measure(prefetch, args.steps, tmp)
    for i, m in enumerate(out):
      print(f"prefetch={prefetch!s:5} step {i + 1}: host_wait_fraction {m['time/host_wait_fraction']:.3f}  "
            f"step {m['time/step_s']:.2f}s  (data wait {m.get('time/data_wait_s', 0):.2f}s)")
    later = out[1:]
    rows.append((prefetch, statistics.mean(m["time/host_wait_fraction"] for m in later),
                 statistics.mean(m["time/step_s"] for m in later)))
  print("\nprefetch | host_wait_fraction | step s   (mean of steps 2..)")
  for prefetch, frac, step in rows:
    print(f"{prefetch!s:8} | {frac:.3f}              | {step:.2f}")
  print(f"host_wait_fraction_ratio={rows[1][1] / rows[0][1]:.3f}")


if __name__ == "__main__":
  main()
