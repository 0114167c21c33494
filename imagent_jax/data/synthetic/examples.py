"""Examples of the synthetic multi-image fine-grained QA task: ``generate_example``, the split
seeds, the PNG encoding of the images, and ``SyntheticSource`` (drawn on the fly).

Every example is a pure function of ``(seed, index)`` (its own ``numpy`` generator), so any
example can be regenerated alone: generation parallelises trivially and a reader can resume
anywhere. ``generate_example`` returns the images as RGB by default; ``"png"`` writes the palette
images with our own fast 4-bit PNG writer (the tfds build stores those bytes).
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from imagent_jax.data.synthetic.categories import CATEGORIES, OPTION_LETTERS, Question
from imagent_jax.data.synthetic.difficulty import DifficultyConfig
from imagent_jax.data.synthetic.scenes import MARK_COLORS, SHAPES, Scene
from imagent_jax.processing import images as images_lib

GENERATOR_VERSION = 2  # bump whenever the same (seed, index, difficulty) would draw other pixels or records
# 2: the mosaic category (its target_box became the top-left square before it landed)
_SALT = 0x51A7E  # keeps these streams apart from other users of small integer seeds

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
  training prefer the tfds build (``data.tfds.build_synthetic``), which draws once.
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
