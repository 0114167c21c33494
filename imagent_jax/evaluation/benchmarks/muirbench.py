"""MuirBench (Wang et al., ICLR 2025): 2,600 multiple-choice questions over 11,264 images, 12
multi-image tasks; every answerable question is paired with an unanswerable twin (its answer the
option "None of the choices provided"), and both count.

Layout, as ``huggingface-cli download --repo-type dataset MUIRBENCH/MUIRBENCH`` writes it (one
split, ``test``, ``data/test-*`` in the dataset card's ``configs``)::

    MUIRBENCH/
      data/test-00000-of-0000N.parquet ...   # the shards, read in name order

Columns: ``idx`` (string id), ``task`` (one of the 12 tasks), ``image_relation``, ``image_type``,
``question``, ``options`` (list of option texts, no letters), ``answer`` (the letter, "A"...),
``image_list`` (list of ``Image`` structs ``{bytes, path}``), ``counterpart_idx`` (the paired
question's ``idx``).

``<image>`` placeholders: the question and the options place images with ``<image>`` (Visual
Retrieval style options are nothing but ``<image>``); the k-th placeholder, counting through the
question and then the options A, B, ..., is ``image_list[k-1]`` (VLMEvalKit's ``split_MUIR``
interleaves them in that order). Our prompt lists the images first, labelled "Image 1: ",
"Image 2: ", ..., so the reader writes the k-th placeholder as "Image k" in the text, which also
keeps image options bound to their images when the options are shuffled (the published text is
in ``meta["published_question"]`` / ``meta["published_options"]``). More placeholders than images
is an error; fewer is fine (the remaining images are still shown, as every evaluator does).

Official evaluation (github.com/muirbench/MuirBench eval/utils: prompt and answer parsing;
lmms-eval ``tasks/muirbench/utils.py`` ``muir_aggregation``, linked from that README): accuracy over
all 2,600 questions, and accuracy per ``task`` -- ``base.by_category`` with ``category`` = task.
``meta`` carries ``image_relation``, ``image_type`` and ``counterpart_idx``.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from imagent_jax.evaluation.benchmarks import base
from imagent_jax.evaluation.benchmarks import parquet

COLUMNS = ("idx", "task", "question", "options", "answer", "image_list")
OPTIONAL = ("image_relation", "image_type", "counterpart_idx")
PLACEHOLDER = "<image>"
_PLACEHOLDER_RE = re.compile(re.escape(PLACEHOLDER))


def _data_folder(path: str) -> str:
  """``<path>/data`` as published; ``path`` itself when it is that folder (holds the shards)."""
  data = os.path.join(path, "data")
  if os.path.isdir(data):
    return data
  if os.path.isdir(path) and any(f.startswith("test-") and f.endswith(".parquet") for f in os.listdir(path)):
    return path
  raise FileNotFoundError(f"muirbench: {data} does not exist (expected the Hub snapshot of MUIRBENCH/MUIRBENCH "
                          "with data/test-*.parquet)")


def number_placeholders(texts: list[str]) -> tuple[list[str], int]:
  """``texts`` with the k-th ``<image>`` (counting through them in order) written as "Image k", and
  the number of placeholders."""
  count = 0

  def name(_):
    nonlocal count
    count += 1
    return f"Image {count}"

  return [_PLACEHOLDER_RE.sub(name, t) for t in texts], count


def read(path: str, split: Optional[str] = None) -> list[base.Example]:
  """The questions of MuirBench's ``test`` split, in the shards' order.

  Raises:
    FileNotFoundError: no ``data/test-*.parquet``.
    BenchmarkError: a missing column, a bad record (answer not a letter of its options, a null
      image, more ``<image>`` placeholders than images) or a repeated ``idx``.
  """
  split = split or "test"
  out, seen = [], {}
  for file in parquet.split_files(_data_folder(path), split):
    for row, r in enumerate(parquet.read_records(file, COLUMNS, OPTIONAL)):
      qid, record = parquet.record_id(r["idx"], path=file, row=row, seen=seen)
      where = (file, record)
      options = parquet.string_list(r["options"], path=file, record=record, what="options")
      if not isinstance(r["question"], str):
        raise base.BenchmarkError(file, record, f"question must be a string, got {r['question']!r}")
      images = r["image_list"]
      if not isinstance(images, list) or not images:
        raise base.BenchmarkError(file, record, f"image_list must be a non-empty list, got {type(images).__name__}")
      refs = [parquet.image_ref(v, path=file, record=record, what=f"image_list[{k}]", root=path)
              for k, v in enumerate(images)]
      texts, placeholders = number_placeholders([r["question"]] + options)
      if placeholders > len(refs):
        raise base.BenchmarkError(file, record, f"the question and options hold {placeholders} {PLACEHOLDER} "
                                                f"placeholders but image_list has {len(refs)} images")
      if not isinstance(r["task"], str) or not r["task"].strip():
        raise base.BenchmarkError(file, record, "task is empty (the category of the official aggregation)")
      answer = r["answer"]
      if not isinstance(answer, str) or len(answer.strip()) != 1:
        raise base.BenchmarkError(file, record, f"answer must be one option letter, got {answer!r}")
      counterpart = r.get("counterpart_idx")
      meta = {"image_relation": r.get("image_relation"), "image_type": r.get("image_type"),
              "counterpart_idx": None if counterpart is None else str(counterpart)}
      if placeholders:
        meta["published_question"] = r["question"]
        meta["published_options"] = list(options)
      out.append(base.make_example(id=qid, question=texts[0], options=texts[1:], answer=answer.strip().upper(),
                                   category=r["task"].strip(), image_refs=refs, where=where, meta=meta))
  return out


MUIRBENCH = base.Benchmark(
    name="muirbench", read=read, splits=("test",), aggregate=base.by_category,
    source=("https://huggingface.co/datasets/MUIRBENCH/MUIRBENCH (data/test-*.parquet); "
            "https://github.com/muirbench/MuirBench (eval/utils); "
            "https://github.com/EvolvingLMMs-Lab/lmms-eval/tree/main/lmms_eval/tasks/muirbench (muir_aggregation)"))
