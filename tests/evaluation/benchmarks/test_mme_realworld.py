"""The MME-RealWorld readers on tiny copies of the published folders (``yifanzhang114/MME-RealWorld``:
``MME_RealWorld.json`` / ``MME_RealWorld_CN.json`` beside the extracted image folders;
``MME-RealWorld-Lite``: ``data/MME-RealWorld-Lite.json`` and ``data/imgs/``) and the official score."""

import json

import pytest
from PIL import Image

from imagent_jax.evaluation import benchmarks
from imagent_jax.evaluation.benchmarks import base, mme_realworld

# (Task, Subtask, Category, image, ground truth, correct in the scoring test)
QUESTIONS = [
    ("Perception", "Monitoring", "Vehicle/counting", "monitoring_images/a.jpg", "D", True),
    ("Perception", "Monitoring", "Vehicle/counting", "monitoring_images/b.jpg", "E", False),
    ("Perception", "Monitoring", "Person/attribute/color", "monitoring_images/a.jpg", "A", True),
    ("Perception", "Monitoring", "person/Attribute/orientation", "monitoring_images/b.jpg", "B", True),
    ("Perception", "Autonomous_Driving", "Objects_Identify", "AutonomousDriving/nuScenes/c.jpg", "C", False),
    ("Reasoning", "Diagram and Table", "diagram", "diagram_and_table/d.png", "B", True),
    ("Reasoning", "Diagram and Table", "diagram", "diagram_and_table/d.png", "A", False),
    ("Reasoning", "Diagram and Table", "Diagram", "diagram_and_table/d.png", "C", False),
]


def _records(full_width=False):
  out = []
  for i, (task, subtask, category, image, truth, _) in enumerate(QUESTIONS):
    lp, rp = ("（", "）") if full_width else ("(", ")")
    out.append({"Question_id": f"{task.lower()}/{subtask.lower()}/{category}/{i:04d}", "Image": image,
                "Text": f"What is in the image {i}?", "Question Type": "Multiple Choice",
                "Answer choices": [f"{lp}{x}{rp} choice {x}{i}" for x in "ABCDE"], "Ground truth": truth,
                "Task": task, "Subtask": subtask, "Category": category})
  return out


def _images(root):
  for _, _, _, image, _, _ in QUESTIONS:
    (root / image).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (50, 40), "green").save(root / image)


def _full(root, name="MME_RealWorld.json", records=None):
  root.mkdir(parents=True, exist_ok=True)
  _images(root)
  (root / name).write_text(json.dumps(records if records is not None else _records(), ensure_ascii=False))
  return root


def _lite(root, records=None):
  data = root / "data"
  _images(data / "imgs")
  (data / "MME-RealWorld-Lite.json").write_text(json.dumps(records if records is not None else _records()))
  return root


def test_full_fields(tmp_path):
  root = _full(tmp_path)
  examples = benchmarks.load("mme_realworld", str(root), option_order="as_published")
  assert len(examples) == len(QUESTIONS)
  e = examples[0]
  assert e.id == "perception/monitoring/Vehicle/counting/0000" and e.benchmark == "mme_realworld"
  assert (e.question, e.options, e.answer) == (
      "What is in the image 0?", ("choice A0", "choice B0", "choice C0", "choice D0", "choice E0"), "D")
  assert (e.category, e.subcategory, e.answer_text) == ("Perception", "Monitoring", "choice D0")
  assert e.meta["category"] == "vehicle/counting" and e.meta["raw_category"] == "Vehicle/counting"
  assert e.meta["language"] == "en" and e.meta["question_type"] == "Multiple Choice"
  assert examples[3].meta["category"] == "person/attribute"  # the official scorer merges attribute categories
  assert [im.size for im in e.images] == [(50, 40)] and e.images[0].mode == "RGB"
  assert str(root / "monitoring_images" / "a.jpg") == e.image_refs[0].path
  # The JSON file itself is accepted, and the first upload's misspelt name too.
  assert len(benchmarks.load("mme_realworld", str(root / "MME_RealWorld.json"))) == len(QUESTIONS)
  (root / "MME_RealWorld.json").rename(root / "MME_ReadWorld.json")
  assert len(benchmarks.load("mme_realworld", str(root))) == len(QUESTIONS)


def test_chinese_split_and_full_width_letters(tmp_path):
  root = _full(tmp_path, "MME_RealWorld_CN.json", _records(full_width=True))
  with pytest.raises(FileNotFoundError, match="MME_RealWorld.json"):
    benchmarks.load("mme_realworld", str(root))  # the default split is "en"
  examples = benchmarks.load("mme_realworld", str(root), split="cn", option_order="as_published")
  assert examples[5].options[1] == "choice B5" and examples[5].answer == "B" and examples[5].meta["language"] == "cn"
  with pytest.raises(ValueError, match="splits"):
    benchmarks.load("mme_realworld_lite", str(root), split="cn")


