"""MMIU (Meng et al., 2024): 11,698 multiple-choice questions over up to 62 images each, 7 kinds of
multi-image relation; 60 stored ``task`` values (the paper's 52 tasks, some split by source, e.g.
``forensic_detection_blink`` / ``forensic_detection_forgerynet``).

Layout, as ``huggingface-cli download --repo-type dataset FanqingM/MMIU-Benchmark`` writes it::

    MMIU-Benchmark/
      all.parquet                          # the questions (all.json, the same records, also read)
      2D-spatial.zip  3D-spatial.zip  Continuous-temporal.zip  Discrete-temporal.zip
      High-level-obj-semantic.zip  High-level-sub-semantic.zip  Low-level-semantic.zip

Columns (the dataset card): ``task``, ``visual_input_component``, ``source``, ``options`` (ONE
string, "A: ...\\nB: ...\\n..."), ``question``, ``context`` (the task's instruction, which ends
with "Select from the following choices." and the options again), ``input_image_path`` (list of
paths such as "./Low-level-semantic/<task>/<task>_<n>_<k>.jpg"), ``output`` (the letter). There is
no id column: ``id`` is the row's index in ``all.parquet`` ("0" ... "11697").

Images: a path is looked up as a file under ``path`` (the zips extracted in place, with or without
their category folder: ``./Low-level-semantic/t/x.jpg`` is tried as ``Low-level-semantic/t/x.jpg``,
then ``t/x.jpg``), else as a member of one of the ``*.zip`` files in ``path``, matched on its last
two components ``<task>/<file>`` whatever folders the archive puts above them (read straight from
the archive, so the 26 GB need not be extracted). A path found nowhere is an error when reading.

Question text: the official prompt (github.com/OpenGVLab/MMIU VLMEvalKit/test_qwen3_vl.py) is
``question + "\\n" + context`` for the tasks of ``QUESTION_FIRST`` and ``context + "\\n" +
question`` for the others; the reader builds the same text with the options block ("Select from
the following choices." and the options) taken out of the context (the options are ``options``,
lettered by our prompt), and without repeating the question when the context already holds it.
``meta`` keeps ``source``, ``visual_input_component`` and the image paths as published.

Official aggregation (github.com/OpenGVLab/MMIU evaluate_correct.py): accuracy per ``task`` and
``Overall`` = the MEAN OF THE TASK ACCURACIES (InternVL's ``eval/mmiu/evaluate_mmiu.py`` averages
task accuracies too, over its spatial tasks). ``aggregate`` returns ``overall`` (that mean),
``micro`` (the share of all questions) and one entry per task. (The official script maps free-form
answers to letters with GPT-4o-mini and counts a prediction right when the letter is in the gold;
our scoring parses the letter.)
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import re
import zipfile
from typing import Any, Optional

from imagent_jax.evaluation.benchmarks import base
from imagent_jax.evaluation.benchmarks import parquet

COLUMNS = ("task", "options", "question", "context", "input_image_path", "output")
OPTIONAL = ("visual_input_component", "source")
CHOICES_MARKER = "Select from the following choices."
# The official prompt puts the question before the context for these tasks (test_qwen3_vl.py).
QUESTION_FIRST = frozenset((
    "person_reid", "multiple_image_captioning", "spot_the_similarity", "face_retrieval", "sketch2image_retrieval",
    "handwritten_retrieval", "spot_the_diff", "image2image_retrieval", "vehicle_retrieval", "text2image_retrieval",
    "general_action_recognition", "video_captioning", "next_img_prediction", "temporal_ordering",
    "meme_vedio_understanding", "action_quality_assessment", "temporal_localization", "mevis",
    "ravens_progressive_matrices", "threed_indoor_recognition", "point_tracking", "threed_cad_recognition",
    "single_object_tracking"))
_OPTION_LINE = re.compile(r"^\s*([A-Z])\s*[:.)]\s?(.*)$")


# ----------------------------------------------------------------------------------------------
# Images: files under the folder, or members of the published zips


@dataclasses.dataclass(frozen=True)
class ZipImage(base.ImageRef):
  """An image inside a zip archive, read when the example's images are opened."""
  archive: str = ""
  member: str = ""

  def encoded(self) -> bytes:
    try:
      return _open_zip(self.archive, os.getpid()).read(self.member)
    except (OSError, KeyError, zipfile.BadZipFile, RuntimeError) as e:
      raise base.BenchmarkError(self.name, None, f"cannot read {self.member} from {self.archive} ({e})") from None


