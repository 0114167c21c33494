"""What every benchmark reader shares: ``load``'s option orders, rotations, errors, lazy images, and
the JSONL reader (our schema as a benchmark)."""

import json

import pytest
from PIL import Image

from imagent_jax.evaluation import benchmarks, score
from imagent_jax.evaluation.benchmarks import base


def _jsonl_set(folder, n=40, options=("red", "blue", "green", "yellow")):
  Image.new("RGB", (30, 20), "red").save(folder / "a.png")
  Image.new("RGB", (20, 30), "blue").save(folder / "b.png")
  records = [{"id": f"q{i}", "images": ["a.png", "b.png"], "question": f"Question {i}?", "options": list(options),
              "answer": options[0], "category": "first" if i % 2 else "second"} for i in range(n)]
  (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return folder / "set.jsonl"


def test_jsonl_reader_fields_and_lazy_images(tmp_path):
  _jsonl_set(tmp_path, n=3)
  examples = benchmarks.load("jsonl", str(tmp_path), option_order="as_published")
  assert [e.id for e in examples] == ["q0", "q1", "q2"]
  e = examples[1]
  assert (e.question, e.options, e.answer, e.category, e.benchmark) == (
      "Question 1?", ("red", "blue", "green", "yellow"), "A", "first", "jsonl")
  assert [im.size for im in e.images] == [(30, 20), (20, 30)] and e.images[0].mode == "RGB"
  assert e.option_order == (0, 1, 2, 3)


def test_shuffling_is_seeded_per_question_and_keeps_the_answer(tmp_path):
  path = _jsonl_set(tmp_path)
  published = benchmarks.load("jsonl", str(path), option_order="as_published")
  a = benchmarks.load("jsonl", str(path), seed=0)
  b = benchmarks.load("jsonl", str(path), seed=0)
  c = benchmarks.load("jsonl", str(path), seed=1)
  assert [x.options for x in a] == [x.options for x in b] and [x.answer for x in a] == [x.answer for x in b]
  assert [x.options for x in a] != [x.options for x in c]
  for p, x in zip(published, a):
    assert sorted(x.options) == sorted(p.options) and x.answer_text == p.answer_text == "red"
    assert [p.options[i] for i in x.option_order] == list(x.options)
  # A question's order does not depend on what else is loaded.
  assert benchmarks.shuffle_options(published[7], 0).options == a[7].options
  # The trap: the file lists the right option first. Always answering "A" scores 100% as published,
  # about one in four shuffled.
  always_a = lambda examples: sum(score(x, "A") for x in examples) / len(examples)
  assert always_a(published) == 1.0
  assert 0.1 <= always_a(a) <= 0.45


def test_rotations_cover_every_position_once():
  e = base.make_example(id="q", question="?", options=["w", "x", "y", "z"], answer="C", category="",
                        image_refs=[base.ImageRef("i", path="i")], where=("t", 0))
  rot = benchmarks.rotations(e)
  assert [r.id for r in rot] == ["q#r0", "q#r1", "q#r2", "q#r3"]
  assert sorted(r.answer for r in rot) == ["A", "B", "C", "D"] and all(r.answer_text == "y" for r in rot)
  assert rot[1].options == ("x", "y", "z", "w")


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark 'vstar2'"):
    benchmarks.load("vstar2", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    benchmarks.load("jsonl", str(tmp_path / "missing"))
  _jsonl_set(tmp_path, n=2)
  with pytest.raises(ValueError, match="option_order"):
    benchmarks.load("jsonl", str(tmp_path), option_order="random")
  with pytest.raises(ValueError, match="splits"):
    benchmarks.load("jsonl", str(tmp_path), split="dev")


def test_jsonl_bad_records_name_file_and_line(tmp_path):
  path = _jsonl_set(tmp_path, n=2)
  lines = path.read_text().splitlines()
  lines.append(json.dumps({"images": ["a.png"], "question": "?", "options": ["x", "y"], "answer": "C"}))
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(base.BenchmarkError, match=r"set.jsonl: record line 3: \[bad_value\]"):
    benchmarks.load("jsonl", str(path))
  path.write_text("\n".join(lines[:2] + [lines[0]]) + "\n")  # q0 twice
  with pytest.raises(base.BenchmarkError, match="record q0: two records have this id"):
    benchmarks.load("jsonl", str(path))


def test_bad_images_are_benchmark_errors(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(base.BenchmarkError, match="bad.png.*not an image"):
    base.ImageRef("bad.png", path=str(tmp_path / "bad.png")).open()
  with pytest.raises(base.BenchmarkError, match="empty"):
    base.ImageRef("x", data=b"").open()
  with pytest.raises(base.BenchmarkError, match="more than the 100 allowed"):
    buf = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(buf)
    base.ImageRef("big", path=str(buf)).open(max_pixels=100)


def test_make_example_checks_the_contract():
  refs = [base.ImageRef("i", path="i")]
  with pytest.raises(base.BenchmarkError, match="f: record 3: answer 'E' is not one of the option letters A-D"):
    base.make_example(id=3, question="?", options="wxyz", answer="E", category="", image_refs=refs, where=("f", 3))
  with pytest.raises(base.BenchmarkError, match="question is empty"):
    base.make_example(id=3, question=" ", options="wx", answer="A", category="", image_refs=refs, where=("f", 3))
  with pytest.raises(base.BenchmarkError, match="no image"):
    base.make_example(id=3, question="?", options="wx", answer="A", category="", image_refs=[], where=("f", 3))
  assert base.split_lettered("(B) a cat") == ("B", "a cat") and base.split_lettered("C. dog") == ("C", "dog")
  assert base.split_lettered("A cat") == (None, "A cat")
