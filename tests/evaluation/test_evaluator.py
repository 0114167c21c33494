"""The evaluator's aggregation: official per-benchmark functions, circular folding, Avg@k, tool use."""

import math

import pytest

from imagent_jax.evaluation import evaluator
from imagent_jax.evaluation.benchmarks import base


def _r(qid, correct, category="c", sample=0, zooms=0, on=None):
  return {"id": qid, "sample": sample, "category": category, "correct": correct, "calls": zooms, "zooms": zooms,
          "zooms_on_target": on, "status": "answered"}


def test_by_category_is_the_share_of_questions():
  rows = [_r("a", True, "x"), _r("b", False, "x"), _r("c", True, "y")]
  s = evaluator.aggregate(rows, base.by_category)
  assert s["scores"] == pytest.approx({"overall": 200 / 3, "x": 50.0, "y": 100.0})
  assert s["questions"] == 3 and s["samples"] == 1


def test_circular_needs_every_rotation_and_avg_at_k_averages_samples():
  rows = [_r("q#r0", True), _r("q#r1", True), _r("q#r2", False), _r("p#r0", True), _r("p#r1", True)]
  assert evaluator.aggregate(rows, base.by_category)["scores"]["overall"] == 50.0  # q fails one rotation
  assert evaluator.question_id("q#r12") == "q" and evaluator.question_id("a#rb") == "a#rb"
  k = [_r("q", True, sample=0), _r("q", False, sample=1), _r("p", True, sample=0), _r("p", True, sample=1)]
  s = evaluator.aggregate(k, base.by_category)
  assert s["scores"]["overall"] == 75.0 and s["samples"] == 2 and s["questions"] == 2


def test_official_aggregation_gets_rows_with_meta():
  seen = []

  def macro(rows):
    seen.extend(rows)
    cats = sorted({r["category"] for r in rows})
    per = {c: 100 * sum(r["correct"] for r in rows if r["category"] == c) / sum(r["category"] == c for r in rows)
           for c in cats}
    return {"overall": sum(per.values()) / len(per), **per}

  rows = [_r("a", True, "x"), _r("b", False, "x"), _r("c", False, "x"), _r("d", True, "y")]
  s = evaluator.aggregate(rows, macro, meta={"a": {"task": "t1"}})
  assert s["scores"]["overall"] == pytest.approx((100 / 3 + 100) / 2)  # not the micro 50
  assert seen[0]["meta"] == {"task": "t1"} and seen[1]["meta"] == {}


def test_tool_use_and_zooms_on_target():
  rows = [_r("a", True, zooms=2, on=1), _r("b", True, zooms=1, on=1), _r("c", True, zooms=3, on=None)]
  s = evaluator.aggregate(rows, base.by_category)
  assert s["calls_per_question"] == 2.0 and s["zooms_on_target"] == pytest.approx(2 / 3)
  assert math.isnan(evaluator.aggregate([_r("a", True)], base.by_category)["zooms_on_target"])


def test_target_boxes_and_cover():
  assert evaluator.target_boxes({"target_image": 1, "target_box": [0, 0, 4, 4]}) == (1, [[0.0, 0.0, 4.0, 4.0]])
  assert evaluator.target_boxes({"target_image": -1, "target_box": None}) == (-1, [])
  assert evaluator._covers([0, 0, 3, 4], [0, 0, 4, 4]) and not evaluator._covers([0, 0, 1, 4], [0, 0, 4, 4])


class _FakeRollout:
  """Answers every question with its gold letter; records the row ids it was asked to sample."""

  def __init__(self, g):
    self.cfg = type("Cfg", (), {"group_size": g})()
    self.row_ids = None

  def __call__(self, params, prompts, images, rng, row_ids=None):
    from imagent_jax.agent.trajectory import Trajectory
    self.row_ids = row_ids
    g = self.cfg.group_size
    trajs = [Trajectory(prompt_index=i // g, status=0, response="", turns=[f"<answer>{p}</answer>"], answer=p,
                        calls=[], context=None) for i, p in enumerate(a for a in prompts for _ in range(g))]
    return {}, trajs


def test_answer_batch_records_and_row_ids_follow_the_questions_place():
  examples = [{"id": "x", "options": ["a", "b"], "answer": "B", "category": "c", "images": []},
              {"id": "y", "options": ["a", "b"], "answer": "A", "category": "c", "images": []}]
  rollout = _FakeRollout(3)
  records, trajs = evaluator.answer_batch(rollout, None, lambda e: "B", examples, positions=[5, 9])
  assert rollout.row_ids.tolist() == [15, 16, 17, 27, 28, 29]  # question p, sample j: p * G + j
  assert [(r["id"], r["sample"], r["correct"]) for r in records] == [
      ("x", 0, True), ("x", 1, True), ("x", 2, True), ("y", 0, False), ("y", 1, False), ("y", 2, False)]
  assert records[0]["answer"] == "B" and records[0]["status"] == "answered" and len(trajs) == 6
  assert evaluator.aggregate(records, base.by_category)["scores"]["overall"] == 50.0
