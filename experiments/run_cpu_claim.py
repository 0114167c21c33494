"""The paper's central claim at CPU scale, with ablations (one command).

    python experiments/run_cpu_claim.py --root runs/cpu_claim

1. Trains the tool-naive base once (the ``warmup`` stage of the embedded default) into
   ``ROOT/base_run/base``. A base already there is reused only if it was trained with the
   current config's warmup recipe (``warmup.recipe``); otherwise the sweep stops and says why.
2. Runs the ``rl`` stage from that base for every variant and seed, each in its own workdir
   ``ROOT/<variant>/seed<k>`` with the same step budget:

   ``rl`` (the full method), ``no_tools``, ``no_trajectory_mask``, ``no_tool_gain``,
   ``reflect_only``, ``confirm_only``.

   A finished run leaves ``claim_done.json``; re-running the command skips it, so the sweep can
   be stopped and continued (an interrupted run resumes from its last checkpoint).

   Each finished run is also recorded, trimmed to what the results need, in
   ``experiments/results/cpu_claim_runs/`` (small enough for git), with the sha256 of the base's
   weights. The sweep takes longer than one sitting on 2 cores; in a new checkout
   ``--restore-recorded`` counts recorded runs as finished once the freshly trained base has the
   same weights, so a sweep can go on where a lost ``ROOT`` left off.
3. Collects the test-split results (the rl stage evaluates the base before the first update and
   the policy after the last) into ``experiments/results/cpu_claim.json``, a Markdown table
   ``cpu_claim.md`` and curves ``cpu_claim_curves.png``.

Every run is ``python -m imagent_jax.main`` in a subprocess, so each is exactly what a user would
run by hand; ``--set key=value`` passes config overrides to all of them.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT_DIR, "experiments", "results")
RECORDS = os.path.join(RESULTS, "cpu_claim_runs")
CONFIG_FILE = os.path.join(ROOT_DIR, "configs", "synthetic_tiny.py")  # the embedded default

# The tool ablations keep the system prompt the base was warmed up with (every tool listed) and
# disable tools at execution: a call to a disabled tool fails with an error observation. The tiny
# base does not carry over to a prompt it never saw (under a confirm-only prompt it sampled 0.07
# calls per trajectory against 0.24, most of them malformed), which would measure the prompt
# change instead of the tools.
VARIANTS: dict[str, list[str]] = {
    "rl": [],
    "no_tools": ["tools.names=none", "tools.listed=all"],
    "no_trajectory_mask": ["masks.mask_turn_limit=False", "masks.mask_truncated=False", "masks.mask_malformed=False"],
    "no_tool_gain": ["reward.name=accuracy_format"],
    "reflect_only": ["tools.names=reflect", "tools.listed=all"],
    "confirm_only": ["tools.names=confirm", "tools.listed=all"],
}
METRICS = ("accuracy", "tool_calls_per_trajectory", "image_calls_per_trajectory", "confirm_on_target",
           "confirm_on_target_chance", "confirm_on_image", "confirm_on_image_chance")


def _main(workdir: str, overrides: list[str], log_path: str) -> float:
  cmd = [sys.executable, "-m", "imagent_jax.main", "--config", CONFIG_FILE,
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


def code_digest() -> str:
  """sha256 over the package's and the configs' Python files (paths and contents): what a run
  imports when it starts. The sweep runs ``main`` from this checkout, so an edit made while it
  goes on changes the runs that start after it; ``claim_done.json`` records the digest of each."""
  h = hashlib.sha256()
  for pattern in ("imagent_jax/**/*.py", "configs/*.py"):
    for path in sorted(glob.glob(os.path.join(ROOT_DIR, pattern), recursive=True)):
      h.update(os.path.relpath(path, ROOT_DIR).encode())
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def base_digest(base_run: str) -> str | None:
  """sha256 over the base's weight files (``base_run/base/*.safetensors``, in name order), or None."""
  files = sorted(glob.glob(os.path.join(base_run, "base", "*.safetensors")))
  if not files:
    return None
  h = hashlib.sha256()
  for path in files:
    h.update(os.path.basename(path).encode())
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def _trim(record: dict) -> dict:
  """What a recorded run keeps of a metrics record: test, eval and probe records whole, a warmup
  step's timing, an rl step's numbers that the curves draw."""
  if record["stage"] == "rl":
    keep = {"step", "stage", "time", "confirm_on_image_chance", *(k for k, stage, _ in CURVES if stage == "rl")}
    return {k: v for k, v in record.items() if k in keep}
  if record["stage"] == "warmup":
    return {k: record[k] for k in ("step", "stage", "time")}
  return record


