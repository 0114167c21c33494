"""Every notebook under notebooks/ runs top to bottom in a real Jupyter kernel.

The kernel is this interpreter (a kernelspec written into a temporary folder), so it sees the
installed package and inherits the environment of ``conftest.py`` (8 fake CPU devices). Each
notebook runs in its own temporary folder, as working directory and as the kernel's TMPDIR. A
failing cell fails the test with that cell's source and traceback.
"""

import json
import os
import pathlib
import re
import sys
import time

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "imagent-jax-test"
CELL_TIMEOUT_S = 600
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # colours in IPython tracebacks


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
  """A kernelspec for ``sys.executable``, found first through ``JUPYTER_PATH``. Jupyter's runtime
  files and IPython's profile go to a temporary folder, not the user's home."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL_NAME
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "imagent_jax test kernel", "language": "python"}))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JUPYTER_PATH", str(root), prepend=os.pathsep)
    mp.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    mp.setenv("IPYTHONDIR", str(root / "ipython"))
    yield KERNEL_NAME


def run_notebook(path, workdir, kernel):
  """Executes the notebook at ``path`` in ``workdir``; returns the executed notebook."""
  nb = nbformat.read(str(path), as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S, allow_errors=False,
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute()
  return nb


def test_notebooks_exist():
  assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, kernel_name, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile folders land in tmp_path too
  start = time.perf_counter()
  try:
    run_notebook(path, tmp_path, kernel_name)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell failed\n{ANSI_ESCAPE.sub('', str(e))}", pytrace=False)
  print(f"{path.name}: {time.perf_counter() - start:.1f} s")
