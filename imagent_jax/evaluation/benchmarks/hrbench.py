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
Cross-instance Perception), ``cycle_category`` (the evaluation cycle the row belongs to) and
``image`` (the base64-encoded image). The paper counts 200 questions per version (100 FSP, 100
FCP); the files are larger because each question is a row in every cycle (by the column's name and
the official score, with its options in another order per cycle; not checked against the 1.9 / 4.6
GB files here). The official score averages the cycles' accuracies rather than requiring every
rotation right, so the benchmark is not ``circular`` here (``load`` must not rotate again).

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
import io
import os
import sys
from typing import Any, Iterator, Mapping, Optional, Sequence

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

  def open(self, max_pixels: Optional[int] = None):
    """The image, decoded, as RGB; errors name the TSV and the row's ``index``."""
    try:
      return super().open(max_pixels)
    except base.BenchmarkError as e:
      if e.record is None and e.path == self.name:
        raise base.BenchmarkError(self.tsv, self.record, e.message) from None
      raise


def _records(f) -> Iterator[tuple[int, bytes]]:
  """``(byte offset, raw bytes)`` of each record of a TSV opened in binary: one line, or several
  where a quoted cell holds a line break (a record's quotes always pair up: pandas quotes a cell
  with a tab, quote or line break and doubles its quotes)."""
  pos = 0
  first = True
  while True:
    line = f.readline()
    if not line:
      return
    if first and line.startswith(b"\xef\xbb\xbf"):
      pos, line = 3, line[3:]
    first = False
    start, parts, quotes = pos, [line], line.count(b'"')
    pos += len(line)
    while quotes % 2:
      more = f.readline()
      if not more:
        break
      parts.append(more)
      pos += len(more)
      quotes += more.count(b'"')
    yield start, parts[0] if len(parts) == 1 else b"".join(parts)


def _decode(raw: bytes, where: tuple[str, Any]) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise base.BenchmarkError(*where, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def _cells(raw: bytes, where: tuple[str, Any]) -> list[str]:
  """The cells of a record with quotes, by the csv module."""
  try:
    rows = list(csv.reader(io.StringIO(_decode(raw, where), newline=""), delimiter="\t"))
  except csv.Error as e:
    raise base.BenchmarkError(*where, f"not a TSV row ({e})") from None
  if len(rows) != 1:
    raise base.BenchmarkError(*where, f"not one TSV row (an unclosed quote?): {len(rows)} rows")
  return rows[0]


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


def _line_end(raw: bytes) -> int:
  return len(raw) - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0)


def _split_unquoted(raw: bytes, n: int, image_col: int, where: tuple[str, Any]) -> tuple[list[str], int, int]:
  """The ``n`` cells of a record without quotes (the image cell ``""``) and the image cell's byte
  range in ``raw``; the image's bytes are scanned for tabs but not copied or decoded."""
  end = _line_end(raw)
  lo = 0
  for _ in range(image_col):
    lo = raw.find(b"\t", lo, end) + 1
    if lo == 0:
      raise base.BenchmarkError(*where, f"has fewer cells than the header's {n}")
  hi = end
  for _ in range(n - 1 - image_col):
    hi = raw.rfind(b"\t", lo, hi)
    if hi < 0:
      raise base.BenchmarkError(*where, f"has fewer cells than the header's {n}")
  if raw.find(b"\t", lo, hi) >= 0:
    raise base.BenchmarkError(*where, f"has more cells than the header's {n}")
  before = raw[:lo - 1].split(b"\t") if image_col else []
  after = raw[hi + 1:end].split(b"\t") if image_col < n - 1 else []
  return [_decode(c, where) for c in before] + [""] + [_decode(c, where) for c in after], lo, hi


