"""How hard the synthetic questions are: ``DifficultyConfig``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from imagent_jax.data.synthetic.categories import CATEGORIES, OPTION_LETTERS
from imagent_jax.data.synthetic.scenes import GAP, GLYPH_HEIGHT, MARGIN, mark_extent

OPTION_ORDERS = ("random", "canonical")


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
    cell = mark_extent("triangle", m1) + GAP
    if (self.max_count + 1) * cell * cell * 3 > self.cluster_side ** 2:
      problems.append(f"cluster_side={self.cluster_side} is too small for {self.max_count + 1} marks of up to "
                      f"{mark_extent('triangle', m1)} pixels; use at least "
                      f"{math.ceil(cell * math.sqrt(3 * (self.max_count + 1)))}")
    if not max(64, self.cluster_side + 2 * MARGIN) <= s0 <= s1:
      problems.append(f"image_side={self.image_side} must satisfy max(64, cluster_side + {2 * MARGIN}) <= "
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
    detail = max(base.mark_size[1], GLYPH_HEIGHT * base.glyph_scale)
    min_side = math.ceil(math.sqrt(max_pixels) * detail / base_detail_px)
    if "image_side" in overrides:  # sizes given: only raised where they are too small
      lo, hi = overrides["image_side"]
      return dataclasses.replace(base, image_side=(max(lo, min_side), max(hi, lo, min_side)))
    return dataclasses.replace(base, image_side=(min_side, round(min_side * aspect_spread)))
