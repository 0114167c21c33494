"""BLINK reader: a tiny copy of the Hub snapshot (one folder per subtask, <Subtask>/val-*.parquet
with the published columns, images as {bytes, path} structs) read back, shuffled, aggregated and
broken."""

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import benchmark_checks
import pytest
from PIL import Image

from imagent_jax.evaluation import benchmarks
from imagent_jax.evaluation.benchmarks import base, blink

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
                    ("image_1", IMAGE), ("image_2", IMAGE), ("image_3", IMAGE), ("image_4", IMAGE),
                    ("choices", pa.list_(pa.string())), ("answer", pa.string()), ("prompt", pa.string()),
                    ("explanation", pa.string())])
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def png(color):
  buf = io.BytesIO()
  Image.new("RGB", (5, 3), color).save(buf, format="PNG")
  return {"bytes": buf.getvalue(), "path": None}


def record(subtask, split, n, images=1, choices=("yes", "no"), answer="(B)", question=None, prompt=None):
  question = question or f"Question {n} of {subtask}?"
  lettered = "\n".join(f"({base.LETTERS[k]}) {c}" for k, c in enumerate(choices))
  r = {"idx": f"{split}_{subtask}_{n}", "question": question, "sub_task": subtask.replace("_", " "),
       "choices": list(choices), "answer": answer, "explanation": "",
       "prompt": prompt if prompt is not None else f"Some context for {subtask}. {question}\n"
                                                   f"Select from the following choices.\n{lettered}\n"}
  for k in range(4):
    r[f"image_{k + 1}"] = png(COLORS[k]) if k < images else None
  return r


def write(folder, records_by_subtask, split="val", schema=SCHEMA):
  for subtask in blink.SUBTASKS:
    os.makedirs(os.path.join(folder, subtask), exist_ok=True)
    rows = records_by_subtask.get(subtask, [record(subtask, split, 1)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                   os.path.join(folder, subtask, f"{split}-00000-of-00001.parquet"))
  return str(folder)


@pytest.fixture
def snapshot(tmp_path):
  return write(tmp_path / "BLINK", {
      "Art_Style": [record("Art_Style", "val", 1, images=3, choices=("the second image", "the third image"),
                           answer="(A)", question="Which image shares the same style as the reference image?",
                           prompt="Some most common art painting styles include Realism, Impressionism. Use the first "
                                  "image as the reference image; which one of the second or the third image shares "
                                  "the same style?\nSelect from the following choices.\n(A) the second image\n"
                                  "(B) the third image\n"),
                    record("Art_Style", "val", 2, images=3, choices=("the second image", "the third image"))],
      "Counting": [record("Counting", "val", 1, choices=("0", "3", "2", "1"), answer="(D)",
                          question="How many blue floats are there?",
                          prompt="How many blue floats are there?\nSelect from the following choices.\n(A) 0\n(B) 3\n"
                                 "(C) 2\n(D) 1")],
      "Jigsaw": [record("Jigsaw", "val", 1, images=2, prompt="Which patch fits?")],  # no marker: the question column
  })


def test_fields_as_published(snapshot):
  examples = benchmarks.load("blink", snapshot, option_order="as_published")
  assert len(examples) == 2 + 1 + 1 + 11  # the fixture's rows and one row in each other subtask
  by_id = {e.id: e for e in examples}
  assert [e.category for e in examples][:3] == ["Art_Style", "Art_Style", "Counting"]  # SUBTASKS order
  art = by_id["val_Art_Style_1"]
  assert art.benchmark == "blink"
  assert art.question == ("Some most common art painting styles include Realism, Impressionism. Use the first image "
                          "as the reference image; which one of the second or the third image shares the same style?")
  assert art.options == ("the second image", "the third image") and art.answer == "A"
  assert [im.getpixel((0, 0)) for im in art.images] == COLORS[:3]
  count = by_id["val_Counting_1"]
  assert count.question == "How many blue floats are there?" and count.answer == "D" and count.answer_text == "1"
  assert len(count.image_refs) == 1
  jigsaw = by_id["val_Jigsaw_1"]
  assert jigsaw.question == "Question 1 of Jigsaw?" and len(jigsaw.image_refs) == 2


def test_shuffle_keeps_the_answer_text_and_is_seeded(snapshot):
  benchmark_checks.check_shuffles("blink", snapshot)


def test_official_aggregation_is_the_mean_of_subtask_accuracies():
  rows = ([{"category": "Counting", "correct": True}] * 3 + [{"category": "Counting", "correct": False}]
          + [{"category": "Jigsaw", "correct": False}])
  scores = blink.BLINK.aggregate(rows)
  assert scores["Counting"] == pytest.approx(75.0) and scores["Jigsaw"] == pytest.approx(0.0)
  assert scores["overall"] == pytest.approx(37.5)  # (75 + 0) / 2, the official total
  assert scores["micro"] == pytest.approx(60.0)  # 3 of 5 questions: not the official number
  assert list(scores)[:2] == ["overall", "micro"]


def test_test_split_is_refused(snapshot):
  with pytest.raises(ValueError, match="splits"):
    benchmarks.load("blink", snapshot, split="test")


def test_hidden_answers_are_an_error(tmp_path):
  folder = write(tmp_path, {"Counting": [record("Counting", "test", 1, answer="hidden")]}, split="test")
  with pytest.raises(base.BenchmarkError, match="'hidden'.*test answers are hidden") as e:
    blink.read(folder, "test")
  assert e.value.record == "idx test_Counting_1"


def test_missing_subtask_folder(snapshot):
  os.rename(os.path.join(snapshot, "IQ_Test"), os.path.join(snapshot, "iq"))
  with pytest.raises(FileNotFoundError, match="IQ_Test"):
    blink.read(snapshot)


def test_missing_split_file(snapshot):
  os.remove(os.path.join(snapshot, "Jigsaw", "val-00000-of-00001.parquet"))
  with pytest.raises(FileNotFoundError, match="Jigsaw.*val-"):
    blink.read(snapshot)


def test_missing_column_names_the_file(tmp_path):
  schema = pa.schema([f for f in SCHEMA if f.name != "choices"])
  rows = [{k: v for k, v in record("Counting", "val", 1).items() if k != "choices"}]
  folder = write(tmp_path, {})
  pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                 os.path.join(folder, "Counting", "val-00000-of-00001.parquet"))
  with pytest.raises(base.BenchmarkError, match=r"Counting.val-00000-of-00001\.parquet.*missing column.*choices"):
    blink.read(folder)


