"""Drawing the synthetic images: the palette, small marks of equal ink, glyph tags, mosaics, and
``Scene``, the images of one question while they are drawn. numpy + PIL only, no files.

Images are drawn in a fixed palette without anti-aliasing (``"P"`` mode), which makes their PNGs
small and fast to write. Every small mark is saturated and shows at the base view as a blob of
colour, so the model can see *where* to look but not *what* is there; marks of different shapes
carry the same amount of ink (equal-ink sizes), so the blob's strength does not give the shape
away.

``random_scene`` is a quick procedural scene for demos and model tests.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
  from imagent_jax.data.synthetic.difficulty import DifficultyConfig

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


MARK_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "cross")
# Share of its bounding square each shape covers as PIL draws it at 5-10 px (measured); a mark of
# equal-ink size s is drawn with extent s / sqrt(fraction), so every shape carries the same ink.
_INK_FRACTION = {"circle": 0.77, "square": 1.0, "triangle": 0.53, "cross": 0.55}
DIGITS = "0123456789"
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: too close to 1, 0 and each other

_BACKGROUNDS = {"grey": (200, 200, 200), "sand": (214, 204, 182), "slate": (184, 198, 212),
                "sage": (196, 212, 188), "rose": (218, 196, 200), "stone": (176, 176, 186),
                "mist": (206, 214, 222), "clay": (204, 186, 170)}
_TAG_RGB, _INK_RGB = (250, 250, 250), (20, 20, 20)
# The fixed palette of every generated image: backgrounds, mark colours, tag, ink.
_PALETTE_RGB = list(_BACKGROUNDS.values()) + [PALETTE[c] for c in MARK_COLORS] + [_TAG_RGB, _INK_RGB]
_MARK_INDEX = {c: len(_BACKGROUNDS) + i for i, c in enumerate(MARK_COLORS)}
_TAG_INDEX, _INK_INDEX = len(_PALETTE_RGB) - 2, len(_PALETTE_RGB) - 1
_PALETTE_BYTES = bytes(v for rgb in _PALETTE_RGB for v in rgb)
MARGIN = 4  # free pixels between a small mark and the image border
GAP = 3  # free pixels between two small marks
_PLACE_TRIES = 200
_TAG_PROB = 0.4  # chance that an image without a question tag gets a distractor tag
GLYPH_HEIGHT = 7  # ink height of a digit in PIL's default bitmap font (letters: 6)

Box = list  # [x0, y0, x1, y1], ints, x1 / y1 exclusive


def mark_extent(shape: str, size: float) -> int:
  """Drawn side in pixels of a mark of equal-ink size ``size`` (odd for triangles: a true apex)."""
  extent = max(3, round(size / math.sqrt(_INK_FRACTION[shape])))
  return extent + 1 if shape == "triangle" and extent % 2 == 0 else extent


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, extent: int, fill: int) -> None:
  """Draws a small ``shape`` of side ``extent`` with its top-left pixel at ``(x0, y0)``."""
  x1, y1 = x0 + extent - 1, y0 + extent - 1
  if shape == "circle":
    draw.ellipse([x0, y0, x1, y1], fill=fill)
  elif shape == "square":
    draw.rectangle([x0, y0, x1, y1], fill=fill)
  elif shape == "triangle":
    draw.polygon([(x0 + (extent - 1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
  elif shape == "cross":
    t = max(1, round(extent / 3))
    o = (extent - t) // 2
    draw.rectangle([x0 + o, y0, x0 + o + t - 1, y1], fill=fill)
    draw.rectangle([x0, y0 + o, x1, y0 + o + t - 1], fill=fill)
  else:
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=None)
def _glyph_mask(char: str, scale: int) -> Image.Image:
  """The ink of ``char`` in PIL's default bitmap font, cropped tight, scaled by ``scale`` ("L")."""
  if hasattr(ImageFont, "load_default_imagefont"):  # Pillow >= 10.1; before, load_default() is the bitmap font
    font = ImageFont.load_default_imagefont()
  else:
    font = ImageFont.load_default()
  canvas = Image.new("L", (24, 24), 0)
  ImageDraw.Draw(canvas).text((4, 4), char, font=font, fill=255)
  mask = canvas.crop(canvas.getbbox())
  return mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST) if scale > 1 else mask


