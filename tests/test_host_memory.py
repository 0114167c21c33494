"""Between-stage release of host memory (imagent_jax/host_memory.py)."""

import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from imagent_jax import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_release_drops_compiled_programs_and_keeps_live_arrays():
  f = jax.jit(lambda x: x * 2 + 1)
  x = jnp.arange(4.0)
  y = f(x)
  assert f._cache_size() == 1  # pylint: disable=protected-access
  assert host_memory.release() is GLIBC
  assert f._cache_size() == 0  # pylint: disable=protected-access
  assert y.tolist() == [1.0, 3.0, 5.0, 7.0]  # live arrays survive
  assert f(x).tolist() == y.tolist()  # and the function compiles again


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
@pytest.mark.parametrize("call", ["trim", "release"])
def test_returns_freed_heap_pages(call):
  # 160 MB of heap chunks freed under a live chunk at the top of the heap: glibc keeps their pages
  # (it trims only the top by itself) until malloc_trim(0) gives them back.
  script = textwrap.dedent(f"""
      import jax
      from imagent_jax import host_memory
      blocks = [bytes(8000) for _ in range(20000)]
      pin = bytes(8000)
      del blocks
      before = host_memory.resident_bytes()
      assert host_memory.{call}()
      print(before, host_memory.resident_bytes())
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={"GLIBC_TUNABLES": "", "PATH": "/usr/bin:/bin"})
  before, after = map(int, out.stdout.split())
  assert before - after > 100e6, (before, after)


def test_resident_bytes():
  rss = host_memory.resident_bytes()
  if platform.system() == "Linux":
    assert 50e6 < rss < 50e9
    assert 0 < host_memory.resident_bytes("RssAnon") <= rss <= host_memory.resident_bytes("VmHWM")
  else:
    assert rss is None
