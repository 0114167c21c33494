"""The one evaluator: questions in, the agent's rollouts out, one record per answer, aggregated the
benchmark's official way. The eval stage, the rl stage's test split and the CPU claim use it.

``answer_batch`` rolls out a batch of questions with the jitted agent rollout (tools as
configured; greedy, or ``k`` samples per question for Avg@k) and returns one JSON-ready record per
trajectory. ``aggregate`` turns records into the benchmark's table: per question it folds the
rotations of circular evaluation (correct only if every rotation is), per sample index it applies
the benchmark's official aggregation, and Avg@k is the mean over sample indices.

A record (``results.jsonl`` of the eval stage, one line each)::

  {"id": "sa_4690", "sample": 0, "category": "direct_attributes", "subcategory": "",
   "response": "<think>...</think><tool_call>...</tool_call>...<answer>B</answer>",
   "answer": "B", "gold": "B", "correct": true, "status": "answered",
   "tool_calls": [{"name": "confirm", "ok": true, "error": null, "image": 0,
                   "box": [812.0, 240.0, 1020.0, 410.0], "on_target": true}],
   "calls": 1, "zooms": 1, "zooms_on_target": 1}

``box`` is the returned view's box in the pixels of the input image it comes from (``image``,
0-based); ``on_target`` whether it covers at least half of one of the question's target boxes
(V*'s published boxes; null without targets).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from imagent_jax.agent.trajectory import STATUS_NAMES, Trajectory
from imagent_jax.evaluation import scoring as score_lib

ROTATION_MARK = "#r"  # benchmarks.rotations names the variants "<id>#r<k>"


_get = score_lib.field


def target_boxes(example: Any) -> tuple[int, list[list[float]]]:
  """``(target_image, boxes)`` of a question: a ``benchmarks.Example``'s ``target_boxes`` or an
  example dict's ``target_box``; ``(-1, [])`` without any."""
  boxes = _get(example, "target_boxes") or ()
  if not boxes and _get(example, "target_box") is not None:
    boxes = [_get(example, "target_box")]
  image = _get(example, "target_image", -1)
  if image is None or image < 0 or not boxes:
    return -1, []
  return int(image), [list(map(float, b)) for b in boxes]


def _covers(box: Sequence[float], target: Sequence[float]) -> bool:
  """The view's box covers at least half of the target box's area."""
  ix = max(0.0, min(box[2], target[2]) - max(box[0], target[0]))
  iy = max(0.0, min(box[3], target[3]) - max(box[1], target[1]))
  area = max((target[2] - target[0]) * (target[3] - target[1]), 1e-6)
  return ix * iy >= 0.5 * area


def record(trajectory: Trajectory, example: Any, *, sample: int = 0, fallback: str = "text") -> dict[str, Any]:
  """The JSON-ready record of one trajectory answering ``example`` (module docstring).

  Args:
    trajectory: the rollout's host record.
    example: the question (a ``benchmarks.Example`` or an example dict: ``id``, ``options``,
      ``answer``, ``category``, targets where known).
    sample: which of the question's ``k`` samples this is (0 for greedy).
    fallback: ``score``'s answer fallback; the response scored is the assistant turns joined
      (tool responses left out), as the rewards read it.
  """
  text = "\n".join(trajectory.turns)
  target_image, targets = target_boxes(example)
  calls = []
  for c in trajectory.calls:
    entry = {"name": c.name, "ok": bool(c.ok), "error": c.error_kind, "image": None, "box": None, "on_target": None}
    if c.ok and c.view_index is not None:
      ref = trajectory.context.refs[c.view_index - 1]
      entry["image"], entry["box"] = int(ref.root) - 1, [round(float(v), 2) for v in ref.root_box]
      if targets:
        entry["on_target"] = entry["image"] == target_image and any(_covers(entry["box"], t) for t in targets)
    calls.append(entry)
  zooms = [c for c in calls if c["box"] is not None and c["name"] == "confirm"]
  return {"id": str(_get(example, "id")), "sample": int(sample), "category": str(_get(example, "category", "") or ""),
          "subcategory": str(_get(example, "subcategory", "") or ""), "response": text,
          "answer": score_lib.response_answer(example, text, fallback),
          "gold": _get(example, "answer"), "correct": score_lib.score(example, text, fallback=fallback),
          "status": STATUS_NAMES[trajectory.status], "tool_calls": calls, "calls": len(calls), "zooms": len(zooms),
          "zooms_on_target": sum(bool(c["on_target"]) for c in zooms) if targets else None}


