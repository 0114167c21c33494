"""Test setup: 8 fake CPU devices (set before jax is imported), float32 matmuls at full precision, and
the shared fixture modules on the path."""

import os
import sys

# Test modules live in folders mirroring the package; the shared fixtures (toy.py, hf_fixtures.py)
# sit here, importable from every folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The longest files first: with two xdist workers (setup.cfg) a long file collected last (the
# top-level end-to-end tests come after the package folders) would run alone at the end.
_LONG_FILES = ("test_multihost.py", "test_main.py", "test_notebooks.py", "test_released_run.py")


def pytest_collection_modifyitems(config, items):
  """Moves the tests of ``_LONG_FILES`` to the front, keeping every other order."""
  del config
  rank = lambda item: _LONG_FILES.index(item.path.name) if item.path.name in _LONG_FILES else len(_LONG_FILES)
  items.sort(key=rank)