def _record_path(name: str) -> str:
  return os.path.join(RECORDS, name.replace("/", "_") + ".json")


def record_run(root: str, name: str) -> None:
  """Writes ``RECORDS/<variant>_seed<k>.json`` (or ``base_run.json``) for the finished run
  ``ROOT/<name>``: its ``claim_done.json``, the sha256 of the base it started from, and its
  trimmed metrics records, one per line (~30 KB a run)."""
  wd = os.path.join(root, name)
  head = {"run": name, "claim_done": json.load(open(os.path.join(wd, "claim_done.json"))),
          "base_sha256": base_digest(os.path.join(root, "base_run"))}
  os.makedirs(RECORDS, exist_ok=True)
  with open(_record_path(name), "w") as f:
    f.write(json.dumps(head)[:-1] + ', "records": [\n')
    f.write(",\n".join(json.dumps(_trim(r)) for r in _records(wd)) + "\n]}\n")


def record_finished(root: str, variants: list[str], seeds: list[int]) -> None:
  """Records every finished run under ``root`` (see ``record_run``) but those restored from a record."""
  names = ["base_run"] + [f"{v}/seed{s}" for v in variants for s in seeds]
  for name in names:
    done = os.path.join(root, name, "claim_done.json")
    if os.path.exists(done) and "restored_from" not in json.load(open(done)):
      record_run(root, name)


def restore_recorded(root: str, variants: list[str], seeds: list[int]) -> list[str]:
  """Makes each recorded run that is not finished under ``root`` a finished run there (its
  ``metrics.jsonl`` and ``claim_done.json``, marked ``restored_from``), when it was recorded from a
  base with the same weights as ``ROOT/base_run``'s. Returns the restored runs' names; refuses
  (SystemExit) a record made from another base."""
  digest = base_digest(os.path.join(root, "base_run"))
  restored = []
  for variant in variants:
    for seed in seeds:
      name = f"{variant}/seed{seed}"
      path = _record_path(name)
      if _finished(root, variant, seed) or not os.path.exists(path):
        continue
      rec = json.load(open(path))
      if rec["base_sha256"] != digest:
        raise SystemExit(f"{path} was recorded from a base with other weights (sha256 {rec['base_sha256']}) "
                         f"than {root}/base_run/base ({digest}): the runs cannot be combined; run without "
                         f"--restore-recorded")
      wd = os.path.join(root, name)
      os.makedirs(wd, exist_ok=True)
      with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rec["records"])
      with open(os.path.join(wd, "claim_done.json"), "w") as f:
        json.dump({**rec["claim_done"], "restored_from": os.path.relpath(path, ROOT_DIR)}, f)
      restored.append(name)
      if rec["claim_done"].get("code_sha256") != code_digest():
        print(f"  {name}: recorded with other code than this checkout's (code_sha256 "
              f"{rec['claim_done'].get('code_sha256')}); its numbers are that code's", flush=True)
  return restored


def resolved_config(overrides: list[str]):
  """The config a run with ``--config.<override>`` flags gets (parsed as ``imagent_jax.main`` does)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["run_cpu_claim", f"--config={CONFIG_FILE}"] + [f"--config.{o}" for o in overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", CONFIG_FILE, flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def check_base(base_run: str, common: list[str]) -> None:
  """Stops the sweep when ``base_run``'s base was trained with another recipe than the current
  config with ``common`` overrides (e.g. a default changed since): its runs would not be the claim's."""
  from imagent_jax.stages import warmup
  path = os.path.join(base_run, "base", warmup.RECIPE_FILE)
  if os.path.isfile(path):
    trained = json.load(open(path))
  else:  # a base from before recipe files: the recipe of the warmup run's config.json
    trained = warmup.recipe(json.load(open(os.path.join(base_run, "config.json"))))
  diffs = warmup.recipe_differences(trained, warmup.recipe(resolved_config(common)))
  if diffs:
    raise SystemExit(f"{base_run}/base was trained with another recipe than this config ({'; '.join(diffs)}): "
                     f"use another --root (or delete {base_run})")


