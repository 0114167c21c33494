"""Procedural images and the synthetic multi-image fine-grained QA task. numpy + PIL only, no files.

Two parts:

* ``random_scene`` / ``odd_one_out``: quick procedural scenes for demos and model tests.
* The **synthetic multi-image fine-grained QA** task (DESIGN §2), the embedded default data set:
  ``generate_example(seed, index, difficulty)`` makes one question over 1-4 images whose answer
  hangs on a detail (a glyph on a tag, the shape or colour of a small mark, a count of small
  marks) that the base view cannot resolve once the processor has shrunk the image to its
  ``max_pixels``, but that a ``confirm`` zoom shows plainly.

Every example is a pure function of ``(seed, index)`` (its own ``numpy`` generator), so any
example can be regenerated alone: generation parallelises trivially and a reader can resume
anywhere. Images are drawn in a fixed palette without anti-aliasing (``"P"`` mode), which makes
their PNGs small and fast to write; ``generate_example`` returns them as RGB by default.

Design against shortcuts: every small mark is saturated and shows at the base view as a blob of
colour, so the model can see *where* to look but not *what* is there. Marks of different shapes
carry the same amount of ink (equal-ink sizes), so the blob's strength does not give the shape
away; the colour asked about appears once per image where its position would give the answer
away (``locate``), and as a fixed number of blobs where the count would (``count``).

Categories (registered with ``register_category``; ``CATEGORIES``):

* ``digit``    "In image 2, what digit is written on the small white tag?"
* ``letter``   "In image 1, what letter is written on the small white tag?"
* ``color``    "In image 3, what color is the small triangle?"
* ``shape``    "In image 2, what shape is the small purple mark?"
* ``locate``   "Which image contains a small blue triangle?" (needs >= 2 images)
* ``count``    "How many small red circles are in image 2?"
* ``mosaic``   "In image 1, what color is the top-left square of the tiny mosaic at the centre?"
  (every image has a 2 x 2 mosaic of four distinct colours at its centre, the options are the
  asked mosaic's colours: the base view's blend of them says nothing; the place is fixed, so a
  model that cannot ground coordinates can still learn where to zoom)

Each example records ``category``, ``target_image`` (0-based) and ``target_box``
(``[x0, y0, x1, y1]`` in that image's own pixels, ``x1``/``y1`` exclusive): the region a good
zoom covers. ``legibility`` measures the answer's detail at the base view and in a zoom.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import struct
import zlib
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imagent_jax.processing import images as images_lib

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


# ============================================================================================
# Synthetic multi-image fine-grained QA.

GENERATOR_VERSION = 2  # bump whenever the same (seed, index, difficulty) would draw other pixels or records
# 2: the mosaic category (its target_box became the top-left square before it landed)
_SALT = 0x51A7E  # keeps these streams apart from other users of small integer seeds

MARK_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "cross")
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Share of its bounding square each shape covers as PIL draws it at 5-10 px (measured); a mark of
# equal-ink size s is drawn with extent s / sqrt(fraction), so every shape carries the same ink.
_INK_FRACTION = {"circle": 0.77, "square": 1.0, "triangle": 0.53, "cross": 0.55}
DIGITS = "0123456789"
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: too close to 1, 0 and each other
OPTION_LETTERS = "ABCD"
OPTION_ORDERS = ("random", "canonical")

_BACKGROUNDS = {"grey": (200, 200, 200), "sand": (214, 204, 182), "slate": (184, 198, 212),
                "sage": (196, 212, 188), "rose": (218, 196, 200), "stone": (176, 176, 186),
                "mist": (206, 214, 222), "clay": (204, 186, 170)}
_TAG_RGB, _INK_RGB = (250, 250, 250), (20, 20, 20)
# The fixed palette of every generated image: backgrounds, mark colours, tag, ink.
_PALETTE_RGB = list(_BACKGROUNDS.values()) + [PALETTE[c] for c in MARK_COLORS] + [_TAG_RGB, _INK_RGB]
_MARK_INDEX = {c: len(_BACKGROUNDS) + i for i, c in enumerate(MARK_COLORS)}
_TAG_INDEX, _INK_INDEX = len(_PALETTE_RGB) - 2, len(_PALETTE_RGB) - 1
_PALETTE_BYTES = bytes(v for rgb in _PALETTE_RGB for v in rgb)
_MARGIN = 4  # free pixels between a small mark and the image border
_GAP = 3  # free pixels between two small marks
HINT_PAD = 8  # pixels of the source image around a hinted (and a warmup call's) target region
_PLACE_TRIES = 200
_TAG_PROB = 0.4  # chance that an image without a question tag gets a distractor tag
_GLYPH_HEIGHT = 7  # ink height of a digit in PIL's default bitmap font (letters: 6)

Box = list  # [x0, y0, x1, y1], ints, x1 / y1 exclusive


@dataclasses.dataclass(frozen=True)
class DifficultyConfig:
  """How hard the synthetic questions are.

  The defaults suit the tiny config's processor (``max_pixels = 28 * 28 * 64``): every image has
  at least 800 x 800 pixels, so the base view shrinks it at least 3.57 times and a 7-pixel detail
  spans under 2 pixels, while a ``confirm`` zoom on the target box magnifies it at least ~3
  times. For another processor use ``DifficultyConfig.for_processor(max_pixels)``.

  Attributes:
    image_side: ``(min, max)`` of each image side in pixels; width and height are drawn
      independently.
    num_images: ``(min, max)`` images per question, within 1..4 (``locate`` needs 2).
    mark_size: ``(min, max)`` equal-ink side of a small mark in pixels (a square of this side
      has the mark's ink; circles, triangles and crosses are drawn larger to match).
    glyph_scale: pixels per pixel of the tag font (PIL's default bitmap font; at 1 a digit is
      7 pixels tall).
    num_distractors: small marks per image that the question is not about.
    num_clutter: large pale shapes drawn on each image's background.
    cluster_side: side of the square region holding the marks of a ``count`` question.
    max_count: the largest answer of a ``count`` question (>= 4; options are four consecutive
      counts).
    mosaic_square: side in pixels of each square of a ``mosaic`` question's 2 x 2 mosaic (>= 1).
      With ``image_side=(896, 896)`` and a 224 x 224 base view (the tiny config's
      ``max_pixels``), the default 2 makes the whole mosaic one base-view pixel and each square
      half of one.
    categories: the categories to draw from, uniformly; empty: all registered ones that fit
      ``num_images``.
    option_order: ``"random"`` (options listed in a random order) or ``"canonical"`` (in a fixed
      order: palette order for colours, ``SHAPES`` order for shapes, ascending for glyphs and
      counts). Canonical order makes the letter a function of what is seen where every option
      set is the whole alphabet (``shape``: four shapes, four letters), which a tiny model
      trained from scratch can learn without first learning to read the option list.
    box_hint_pixels: 0 (default): the question does not say where its detail is. Otherwise the
      question ends with "The detail is at [x0, y0, x1, y1] in image k." (the target region,
      padded by ``HINT_PAD`` pixels, in the pixels of image k shrunk to this many pixels: the
      processor's ``max_pixels``, so the box is in the pixels the model sees and a ``confirm``
      call can copy it). Categories registered with ``hintable=False`` (``locate``, whose
      answer is the image) never get one. A model far too small to ground coordinates can then
      still zoom in the right place; what it must learn is *whether* to.
  """
  image_side: tuple[int, int] = (800, 1216)
  num_images: tuple[int, int] = (1, 4)
  mark_size: tuple[float, float] = (6.0, 7.0)
  glyph_scale: int = 1
  num_distractors: int = 6
  num_clutter: int = 5
  cluster_side: int = 72
  mosaic_square: int = 2
  max_count: int = 5
  categories: tuple[str, ...] = ()
  option_order: str = "random"
  box_hint_pixels: int = 0

  def __post_init__(self):
    for name in ("image_side", "num_images", "mark_size", "categories"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    problems = []
    (s0, s1), (n0, n1), (m0, m1) = self.image_side, self.num_images, self.mark_size
    if not 1 <= n0 <= n1 <= len(OPTION_LETTERS):
      problems.append(f"num_images={self.num_images} must satisfy 1 <= min <= max <= {len(OPTION_LETTERS)}")
    if not 3 <= m0 <= m1:
      problems.append(f"mark_size={self.mark_size} must satisfy 3 <= min <= max")
    if self.mosaic_square < 1:
      problems.append(f"mosaic_square={self.mosaic_square} must be >= 1")
    if self.glyph_scale < 1 or self.num_distractors < 0 or self.num_clutter < 0:
      problems.append("glyph_scale must be >= 1 and num_distractors, num_clutter >= 0")
    if self.max_count < 4:
      problems.append(f"max_count={self.max_count} must be >= 4 (four consecutive counts are offered)")
    cell = _extent("triangle", m1) + _GAP
    if (self.max_count + 1) * cell * cell * 3 > self.cluster_side ** 2:
      problems.append(f"cluster_side={self.cluster_side} is too small for {self.max_count + 1} marks of up to "
                      f"{_extent('triangle', m1)} pixels; use at least "
                      f"{math.ceil(cell * math.sqrt(3 * (self.max_count + 1)))}")
    if not max(64, self.cluster_side + 2 * _MARGIN) <= s0 <= s1:
      problems.append(f"image_side={self.image_side} must satisfy max(64, cluster_side + {2 * _MARGIN}) <= "
                      "min <= max")
    if self.box_hint_pixels < 0:
      problems.append(f"box_hint_pixels={self.box_hint_pixels} must be >= 0 (0: no hint)")
    if self.option_order not in OPTION_ORDERS:
      problems.append(f"option_order={self.option_order!r} must be one of {OPTION_ORDERS}")
    unknown = [c for c in self.categories if c not in CATEGORIES]
    if unknown:
      problems.append(f"unknown categories {unknown}; registered: {sorted(CATEGORIES)}")
    elif not problems and not self.active_categories():
      problems.append(f"no category fits num_images={self.num_images}")
    if problems:
      raise ValueError("invalid DifficultyConfig: " + "; ".join(problems))

  def active_categories(self) -> tuple[str, ...]:
    """The category names drawn from, in a fixed order."""
    names = self.categories or tuple(CATEGORIES)
    return tuple(n for n in names if CATEGORIES[n].min_images <= self.num_images[1])

  def to_dict(self) -> dict[str, Any]:
    """JSON-compatible fields (lists for tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def for_processor(cls, max_pixels: int, *, base_detail_px: float = 2.0, aspect_spread: float = 1.52,
                    **overrides) -> "DifficultyConfig":
    """A difficulty whose smallest images still hide the largest detail at the base view.

    Args:
      max_pixels: the processor's ``max_pixels`` (base view budget).
      base_detail_px: how many base-view pixels the largest detail (mark or glyph) may span.
      aspect_spread: ``image_side`` max over min (when ``image_side`` is not given).
      **overrides: other fields (``mark_size``, ``glyph_scale``, ...); a given ``image_side`` is
        raised where its sides are too small.

    Returns:
      The config, with ``image_side`` chosen so that every image is shrunk enough.
    """
    base = cls(**{k: v for k, v in overrides.items() if k != "image_side"})
    detail = max(base.mark_size[1], _GLYPH_HEIGHT * base.glyph_scale)
    min_side = math.ceil(math.sqrt(max_pixels) * detail / base_detail_px)
    if "image_side" in overrides:  # sizes given: only raised where they are too small
      lo, hi = overrides["image_side"]
      return dataclasses.replace(base, image_side=(max(lo, min_side), max(hi, lo, min_side)))
    return dataclasses.replace(base, image_side=(min_side, round(min_side * aspect_spread)))


# --------------------------------------------------------------------------------------------
# Category registry.


@dataclasses.dataclass(frozen=True)
class Question:
  """What a category function returns.

  Attributes:
    question: the question text (image numbers 1-based, as the prompt labels them).
    options: the multiple-choice options (lettered A, B, ... in this order).
    answer_index: index of the right option.
    target_image: 0-based index of the image holding the answer.
    target_box: ``[x0, y0, x1, y1]`` in that image's pixels: the region to zoom into.
    detail_size: size of the deciding detail in that image's pixels (equal-ink side of a mark,
      ink height of a glyph).
  """
  question: str
  options: list[str]
  answer_index: int
  target_image: int
  target_box: Box
  detail_size: float


@dataclasses.dataclass(frozen=True)
class Category:
  """A registered question category: ``fn(rng, scene) -> Question`` draws into ``scene``."""
  name: str
  min_images: int
  fn: Callable[[np.random.Generator, "Scene"], Question]
  hintable: bool = True
  zoom_pad: int = HINT_PAD
  exact_zoom: bool = False

  def view_box(self, target_box: Box, size: tuple[int, int], shown: tuple[int, int]) -> list:
    """Where a zoom on a detail at ``target_box`` of an image of ``size`` goes, in the image's shown
    pixels ``shown``: the box grown by ``zoom_pad``, exact where ``exact_zoom`` (``view_box``).
    A question's box hint and the warmup's calls both come from here."""
    return view_box(target_box, size, shown, self.zoom_pad, exact=self.exact_zoom)


CATEGORIES: dict[str, Category] = {}


def register_category(name: str, min_images: int = 1, hintable: bool = True, zoom_pad: int = HINT_PAD,
                      exact_zoom: bool = False):
  """Decorator registering ``fn(rng, scene) -> Question`` as question category ``name``.

  The function draws the marks its question is about into ``scene`` (``Scene.add_mark``,
  ``Scene.add_tag``) and bans, per image, the distractors that would make the answer ambiguous
  (``Scene.ban``); the generator then adds the distractors.

  Args:
    name: category name, unique.
    min_images: fewest images the category needs.
    hintable: whether a question may say where its detail is (``DifficultyConfig.box_hint_pixels``);
      False where that gives the answer away.
    zoom_pad: source pixels around ``Question.target_box`` that a zoom on the detail should
      include (``zoom_box``; the warmup's calls use it).
    exact_zoom: ``zoom_box`` keeps fractions of a shown pixel (a detail smaller than one base-view
      pixel can only be isolated so) instead of rounding to whole pixels.
  """
  if name in CATEGORIES:
    raise ValueError(f"category {name!r} is already registered")

  def decorator(fn):
    CATEGORIES[name] = Category(name=name, min_images=min_images, fn=fn, hintable=hintable, zoom_pad=zoom_pad,
                                exact_zoom=exact_zoom)
    return fn

  return decorator


# --------------------------------------------------------------------------------------------
# Drawing.


def _extent(shape: str, size: float) -> int:
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


def _sample(rng: np.random.Generator, items: Sequence, n: int) -> list:
  """``n`` distinct items in random order."""
  return [items[int(i)] for i in rng.choice(len(items), size=n, replace=False)]


def _pick(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


class Scene:
  """The images of one question while they are drawn: backgrounds, small marks, tags.

  Small items (marks, tags) never overlap: each keeps a ``_GAP``-pixel free border. ``ban``
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
    x0 = int(self.rng.integers(_MARGIN, width - _MARGIN - side + 1))
    y0 = int(self.rng.integers(_MARGIN, height - _MARGIN - side + 1))
    return x0, y0, x0 + side, y0 + side

  def _place(self, k: int, width: int, height: int,
             region: Optional[tuple[int, int, int, int]]) -> Optional[tuple[int, int]]:
    """A free top-left corner for a ``width x height`` item in image ``k`` (or None)."""
    image = self.images[k]
    rx0, ry0, rx1, ry1 = region or (_MARGIN, _MARGIN, image.width - _MARGIN, image.height - _MARGIN)
    if rx1 - rx0 < width or ry1 - ry0 < height:
      return None
    for _ in range(_PLACE_TRIES):
      x0 = int(self.rng.integers(rx0, rx1 - width + 1))
      y0 = int(self.rng.integers(ry0, ry1 - height + 1))
      if all(x0 + width + _GAP <= a0 or a1 + _GAP <= x0 or y0 + height + _GAP <= b0 or b1 + _GAP <= y0
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
    extent = _extent(shape, size)
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
    return float(_GLYPH_HEIGHT * self.difficulty.glyph_scale)

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
        self.add_mark(k, *_pick(self.rng, allowed), required=False)
      if not self._has_tag[k] and self.rng.random() < _TAG_PROB:
        self.add_tag(k, _pick(self.rng, DIGITS + LETTERS), required=False)


def _union(boxes: Sequence[Box]) -> Box:
  return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


# --------------------------------------------------------------------------------------------
# The categories.


def _glyph_question(rng: np.random.Generator, scene: Scene, alphabet: str, noun: str) -> Question:
  k = scene.pick_image()
  options = _sample(rng, alphabet, len(OPTION_LETTERS))
  answer = int(rng.integers(len(options)))
  box = scene.add_tag(k, options[answer])
  return Question(f"In image {k + 1}, what {noun} is written on the small white tag?", options, answer, k, box,
                  scene.glyph_height)


@register_category("digit")
def _digit(rng: np.random.Generator, scene: Scene) -> Question:
  """The digit on the one tag of an image."""
  return _glyph_question(rng, scene, DIGITS, "digit")


@register_category("letter")
def _letter(rng: np.random.Generator, scene: Scene) -> Question:
  """The letter on the one tag of an image."""
  return _glyph_question(rng, scene, LETTERS, "letter")


@register_category("color")
def _color(rng: np.random.Generator, scene: Scene) -> Question:
  """The colour of the one mark of a shape; every option colour has a mark in that image."""
  k = scene.pick_image()
  shape = _pick(rng, SHAPES)
  options = _sample(rng, MARK_COLORS, len(OPTION_LETTERS))
  answer = int(rng.integers(len(options)))
  box, size = scene.add_mark(k, shape, options[answer])
  others = [s for s in SHAPES if s != shape]
  for j, color in enumerate(options):
    if j != answer:
      scene.add_mark(k, _pick(rng, others), color)
  scene.ban(k, shape=shape)
  return Question(f"In image {k + 1}, what color is the small {shape}?", options, answer, k, box, size)


@register_category("shape")
def _shape(rng: np.random.Generator, scene: Scene) -> Question:
  """The shape of the one mark of a colour."""
  k = scene.pick_image()
  color = _pick(rng, MARK_COLORS)
  options = _sample(rng, SHAPES, len(OPTION_LETTERS))
  answer = int(rng.integers(len(options)))
  box, size = scene.add_mark(k, options[answer], color)
  scene.ban(k, color=color)
  return Question(f"In image {k + 1}, what shape is the small {color} mark?", options, answer, k, box, size)


@register_category("locate", min_images=2, hintable=False)
def _locate(rng: np.random.Generator, scene: Scene) -> Question:
  """Which image holds a colour-shape pair; every image holds one mark of that colour."""
  k = scene.pick_image()
  color, shape = _pick(rng, MARK_COLORS), _pick(rng, SHAPES)
  others = [s for s in SHAPES if s != shape]
  box, size = None, None
  for j in range(scene.num_images):
    placed = scene.add_mark(j, shape if j == k else _pick(rng, others), color)
    if j == k:
      box, size = placed
    scene.ban(j, color=color)
  options = [f"Image {j + 1}" for j in range(scene.num_images)]
  return Question(f"Which image contains a small {color} {shape}?", options, k, k, box, size)


@register_category("count")
def _count(rng: np.random.Generator, scene: Scene) -> Question:
  """How many marks of a colour-shape pair an image holds.

  The image always shows ``max_count + 1`` marks of the colour, all in one cluster; the others
  have other shapes, so the number of colour blobs at the base view says nothing.
  """
  d = scene.difficulty
  k = scene.pick_image()
  color, shape = _pick(rng, MARK_COLORS), _pick(rng, SHAPES)
  others = [s for s in SHAPES if s != shape]
  count = int(rng.integers(1, d.max_count + 1))
  region = scene.region(k, d.cluster_side)
  boxes, sizes = [], []
  for i in range(d.max_count + 1):
    box, size = scene.add_mark(k, shape if i < count else _pick(rng, others), color, region=region)
    boxes.append(box)
    if i < count:
      sizes.append(size)
  scene.ban(k, color=color)
  start = int(rng.integers(max(1, count - 3), min(count, d.max_count - 3) + 1))
  options = [str(v) for v in range(start, start + len(OPTION_LETTERS))]
  return Question(f"How many small {color} {_PLURALS[shape]} are in image {k + 1}?", options, count - start, k,
                  _union(boxes), min(sizes))


@register_category("mosaic", hintable=False, zoom_pad=0, exact_zoom=True)
def _mosaic(rng: np.random.Generator, scene: Scene) -> Question:
  """The colour of the top-left square of a 2 x 2 mosaic at the centre of an image.

  Every image has such a mosaic of four distinct colours, and the options are the four colours of
  the asked image's mosaic, so the base view, where the mosaic blends into about one pixel, holds
  nothing about the answer; a zoom on the top-left square shows only its colour. The mosaic's
  place is fixed, so a model too small to ground coordinates can learn where to zoom; what it must
  learn is whether to, and on which image. ``target_box`` is the top-left square, smaller than a
  base-view pixel: its zoom box keeps fractions of a pixel (``exact_zoom``), e.g.
  ``[111, 111, 111.5, 111.5]`` for a 896-pixel image shown at 224.
  """
  k = scene.pick_image()
  box, colors = None, []
  for j in range(scene.num_images):
    drawn = _sample(rng, MARK_COLORS, 4)  # top-left first
    x0, y0, _, _ = scene.add_mosaic(j, drawn)
    if j == k:
      side = scene.difficulty.mosaic_square
      box, colors = [x0, y0, x0 + side, y0 + side], drawn
  options = _sample(rng, colors, len(colors))
  return Question(f"In image {k + 1}, what color is the top-left square of the tiny mosaic at the centre?",
                  options, options.index(colors[0]), k, box, float(scene.difficulty.mosaic_square))


def zoom_box(example: dict, size: tuple[int, int], shown: tuple[int, int]) -> list[int]:
  """Where a ``confirm`` zoom on ``example``'s detail goes, in the pixels of its target image
  (``size = (width, height)``) as shown (``shown``): ``view_box`` of the target box grown by its
  category's ``zoom_pad`` (``HINT_PAD`` for an unknown category), exact where the category asks
  (``Category.view_box``)."""
  category = CATEGORIES.get(example.get("category") or "")
  if category is None:
    return view_box(example["target_box"], size, shown, HINT_PAD)
  return category.view_box(example["target_box"], size, shown)


# --------------------------------------------------------------------------------------------
# Examples.

IMAGE_FORMATS = ("rgb", "palette", "png")


SPLITS = ("train", "validation", "test")


def split_seed(seed: int, split: str) -> int:
  """The stream seed of ``split``: ``3 * seed + {train: 0, validation: 1, test: 2}`` (disjoint
  streams for every base seed; the tfds build ``synthetic_mifg`` stores exactly these)."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")
  return 3 * int(seed) + SPLITS.index(split)


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of example ``index`` of stream ``seed`` (independent of every other pair)."""
  for name, value in (("seed", seed), ("index", index)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
  return np.random.default_rng([_SALT, int(seed), int(index)])


def _png_chunk(tag: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: Image.Image) -> bytes:
  """PNG bytes of ``image``; a palette image of <= 16 colours is written fast, as a 4-bit PNG.

  Our own writer for the generator's images (filter "none", zlib run-length strategy) is about
  twice as fast as Pillow's and its files are smaller; any other image goes through Pillow.
  """
  palette = image.getpalette() if image.mode == "P" else None
  if palette is None or len(palette) > 48 or "transparency" in image.info:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
  width, height = image.size
  stride = (width + 1) // 2
  rows = np.zeros((height, stride + 1), np.uint8)  # each scanline: filter byte 0, then 4-bit pixels
  rows[:, 1:] = np.frombuffer(image.tobytes("raw", "P;4"), np.uint8).reshape(height, stride)
  deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 4, zlib.Z_RLE)  # memLevel 4: fastest here
  idat = deflate.compress(rows.tobytes()) + deflate.flush()
  return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 4, 3, 0, 0, 0))
          + _png_chunk(b"PLTE", bytes(palette)) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _canonical_key(option: str) -> tuple:
  for rank, names in enumerate((MARK_COLORS, SHAPES)):
    if option in names:
      return (rank, names.index(option), "")
  return (2, int(option), "") if option.isdigit() else (3, 0, option)


def _canonical_options(q: Question) -> Question:
  """``q`` with its options in canonical order (``DifficultyConfig.option_order``)."""
  order = sorted(range(len(q.options)), key=lambda i: _canonical_key(q.options[i]))
  return dataclasses.replace(q, options=[q.options[i] for i in order], answer_index=order.index(q.answer_index))


def shown_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
  """``(width, height)`` of a ``width x height`` image as a processor with ``max_pixels`` shows it."""
  h, w = images_lib.smart_resize(height, width, min_pixels=images_lib.MIN_PIXELS, max_pixels=max_pixels)
  return w, h


def view_box(box: Box, size: tuple[int, int], shown: tuple[int, int], pad: int = HINT_PAD,
             exact: bool = False) -> list:
  """``box`` (source pixels of an image of ``size = (width, height)``) grown by ``pad`` source
  pixels (clipped to the image) and mapped to the image's shown pixels ``shown = (width, height)``;
  rounded to ints, or with ``exact`` to 2 decimals (ints where whole)."""
  (w0, h0), (ws, hs) = size, shown
  x0, y0, x1, y1 = box
  grown = [max(0, x0 - pad) * ws / w0, max(0, y0 - pad) * hs / h0, min(w0, x1 + pad) * ws / w0,
           min(h0, y1 + pad) * hs / h0]
  if exact:
    return [int(v) if float(v).is_integer() else v for v in (round(v, 2) for v in grown)]
  return [int(round(v)) for v in grown]


def generate_example(seed: int, index: int, difficulty: DifficultyConfig = DifficultyConfig(), *,
                     image_format: str = "rgb") -> dict[str, Any]:
  """Example ``index`` of the synthetic fine-grained QA stream ``seed``; a pure function.

  Args:
    seed: stream seed (>= 0); different seeds give independent streams (the tfds builder gives
      each split its own).
    index: example number (>= 0).
    difficulty: the ``DifficultyConfig``.
    image_format: ``"rgb"`` (PIL RGB images), ``"palette"`` (PIL ``"P"`` images, as drawn) or
      ``"png"`` (PNG bytes of the palette images).

  Returns:
    A dict: ``id`` (``"synthetic:<seed>:<index>"``), ``images`` (1-4), ``question``,
    ``options`` (2-4 strings, lettered A-D), ``answer`` (the right option's letter),
    ``category``, ``target_image`` (0-based), ``target_box`` (``[x0, y0, x1, y1]`` ints in that
    image's pixels, ``x1``/``y1`` exclusive), ``detail_size`` (the deciding detail's size in
    that image's pixels), ``seed`` and ``index``.
  """
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
  rng = example_rng(seed, index)
  names = difficulty.active_categories()
  category = CATEGORIES[names[int(rng.integers(len(names)))]]
  (s0, s1), (n0, n1) = difficulty.image_side, difficulty.num_images
  num_images = int(rng.integers(max(n0, category.min_images), n1 + 1))
  sizes = [(int(rng.integers(s0, s1 + 1)), int(rng.integers(s0, s1 + 1))) for _ in range(num_images)]
  scene = Scene(rng, sizes, difficulty)
  q = category.fn(rng, scene)
  if difficulty.option_order == "canonical":
    q = _canonical_options(q)
  scene.fill()
  if difficulty.box_hint_pixels and category.hintable:
    size = scene.images[q.target_image].size
    box = category.view_box(q.target_box, size, shown_size(*size, difficulty.box_hint_pixels))
    q = dataclasses.replace(q, question=f"{q.question} The detail is at {json.dumps(box)} in image "
                                        f"{q.target_image + 1}.")
  if image_format == "rgb":
    images = [image.convert("RGB") for image in scene.images]
  elif image_format == "png":
    images = [encode_png(image) for image in scene.images]
  else:
    images = scene.images
  return {"id": f"synthetic:{seed}:{index}", "images": images, "question": q.question, "options": list(q.options),
          "answer": OPTION_LETTERS[q.answer_index], "category": category.name, "target_image": q.target_image,
          "target_box": [int(v) for v in q.target_box], "detail_size": q.detail_size, "seed": int(seed),
          "index": int(index)}


def generate_png_example(task: tuple[int, int, DifficultyConfig]) -> dict[str, Any]:
  """``generate_example(seed, index, difficulty, image_format="png")`` of ``task``, for process pools."""
  seed, index, difficulty = task
  return generate_example(seed, index, difficulty, image_format="png")


EXAMPLE_KEYS = ("id", "images", "question", "options", "answer", "category", "target_image", "target_box")


class SyntheticSource:
  """Random-access source of generated examples, no files: element ``i`` is example ``i`` of ``seed``.

  A grain data source (``__len__``, ``__getitem__``) yielding the pipeline's example dicts
  (``EXAMPLE_KEYS``, RGB images). Drawing costs ~10 ms per example at the default sizes; for
  training prefer the tfds build (``builders.build_synthetic``), which draws once.
  """

  def __init__(self, size: int, seed: int = 0, difficulty: DifficultyConfig = DifficultyConfig()):
    if size < 0:
      raise ValueError(f"size must be >= 0, got {size}")
    example_rng(seed, 0)  # validates the seed
    self.size, self.seed, self.difficulty = int(size), int(seed), difficulty
    self.name = f"synthetic:{self.seed}"

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self.size} examples")
    example = generate_example(self.seed, index, self.difficulty)
    return {k: example[k] for k in EXAMPLE_KEYS}

  def __repr__(self) -> str:
    return f"SyntheticSource(size={self.size}, seed={self.seed})"


# --------------------------------------------------------------------------------------------
# What the model sees: base view and zoom.


def base_view_size(width: int, height: int, *, min_pixels: int = images_lib.MIN_PIXELS,
                   max_pixels: int = 28 * 28 * 64) -> tuple[int, int]:
  """``(width, height)`` the processor shows a ``width x height`` image at (``smart_resize``)."""
  h, w = images_lib.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
  return w, h


def base_view(image: Image.Image, *, min_pixels: int = images_lib.MIN_PIXELS,
              max_pixels: int = 28 * 28 * 64) -> Image.Image:
  """The image as the model sees it in its prompt: RGB, resized by ``smart_resize`` (bicubic)."""
  rgb = images_lib.to_rgb(image)
  return rgb.resize(base_view_size(rgb.width, rgb.height, min_pixels=min_pixels, max_pixels=max_pixels),
                    resample=Image.Resampling.BICUBIC)


def zoom_view(image: Image.Image, box: Sequence[float], *, min_pixels: int = images_lib.MIN_PIXELS,
              max_pixels: int = 28 * 28 * 64, view_max_pixels: int = 28 * 28 * 64,
              min_box_side: float = 28.0) -> tuple[Image.Image, tuple[float, float, float, float]]:
  """What ``confirm`` returns for ``box`` (in the image's own pixels), run through the real tool.

  Args:
    image: a full-resolution input image.
    box: ``[x0, y0, x1, y1]`` in ``image``'s pixels.
    min_pixels: the processor's ``min_pixels``.
    max_pixels: the processor's ``max_pixels`` (the base view the model gives boxes in).
    view_max_pixels: the tool view budget.
    min_box_side: the tools' shortest crop side in image pixels.

  Returns:
    ``(view, region)``: the zoomed RGB view and the region of ``image`` it shows (after growing).
  """
  from imagent_jax.agent import protocol, tools  # pylint: disable=g-import-not-at-top

  config = tools.ToolConfig(tools=("confirm",), input_min_pixels=min_pixels, input_max_pixels=max_pixels,
                            view_min_pixels=max(min_pixels, images_lib.MIN_PIXELS), view_max_pixels=view_max_pixels,
                            min_box_side=min_box_side)
  ctx = tools.ToolContext([image], config)
  width, height = ctx.shown_sizes[0]
  sx, sy = width / ctx.views[0].width, height / ctx.views[0].height
  shown = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
  result = tools.run_tool_call(ctx, protocol.ToolCall("confirm", {"image": 1, "bbox_2d": shown}))
  if not result.ok:
    raise ValueError(f"confirm refused box {list(box)}: {result.text}")
  return result.image, ctx.refs[-1].root_box


def legibility(example: dict[str, Any], *, min_pixels: int = images_lib.MIN_PIXELS, max_pixels: int = 28 * 28 * 64,
               view_max_pixels: int = 28 * 28 * 64, min_box_side: float = 28.0) -> dict[str, Any]:
  """How large the deciding detail of a generated example is at the base view and in a zoom.

  The zoom is ``confirm`` on ``target_box``. Sizes are the detail's ``detail_size`` times the
  view's linear scale (geometric mean of the x and y scales).

  Returns:
    ``base_px`` and ``zoom_px`` (detail size in base-view and zoom pixels), ``base_scale`` and
    ``zoom_scale``, and the two views ``base_view`` / ``zoom_view`` of the target image.
  """
  image = example["images"][example["target_image"]]
  width, height = image.size
  bw, bh = base_view_size(width, height, min_pixels=min_pixels, max_pixels=max_pixels)
  base_scale = math.sqrt(bw / width * bh / height)
  zoom, (x0, y0, x1, y1) = zoom_view(image, example["target_box"], min_pixels=min_pixels, max_pixels=max_pixels,
                                     view_max_pixels=view_max_pixels, min_box_side=min_box_side)
  zoom_scale = math.sqrt(zoom.width / (x1 - x0) * zoom.height / (y1 - y0))
  detail = float(example["detail_size"])
  return {"base_px": detail * base_scale, "zoom_px": detail * zoom_scale, "base_scale": base_scale,
          "zoom_scale": zoom_scale,
          "base_view": base_view(image, min_pixels=min_pixels, max_pixels=max_pixels), "zoom_view": zoom}
