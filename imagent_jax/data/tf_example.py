"""Reads serialized ``tf.train.Example`` records without TensorFlow.

tfds writes array_record files of ``tf.train.Example`` protos. Parsing them with
``tf.train.Example.FromString`` imports TensorFlow into the training process: ~0.5 GB of resident
memory and TensorFlow's thread pools, for a job that only needs the bytes of a few PNGs and
strings. The proto is small enough to read from its wire format directly::

  Example  { Features features = 1; }
  Features { map<string, Feature> feature = 1; }        # map entry: key = 1, value = 2
  Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
  BytesList { repeated bytes value = 1; }
  FloatList { repeated float value = 1 [packed = true]; }
  Int64List { repeated int64 value = 1 [packed = true]; }

``parse_example(record)`` returns ``{name: list}`` with bytes, float or int values; a feature with
no kind set gives ``[]``. Packed and unpacked repeated scalars are both accepted, as protobuf's own
parser does. Malformed records raise ``ValueError``.
"""

from __future__ import annotations

import struct

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  """The unsigned varint at ``buf[pos:]`` and the position after it."""
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes):
  """Yields ``(field_number, wire_type, value)`` for each field of one message: ``value`` is an int
  for varints, ``bytes`` for length-delimited and fixed-width fields."""
  pos, end = 0, len(buf)
  while pos < end:
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == _VARINT:
      value, pos = _varint(buf, pos)
    elif wire == _LENGTH:
      size, pos = _varint(buf, pos)
      if pos + size > end:
        raise ValueError("length-delimited field runs past the end of its message")
      value, pos = buf[pos:pos + size], pos + size
    elif wire in (_FIXED32, _FIXED64):
      width = 4 if wire == _FIXED32 else 8
      if pos + width > end:
        raise ValueError("fixed-width field runs past the end of its message")
      value, pos = buf[pos:pos + width], pos + width
    else:
      raise ValueError(f"unsupported wire type {wire} (field {number})")
    yield number, wire, value


def _signed64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _packed_varints(buf: bytes):
  pos = 0
  while pos < len(buf):
    v, pos = _varint(buf, pos)
    yield _signed64(v)


def _scalars(buf: bytes, name: str, single_wire: int, packed, single) -> list:
  """The values of a ``repeated`` scalar field 1 (``Int64List``, ``FloatList``): packed (one
  length-delimited run, decoded by ``packed``) or one value per field (``single_wire``, ``single``)."""
  out = []
  for number, wire, value in _fields(buf):
    if number != 1:
      continue
    if wire == _LENGTH:
      out.extend(packed(value))
    elif wire == single_wire:
      out.append(single(value))
    else:
      raise ValueError(f"{name} value with wire type {wire}")
  return out


def _unpack_floats(buf: bytes) -> tuple[float, ...]:
  if len(buf) % 4:
    raise ValueError("packed FloatList whose length is not a multiple of 4")
  return struct.unpack(f"<{len(buf) // 4}f", buf)


def _int64_list(buf: bytes) -> list[int]:
  return _scalars(buf, "Int64List", _VARINT, _packed_varints, _signed64)


def _float_list(buf: bytes) -> list[float]:
  return _scalars(buf, "FloatList", _FIXED32, _unpack_floats, lambda b: struct.unpack("<f", b)[0])


def _bytes_list(buf: bytes) -> list[bytes]:
  return [bytes(value) for number, wire, value in _fields(buf) if number == 1 and wire == _LENGTH]


_KINDS = {1: _bytes_list, 2: _float_list, 3: _int64_list}


def _feature(buf: bytes) -> list:
  kind, values = None, []
  for number, wire, value in _fields(buf):
    if number in _KINDS and wire == _LENGTH:
      # a oneof of messages, as protobuf reads it: a repeat of the same kind merges, another kind replaces
      values = (values if number == kind else []) + _KINDS[number](value)
      kind = number
  return values


def parse_example(record: bytes) -> dict[str, list]:
  """The features of one serialized ``tf.train.Example``.

  Args:
    record: the serialized proto (e.g. one array_record record of a tfds dataset).

  Returns:
    ``{feature name: values}``: a list of ``bytes`` (BytesList), ``float`` (FloatList) or ``int``
    (Int64List); ``[]`` for a feature with no kind set.

  Raises:
    ValueError: the record is not a well-formed ``tf.train.Example``.
  """
  record = bytes(record)  # bytes stay as they are; a memoryview or bytearray is copied once
  out: dict[str, list] = {}
  for number, wire, features in _fields(record):
    if number != 1 or wire != _LENGTH:
      continue
    for f_number, f_wire, entry in _fields(features):
      if f_number != 1 or f_wire != _LENGTH:
        continue
      key, value = b"", b""
      for e_number, e_wire, e_value in _fields(entry):
        if e_wire != _LENGTH:
          continue
        if e_number == 1:
          key = e_value
        elif e_number == 2:
          value = e_value
      out[key.decode("utf-8")] = _feature(value)
  return out
