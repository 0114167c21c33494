"""The eval stage end to end on the smoke model: records, summary, report, resume after a kill, and
its config checks."""

import json
import os

import pytest
from PIL import Image

from imagent_jax import main
from imagent_jax.config import schema
from imagent_jax.stages import eval as eval_stage


def _jsonl_set(folder):
  folder.mkdir()
  for i, color in enumerate(["red", "blue", "green"]):
    Image.new("RGB", (40 + 8 * i, 32), color).save(folder / f"{i}.png")
  records = [{"id": f"m{i}", "images": [f"{i}.png", f"{(i + 1) % 3}.png"], "question": "Which image is red?",
              "options": ["Image 1", "Image 2", "Neither"], "answer": "Image 1" if i == 0 else "Neither",
              "category": "color"} for i in range(3)]
  (folder / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return folder


def _config(benchmarks):
  config = schema.get_config("smoke")
  config.stages = "eval"
  config.data.source = "synthetic"
  config.eval.benchmarks = benchmarks
  config.eval.progress_bar = False
  config.eval.batch_size = 2
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  data = _jsonl_set(root / "mine")
  workdir = str(root / "run")
  config = _config(f"data=test,jsonl={data}")
  results = main.run(config, workdir)
  return config, workdir, results


def _records(workdir, name):
  return [json.loads(line) for line in open(os.path.join(workdir, "eval", name, "results.jsonl"))]


def test_records_summary_report(finished):
  config, workdir, results = finished
  assert set(results["eval"]) == {"data", "jsonl"}
  data, mine = _records(workdir, "data"), _records(workdir, "jsonl")
  assert len(data) == config.data.test_size and [r["id"] for r in mine] == ["m0", "m1", "m2"]
  for r in data + mine:
    assert set(r) >= {"id", "category", "response", "answer", "correct", "tool_calls", "status"}
    assert r["status"] in ("answered", "truncated", "turn_limit", "no_answer")
  summary = json.load(open(os.path.join(workdir, "eval", "summary.json")))
  s = summary["benchmarks"]["jsonl"]
  assert s["questions"] == 3 and s["scores"]["overall"] == pytest.approx(100 * sum(r["correct"] for r in mine) / 3)
  assert results["eval"]["jsonl"] == s["scores"]["overall"]
  assert [p["model"] for p in s["published"]] == ["IMAgent-7B (MIFG-QA, Nature)"]
  report = open(os.path.join(workdir, "report.md")).read()
  assert "## Evaluation" in report and "| jsonl | overall |" in report
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert logged[-1]["stage"] == "eval" and "eval/data/overall" in logged[-1]


def test_a_killed_evaluation_resumes_where_it_stopped(finished, tmp_path, capsys):
  config, workdir, _ = finished
  before = _records(workdir, "data")
  path = os.path.join(workdir, "eval", "data", "results.jsonl")
  lines = open(path).read().splitlines(keepends=True)
  with open(path, "w") as f:  # two answers written, the third cut mid-line by the kill
    f.writelines(lines[:2] + [lines[2][:25]])
  config.eval.benchmarks = "data=test"
  main.run(config, workdir)
  assert "resuming, 2 of 4 questions already answered" in capsys.readouterr().out
  after = _records(workdir, "data")
  assert [r["id"] for r in after] == [r["id"] for r in before]
  assert [r["response"] for r in after] == [r["response"] for r in before]  # greedy: the same answers


def test_weights_rl_needs_a_checkpoint(tmp_path):
  config = _config("data=test")
  config.eval.weights = "rl"
  with pytest.raises(FileNotFoundError, match="has no checkpoint"):
    main.run(config, str(tmp_path / "w"))


@pytest.mark.parametrize("field,value,message", [
    ("benchmarks", "vstar2=/x", "unknown benchmark 'vstar2'"),
    ("benchmarks", "vstar", "is not name=path"),
    ("benchmarks", "vstar=/no/such/folder", "vstar=/no/such/folder: no such file or folder"),
    ("benchmarks", "data=dev", "the split must be train, validation or test"),
    ("benchmarks", "", "config.eval.benchmarks is empty"),
    ("weights", "best", "config.eval.weights='best'"),
    ("circular", "yes", "config.eval.circular='yes'"),
    ("samples", 0, "config.eval.samples=0"),
    ("option_order", "random", "config.eval.option_order='random'"),
])
def test_config_checks(field, value, message):
  config = _config("data=test")
  config.eval[field] = value
  with pytest.raises(ValueError, match="invalid config") as info:
    schema.validate(config)
  assert message in str(info.value)


def test_parse_benchmarks():
  assert eval_stage.parse_benchmarks(" vstar=/a , hrbench_4k=/b,") == [("vstar", "/a"), ("hrbench_4k", "/b")]
  with pytest.raises(ValueError, match="twice"):
    eval_stage.parse_benchmarks("vstar=/a,vstar=/b")
