"""Reading Hugging Face parquet files, as the ``datasets`` library writes them, for the readers of
benchmarks published on the Hub (MuirBench, BLINK, MMIU).

A split of a Hub dataset is one or more shards ``<split>-<k>-of-<n>.parquet`` (``datasets``'
``push_to_hub`` names them so; a single file may also be ``<split>.parquet``); an ``Image`` feature
is stored as a struct ``{bytes: binary, path: string}`` with the encoded image in ``bytes`` (a list
of images, ``Sequence(Image())``, as a list of such structs). ``pyarrow`` reads them; pandas and
``datasets`` are not needed.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Optional, Sequence

from imagent_jax.evaluation.benchmarks import base


def split_files(folder: str, split: str) -> list[str]:
  """The parquet shards of ``split`` in ``folder`` (``<split>-*.parquet`` or ``<split>.parquet``), sorted.

  Raises:
    FileNotFoundError: ``folder`` is missing or holds no shard of ``split``.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder} is not a folder (expected the {split!r} parquet shards in it)")
  files = sorted(glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(split)}-*.parquet")))
  single = os.path.join(folder, f"{split}.parquet")
  if os.path.isfile(single):
    files.insert(0, single)
  if not files:
    raise FileNotFoundError(f"{folder} holds no {split}-*.parquet shard (expected e.g. "
                            f"{os.path.join(folder, split + '-00000-of-00001.parquet')})")
  return files


def read_records(path: str, columns: Sequence[str], optional: Sequence[str] = ()) -> list[dict[str, Any]]:
  """The rows of a parquet file as dicts of ``columns`` (and of those of ``optional`` it has).

  Raises:
    FileNotFoundError: no such file.
    BenchmarkError: not a parquet file pyarrow can read, or a column of ``columns`` is missing.
  """
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  try:
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
      raise base.BenchmarkError(path, None, f"missing column(s) {missing} (the file has {names})")
    wanted = list(columns) + [c for c in optional if c in names and c not in columns]
    return pq.read_table(path, columns=wanted).to_pylist()
  except (pa.ArrowException, OSError) as e:
    raise base.BenchmarkError(path, None, f"not a parquet file pyarrow can read ({type(e).__name__}: {e})") from None


def record_id(value: Any, *, path: str, row: int, seen: dict[str, str], column: str = "idx") -> tuple[str, str]:
  """``(id, record name)`` of a row whose id is in ``column``: the id stripped, unique across the
  split (``seen`` maps the ids read so far to their file); ``BenchmarkError`` when empty or repeated."""
  qid = "" if value is None else str(value).strip()
  record = f"{column} {qid}" if qid else f"row {row}"
  if not qid:
    raise base.BenchmarkError(path, record, f"{column} is empty")
  if qid in seen:
    raise base.BenchmarkError(path, record, f"{column} repeats (first in {seen[qid]}); ids must be unique")
  seen[qid] = path
  return qid, record


def string_list(value: Any, *, path: str, record: str, what: str) -> list[str]:
  """``value`` when it is a list of strings (a parquet list column), else ``BenchmarkError``."""
  if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
    raise base.BenchmarkError(path, record, f"{what} must be a list of strings, got {value!r}")
  return value


def image_ref(value: Any, *, path: str, record: Any, what: str, root: Optional[str] = None) -> base.ImageRef:
  """The ``ImageRef`` of one stored ``Image`` value: ``{"bytes": ..., "path": ...}`` (or raw bytes).

  The encoded bytes are kept (decoded only when the example's images are read). A struct without
  bytes falls back to its ``path`` when that names an existing file (absolute, or under ``root``).

  Args:
    value: the cell.
    path, record: the file and record, for the name and the errors.
    what: the image's column (and position), e.g. ``"image_2"`` or ``"image_list[3]"``.
    root: where a relative ``path`` of a struct without bytes is looked up.

  Raises:
    BenchmarkError: a null image, or one with neither bytes nor an existing file.
  """
  name = f"{path}:{record}:{what}"
  if value is None:
    raise base.BenchmarkError(path, record, f"{what} is null (no image)")
  if isinstance(value, (bytes, bytearray)):
    data, file = bytes(value), None
  elif isinstance(value, dict):
    data, file = value.get("bytes"), value.get("path")
  else:
    raise base.BenchmarkError(path, record, f"{what} is a {type(value).__name__}, not an image struct "
                                            "{bytes, path}")
  if data is not None:
    if not isinstance(data, (bytes, bytearray)) or not data:
      raise base.BenchmarkError(path, record, f"{what} has empty or non-binary bytes")
    return base.ImageRef(name=name, data=bytes(data))
  if file:
    for candidate in ([file] if os.path.isabs(file) else []) + ([os.path.join(root, file)] if root else []):
      if os.path.isfile(candidate):
        return base.ImageRef(name=candidate, path=candidate)
    raise base.BenchmarkError(path, record, f"{what} has no bytes and its path {file!r} is not a file"
                                            + (f" under {root}" if root else ""))
  raise base.BenchmarkError(path, record, f"{what} has neither bytes nor a path (no image)")
