"""Hands a finished stage's host memory back to the system before the next stage starts.

A stage leaves two kinds of memory behind in the process. Its compiled programs stay in JAX's
caches (XLA:CPU keeps 60-100 MB of code and runtime state per GRPO-step executable of the
embedded default, ``experiments/compile_memory.py``), although the next stage compiles its own.
And the heap keeps the pages of the buffers it freed: glibc returns them to the system only from
the top of the heap, so after the warmup the process holds about 1 GB it no longer uses.
``release`` drops the caches and asks glibc to give back every free page (``malloc_trim(0)``), so
that the next stage starts from what is live, not from the high-water mark of the one before;
``trim`` only gives the pages back, for a stage that has let go of large host data and goes on.

Inside a stage, each XLA compile leaves its working memory (LLVM modules, HLO passes: 0.4-0.6 GB
for the embedded default's GRPO step) as free pages in the heap, and the program's first
execution then allocates its temporaries (0.5-0.8 GB) beside them, so the step that meets a new
batch shape peaked at both at once. ``trim_after_compiles`` gives those pages back as each
compile ends, before the program runs (``experiments/step_memory.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import functools

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring: an XLA compile ended
_trimming_after_compiles = False


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  """glibc's ``malloc_trim``, or None elsewhere (musl, macOS, Windows)."""
  name = ctypes.util.find_library("c")
  try:
    return ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):
    return None


def resident_bytes(field: str = "VmRSS") -> int | None:
  """This process's resident memory in bytes, or None where ``/proc`` has none.

  Args:
    field: the ``/proc/self/status`` line: ``VmRSS`` (all resident pages), ``RssAnon`` (heap and
      other anonymous memory: what compiled programs and arrays hold), ``RssFile``, ``VmHWM`` (peak).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def trim() -> bool:
  """Collects garbage and returns the heap's free pages to the system (glibc ``malloc_trim(0)``).

  For the points where a stage lets go of a lot of host data (decoded images of a test split,
  say) and goes on running: compiled programs stay.

  Returns:
    True when the heap was trimmed (glibc), False elsewhere (nothing to do).
  """
  gc.collect()
  malloc_trim = _malloc_trim()
  if malloc_trim is None:
    return False
  malloc_trim(0)
  return True


def release() -> bool:
  """Drops JAX's compiled-program caches, then ``trim``: what a finished stage leaves behind.

  Call it between stages, never inside one: the next call of any jitted function compiles again.
  Live arrays are untouched.

  Returns:
    ``trim``'s answer.
  """
  import jax  # pylint: disable=import-outside-toplevel

  jax.clear_caches()
  return trim()


def _trim_after_compile(event: str, duration_secs: float, **_) -> None:
  del duration_secs
  if event == _COMPILE_EVENT:
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
      malloc_trim(0)  # 1-50 ms; no gc.collect, which would cost more than the trim on every compile


def trim_after_compiles(enable: bool = True) -> bool:
  """Returns the heap's free pages to the system each time XLA finishes compiling a program.

  The compiler's working memory is freed when a compile ends, but glibc keeps the pages; the
  program's first run then adds its temporaries on top. Trimming at that moment takes 0.4-0.5 GB
  off the peak of every step that compiles a new shape (the embedded default's GRPO step:
  1.2-1.4 GB over the step's start without, 0.7-1.0 GB with; ``experiments/step_memory.py``).
  It changes no numerics and costs 1-50 ms per compile. Process-wide (a ``jax.monitoring``
  listener); calling it twice registers it once. ``main.run`` turns it on for the run's
  duration (``trimming_after_compiles``).

  Args:
    enable: False takes the listener off again.

  Returns:
    Whether compiles are now followed by a trim (False with ``enable=False``, or without glibc).
  """
  import jax  # pylint: disable=import-outside-toplevel

  global _trimming_after_compiles
  if enable and not _trimming_after_compiles and _malloc_trim() is not None:
    jax.monitoring.register_event_duration_secs_listener(_trim_after_compile)
    _trimming_after_compiles = True
  elif not enable and _trimming_after_compiles:
    jax.monitoring.unregister_event_duration_listener(_trim_after_compile)
    _trimming_after_compiles = False
  return _trimming_after_compiles


@contextlib.contextmanager
def trimming_after_compiles():
  """``trim_after_compiles`` inside a ``with`` block; the state before it is restored after it (so
  a run started from a notebook or a test leaves the process as it found it)."""
  before = _trimming_after_compiles
  trim_after_compiles(True)
  try:
    yield
  finally:
    trim_after_compiles(before)
