"""The V* Bench reader on tiny copies of the published folder (``craigwu/vstar_bench``): annotation
JSONs beside their images, the correct option listed first, ``[x, y, w, h]`` boxes."""

import json
import os

import pytest
from PIL import Image

from imagent_jax.evaluation import benchmarks
from imagent_jax.evaluation.benchmarks import base, vstar

COLORS = ("red", "blue", "green", "yellow")


def _vstar(root, n_attributes=3, n_positions=2, jsonl=True):
  """A V* folder: ``direct_attributes/sa_<i>.jpg|json`` (4 options) and ``relative_position``
  (2 options); the correct option first, as published."""
  lines = []
  for category, n in (("direct_attributes", n_attributes), ("relative_position", n_positions)):
    folder = root / category
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
      stem = f"sa_{100 + i}"
      Image.new("RGB", (64 + i, 48), COLORS[i % 4]).save(folder / f"{stem}.jpg")
      if category == "direct_attributes":
        record = {"target_object": ["glove"], "bbox": [[10 + i, 5, 20, 8]],
                  "question": f"What is the color of the glove {i}?", "options": list(COLORS)}
      else:
        record = {"target_object": ["cup", "plate"], "bbox": [[1, 2, 3, 4], [30, 20, 5, 6]],
                  "question": f"Is the cup {i} on the left or right side of the plate?",
                  "options": ["The cup is on the left side of the plate.",
                              "The cup is on the right side of the plate."]}
      (folder / f"{stem}.json").write_text(json.dumps(record))
      lines.append({"image": f"{category}/{stem}.jpg", "text": record["question"] + "\n(A) ...", "category": category,
                    "question_id": len(lines), "label": "A"})
  (root / "GPT4V-hard").mkdir(exist_ok=True)  # not part of the benchmark: never read
  (root / "GPT4V-hard" / "0.json").write_text("not json")
  if jsonl:
    (root / "test_questions.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  return root


def test_fields_as_published(tmp_path):
  root = _vstar(tmp_path)
  examples = benchmarks.load("vstar", str(root), option_order="as_published")
  assert [e.id for e in examples] == ["direct_attributes/sa_100", "direct_attributes/sa_101",
                                      "direct_attributes/sa_102", "relative_position/sa_100",
                                      "relative_position/sa_101"]
  e = examples[1]
  assert (e.question, e.options, e.answer, e.category, e.benchmark) == (
      "What is the color of the glove 1?", COLORS, "A", "direct_attributes", "vstar")
  assert e.answer_text == "red" and e.target_image == 0
  assert e.target_boxes == ((11.0, 5.0, 31.0, 13.0),)  # [x, y, w, h] -> [x0, y0, x1, y1]
  assert e.meta["target_objects"] == ["glove"] and e.meta["question_id"] == "1"
  assert [im.size for im in e.images] == [(65, 48)] and e.images[0].mode == "RGB"
  rp = examples[4]
  assert rp.category == "relative_position" and len(rp.options) == 2 and rp.answer == "A"
  assert rp.target_boxes == ((1.0, 2.0, 4.0, 6.0), (30.0, 20.0, 35.0, 26.0))
  assert rp.as_dict()["target_box"] == [1.0, 2.0, 35.0, 26.0]
  # The jsonl is optional; the path may also be the jsonl file itself.
  (root / "test_questions.jsonl").unlink()
  assert "question_id" not in vstar.read(str(root))[0].meta
  _vstar(tmp_path)
  assert len(benchmarks.load("vstar", str(root / "test_questions.jsonl"))) == 5


def test_shuffled_keeps_the_answer_and_defeats_always_a(tmp_path):
  root = _vstar(tmp_path, n_attributes=40, n_positions=1, jsonl=False)
  published = benchmarks.load("vstar", str(root), option_order="as_published")
  a = benchmarks.load("vstar", str(root))  # the default: shuffled, seed 0
  b = benchmarks.load("vstar", str(root), seed=0)
  c = benchmarks.load("vstar", str(root), seed=1)
  assert [x.options for x in a] == [x.options for x in b] and [x.answer for x in a] == [x.answer for x in b]
  assert [x.options for x in a] != [x.options for x in c]
  for p, x in zip(published, a):
    assert x.answer_text == p.answer_text == p.options[0]
    assert sorted(x.options) == sorted(p.options)
  always_a = lambda examples: sum(x.answer == "A" for x in examples) / len(examples)
  assert always_a(published) == 1.0  # the trap: the correct option is listed first
  assert 0.1 <= always_a(a) <= 0.45  # about one in four once shuffled


def test_aggregation_is_micro_over_all_questions():
  # Official: per category, and overall = np.mean over all questions (not the mean of the two categories).
  rows = ([{"category": "direct_attributes", "correct": c} for c in (True, True, True, False)]
          + [{"category": "relative_position", "correct": c} for c in (True, False)])
  got = vstar.VSTAR.aggregate(rows)
  assert got == pytest.approx({"overall": 400 / 6, "direct_attributes": 75.0, "relative_position": 50.0})
  assert got["overall"] != pytest.approx((75.0 + 50.0) / 2)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("options"), "has no 'options'"),
    (lambda r: r.pop("question"), "has no 'question'"),
    (lambda r: r.update(options=["only one"]), "needs 2 to"),
    (lambda r: r.update(bbox=[[1, 2, 3]]), r"\[x, y, w, h\]"),
    (lambda r: r.update(bbox=[[1, 2, -3, 4]]), "negative width"),
    (lambda r: r.update(options="red"), "list of strings"),
])
def test_malformed_annotations_name_file_and_record(tmp_path, edit, message):
  root = _vstar(tmp_path)
  path = root / "direct_attributes" / "sa_101.json"
  record = json.loads(path.read_text())
  edit(record)
  path.write_text(json.dumps(record))
  with pytest.raises(base.BenchmarkError, match=message) as info:
    benchmarks.load("vstar", str(root))
  assert info.value.path == str(path) and info.value.record == "direct_attributes/sa_101"
  assert "sa_101.json: record direct_attributes/sa_101" in str(info.value)