def run_sweep(root: str, variants: list[str], seeds: list[int], common: list[str], restore: bool = False) -> None:
  os.makedirs(root, exist_ok=True)
  data_dir = os.path.join(root, "data")  # one tfds build shared by every run
  base_run = os.path.join(root, "base_run")
  if os.path.isfile(os.path.join(base_run, "base", "config.json")):
    check_base(base_run, common)
  else:
    code = code_digest()
    seconds = _main(base_run, ["stages=warmup", "warmup.progress_bar=False", f"data.data_dir={data_dir}"] + common,
                    os.path.join(root, "warmup.log"))
    with open(os.path.join(base_run, "claim_done.json"), "w") as f:
      json.dump({"seconds": seconds, "code_sha256": code}, f)
    record_run(root, "base_run")
    print(f"warmup: {seconds:.0f}s", flush=True)
  if restore:
    restored = restore_recorded(root, variants, seeds)
    print(f"restored {len(restored)} recorded runs from {os.path.relpath(RECORDS, ROOT_DIR)}: "
          f"{', '.join(restored) or 'none'}", flush=True)
  for seed in seeds:  # seed-major: a stopped sweep has every variant about equally far
    for variant in variants:
      wd = os.path.join(root, variant, f"seed{seed}")
      done = os.path.join(wd, "claim_done.json")
      overrides = common + VARIANTS[variant]
      if os.path.exists(done):
        made_with = json.load(open(done)).get("overrides", overrides)  # runs older than this record: trusted
        if made_with != overrides:
          raise SystemExit(f"{wd} was run with other overrides ({made_with}) than the variant has now "
                           f"({overrides}): move it away to run it again")
        continue
      os.makedirs(wd, exist_ok=True)
      code = code_digest()
      seconds = _main(wd, ["stages=rl", f"model.checkpoint={os.path.join(base_run, 'base')}", f"seed={seed}",
                           "rl.progress_bar=False", f"data.data_dir={data_dir}"] + overrides,
                      os.path.join(wd, "run.log"))
      with open(done, "w") as f:
        json.dump({"seconds": seconds, "overrides": overrides, "code_sha256": code}, f)
      record_run(root, f"{variant}/seed{seed}")
      print(f"{variant} seed {seed}: {seconds:.0f}s", flush=True)


def _summary(values: list[float | None]) -> dict:
  vals = [v for v in values if v is not None]
  return {"mean": statistics.fmean(vals) if vals else None,
          "std": statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None),  # sample std (n - 1)
          "per_seed": values}


def _finished(root: str, variant: str, seed: int) -> str | None:
  """The workdir of a finished run (it left ``claim_done.json``), else None."""
  wd = os.path.join(root, variant, f"seed{seed}")
  return wd if os.path.exists(os.path.join(wd, "claim_done.json")) else None


def collect(root: str, variants: list[str], seeds: list[int]) -> dict:
  """The results JSON from the finished runs under ``root``."""
  out: dict = {"base": {}, "rl": {}, "ablations": {}, "runs": {}}
  base_tests = []
  for variant in variants:
    finals = {m: [] for m in METRICS}
    starts = {m: [] for m in ("accuracy", "tool_calls_per_trajectory")}  # the base under this variant's prompt
    for seed in seeds:
      wd = _finished(root, variant, seed)
      tests = [r for r in _records(wd) if r["stage"] == "test"] if wd else []
      if len(tests) < 2:
        continue
      if variant == "rl" or not base_tests:
        base_tests.append(tests[0])
      for m in METRICS:
        finals[m].append(tests[-1].get(f"test/{m}"))
      for m in starts:
        starts[m].append(tests[0].get(f"test/{m}"))
      out["runs"][f"{variant}/seed{seed}"] = json.load(open(os.path.join(wd, "claim_done.json")))
    summary = {m: _summary(v) for m, v in finals.items()}
    summary["seeds"] = len(finals["accuracy"])
    summary["base"] = {m: _summary(v) for m, v in starts.items()}
    if variant == "rl":
      out["rl"] = summary
    else:
      out["ablations"][variant] = summary
  if base_tests:
    out["base"] = {m: base_tests[0].get(f"test/{m}") for m in METRICS}
  out["wall_s"] = _walls(root, out["runs"])
  out["code_versions"] = sorted({r.get("code_sha256") or "unrecorded" for r in out["runs"].values()})
  return out


