"""Entry point: ``python -m imagent_jax.main [--config configs/<name>.py] --workdir DIR [--config.a.b=v]``.

Without ``--config`` the embedded default runs (``imagent_jax/config/schema.py``: synthetic
data, tiny model, CPU). The config is validated before anything compiles; the stages named in
``config.stages`` run in order; the workdir receives ``config.json``, ``metrics.jsonl`` and
``report.md`` with its plots.
"""

from __future__ import annotations

import logging
import os
import sys
import time

# TensorFlow (read by tfds for the array_record data) prints info lines on import; keep warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "schema.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (a Python file with get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, report, checkpoints and plots.")


def run(config, workdir: str) -> dict:
  """Validates ``config`` and runs its stages in ``workdir``; returns each stage's summary."""
  import jax

  from imagent_jax.config import schema
  from imagent_jax.stages import model_check, rl as rl_stage, rollout_demo, warmup
  from imagent_jax.reporting import MetricsWriter, Report

  schema.validate(config, num_devices=jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  stage_fns = {"model": model_check.run, "warmup": warmup.run, "rollout": rollout_demo.run, "rl": rl_stage.run}
  report = Report(workdir, "imagent_jax run report")
  metrics = MetricsWriter(workdir)
  results = {}
  for stage in [s.strip() for s in config.stages.split(",") if s.strip()]:
    t0 = time.perf_counter()
    print(f"\n=== stage: {stage} ===")
    results[stage] = stage_fns[stage](config, workdir, report, metrics)
    print(f"=== stage {stage} done in {time.perf_counter() - t0:.1f}s ===")
  path = report.write()
  print(f"\nReport: {path}\nMetrics: {metrics.path}")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (where metrics, report and checkpoints go)")
  absl_logging.set_verbosity(absl_logging.ERROR)  # keep jax's backend probing out of the user's way
  logging.getLogger("imagent_jax").setLevel(logging.INFO)
  try:
    results = run(_CONFIG.value, os.path.expanduser(_WORKDIR.value))
  except ValueError as e:
    if str(e).startswith("invalid config"):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    raise
  if any(isinstance(r, dict) and r.get("stopped") for r in results.values()):
    sys.exit(143)  # stopped by SIGTERM before the end (128 + 15): not a finished run


if __name__ == "__main__":
  app.run(main)
