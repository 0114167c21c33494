"""The analyze stage end to end on the smoke model: the figures, summary.json, metrics and report
section; two names of the same weights give the same numbers."""

import json
import os

import numpy as np
import pytest

from imagent_jax import main
from imagent_jax.analysis import attention
from imagent_jax.config import schema


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  config = schema.get_config("smoke")
  config.stages = "analyze"
  config.data.source = "synthetic"
  config.data.test_size = 16
  config.analyze.checkpoints = "base,latest"  # no RL checkpoint in this workdir: "latest" is the model source too
  config.analyze.questions = 2
  config.analyze.batch_size = 2
  config.analyze.query_chunk = 64
  config.analyze.progress_bar = False
  workdir = str(tmp_path_factory.mktemp("analyze"))
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("# imagent_jax run report\n\n## RL (GRPO)\n\nthe run's own section\n")
  return config, workdir, main.run(config, workdir)


def test_outputs(finished):
  config, workdir, results = finished
  for name in ("attention_progress.png", "attention_layers.png", "attention_views.png", "summary.json"):
    assert os.path.getsize(os.path.join(workdir, "analyze", name)) > 1000
  summary = json.load(open(os.path.join(workdir, "analyze", "summary.json")))
  assert set(summary["results"]) == {"base/single", "base/multi", "latest/single", "latest/multi"}
  for key, s in summary["results"].items():
    assert s["trajectories"] == 2 and s["generated_tokens"] > 0
    assert set(s["curves"]) >= set(attention.CATEGORIES) and len(s["curves"]["image"]) == config.analyze.bins
    total = np.nansum([s["curves"][c] for c in attention.CATEGORIES], axis=0)
    filled = np.isfinite(s["curves"]["text"])
    np.testing.assert_allclose(total[filled], 1.0, atol=1e-4)  # the five categories add up in every bin
    assert np.asarray(s["layers"]).shape == (1, config.analyze.bins)  # the micro model has one decoder layer
  single = summary["results"]["base/single"]
  assert np.all(np.asarray(single["curves"]["other_images"])[np.isfinite(single["curves"]["text"])] == 0)
  # the same weights under two names: the same numbers
  assert summary["results"]["base/multi"]["curves"] == summary["results"]["latest/multi"]["curves"]
  assert set(results["analyze"]) >= {"base/single/image_start", "latest/multi/image_end"}
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert logged["stage"] == "analyze" and "analyze/base/multi/image/start" in logged
  assert "analyze/latest/single/all_images/before_view" in logged and "analyze/seconds" in logged
  report = open(os.path.join(workdir, "report.md")).read()
  assert "## RL (GRPO)\n\nthe run's own section" in report and "## Attention analysis" in report
  assert "![progress](analyze/attention_progress.png)" in report


def test_no_questions_in_a_subset_is_a_clear_error(finished, tmp_path):
  config, _, _ = finished
  config = config.copy_and_resolve_references()
  config.data.images_per_question = "2,2"
  with pytest.raises(ValueError, match="no single questions among the first"):
    main.run(config, str(tmp_path))