def _split_quoted(raw: bytes, n: int, image_col: int, where: tuple[str, Any]) -> tuple[list[str], int, int]:
  """``_split_unquoted`` for a record with quoted cells: the longest stretch between tabs, if it
  has no quote, is taken out before the csv module parses the rest and must come back as the image
  cell; otherwise the whole record is parsed and the image text looked up in ``raw`` (a short
  image cell, a row index, is then left in the cells, with the range ``(-1, -1)``)."""
  end = _line_end(raw)
  tabs, at = [-1], raw.find(b"\t", 0, end)
  while at >= 0:
    tabs.append(at)
    at = raw.find(b"\t", at + 1, end)
  tabs.append(end)
  k = max(range(len(tabs) - 1), key=lambda i: tabs[i + 1] - tabs[i])
  lo, hi = tabs[k] + 1, tabs[k + 1]
  if hi - lo > _REFERENCE_MAX and raw.find(b'"', lo, hi) < 0:
    cells = _cells(raw[:lo] + b"\x00" + raw[hi:], where)
    if len(cells) == n and cells[image_col] == "\x00":
      cells[image_col] = ""
      return cells, lo, hi
  cells = _cells(raw, where)
  if len(cells) != n:
    raise base.BenchmarkError(*where, f"has {len(cells)} cells, the header {n}")
  image = cells[image_col].strip()
  if len(image) <= _REFERENCE_MAX:  # a row index (or nothing): returned in the cell, no byte range
    return cells, -1, -1
  text = image.encode("utf-8")
  at = raw.find(text)
  if at < 0:
    raise base.BenchmarkError(*where, "the image cell is quoted or escaped; it is not plain base64")
  cells[image_col] = ""
  return cells, at, at + len(text)


def _check_base64(text: bytes, where: tuple[str, Any]):
  """Whether ``text`` (an image cell, or its first and last 4 KiB) is base64 text."""
  if not text.isascii() or text.translate(None, _B64_ALPHABET):
    raise base.BenchmarkError(*where, "the image is not valid base64 (characters outside the base64 alphabet)")


def _set_field_limit():
  limit = sys.maxsize
  while True:  # the base64 cells of 8K images are far over csv's default 128 KiB field limit
    try:
      csv.field_size_limit(limit)
      return
    except OverflowError:
      limit //= 10


def read_tsv(tsv: str, name: str) -> list[base.Example]:
  """The examples of one HR-Bench TSV file, in the file's order.

  Records are split at their tabs as bytes (a record with quoted cells goes through the csv module
  without its image cell), so the megabytes of an image cell are neither decoded nor copied; its
  first and last 4 KiB are checked to be base64 here, the rest when the image is read.
  """
  _set_field_limit()
  rows = []
  with open(tsv, "rb") as f:
    records = _records(f)
    try:
      _, raw = next(records)
    except StopIteration:
      raise base.BenchmarkError(tsv, None, "the file is empty (no header)") from None
    header = _cells(raw, (tsv, "header"))
    missing = [c for c in REQUIRED if c not in header]
    if missing:
      raise base.BenchmarkError(tsv, "header", f"missing column(s) {missing}; the header is {header[:20]}")
    col = {c: header.index(c) for c in header}
    image_col = col["image"]
    letters = [c for c in base.LETTERS if c in col]
    for n, (start, raw) in enumerate(records, 1):
      if not raw.strip():
        continue
      where = (tsv, f"row {n}")
      split = _split_quoted if b'"' in raw else _split_unquoted
      cells, lo, hi = split(raw, len(header), image_col, where)
      if lo < 0:
        lo = hi = 0
        cells[image_col] = cells[image_col].strip()
      while lo < hi and raw[lo] in b" \r\n":
        lo += 1
      while hi > lo and raw[hi - 1] in b" \r\n":
        hi -= 1
      if raw.startswith(b"data:", lo) and raw.find(b",", lo, lo + 200) >= 0:  # a data URI: base64 after the comma
        lo = raw.find(b",", lo, lo + 200) + 1
      if hi - lo > _REFERENCE_MAX:
        image, cell = "", (start + lo, hi - lo)
      else:
        image, cell = cells[image_col] or _decode(raw[lo:hi], where), None
      row = {c: cells[i] for c, i in col.items() if c != "image"}
      index = row["index"].strip()
      if not index:
        raise base.BenchmarkError(*where, "the 'index' cell is empty")
      where = (tsv, index)
      if cell is None and not image:
        raise base.BenchmarkError(*where, "the 'image' cell is empty")
      if cell is not None:
        _check_base64(raw[lo:min(hi, lo + 4096)] + raw[max(lo, hi - 4096):hi], where)
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
