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


def test_trim_after_compiles_trims_once_per_compile_until_turned_off(monkeypatch):
  host_memory.trim_after_compiles(False)  # an earlier main.run in this process may have turned it on
  x, y = jnp.arange(3.0), jnp.arange(5.0)  # compiled here, before anything counts
  f = jax.jit(lambda v: v * 3 - 1)
  trims, compiles = [], []
  monkeypatch.setattr(host_memory, "_malloc_trim", lambda: trims.append)  # malloc_trim(0) -> trims.append(0)

  def count(event, duration_secs, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration_secs)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    assert host_memory.trim_after_compiles()
    assert host_memory.trim_after_compiles()  # a second call registers nothing more
    f(x)
    assert len(compiles) >= 1 and trims == [0] * len(compiles)
    f(x)  # cached: no compile, no trim
    f(y)  # a new shape compiles again
    assert len(compiles) >= 2 and trims == [0] * len(compiles)
    assert not host_memory.trim_after_compiles(False)
    n = len(trims)
    f(jnp.arange(7.0))
    assert len(compiles) > n and len(trims) == n  # off: compiles go on, trims stop
  finally:
    host_memory.trim_after_compiles(False)
    jax.monitoring.unregister_event_duration_listener(count)


def test_trim_after_compiles_is_off_without_glibc(monkeypatch):
  host_memory.trim_after_compiles(False)  # an earlier main.run in this process may have turned it on
  monkeypatch.setattr(host_memory, "_malloc_trim", lambda: None)
  assert not host_memory.trim_after_compiles()


def test_trimming_after_compiles_restores_the_state_before_it():
  host_memory.trim_after_compiles(False)
  with host_memory.trimming_after_compiles():
    assert host_memory._trimming_after_compiles is GLIBC  # pylint: disable=protected-access
  assert not host_memory._trimming_after_compiles  # pylint: disable=protected-access
  if GLIBC:
    host_memory.trim_after_compiles(True)
    with pytest.raises(RuntimeError), host_memory.trimming_after_compiles():
      raise RuntimeError("a stage failed")
    assert host_memory._trimming_after_compiles  # pylint: disable=protected-access
    host_memory.trim_after_compiles(False)