@functools.lru_cache(maxsize=16)
def _open_zip(archive: str, pid: int) -> zipfile.ZipFile:
  """One open ``ZipFile`` per archive and process (``pid`` keys it: a forked child opens its own)."""
  del pid
  return zipfile.ZipFile(archive)


class _Images:
  """Resolves ``input_image_path`` entries under a folder: files first, then zip members."""

  def __init__(self, root: str):
    self.root = root
    self._zips: Optional[dict[str, tuple[str, str]]] = None
    self._drop: dict[str, int] = {}  # first path component -> leading components to drop that worked

  def zips(self) -> dict[str, tuple[str, str]]:
    """``"<task>/<file>"`` (a member's last two path components) -> (archive, member), over the
    ``*.zip`` files of the folder: the key holds whatever top folders an archive puts above them."""
    if self._zips is None:
      self._zips = {}
      for name in sorted(os.listdir(self.root)):
        archive = os.path.join(self.root, name)
        if name.lower().endswith(".zip") and os.path.isfile(archive):
          try:
            with zipfile.ZipFile(archive) as z:
              for member in z.namelist():
                if not member.endswith("/"):
                  self._zips.setdefault(_key(member), (archive, member))
          except (OSError, zipfile.BadZipFile) as e:
            raise base.BenchmarkError(archive, None, f"not a zip archive Python can read ({e})") from None
    return self._zips

  def ref(self, raw: str) -> Optional[base.ImageRef]:
    """The image of one published path, or None when it is found nowhere."""
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
      return None
    tails = list(range(max(len(parts) - 1, 1)))  # drop 0, 1, ... leading components, keep task/file
    first = self._drop.get(parts[0])
    if first is not None and first in tails:
      tails.remove(first)
      tails.insert(0, first)
    for drop in tails:
      candidate = os.path.join(self.root, *parts[drop:])
      if os.path.isfile(candidate):
        self._drop[parts[0]] = drop
        return base.ImageRef(name=candidate, path=candidate)
    found = self.zips().get(_key("/".join(parts)))
    if found is None:
      return None
    archive, member = found
    return ZipImage(name=f"{archive}:{member}", archive=archive, member=member)


def _key(path: str) -> str:
  return "/".join([p for p in path.split("/") if p not in ("", ".", "..")][-2:])


# ----------------------------------------------------------------------------------------------
# Records


def parse_options(text: Any) -> Optional[list[str]]:
  """"A: x\\nB: y" -> ["x", "y"] (a line that does not start the next letter continues the
  option before it); None when the text does not start with "A:"."""
  if not isinstance(text, str):
    return None
  options: list[str] = []
  for line in text.strip().splitlines():
    m = _OPTION_LINE.match(line)
    if m and len(options) < len(base.LETTERS) and m.group(1) == base.LETTERS[len(options)]:
      options.append(m.group(2).strip())
    elif options:
      options[-1] = f"{options[-1]}\n{line}".strip()
    else:
      return None
  return options or None


def _context_without_options(context: str, options_text: str) -> str:
  """The context with "Select from the following choices." and the options block after it removed
  (text after the block is kept)."""
  cut = context.rfind(CHOICES_MARKER)
  if cut < 0:
    block = options_text.strip()
    return context.replace(block, "").strip() if block and block in context else context.strip()
  head, tail = context[:cut], context[cut + len(CHOICES_MARKER):]
  block = options_text.strip()
  tail = tail.strip()
  rest = tail[len(block):] if block and tail.startswith(block) else ""
  return f"{head.strip()}\n{rest.strip()}".strip()


def question_text(task: str, question: str, context: str, options_text: str) -> str:
  """The question as the official prompt orders it, without the options block (see the module doc)."""
  question = (question or "").strip()
  context = _context_without_options(context or "", options_text or "")
  if not context:
    return question
  if not question or question in context:
    return context
  return f"{question}\n{context}" if task in QUESTION_FIRST else f"{context}\n{question}"


