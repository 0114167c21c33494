"""The question categories of the synthetic fine-grained QA task, a registry of them, and where a
zoom on a question's detail goes.

A category is one registered function ``fn(rng, scene) -> Question`` that draws the marks its
question is about into the ``Scene`` and bans the distractors that would make the answer
ambiguous; the generator then adds the distractors (``examples.generate_example``). The colour
asked about appears once per image where its position would give the answer away (``locate``),
and as a fixed number of blobs where the count would (``count``). Registered (``CATEGORIES``, in
this order):

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
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from imagent_jax.data.synthetic.scenes import DIGITS, LETTERS, MARK_COLORS, SHAPES, Box, Scene, pick, sample
from imagent_jax.registry import Registry

_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
OPTION_LETTERS = "ABCD"
HINT_PAD = 8  # pixels of the source image around a hinted (and a warmup call's) target region


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


CATEGORIES: Registry[Category] = Registry("question category")  # in registration order (the draw's order)


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
    CATEGORIES.add(name, Category(name=name, min_images=min_images, fn=fn, hintable=hintable, zoom_pad=zoom_pad,
                                  exact_zoom=exact_zoom))
    return fn

  return decorator


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


def _union(boxes: Sequence[Box]) -> Box:
  return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


# --------------------------------------------------------------------------------------------
# The categories.


def _glyph_question(rng: np.random.Generator, scene: Scene, alphabet: str, noun: str) -> Question:
  k = scene.pick_image()
  options = sample(rng, alphabet, len(OPTION_LETTERS))
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
  shape = pick(rng, SHAPES)
  options = sample(rng, MARK_COLORS, len(OPTION_LETTERS))
  answer = int(rng.integers(len(options)))
  box, size = scene.add_mark(k, shape, options[answer])
  others = [s for s in SHAPES if s != shape]
  for j, color in enumerate(options):
    if j != answer:
      scene.add_mark(k, pick(rng, others), color)
  scene.ban(k, shape=shape)
  return Question(f"In image {k + 1}, what color is the small {shape}?", options, answer, k, box, size)


@register_category("shape")
def _shape(rng: np.random.Generator, scene: Scene) -> Question:
  """The shape of the one mark of a colour."""
  k = scene.pick_image()
  color = pick(rng, MARK_COLORS)
  options = sample(rng, SHAPES, len(OPTION_LETTERS))
  answer = int(rng.integers(len(options)))
  box, size = scene.add_mark(k, options[answer], color)
  scene.ban(k, color=color)
  return Question(f"In image {k + 1}, what shape is the small {color} mark?", options, answer, k, box, size)


@register_category("locate", min_images=2, hintable=False)
def _locate(rng: np.random.Generator, scene: Scene) -> Question:
  """Which image holds a colour-shape pair; every image holds one mark of that colour."""
  k = scene.pick_image()
  color, shape = pick(rng, MARK_COLORS), pick(rng, SHAPES)
  others = [s for s in SHAPES if s != shape]
  box, size = None, None
  for j in range(scene.num_images):
    placed = scene.add_mark(j, shape if j == k else pick(rng, others), color)
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
  color, shape = pick(rng, MARK_COLORS), pick(rng, SHAPES)
  others = [s for s in SHAPES if s != shape]
  count = int(rng.integers(1, d.max_count + 1))
  region = scene.region(k, d.cluster_side)
  boxes, sizes = [], []
  for i in range(d.max_count + 1):
    box, size = scene.add_mark(k, shape if i < count else pick(rng, others), color, region=region)
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
    drawn = sample(rng, MARK_COLORS, 4)  # top-left first
    x0, y0, _, _ = scene.add_mosaic(j, drawn)
    if j == k:
      side = scene.difficulty.mosaic_square
      box, colors = [x0, y0, x0 + side, y0 + side], drawn
  options = sample(rng, colors, len(colors))
  return Question(f"In image {k + 1}, what color is the top-left square of the tiny mosaic at the centre?",
                  options, options.index(colors[0]), k, box, float(scene.difficulty.mosaic_square))


def zoom_box(example: dict, size: tuple[int, int], shown: tuple[int, int]) -> list[int]:
  """Where a ``confirm`` zoom on ``example``'s detail goes, in the pixels of its target image
  (``size = (width, height)``) as shown (``shown``): ``view_box`` of the target box grown by its
  category's ``zoom_pad`` (``HINT_PAD`` for an unknown category), exact where the category asks
  (``Category.view_box``)."""
  name = example.get("category") or ""
  if name not in CATEGORIES:
    return view_box(example["target_box"], size, shown, HINT_PAD)
  return CATEGORIES[name].view_box(example["target_box"], size, shown)
