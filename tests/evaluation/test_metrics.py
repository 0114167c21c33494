"""evaluation.metrics: where confirm zooms went against their chance baselines, and the tool-use
numbers of a batch of trajectories, by hand."""

import math
from types import SimpleNamespace as NS

import pytest
from PIL import Image

from imagent_jax.evaluation.metrics import confirm_hits, trajectory_stats
from imagent_jax.rl import masks


def test_confirm_hits_and_their_chance_baseline():
  example = {"images": [Image.new("RGB", (100, 80)), Image.new("RGB", (100, 80))], "target_image": 1,
             "target_box": [40, 40, 50, 50]}
  refs = [NS(root=1, root_box=(0, 0, 100, 80)), NS(root=2, root_box=(0, 0, 100, 80)),  # the two inputs
          NS(root=2, root_box=(35, 35, 60, 60)),  # view 3: on the target
          NS(root=2, root_box=(0, 0, 30, 30)),  # view 4: right image, wrong place
          NS(root=1, root_box=(35, 35, 60, 60)),  # view 5: wrong image
          NS(root=2, root_box=(0, 0, 100, 80))]  # view 6: the whole target image
  call = lambda view, name="confirm", ok=True: NS(name=name, ok=ok, view_index=view)
  traj = NS(calls=[call(3), call(4), call(5), call(6), call(3, ok=False), call(3, name="reflect")],
            context=NS(refs=refs))
  hits, total, chance, on_image, on_image_chance = confirm_hits(traj, example)
  assert (hits, total) == (2, 4)
  assert on_image == 3 and on_image_chance == pytest.approx(4 / 2)  # views 3, 4, 6; two images per call
  # A whole-image box covers the target wherever it goes: chance 1/2 (two images); the
  # 30x30 box misses the 10x10 target in most placements; 25x25 boxes in some.
  single = lambda view: confirm_hits(NS(calls=[call(view)], context=NS(refs=refs)), example)[2]
  assert single(6) == pytest.approx(0.5)
  assert 0 < single(3) < 0.5 and single(3) == pytest.approx(single(5))
  assert chance == pytest.approx(single(3) + single(4) + single(5) + single(6))
  assert confirm_hits(traj, dict(example, target_box=None)) == (0, 0, 0.0, 0, 0.0)
  three = dict(example, images=example["images"] + [Image.new("RGB", (100, 80))])
  assert confirm_hits(traj, three).on_image_chance == pytest.approx(4 / 3)


def test_trajectory_stats_by_hand():
  example = {"images": [Image.new("RGB", (100, 80)), Image.new("RGB", (100, 80))], "target_image": 1,
             "target_box": [40, 40, 50, 50]}
  refs = [NS(root=1, root_box=(0, 0, 100, 80)), NS(root=2, root_box=(0, 0, 100, 80)),
          NS(root=2, root_box=(35, 35, 60, 60)), NS(root=1, root_box=(35, 35, 60, 60))]
  call = lambda name, ok, view=None, kind=None, entered=False: NS(name=name, ok=ok, view_index=view, error_kind=kind,
                                                                   entered=entered)
  trajs = [NS(prompt_index=0, status=masks.STATUS_ANSWERED, num_successful_image_calls=2, num_malformed_calls=0,
              calls=[call("confirm", True, 3, entered=True), call("confirm", True, 4, entered=True)],
              context=NS(refs=refs)),
           NS(prompt_index=0, status=masks.STATUS_TURN_LIMIT, num_successful_image_calls=0, num_malformed_calls=1,
              calls=[call(None, False, kind="bad_json"), call("reflect", False, kind="bad_image")],
              context=NS(refs=refs)),
           NS(prompt_index=1, status=masks.STATUS_ANSWERED, num_successful_image_calls=0, num_malformed_calls=0,
              calls=[], context=NS(refs=refs))]
  stats = trajectory_stats(trajs, [example, dict(example, target_box=None)], ["reflect", "confirm"])
  want = {"tool_calls_per_trajectory": 4 / 3, "successful_calls_per_trajectory": 2 / 3,
          "failed_calls_per_trajectory": 2 / 3, "image_calls_per_trajectory": 2 / 3,
          "malformed_calls_per_trajectory": 1 / 3, "calls/reflect": 1 / 3, "calls/confirm": 2 / 3,
          "confirm_on_target": 1 / 2, "confirm_on_image": 1 / 2, "confirm_on_image_chance": 1 / 2,  # 2 images per call
          "status/answered": 2 / 3, "status/truncated": 0.0, "status/turn_limit": 1 / 3, "status/no_answer": 0.0}
  for key, value in want.items():
    assert stats[key] == pytest.approx(value), key
  single = confirm_hits(NS(calls=[call("confirm", True, 3)], context=NS(refs=refs)), example).chance
  assert stats["confirm_on_target_chance"] == pytest.approx(single)  # views 3 and 4 have the same size
  assert list(stats) == ["tool_calls_per_trajectory", "successful_calls_per_trajectory", "failed_calls_per_trajectory",
                         "image_calls_per_trajectory", "malformed_calls_per_trajectory", "calls/reflect",
                         "calls/confirm", "confirm_on_target", "confirm_on_target_chance", "confirm_on_image",
                         "confirm_on_image_chance", "status/answered", "status/truncated", "status/turn_limit",
                         "status/no_answer"]  # the logged keys, in the logged order
  none = trajectory_stats(trajs[1:], [example, example], ["confirm"])
  assert math.isnan(none["confirm_on_target"]) and math.isnan(none["confirm_on_image_chance"])  # no confirm call
