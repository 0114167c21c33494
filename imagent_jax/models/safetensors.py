"""Safetensors files, read and written by us: memory-mapped tensor by tensor, every dtype
(bfloat16 and float8 included, via ``ml_dtypes``) as numpy, no framework and nothing unpickled."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsReader:
  """A memory-mapped safetensors file: the header is parsed up front, tensors are read on demand.

  We read the format ourselves (8-byte little-endian header length, a JSON header of
  ``{name: {dtype, shape, data_offsets}}``, then the raw bytes) so that every dtype, bfloat16
  included, comes back as a numpy array (via ``ml_dtypes``) without any framework.
  """

  def __init__(self, filename: str):
    self.filename = filename
    size = os.path.getsize(filename)
    with open(filename, "rb") as f:
      head = f.read(8)
      n = int.from_bytes(head, "little") if len(head) == 8 else -1
      if not 0 < n <= min(size - 8, _MAX_HEADER):
        raise ValueError(f"{filename} is not a safetensors file (header length {n}, file size {size})")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f"{filename} is not a safetensors file (unreadable JSON header: {e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
      try:
        dtype = ST_TO_NP[e["dtype"]]
        shape = tuple(int(s) for s in e["shape"])
        begin, end = (int(o) for o in e["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise ValueError(f"{filename}: tensor {name!r} has an unsupported or malformed header entry {e!r}") from None
      if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size or begin < 0:
        raise ValueError(f"{filename}: tensor {name!r} has data offsets {[begin, end]} that do not fit its shape "
                         f"{list(shape)} and dtype {e['dtype']} or the file size {size}; the file is truncated "
                         "or corrupt")
      self.entries[name] = (dtype, shape, begin, end)
    self._mmap: np.memmap | None = None

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name][1]

  def read(self, name: str) -> np.ndarray:
    """A read-only view of tensor ``name`` on the mapped file (no copy)."""
    dtype, shape, begin, end = self.entries[name]
    if begin == end:
      return np.zeros(shape, dtype)
    if self._mmap is None:
      self._mmap = np.memmap(self.filename, dtype=np.uint8, mode="r")
    raw = self._mmap[self._start + begin:self._start + end]
    x = raw.view(dtype).reshape(shape)
    return x if sys.byteorder == "little" else x.byteswap().view(dtype.newbyteorder())

  def close(self):
    self._mmap = None


def write_safetensors(filename: str, items: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                       fetch: Callable[[str], np.ndarray | None], metadata: Mapping[str, str]) -> None:
  """Writes a safetensors file, pulling one tensor at a time from ``fetch(name)``.

  The header is written first (offsets follow from shapes and dtypes), then each tensor's bytes.
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata)}
  offset = 0
  for name, dtype, shape in items:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
  with open(filename, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for name, dtype, shape in items:
      x = np.ascontiguousarray(fetch(name))
      if x.dtype != dtype or x.shape != tuple(shape):
        raise AssertionError(f"{name}: got {x.dtype}{list(x.shape)}, planned {dtype}{list(shape)}")
      if sys.byteorder != "little":
        x = x.byteswap()
      f.write(x.reshape(-1).view(np.uint8).data)
