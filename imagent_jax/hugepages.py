"""Huge pages for the host heap of a training process (glibc's ``malloc.hugetlb`` tunable).

XLA:CPU allocates each program's temporary buffers with ``malloc`` at every execution: a GRPO
step of the embedded default takes 0.6-0.8 GB of them, a warmup step a few hundred MB. Buffers
that large are ``mmap``-ed and unmapped again, so every step touches them afresh one 4 KiB page
at a time: README command 1 took ~75 million minor page faults and spent 11% of its CPU time in
the kernel. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35) malloc asks for
transparent huge pages (``madvise(MADV_HUGEPAGE)``): 2 MiB pages, up to 512 times fewer faults.
README command 1 on an idle 2-core VM went from 74 to 1.9 million minor faults, from 114 to 52 s
of system time and from 10:28 to 9:31 of wall time, at the same peak RSS
(``experiments/README.md``, "Memory and system time").

Tunables are read when a process starts, so ``python -m imagent_jax.main`` re-executes itself
once with the tunable added (``reexec_with_hugepages``) before it imports JAX. Nothing happens
where it cannot help: not Linux, not glibc >= 2.35, transparent huge pages ``never``, the tunable
already set, or ``IMAGENT_HUGEPAGES=0`` in the environment (the opt-out).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "IMAGENT_HUGEPAGES"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _version(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in text.split(".")[:2])
  except ValueError:
    return ()


def hugepage_environ(environ: Mapping[str, str], *, system: str, libc: tuple[str, str],
                     thp: Optional[str]) -> Optional[dict[str, str]]:
  """The environment to re-execute with, or None when huge pages would not help or are set.

  Args:
    environ: the current environment.
    system: ``platform.system()`` (``"Linux"``, ...).
    libc: ``platform.libc_ver()`` (``("glibc", "2.36")``; ``("", "")`` for others).
    thp: the content of ``/sys/kernel/mm/transparent_hugepage/enabled`` (``"always [madvise]
      never"``), or None when it cannot be read.

  Returns:
    ``environ`` with ``glibc.malloc.hugetlb=1`` appended to ``GLIBC_TUNABLES``, or None.
  """
  if environ.get(OPT_OUT, "1") == "0" or system != "Linux" or libc[0] != "glibc":
    return None
  if _version(libc[1]) < (2, 35) or thp is None or "[never]" in thp:
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, f"{TUNABLE}=1") if t)}


def reexec_with_hugepages() -> None:
  """Re-executes this process (``sys.orig_argv``) with ``hugepage_environ``'s environment when
  that is not None; returns otherwise. Call it first thing in an entry point, before JAX starts
  threads or allocates."""
  try:
    with open(_THP_SETTING) as f:
      thp = f.read()
  except OSError:
    thp = None
  env = hugepage_environ(os.environ, system=platform.system(), libc=platform.libc_ver(), thp=thp)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), env)
