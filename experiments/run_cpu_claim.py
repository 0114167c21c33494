"""The paper's central claim at CPU scale, with ablations (one command).

    python experiments/run_cpu_claim.py --root runs/cpu_claim

1. Trains the tool-naive base once (the ``warmup`` stage of the embedded default) into
   ``ROOT/base_run/base``.
2. Runs the ``rl`` stage from that base for every variant and seed, each in its own workdir
   ``ROOT/<variant>/seed<k>`` with the same step budget:

   ``rl`` (the full method), ``no_tools``, ``no_trajectory_mask``, ``no_tool_gain``,
   ``reflect_only``, ``confirm_only``.

   A finished run leaves ``claim_done.json``; re-running the command skips it, so the sweep can
   be stopped and continued (an interrupted run resumes from its last checkpoint).
3. Collects the test-split results (the rl stage evaluates the base before the first update and
   the policy after the last) into ``experiments/results/cpu_claim.json``, a Markdown table
   ``cpu_claim.md`` and curves ``cpu_claim_curves.png``.

Every run is ``python -m imagent_jax.main`` in a subprocess, so each is exactly what a user would
run by hand; ``--set key=value`` passes config overrides to all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT_DIR, "experiments", "results")

VARIANTS: dict[str, list[str]] = {
    "rl": [],
    "no_tools": ["tools.names=none"],
    "no_trajectory_mask": ["masks.mask_turn_limit=False", "masks.mask_truncated=False", "masks.mask_malformed=False"],
    "no_tool_gain": ["reward.name=accuracy_format"],
    "reflect_only": ["tools.names=reflect"],
    "confirm_only": ["tools.names=confirm"],
}
METRICS = ("accuracy", "tool_calls_per_trajectory", "image_calls_per_trajectory", "confirm_on_target",
           "confirm_on_target_chance")


def _main(workdir: str, overrides: list[str], log_path: str) -> float:
  cmd = [sys.executable, "-m", "imagent_jax.main", "--config", os.path.join(ROOT_DIR, "configs", "synthetic_tiny.py"),
         "--workdir", workdir] + [f"--config.{o}" for o in overrides]
  print("$ " + " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  with open(log_path, "a") as log:
    res = subprocess.run(cmd, cwd=ROOT_DIR, stdout=log, stderr=subprocess.STDOUT)
  if res.returncode:
    raise SystemExit(f"run failed (exit {res.returncode}); see {log_path}")
  return time.perf_counter() - t0


def _records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run_sweep(root: str, variants: list[str], seeds: list[int], common: list[str]) -> dict:
  os.makedirs(root, exist_ok=True)
  data_dir = os.path.join(root, "data")  # one tfds build shared by every run
  base_run = os.path.join(root, "base_run")
  times = {}
  if not os.path.isfile(os.path.join(base_run, "base", "config.json")):
    times["warmup_s"] = _main(base_run, ["stages=warmup", "warmup.progress_bar=False",
                                         f"data.data_dir={data_dir}"] + common, os.path.join(root, "warmup.log"))
    print(f"warmup: {times['warmup_s']:.0f}s", flush=True)
  for seed in seeds:  # seed-major: a stopped sweep has every variant about equally far
    for variant in variants:
      wd = os.path.join(root, variant, f"seed{seed}")
      done = os.path.join(wd, "claim_done.json")
      if os.path.exists(done):
        continue
      os.makedirs(wd, exist_ok=True)
      seconds = _main(wd, ["stages=rl", f"model.checkpoint={os.path.join(base_run, 'base')}", f"seed={seed}",
                           "rl.progress_bar=False", f"data.data_dir={data_dir}"] + common + VARIANTS[variant],
                      os.path.join(wd, "run.log"))
      with open(done, "w") as f:
        json.dump({"seconds": seconds}, f)
      print(f"{variant} seed {seed}: {seconds:.0f}s", flush=True)
  return times


def _summary(values: list[float | None]) -> dict:
  vals = [v for v in values if v is not None]
  return {"mean": statistics.fmean(vals) if vals else None,
          "std": statistics.pstdev(vals) if len(vals) > 1 else (0.0 if vals else None),
          "per_seed": values}


def collect(root: str, variants: list[str], seeds: list[int]) -> dict:
  """The results JSON from the finished runs under ``root``."""
  out: dict = {"base": {}, "rl": {}, "ablations": {}, "runs": {}}
  base_tests = []
  for variant in variants:
    finals = {m: [] for m in METRICS}
    for seed in seeds:
      wd = os.path.join(root, variant, f"seed{seed}")
      tests = [r for r in _records(wd) if r["stage"] == "test"]
      if not os.path.exists(os.path.join(wd, "claim_done.json")) or len(tests) < 2:
        continue
      if variant == "rl" or not base_tests:
        base_tests.append(tests[0])
      for m in METRICS:
        finals[m].append(tests[-1].get(f"test/{m}"))
      out["runs"][f"{variant}/seed{seed}"] = json.load(open(os.path.join(wd, "claim_done.json")))
    summary = {m: _summary(v) for m, v in finals.items()}
    summary["seeds"] = len(finals["accuracy"])
    if variant == "rl":
      out["rl"] = summary
    else:
      out["ablations"][variant] = summary
  if base_tests:
    out["base"] = {m: base_tests[0].get(f"test/{m}") for m in METRICS}
  return out


def _fmt(s: dict | float | None) -> str:
  if isinstance(s, dict):
    if s.get("mean") is None:
      return "-"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"
  return "-" if s is None else f"{s:.3f}"


def write_outputs(results: dict, root: str, variants: list[str], seeds: list[int]) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "cpu_claim.json"), "w") as f:
    json.dump(results, f, indent=1)
  rows = [("base (tool-naive warmup)", "-", *(_fmt(results["base"].get(m)) for m in METRICS))]
  for name in variants:
    s = results["rl"] if name == "rl" else results["ablations"].get(name, {})
    rows.append((name, str(s.get("seeds", 0)), *(_fmt(s.get(m)) for m in METRICS)))
  head = ["run", "seeds", "test accuracy", "tool calls / traj", "image calls / traj", "confirm on target",
          "(chance)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
  with open(os.path.join(RESULTS, "cpu_claim.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  _plot(root, variants, seeds, os.path.join(RESULTS, "cpu_claim_curves.png"))


def _plot(root: str, variants: list[str], seeds: list[int], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  keys = [("eval/accuracy", "eval", "validation accuracy"), ("reward", "rl", "reward"),
          ("tool_calls_per_trajectory", "rl", "tool calls / trajectory"),
          ("confirm_on_target", "rl", "confirm on target")]
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
  for ax, (key, stage, title) in zip(axes, keys):
    for variant in variants:
      curves = []
      for seed in seeds:
        recs = [r for r in _records(os.path.join(root, variant, f"seed{seed}")) if r["stage"] == stage]
        curves.append({r["step"]: r.get(key) for r in recs if r.get(key) is not None})
      steps = sorted(set().union(*curves)) if curves else []
      if not steps:
        continue
      mean = [np.mean([c[s] for c in curves if s in c]) for s in steps]
      ax.plot(steps, mean, label=variant, lw=2 if variant == "rl" else 1)
    ax.set_title(title)
    ax.set_xlabel("RL step")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join(ROOT_DIR, "runs", "cpu_claim"), help="where the runs live")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rl-steps", type=int, default=100,
                 help="GRPO steps of every run (the same budget for all; ~9 s a step on 2 CPU cores)")
  p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. --set rl.learning_rate=5e-5")
  p.add_argument("--collect-only", action="store_true", help="only (re)write the results from finished runs")
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  if not args.collect_only:
    run_sweep(args.root, variants, seeds, [f"rl.steps={args.rl_steps}"] + args.set)
  write_outputs(collect(args.root, variants, seeds), args.root, variants, seeds)


if __name__ == "__main__":
  main()