def answer_batch(rollout, params, prompt: Callable[[Any], Any], examples: Sequence[Any], *, rng=None,
                 fallback: str = "text", images: Optional[Sequence[Sequence[Any]]] = None,
                 positions: Optional[Sequence[int]] = None) -> tuple[list[dict[str, Any]], list[Trajectory]]:
  """Rolls out ``examples`` (``rollout.cfg.group_size`` samples each) and scores every trajectory.

  Args:
    rollout: an ``agent.rollout.Rollout`` (its config sets greedy or sampled, and the group size).
    params: the model parameters (on this process's devices).
    prompt: ``prompt(example) -> messages`` (the opening conversation, tools listed).
    examples: ``B`` questions (example dicts, or ``benchmarks.Example`` s with ``images`` given).
    rng: the rollout's PRNG key (default ``key(0)``: greedy evaluation ignores it).
    fallback: ``score``'s answer fallback.
    images: the ``B`` lists of input images (default: each example's ``images``).
    positions: each question's place in the whole benchmark: sample ``j`` of question ``p`` draws
      with ``fold_in(rng, p * G + j)`` (``Rollout``'s row ids), so Avg@k samples do not depend on
      how the questions were batched (a resumed evaluation draws what an uninterrupted one would).
      Default: ``0 .. B-1``.

  Returns:
    ``(records, trajectories)``: ``B * G`` of each, question-major (question ``i``'s samples are
    rows ``i * G ... i * G + G - 1``; ``Trajectory.prompt_index`` indexes ``examples``).
  """
  images = [_get(e, "images") for e in examples] if images is None else images
  g = rollout.cfg.group_size
  row_ids = None
  if positions is not None:
    row_ids = (np.asarray(positions, np.int64)[:, None] * g + np.arange(g)[None, :]).reshape(-1).astype(np.int32)
  _, trajs = rollout(params, [prompt(e) for e in examples], list(images),
                     jax.random.key(0) if rng is None else rng, row_ids=row_ids)
  records = [record(t, examples[t.prompt_index], sample=i % g, fallback=fallback) for i, t in enumerate(trajs)]
  return records, trajs


def question_id(record_id: str) -> str:
  """The question a record answers: its id without a rotation mark (``"q7#r2"`` -> ``"q7"``)."""
  head, mark, tail = str(record_id).rpartition(ROTATION_MARK)
  return head if mark and tail.isdigit() else str(record_id)


def question_rows(records: Sequence[Mapping[str, Any]], meta: Optional[Mapping[str, Mapping]] = None
                  ) -> dict[int, list[dict[str, Any]]]:
  """Per sample index, one row per question (``id``, ``category``, ``subcategory``, ``correct``,
  ``meta``): a question with rotations is correct when all of them are.

  Args:
    records: answer records (``record``).
    meta: ``Example.meta`` by question id (what an official aggregation reads besides categories).
  """
  by_sample: dict[int, dict[str, dict[str, Any]]] = collections.defaultdict(dict)
  for r in records:
    qid = question_id(r["id"])
    row = by_sample[int(r.get("sample", 0))].setdefault(
        qid, {"id": qid, "category": r.get("category", ""), "subcategory": r.get("subcategory", ""), "correct": True,
              "meta": dict((meta or {}).get(qid, {}))})
    row["correct"] = row["correct"] and bool(r["correct"])
  return {k: list(v.values()) for k, v in sorted(by_sample.items())}


def aggregate(records: Sequence[Mapping[str, Any]], aggregate_fn: Callable[[Sequence[Mapping]], dict[str, float]],
              meta: Optional[Mapping[str, Mapping]] = None) -> dict[str, Any]:
  """A benchmark's scores from its records: the official aggregation per sample index, averaged
  (Avg@k; greedy is k = 1), and the tool use per question.

  Args:
    records: the answer records of one benchmark (every sample of every question).
    aggregate_fn: the benchmark's official aggregation (``base.Benchmark.aggregate``).
    meta: ``Example.meta`` by question id.

  Returns:
    ``{"scores": {"overall": %, <group>: %, ...}, "questions": n, "samples": k,
    "calls_per_question", "zooms_per_question", "zooms_on_target" (share of zooms covering a
    target box, NaN without), "status": {name: share}}``.
  """
  per_sample = question_rows(records, meta)
  tables = [aggregate_fn(rows) for rows in per_sample.values()]
  keys = list(dict.fromkeys(k for t in tables for k in t))
  scores = {k: float(np.mean([t[k] for t in tables if k in t])) for k in keys}
  n = len({question_id(r["id"]) for r in records})
  answers = max(len(records), 1)
  zoom_total = sum(r["zooms"] for r in records if r.get("zooms_on_target") is not None)
  on_target = sum(r["zooms_on_target"] or 0 for r in records if r.get("zooms_on_target") is not None)
  status = collections.Counter(r["status"] for r in records)
  return {"scores": scores, "questions": n, "samples": len(per_sample),
          "calls_per_question": sum(r["calls"] for r in records) / answers,
          "zooms_per_question": sum(r["zooms"] for r in records) / answers,
          "zooms_on_target": on_target / zoom_total if zoom_total else math.nan,
          "status": {name: status[name] / answers for name in STATUS_NAMES}}