def sample(rng: np.random.Generator, items: Sequence, n: int) -> list:
  """``n`` distinct items in random order."""
  return [items[int(i)] for i in rng.choice(len(items), size=n, replace=False)]


def pick(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


class Scene:
  """The images of one question while they are drawn: backgrounds, small marks, tags.

  Small items (marks, tags) never overlap: each keeps a ``GAP``-pixel free border. ``ban``
  restricts the distractors that ``fill`` adds later.

  Attributes:
    rng: the example's generator.
    difficulty: the ``DifficultyConfig``.
    images: the palette-mode images.
  """

  def __init__(self, rng: np.random.Generator, sizes: Sequence[tuple[int, int]], difficulty: DifficultyConfig):
    """Draws each ``(width, height)`` image's background and large pale clutter."""
    self.rng = rng
    self.difficulty = difficulty
    self.images: list[Image.Image] = []
    self._draws: list[ImageDraw.ImageDraw] = []
    self._occupied: list[list[tuple[int, int, int, int]]] = []
    self._bans: list[list[tuple[Optional[str], Optional[str]]]] = []
    self._has_tag: list[bool] = []
    for width, height in sizes:
      bg = int(rng.integers(len(_BACKGROUNDS)))
      image = Image.new("P", (width, height), bg)
      image.putpalette(_PALETTE_BYTES)
      draw = ImageDraw.Draw(image)
      for _ in range(difficulty.num_clutter):
        side = int(rng.integers(min(width, height) // 8, min(width, height) // 2 + 1))
        x0 = int(rng.integers(-side // 2, width - side // 2))
        y0 = int(rng.integers(-side // 2, height - side // 2))
        color = (bg + 1 + int(rng.integers(len(_BACKGROUNDS) - 1))) % len(_BACKGROUNDS)
        kind = int(rng.integers(3))
        if kind == 0:
          draw.ellipse([x0, y0, x0 + side, y0 + side * 3 // 4], fill=color)
        elif kind == 1:
          draw.rectangle([x0, y0, x0 + side * 3 // 4, y0 + side], fill=color)
        else:
          draw.polygon([(x0 + side // 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=color)
      self.images.append(image)
      self._draws.append(draw)
      self._occupied.append([])
      self._bans.append([])
      self._has_tag.append(False)

  @property
  def num_images(self) -> int:
    return len(self.images)

  def pick_image(self) -> int:
    """A random image index (0-based)."""
    return int(self.rng.integers(self.num_images))

  def mark_size(self) -> float:
    """A random equal-ink mark size from the difficulty's range."""
    lo, hi = self.difficulty.mark_size
    return float(self.rng.uniform(lo, hi))

  def region(self, k: int, side: int) -> tuple[int, int, int, int]:
    """A random ``side``-pixel square ``(x0, y0, x1, y1)`` inside image ``k``'s margins."""
    width, height = self.images[k].size
    x0 = int(self.rng.integers(MARGIN, width - MARGIN - side + 1))
    y0 = int(self.rng.integers(MARGIN, height - MARGIN - side + 1))
    return x0, y0, x0 + side, y0 + side

  def _place(self, k: int, width: int, height: int,
             region: Optional[tuple[int, int, int, int]]) -> Optional[tuple[int, int]]:
    """A free top-left corner for a ``width x height`` item in image ``k`` (or None)."""
    image = self.images[k]
    rx0, ry0, rx1, ry1 = region or (MARGIN, MARGIN, image.width - MARGIN, image.height - MARGIN)
    if rx1 - rx0 < width or ry1 - ry0 < height:
      return None
    for _ in range(_PLACE_TRIES):
      x0 = int(self.rng.integers(rx0, rx1 - width + 1))
      y0 = int(self.rng.integers(ry0, ry1 - height + 1))
      if all(x0 + width + GAP <= a0 or a1 + GAP <= x0 or y0 + height + GAP <= b0 or b1 + GAP <= y0
             for a0, b0, a1, b1 in self._occupied[k]):
        self._occupied[k].append((x0, y0, x0 + width, y0 + height))
        return x0, y0
    return None

  def add_mark(self, k: int, shape: str, color: str, *, size: Optional[float] = None,
               region: Optional[tuple[int, int, int, int]] = None,
               required: bool = True) -> Optional[tuple[Box, float]]:
    """Draws a small mark into image ``k``.

    Args:
      k: image index.
      shape: one of ``SHAPES``.
      color: one of ``MARK_COLORS``.
      size: equal-ink size; default random.
      region: ``(x0, y0, x1, y1)`` the mark must lie in; default the whole image.
      required: raise when there is no room (else return None).

    Returns:
      ``(box, size)``: the mark's ``[x0, y0, x1, y1]`` and its equal-ink size.
    """
    size = self.mark_size() if size is None else size
    extent = mark_extent(shape, size)
    corner = self._place(k, extent, extent, region)
    if corner is None:
      if required:
        raise RuntimeError(f"no room for a {extent}-pixel mark in image {k} ({self.images[k].size}); "
                           "the DifficultyConfig is too crowded")
      return None
    x0, y0 = corner
    _draw_shape(self._draws[k], shape, x0, y0, extent, _MARK_INDEX[color])
    return [x0, y0, x0 + extent, y0 + extent], size

  def add_tag(self, k: int, text: str, required: bool = True) -> Optional[Box]:
    """Draws a small white tag with a dark glyph ``text`` into image ``k``; returns its box."""
    mask = _glyph_mask(text, self.difficulty.glyph_scale)
    pad = self.difficulty.glyph_scale
    width, height = mask.width + 2 * pad, mask.height + 2 * pad
    corner = self._place(k, width, height, None)
    if corner is None:
      if required:
        raise RuntimeError(f"no room for a tag in image {k}; the DifficultyConfig is too crowded")
      return None
    x0, y0 = corner
    self._draws[k].rectangle([x0, y0, x0 + width - 1, y0 + height - 1], fill=_TAG_INDEX)
    self.images[k].paste(_INK_INDEX, (x0 + pad, y0 + pad, x0 + pad + mask.width, y0 + pad + mask.height), mask)
    self._has_tag[k] = True
    return [x0, y0, x0 + width, y0 + height]

  def add_mosaic(self, k: int, colors: Sequence[str]) -> Box:
    """Draws a 2 x 2 mosaic of ``difficulty.mosaic_square``-pixel squares, ``colors`` in the order
    top-left, top-right, bottom-left, bottom-right, at the centre of image ``k``.

    Its corner is the image centre rounded down to a multiple of the mosaic's side, minus one
    side, so where the base view shrinks the image by exactly that side the mosaic is one
    base-view pixel. Returns its box; nothing else is placed over it.
    """
    side = self.difficulty.mosaic_square
    width, height = self.images[k].size
    x0, y0 = (width // 2) // (2 * side) * (2 * side) - 2 * side, (height // 2) // (2 * side) * (2 * side) - 2 * side
    for i, color in enumerate(colors):
      sx, sy = x0 + (i % 2) * side, y0 + (i // 2) * side
      self._draws[k].rectangle([sx, sy, sx + side - 1, sy + side - 1], fill=_MARK_INDEX[color])
    self._occupied[k].append((x0, y0, x0 + 2 * side, y0 + 2 * side))
    return [x0, y0, x0 + 2 * side, y0 + 2 * side]

  @property
  def glyph_height(self) -> float:
    return float(GLYPH_HEIGHT * self.difficulty.glyph_scale)

  def ban(self, k: int, *, color: Optional[str] = None, shape: Optional[str] = None) -> None:
    """Keeps distractors of ``color`` (any shape), ``shape`` (any colour), or both, out of image ``k``."""
    self._bans[k].append((color, shape))

  def _allowed(self, k: int, shape: str, color: str) -> bool:
    return not any((c is None or c == color) and (s is None or s == shape) for c, s in self._bans[k])

  def fill(self) -> None:
    """Adds the distractors: small marks allowed by the bans, and tags where there is none."""
    kinds = [(s, c) for s in SHAPES for c in MARK_COLORS]
    for k in range(self.num_images):
      allowed = [kc for kc in kinds if self._allowed(k, *kc)]
      for _ in range(self.difficulty.num_distractors if allowed else 0):
        self.add_mark(k, *pick(self.rng, allowed), required=False)
      if not self._has_tag[k] and self.rng.random() < _TAG_PROB:
        self.add_tag(k, pick(self.rng, DIGITS + LETTERS), required=False)
