"""Hands a finished stage's host memory back to the system before the next stage starts.

A stage leaves two kinds of memory behind in the process. Its compiled programs stay in JAX's
caches (XLA:CPU keeps 60-100 MB of code and runtime state per GRPO-step executable of the
embedded default, ``experiments/compile_memory.py``), although the next stage compiles its own.
And the heap keeps the pages of the buffers it freed: glibc returns them to the system only from
the top of the heap, so after the warmup the process holds about 1 GB it no longer uses.
``release`` drops the caches and asks glibc to give back every free page (``malloc_trim(0)``), so
that the next stage starts from what is live, not from the high-water mark of the one before;
``trim`` only gives the pages back, for a stage that has let go of large host data and goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import functools


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
