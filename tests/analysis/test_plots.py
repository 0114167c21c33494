"""imagent_jax.analysis.plots: the smoothing the curves use, and the curves themselves."""

import math

import numpy as np

from imagent_jax.analysis import plots


def test_trailing_mean_by_hand():
  got = plots.trailing_mean([1.0, 3.0, float("nan"), 5.0, float("nan"), float("nan")], 2)
  want = [1.0, 2.0, 3.0, 5.0, 5.0, float("nan")]  # NaNs skipped; a window of NaNs gives NaN
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert (math.isnan(g) and math.isnan(w)) or g == w
  np.testing.assert_array_equal(plots.trailing_mean([4.0, 2.0, 6.0], 1), [4.0, 2.0, 6.0])


def test_training_curves_with_missing_and_nan_values(tmp_path):
  train = [{"step": s, "reward": 0.1 * s, "confirm_on_target": float("nan") if s % 2 else 0.5,
            "status/truncated": 0.0} for s in range(1, 30)]
  evals = [{"step": 0, "eval/accuracy": 0.25}, {"step": 29, "eval/accuracy": 0.5}]
  path = plots.plot_training_curves(train, evals, str(tmp_path / "curves.png"))
  assert path.endswith("curves.png") and (tmp_path / "curves.png").stat().st_size > 10_000


def test_attention_figures_with_nan_bins_empty_maps_and_no_views(tmp_path):
  curves = {("base", "single"): {"text": [0.8, np.nan], "image": [0.2, np.nan], "generated": [0.0, np.nan]},
            ("rl", "single"): {"text": [0.7, 0.5], "image": [0.2, 0.1], "generated": [0.1, 0.2],
                               "tool_views": [0.0, 0.2]}}
  assert plots.plot_attention_progress(curves, str(tmp_path / "p.png")).endswith("p.png")
  maps = {("base", "single"): np.array([[0.1, np.nan], [0.2, 0.3]]), ("rl", "single"): np.zeros((0, 2))}
  plots.plot_layer_progress(maps, str(tmp_path / "l.png"))
  around = {"base": {"image": {"before": np.nan, "after": np.nan, "views": 0}},
            "rl": {"image": {"before": 0.1, "after": 0.2, "views": 3}}}
  plots.plot_around_views(around, str(tmp_path / "v.png"), categories=("image",))
  for name in ("p.png", "l.png", "v.png"):
    assert (tmp_path / name).stat().st_size > 5_000
