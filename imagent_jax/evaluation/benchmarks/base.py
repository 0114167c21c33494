"""What every benchmark reader shares: the ``Example`` it returns, lazy images, errors, the
option orders (seeded shuffles, rotations) and the default aggregation.

A reader turns a benchmark's folder, exactly as published, into ``Example`` s in the file's own
order and option order (``Benchmark.read``); ``benchmarks.load`` then reorders the options.
Images stay on disk (or in the file's bytes) until ``Example.images`` is read: V*'s and HR-Bench's
images are 2K to 8K pixels wide and MME-RealWorld has tens of thousands of them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import zlib
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from imagent_jax.processing import images as images_lib

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OPTION_ORDERS = ("shuffled", "as_published")


class BenchmarkError(ValueError):
  """A malformed benchmark file or record: ``<file>: record <record>: <message>``.

  Attributes:
    path: the file (or folder) at fault.
    record: the record's id, row or line (None: the file as a whole).
    message: what is wrong.
  """

  def __init__(self, path: str, record: Any, message: str):
    where = f"{path}: record {record}" if record is not None else str(path)
    super().__init__(f"{where}: {message}")
    self.path, self.record, self.message = str(path), record, message


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """Where one image of an example is: a file, raw bytes, or base64 text (decoded when opened).

  Attributes:
    name: what error messages call it (the file, or ``<file>:<record>`` for embedded images).
    path: an image file.
    data: the encoded image bytes.
    b64: the encoded image as base64 text (HR-Bench's and VLMEvalKit's TSV files).
  """
  name: str
  path: Optional[str] = None
  data: Optional[bytes] = None
  b64: Optional[str] = None

  def encoded(self) -> bytes:
    """The encoded image bytes; ``BenchmarkError`` if they cannot be had."""
    if self.data is not None:
      return self.data
    if self.b64 is not None:
      try:
        return base64.b64decode(self.b64, validate=False)
      except (binascii.Error, ValueError) as e:
        raise BenchmarkError(self.name, None, f"the image is not valid base64 ({e})") from None
    if self.path is None:
      raise BenchmarkError(self.name, None, "an image reference needs a path, bytes or base64 text")
    try:
      with open(self.path, "rb") as f:
        return f.read()
    except OSError as e:
      raise BenchmarkError(self.path, None, f"cannot read the image ({e.strerror or e})") from None

  def open(self, max_pixels: Optional[int] = None) -> Image.Image:
    """The image, decoded as RGB with its EXIF orientation applied (``processing.images.decode_image``).

    Args:
      max_pixels: most pixels allowed before decoding (None: Pillow's ``MAX_IMAGE_PIXELS``).

    Raises:
      BenchmarkError: empty, not an image, truncated, or over ``max_pixels``.
    """
    try:
      return images_lib.decode_image(self.encoded(), max_pixels)
    except images_lib.ImageDecodeError as e:
      raise BenchmarkError(self.name, None, e.message) from None


@dataclasses.dataclass(frozen=True)
class Example:
  """One benchmark question, as every reader returns it.

  Attributes:
    id: the benchmark's own question id, as a string (unique within a benchmark and split).
    question: the question text, without the options and without an answer-format instruction.
    options: the option texts in this example's order, without letters ("(A) " or "A. ");
      empty for open questions (our JSONL schema allows them).
    answer: the correct option's letter for ``options`` as listed here ("A" = ``options[0]``);
      for an open question, the gold answer text.
    category: the benchmark's category used by its official aggregation (V*: direct_attributes /
      relative_position; HR-Bench: FSP / FCP; MME-RealWorld: its task; ...).
    image_refs: where the images are (``images`` opens them).
    benchmark: the benchmark's name in ``benchmarks.load``.
    subcategory: a finer grouping where the benchmark has one (MME-RealWorld's subtask).
    target_image: the image (0-based) that holds ``target_boxes`` (-1 when there are none).
    target_boxes: the boxes ``[x0, y0, x1, y1]`` (pixels of ``target_image``) of the objects the
      question is about, where the benchmark publishes them (V*); empty otherwise.
    meta: what the benchmark's official aggregation needs beyond the category.
    option_order: ``options[i]`` is the published option ``option_order[i]`` (the identity when
      the options are as published).
  """
  id: str
  question: str
  options: tuple[str, ...]
  answer: str
  category: str
  image_refs: tuple[ImageRef, ...]
  benchmark: str = ""
  subcategory: str = ""
  target_image: int = -1
  target_boxes: tuple[tuple[float, float, float, float], ...] = ()
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  option_order: tuple[int, ...] = ()

  @property
  def images(self) -> list[Image.Image]:
    """The images, decoded as RGB (each read opens them again; ``BenchmarkError`` on a bad one)."""
    return [ref.open() for ref in self.image_refs]

  @property
  def answer_text(self) -> str:
    """The correct option's text (the answer itself for an open question)."""
    if not self.options:
      return self.answer
    return self.options[LETTERS.index(self.answer)]

  def as_dict(self) -> dict[str, Any]:
    """The example as the agent's example dicts (``data.synthetic.EXAMPLE_KEYS``), images decoded."""
    box = None
    if self.target_boxes:
      x0 = min(b[0] for b in self.target_boxes)
      y0 = min(b[1] for b in self.target_boxes)
      x1 = max(b[2] for b in self.target_boxes)
      y1 = max(b[3] for b in self.target_boxes)
      box = [x0, y0, x1, y1]
    return {"id": self.id, "images": self.images, "question": self.question,
            "options": list(self.options) or None, "answer": self.answer, "category": self.category,
            "target_image": self.target_image, "target_box": box}


def make_example(*, id: Any, question: str, options: Sequence[str], answer: str, category: str,  # pylint: disable=redefined-builtin
                 image_refs: Sequence[ImageRef], where: tuple[str, Any], **extra) -> Example:
  """An ``Example`` checked for the contract every reader keeps, or a ``BenchmarkError``.

  Args:
    id, question, options, answer, category, image_refs: the fields (options without letters;
      ``answer`` a letter of them, or the gold text when there are no options).
    where: ``(file, record)`` named by the error of a record that breaks the contract.
    **extra: the other ``Example`` fields.
  """
  path, record = where
  if not isinstance(question, str) or not question.strip():
    raise BenchmarkError(path, record, "the question is empty")
  options = tuple(str(o).strip() for o in options)
  if options and (len(options) < 2 or len(options) > len(LETTERS)):
    raise BenchmarkError(path, record, f"needs 2 to {len(LETTERS)} options, got {len(options)}")
  if any(not o for o in options):
    raise BenchmarkError(path, record, f"an option is empty: {list(options)}")
  answer = str(answer).strip()
  if options and answer not in LETTERS[:len(options)]:
    raise BenchmarkError(path, record, f"answer {answer!r} is not one of the option letters "
                                       f"{LETTERS[0]}-{LETTERS[len(options) - 1]}")
  if not answer:
    raise BenchmarkError(path, record, "the answer is empty")
  if not image_refs:
    raise BenchmarkError(path, record, "the question has no image")
  return Example(id=str(id), question=question.strip(), options=options, answer=answer, category=str(category),
                 image_refs=tuple(image_refs), option_order=tuple(range(len(options))), **extra)


def split_lettered(option: str) -> tuple[Optional[str], str]:
  """``"(B) a cat"`` / ``"B. a cat"`` / ``"B: a cat"`` / ``"B) a cat"`` -> ``("B", "a cat")``; text without
  a letter prefix -> ``(None, text)``."""
  s = str(option).strip()
  if len(s) >= 3 and s[0] == "(" and s[1].upper() in LETTERS and s[2] == ")":
    return s[1].upper(), s[3:].strip()
  if len(s) >= 2 and s[0].upper() in LETTERS and s[1] in ".:)" and (len(s) == 2 or s[2].isspace()):
    return s[0].upper(), s[2:].strip()
  return None, s


# ----------------------------------------------------------------------------------------------
# Option orders


def reorder(example: Example, order: Sequence[int]) -> Example:
  """``example`` with its options listed in ``order`` (``new[i] = old[order[i]]``) and the answer
  letter moved with them; ``option_order`` keeps the map to the published order."""
  if not example.options:
    return example
  order = [int(i) for i in order]
  if sorted(order) != list(range(len(example.options))):
    raise ValueError(f"{order} is not a permutation of {len(example.options)} options")
  options = tuple(example.options[i] for i in order)
  gold = LETTERS.index(example.answer)
  answer = LETTERS[order.index(gold)]
  published = tuple(example.option_order[i] for i in order) if example.option_order else tuple(order)
  return dataclasses.replace(example, options=options, answer=answer, option_order=published)


def question_seed(seed: int, benchmark: str, example_id: str) -> list[int]:
  """The seed of one question's permutation: the run's seed and a stable hash of the question
  (crc32 of ``benchmark/id``), so a question's order does not depend on the others or the host."""
  return [int(seed) & 0xFFFFFFFF, zlib.crc32(f"{benchmark}/{example_id}".encode("utf-8"))]


def shuffle_options(example: Example, seed: int = 0) -> Example:
  """``example`` with its options in a seeded per-question random order (the answer moves along)."""
  if len(example.options) < 2:
    return example
  rng = np.random.default_rng(question_seed(seed, example.benchmark, example.id))
  return reorder(example, rng.permutation(len(example.options)).tolist())


def rotations(example: Example) -> list[Example]:
  """The circular evaluation's variants of ``example``: its options rotated by 0, 1, ..., n-1
  places (``id`` gets ``#r<k>``); an open question is its own only variant. A question counts as
  correct under circular evaluation when every rotation is answered correctly."""
  n = len(example.options)
  if n < 2:
    return [example]
  out = []
  for k in range(n):
    rotated = reorder(example, [(i + k) % n for i in range(n)])
    out.append(dataclasses.replace(rotated, id=f"{example.id}#r{k}"))
  return out


# ----------------------------------------------------------------------------------------------
# Benchmarks and their aggregation


def by_category(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """The default aggregation: ``overall`` (the share of correct questions, in percent) and one
  entry per ``category`` (in the order first seen), each the share of its questions.

  Args:
    rows: one per question: ``category`` and ``correct`` (bool).
  """
  out = {"overall": _percent([r["correct"] for r in rows])}
  for category in dict.fromkeys(r["category"] for r in rows):
    out[category] = _percent([r["correct"] for r in rows if r["category"] == category])
  return out


def mean_of_categories(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """The macro aggregation (BLINK's subtasks, MMIU's tasks): ``overall`` the mean of the categories'
  accuracies (percent), ``micro`` the share of all questions, then each category's accuracy."""
  per = by_category(rows)
  categories = [k for k in per if k != "overall"]
  overall = sum(per[c] for c in categories) / len(categories) if categories else float("nan")
  return {"overall": overall, "micro": per["overall"], **{c: per[c] for c in categories}}


def _percent(flags: Sequence[bool]) -> float:
  return 100.0 * sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark's reader and its official aggregation.

  Attributes:
    name: its name in ``benchmarks.load``.
    read: ``read(path, split) -> list[Example]``: the folder as published, in the file's order,
      options as published; ``split`` None means ``splits[0]``.
    splits: the splits the reader knows (the first is the default).
    aggregate: ``aggregate(rows) -> {"overall": percent, <group>: percent, ...}`` in the
      benchmark's official way; ``rows`` one per question (``id``, ``category``, ``subcategory``,
      ``correct``, ``meta``).
    circular: the official protocol scores every rotation of the options.
    source: where the layout and the official evaluation are published.
  """
  name: str
  read: Callable[[str, Optional[str]], list[Example]]
  splits: tuple[str, ...] = ("test",)
  aggregate: Callable[[Sequence[Mapping[str, Any]]], dict[str, float]] = by_category
  circular: bool = False
  source: str = ""
