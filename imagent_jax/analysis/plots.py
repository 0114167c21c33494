"""Plots written next to ``report.md``. matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import numpy as np


def figure(nrows: int = 1, ncols: int = 1, *, figsize=None, **subplots_kw):
  """``(fig, axes)`` of a ``matplotlib.figure.Figure`` of ``nrows x ncols`` panels (``Figure.subplots``).

  No pyplot and no backend switch: the plots write PNGs anywhere (no display needed) and leave a
  notebook's inline backend as it is. ``fig.savefig(path)`` writes it; nothing needs closing.
  """
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, **subplots_kw)


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
  panels = [("reward", ["reward", "reward/tool_gain"]), ("accuracy", ["accuracy", "eval/accuracy"]),
            ("tool calls per trajectory", ["tool_calls_per_trajectory", "image_calls_per_trajectory",
                                           "failed_calls_per_trajectory", "eval/tool_calls_per_trajectory"]),
            ("masks (fractions)", ["mask/kept_fraction", "status/truncated", "status/turn_limit"]),
            ("where zooms go (fractions)", ["confirm_on_target", "confirm_on_target_chance", "confirm_on_image",
                                            "confirm_on_image_chance"])]
  fig, axes = figure(1, len(panels), figsize=(4.0 * len(panels), 3.6))
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
  return path


# --------------------------------------------------------------------------- attention analysis

_CATEGORY_COLORS = {"text": "tab:blue", "image": "tab:red", "generated": "tab:green", "tool_views": "tab:purple",
                    "tool_text": "tab:gray", "all_images": "tab:orange", "asked_image": "darkred",
                    "other_images": "salmon", "asked_views": "indigo"}


def plot_attention_progress(curves: dict, path: str, *, categories=("text", "image", "generated", "tool_views"),
                            title: str = "") -> str:
  """The paper's Figure 1: share of each generated token's attention per category against generation progress.

  Args:
    curves: ``{(checkpoint, subset): {category: [bins]}}`` (``trajectory_attention.progress_curves``);
      one panel per subset (columns) and checkpoint (rows).
    path: the PNG to write.
    categories: the lines drawn.
    title: the figure title.
  """
  checkpoints = list(dict.fromkeys(k[0] for k in curves))
  subsets = list(dict.fromkeys(k[1] for k in curves))
  fig, axes = figure(len(checkpoints), len(subsets), figsize=(4.2 * len(subsets), 3.2 * len(checkpoints)),
                           squeeze=False, sharey=True)
  for i, ckpt in enumerate(checkpoints):
    for j, subset in enumerate(subsets):
      ax = axes[i][j]
      data = curves.get((ckpt, subset), {})
      for name in categories:
        values = np.asarray(data.get(name, []), np.float64)
        if values.size and np.isfinite(values).any():
          xs = (np.arange(values.size) + 0.5) / values.size
          ax.plot(xs, values, marker="o", ms=3, color=_CATEGORY_COLORS.get(name), label=name)
      ax.set_title(f"{ckpt}, {subset}", fontsize=10)
      ax.set_xlim(0, 1)
      ax.set_ylim(0, 1)
      ax.grid(alpha=0.3)
      if i == len(checkpoints) - 1:
        ax.set_xlabel("generation progress")
      if j == 0:
        ax.set_ylabel("share of attention")
      if ax.lines:
        ax.legend(fontsize=7)
  fig.suptitle(title or "Where each generated token's attention goes (mean over layers and heads)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  return path


def plot_layer_progress(maps: dict, path: str, *, category: str = "all_images") -> str:
  """Heatmaps of one category's share per layer (rows) against generation progress (columns).

  Args:
    maps: ``{(checkpoint, subset): [layers, bins]}`` (``trajectory_attention.layer_progress``).
    path: the PNG to write.
    category: what the maps show (for the title).
  """
  keys = list(maps)
  fig, axes = figure(1, max(len(keys), 1), figsize=(3.6 * max(len(keys), 1), 3.2), squeeze=False)
  vmax = max([float(np.nanmax(m)) for m in maps.values() if np.size(m) and np.isfinite(m).any()] or [1.0])
  for ax, key in zip(axes[0], keys):
    m = np.asarray(maps[key], np.float64)
    if not m.size:
      ax.set_axis_off()
      continue
    im = ax.imshow(m, aspect="auto", origin="lower", vmin=0.0, vmax=vmax, cmap="viridis",
                   extent=(0, 1, -0.5, m.shape[0] - 0.5))
    ax.set_title(f"{key[0]}, {key[1]}", fontsize=9)
    ax.set_xlabel("generation progress")
    ax.set_ylabel("layer")
    ax.set_yticks(range(m.shape[0]))
    fig.colorbar(im, ax=ax, fraction=0.046)
  fig.suptitle(f"Share of attention on {category.replace('_', ' ')}, per layer", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  return path


def plot_around_views(around: dict, path: str, *, categories=("image", "all_images", "asked_image", "generated")) -> str:
  """Bars of the attention shares just before and just after a tool view enters the context.

  Args:
    around: ``{label: {category: {"before", "after", "views"}}}`` (``trajectory_attention.around_views``).
    path: the PNG to write.
    categories: the bar groups.
  """
  labels = list(around)
  fig, axes = figure(1, max(len(labels), 1), figsize=(4.2 * max(len(labels), 1), 3.2), squeeze=False,
                           sharey=True)
  for ax, label in zip(axes[0], labels):
    data = around[label]
    xs = np.arange(len(categories))
    before = [data.get(c, {}).get("before", np.nan) for c in categories]
    after = [data.get(c, {}).get("after", np.nan) for c in categories]
    ax.bar(xs - 0.2, before, width=0.4, label="before the view", color="tab:gray")
    ax.bar(xs + 0.2, after, width=0.4, label="after the view", color="tab:purple")
    ax.set_xticks(xs, [c.replace("_", " ") for c in categories], fontsize=8)
    views = max([data.get(c, {}).get("views", 0) for c in categories] or [0])
    ax.set_title(f"{label} ({views} views)", fontsize=9)
    if not views:
      ax.text(0.5, 0.5, "no tool view entered", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("share of attention")
  fig.suptitle("Attention of the generated tokens just before / after a tool view enters", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  return path
