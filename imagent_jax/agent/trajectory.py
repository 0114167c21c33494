"""What a finished trajectory is on the host: its calls, its images, and the pixels a training pass
needs to see the same images again.

The rollout (``agent.rollout``) and the host turn loop (``agent.turn_loop``) produce
``Trajectory`` records; rewards, masks, metrics and the training batch read them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from imagent_jax.agent import tools as tools_lib
from imagent_jax.processing import images as images_lib


# Per-trajectory end status, written by the rollout (and the host turn loop) and read by masks,
# rewards and logging.
STATUS_ANSWERED = 0  # ended with an answer
STATUS_TRUNCATED = 1  # length limit reached before answering
STATUS_TURN_LIMIT = 2  # turn / tool-call limit reached while still calling tools
STATUS_NO_ANSWER = 3  # stopped (end of turn, no tool call) without an <answer>
STATUS_NAMES = ("answered", "truncated", "turn_limit", "no_answer")  # indexed by status code


class Call(NamedTuple):
  """One tool call of a trajectory, as the host saw it."""

  name: str | None  # the tool named, None when the call did not parse
  ok: bool
  error_kind: str | None  # tools.ERROR_KINDS, or "turn_limit"
  view_index: int | None  # 1-based number of the returned view
  entered: bool  # the returned view entered the context (it fit in the observation slot)


@dataclasses.dataclass
class Trajectory:
  """Host record of one trajectory (row ``r``; group ``r // group_size``)."""

  prompt_index: int
  status: int
  response: str  # every generated and observation token after the prompt, decoded
  turns: list  # the assistant turns (tool responses excluded), as the rewards read them
  answer: str | None
  calls: list  # [Call]
  context: Any  # the ToolContext: input images, returned views and their provenance

  @property
  def num_successful_image_calls(self) -> int:
    """Successful calls whose returned view entered the context (what the tool gain counts)."""
    return sum(1 for c in self.calls if c.ok and c.entered)

  @property
  def num_malformed_calls(self) -> int:
    """Calls that did not parse or named an unknown tool (``tools.MALFORMED_KINDS``)."""
    return sum(1 for c in self.calls if not c.ok and c.error_kind in tools_lib.MALFORMED_KINDS)

  @property
  def views_in_context(self) -> list[int]:
    """0-based indices into ``context.views`` of the images in the token sequence, in order."""
    return list(range(self.context.num_inputs)) + [c.view_index - 1 for c in self.calls if c.entered]


def trajectory_images(trajectory: Trajectory, image_settings: Mapping[str, Any], view_max_pixels: int,
                      inputs_cache: dict | None = None):
  """``(patches, grids)`` of one trajectory's images in the order of its image placeholders.

  The prompt images, then the returned views in order. Views are re-rendered from their
  provenance (root image and box), so a trajectory need not keep the pixels it was shown.

  Args:
    trajectory: the record.
    image_settings: ``Processor.image_settings`` (min/max pixels of inputs, patch geometry).
    view_max_pixels: the pixel budget of a returned view.
    inputs_cache: a dict shared by calls with the same ``image_settings``: each prompt image
      object is preprocessed once (the trajectories of a group share their question's images),
      keyed by ``id`` (the caller keeps the images alive while the dict lives). None: no cache.

  Returns:
    ``patches`` a list of ``[P_i, patch_dim]`` arrays and ``grids`` a list of ``[3]`` grids.
  """
  ctx = trajectory.context
  patches, grids = [], []
  for v in trajectory.views_in_context:
    if v < ctx.num_inputs:
      image = ctx.views[v]
      if inputs_cache is None:
        pv, g = images_lib.preprocess_image(image, **image_settings)
      else:
        if id(image) not in inputs_cache:  # the image is kept too, so its id cannot be reused meanwhile
          inputs_cache[id(image)] = (image, images_lib.preprocess_image(image, **image_settings))
        pv, g = inputs_cache[id(image)][1]
    else:
      ref = ctx.refs[v]
      view = ctx.render(ref.root, ref.root_box, ctx.shown_sizes[v])
      pv, g = images_lib.preprocess_image(view, **{**image_settings, "max_pixels": view_max_pixels})
    patches.append(pv)
    grids.append(np.asarray(g))
  return patches, grids


def training_images(trajectories: Sequence[Trajectory], *, patch_budget: int, image_slots: int,
                    image_settings: Mapping[str, Any], view_max_pixels: int):
  """``pixel_values [patch_budget, D]``, ``image_grid_thw [image_slots, 3]`` and ``images_per_row [R]``.

  Row by row, each trajectory's images (``trajectory_images``), packed by
  ``images.pack_patches``: the order of the image placeholders in the trajectories' token
  sequences, which is how the vision tower and the positions read them. ``images_per_row``
  says which images are whose, so nobody has to recount placeholders.
  """
  patches, grids, per_row = [], [], []
  cache = {}  # a group's trajectories share their prompt images: each is preprocessed once
  for t in trajectories:
    p, g = trajectory_images(t, image_settings, view_max_pixels, cache)
    patches += p
    grids += g
    per_row.append(len(g))
  pv, grid = images_lib.pack_patches(patches, grids, patch_budget=patch_budget, image_slots=image_slots,
                                     patch_dim=images_lib.patch_dim(image_settings), what="the trajectories")
  return pv, grid, np.asarray(per_row, np.int32)