def _walls(root: str, runs: dict) -> dict:
  """Seconds of the warmup (the whole ``main`` process; its training steps; its probes) and of
  the rl runs (each a whole ``main`` process: model load, evaluations, 100 steps)."""
  base_run = os.path.join(root, "base_run")
  done = os.path.join(base_run, "claim_done.json")
  records = _records(base_run)
  warm = [r for r in records if r["stage"] == "warmup"]
  starts = [i for i, r in enumerate(warm) if r["step"] == 0]
  warm = warm[starts[-1]:] if starts else warm  # an interrupted warmup's records stay in the file: use the last one
  probe = [r for r in records if r["stage"] == "warmup_probe"]
  rl = [r["seconds"] for r in runs.values()]
  return {"warmup_process": json.load(open(done))["seconds"] if os.path.exists(done) else None,
          # from the first logged step (after compiling) to the last; the probe after it
          "warmup_steps": warm[-1]["time"] - warm[0]["time"] if len(warm) > 1 else None,
          "warmup_probe": probe[-1]["time"] - warm[-1]["time"] if probe and warm else None,
          "rl_run": _summary(rl) if rl else None}


def _fmt(s: dict | float | None) -> str:
  if isinstance(s, dict):
    if s.get("mean") is None:
      return "-"
    n = sum(v is not None for v in s["per_seed"])
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if n > 1 else f"{s['mean']:.3f} (one seed)"
  return "-" if s is None else f"{s:.3f}"


