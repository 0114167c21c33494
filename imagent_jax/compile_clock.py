"""How long this process has spent making JAX programs: tracing, lowering and XLA compiling.

A step that meets a new batch shape compiles its programs first (about 7 s for the embedded
default's GRPO step on 2 CPU cores). The training loops put each step's share in their metrics
(``time/compile_s``) and their progress bars, so a slow step says it was a compile; the
experiments' benchmarks use it to keep compiles out of their timings.

The clock counts JAX's own compile events (``jax.monitoring``), from every thread, since this
module was imported. Those events count only the compiler's work: a first call's wall time also
pays one-off costs (first touch of buffers, thread pools), so ``first call - steady call``
overstates compile time.
"""

from __future__ import annotations

import threading

import jax

KINDS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
         "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
         "/jax/core/compile/backend_compile_duration": "compile"}
_lock = threading.Lock()
_seconds = dict.fromkeys(KINDS.values(), 0.0)


def _record(event: str, duration_secs: float, **_) -> None:
  kind = KINDS.get(event)
  if kind is not None:
    with _lock:
      _seconds[kind] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_record)


def seconds(kind: str | None = None) -> float:
  """Seconds spent making JAX programs since import: all of it, or one ``kind`` ("trace",
  "lower" or "compile": XLA's backend compile alone)."""
  with _lock:
    return sum(_seconds.values()) if kind is None else _seconds[kind]


def postfix(compile_s: float, threshold: float = 0.5) -> dict[str, str]:
  """Progress-bar fields for a step that compiled for more than ``threshold`` seconds, else none:
  ``{"compiled": "7s"}``."""
  return {"compiled": f"{compile_s:.0f}s"} if compile_s > threshold else {}
