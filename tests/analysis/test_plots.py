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
