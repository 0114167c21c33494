"""MuirBench reader: a tiny copy of the Hub snapshot (data/test-*.parquet, the published columns,
images as {bytes, path} structs) read back, shuffled, aggregated and broken."""

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagent_jax.evaluation import benchmarks
from imagent_jax.evaluation.benchmarks import base, muirbench

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("idx", pa.string()), ("task", pa.string()), ("image_relation", pa.string()),
                    ("image_type", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())),
                    ("answer", pa.string()), ("image_list", pa.list_(IMAGE)), ("counterpart_idx", pa.string())])
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def png(color, size=(6, 4)):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def record(idx, task="Counting", question="How many cats are in each image?", options=("One", "Two", "Three",
           "None of the choices provided"), answer="B", images=2, counterpart="9", **kw):
  r = {"idx": idx, "task": task, "image_relation": "Narrative", "image_type": "Photography", "question": question,
       "options": list(options), "answer": answer,
       "image_list": [{"bytes": png(COLORS[k]), "path": None} for k in range(images)], "counterpart_idx": counterpart}
  r.update(kw)
  return r


def rows():
  return [
      record("1"),
      record("2", task="Visual Retrieval", question="Which image shows the same building as <image>?",
             options=["<image>", "<image>", "<image>", "None of the choices provided"], answer="C", images=4,
             counterpart="3"),
      record("3", task="Visual Retrieval", question="Which image shows the same tower as <image>?",
             options=["<image>", "<image>", "None of the choices provided"], answer="C", images=3, counterpart="2"),
      record("4", task="Ordering", question="Order the frames <image> <image>: which comes first?",
             options=["the first", "the second"], answer="A", images=2),
  ]


def write(folder, shards, schema=SCHEMA):
  os.makedirs(os.path.join(folder, "data"), exist_ok=True)
  for k, shard in enumerate(shards):
    table = pa.Table.from_pylist(shard, schema=schema)
    pq.write_table(table, os.path.join(folder, "data", f"test-{k:05d}-of-{len(shards):05d}.parquet"))
  return str(folder)


@pytest.fixture
def snapshot(tmp_path):
  r = rows()
  return write(tmp_path / "MUIRBENCH", [r[:2], r[2:]])  # two shards, read in name order


def test_fields_as_published(snapshot):
  examples = benchmarks.load("muirbench", snapshot, option_order="as_published")
  assert [e.id for e in examples] == ["1", "2", "3", "4"]
  first = examples[0]
  assert first.benchmark == "muirbench"
  assert first.question == "How many cats are in each image?"
  assert first.options == ("One", "Two", "Three", "None of the choices provided")
  assert first.answer == "B" and first.answer_text == "Two"
  assert first.category == "Counting"
  assert first.meta == {"image_relation": "Narrative", "image_type": "Photography", "counterpart_idx": "9"}
  images = first.images
  assert [im.mode for im in images] == ["RGB", "RGB"] and images[1].getpixel((0, 0)) == COLORS[1]
  assert first.image_refs[0].data is not None  # embedded bytes, decoded only when .images is read


def test_image_placeholders_become_image_numbers(snapshot):
  retrieval = {e.id: e for e in benchmarks.load("muirbench", snapshot, option_order="as_published")}
  e = retrieval["2"]
  # question's <image> is image 1, the options' are images 2, 3, 4 (question first, then options A, B, ...)
  assert e.question == "Which image shows the same building as Image 1?"
  assert e.options == ("Image 2", "Image 3", "Image 4", "None of the choices provided")
  assert e.answer == "C" and e.answer_text == "Image 4"
  assert len(e.image_refs) == 4 and e.images[3].getpixel((0, 0)) == COLORS[3]
  assert e.meta["published_options"] == ["<image>", "<image>", "<image>", "None of the choices provided"]
  assert retrieval["4"].question == "Order the frames Image 1 Image 2: which comes first?"


