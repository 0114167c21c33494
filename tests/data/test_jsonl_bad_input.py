"""JSONL datasets are confined to their folder, every malformed line names its file and line, and
EXIF orientation is applied (one table per area)."""

import io
import json
import os

import pytest
from PIL import Image

from imagent_jax.data import jsonl
from imagent_jax.evaluation.benchmarks import base as bench_base
from imagent_jax.processing import images as images_lib

GOOD = {"images": ["in.png"], "question": "Which colour?", "options": ["red", "blue"], "answer": "A"}


def _dataset(tmp_path, line: str):
  data = tmp_path / "set"
  data.mkdir()
  Image.new("RGB", (8, 8), "red").save(data / "in.png")
  Image.new("RGB", (8, 8), "blue").save(tmp_path / "secret.png")  # beside the dataset, not in it
  os.symlink(tmp_path / "secret.png", data / "link.png")
  (data / "sub").mkdir()
  Image.new("RGB", (8, 8), "green").save(data / "sub" / "ok.png")
  os.symlink(data / "sub" / "ok.png", data / "inner_link.png")
  (data / "d.jsonl").write_text(json.dumps(GOOD) + "\n" + line + "\n")
  return data / "d.jsonl"


def _with_images(path):
  return json.dumps({**GOOD, "images": [path]})


CASES = [  # (line 2 of the file, the error kind, what the message says)
    (lambda t: _with_images(str(t / "secret.png")), "outside_root", "outside the dataset folder"),
    (lambda t: _with_images("../secret.png"), "outside_root", "outside the dataset folder"),
    (lambda t: _with_images("link.png"), "outside_root", "outside the dataset folder"),
    (lambda t: _with_images("in.png\x00.txt"), "bad_value", "NUL byte"),
    (lambda t: "[" * 100000 + "]" * 100000, "invalid_json", "nested too deeply"),
    (lambda t: '{"images": ["in.png"], "question": "q", "answer": ' + "9" * 5000 + "}", "invalid_json",
     "not readable JSON"),
    (lambda t: '{"images": ["in.png"], "question": "q", "answer": "x", "options": {"A": 1, "B": 2}}', "wrong_type",
     "options must all be non-empty strings"),
]


@pytest.mark.parametrize("make_line,kind,message", CASES)
def test_bad_lines_are_named_errors_or_counted_skips(tmp_path, make_line, kind, message):
  path = _dataset(tmp_path, make_line(tmp_path))
  with pytest.raises(jsonl.DataError, match=rf"d.jsonl:2: \[{kind}\] .*{message}"):
    jsonl.JsonlSource(str(path))
  skipped = jsonl.JsonlSource(str(path), on_error="skip")
  assert len(skipped) == 1 and skipped.error_counts == {kind: 1}
  assert skipped[0]["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_images_inside_the_root_are_read_and_image_root_widens_it(tmp_path):
  path = _dataset(tmp_path, _with_images("inner_link.png"))  # a symlink that stays inside: fine
  assert len(jsonl.JsonlSource(str(path))) == 2
  path.write_text(_with_images("../secret.png") + "\n")
  source = jsonl.JsonlSource(str(path), image_root=str(tmp_path))
  assert source[0]["images"][0].getpixel((0, 0)) == (0, 0, 255)


def _exif_jpeg(orientation: int) -> bytes:
  image = Image.new("RGB", (100, 50), "white")
  image.paste((255, 0, 0), (0, 0, 10, 10))  # a red corner: top-left as stored
  exif = Image.Exif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  image.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
  return buf.getvalue()


@pytest.mark.parametrize("orientation,size,red_at", [(1, (100, 50), (2, 2)), (6, (50, 100), (47, 2)),
                                                    (3, (100, 50), (97, 47)), (8, (50, 100), (2, 97))])
def test_exif_orientation_is_applied_everywhere(tmp_path, orientation, size, red_at):
  data = _exif_jpeg(orientation)
  image = images_lib.decode_image(data)
  assert image.size == size and image.getpixel(red_at)[0] > 200 and image.getpixel(red_at)[1] < 60
  (tmp_path / "p.jpg").write_bytes(data)
  assert jsonl.load_image(str(tmp_path / "p.jpg")).size == size
  assert bench_base.ImageRef("p", data=data).open().size == size


def test_decode_errors_have_kinds():
  with pytest.raises(images_lib.ImageDecodeError) as e:
    images_lib.decode_image(b"")
  assert e.value.kind == "empty_image"
  with pytest.raises(images_lib.ImageDecodeError) as e:
    images_lib.decode_image(b"GIF89a broken")
  assert e.value.kind == "corrupt_image"
  buf = io.BytesIO()
  Image.new("RGB", (40, 40)).save(buf, "PNG")
  with pytest.raises(images_lib.ImageDecodeError) as e:
    images_lib.decode_image(buf.getvalue(), max_pixels=100)
  assert e.value.kind == "decompression_bomb" and "1600 pixels" in str(e.value)
