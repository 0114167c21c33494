"""Our JSONL schema as a benchmark: MIFG-QA, or any multi-image QA set in that schema, from a
local file or folder (``data.jsonl`` documents the schema and reads it: one reader of the format).

Each record becomes an ``Example``: ``id`` the record's ``id`` (else ``<file>:<line>``), options as
listed, ``answer`` the correct option's letter (a gold written as an option's text becomes its
letter; several acceptable golds are kept in ``meta["answers"]``), ``category`` the record's,
``target_image`` / ``target_boxes`` from ``target_image`` / ``target_box``. Questions without
options are open: ``answer`` is the gold text, scored by ``agent.answers.match_answer`` (numbers,
normalised text). The aggregation is ``base.by_category`` (the share of questions answered
correctly, overall and per category).
"""

from __future__ import annotations

from typing import Optional

from imagent_jax.data import jsonl as jsonl_lib
from imagent_jax.evaluation.benchmarks import base


def _letter(gold: str, options: list[str]) -> Optional[str]:
  if len(gold) == 1 and gold.upper() in base.LETTERS[:len(options)]:
    return gold.upper()
  lowered = [o.lower() for o in options]
  return base.LETTERS[lowered.index(gold.lower())] if gold.lower() in lowered else None


def read(path: str, split: Optional[str] = None) -> list[base.Example]:
  """Examples of a ``.jsonl`` file, or of every ``*.jsonl`` file of a folder (sorted).

  Args:
    path: the file or folder.
    split: unused (the files are the split).

  Raises:
    BenchmarkError: a bad record (``data.jsonl``'s checks: file, line and kind in the message).
  """
  del split
  try:
    source = jsonl_lib.JsonlSource(path)
  except jsonl_lib.DataError as e:
    raise base.BenchmarkError(e.path, f"line {e.line}", f"[{e.kind}] {e.message}") from None
  out = []
  for i in range(len(source)):
    r = source.record(i)
    where = (r["path"], f"line {r['line']}")
    options = list(r["options"] or [])
    golds = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
    meta = {}
    if options:
      letters = [_letter(g, options) for g in golds]  # JsonlSource checked that every gold is an option
      answer = letters[0]
      if len(set(letters)) > 1:
        meta["answers"] = list(dict.fromkeys(letters))
    else:
      answer = golds[0]
      if len(golds) > 1:
        meta["answers"] = list(golds)
    refs = [base.ImageRef(name=p, path=p) for p in r["images"]]
    box = r["target_box"]
    out.append(base.make_example(id=r["id"], question=r["question"], options=options, answer=answer,
                                 category=r["category"], image_refs=refs, where=where, meta=meta,
                                 target_image=r["target_image"], target_boxes=(tuple(box),) if box else ()))
  ids = [e.id for e in out]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise base.BenchmarkError(path, dup, "two records have this id; ids must be unique (results are keyed by id)")
  return out


JSONL = base.Benchmark(name="jsonl", read=read, splits=("test",),
                       source="imagent_jax/data/jsonl.py (our schema; MIFG-QA drops in)")
