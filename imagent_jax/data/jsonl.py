"""Multi-image QA from JSONL files: MIFG-QA, or any similar set, from a local folder.

Schema: one JSON object per line (blank lines are ignored; unknown keys are kept out)::

  {"images": ["imgs/0001_a.jpg", "imgs/0001_b.png"],  # required: 1+ image paths, relative to
                                                      #   the JSONL file's folder (or absolute);
                                                      #   each must lie under the image root
   "question": "Which image shows a red kite?",       # required: non-empty string
   "options": ["Image 1", "Image 2"],                 # optional: 2-26 strings, lettered A, B, ...;
                                                      #   or {"A": "...", "B": "..."} (A, B, ... in order)
   "answer": "B",                                     # required: with options, an option letter or
                                                      #   an option's text; else a string or number;
                                                      #   or a list of acceptable answers
   "category": "nature",                              # optional: string
   "id": "0001",                                      # optional: string or integer
   "target_image": 1,                                 # optional: 0-based image holding the answer
   "target_box": [120, 40, 180, 95]}                  # optional: [x0, y0, x1, y1] in its pixels

``JsonlSource(path)`` reads a ``.jsonl`` file, or every ``*.jsonl`` file of a folder (sorted),
and is a random-access source (``__len__``, ``__getitem__``) of the pipeline's example dicts
(``synthetic.EXAMPLE_KEYS``): RGB PIL images, ``options`` as a list (None for open questions),
``answer`` as a string (or a list of strings), ``category`` ``""``, ``target_image`` -1 and
``target_box`` None when absent.

Bad input (DESIGN §6). Every problem is a ``DataError`` naming the file, the line and its kind:

* found when the files are read (at construction): ``invalid_json`` (including JSON nested too
  deeply and numbers too long to read), ``not_an_object``, ``missing_field``, ``wrong_type``,
  ``bad_value`` (empty question, unknown option letters, an answer that is no option, a bad
  target, a path with a NUL byte, anything else unreadable), ``missing_image``, ``outside_root``
  (an image path that, symlinks followed, leaves the image root: by default the JSONL file's
  folder, ``image_root`` / ``config.data.image_root`` widens it; a dataset file cannot make a
  run read any file the user can), ``empty_image`` (zero bytes);
* found when an example is read (images are opened lazily): ``corrupt_image`` (not an image,
  truncated), ``decompression_bomb`` (more pixels than ``max_image_pixels``; Pillow's own
  guard is turned into this error too), ``unreadable_image``;
* found by a run's own check of every record (``check_records``, before training compiles):
  ``too_many_images`` (more than the run's image budgets hold), ``prompt_too_long`` (a prompt
  longer than the run's token budget), ``corrupt_image`` (an image whose size cannot be read).

Images of any mode (grey, palette, RGBA, 16-bit, ...) are converted to RGB, not refused, and
their EXIF orientation is applied (as transformers' ``load_image`` does).

``on_error="raise"`` (default) raises the first ``DataError``. ``on_error="skip"`` leaves the
record out and counts it (``error_counts`` by kind, ``skipped`` in total, the first
``MAX_KEPT_ERRORS`` errors in ``errors``): records bad at construction are not in ``len()``;
one found bad when read returns None, which the grain pipeline drops.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
from typing import Any, Callable, Optional, Sequence, Union

from PIL import Image

from imagent_jax.processing import images as images_lib

ERROR_KINDS = ("invalid_json", "not_an_object", "missing_field", "wrong_type", "bad_value", "missing_image",
               "outside_root", "empty_image", "corrupt_image", "decompression_bomb", "unreadable_image", "too_many_images",
               "prompt_too_long")
ON_ERROR = ("raise", "skip")
MAX_KEPT_ERRORS = 1000
_LOGGED_ERRORS = 20  # under "skip", the first errors are logged one by one
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_log = logging.getLogger(__name__)


class DataError(ValueError):
  """A bad record: ``path:line: [kind] message``.

  Attributes:
    path: the JSONL file.
    line: 1-based line number.
    kind: one of ``ERROR_KINDS``.
    message: what is wrong.
  """

  def __init__(self, path: str, line: int, kind: str, message: str):
    super().__init__(f"{path}:{line}: [{kind}] {message}")
    self.path, self.line, self.kind, self.message = path, line, kind, message


class _Record:
  """A validated line: everything but the decoded images."""
  __slots__ = ("path", "line", "id", "images", "question", "options", "answer", "category", "target_image",
               "target_box")

  def __init__(self, **fields):
    for name, value in fields.items():
      setattr(self, name, value)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _answer_text(value: Any) -> Optional[str]:
  """A gold answer as text (numbers written as JSON wrote them), or None if it is no answer."""
  if isinstance(value, str):
    return value.strip() or None
  if _is_number(value):
    return str(value)
  return None


def _check_options(value: Any) -> Optional[list[str]]:
  """The options as a list, or raises ``(kind, message)``."""
  if value is None:
    return None
  if isinstance(value, dict):
    by_letter = {k.strip().upper(): v for k, v in value.items()}  # JSON object keys are strings
    if sorted(by_letter) != list(_LETTERS[:len(value)]):
      raise _Bad("bad_value", f"options keys must be the letters A, B, ... without gaps, got {list(value)[:8]}")
    value = [by_letter[k] for k in sorted(by_letter)]
  if not isinstance(value, list):
    raise _Bad("wrong_type", f"options must be a list of strings or a letter -> text object, got "
                             f"{type(value).__name__}")
  if not all(isinstance(v, str) and v.strip() for v in value):
    raise _Bad("wrong_type", "options must all be non-empty strings")
  if not 2 <= len(value) <= len(_LETTERS):
    raise _Bad("bad_value", f"need 2 to {len(_LETTERS)} options, got {len(value)}")
  return [v.strip() for v in value]


def _check_answer(value: Any, options: Optional[list[str]]) -> Union[str, list[str]]:
  """The gold answer(s) as text, or raises ``_Bad``."""
  golds = value if isinstance(value, list) else [value]
  texts = [_answer_text(v) for v in golds]
  if not golds or any(t is None for t in texts):
    raise _Bad("wrong_type", "answer must be a non-empty string, a number, or a non-empty list of them, got "
                             f"{json.dumps(value)[:60]}")
  if options is not None:
    letters = _LETTERS[:len(options)]
    lowered = {o.lower() for o in options}
    for text in texts:
      if not (text.upper() in letters and len(text) == 1) and text.lower() not in lowered:
        raise _Bad("bad_value", f"answer {text[:40]!r} is neither an option letter ({letters[0]}-{letters[-1]}) "
                                "nor the text of an option")
  return texts if isinstance(value, list) else texts[0]


class _Bad(Exception):
  """``(kind, message)`` of a record problem, before the file and line are known."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind, self.message = kind, message