@pytest.mark.parametrize("change, message", [
    (dict(answer="(C)"), "answer 'C' is not one of the option letters A-B"),
    (dict(answer="C) maybe"), "is not an option letter"),
    (dict(image_1=None), "no null before a present one"),
    (dict(image_2=None, image_3=png(COLORS[2])), r"no null before a present one; present: \['image_1', 'image_3'\]"),
    (dict(image_2={"bytes": None, "path": "nowhere.jpg"}), "image_2 has no bytes and its path 'nowhere.jpg'"),
    (dict(choices=["only"]), "needs 2 to 26 options"),
])
def test_malformed_records_name_file_and_record(tmp_path, change, message):
  bad = record("Spatial_Relation", "val", 2, images=2)
  bad.update(change)
  folder = write(tmp_path, {"Spatial_Relation": [record("Spatial_Relation", "val", 1), bad]})
  with pytest.raises(base.BenchmarkError, match=message) as e:
    blink.read(folder)
  assert e.value.path.endswith(os.path.join("Spatial_Relation", "val-00000-of-00001.parquet"))
  assert e.value.record == "idx val_Spatial_Relation_2"


def test_repeated_idx_across_subtasks(tmp_path):
  twin = record("Counting", "val", 1)
  folder = write(tmp_path, {"Jigsaw": [twin]})
  with pytest.raises(base.BenchmarkError, match="idx repeats") as e:
    blink.read(folder)
  assert "Jigsaw" in e.value.path


def test_a_config_without_the_unused_image_columns(tmp_path):
  schema = pa.schema([f for f in SCHEMA if f.name not in ("image_3", "image_4", "sub_task")])
  folder = write(tmp_path, {})
  rows = [{k: v for k, v in record("Relative_Depth", "val", 1, images=2).items() if k in schema.names}]
  pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                 os.path.join(folder, "Relative_Depth", "val-00000-of-00001.parquet"))
  depth = next(e for e in blink.read(folder) if e.category == "Relative_Depth")
  assert [im.getpixel((0, 0)) for im in depth.images] == COLORS[:2]
