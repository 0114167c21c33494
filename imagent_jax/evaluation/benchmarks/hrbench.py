"""HR-Bench 4K and 8K (``hrbench_4k``, ``hrbench_8k``): fine-grained questions on 4K / 8K images,
read from the TSV files as published on Hugging Face (``DreamMr/HR-Bench``).

Layout (https://huggingface.co/datasets/DreamMr/HR-Bench; the URLs VLMEvalKit's
``HRBenchDataset.DATASET_URL`` downloads)::

    HR-Bench/
      hr_bench_4k.tsv   (~1.9 GB)      hr_bench_8k.tsv   (~4.6 GB)
      hr_bench_4k.parquet, hr_bench_8k.parquet  (the same rows; not read here)

``path`` is that folder, or one of the TSV files itself. A TSV is tab-separated with a header
(VLMEvalKit's MCQ format, written by pandas): ``index`` (the row id), ``question`` (the question
alone), ``A`` ``B`` ``C`` ``D`` (option texts), ``answer`` (the correct letter), ``category``
(``single`` = FSP, Fine-grained Single-instance Perception; ``cross`` = FCP, Fine-grained
Cross-instance Perception), ``cycle_category`` (which rotation of the options the row is) and
``image`` (the base64-encoded image). The same question appears once per cycle, its options
rotated: **the rotations are rows of the file**, so the benchmark is not ``circular`` here
(``load`` must not rotate again).

Trap (VLMEvalKit's ``ImageBaseDataset``): an ``image`` cell of 64 characters or fewer is not an
image but the ``index`` of the row whose image it shares; such cells are resolved to that row's
image. Images stay in the file: an ``Example`` keeps the byte range of its base64 text and decodes
it when ``images`` is read (the 8K file is 4.6 GB; its text is never held in memory).

Each ``Example``: ``id`` the ``index``, ``options`` the non-empty letter columns in order,
``answer`` the ``answer`` letter, ``category`` ``FSP`` / ``FCP`` (``single`` / ``cross``; other
values are kept as they are), ``meta["cycle_category"]`` and ``meta["hrbench_category"]`` (the
cell as published).

Official aggregation (HR-Bench's ``hrbench/vlmeval/dataset/image_mcq.py`` ``HRBenchDataset.evaluate``
and VLMEvalKit's ``report_acc_hrbench``, https://github.com/DreamMr/HR-Bench,
https://github.com/open-compass/VLMEvalKit/blob/main/vlmeval/dataset/utils/hrbench.py): the rows are
grouped by ``cycle_category``; in each cycle ``all`` is the accuracy over its rows and each category
its own accuracy; the reported numbers are the means over the cycles (each category's sum divided
by the number of cycles, as the official code does). ``aggregate`` returns ``overall`` (the mean of
the cycles' ``all``), ``FSP``, ``FCP`` and ``cycle <name>`` (each cycle's ``all``). With
``option_order="shuffled"`` (``load``'s default) each row's options are reshuffled and the cycles
no longer balance the answer positions; ``"as_published"`` reproduces the official protocol.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import os
import sys
from typing import Any, Mapping, Optional, Sequence

from imagent_jax.evaluation.benchmarks import base

FILES = {"4k": "hr_bench_4k.tsv", "8k": "hr_bench_8k.tsv"}
REQUIRED = ("index", "question", "answer", "category", "A", "B", "image")
CATEGORIES = {"single": "FSP", "cross": "FCP", "fsp": "FSP", "fcp": "FCP"}
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n "
_REFERENCE_MAX = 64  # VLMEvalKit: an image cell this short is another row's index


@dataclasses.dataclass(frozen=True)
class TsvImageRef(base.ImageRef):
  """An image kept as base64 text inside a TSV file: ``length`` characters from byte ``offset``
  of ``tsv`` (``record`` names the row in errors)."""
  tsv: str = ""
  offset: int = 0
  length: int = 0
  record: str = ""

  def encoded(self) -> bytes:
    try:
      with open(self.tsv, "rb") as f:
        f.seek(self.offset)
        text = f.read(self.length)
    except OSError as e:
      raise base.BenchmarkError(self.tsv, self.record, f"cannot read the image ({e.strerror or e})") from None
    if len(text) != self.length:
      raise base.BenchmarkError(self.tsv, self.record, "the file is shorter than when it was read (changed?)")
    try:
      return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
      raise base.BenchmarkError(self.tsv, self.record, f"the image is not valid base64 ({e})") from None


class _Lines:
  """The lines of a binary file, decoded, for ``csv.reader``; keeps the raw lines (and the byte
  offset of the first) of the record being read."""

  def __init__(self, f):
    self.f, self.pos, self.raw, self.start = f, 0, [], 0

  def begin(self):
    self.raw, self.start = [], self.pos

  def __iter__(self):
    return self

  def __next__(self) -> str:
    line = self.f.readline()
    if not line:
      raise StopIteration
    if self.pos == 0 and line.startswith(b"\xef\xbb\xbf"):
      self.pos, line = 3, line[3:]
    self.raw.append(line)
    self.pos += len(line)
    try:
      return line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise base.BenchmarkError(self.f.name, f"byte {self.pos - len(line) + e.start}", "not UTF-8 text") from None


def _tsv_path(path: str, version: str) -> str:
  name = FILES[version]
  if os.path.isfile(path):
    return path
  tsv = os.path.join(path, name)
  if os.path.isfile(tsv):
    return tsv
  parquet = os.path.join(path, name[:-len(".tsv")] + ".parquet")
  hint = f" ({os.path.basename(parquet)} is there, but the TSV is what is read)" if os.path.isfile(parquet) else ""
  raise FileNotFoundError(f"hrbench_{version}: expected {tsv} (HR-Bench's {name} as published at "
                          f"https://huggingface.co/datasets/DreamMr/HR-Bench){hint}")


def _image_cell(raw: bytes, value: str, where: tuple[str, Any], start: int) -> tuple[int, int]:
  """``(offset, length)`` in the file of the base64 text of an image cell ``value`` found in the
  record's raw bytes ``raw`` (which start at byte ``start``)."""
  if value.startswith("data:") and "," in value[:200]:  # a data URI: the base64 text follows the comma
    value = value[value.index(",") + 1:]
  if not value.isascii():
    raise base.BenchmarkError(*where, "the image is not valid base64 (non-ASCII characters)")
  text = value.encode("ascii")
  at = raw.find(text)
  if at < 0:  # a quoted cell (the text is altered by quoting): not a plain base64 cell
    raise base.BenchmarkError(*where, "the image cell is quoted or escaped; it is not plain base64")
  if text.translate(None, _B64_ALPHABET):
    raise base.BenchmarkError(*where, "the image is not valid base64 (characters outside the base64 alphabet)")
  return start + at, len(text)