def answer_letter(output: Any) -> Optional[str]:
  """"B" (or "B: text", "(B)") -> "B"; None otherwise."""
  if not isinstance(output, str):
    return None
  s = output.strip()
  if len(s) == 1:
    return s.upper() if s.upper() in base.LETTERS else None
  letter, _ = base.split_lettered(s)
  return letter


def _paths(value: Any) -> Optional[list[str]]:
  if isinstance(value, str):  # a list written as its repr
    try:
      value = ast.literal_eval(value) if value.strip().startswith("[") else [value]
    except (ValueError, SyntaxError):
      return None
  if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) and p.strip() for p in value):
    return list(value)
  return None


def _records(path: str) -> tuple[str, list[dict[str, Any]]]:
  file = os.path.join(path, "all.parquet")
  if os.path.isfile(file):
    return file, parquet.read_records(file, COLUMNS, OPTIONAL)
  file = os.path.join(path, "all.json")
  if os.path.isfile(file):
    try:
      with open(file, encoding="utf-8") as f:
        rows = json.load(f)
    except (OSError, ValueError) as e:
      raise base.BenchmarkError(file, None, f"not a JSON file ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
      raise base.BenchmarkError(file, None, "expected a JSON list of records")
    for row, r in enumerate(rows):
      missing = [c for c in COLUMNS if c not in r]
      if missing:
        raise base.BenchmarkError(file, f"row {row}", f"missing field(s) {missing}")
    return file, rows
  raise FileNotFoundError(f"mmiu: {path} has no all.parquet (expected the Hub snapshot of FanqingM/MMIU-Benchmark: "
                          "all.parquet and the image zips)")


def read(path: str, split: Optional[str] = None) -> list[base.Example]:
  """The questions of ``all.parquet`` (or ``all.json``), in the file's order.

  Raises:
    FileNotFoundError: neither ``all.parquet`` nor ``all.json`` in ``path``.
    BenchmarkError: a missing column, or a bad record (options not "A: ...", output not a listed
      letter, no image paths, an image found neither as a file nor in a zip).
  """
  del split
  file, rows = _records(path)
  images = _Images(path)
  out = []
  for row, r in enumerate(rows):
    record = f"row {row}"
    task = r["task"]
    if not isinstance(task, str) or not task.strip():
      raise base.BenchmarkError(file, record, "task is empty (the category of the official aggregation)")
    options = parse_options(r["options"])
    if options is None:
      raise base.BenchmarkError(file, record, f"options must be a string 'A: ...\\nB: ...', got {r['options']!r}")
    letter = answer_letter(r["output"])
    if letter is None:
      raise base.BenchmarkError(file, record, f"output {r['output']!r} is not an option letter")
    paths = _paths(r["input_image_path"])
    if paths is None:
      raise base.BenchmarkError(file, record, f"input_image_path must be a non-empty list of paths, "
                                              f"got {r['input_image_path']!r}")
    refs = []
    for p in paths:
      ref = images.ref(p)
      if ref is None:
        raise base.BenchmarkError(file, record, f"image {p!r} not found under {path} (as a file, or in a *.zip there)")
      refs.append(ref)
    question = question_text(task.strip(), r["question"] if isinstance(r["question"], str) else "",
                             r["context"] if isinstance(r["context"], str) else "", r["options"])
    meta = {"source": r.get("source"), "visual_input_component": r.get("visual_input_component"),
            "input_image_path": paths}
    out.append(base.make_example(id=str(row), question=question, options=options, answer=letter, category=task.strip(),
                                 image_refs=refs, where=(file, record), meta=meta))
  return out


mean_of_tasks = base.mean_of_categories  # the official aggregation: the mean of the per-category accuracies


MMIU = base.Benchmark(
    name="mmiu", read=read, splits=("test",), aggregate=mean_of_tasks,
    source=("https://huggingface.co/datasets/FanqingM/MMIU-Benchmark (all.parquet, <category>.zip); "
            "https://github.com/OpenGVLab/MMIU (evaluate_correct.py: mean of task accuracies; "
            "VLMEvalKit/test_qwen3_vl.py: prompt order)"))
