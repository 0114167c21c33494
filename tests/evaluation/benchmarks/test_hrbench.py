"""The HR-Bench reader on tiny TSVs in the published layout (``DreamMr/HR-Bench``: VLMEvalKit's MCQ
TSV with ``cycle_category`` and base64 images), and the official cycle-averaged score."""

import base64
import csv
import io

import pytest
from PIL import Image

from imagent_jax.evaluation import benchmarks
from imagent_jax.evaluation.benchmarks import base, hrbench

HEADER = ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"]
OPTIONS = ["red", "blue", "green", "yellow"]


def _b64(size, color):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def _rows():
  """Two questions (FSP, FCP), each in two cycles (options rotated), as the published file has them;
  row 3 stores its image as the index of row 1 (VLMEvalKit's space saving)."""
  rows = []
  for q, (category, size, color) in enumerate((("single", (40, 30), "red"), ("cross", (30, 40), "blue"))):
    for cycle in range(2):
      opts = OPTIONS[cycle:] + OPTIONS[:cycle]
      index = str(2 * q + cycle + 1)
      question = f'Which "color"\tis item {q}?\nLook closely.' if q else f"What color is {q}?"
      rows.append({"index": index, "question": question,
                   **dict(zip("ABCD", opts)), "answer": "ABCD"[opts.index("red")], "category": category,
                   "cycle_category": f"cycle{cycle + 1}", "image": "1" if index == "3" else _b64(size, color)})
  return rows


def _write(path, rows, header=HEADER, crlf=False, bom=False):
  with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\r\n" if crlf else "\n")
    writer.writerow(header)
    for r in rows:
      writer.writerow([r.get(c, "") for c in header])
  return path


@pytest.mark.parametrize("crlf, bom", [(False, False), (True, True)])
def test_fields_images_and_index_references(tmp_path, crlf, bom):
  _write(tmp_path / "hr_bench_4k.tsv", _rows(), crlf=crlf, bom=bom)
  examples = benchmarks.load("hrbench_4k", str(tmp_path), option_order="as_published")
  assert [e.id for e in examples] == ["1", "2", "3", "4"]
  e = examples[1]
  assert (e.question, e.options, e.answer, e.category, e.benchmark) == (
      "What color is 0?", ("blue", "green", "yellow", "red"), "D", "FSP", "hrbench_4k")
  assert e.answer_text == "red" and e.meta == {"cycle_category": "cycle2", "hrbench_category": "single"}
  # A quoted question with a tab, quotes and a newline survives; its image is read from the right bytes.
  assert examples[3].question == 'Which "color"\tis item 1?\nLook closely.' and examples[3].category == "FCP"
  assert [im.size for im in examples[3].images] == [(30, 40)] and examples[3].images[0].getpixel((0, 0)) == (0, 0, 255)
  # Row 3's image cell is "1": the image of row 1.
  assert examples[2].images[0].size == (40, 30) and examples[2].images[0].getpixel((0, 0)) == (255, 0, 0)
  # Images stay in the file: the examples hold byte ranges, not the base64 text.
  ref = examples[0].image_refs[0]
  assert isinstance(ref, hrbench.TsvImageRef) and ref.b64 is None and ref.data is None and ref.path is None
  # The TSV itself is accepted as the path.
  assert len(benchmarks.load("hrbench_4k", str(tmp_path / "hr_bench_4k.tsv"))) == 4


def test_8k_reads_its_own_file_and_missing_files(tmp_path):
  _write(tmp_path / "hr_bench_4k.tsv", _rows())
  with pytest.raises(FileNotFoundError, match="hr_bench_8k.tsv"):
    benchmarks.load("hrbench_8k", str(tmp_path))
  (tmp_path / "hr_bench_8k.parquet").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="parquet is there, but the TSV is what is read"):
    benchmarks.load("hrbench_8k", str(tmp_path))
  _write(tmp_path / "hr_bench_8k.tsv", _rows()[:2])
  assert [e.id for e in benchmarks.load("hrbench_8k", str(tmp_path))] == ["1", "2"]


