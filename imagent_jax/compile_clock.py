"""How long this process has spent making JAX programs: tracing, lowering and XLA compiling.

A step that meets a new batch shape compiles its programs first (about 7 s for the embedded
default's GRPO step on 2 CPU cores). The training loops put each step's share in their metrics
(``time/compile_s``) and their progress bars, so a slow step says it was a compile.

The clock listens to JAX's own compile events (``jax.monitoring``) from the first call of
``seconds`` on; it counts every thread's compiles.
"""

from __future__ import annotations

import threading

_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/core/compile/backend_compile_duration")
_lock = threading.Lock()
_total = [0.0]
_listening = [False]


def _on_event(event: str, duration_secs: float, **_) -> None:
  if event in _EVENTS:
    with _lock:
      _total[0] += duration_secs


def seconds() -> float:
  """Seconds spent tracing, lowering and compiling JAX programs since the clock's first call
  (which starts it and returns 0.0)."""
  with _lock:
    if not _listening[0]:
      import jax  # pylint: disable=import-outside-toplevel
      jax.monitoring.register_event_duration_secs_listener(_on_event)
      _listening[0] = True
    return _total[0]


def postfix(compile_s: float, threshold: float = 0.5) -> dict[str, str]:
  """Progress-bar fields for a step that compiled for more than ``threshold`` seconds, else none:
  ``{"compiled": "7s"}``."""
  return {"compiled": f"{compile_s:.0f}s"} if compile_s > threshold else {}