def test_missing_and_broken_files(tmp_path):
  root = _vstar(tmp_path)
  (root / "direct_attributes" / "sa_102.json").write_text("{not json")
  with pytest.raises(base.BenchmarkError, match=r"sa_102.json: record direct_attributes/sa_102: not valid JSON"):
    benchmarks.load("vstar", str(root))
  _vstar(tmp_path)
  os.remove(root / "relative_position" / "sa_101.jpg")
  with pytest.raises(base.BenchmarkError, match=r"record relative_position/sa_101: no image sa_101"):
    benchmarks.load("vstar", str(root))
  _vstar(tmp_path)
  os.remove(root / "relative_position" / "sa_100.json")
  with pytest.raises(base.BenchmarkError, match=r"sa_100.jpg: record sa_100.jpg: an image without its annotation"):
    benchmarks.load("vstar", str(root))
  _vstar(tmp_path)
  (root / "test_questions.jsonl").write_text('{"image": "direct_attributes/sa_100.jpg", "question_id": 0}\n{oops\n')
  with pytest.raises(base.BenchmarkError, match=r"test_questions.jsonl: record line 2: not valid JSON"):
    benchmarks.load("vstar", str(root))
  (root / "test_questions.jsonl").unlink()
  # A broken image is found when it is read (images stay lazy).
  (root / "direct_attributes" / "sa_100.jpg").write_bytes(b"not an image")
  e = benchmarks.load("vstar", str(root))[0]
  with pytest.raises(base.BenchmarkError, match="sa_100.jpg: not an image"):
    e.images  # pylint: disable=pointless-statement
  for folder in ("relative_position",):
    for name in os.listdir(root / folder):
      os.remove(root / folder / name)
    os.rmdir(root / folder)
  with pytest.raises(FileNotFoundError, match="relative_position"):
    benchmarks.load("vstar", str(root))
