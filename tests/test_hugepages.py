"""The entry point's huge-page re-execution (imagent_jax/hugepages.py)."""

import os
import platform
import subprocess
import sys

import pytest

from imagent_jax import hugepages

LINUX = dict(system="Linux", libc=("glibc", "2.36"), thp="always [madvise] never\n")


def test_adds_the_tunable_and_keeps_others():
  env = hugepages.hugepage_environ({"PATH": "/bin"}, **LINUX)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = hugepages.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **LINUX)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ, overrides", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}),  # the user's own choice, kept
    ({"IMAGENT_HUGEPAGES": "0"}, {}),  # the opt-out
    ({}, dict(system="Darwin", libc=("", ""))),
    ({}, dict(libc=("", ""))),  # musl
    ({}, dict(libc=("glibc", "2.31"))),  # before the tunable existed
    ({}, dict(thp="always madvise [never]")),
    ({}, dict(thp=None)),  # no transparent huge pages in this kernel
])
def test_does_nothing_where_it_cannot_help(environ, overrides):
  assert hugepages.hugepage_environ(environ, **{**LINUX, **overrides}) is None


def test_reexec_restarts_the_same_command_once_with_the_tunable():
  code = ("import os; from imagent_jax import hugepages; print('start', flush=True); "
          "hugepages.reexec_with_hugepages(); print('tunables', os.environ.get('GLIBC_TUNABLES'))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "IMAGENT_HUGEPAGES")}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  try:
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
  except OSError:
    thp = None
  expected = hugepages.hugepage_environ(env, system=platform.system(), libc=platform.libc_ver(), thp=thp)
  if expected is None:  # this machine cannot use it: one run, unchanged
    assert out.stdout.split("\n")[:2] == ["start", "tunables None"]
  else:  # two starts, the second with the tunable, and no third
    assert out.stdout.split("\n")[:3] == ["start", "start", "tunables glibc.malloc.hugetlb=1"]
  opted_out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**env, "IMAGENT_HUGEPAGES": "0"})
  assert opted_out.stdout.split("\n")[:2] == ["start", "tunables None"]