def _inside(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def _parse_line(text: str, folder: str, root: str) -> dict[str, Any]:
  """The fields of one non-blank line, validated; raises ``_Bad``. Image paths are resolved from
  ``folder`` (the JSONL file's) and, symlinks followed, must lie under ``root`` (real path)."""
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise _Bad("invalid_json", f"not valid JSON: {e.msg} at column {e.colno}") from None
  except RecursionError:
    raise _Bad("invalid_json", "JSON nested too deeply to read") from None
  except ValueError as e:  # e.g. an integer of more than 4,300 digits
    raise _Bad("invalid_json", f"not readable JSON ({e})") from None
  if not isinstance(obj, dict):
    raise _Bad("not_an_object", f"each line must be a JSON object, got {type(obj).__name__}")
  missing = [k for k in ("images", "question", "answer") if k not in obj]
  if missing:
    raise _Bad("missing_field", f"missing required field(s) {', '.join(missing)}")
  images = obj["images"]
  if not isinstance(images, list) or not all(isinstance(p, str) and p.strip() for p in images):
    raise _Bad("wrong_type", "images must be a list of path strings")
  if not images:
    raise _Bad("bad_value", "images is empty; each question needs at least one image")
  question = obj["question"]
  if not isinstance(question, str):
    raise _Bad("wrong_type", f"question must be a string, got {type(question).__name__}")
  if not question.strip():
    raise _Bad("bad_value", "question is empty")
  options = _check_options(obj.get("options"))
  answer = _check_answer(obj["answer"], options)
  category = obj.get("category", "")
  if category is None:
    category = ""
  if not isinstance(category, str):
    raise _Bad("wrong_type", f"category must be a string, got {type(category).__name__}")
  record_id = obj.get("id")
  if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, (str, int))):
    raise _Bad("wrong_type", f"id must be a string or an integer, got {type(record_id).__name__}")
  target_image = obj.get("target_image", -1)
  if target_image is None:
    target_image = -1
  if isinstance(target_image, bool) or not isinstance(target_image, int):
    raise _Bad("wrong_type", "target_image must be an integer (0-based image index)")
  if not -1 <= target_image < len(images):
    raise _Bad("bad_value", f"target_image={target_image} is not an index of the {len(images)} images (0-based)")
  box = obj.get("target_box")
  if box is not None:
    if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
      raise _Bad("wrong_type", "target_box must be 4 numbers [x0, y0, x1, y1]")
    if not (0 <= box[0] < box[2] and 0 <= box[1] < box[3]):
      raise _Bad("bad_value", f"target_box {box} needs 0 <= x0 < x1 and 0 <= y0 < y1")
    if target_image < 0:
      raise _Bad("bad_value", "target_box needs target_image")
  paths = []
  for rel in images:
    if "\x00" in rel:
      raise _Bad("bad_value", f"image path {rel[:60]!r} holds a NUL byte")
    p = os.path.normpath(os.path.join(folder, rel))
    real = os.path.realpath(p)
    if not _inside(real, root):
      raise _Bad("outside_root", f"image {rel!r} resolves to {real}, outside the dataset folder {root} (images must "
                                 "lie under it, symlinks followed; config.data.image_root widens it)")
    try:
      size = os.stat(p).st_size
    except FileNotFoundError:
      raise _Bad("missing_image", f"image {rel!r} not found (looked for {p})") from None
    except (OSError, ValueError) as e:
      raise _Bad("unreadable_image", f"image {rel!r}: {getattr(e, 'strerror', None) or e}") from None
    if not os.path.isfile(p):
      raise _Bad("missing_image", f"image {rel!r} is not a file ({p})")
    if size == 0:
      raise _Bad("empty_image", f"image {rel!r} is an empty file (0 bytes)")
    paths.append(real)
  return {"id": None if record_id is None else str(record_id), "images": paths, "question": question.strip(),
          "options": options, "answer": answer, "category": category,
          "target_image": target_image, "target_box": None if box is None else [float(v) for v in box]}


