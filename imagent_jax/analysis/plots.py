"""Plots written next to ``report.md``. matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def window_layout_grid(grid_thw, vision_config) -> list[np.ndarray]:
  """Per image, a ``[h, w]`` map (in patches) of the attention window each patch belongs to.

  Args:
    grid_thw: ``[N, 3]`` grids of the images (``t == 1``).
    vision_config: the model's ``VisionConfig``.

  Returns:
    list of ``N`` int arrays ``[h, w]``, window ids restarting from 0 in every image.
  """
  from imagent_jax.models.qwen2_5_vl import vision_layout

  grid_thw = np.asarray(grid_thw)
  total = int(grid_thw.prod(-1).sum())
  lay = {k: np.asarray(v) for k, v in vision_layout(grid_thw, total, vision_config).items()}
  window = np.empty(total, np.int64)
  window[lay["perm"]] = lay["window_seg"]
  rows = np.empty(total, np.int64)
  cols = np.empty(total, np.int64)
  rows[lay["perm"]], cols[lay["perm"]] = lay["row"], lay["col"]
  maps, start = [], 0
  for t, h, w in grid_thw:
    n = int(t * h * w)
    m = np.zeros((h, w), np.int64)
    sl = slice(start, start + int(h * w))  # first frame
    m[rows[sl], cols[sl]] = window[sl] - window[sl].min()
    maps.append(m)
    start += n
  return maps


def plot_window_layout(images, grid_thw, vision_config, path: str, patch_size: int = 14) -> str:
  """Draws each (resized) image with its vision-tower attention windows tinted and outlined.

  Window attention is what lets Qwen2.5-VL afford large images; a user reading this sees which
  patches attend to each other in the windowed blocks (the full-attention blocks see the whole
  image).
  """
  plt = _pyplot()
  maps = window_layout_grid(grid_thw, vision_config)
  fig, axes = plt.subplots(1, len(maps), figsize=(4 * len(maps), 4), squeeze=False)
  cmap = plt.get_cmap("tab20")
  for ax, img, wmap, (t, h, w) in zip(axes[0], images, maps, np.asarray(grid_thw)):
    img = np.asarray(img.convert("RGB").resize((w * patch_size, h * patch_size)))
    tint = cmap(wmap % 20)[..., :3].repeat(patch_size, 0).repeat(patch_size, 1)
    ax.imshow((0.6 * img / 255.0 + 0.4 * tint).clip(0, 1))
    ax.set_title(f"{h}x{w} patches, {wmap.max() + 1} windows")
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle("Vision windows (window attention; full attention in fullatt blocks)")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def plot_training_curves(train: list[dict], evals: list[dict], path: str) -> str:
  """Reward, accuracy and tool use per RL step (training batches, and evaluation when present)."""
  plt = _pyplot()
  panels = [("reward", ["reward", "reward/tool_gain"]), ("accuracy", ["accuracy", "eval/accuracy"]),
            ("tool calls per trajectory", ["tool_calls_per_trajectory", "image_calls_per_trajectory",
                                           "failed_calls_per_trajectory", "eval/tool_calls_per_trajectory"]),
            ("masks and zooms (fractions)", ["mask/kept_fraction", "status/truncated", "status/turn_limit",
                                             "confirm_on_target", "confirm_on_image"])]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
  for ax, (title, keys) in zip(axes, panels):
    for key in keys:
      rows = evals if key.startswith("eval/") else train
      pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, label=key, lw=1.5)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
