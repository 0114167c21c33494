"""V* Bench (``vstar``): 191 questions about small details of 2K-6K images, read from the folder
as published on Hugging Face (``craigwu/vstar_bench``).

Layout (https://github.com/penghao-wu/vstar#benchmark, https://huggingface.co/datasets/craigwu/vstar_bench)::

    vstar_bench/
      direct_attributes/    <name>.jpg + <name>.json   (115 questions, 4 options each)
      relative_position/    <name>.jpg + <name>.json   (76 questions, 2 options each)
      test_questions.jsonl  (optional; added later by a contributor, read for its question ids only)
      GPT4V-hard/, OCR/     (not part of the 191-question benchmark; never read)

Each annotation JSON is ``{"target_object": [names], "bbox": [[x, y, w, h], ...], "question": str,
"options": [str, ...]}``; an image and its annotation share the file name (stem). **The correct
option is always listed first** ("the first one is the correct option by default", the repo's
README; the official ``vstar_bench_eval.py`` scores ``correct = option_chosen == 0``). So as
published every answer is "A" and a model that always answers "A" scores 100%: ``benchmarks.load``
shuffles each question's options by default (seeded per question); ``option_order="as_published"``
keeps the file's order (answer "A").

``test_questions.jsonl`` (``image``, ``text``, ``category``, ``question_id``, ``label``; the
options are inlined into ``text`` in another order, the format ``lmms-eval``'s ``vstar_bench``
task reads) is not needed: where it is present, the question id of each image goes into
``meta["question_id"]`` so results can be joined with lmms-eval's.

Each ``Example``: ``id`` ``"<category>/<name>"`` (the annotation's folder and file stem, unique),
``question`` the annotation's question (no options, no answer-format instruction), ``options`` as
listed, ``answer`` "A" (as published), ``category`` the folder (``direct_attributes`` /
``relative_position``), ``target_image`` 0 and ``target_boxes`` the ``bbox`` entries converted
from ``[x, y, w, h]`` to ``[x0, y0, x1, y1]`` (pixels of the image), ``meta["target_objects"]`` the
``target_object`` names. Questions are in folder order, then sorted by file name (the official
script walks ``os.listdir``, an arbitrary order).

Official aggregation (``vstar_bench_eval.py``: ``per_type_acc[test_type]`` and
``np.mean(all_acc)``; lmms-eval ``vstar_aggregate_results`` likewise): accuracy per category and
**overall = micro accuracy over all 191 questions** (not the mean of the two categories), which is
``base.by_category``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from imagent_jax.evaluation.benchmarks import base

CATEGORIES = ("direct_attributes", "relative_position")
JSONL = "test_questions.jsonl"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _question_ids(root: str) -> dict[str, str]:
  """``{"<category>/<image file>": question_id}`` from ``test_questions.jsonl`` ({} where it is absent)."""
  path = os.path.join(root, JSONL)
  if not os.path.isfile(path):
    return {}
  out = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise base.BenchmarkError(path, f"line {n}", f"not valid JSON ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get("image"), str) or "question_id" not in record:
        raise base.BenchmarkError(path, f"line {n}", "needs an object with 'image' (a string) and 'question_id'")
      out[record["image"].replace("\\", "/").lstrip("./")] = str(record["question_id"])
  return out


def _boxes(value: Any, where: tuple[str, Any]) -> tuple[tuple[float, float, float, float], ...]:
  if not isinstance(value, list):
    raise base.BenchmarkError(*where, f"'bbox' must be a list of [x, y, w, h] boxes, got {value!r}")
  boxes = []
  for box in value:
    if (not isinstance(box, (list, tuple)) or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
      raise base.BenchmarkError(*where, f"a 'bbox' entry must be [x, y, w, h] (numbers), got {box!r}")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
      raise base.BenchmarkError(*where, f"a 'bbox' entry has a negative width or height: {box!r}")
    boxes.append((x, y, x + w, y + h))
  return tuple(boxes)


def _read_category(root: str, category: str, question_ids: dict[str, str]) -> list[base.Example]:
  folder = os.path.join(root, category)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"vstar: {folder} does not exist (V* Bench's folder as published has "
                            f"{' and '.join(c + '/' for c in CATEGORIES)})")
  names = sorted(os.listdir(folder))
  images: dict[str, str] = {}
  for name in names:
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS:
      if stem in images:
        raise base.BenchmarkError(os.path.join(folder, name), stem, f"two images share the name {stem!r}")
      images[stem] = name
  annotations = [n for n in names if n.lower().endswith(".json")]
  if not annotations:
    raise FileNotFoundError(f"vstar: {folder} has no <name>.json annotation files")
  out = []
  for name in annotations:
    stem = name[:-len(".json")]
    path = os.path.join(folder, name)
    where = (path, f"{category}/{stem}")
    try:
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
    except json.JSONDecodeError as e:
      raise base.BenchmarkError(*where, f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(record, dict):
      raise base.BenchmarkError(*where, "the annotation must be a JSON object")
    for key in ("question", "options"):
      if key not in record:
        raise base.BenchmarkError(*where, f"the annotation has no {key!r}")
    question, options = record["question"], record["options"]
    if not isinstance(question, str):
      raise base.BenchmarkError(*where, f"'question' must be a string, got {question!r}")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
      raise base.BenchmarkError(*where, f"'options' must be a list of strings, got {options!r}")
    boxes = _boxes(record.get("bbox", []), where)
    objects = record.get("target_object", [])
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
      raise base.BenchmarkError(*where, f"'target_object' must be a list of names, got {objects!r}")
    if stem not in images:
      raise base.BenchmarkError(*where, f"no image {stem}.<jpg|png|...> beside the annotation in {folder}")
    image = os.path.join(folder, images.pop(stem))
    meta = {"target_objects": list(objects), "annotation": path}
    question_id = question_ids.get(f"{category}/{os.path.basename(image)}")
    if question_id is not None:
      meta["question_id"] = question_id
    out.append(base.make_example(
        id=f"{category}/{stem}", question=question, options=options, answer="A", category=category,
        image_refs=[base.ImageRef(name=image, path=image)], where=where, meta=meta,
        target_image=0 if boxes else -1, target_boxes=boxes))
  if images:
    stray = sorted(images.values())
    raise base.BenchmarkError(os.path.join(folder, stray[0]), stray[0],
                              f"an image without its annotation {os.path.splitext(stray[0])[0]}.json "
                              f"({len(stray)} such image(s) in {folder}); is the download complete?")
  return out


def read(path: str, split: Optional[str] = None) -> list[base.Example]:
  """The 191 questions of V* Bench's folder (or of the folder holding a given ``test_questions.jsonl``).

  Args:
    path: the ``vstar_bench`` folder as downloaded.
    split: ``"test"`` (the only one).

  Raises:
    FileNotFoundError: a category folder is missing or has no annotations.
    BenchmarkError: a malformed annotation, an annotation without its image or an image without
      its annotation (file and ``<category>/<name>`` in the message).
  """
  del split
  root = os.path.dirname(path) if os.path.isfile(path) else path
  question_ids = _question_ids(root)
  out = []
  for category in CATEGORIES:
    out.extend(_read_category(root, category, question_ids))
  return out


VSTAR = base.Benchmark(
    name="vstar", read=read, splits=("test",), aggregate=base.by_category, circular=False,
    source="https://huggingface.co/datasets/craigwu/vstar_bench ; "
           "https://github.com/penghao-wu/vstar (README 'Benchmark'; vstar_bench_eval.py)")