def test_lite_layout(tmp_path):
  root = _lite(tmp_path)
  for path in (root, root / "data", root / "data" / "MME-RealWorld-Lite.json"):
    examples = benchmarks.load("mme_realworld_lite", str(path), option_order="as_published")
    assert [e.answer for e in examples] == [q[4] for q in QUESTIONS]
    assert examples[4].image_refs[0].path == str(root / "data" / "imgs" / "AutonomousDriving" / "nuScenes" / "c.jpg")
  # Images flat under imgs/ are found by their file name.
  records = _records()
  records[0]["Image"] = "some/folder/flat.jpg"
  Image.new("RGB", (8, 8)).save(root / "data" / "imgs" / "flat.jpg")
  _lite(root, records)
  flat = benchmarks.load("mme_realworld_lite", str(root))[0]
  assert flat.image_refs[0].path == str(root / "data" / "imgs" / "flat.jpg")
  # Not extracted yet: say so.
  other = tmp_path / "other"
  other.mkdir()
  (other / "data.zip").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="data.zip is there: extract it"):
    benchmarks.load("mme_realworld_lite", str(other))


def test_shuffled_keeps_the_answer(tmp_path):
  root = _full(tmp_path)
  published = benchmarks.load("mme_realworld", str(root), option_order="as_published")
  a = benchmarks.load("mme_realworld", str(root), seed=0)
  c = benchmarks.load("mme_realworld", str(root), seed=1)
  assert [x.options for x in a] == [x.options for x in benchmarks.load("mme_realworld", str(root), seed=0)]
  assert [x.options for x in a] != [x.options for x in c]
  assert all(x.answer_text == p.answer_text for x, p in zip(a, published))
  assert all(sorted(x.options) == sorted(p.options) for x, p in zip(a, published))


def test_official_score_by_hand(tmp_path):
  examples = benchmarks.load("mme_realworld", str(_full(tmp_path)))
  rows = [{"id": e.id, "category": e.category, "subcategory": e.subcategory, "meta": e.meta, "correct": q[5]}
          for e, q in zip(examples, QUESTIONS)]
  got = mme_realworld.MME_REALWORLD.aggregate(rows)
  # eval_your_results.py: micro accuracy per Task / Subtask / normalised Category; overall over all questions.
  assert got == pytest.approx({
      "overall": 100 * 4 / 8,
      "Perception": 100 * 3 / 5, "Perception/Monitoring": 75.0,
      "Perception/Monitoring/vehicle/counting": 50.0, "Perception/Monitoring/person/attribute": 100.0,
      "Perception/Autonomous_Driving": 0.0, "Perception/Autonomous_Driving/objects_identify": 0.0,
      "Reasoning": 100 / 3, "Reasoning/Diagram and Table": 100 / 3, "Reasoning/Diagram and Table/diagram": 100 / 3})
  assert got["overall"] != pytest.approx((got["Perception"] + got["Reasoning"]) / 2)
  assert mme_realworld.MME_REALWORLD_LITE.aggregate is mme_realworld.aggregate


def test_repeated_ids_are_made_unique(tmp_path):
  records = _records()
  records[1]["Question_id"] = records[0]["Question_id"]
  examples = benchmarks.load("mme_realworld", str(_full(tmp_path, records=records)))
  assert examples[1].id == records[0]["Question_id"] + "#2"
  assert examples[1].meta["question_id"] == examples[0].id == records[0]["Question_id"]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("Ground truth"), r"has no \['Ground truth'\]"),
    (lambda r: r.pop("Subtask"), r"has no \['Subtask'\]"),
    (lambda r: r.update({"Ground truth": "F"}), "answer 'F' is not one of the option letters A-E"),
    (lambda r: r.update({"Answer choices": ["(A) x", "(C) y"]}), "choice 2 is lettered 'C'"),
    (lambda r: r.update({"Answer choices": "(A) x"}), "must be a list of strings"),
    (lambda r: r.update(Text=""), "'Text' must be a non-empty string"),
    (lambda r: r.update(Image="monitoring_images/missing.jpg"), "missing.jpg does not exist"),
])
def test_malformed_records_name_file_and_record(tmp_path, edit, message):
  records = _records()
  edit(records[2])
  root = _full(tmp_path, records=records)
  with pytest.raises(base.BenchmarkError, match=message) as info:
    benchmarks.load("mme_realworld", str(root))
  assert info.value.path == str(root / "MME_RealWorld.json")
  assert info.value.record == "perception/monitoring/Person/attribute/color/0002 (#2)"


def test_bad_files(tmp_path):
  root = _full(tmp_path)
  (root / "monitoring_images" / "b.jpg").unlink()
  (root / "monitoring_images.tar.gz.part_aa").write_bytes(b"")
  with pytest.raises(base.BenchmarkError, match=r"b.jpg does not exist; .* monitoring_images.tar.gz.part_aa"):
    benchmarks.load("mme_realworld", str(root))
  (root / "MME_RealWorld.json").write_text("[{")
  with pytest.raises(base.BenchmarkError, match="MME_RealWorld.json: not valid JSON"):
    benchmarks.load("mme_realworld", str(root))
  (root / "MME_RealWorld.json").write_text(json.dumps({"Question_id": "x"}))
  with pytest.raises(base.BenchmarkError, match="must hold a list"):
    benchmarks.load("mme_realworld", str(root))
  with pytest.raises(FileNotFoundError, match="MME-RealWorld-Lite.json"):
    benchmarks.load("mme_realworld_lite", str(root))
  # A broken image is found when it is read (images stay lazy).
  _full(tmp_path)
  (root / "diagram_and_table" / "d.png").write_bytes(b"")
  e = benchmarks.load("mme_realworld", str(root))[5]
  with pytest.raises(base.BenchmarkError, match="d.png: an empty file"):
    e.images  # pylint: disable=pointless-statement
