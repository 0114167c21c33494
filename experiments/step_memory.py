"""Peak host memory of the embedded default's RL steps, phase by phase, for two settings in one run.

Each setting runs the rl stage's trainer (``stages.rl.build_trainer`` on ``schema.get_config()``:
tiny model, synthetic data, CPU) for ``--steps`` steps in its own fresh process, so every setting
starts from the same empty heap. Around each phase of a step (``rollout``: the jitted rollout;
``batch``: rewards, masks, advantages and the training images; ``update``: the GRPO update, with
its split into minibatches) the peak RSS is reset (``/proc/self/clear_refs``) and read back
(``VmHWM``), so the table shows what each phase adds on top of what the process held when it
began. The default compares the default (``rl.grad_accum=2``) with one pass over the batch
(``rl.grad_accum=1``) and prints the ratio of the peaks. Both trim the heap after each compile, as
``python -m imagent_jax.main`` does (``host_memory.trim_after_compiles``); ``--untrimmed-baseline``
runs the baseline without that.

    python experiments/step_memory.py --base runs/default/base          # 16 steps each, ~4 min on 2 cores
    python experiments/step_memory.py --base runs/default/base --baseline rl.logprob_chunk=256 --candidate ''
    python experiments/step_memory.py --base runs/default/base --baseline '' --untrimmed-baseline --candidate ''

Without ``--base`` the rl stage starts from a random tiny model (shorter rollouts than a trained
base's). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def _rss_mb(field: str = "VmRSS") -> float:
  from imagent_jax import host_memory
  return host_memory.resident_bytes(field) / 1e6


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS


def measure(steps: int, base: str, overrides: list[str], trim_after_compiles: bool = True) -> list[dict]:
  """Runs ``steps`` RL steps in this process; returns per step ``{phase: (start_mb, peak_mb)}``,
  plus ``step`` (start and peak of the whole step) and ``compile_s``."""
  import jax

  from imagent_jax import host_memory

  import profile_default  # experiments/profile_default.py (the script's folder is on sys.path)
  from imagent_jax.rl import batch as batch_lib
  from imagent_jax.rl import grpo
  from imagent_jax.stages import rl as rl_stage

  config = profile_default.profile_config(base, overrides)
  host_memory.trim_after_compiles(trim_after_compiles)
  trainer = rl_stage.build_trainer(config, tempfile.mkdtemp(prefix="step_memory_"))
  phases: dict[str, tuple[float, float]] = {}

  def watch(owner, attr, name):
    fn = getattr(owner, attr)

    def watched(*args, **kwargs):
      _reset_peak()
      start = _rss_mb()
      out = jax.block_until_ready(fn(*args, **kwargs))
      phases[name] = (start, _rss_mb("VmHWM"))
      return out

    setattr(owner, attr, watched)

  watch(type(trainer.rollout), "__call__", "rollout")
  watch(batch_lib, "prepare_batch", "batch")
  watch(grpo, "update", "update")
  rows = []
  for _ in range(steps):
    _reset_peak()
    start = _rss_mb()
    metrics = trainer.train_step()
    rows.append({**phases, "step": (start, _rss_mb("VmHWM")), "compile_s": metrics["time/compile_s"],
                 "tokens": metrics["sequence_tokens"]})
  return rows


def _run_setting(steps: int, base: str, overrides: list[str], trim_after_compiles: bool = True) -> list[dict]:
  """``measure`` in a fresh subprocess (its own heap and peak)."""
  spec = {"steps": steps, "base": base, "overrides": overrides, "trim_after_compiles": trim_after_compiles}
  cmd = [sys.executable, __file__, "--_child", json.dumps(spec)]
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    sys.stderr.write(out.stderr[-5000:])
    raise SystemExit(f"the run with {overrides} failed (exit {out.returncode})")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _report(name: str, rows: list[dict]) -> float:
  print(f"\n{name}")
  print(f"{'step':>4} {'tokens':>6} {'compile_s':>9} {'start_mb':>8} {'rollout+':>8} {'batch+':>7} {'update+':>7} "
        f"{'peak_mb':>7}")
  for i, r in enumerate(rows, 1):
    added = lambda phase: r[phase][1] - r[phase][0]
    print(f"{i:>4} {r['tokens']:>6.0f} {r['compile_s']:>9.1f} {r['step'][0]:>8.0f} {added('rollout'):>8.0f} "
          f"{added('batch'):>7.0f} {added('update'):>7.0f} {r['step'][1]:>7.0f}")
  peak = max(r["step"][1] for r in rows)
  update = sorted(r["update"][1] - r["update"][0] for r in rows)[len(rows) // 2]
  print(f"peak_rss_mb={peak:.0f} median_update_added_mb={update:.0f} "
        f"compiles={sum(r['compile_s'] > 1 for r in rows)} compile_s={sum(r['compile_s'] for r in rows):.1f}")
  return peak


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--base", default="", help="a trained base (e.g. runs/default/base)")
  p.add_argument("--baseline", default="rl.grad_accum=1", help="comma list of config overrides (key=value)")
  p.add_argument("--candidate", default="", help="comma list of config overrides; empty: the default")
  p.add_argument("--untrimmed-baseline", action="store_true",
                 help="run the baseline without host_memory.trim_after_compiles (the code before session 19)")
  p.add_argument("--_child", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._child:
    spec = json.loads(args._child)
    print(json.dumps(measure(spec["steps"], spec["base"], spec["overrides"], spec["trim_after_compiles"])))
    return 0
  split = lambda text: [s for s in text.split(",") if s]
  untrimmed = " (no trim after compiles)" if args.untrimmed_baseline else ""
  settings = [("baseline: " + (args.baseline or "the default") + untrimmed, split(args.baseline),
               not args.untrimmed_baseline),
              ("candidate: " + (args.candidate or "the default"), split(args.candidate), True)]
  peaks = [_report(name, _run_setting(args.steps, args.base, overrides, trim))
           for name, overrides, trim in settings]
  print(f"\npeak_rss_ratio candidate/baseline = {peaks[1] / peaks[0]:.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