def test_shuffle_keeps_the_answer_text_and_is_seeded(snapshot):
  published = {e.id: e for e in benchmarks.load("muirbench", snapshot, option_order="as_published")}
  a = benchmarks.load("muirbench", snapshot, seed=0)
  b = benchmarks.load("muirbench", snapshot, seed=0)
  orders = set()
  for seed in range(6):
    shuffled = benchmarks.load("muirbench", snapshot, seed=seed)
    for e in shuffled:
      assert e.answer_text == published[e.id].answer_text
      assert sorted(e.options) == sorted(published[e.id].options)
    orders.add(tuple(e.options for e in shuffled))
  assert [e.options for e in a] == [e.options for e in b] and [e.answer for e in a] == [e.answer for e in b]
  assert len(orders) > 1  # the seed changes the orders
  # an image option stays bound to its image through the shuffle
  e = next(x for x in a if x.id == "2")
  assert e.answer_text == "Image 4"


def test_official_aggregation_is_overall_and_per_task():
  rows_ = [{"category": "Counting", "correct": True}, {"category": "Counting", "correct": False},
           {"category": "Ordering", "correct": True}, {"category": "Ordering", "correct": True},
           {"category": "Ordering", "correct": False}]
  scores = muirbench.MUIRBENCH.aggregate(rows_)
  assert scores["overall"] == pytest.approx(60.0)  # 3 of 5 questions
  assert scores["Counting"] == pytest.approx(50.0) and scores["Ordering"] == pytest.approx(200 / 3)


def test_data_folder_itself_is_accepted(snapshot):
  assert len(muirbench.read(os.path.join(snapshot, "data"))) == 4


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="data"):
    muirbench.read(str(tmp_path))
  os.makedirs(tmp_path / "data")
  with pytest.raises(FileNotFoundError, match="test-"):
    muirbench.read(str(tmp_path))


def test_missing_column_names_the_file(tmp_path):
  schema = pa.schema([f for f in SCHEMA if f.name != "answer"])
  r = [{k: v for k, v in record("1").items() if k != "answer"}]
  folder = write(tmp_path, [r], schema=schema)
  with pytest.raises(base.BenchmarkError, match=r"test-00000-of-00001\.parquet.*missing column.*answer") as e:
    muirbench.read(folder)
  assert e.value.path.endswith("test-00000-of-00001.parquet")


@pytest.mark.parametrize("bad, message", [
    (dict(answer="E"), "answer 'E' is not one of the option letters A-D"),
    (dict(answer="AB"), "answer must be one option letter"),
    (dict(image_list=[{"bytes": png(COLORS[0]), "path": None}, None]), r"image_list\[1\] is null"),
    (dict(image_list=[{"bytes": None, "path": None}]), r"image_list\[0\] has neither bytes nor a path"),
    (dict(image_list=[]), "image_list must be a non-empty list"),
    (dict(question="Compare <image>, <image> and <image>.", images=2), "3 <image> placeholders but image_list has 2"),
    (dict(options=["Only"]), "needs 2 to 26 options"),
    (dict(task=""), "task is empty"),
])
def test_malformed_records_name_file_and_record(tmp_path, bad, message):
  good = record("7")
  broken = record("8", **{k: v for k, v in bad.items() if k == "images"})
  broken.update({k: v for k, v in bad.items() if k != "images"})
  folder = write(tmp_path, [[good, broken]])
  with pytest.raises(base.BenchmarkError, match=message) as e:
    muirbench.read(folder)
  assert e.value.path.endswith("test-00000-of-00001.parquet") and e.value.record == "idx 8"


def test_repeated_idx(tmp_path):
  folder = write(tmp_path, [[record("5")], [record("5")]])
  with pytest.raises(base.BenchmarkError, match="idx repeats") as e:
    muirbench.read(folder)
  assert e.value.path.endswith("test-00001-of-00002.parquet")


def test_bad_image_bytes_fail_when_read(tmp_path):
  r = record("1")
  r["image_list"][1] = {"bytes": b"not an image", "path": None}
  (example,) = muirbench.read(write(tmp_path, [[r]]))  # lazy: reading the file does not decode
  with pytest.raises(base.BenchmarkError, match="idx 1:image_list\\[1\\].*not an image"):
    example.images  # pylint: disable=pointless-statement


def test_not_a_parquet_file(tmp_path):
  os.makedirs(tmp_path / "data")
  (tmp_path / "data" / "test-00000-of-00001.parquet").write_bytes(b"garbage")
  with pytest.raises(base.BenchmarkError, match="not a parquet file"):
    muirbench.read(str(tmp_path))
