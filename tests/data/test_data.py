"""Tests for imagent_jax.data: synthetic fine-grained QA, tfds builder, JSONL source, grain pipeline."""

import io
import json
import os
import struct
import time
import zlib

import grain
import numpy as np
import pytest
from etils import epath
from PIL import Image, ImageDraw
from scipy import ndimage

from imagent_jax.agent import tools
from imagent_jax.data import pipeline, synthetic
from imagent_jax.data import sources
from imagent_jax.data import tfds as data_tfds
from imagent_jax.data import jsonl
from imagent_jax.data.synthetic import categories, scenes

# Small images: fast to draw and decode, for tests that are not about legibility.
SMALL = synthetic.DifficultyConfig(image_side=(96, 128), cluster_side=60, num_distractors=2, num_clutter=2)
TINY_PROCESSOR = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, view_max_pixels=28 * 28 * 64, min_box_side=28.0)


def pixels(image):
  return np.asarray(image.convert("RGB"))


def same_images(a, b):
  return len(a) == len(b) and all(x.size == y.size and np.array_equal(pixels(x), pixels(y)) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# Synthetic generator.


def test_generate_is_a_pure_function_of_seed_and_index():
  a = synthetic.generate_example(3, 17)
  for _ in range(3):
    synthetic.generate_example(3, 5)  # other draws in between change nothing
  b = synthetic.generate_example(3, 17)
  assert same_images(a["images"], b["images"])
  assert {k: v for k, v in a.items() if k != "images"} == {k: v for k, v in b.items() if k != "images"}
  assert all(im.mode == "RGB" for im in a["images"])
  c, d = synthetic.generate_example(3, 18), synthetic.generate_example(4, 17)
  assert not same_images(a["images"], c["images"]) and not same_images(a["images"], d["images"])
  png = synthetic.generate_example(3, 17, image_format="png")
  assert same_images(a["images"], [Image.open(io.BytesIO(p)) for p in png["images"]])


def test_generate_rejects_bad_seeds():
  with pytest.raises(ValueError, match="seed"):
    synthetic.generate_example(-1, 0)
  with pytest.raises(ValueError, match="index"):
    synthetic.generate_example(0, 1.5)


def _palette(example_index, category, seed=11):
  difficulty = synthetic.DifficultyConfig(categories=(category,))
  ex = synthetic.generate_example(seed, example_index, difficulty, image_format="palette")
  return ex, [np.asarray(im) for im in ex["images"]]


def _shape_of(mask):
  """The shape name whose drawing is exactly ``mask`` (a square boolean array), or None."""
  extent = mask.shape[0]
  for shape in synthetic.SHAPES:
    canvas = Image.new("L", (extent, extent), 0)
    scenes._draw_shape(ImageDraw.Draw(canvas), shape, 0, 0, extent, 1)
    if np.array_equal(np.asarray(canvas) == 1, mask):
      return shape
  return None


def _marks(array, color):
  """``[(shape or None, (y0, x0, y1, x1))]`` of the connected marks of ``color`` in a palette array."""
  labels, _ = ndimage.label(array == scenes._MARK_INDEX[color])
  out = []
  for sl in ndimage.find_objects(labels):
    mask = (labels[sl] > 0)
    out.append((_shape_of(mask) if mask.shape[0] == mask.shape[1] else None,
                (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)))
  return out


def _check_answer_in_pixels(ex, arrays):
  """Reads the answer back from the drawn pixels, category by category."""
  answer = ex["options"][ord(ex["answer"]) - ord("A")]
  k, (x0, y0, x1, y1) = ex["target_image"], ex["target_box"]
  crop = arrays[k][y0:y1, x0:x1]
  words = ex["question"].rstrip("?").split()
  category = ex["category"]
  if category in ("digit", "letter"):
    mask = np.asarray(scenes._glyph_mask(answer, 1)) > 0
    assert (crop[0] == scenes._TAG_INDEX).all()
    assert np.array_equal(crop[1:-1, 1:-1] == scenes._INK_INDEX, mask)
  elif category == "color":
    shape = words[-1]
    assert _shape_of(crop == scenes._MARK_INDEX[answer]) == shape
    for color in ex["options"]:  # every option colour is drawn in that image
      assert _marks(arrays[k], color)
    assert sum(s == shape for c in synthetic.MARK_COLORS for s, _ in _marks(arrays[k], c)) == 1
  elif category == "shape":
    color = words[-2]
    assert _shape_of(crop == scenes._MARK_INDEX[color]) == answer
    assert len(_marks(arrays[k], color)) == 1
  elif category == "locate":
    color, shape = words[-2], words[-1]
    assert _shape_of(crop == scenes._MARK_INDEX[color]) == shape
    for j, array in enumerate(arrays):
      marks = _marks(array, color)
      assert len(marks) == 1 and (marks[0][0] == shape) == (j == k)
  elif category == "count":
    color, plural = words[3], words[4]
    marks = _marks(arrays[k], color)
    shape = next(s for s in synthetic.SHAPES if categories._PLURALS[s] == plural)
    assert sum(s == shape for s, _ in marks) == int(answer)
    assert len(marks) == synthetic.DifficultyConfig().max_count + 1
    for _, (a0, b0, a1, b1) in marks:  # all inside the target box
      assert y0 <= a0 and x0 <= b0 and a1 <= y1 and b1 <= x1
  elif category == "mosaic":  # the target is the top-left square of a 2 x 2 mosaic of the option colours
    side = synthetic.DifficultyConfig().mosaic_square
    assert (x1 - x0, y1 - y0) == (side, side) and (crop == scenes._MARK_INDEX[answer]).all()
    mosaic = arrays[k][y0:y0 + 2 * side, x0:x0 + 2 * side]
    index = {scenes._MARK_INDEX[c]: c for c in synthetic.MARK_COLORS}
    assert sorted(index[int(mosaic[dy, dx])] for dy in (0, side) for dx in (0, side)) == sorted(ex["options"])
  else:
    raise AssertionError(f"untested category {category}")


@pytest.mark.parametrize("category", sorted(synthetic.CATEGORIES))
def test_every_category_makes_valid_examples(category):
  letters_seen = set()
  for index in range(6):
    ex, arrays = _palette(index, category)
    assert ex["category"] == category
    n = len(ex["images"])
    lo, hi = synthetic.DifficultyConfig().num_images
    assert max(lo, synthetic.CATEGORIES[category].min_images) <= n <= hi
    assert 2 <= len(ex["options"]) <= 4 and len(set(ex["options"])) == len(ex["options"])
    assert ex["answer"] in "ABCD"[:len(ex["options"])]
    letters_seen.add(ex["answer"])
    assert 0 <= ex["target_image"] < n
    x0, y0, x1, y1 = ex["target_box"]
    width, height = ex["images"][ex["target_image"]].size
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    if category != "locate":
      assert f"image {ex['target_image'] + 1}" in ex["question"]
    else:
      assert ex["options"] == [f"Image {j + 1}" for j in range(n)]
    sides = [s for im in ex["images"] for s in im.size]
    assert all(800 <= s <= 1216 for s in sides)
    _check_answer_in_pixels(ex, arrays)
  assert len(letters_seen) > 1  # the answer letter varies


def test_images_per_question_cover_the_range():
  counts = {len(synthetic.generate_example(0, i, SMALL)["images"]) for i in range(40)}
  assert counts == {1, 2, 3, 4}


def test_detail_illegible_at_base_view_and_legible_in_a_zoom():
  """At the tiny config's resolution the deciding detail spans < 2 base-view pixels; ``confirm``
  on the target box shows it over more than 10 pixels (through the real tool)."""
  seen = set()
  for index in range(24):
    ex = synthetic.generate_example(5, index)
    seen.add(ex["category"])
    sizes = tools.legibility(ex, **TINY_PROCESSOR)
    assert sizes["base_px"] < 2.0, (ex["category"], sizes["base_px"])
    assert sizes["zoom_px"] > 10.0, (ex["category"], sizes["zoom_px"])
    base = sizes["base_view"]
    assert base.width * base.height <= TINY_PROCESSOR["max_pixels"]
    # The whole mark (or tag) fits in a 3.5 x 3.5 patch of the base view; the zoom shows it
    # over more than 10 x 10 pixels.
    image, zoom = ex["images"][ex["target_image"]], sizes["zoom_view"]
    x0, y0, x1, y1 = ex["target_box"]
    if ex["category"] != "count":
      assert (x1 - x0) * base.width / image.width <= 3.5 and (y1 - y0) * base.height / image.height <= 3.5
      assert min(x1 - x0, y1 - y0) * sizes["zoom_scale"] > 10
    assert zoom.width * zoom.height <= TINY_PROCESSOR["view_max_pixels"]
  assert len(seen) >= 4


def test_difficulty_config_is_validated_and_scales_to_a_processor():
  with pytest.raises(ValueError, match="num_images"):
    synthetic.DifficultyConfig(num_images=(1, 5))
  with pytest.raises(ValueError, match="unknown categories"):
    synthetic.DifficultyConfig(categories=("nope",))
  with pytest.raises(ValueError, match="cluster_side"):
    synthetic.DifficultyConfig(cluster_side=20)
  with pytest.raises(ValueError, match="no category"):
    synthetic.DifficultyConfig(num_images=(1, 1), categories=("locate",))
  big = synthetic.DifficultyConfig.for_processor(28 * 28 * 1280)
  side = big.image_side[0]
  w, h = synthetic.shown_size(side, side, 28 * 28 * 1280)
  assert 7 * w / side <= 2.0 and big.image_side[1] > side
  assert synthetic.DifficultyConfig(num_images=[2, 3]).num_images == (2, 3)  # lists from configs
  with pytest.raises(ValueError, match="option_order"):
    synthetic.DifficultyConfig(option_order="sorted")


def test_canonical_option_order_keeps_the_scene_and_the_answer():
  seen_shape_orders = set()
  for category in ("shape", "color", "digit", "count"):
    for index in range(12):
      rand = synthetic.generate_example(3, index, synthetic.DifficultyConfig(categories=(category,)))
      canon = synthetic.generate_example(
          3, index, synthetic.DifficultyConfig(categories=(category,), option_order="canonical"))
      # Same pixels and target; only the listing order of the options changes.
      for a, b in zip(rand["images"], canon["images"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert rand["target_box"] == canon["target_box"] and sorted(rand["options"]) == sorted(canon["options"])
      letters = synthetic.OPTION_LETTERS
      assert rand["options"][letters.index(rand["answer"])] == canon["options"][letters.index(canon["answer"])]
      if category == "shape":
        seen_shape_orders.add(tuple(canon["options"]))
        assert canon["options"] == list(synthetic.SHAPES)  # four shapes: the letter names the shape
      elif category == "color":
        assert canon["options"] == sorted(canon["options"], key=synthetic.MARK_COLORS.index)
      else:
        assert canon["options"] == sorted(canon["options"], key=lambda o: (len(o), o))
  assert len(seen_shape_orders) == 1


def test_box_hint_names_the_target_region_in_the_pixels_the_model_sees():
  from imagent_jax.agent import protocol, tools
  max_pixels = 28 * 28 * 64
  tcfg = tools.ToolConfig(view_max_pixels=max_pixels, input_min_pixels=56 * 56, input_max_pixels=max_pixels)
  hinted = 0
  for index in range(16):
    plain = synthetic.generate_example(5, index, synthetic.DifficultyConfig())
    ex = synthetic.generate_example(5, index, synthetic.DifficultyConfig(box_hint_pixels=max_pixels))
    for a, b in zip(plain["images"], ex["images"]):  # same scene; only the question text grows
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if not synthetic.CATEGORIES[ex["category"]].hintable:  # locate: the hint would name the answer
      assert ex["question"] == plain["question"]
      continue
    hinted += 1
    k = ex["target_image"]
    head, tail = ex["question"].split(" The detail is at ")
    assert head == plain["question"] and tail.endswith(f" in image {k + 1}.")
    box = json.loads(tail.split(" in image ")[0])
    # The box is in the pixels the processor shows image k at, and a confirm call on it covers the target.
    ctx = tools.ToolContext(ex["images"], tcfg)
    (ws, hs), (w0, h0) = ctx.shown_sizes[k], ex["images"][k].size
    assert (ws, hs) == synthetic.shown_size(w0, h0, max_pixels) and ws * hs <= max_pixels
    x0, y0, x1, y1 = ex["target_box"]
    assert box[0] * w0 / ws <= x0 and box[1] * h0 / hs <= y0 and box[2] * w0 / ws >= x1 - 1 and box[3] * h0 / hs >= y1 - 1
    assert (box[2] - box[0]) * w0 / ws < 4 * (x1 - x0 + 2 * synthetic.HINT_PAD)  # tight: not the whole image
    result = tools.run_tool_call(ctx, protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box}))
    assert result.ok, result.text
  assert hinted >= 8
  with pytest.raises(ValueError, match="box_hint_pixels"):
    synthetic.DifficultyConfig(box_hint_pixels=-1)


def test_synthetic_source():
  source = synthetic.SyntheticSource(5, seed=2, difficulty=SMALL)
  assert len(source) == 5
  ex = source[3]
  assert set(ex) == set(synthetic.EXAMPLE_KEYS)
  assert same_images(ex["images"], synthetic.generate_example(2, 3, SMALL)["images"])
  with pytest.raises(IndexError):
    source[5]


def test_on_the_fly_source_needs_no_tfds(monkeypatch, tmp_path):
  """``data.source="synthetic"`` (what a machine without TensorFlow uses) draws the same examples
  as the tfds build, without importing tensorflow_datasets anywhere on the way."""
  import importlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from imagent_jax.stages import build
  from imagent_jax.config import schema  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # any import of it now raises ImportError
  monkeypatch.delitem(sys.modules, "imagent_jax.data.tfds", raising=False)
  config = schema.get_config()
  config.data.source = "synthetic"
  source = build.data_source(config, str(tmp_path), "validation")
  seed = synthetic.split_seed(config.data.seed, "validation")
  assert seed == 3 * config.data.seed + 1
  want = synthetic.generate_example(seed, 2, build.difficulty(config))
  assert source[2]["question"] == want["question"] and same_images(source[2]["images"], want["images"])
  assert len(build.eval_examples(config, str(tmp_path), "test", count=3)) == 3
  with pytest.raises(ImportError):  # the guard above holds: the tfds builder cannot be imported here
    importlib.import_module("imagent_jax.data.tfds")


# ----------------------------------------------------------------------------------------------
# tfds builder.

SIZES = (64, 16, 16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  start = time.perf_counter()
  builder = data_tfds.build_synthetic(data_dir, sizes=SIZES)
  return builder, data_dir, time.perf_counter() - start


def test_builder_writes_array_record_splits(built):
  builder, data_dir, _ = built
  assert builder.info.file_format.value == "array_record"
  for split, size in zip(data_tfds.SPLITS, SIZES):
    assert builder.info.splits[split].num_examples == size
    files = list(epath.Path(builder.data_dir).glob(f"synthetic_mifg-{split}.array_record*"))
    assert files, split
  assert str(builder.data_dir).startswith(str(data_dir))


def test_builder_reads_back_the_generated_examples(built):
  builder, _, _ = built
  for split, size in zip(data_tfds.SPLITS, SIZES):
    source = data_tfds.TfdsSource(builder, split)
    assert len(source) == size
    seed = synthetic.split_seed(0, split)
    for index in range(0, size, 4 if split == "train" else 1):  # rows of train: 0, 4, ... (time)
      got, want = source[index], synthetic.generate_example(seed, index)
      assert same_images(got["images"], want["images"]), (split, index)
      for key in ("question", "options", "answer", "category", "target_image", "target_box"):
        assert got[key] == want[key], (split, index, key)
      assert got["id"].endswith(f"/{split}/{index}")
      assert all(im.mode == "RGB" for im in got["images"])


def test_builder_splits_use_disjoint_seeds(built):
  builder, _, _ = built
  seeds = {synthetic.split_seed(s, split) for s in range(50) for split in data_tfds.SPLITS}
  assert len(seeds) == 150
  first = [data_tfds.TfdsSource(builder, split)[0] for split in data_tfds.SPLITS]
  assert len({(e["question"], e["images"][0].size) for e in first}) == 3


def test_build_again_is_fast_and_settings_get_their_own_folder(built):
  builder, data_dir, _ = built
  start = time.perf_counter()
  again = data_tfds.build_synthetic(data_dir, sizes=SIZES)
  assert time.perf_counter() - start < 2.0
  assert again.data_dir == builder.data_dir
  other = data_tfds.make_config(SIZES, difficulty=synthetic.DifficultyConfig(mark_size=(6.0, 6.5)))
  assert other.name != builder.builder_config.name
  assert data_tfds.make_config(SIZES).name == builder.builder_config.name


def test_raw_tfds_data_source_goes_through_the_pipeline(built):
  builder, _, _ = built
  it = pipeline.make_iterator(builder.as_data_source("validation"), batch_size=4, seed=0, num_epochs=1)
  batches = list(it)
  assert sum(len(b) for b in batches) == 16
  assert all(im.mode == "RGB" for b in batches for e in b for im in e["images"])


# ----------------------------------------------------------------------------------------------
# JSONL.


def _save(path, image, fmt="PNG"):
  image.save(path, format=fmt)
  return os.path.basename(path)


def _good_records(folder):
  """Three records whose images use several modes (all must come out RGB)."""
  names = [
      _save(folder / "rgb.png", Image.new("RGB", (40, 30), (200, 10, 10))),
      _save(folder / "grey.png", Image.new("L", (20, 50), 128)),
      _save(folder / "rgba.png", Image.new("RGBA", (33, 33), (0, 0, 255, 128))),
      _save(folder / "pal.gif", Image.new("P", (16, 16), 3), "GIF"),
      _save(folder / "deep.png", Image.new("I;16", (12, 10), 40000)),
      _save(folder / "cmyk.jpg", Image.new("CMYK", (24, 24), (0, 255, 0, 0)), "JPEG"),
  ]
  return [
      {"images": names[:2], "question": "Which is red?", "options": ["Image 1", "Image 2"], "answer": "A",
       "category": "color", "target_image": 0, "target_box": [0, 0, 10, 10]},
      {"images": names[2:5], "question": "What is grey?", "options": {"B": "two", "A": "one", "C": "three"},
       "answer": "three", "id": 7},
      {"images": names[5:], "question": "How many?", "answer": 3},
  ]


def test_jsonl_reads_a_good_file(tmp_path):
  jsonl.write_jsonl(tmp_path / "data.jsonl", _good_records(tmp_path))
  (tmp_path / "data.jsonl").write_text((tmp_path / "data.jsonl").read_text() + "\n  \n")  # blank lines are fine
  source = sources.JsonlSource(tmp_path)  # a folder: its *.jsonl files
  assert len(source) == 3 and source.skipped == 0
  a, b, c = source[0], source[1], source[2]
  assert set(a) == set(synthetic.EXAMPLE_KEYS)
  assert [im.size for im in a["images"]] == [(40, 30), (20, 50)]
  assert all(im.mode == "RGB" for e in (a, b, c) for im in e["images"])
  assert pixels(a["images"][0])[0, 0].tolist() == [200, 10, 10]
  assert pixels(b["images"][2])[0, 0].tolist() == [156, 156, 156]  # 16-bit 40000 -> 8 bits
  assert a["target_box"] == [0, 0, 10, 10] and a["target_image"] == 0 and a["category"] == "color"
  assert b["options"] == ["one", "two", "three"] and b["answer"] == "three" and b["id"] == "7"
  assert c["options"] is None and c["answer"] == "3" and c["target_image"] == -1 and c["target_box"] is None
  assert a["id"] == "data.jsonl:1"


GOOD = {"images": ["ok.png"], "question": "Q?", "options": ["x", "y"], "answer": "B"}

# (line written as line 2, error kind)
BAD_LINES = [
    ('{"images": ["ok.png"], "question": ', "invalid_json"),
    ("[1, 2, 3]", "not_an_object"),
    (json.dumps({"images": ["ok.png"], "question": "Q?"}), "missing_field"),
    (json.dumps({**GOOD, "question": 5}), "wrong_type"),
    (json.dumps({**GOOD, "images": "ok.png"}), "wrong_type"),
    (json.dumps({**GOOD, "answer": None}), "wrong_type"),
    (json.dumps({**GOOD, "options": "x, y"}), "wrong_type"),
    (json.dumps({**GOOD, "answer": "C"}), "bad_value"),
    (json.dumps({**GOOD, "options": {"A": "x", "C": "y"}}), "bad_value"),
    (json.dumps({**GOOD, "images": []}), "bad_value"),
    (json.dumps({**GOOD, "target_image": 3}), "bad_value"),
    (json.dumps({**GOOD, "images": ["nope.png"]}), "missing_image"),
    (json.dumps({**GOOD, "images": ["empty.png"]}), "empty_image"),
]


def _bomb_header_png(width, height):
  """A PNG with only a header: huge dimensions, no pixel data."""
  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
          + chunk(b"IEND", b""))


def _write_bad_set(folder, line2):
  _save(folder / "ok.png", Image.new("RGB", (8, 8), "white"))
  (folder / "empty.png").write_bytes(b"")
  (folder / "garbage.png").write_bytes(b"this is not an image at all")
  good = io.BytesIO()
  Image.new("RGB", (64, 64), "red").save(good, format="PNG")
  (folder / "truncated.png").write_bytes(good.getvalue()[:60])
  (folder / "bomb.png").write_bytes(_bomb_header_png(20000, 20000))
  _save(folder / "big.png", Image.new("RGB", (100, 100), "blue"))
  path = folder / "set.jsonl"
  path.write_text("\n".join([json.dumps(GOOD), line2, json.dumps(GOOD)]) + "\n")
  return str(path)


@pytest.mark.parametrize("line, kind", BAD_LINES)
def test_jsonl_bad_record_raises_with_file_and_line_or_is_counted(tmp_path, line, kind):
  path = _write_bad_set(tmp_path, line)
  with pytest.raises(jsonl.DataError) as info:
    sources.JsonlSource(path)
  err = info.value
  assert (err.path, err.line, err.kind) == (path, 2, kind)
  assert f"{path}:2: [{kind}]" in str(err)
  source = sources.JsonlSource(path, on_error="skip")
  assert len(source) == 2 and source.skipped == 1 and source.error_counts[kind] == 1
  assert source.errors[0].line == 2


# (image file, error kind) of problems found only when the example is read
LAZY_BAD = [("garbage.png", "corrupt_image"), ("truncated.png", "corrupt_image"),
            ("bomb.png", "decompression_bomb"), ("big.png", "decompression_bomb")]


@pytest.mark.parametrize("image, kind", LAZY_BAD)
def test_jsonl_bad_image_is_found_when_read(tmp_path, image, kind):
  path = _write_bad_set(tmp_path, json.dumps({**GOOD, "images": ["ok.png", image]}))
  limit = dict(max_image_pixels=5000)  # big.png (10000 pixels) counts as a bomb under this limit
  source = sources.JsonlSource(path, **limit)  # images are not opened yet
  assert len(source) == 3
  assert source[0]["images"][0].size == (8, 8)
  with pytest.raises(jsonl.DataError) as info:
    source[1]
  assert (info.value.path, info.value.line, info.value.kind) == (path, 2, kind)
  assert "image 1" in str(info.value) and image in str(info.value)
  skipping = sources.JsonlSource(path, on_error="skip", **limit)
  assert skipping[1] is None and skipping.error_counts[kind] == 1
  batches = list(pipeline.make_iterator(skipping, batch_size=2, seed=0, shuffle=False, num_epochs=1))
  assert [e["id"] for b in batches for e in b] == ["set.jsonl:1", "set.jsonl:3"]


def test_jsonl_source_registry_and_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError):
    sources.JsonlSource(tmp_path / "none.jsonl")
  with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
    sources.JsonlSource(tmp_path)
  path = _write_bad_set(tmp_path, json.dumps(GOOD))
  assert len(sources.make_source("jsonl", sources.SourceRequest(path=str(path)))) == 3
  with pytest.raises(ValueError, match="needs config.data.validation_path"):
    sources.make_source("jsonl", sources.SourceRequest(split="validation"))
  with pytest.raises(ValueError, match="unknown data source"):
    sources.make_source("nope", sources.SourceRequest())