def load_image(path: str, max_pixels: Optional[int] = None) -> Image.Image:
  """Opens an image file as RGB, its EXIF orientation applied, with the size checked before any
  pixel is decoded (``processing.images.decode_image``).

  Args:
    path: the file.
    max_pixels: most pixels allowed (None: Pillow's ``Image.MAX_IMAGE_PIXELS``); Pillow's own
      hard limit (twice its ``MAX_IMAGE_PIXELS``) applies as well.

  Returns:
    An RGB image.

  Raises:
    _Bad: ``empty_image``, ``corrupt_image``, ``decompression_bomb``, ``unreadable_image``.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except (OSError, ValueError) as e:
    raise _Bad("unreadable_image", f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
  try:
    return images_lib.decode_image(data, max_pixels)
  except images_lib.ImageDecodeError as e:
    raise _Bad(e.kind, f"{path}: {e.message}") from None


def _jsonl_files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
    if not files:
      raise FileNotFoundError(f"no *.jsonl files in folder {path}")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"JSONL file or folder {path} does not exist")
  return [path]


class JsonlSource:
  """Random-access source of the examples of JSONL files (schema in the module docstring).

  Attributes:
    name: the path given.
    files: the JSONL files read.
    on_error: ``"raise"`` or ``"skip"``.
    max_image_pixels: image size limit (None: Pillow's default).
    error_counts: ``Counter`` of skipped records by kind (``"skip"`` only).
    errors: the first ``MAX_KEPT_ERRORS`` ``DataError`` s skipped.
  """

  def __init__(self, path: Union[str, os.PathLike], *, on_error: str = "raise",
               max_image_pixels: Optional[int] = None, image_root: Optional[str] = None):
    """Reads and validates every record (images are opened later, when read).

    Args:
      path: a ``.jsonl`` file, or a folder whose ``*.jsonl`` files are read in sorted order.
      on_error: ``"raise"``: stop at the first bad record; ``"skip"``: leave it out and count it.
      max_image_pixels: most pixels an image may have (None: ``PIL.Image.MAX_IMAGE_PIXELS``).
      image_root: the folder every image must lie in, symlinks followed (None: each JSONL file's
        own folder); an image outside it is a bad record (``outside_root``).

    Raises:
      DataError: a bad record under ``"raise"``.
      FileNotFoundError: no such file, or a folder without JSONL files.
      ValueError: bad ``on_error``.
    """
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.on_error = on_error
    self.max_image_pixels = max_image_pixels
    self.image_root = None if not image_root else os.path.realpath(os.path.expanduser(image_root))
    self.name = os.fspath(path)
    self.files = _jsonl_files(self.name)
    self.error_counts: collections.Counter = collections.Counter()
    self.errors: list[DataError] = []
    self._lock = threading.Lock()
    self._records: list[_Record] = []
    for file in self.files:
      self._read_file(file)

  def _read_file(self, file: str) -> None:
    folder = os.path.dirname(os.path.abspath(file))
    root = self.image_root or os.path.realpath(folder)
    stem = os.path.basename(file)
    with open(file, "rb") as f:
      for line_number, raw in enumerate(f, start=1):
        try:
          text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as e:
          self._fail(DataError(file, line_number, "invalid_json", f"not UTF-8 text ({e.reason} at byte {e.start})"))
          continue
        if not text.strip():
          continue
        try:
          fields = _parse_line(text, folder, root)
        except _Bad as e:
          self._fail(DataError(file, line_number, e.kind, e.message))
          continue
        except Exception as e:  # noqa: BLE001 - whatever a line holds, the error names its file and line
          self._fail(DataError(file, line_number, "bad_value", f"unreadable record ({type(e).__name__}: {e})"))
          continue
        if fields["id"] is None:
          fields["id"] = f"{stem}:{line_number}"
        self._records.append(_Record(path=file, line=line_number, **fields))

  def _fail(self, error: DataError) -> None:
    """Raises ``error`` or counts it, as configured."""
    if self.on_error == "raise":
      raise error
    with self._lock:
      self.error_counts[error.kind] += 1
      if len(self.errors) < MAX_KEPT_ERRORS:
        self.errors.append(error)
      count = sum(self.error_counts.values())
    if count <= _LOGGED_ERRORS:
      _log.warning("skipping bad record: %s", error)
    elif count == _LOGGED_ERRORS + 1:
      _log.warning("more bad records are skipped without logging; see JsonlSource.error_counts")

  def check_records(self, check: Callable[[dict[str, Any]], Optional[tuple[str, str]]]) -> None:
    """Applies a run's own limits to every record before any is read (``stages.build.data_source``).

    Args:
      check: ``check(record) -> None`` when the record fits, else ``(kind, message)`` with ``kind``
        one of ``ERROR_KINDS``; ``record`` is a dict with the record's ``id``, ``images`` (the
        paths), ``question`` and ``options``.

    Raises:
      DataError: the first record that does not fit under ``"raise"``, naming its file and line.
        Under ``"skip"`` such records leave the source (``len()``) and are counted.
    """
    kept = []
    for record in self._records:
      problem = check({"id": record.id, "images": list(record.images), "question": record.question,
                       "options": None if record.options is None else list(record.options)})
      if problem is None:
        kept.append(record)
      else:
        self._fail(DataError(record.path, record.line, *problem))
    self._records = kept

  def record(self, index: int) -> dict[str, Any]:
    """Record ``index`` as validated, images not opened: ``path`` and ``line`` (where it is),
    ``id``, ``images`` (resolved paths), ``question``, ``options`` (list or None), ``answer``
    (string or list), ``category``, ``target_image`` and ``target_box``."""
    r = self._records[int(index)]
    return {name: getattr(r, name) for name in _Record.__slots__}

  @property
  def skipped(self) -> int:
    """Records skipped so far (construction and reads)."""
    return sum(self.error_counts.values())

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Optional[dict[str, Any]]:
    """Example ``index`` with its images decoded; None when they are bad under ``"skip"``.

    Raises:
      DataError: a bad image under ``"raise"``.
      IndexError: ``index`` out of range.
    """
    record = self._records[int(index)]
    images = []
    for k, path in enumerate(record.images):
      try:
        images.append(load_image(path, self.max_image_pixels))
      except _Bad as e:
        self._fail(DataError(record.path, record.line, e.kind, f"image {k}: {e.message}"))
        return None
    return {"id": record.id, "images": images, "question": record.question,
            "options": None if record.options is None else list(record.options),
            "answer": list(record.answer) if isinstance(record.answer, list) else record.answer,
            "category": record.category, "target_image": record.target_image,
            "target_box": None if record.target_box is None else list(record.target_box)}

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"JsonlSource({len(self.files)} file(s), {len(self)} records, {self.skipped} skipped)"


def write_jsonl(path: Union[str, os.PathLike], records: Sequence[dict[str, Any]]) -> None:
  """Writes ``records`` (schema dicts) as a JSONL file, one object per line."""
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
