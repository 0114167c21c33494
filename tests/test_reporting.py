"""Tables format NumPy scalars like Python numbers; metrics records are plain, strict JSON."""

import json
import math

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


def test_metrics_writer_keeps_key_order_and_writes_non_finite_as_null(tmp_path):
  writer = MetricsWriter(str(tmp_path))
  writer.write(3, "eval", **{"eval/b": float("nan"), "eval/a": np.float64(math.inf), "eval/c": np.float32(-math.inf),
                             "eval/d": 1.5, "eval/e": 2})
  line = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in line and "Infinity" not in line
  record = json.loads(line)
  assert list(record) == ["step", "stage", "time", "eval/b", "eval/a", "eval/c", "eval/d", "eval/e"]
  assert [record[k] for k in ("eval/b", "eval/a", "eval/c", "eval/d", "eval/e")] == [None, None, None, 1.5, 2]
  writer.write(4, "rl", x=0.25)  # appends
  assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3, 4]


def test_report_merges_with_the_report_already_in_the_workdir(tmp_path):
  from imagent_jax.reporting import Report
  first = Report(str(tmp_path), "run report")
  first.add("Warmup", "base trained")
  first.add("RL (GRPO)", "0.28 -> 0.69")
  first.write()
  again = Report(str(tmp_path), "run report")  # a stage run on its own later, in the same workdir
  again.add("RL (GRPO)", "resumed: 0.70")
  again.add("Attention analysis", "shares")
  text = again.write() and (tmp_path / "report.md").read_text()
  assert text.count("# run report") == 1
  heads = [line for line in text.splitlines() if line.startswith("## ")]
  assert heads == ["## Warmup", "## RL (GRPO)", "## Attention analysis"]
  assert "base trained" in text and "resumed: 0.70" in text and "0.28 -> 0.69" not in text
