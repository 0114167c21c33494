"""Entry point: ``python -m imagent_jax.main [--config configs/<name>.py] --workdir DIR [--config.a.b=v]``.

Without ``--config`` the embedded default runs (``imagent_jax/config/schema.py``: synthetic
data, tiny model, CPU). The config is validated before anything compiles (``config.validate``);
the stages named in ``config.stages`` run in order, each looked up in ``stages.STAGES``; the
workdir receives ``config.json``, ``metrics.jsonl`` and ``report.md`` with its plots.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time

# TensorFlow, where something imports it (our tfds reader does not), prints info lines; keep warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "schema.py")


def _exit_unknown_key(error: Exception, argv) -> None:
  """Exits with the one-line ``error: invalid config`` (status 2) for an override of a key the
  config does not have; ml_collections raises it from deep inside flag parsing."""
  inner = error.args[0] if error.args and isinstance(error.args[0], Exception) else error
  detail = str(inner.args[0] if inner.args else inner)
  overrides = [a.split("=", 1)[0].lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
  named = [o for o in overrides if any(f"'{part}'" in detail for part in o.split(".")[1:])] or overrides
  hint = re.sub(r"^'[^']*'\s*", "", detail).replace("\n", " ")  # ml_collections' "Did you mean ...?"
  print(f"error: invalid config: no such key: {', '.join(named)}" + (f" ({hint})" if hint else ""), file=sys.stderr)
  sys.exit(2)


try:  # without --config, the embedded default is read (and its overrides applied) right here
  _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (a Python file with get_config; "
                                            "a suffix :arg is passed to it).", lock_config=True)
except (AttributeError, KeyError, TypeError) as e:
  _exit_unknown_key(e, sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, report, checkpoints and plots.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: process 0's host:port (default: "
                                   "$JAX_COORDINATOR_ADDRESS, or discovered on TPU pods and SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: processes in the job "
                                      "(default: $JAX_NUM_PROCESSES or discovered).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index (default: $JAX_PROCESS_ID "
                                   "or discovered).")


def _parse_flags(argv):
  """absl's flag parsing, with unknown config keys reported like every invalid config."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError) as e:
    _exit_unknown_key(e, argv)


def check_workdir(workdir: str) -> None:
  """Raises ``ValueError`` ("invalid workdir: ...") unless ``workdir`` is, or can be made, a folder
  this process can write a file in (a probe file is written and removed: a read-only or full disk
  is found before any stage starts)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"invalid workdir: {workdir} exists and is not a folder")
  probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * 65536)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise ValueError(f"invalid workdir: cannot write in {workdir} ({e.strerror or e})") from None
  finally:
    try:
      os.remove(probe)
    except OSError:
      pass


def run(config, workdir: str) -> dict:
  """Validates ``config`` and runs its stages in ``workdir``; returns each stage's summary."""
  import jax

  from imagent_jax import host_memory, stages
  from imagent_jax.config.validate import validate
  from imagent_jax.reporting import MetricsWriter, Report

  validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  primary = jax.process_index() == 0  # process 0 writes the run's files; every process computes
  check_workdir(workdir)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  report = Report(workdir, "imagent_jax run report")
  metrics = MetricsWriter(workdir)
  run_fns = [(stage, stages.run_function(stage)) for stage in stages.configured(config.stages)]
  results = {}
  with host_memory.trimming_after_compiles():  # a compile's freed working memory goes back before its program runs
    for stage, run_stage in run_fns:
      t0 = time.perf_counter()
      print(f"\n=== stage: {stage} ===")
      results[stage] = run_stage(config, workdir, report, metrics)
      host_memory.release()  # the stage's programs and freed heap pages (imagent_jax/host_memory.py)
      print(f"=== stage {stage} done in {time.perf_counter() - t0:.1f}s ===")
  if primary:
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
  from imagent_jax import parallel  # pylint: disable=import-outside-toplevel
  # Multi-host (flags, JAX_COORDINATOR_ADDRESS, TPU pod, SLURM); nothing on one host.
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    results = run(_CONFIG.value, os.path.expanduser(_WORKDIR.value))
  except ValueError as e:
    if str(e).startswith(("invalid config", "invalid workdir")):
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    raise
  if any(isinstance(r, dict) and r.get("stopped") for r in results.values()):
    sys.exit(143)  # stopped by SIGTERM before the end (128 + 15): not a finished run


if __name__ == "__main__":
  from imagent_jax import hugepages
  hugepages.reexec_with_hugepages()  # huge pages for XLA:CPU's per-step buffers (imagent_jax/hugepages.py)
  app.run(main, flags_parser=_parse_flags)
