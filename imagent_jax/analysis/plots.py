"""Plots written next to ``report.md``. matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def trailing_mean(values, window: int):
  """``[N]`` → ``[N]``: the mean of each value and the ``window - 1`` before it, NaNs skipped (NaN
  where a window holds none)."""
  v = np.asarray(values, np.float64)
  out = np.full(v.shape, np.nan)
  for i in range(len(v)):
    w = v[max(0, i - window + 1):i + 1]
    w = w[np.isfinite(w)]
    if w.size:
      out[i] = w.mean()
  return out


def plot_training_curves(train: list[dict], evals: list[dict], path: str, smooth: int = 10) -> str:
  """Reward, accuracy, tool use and masks per RL step: each training-batch number faint, with its
  ``smooth``-step trailing mean (``trailing_mean``) drawn over it; evaluation points as markers."""
  plt = _pyplot()
  panels = [("reward", ["reward", "reward/tool_gain"]), ("accuracy", ["accuracy", "eval/accuracy"]),
            ("tool calls per trajectory", ["tool_calls_per_trajectory", "image_calls_per_trajectory",
                                           "failed_calls_per_trajectory", "eval/tool_calls_per_trajectory"]),
            ("masks (fractions)", ["mask/kept_fraction", "status/truncated", "status/turn_limit"]),
            ("where zooms go (fractions)", ["confirm_on_target", "confirm_on_target_chance", "confirm_on_image",
                                            "confirm_on_image_chance"])]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6))
  for ax, (title, keys) in zip(axes, panels):
    for key in keys:
      is_eval = key.startswith("eval/")
      pts = [(r["step"], r[key]) for r in (evals if is_eval else train) if r.get(key) is not None]
      if not pts:
        continue
      xs, ys = zip(*pts)
      style = "--" if key.endswith("_chance") else "-"
      if is_eval:
        ax.plot(xs, ys, marker="o", label=key + " (greedy)", lw=1.5)
        continue
      line, = ax.plot(xs, trailing_mean(ys, smooth), style, label=key, lw=1.6)
      if not key.endswith("_chance"):
        ax.plot(xs, ys, style, color=line.get_color(), lw=0.6, alpha=0.25)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  fig.suptitle(f"RL curves: training batches (faint: each step; line: {smooth}-step mean), evaluation (markers)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