def read_tsv(tsv: str, name: str) -> list[base.Example]:
  """The examples of one HR-Bench TSV file, in the file's order."""
  limit = sys.maxsize
  while True:  # base64 cells of 8K images are far over csv's default 128 KiB field limit
    try:
      csv.field_size_limit(limit)
      break
    except OverflowError:
      limit //= 10
  rows = []
  with open(tsv, "rb") as f:
    lines = _Lines(f)
    reader = csv.reader(lines, delimiter="\t")
    lines.begin()
    try:
      header = next(reader)
    except StopIteration:
      raise base.BenchmarkError(tsv, None, "the file is empty (no header)") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
      raise base.BenchmarkError(tsv, "header", f"missing column(s) {missing}; the header is {header[:20]}")
    col = {c: header.index(c) for c in header}
    letters = [c for c in base.LETTERS if c in col]
    n = 0
    while True:
      lines.begin()
      try:
        cells = next(reader)
      except StopIteration:
        break
      except csv.Error as e:
        raise base.BenchmarkError(tsv, f"row {n + 1}", f"not a TSV row ({e})") from None
      n += 1
      if not cells:
        continue
      if len(cells) != len(header):
        raise base.BenchmarkError(tsv, f"row {n}", f"has {len(cells)} cells, the header {len(header)}")
      row = {c: cells[i] for c, i in col.items()}
      index = row["index"].strip()
      where = (tsv, index or f"row {n}")
      if not index:
        raise base.BenchmarkError(*where, "the 'index' cell is empty")
      image = row.pop("image").strip()
      if not image:
        raise base.BenchmarkError(*where, "the 'image' cell is empty")
      cell = None if len(image) <= _REFERENCE_MAX else _image_cell(b"".join(lines.raw), image, where, lines.start)
      rows.append((row, index, image if cell is None else None, cell, where))
  seen: set[str] = set()
  by_index: dict[str, tuple[int, int]] = {}
  for _, index, _, cell, where in rows:
    if index in seen:
      raise base.BenchmarkError(*where, "two rows have this index; indices must be unique")
    seen.add(index)
    if cell is not None:
      by_index[index] = cell
  out = []
  for row, index, reference, cell, where in rows:
    if cell is None:  # another row's index (VLMEvalKit saves repeated images this way)
      if reference not in by_index:
        raise base.BenchmarkError(*where, f"the image cell {reference!r} is neither base64 nor the index of a "
                                          "row with an image")
      cell = by_index[reference]
    options = [row[c].strip() for c in letters]
    while options and not options[-1]:
      options.pop()
    if any(not o for o in options):
      raise base.BenchmarkError(*where, f"an option between the filled ones is empty: {options}")
    raw_category = row["category"].strip()
    ref = TsvImageRef(name=f"{tsv}:{index}", tsv=tsv, offset=cell[0], length=cell[1], record=index)
    out.append(base.make_example(
        id=index, question=row["question"], options=options, answer=row["answer"].strip().upper(),
        category=CATEGORIES.get(raw_category.lower(), raw_category), image_refs=[ref], where=where,
        benchmark=name, meta={"cycle_category": row.get("cycle_category", "").strip(),
                              "hrbench_category": raw_category}))
  if not out:
    raise base.BenchmarkError(tsv, None, "the file has no rows")
  return out


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """HR-Bench's official score, in percent: per ``meta["cycle_category"]`` the accuracy over the
  cycle's rows (``all``) and per category; then the means over the cycles (a category's sum of
  accuracies divided by the number of cycles, as the official code does).

  Args:
    rows: one per question: ``category``, ``correct`` and ``meta`` (``cycle_category``).
  """
  cycles: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    cycles.setdefault(str((r.get("meta") or {}).get("cycle_category", "")), []).append(r)
  if not cycles:
    return {"overall": float("nan")}
  per_cycle = {c: base.by_category(rs) for c, rs in cycles.items()}
  categories = list(dict.fromkeys(r["category"] for r in rows))
  out = {"overall": sum(p["overall"] for p in per_cycle.values()) / len(per_cycle)}
  for category in categories:
    out[category] = sum(p.get(category, 0.0) for p in per_cycle.values()) / len(per_cycle)
  for c, p in per_cycle.items():
    out[f"cycle {c}"] = p["overall"]
  return out