def write_outputs(results: dict, root: str, variants: list[str], seeds: list[int]) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "cpu_claim.json"), "w") as f:
    json.dump(results, f, indent=1)
  rows = [("base (tool-naive warmup)", "-", "-", *(_fmt(results["base"].get(m)) for m in METRICS))]
  for name in variants:
    s = results["rl"] if name == "rl" else results["ablations"].get(name, {})
    base = s.get("base", {}).get("accuracy")
    rows.append((name, str(s.get("seeds", 0)), _fmt(base), *(_fmt(s.get(m)) for m in METRICS)))
  head = ["run", "seeds", "base accuracy, same prompt", "test accuracy", "tool calls / traj", "image calls / traj",
          "confirm on target", "(chance)", "confirm on the asked image", "(chance)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
  w = results.get("wall_s", {})
  if w:
    def sec(v):
      return "-" if v is None else f"{v:.0f} s"
    rl = w.get("rl_run") or {}
    lines += ["", f"Greedy decoding on the test split after RL; mean ± sample standard deviation over seeds. "
                  f"'base accuracy, same prompt' is the base before RL under the variant's system prompt (every "
                  f"variant lists both tools, as the warmup did; the tool ablations disable tools at execution). "
                  f"'confirm on target (chance)' is the share of 256 boxes of each zoom's size, placed at random "
                  f"on its image, that cover the answer's region (0.000: none did). Wall time on this "
                  f"machine: warmup {sec(w.get('warmup_process'))} as a process ({sec(w.get('warmup_steps'))} of "
                  f"training steps, {sec(w.get('warmup_probe'))} of probes); an rl run "
                  f"{sec(rl.get('mean'))} on average over {len(results['runs'])} run{'s' * (len(results['runs']) != 1)}."]
  versions = results.get("code_versions", [])
  if len(versions) > 1:
    lines += ["", f"**The runs were made with {len(versions)} versions of the code** (`code_sha256` in "
                  f"`cpu_claim.json`'s runs: {', '.join(v[:12] for v in versions)}); an edit made while a "
                  f"sweep goes on changes the runs that start after it."]
    print(f"warning: the runs were made with {len(versions)} versions of the code", flush=True)
  with open(os.path.join(RESULTS, "cpu_claim.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  _plot(root, variants, seeds, os.path.join(RESULTS, "cpu_claim_curves.png"))


CURVES = (("eval/accuracy", "eval", "validation accuracy (greedy)"), ("reward", "rl", "reward"),
          ("tool_calls_per_trajectory", "rl", "tool calls / trajectory"),
          ("image_calls_per_trajectory", "rl", "successful image calls / trajectory"),
          ("malformed_calls_per_trajectory", "rl", "malformed calls / trajectory"),
          ("confirm_on_image", "rl", "zooms on the asked image"))


def _curve(records: list[dict], key: str, smooth: int) -> dict[int, float]:
  """``{step: value}`` of one run's finite values of ``key``, as a ``smooth``-step trailing mean."""
  import numpy as np

  from imagent_jax.analysis.plots import trailing_mean
  pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and np.isfinite(r[key])]
  if not pts:
    return {}
  steps, vals = zip(*pts)
  return dict(zip(steps, trailing_mean(vals, smooth).tolist() if smooth > 1 else list(vals)))


def _plot(root: str, variants: list[str], seeds: list[int], path: str, smooth: int = 10) -> None:
  """Per-step curves of every variant's finished runs: the mean over seeds of a ``smooth``-step
  trailing mean of the sampled rollouts' numbers (eval points unsmoothed), shaded between the
  lowest and highest seed; the zoom panel also draws the full method's chance (a random image)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  colors = {"rl": "black", **{v: f"C{i}" for i, v in enumerate(v for v in VARIANTS if v != "rl")}}  # same in every panel
  finished = {v: [wd for wd in (_finished(root, v, s) for s in seeds) if wd] for v in variants}
  fig, axes = plt.subplots(2, 3, figsize=(13, 6.6))
  for ax, (key, stage, title) in zip(axes.flat, CURVES):
    lines = [(v, key) for v in variants]
    if key == "confirm_on_image":
      lines.append(("rl", "confirm_on_image_chance"))
    for variant, k in lines:
      curves = [_curve([r for r in _records(wd) if r["stage"] == stage], k, smooth if stage == "rl" else 1)
                for wd in finished.get(variant, [])]
      curves = [c for c in curves if c]
      if not curves:
        continue
      steps = sorted(set().union(*curves))
      per_step = [[c[s] for c in curves if s in c] for s in steps]
      chance = k.endswith("_chance")
      label = f"chance (a random image; {variant})" if chance else f"{variant} ({len(curves)} seed{'s' * (len(curves) > 1)})"
      ax.plot(steps, [np.mean(v) for v in per_step], "--" if chance else "-", label=label, color=colors.get(variant),
              lw=1.0 if chance else 2.2 if variant == "rl" else 1.1)
      if len(curves) > 1 and not chance:
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=colors.get(variant),
                        alpha=0.12, lw=0)
    ax.set_title(title + ("" if stage == "eval" else f" ({smooth}-step mean)"), fontsize=10)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  if axes.flat[-1].lines:
    axes.flat[-1].legend(fontsize=7)
  fig.suptitle("CPU-scale claim: sampled rollouts (T=1) of every variant; line = mean over seeds, band = min-max",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default=os.path.join(ROOT_DIR, "runs", "cpu_claim"), help="where the runs live")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--rl-steps", type=int, default=100,
                 help="GRPO steps of every run (the same budget for all; 4-9 s a step on 2 CPU cores)")
  p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. --set rl.learning_rate=5e-5")
  p.add_argument("--collect-only", action="store_true", help="only (re)write the results from finished runs")
  p.add_argument("--restore-recorded", action="store_true",
                 help="count the runs recorded in experiments/results/cpu_claim_runs as finished when ROOT's base "
                      "has the same weights (sha256): goes on with a sweep whose ROOT was lost (a new checkout)")
  args = p.parse_args(argv)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  if not args.collect_only:
    run_sweep(args.root, variants, seeds, [f"rl.steps={args.rl_steps}"] + args.set, restore=args.restore_recorded)
  record_finished(args.root, variants, seeds)
  write_outputs(collect(args.root, variants, seeds), args.root, variants, seeds)


if __name__ == "__main__":
  main()
