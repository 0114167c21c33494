"""Evaluation metrics of trajectories: tool use, where the zooms went, how trajectories ended.

The trainer logs ``trajectory_stats`` of every training batch and of every greedy evaluation; the
keys are the ones in ``metrics.jsonl`` and the report.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from imagent_jax.agent.trajectory import Trajectory
from imagent_jax.rl import masks


class ConfirmHits(NamedTuple):
  """Where one trajectory's successful ``confirm`` calls went (sums over those calls)."""
  hits: int  # on the target image and covering half of the target box or more
  total: int  # successful confirm calls
  chance: float  # expected hits of same-size boxes placed uniformly on a uniformly chosen input image
  on_image: int  # on the asked (target) image, wherever on it
  on_image_chance: float  # expected on_image of a uniformly chosen input image: total / number of images


def confirm_hits(traj: Trajectory, example: dict, samples: int = 256) -> ConfirmHits:
  """Where ``traj``'s successful ``confirm`` zooms went, against two chance baselines.

  A zoom hits when its box, mapped back to the root input image, is on the example's
  ``target_image`` and overlaps its ``target_box`` by at least half of the target's area.
  ``chance`` is the expected number of hits had each call put a box of the same size uniformly at
  random on a uniformly chosen input image (Monte Carlo over ``samples`` placements, fixed seed),
  the baseline ``confirm_on_target`` must beat to show that the model aims its zooms.
  ``on_image`` counts zooms on the asked image, against ``on_image_chance`` (one over the number
  of input images per call): where the detail's place is fixed, this is the part of aiming that
  is left, which image to zoom on.

  Args:
    traj: the trajectory (its ``calls`` and ``context.refs``: each view's root image and box).
    example: its question: ``images``, ``target_image`` (0-based) and ``target_box``
      ``[x0, y0, x1, y1]`` in root pixels; without ``target_box`` every count is 0.
    samples: Monte Carlo placements per call for ``chance``.

  Returns:
    ``ConfirmHits`` summed over the trajectory's successful ``confirm`` calls.
  """
  if "target_box" not in example or example.get("target_box") is None:
    return ConfirmHits(0, 0, 0.0, 0, 0.0)
  hits = total = on_image = 0
  chance = 0.0
  k = example["target_image"]
  n = len(example["images"])
  tx0, ty0, tx1, ty1 = example["target_box"]
  area = max((tx1 - tx0) * (ty1 - ty0), 1e-6)
  width, height = example["images"][k].size
  for c in traj.calls:
    if c.name != "confirm" or not c.ok or c.view_index is None:
      continue
    total += 1
    ref = traj.context.refs[c.view_index - 1]
    x0, y0, x1, y1 = ref.root_box
    bw, bh = min(x1 - x0, width), min(y1 - y0, height)
    rng = np.random.default_rng(0)  # the same placements for every box: a deterministic baseline
    rx, ry = rng.uniform(0, width - bw, samples), rng.uniform(0, height - bh, samples)
    inter = (np.clip(np.minimum(rx + bw, tx1) - np.maximum(rx, tx0), 0, None)
             * np.clip(np.minimum(ry + bh, ty1) - np.maximum(ry, ty0), 0, None))
    chance += float(np.mean(inter >= 0.5 * area)) / n
    if ref.root - 1 != k:
      continue
    on_image += 1
    inter = max(0.0, min(x1, tx1) - max(x0, tx0)) * max(0.0, min(y1, ty1) - max(y0, ty0))
    hits += inter >= 0.5 * area
  return ConfirmHits(hits, total, chance, on_image, total / n)


def trajectory_stats(trajs: Sequence[Trajectory], examples: Sequence[dict],
                     tool_names: Sequence[str]) -> dict[str, float]:
  """Tool-use numbers of a batch of trajectories for logging (per trajectory means).

  Args:
    trajs: ``[R]`` trajectories.
    examples: their questions, indexed by ``Trajectory.prompt_index`` (``target_image`` /
      ``target_box`` where the data has them, for ``confirm_hits``).
    tool_names: the enabled tools (one ``calls/<name>`` entry each).

  Returns:
    ``{name: float}``: ``tool_calls_per_trajectory``, ``successful_calls_per_trajectory``,
    ``failed_calls_per_trajectory``, ``image_calls_per_trajectory``,
    ``malformed_calls_per_trajectory``, ``calls/<tool>``, ``confirm_on_target`` /
    ``confirm_on_image`` and their ``_chance`` baselines (shares of successful ``confirm`` calls;
    NaN without any) and ``status/<name>`` (the share of trajectories ending with each status).
  """
  n = max(len(trajs), 1)
  out = {"tool_calls_per_trajectory": sum(len(t.calls) for t in trajs) / n,
         "successful_calls_per_trajectory": sum(sum(c.ok for c in t.calls) for t in trajs) / n,
         "failed_calls_per_trajectory": sum(sum(not c.ok for c in t.calls) for t in trajs) / n,
         "image_calls_per_trajectory": sum(t.num_successful_image_calls for t in trajs) / n,
         "malformed_calls_per_trajectory": sum(t.num_malformed_calls for t in trajs) / n}
  for name in tool_names:
    out[f"calls/{name}"] = sum(sum(c.name == name for c in t.calls) for t in trajs) / n
  sums = [sum(column) for column in zip(ConfirmHits(0, 0, 0.0, 0, 0.0),
                                          *(confirm_hits(t, examples[t.prompt_index]) for t in trajs))]
  hits = ConfirmHits(*sums)
  share = lambda x: x / hits.total if hits.total else float("nan")
  out["confirm_on_target"] = share(hits.hits)
  out["confirm_on_target_chance"] = share(hits.chance)
  out["confirm_on_image"] = share(hits.on_image)
  out["confirm_on_image_chance"] = share(hits.on_image_chance)
  for code, name in enumerate(masks.STATUS_NAMES):
    out[f"status/{name}"] = sum(t.status == code for t in trajs) / n
  return out
