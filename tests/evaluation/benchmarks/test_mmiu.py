"""MMIU reader: a tiny copy of the Hub snapshot (all.parquet with the published columns, the images
in <category>.zip archives or extracted) read back, shuffled, aggregated and broken."""

import io
import json
import os
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import benchmark_checks
import pytest
from PIL import Image

from imagent_jax.evaluation import benchmarks
from imagent_jax.evaluation.benchmarks import base, mmiu

SCHEMA = pa.schema([("task", pa.string()), ("visual_input_component", pa.string()), ("source", pa.string()),
                    ("options", pa.string()), ("question", pa.string()), ("context", pa.string()),
                    ("input_image_path", pa.list_(pa.string())), ("output", pa.string())])
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
FOUR = "A: the first image\nB: the second image\nC: the third image\nD: the fourth image"


def png(color):
  buf = io.BytesIO()
  Image.new("RGB", (4, 4), color).save(buf, format="PNG")
  return buf.getvalue()


def record(category, task, n, images, options, question, context, output):
  return {"task": task, "visual_input_component": "natural image", "source": "src", "options": options,
          "question": question, "context": context, "output": output,
          "input_image_path": [f"./{category}/{task}/{task}_{n}_{k}.png" for k in range(images)]}


def rows():
  return [
      # context first (the official order for most tasks); the options block leaves the context
      record("Low-level-semantic", "forensic_detection_blink", 0, 4, FOUR + "\n",
             "Which image is most likely to be a real photograph?",
             "You are a judge in a photography competition.\nSelect from the following choices.\n" + FOUR + "\n", "D"),
      # question first for the tasks of QUESTION_FIRST
      record("High-level-obj-semantic", "person_reid", 0, 3, "A: the second image\nB: the third image",
             "Which image shows the same person as the first?", "Match people across cameras.\n"
             "Select from the following choices.\nA: the second image\nB: the third image", "B"),
      # the context already ends with the question: not repeated; an option spans two lines; ':' in options
      record("2D-spatial", "functional_correspondence_blink", 0, 2,
             "A: Point A: handle\nB: Point B\n(the blade)\nC: Point C\nD: Point D",
             "Which point is corresponding to the reference point?",
             "Action: Scrape. Which point is corresponding to the reference point?\n"
             "Select from the following choices.\n"
             "A: Point A: handle\nB: Point B\n(the blade)\nC: Point C\nD: Point D\n",
             "C"),
  ]


def image_files(records):
  """relative path -> png bytes, for every image of ``records`` (colour k for the k-th of a record)."""
  out = {}
  for r in records:
    for k, p in enumerate(r["input_image_path"]):
      out[p[2:]] = png(COLORS[k % 4])
  return out


def write(folder, records, layout="zip", schema=SCHEMA):
  os.makedirs(folder, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(records, schema=schema), os.path.join(folder, "all.parquet"))
  files = image_files(records)
  if layout == "zip":  # as published: one archive per category
    for category in sorted({p.split("/")[0] for p in files}):
      with zipfile.ZipFile(os.path.join(folder, f"{category}.zip"), "w") as z:
        for p, data in files.items():
          if p.startswith(category + "/"):
            # one archive keeps the category folder, the others hold the task folders at the top
            z.writestr(p if category == "Low-level-semantic" else p.split("/", 1)[1], data)
  else:
    for p, data in files.items():
      target = os.path.join(folder, p if layout == "extracted" else p.split("/", 1)[1])
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, "wb") as f:
        f.write(data)
  return str(folder)


@pytest.mark.parametrize("layout", ["zip", "extracted", "flat"])
def test_fields_as_published(tmp_path, layout):
  folder = write(tmp_path / "MMIU-Benchmark", rows(), layout)
  examples = benchmarks.load("mmiu", folder, option_order="as_published")
  assert [e.id for e in examples] == ["0", "1", "2"]
  forensic, reid, corr = examples
  assert forensic.benchmark == "mmiu" and forensic.category == "forensic_detection_blink"
  assert forensic.question == ("You are a judge in a photography competition.\n"
                               "Which image is most likely to be a real photograph?")
  assert forensic.options == ("the first image", "the second image", "the third image", "the fourth image")
  assert forensic.answer == "D" and forensic.answer_text == "the fourth image"
  assert [im.getpixel((0, 0)) for im in forensic.images] == COLORS
  assert forensic.meta["source"] == "src" and forensic.meta["input_image_path"][0].startswith("./Low-level-semantic/")
  assert reid.question == "Which image shows the same person as the first?\nMatch people across cameras."
  assert reid.answer == "B" and len(reid.image_refs) == 3
  assert corr.question == "Action: Scrape. Which point is corresponding to the reference point?"
  assert corr.options == ("Point A: handle", "Point B\n(the blade)", "Point C", "Point D")
  assert corr.answer_text == "Point C"
  kinds = {type(ref).__name__ for e in examples for ref in e.image_refs}
  assert kinds == ({"ZipImage"} if layout == "zip" else {"ImageRef"})


