"""Tables format NumPy scalars like Python numbers; metrics records are plain JSON."""

import json

import numpy as np

from imagent_jax.reporting import MetricsWriter, markdown_table, text_table


def test_tables_format_numpy_floats_like_python_floats():
  rows = [("a", np.float32(1.3198225), np.int64(3), np.asarray(0.123456), 2.0, "x")]
  assert markdown_table(["k", "f32", "i64", "0-d", "py", "s"], rows) == (
      "| k | f32 | i64 | 0-d | py | s |\n|---|---|---|---|---|---|\n| a | 1.32 | 3 | 0.1235 | 2 | x |")
  assert text_table(["k", "f32", "i64", "0-d", "py", "s"], rows) == (
      "k  f32   i64  0-d     py  s\n-  ----  ---  ------  --  -\na  1.32  3    0.1235  2   x")


def test_metrics_writer_writes_plain_json(tmp_path):
  MetricsWriter(str(tmp_path)).write(np.int64(2), "rl", acc=np.float32(0.5), n=np.asarray(3))
  record = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert (record["step"], record["stage"], record["acc"], record["n"]) == (2, "rl", 0.5, 3)
