"""Procedural images. Seeded, numpy + PIL only, no files: the embedded default needs no download."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170), "orange": (240, 130, 30), "black": (20, 20, 20), "white": (245, 245, 245)}


def random_scene(rng: np.random.Generator, height: int, width: int, num_shapes: int = 6) -> Image.Image:
  """An RGB ``height x width`` image: a soft background gradient with random coloured shapes."""
  y = np.linspace(0, 1, height)[:, None, None]
  x = np.linspace(0, 1, width)[None, :, None]
  c0, c1 = rng.uniform(90, 200, size=(2, 3))
  bg = (c0 * (1 - y) + c1 * x).clip(0, 255)
  img = Image.fromarray(np.broadcast_to(bg, (height, width, 3)).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  names = list(PALETTE)
  for _ in range(num_shapes):
    s = int(rng.integers(max(4, min(height, width) // 12), max(5, min(height, width) // 3)))
    x0, y0 = int(rng.integers(0, max(1, width - s))), int(rng.integers(0, max(1, height - s)))
    color = PALETTE[names[int(rng.integers(len(names)))]]
    if rng.random() < 0.5:
      draw.ellipse([x0, y0, x0 + s, y0 + s], fill=color)
    else:
      draw.rectangle([x0, y0, x0 + s, y0 + s], fill=color)
  return img
