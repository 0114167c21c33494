"""``tf_example.parse_example`` against TensorFlow's own ``tf.train.Example`` serialization, and
the tfds reader that uses it never importing TensorFlow."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imagent_jax.data import tf_example

tf = pytest.importorskip("tensorflow")


def _example(features: dict) -> bytes:
  feature = {}
  for name, (kind, values) in features.items():
    if kind == "bytes":
      feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    elif kind == "float":
      feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    elif kind == "int64":
      feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    else:
      feature[name] = tf.train.Feature()
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_parse_example_matches_tensorflow():
  rng = np.random.default_rng(0)
  png_like = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()  # > 127 bytes: multi-byte lengths
  features = {
      "images": ("bytes", [png_like, b"", b"\x00\xff" * 70]),
      "question": ("bytes", ["Which colour? é ü 中".encode()]),
      "index": ("int64", [0, 1, 127, 128, 2**31, 2**63 - 1, -1, -2**63, -300]),
      "box": ("int64", [3, 4, 50, 60]),
      "scores": ("float", [0.0, -1.5, 3.25e-8, float("inf")]),
      "empty_bytes": ("bytes", []),
      "no_kind": ("none", None),
  }
  record = _example(features)
  got = tf_example.parse_example(record)
  want = tf.train.Example.FromString(record).features.feature
  assert set(got) == set(want) == set(features)
  for name, feature in want.items():
    kind = feature.WhichOneof("kind")
    expected = list(getattr(feature, kind).value) if kind else []
    assert got[name] == expected, name
  assert got["index"][-3:] == [-1, -2**63, -300]
  assert got["images"][0] == png_like
  assert tf_example.parse_example(memoryview(record)) == got
  assert tf_example.parse_example(b"") == {}


def test_parse_example_reads_unpacked_scalars_and_merged_lists():
  # field 1 of Int64List unpacked (wire type 0), of FloatList unpacked (wire type 5): what older
  # writers emit; protobuf reads both, so must we. Built by hand: Feature{int64_list{1: 5, 1: 300}}
  int64_list = bytes([0x08, 5, 0x08, 0xAC, 0x02])
  float_list = bytes([0x0D]) + np.float32(2.5).tobytes()
  def entry(key: bytes, feature: bytes) -> bytes:
    body = bytes([0x0A, len(key)]) + key + bytes([0x12, len(feature)]) + feature
    return bytes([0x0A, len(body)]) + body
  feature_i = bytes([0x1A, len(int64_list)]) + int64_list + bytes([0x1A, len(int64_list)]) + int64_list
  feature_f = bytes([0x12, len(float_list)]) + float_list
  features = entry(b"i", feature_i) + entry(b"f", feature_f)
  record = bytes([0x0A, len(features)]) + features
  assert tf_example.parse_example(record) == {"i": [5, 300, 5, 300], "f": [2.5]}
  parsed = tf.train.Example.FromString(record).features.feature
  assert list(parsed["i"].int64_list.value) == [5, 300, 5, 300]
  assert list(parsed["f"].float_list.value) == [2.5]


@pytest.mark.parametrize("record", [b"\x0a\x05\x0a\x03", b"\x0a", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                                    b"\x0b\x00"])
def test_parse_example_rejects_malformed_records(record):
  with pytest.raises(ValueError):
    tf_example.parse_example(record)


def test_tfds_source_reads_without_importing_tensorflow(tmp_path):
  code = textwrap.dedent(f"""
      import sys
      from imagent_jax.data import synthetic, tfds as data_tfds
      builder = data_tfds.build_synthetic({str(tmp_path)!r}, sizes=(3, 1, 1), num_workers=0)
      source = data_tfds.TfdsSource(builder, "train")
      got, want = source[2], synthetic.generate_example(synthetic.split_seed(0, "train"), 2)
      assert [im.tobytes() for im in got["images"]] == [im.convert("RGB").tobytes() for im in want["images"]]
      for key in ("question", "options", "answer", "category", "target_image", "target_box"):
        assert got[key] == want[key], key
      assert "tensorflow" not in sys.modules, "reading imported tensorflow"
      print("ok")
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
