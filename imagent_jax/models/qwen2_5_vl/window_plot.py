"""Qwen2.5-VL's vision windows drawn on the images: which patches attend to each other in the
windowed blocks (the model stage's ``vision_windows.png``)."""

from __future__ import annotations

import numpy as np

from imagent_jax.analysis import plots
from imagent_jax.models.qwen2_5_vl.model import vision_layout


def window_layout_grid(grid_thw, vision_config) -> list[np.ndarray]:
  """Per image, a ``[h, w]`` map (in patches) of the attention window each patch belongs to.

  Args:
    grid_thw: ``[N, 3]`` grids of the images (``t == 1``).
    vision_config: the model's ``VisionConfig``.

  Returns:
    list of ``N`` int arrays ``[h, w]``, window ids restarting from 0 in every image.
  """
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


def plot_window_layout(images, grid_thw, vision_config, path: str, patch_size: int | None = None) -> str:
  """Draws each (resized) image with its vision-tower attention windows tinted and outlined.

  Window attention is what lets Qwen2.5-VL afford large images; a user reading this sees which
  patches attend to each other in the windowed blocks (the full-attention blocks see the whole
  image).
  """
  import matplotlib
  patch_size = patch_size or vision_config.patch_size
  maps = window_layout_grid(grid_thw, vision_config)
  fig, axes = plots.figure(1, len(maps), figsize=(4 * len(maps), 4), squeeze=False)
  cmap = matplotlib.colormaps["tab20"]
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
  return path