# ----------------------------------------------------------------------------------------------
# grain pipeline.


def _ids(batches):
  return [[e["id"] for e in b] for b in batches]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_iterator_is_deterministic_and_reshuffles_each_epoch():
  source = synthetic.SyntheticSource(10, seed=1, difficulty=SMALL)
  a = _ids(_take(pipeline.make_iterator(source, batch_size=5, seed=7), 6))
  b = _ids(_take(pipeline.make_iterator(source, batch_size=5, seed=7), 6))
  c = _ids(_take(pipeline.make_iterator(source, batch_size=5, seed=8), 6))
  assert a == b and a != c
  flat = [i for batch in a for i in batch]
  epochs = [flat[0:10], flat[10:20], flat[20:30]]
  assert all(sorted(e) == sorted(source[i]["id"] for i in range(10)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  plain = _ids(pipeline.make_iterator(source, batch_size=4, seed=0, shuffle=False, num_epochs=1))
  assert plain == [[f"synthetic:1:{i}" for i in range(j, min(j + 4, 10))] for j in (0, 4, 8)]


@pytest.mark.parametrize("num_threads", [0, 2])
@pytest.mark.parametrize("consumed", [1, 3])  # mid-epoch; across the first epoch's end
def test_restored_iterator_continues_exactly(num_threads, consumed):
  source = synthetic.SyntheticSource(10, seed=4, difficulty=SMALL)
  make = lambda: pipeline.make_iterator(source, batch_size=4, seed=123, num_threads=num_threads)
  it = make()
  _take(it, consumed)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = _take(it, 4)
  it.close()
  restored = make()
  restored.set_state(state)
  got = _take(restored, 4)
  restored.close()
  assert _ids(got) == _ids(expected)
  assert all(same_images(x["images"], y["images"]) for bx, by in zip(got, expected) for x, y in zip(bx, by))


def test_restore_refuses_a_state_of_another_pipeline():
  source = synthetic.SyntheticSource(10, seed=4, difficulty=SMALL)
  state = pipeline.make_iterator(source, batch_size=2, seed=1).get_state()
  for kwargs in (dict(seed=2), dict(seed=1, shard_count=2), dict(seed=1, shuffle=False)):
    with pytest.raises(ValueError, match="different pipeline"):
      pipeline.make_iterator(source, batch_size=2, **kwargs).set_state(state)
  with pytest.raises(ValueError, match="not a state"):
    pipeline.make_iterator(source, batch_size=2, seed=1).set_state({"next_index": 3})


def test_grain_checkpoint_handler_round_trip(tmp_path):
  source = synthetic.SyntheticSource(9, seed=0, difficulty=SMALL)
  it = pipeline.make_iterator(source, batch_size=2, seed=5)
  _take(it, 2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  expected = _ids(_take(it, 3))
  restored = handler.restore(epath.Path(tmp_path), item=pipeline.make_iterator(source, batch_size=2, seed=5))
  assert _ids(_take(restored, 3)) == expected


def test_shards_are_disjoint_and_cover_the_data():
  source = synthetic.SyntheticSource(11, seed=2, difficulty=SMALL)
  shards = [[e["id"] for b in pipeline.make_iterator(source, batch_size=3, seed=9, num_epochs=1, shard_index=i,
                                                     shard_count=2) for e in b] for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(f"synthetic:2:{i}" for i in range(11))
  assert {len(s) for s in shards} == {5, 6}
  with pytest.raises(ValueError, match="shard_index"):
    pipeline.make_iterator(source, batch_size=3, seed=9, shard_index=2, shard_count=2)


def test_finite_epochs_and_drop_remainder():
  source = synthetic.SyntheticSource(7, seed=3, difficulty=SMALL)
  sizes = [len(b) for b in pipeline.make_iterator(source, batch_size=3, seed=0, num_epochs=2)]
  assert sizes == [3, 3, 3, 3, 2]
  sizes = [len(b) for b in pipeline.make_iterator(source, batch_size=3, seed=0, num_epochs=2, drop_remainder=True)]
  assert sizes == [3, 3, 3, 3]
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.make_iterator(source, batch_size=0, seed=0)


def test_mosaic_is_one_base_pixel_and_a_zoom_on_it_shows_the_answer():
  from imagent_jax.agent import protocol, tools
  max_pixels = 28 * 28 * 64  # a 224 x 224 base view of a 896 x 896 image: 4 source pixels a shown one
  d = synthetic.DifficultyConfig(image_side=(896, 896), num_images=(1, 3), categories=("mosaic",))
  tcfg = tools.ToolConfig(view_max_pixels=max_pixels, input_min_pixels=56 * 56, input_max_pixels=max_pixels,
                          min_box_side=2.0)
  palette = {name: np.array(synthetic.PALETTE[name], float) for name in synthetic.MARK_COLORS}
  letters = set()
  for index in range(12):
    ex = synthetic.generate_example(3, index, d)
    k = ex["target_image"]
    assert ex["category"] == "mosaic" and ex["target_box"] == [444, 444, 446, 446]  # the top-left square
    assert ex["question"].startswith(f"In image {k + 1}, ") and "The detail is at" not in ex["question"]
    answer = ex["options"][synthetic.OPTION_LETTERS.index(ex["answer"])]
    letters.add(ex["answer"])
    for j, image in enumerate(ex["images"]):  # every image has a mosaic of four distinct mark colours
      px = np.asarray(image.convert("RGB"), float)
      squares = [px[444 + dy, 444 + dx] for dy in (0, 2) for dx in (0, 2)]
      names = [min(palette, key=lambda n: np.abs(palette[n] - s).sum()) for s in squares]
      assert all(np.abs(palette[n] - s).sum() == 0 for n, s in zip(names, squares)) and len(set(names)) == 4
      if j == k:
        assert sorted(names) == sorted(ex["options"]) and names[0] == answer
    ctx = tools.ToolContext(ex["images"], tcfg)
    box = synthetic.zoom_box(ex, ex["images"][k].size, ctx.shown_sizes[k])
    assert ctx.shown_sizes[k] == (224, 224) and box == [111, 111, 111.5, 111.5]  # half a base-view pixel
    result = tools.run_tool_call(ctx, protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box}))
    assert result.ok, result.text
    view = np.asarray(result.image.convert("RGB"), float)
    h, w = view.shape[:2]
    middle = view[h // 4:3 * h // 4, w // 4:3 * w // 4].reshape(-1, 3)  # the zoom shows the answer's colour
    assert all(min(palette, key=lambda n: np.abs(palette[n] - px).sum()) == answer for px in middle)
    whole = synthetic.view_box([444, 444, 448, 448], ex["images"][k].size, ctx.shown_sizes[k], 0)
    assert whole == [111, 111, 112, 112]  # the whole mosaic is one base-view pixel
  assert len(letters) > 1  # the answer is not always the same letter
  # Elsewhere a hint or a zoom pads the target; the mosaic's zoom is the mosaic itself.
  assert synthetic.CATEGORIES["mosaic"].zoom_pad == 0 and synthetic.CATEGORIES["color"].zoom_pad == synthetic.HINT_PAD
  with pytest.raises(ValueError, match="mosaic_square"):
    synthetic.DifficultyConfig(mosaic_square=0)


# ----------------------------------------------------------------------------------------------
# The generator's modules.


def test_generator_runs_no_agent_code():
  """Drawing examples imports neither the agent nor jax; the confirm-zoom measurement lives with the tool."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys\nfrom imagent_jax.data import synthetic\n"
          "ex = synthetic.generate_example(0, 0, synthetic.DifficultyConfig(image_side=(96, 128), cluster_side=60))\n"
          "print(sorted(m for m in sys.modules if m.startswith(('imagent_jax.agent', 'jax'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]", out.stdout
  assert synthetic.legibility is tools.legibility is tools.confirm.legibility


def test_categories_are_a_registry_in_draw_order():
  from imagent_jax.registry import Registry  # pylint: disable=g-import-not-at-top
  assert isinstance(synthetic.CATEGORIES, Registry)
  assert synthetic.CATEGORIES.names() == ("digit", "letter", "color", "shape", "locate", "count", "mosaic")
  with pytest.raises(ValueError, match="already registered"):
    synthetic.register_category("digit")(lambda rng, scene: None)
  assert synthetic.zoom_box({"category": "nope", "target_box": [10, 10, 20, 20]}, (100, 100), (50, 50)) == \
      synthetic.view_box([10, 10, 20, 20], (100, 100), (50, 50), synthetic.HINT_PAD)