def test_shuffle_keeps_the_answer_text_and_is_seeded(tmp_path):
  folder = write(tmp_path, rows())
  benchmark_checks.check_shuffles("mmiu", folder)


def test_official_aggregation_is_the_mean_of_task_accuracies():
  rows_ = ([{"category": "temporal_ordering", "correct": True}] * 9 + [{"category": "temporal_ordering",
                                                                        "correct": False}]
           + [{"category": "mevis", "correct": False}] * 2)
  scores = mmiu.MMIU.aggregate(rows_)
  assert scores["temporal_ordering"] == pytest.approx(90.0) and scores["mevis"] == pytest.approx(0.0)
  assert scores["overall"] == pytest.approx(45.0)  # (90 + 0) / 2
  assert scores["micro"] == pytest.approx(75.0)  # 9 of 12


def test_all_json_is_read_too(tmp_path):
  records = rows()
  write(tmp_path, records, "extracted")
  os.remove(tmp_path / "all.parquet")
  (tmp_path / "all.json").write_text(json.dumps(records))
  assert [e.answer for e in mmiu.read(str(tmp_path))] == ["D", "B", "C"]


def test_missing_annotation_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="all.parquet"):
    mmiu.read(str(tmp_path))


def test_missing_image_names_the_file_and_record(tmp_path):
  folder = write(tmp_path, rows(), "extracted")
  os.remove(os.path.join(folder, "High-level-obj-semantic", "person_reid", "person_reid_0_2.png"))
  with pytest.raises(base.BenchmarkError, match=r"all\.parquet: record row 1: image "
                                                r"'\./High-level-obj-semantic/person_reid/person_reid_0_2\.png' "
                                                "not found") as e:
    mmiu.read(folder)
  assert e.value.record == "row 1"


def test_missing_column_names_the_file(tmp_path):
  schema = pa.schema([f for f in SCHEMA if f.name != "output"])
  folder = write(tmp_path, rows(), "extracted", schema=schema)
  with pytest.raises(base.BenchmarkError, match=r"all\.parquet: missing column.*output"):
    mmiu.read(folder)


@pytest.mark.parametrize("change, message", [
    (dict(output="E"), "answer 'E' is not one of the option letters A-B"),
    (dict(output="hidden"), "output 'hidden' is not an option letter"),
    (dict(output=None), "output None is not an option letter"),
    (dict(options="the second image or the third"), "options must be a string 'A: ..."),
    (dict(options="A: the second image"), "needs 2 to 26 options"),
    (dict(input_image_path=[]), "input_image_path must be a non-empty list"),
    (dict(task=""), "task is empty"),
])
def test_malformed_records_name_file_and_record(tmp_path, change, message):
  records = rows()
  records[1].update(change)
  folder = write(tmp_path, records, "extracted")
  with pytest.raises(base.BenchmarkError, match=message) as e:
    mmiu.read(folder)
  assert e.value.path.endswith("all.parquet") and e.value.record == "row 1"


def test_a_corrupt_zip_member_fails_when_read(tmp_path):
  folder = write(tmp_path, rows()[:1], "zip")
  archive = os.path.join(folder, "Low-level-semantic.zip")
  with zipfile.ZipFile(archive, "w") as z:  # the same names, one of them not an image
    for k in range(4):
      z.writestr(f"Low-level-semantic/forensic_detection_blink/forensic_detection_blink_0_{k}.png",
                 b"junk" if k == 2 else png(COLORS[k]))
  (example,) = mmiu.read(folder)
  with pytest.raises(base.BenchmarkError, match="Low-level-semantic.zip:.*_0_2.png.*not an image"):
    example.images  # pylint: disable=pointless-statement


def test_option_parsing():
  assert mmiu.parse_options("A: x\nB: y\n") == ["x", "y"]
  assert mmiu.parse_options("A: [[1, 2], [3, 4]]\nB: [[5, 6]]") == ["[[1, 2], [3, 4]]", "[[5, 6]]"]
  assert mmiu.parse_options("B: x\nA: y") is None
  assert mmiu.parse_options(None) is None


def test_question_text_takes_only_the_options_block_out_of_the_context():
  options = "A: x\nB: y"
  # text after the options block is kept
  assert mmiu.question_text("mevis", "Which one?", "Intro.\nSelect from the following choices.\nA: x\nB: y\n"
                            "Mind the order.", options) == "Which one?\nIntro.\nMind the order."
  # no marker: the options block alone is removed
  assert mmiu.question_text("mevis_x", "Which one?", "Intro.\nA: x\nB: y", options) == "Intro.\nWhich one?"
  # an empty context leaves the question
  assert mmiu.question_text("mevis_x", "Which one?", "Select from the following choices.\nA: x\nB: y",
                            options) == "Which one?"