def test_shuffled_keeps_the_answer(tmp_path):
  rows = []
  for i in range(30):
    r = dict(_rows()[0], index=str(i + 1))
    rows.append(r)
  _write(tmp_path / "hr_bench_4k.tsv", rows)
  published = benchmarks.load("hrbench_4k", str(tmp_path), option_order="as_published")
  a = benchmarks.load("hrbench_4k", str(tmp_path), seed=0)
  c = benchmarks.load("hrbench_4k", str(tmp_path), seed=1)
  assert [x.options for x in a] == [x.options for x in benchmarks.load("hrbench_4k", str(tmp_path), seed=0)]
  assert [x.options for x in a] != [x.options for x in c]
  assert all(x.answer_text == p.answer_text == "red" for x, p in zip(a, published))
  assert all(p.answer == "A" for p in published) and sum(x.answer == "A" for x in a) < 20


def test_official_cycle_averaged_score():
  row = lambda cycle, category, correct: {"category": category, "correct": correct, "meta": {"cycle_category": cycle}}
  rows = [row("c1", "FSP", True), row("c1", "FSP", True), row("c1", "FCP", True), row("c1", "FCP", False),
          row("c2", "FSP", True), row("c2", "FSP", False), row("c2", "FCP", False), row("c2", "FCP", False)]
  # Per cycle: c1 all 3/4, FSP 1, FCP 1/2; c2 all 1/4, FSP 1/2, FCP 0; then the means over the cycles.
  assert hrbench.aggregate(rows) == pytest.approx(
      {"overall": 50.0, "FSP": 75.0, "FCP": 25.0, "cycle c1": 75.0, "cycle c2": 25.0})
  # Cycles of unequal size: the mean of the cycles' accuracies, not the share of all rows (3/4 here).
  uneven = [row("c1", "FSP", True), row("c1", "FSP", True), row("c1", "FSP", False), row("c2", "FSP", True)]
  assert hrbench.aggregate(uneven)["overall"] == pytest.approx((200 / 3 + 100) / 2)
  # A category absent from a cycle: its sum is still divided by the number of cycles (the official code).
  partial = [row("c1", "FSP", True), row("c1", "FCP", True), row("c2", "FSP", False)]
  assert hrbench.aggregate(partial)["FCP"] == pytest.approx(50.0)
  assert hrbench.HRBENCH_8K.aggregate is hrbench.aggregate and not hrbench.HRBENCH_4K.circular


@pytest.mark.parametrize("edit, record, message", [
    (lambda rows: rows[1].update(answer="E"), "2", "answer 'E' is not one of the option letters A-D"),
    (lambda rows: rows[1].update(question=""), "2", "the question is empty"),
    (lambda rows: rows[0].update(image="!!" + "A" * 100), "1", "outside the base64 alphabet"),
    (lambda rows: rows[3].update(image="99"), "4", "neither base64 nor the index of a row"),
    (lambda rows: rows[3].update(image=""), "4", "the 'image' cell is empty"),
    (lambda rows: rows[3].update(index="2"), "2", "two rows have this index"),
    (lambda rows: rows[2].update(B=""), "3", "an option between the filled ones is empty"),
])
def test_malformed_rows_name_file_and_record(tmp_path, edit, record, message):
  rows = _rows()
  edit(rows)
  path = _write(tmp_path / "hr_bench_4k.tsv", rows)
  with pytest.raises(base.BenchmarkError, match=message) as info:
    benchmarks.load("hrbench_4k", str(tmp_path))
  assert info.value.path == str(path) and info.value.record == record


def test_bad_files_and_undecodable_images(tmp_path):
  path = _write(tmp_path / "hr_bench_4k.tsv", _rows(), header=[c for c in HEADER if c != "answer"])
  with pytest.raises(base.BenchmarkError, match=r"hr_bench_4k.tsv: record header: missing column\(s\) \['answer'\]"):
    benchmarks.load("hrbench_4k", str(tmp_path))
  rows = _rows()
  rows[1]["image"] = base64.b64encode(b"these bytes are no image at all, just text " * 3).decode("ascii")
  rows[3]["image"] = "QUJD" * 20 + "Q"  # base64 letters, broken padding
  _write(path, rows)
  examples = benchmarks.load("hrbench_4k", str(tmp_path))  # images are decoded when read
  with pytest.raises(base.BenchmarkError, match=r"hr_bench_4k.tsv: record 2: .*not an image Pillow can read"):
    examples[1].images  # pylint: disable=pointless-statement
  with pytest.raises(base.BenchmarkError, match=r"hr_bench_4k.tsv: record 4: the image is not valid base64"):
    examples[3].images  # pylint: disable=pointless-statement
  path.write_text("")
  with pytest.raises(base.BenchmarkError, match="empty"):
    benchmarks.load("hrbench_4k", str(tmp_path))
