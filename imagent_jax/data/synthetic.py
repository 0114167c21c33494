"""Procedural images. Seeded, numpy + PIL only, no files: the embedded default needs no download."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 170), "orange": (240, 130, 30), "black": (20, 20, 20), "white": (245, 245, 245)}


def random_scene(rng: np.random.Generator, height: int, width: int, num_shapes: int = 6,
                 exclude: tuple[str, ...] = ()) -> Image.Image:
  """An RGB ``height x width`` image: a soft background gradient with random coloured shapes.

  ``exclude``: palette colours the shapes must not use.
  """
  y = np.linspace(0, 1, height)[:, None, None]
  x = np.linspace(0, 1, width)[None, :, None]
  c0, c1 = rng.uniform(90, 200, size=(2, 3))
  bg = (c0 * (1 - y) + c1 * x).clip(0, 255)
  img = Image.fromarray(np.broadcast_to(bg, (height, width, 3)).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  names = [n for n in PALETTE if n not in exclude]
  for _ in range(num_shapes):
    s = int(rng.integers(max(4, min(height, width) // 12), max(5, min(height, width) // 3)))
    x0, y0 = int(rng.integers(0, max(1, width - s))), int(rng.integers(0, max(1, height - s)))
    color = PALETTE[names[int(rng.integers(len(names)))]]
    if rng.random() < 0.5:
      draw.ellipse([x0, y0, x0 + s, y0 + s], fill=color)
    else:
      draw.rectangle([x0, y0, x0 + s, y0 + s], fill=color)
  return img


def odd_one_out(rng: np.random.Generator, num_images: int, min_side: int, max_side: int,
                mark_side: int = 10) -> dict:
  """A fine-grained multi-image question: which image holds a small mark of a given colour?

  Every image gets a few large distractor shapes; exactly one gets a ``mark_side``-pixel square of
  the target colour, too small to be sure of at a coarse view. Returns a dict with ``images``,
  ``question``, ``options`` (``"Image k"``), ``answer`` (the option letter), ``target_image``
  (0-based) and ``target_box`` (``[x0, y0, x1, y1]`` in that image's own pixels).
  """
  names = [n for n in PALETTE if n not in ("white", "black")]
  color = names[int(rng.integers(len(names)))]
  target = int(rng.integers(num_images))
  images, box = [], None
  for k in range(num_images):
    h, w = (int(rng.integers(min_side, max_side + 1)) for _ in range(2))
    img = random_scene(rng, h, w, num_shapes=3, exclude=(color,))
    if k == target:
      x0, y0 = int(rng.integers(0, max(1, w - mark_side))), int(rng.integers(0, max(1, h - mark_side)))
      box = [x0, y0, x0 + mark_side, y0 + mark_side]
      ImageDraw.Draw(img).rectangle([x0, y0, x0 + mark_side - 1, y0 + mark_side - 1], fill=PALETTE[color])
    images.append(img)
  options = [f"Image {k + 1}" for k in range(num_images)]
  return dict(images=images, question=f"Which image contains a small {color} square?", options=options,
              answer="ABCDEFGH"[target], target_image=target, target_box=box)