def _reader(version: str, name: str):
  def read(path: str, split: Optional[str] = None) -> list[base.Example]:
    """HR-Bench ``version``'s questions, one per TSV row (every cycle of every question).

    Args:
      path: the folder holding ``hr_bench_<version>.tsv``, or the TSV itself.
      split: ``"test"`` (the only one).

    Raises:
      FileNotFoundError: the TSV is not there.
      BenchmarkError: a malformed header or row (file and ``index`` in the message); a bad image
        when it is read.
    """
    del split
    return read_tsv(_tsv_path(path, version), name)
  return read


_SOURCE = ("https://huggingface.co/datasets/DreamMr/HR-Bench ; https://github.com/DreamMr/HR-Bench "
           "(hrbench/vlmeval/dataset/image_mcq.py HRBenchDataset.evaluate) ; "
           "https://github.com/open-compass/VLMEvalKit/blob/main/vlmeval/dataset/utils/hrbench.py")
HRBENCH_4K = base.Benchmark(name="hrbench_4k", read=_reader("4k", "hrbench_4k"), splits=("test",),
                            aggregate=aggregate, circular=False, source=_SOURCE)
HRBENCH_8K = base.Benchmark(name="hrbench_8k", read=_reader("8k", "hrbench_8k"), splits=("test",),
                            aggregate=aggregate, circular=False, source=_SOURCE)
