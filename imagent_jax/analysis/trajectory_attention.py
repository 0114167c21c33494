"""Where a trajectory's generated tokens look: attention shares per generated token, and their summaries.

``analyze_trajectories`` takes finished rollouts (``agent.rollout.Rollout``'s arrays and
trajectories), replays each row's whole token sequence with its prompt images and tool views
(re-rendered from their provenance, as the training pass sees them) through
``attention.attention_shares``, and keeps, for every generated token, the shares of attention the
step that produced it gave each key segment, in every layer: a ``TrajectoryAttention`` per row.

The step that produced generated token ``t`` is the query at position ``t - 1`` (its input is
the token before it): what the model attended to when it chose token ``t``, as the IMAgent
paper's Figure 1 measures it during inference. The summaries read ``TrajectoryAttention`` s:

* ``progress_curves``: share per category against generation progress (Figure 1);
* ``layer_progress``: one category's share per layer against progress (the heatmap);
* ``around_views``: shares just before and just after each tool view enters the context.

Categories (``attention.CATEGORIES`` add up to 1): ``text`` (system prompt and question),
``image`` (the prompt images), ``generated`` (earlier generated tokens), ``tool_views`` (image
tokens of returned views), ``tool_text`` (tool responses and the turn templates around them).
``attention.DETAIL``: ``all_images`` (image + tool_views), ``asked_image`` / ``other_images``
(the prompt image that holds the answer, ``target_image``, and the rest), ``asked_views`` (views
cut from the asked image).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from imagent_jax.agent import trajectory as trajectory_lib
from imagent_jax.analysis import attention
from imagent_jax.processing import images as images_lib
from imagent_jax.rl.batch import trim_padding_columns

CATEGORIES = attention.CATEGORIES + attention.DETAIL


@dataclasses.dataclass
class TrajectoryAttention:
  """One trajectory's attention at each of its ``N`` generated tokens.

  Attributes:
    shares: ``[layers, N, C]`` float32: the head-mean share of the attention of the step that
      produced each generated token, per key segment (``segments``).
    segments: ``C`` names: ``text``, ``generated``, ``tool_text``, ``image 1`` ... (prompt
      images), ``view 1`` ... (tool views, in the order they entered).
    num_prompt_images: prompt images of the question.
    asked_image: 0-based prompt image holding the answer; -1 when unknown.
    view_starts: per tool view that entered, the number of generated tokens before it.
    view_roots: per tool view, the 0-based prompt image it was cut from (-1: not an input image).
    correct: whether the trajectory's answer was right (None when not scored).
  """

  shares: np.ndarray
  segments: tuple
  num_prompt_images: int
  asked_image: int = -1
  view_starts: list = dataclasses.field(default_factory=list)
  view_roots: list = dataclasses.field(default_factory=list)
  correct: Optional[bool] = None

  @property
  def num_generated(self) -> int:
    return self.shares.shape[1]

  @property
  def progress(self) -> np.ndarray:
    """``[N]`` in ``(0, 1)``: where each generated token sits in the generation, ``(i + 0.5) / N``."""
    n = self.num_generated
    return (np.arange(n) + 0.5) / max(n, 1)

  def segment_ids(self, category: str) -> list[int]:
    """The segments of ``category`` (``CATEGORIES``); empty when the trajectory has none."""
    images = list(range(attention.FIRST_IMAGE, attention.FIRST_IMAGE + self.num_prompt_images))
    views = list(range(attention.FIRST_IMAGE + self.num_prompt_images, len(self.segments)))
    asked = [attention.FIRST_IMAGE + self.asked_image] if 0 <= self.asked_image < self.num_prompt_images else []
    table = {"text": [attention.TEXT], "generated": [attention.GENERATED], "tool_text": [attention.TOOL_TEXT],
             "image": images, "tool_views": views, "all_images": images + views, "asked_image": asked,
             "other_images": [i for i in images if i not in asked] if asked else [],
             "asked_views": [v for v, r in zip(views, self.view_roots) if asked and r == self.asked_image]}
    if category not in table:
      raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
    return table[category]

  def category(self, name: str) -> np.ndarray:
    """``[layers, N]``: the share on ``name`` (``CATEGORIES``) at each generated token, per layer.

    ``asked_image`` and ``other_images`` are NaN when the asked image is unknown.
    """
    ids = self.segment_ids(name)
    if name in ("asked_image", "other_images", "asked_views") and not 0 <= self.asked_image < self.num_prompt_images:
      return np.full(self.shares.shape[:2], np.nan, np.float32)
    return self.shares[..., ids].sum(-1) if ids else np.zeros(self.shares.shape[:2], np.float32)


def _asked_image(example: Any) -> int:
  value = example.get("target_image", -1) if isinstance(example, Mapping) else getattr(example, "target_image", -1)
  return -1 if value is None else int(value)


def analyze_trajectories(model, params, out: Mapping[str, np.ndarray], trajs: Sequence[trajectory_lib.Trajectory], *,
                         prompt_len: int, image_settings: Mapping[str, Any], view_max_pixels: int,
                         examples: Optional[Sequence[Any]] = None, correct: Optional[Sequence[bool]] = None,
                         rows_per_pass: int = 4, length_multiple: int = 64) -> list[TrajectoryAttention]:
  """Attention shares at every generated token of finished trajectories.

  Rows go ``rows_per_pass`` at a time through ``attention.attention_shares``, each pass over the
  columns its rows use with exactly their images (padded to a few static sizes).

  Args:
    model: the family's module (``attention_block`` is the query chunk).
    params: its parameters.
    out: the rollout's arrays: ``tokens``, ``attention_mask``, ``action_mask`` ``[R, T]``.
    trajs: its ``R`` trajectories (their images and views are re-rendered from provenance).
    prompt_len: the rollout's prompt columns (``RolloutConfig.max_prompt_len``).
    image_settings: ``Processor.image_settings``.
    view_max_pixels: the pixel budget of a returned view (``ToolConfig.view_max_pixels``).
    examples: the questions, indexed by ``Trajectory.prompt_index`` (for ``target_image``).
    correct: ``[R]`` whether each answer was right (kept on the records).
    rows_per_pass: rows per forward pass (memory: one pass's activations).
    length_multiple: the shortest pass; a pass's columns (and its patches and image slots) are
      padded to this times a power of two, so a few compiled shapes serve every pass.

  Returns:
    one ``TrajectoryAttention`` per row, in order.
  """
  image_id = model.config.image_token_id
  seg = attention.key_segments(out["tokens"], out["attention_mask"], out["action_mask"], prompt_len=prompt_len,
                               image_token_id=image_id)
  num_segments = int(seg.max(initial=attention.FIRST_IMAGE - 1)) + 1
  patch_dim = images_lib.patch_dim(image_settings)
  merge_unit = int(image_settings["merge_size"]) ** 2
  results = []
  for lo in range(0, len(trajs), rows_per_pass):
    rows = list(range(lo, min(lo + rows_per_pass, len(trajs))))
    used = np.flatnonzero(np.asarray(out["attention_mask"])[rows].any(axis=0))
    span = int(used[-1] - used[0] + 1) if used.size else 1
    batch = trim_padding_columns({"tokens": out["tokens"][rows], "attention_mask": out["attention_mask"][rows],
                                  "segments": seg[rows]}, _bucket(span, length_multiple))
    patches, grids = [], []
    for r in rows:
      p, g = trajectory_lib.trajectory_images(trajs[r], image_settings, view_max_pixels)
      patches += p
      grids += g
    total = sum(len(p) for p in patches)
    pv, grid = images_lib.pack_patches(patches, grids, patch_budget=_bucket(total, 64 * merge_unit),
                                       image_slots=_bucket(len(grids), 8), patch_dim=patch_dim,
                                       what="the trajectories' images")
    inputs = {"input_ids": batch["tokens"], "attention_mask": batch["attention_mask"]}
    if grids:
      inputs.update(pixel_values=pv, image_grid_thw=grid)
    shares = attention.attention_shares(model, params, inputs, attention.one_hot(batch["segments"], num_segments))
    for j, r in enumerate(rows):
      results.append(_record(shares[:, j], batch["segments"][j], trajs[r],
                             -1 if examples is None else _asked_image(examples[trajs[r].prompt_index]),
                             None if correct is None else bool(correct[r])))
  return results


def _bucket(n: int, smallest: int) -> int:
  """The static size a pass pads ``n`` to: ``smallest`` times a power of two (few distinct sizes, few compiles)."""
  size = max(int(smallest), 1)
  while size < n:
    size *= 2
  return size


def _record(shares, seg, traj: trajectory_lib.Trajectory, asked: int, correct) -> TrajectoryAttention:
  """The ``TrajectoryAttention`` of one row: ``shares [layers, L, C]`` and ``seg [L]`` of its pass."""
  ctx = traj.context
  n_in = ctx.num_inputs
  used = seg[seg >= 0]
  n_images = int(used.max(initial=attention.FIRST_IMAGE - 1)) + 1 - attention.FIRST_IMAGE
  n_views = max(n_images - n_in, 0)
  segments = attention.FIXED_SEGMENTS + tuple(f"image {k + 1}" for k in range(n_in)) + tuple(
      f"view {k + 1}" for k in range(n_views))
  generated = np.flatnonzero(seg == attention.GENERATED)
  generated = generated[generated > 0]
  kept = shares[:, generated - 1, :len(segments)]  # the step that produced token t is query t - 1
  starts = []
  for k in range(n_views):
    first = int(np.argmax(seg == attention.FIRST_IMAGE + n_in + k))
    starts.append(int(np.sum(generated < first)))
  entered = [c.view_index - 1 for c in traj.calls if c.entered][:n_views]
  roots = [int(ctx.refs[v].root) - 1 if int(ctx.refs[v].root) <= n_in else -1 for v in entered]
  return TrajectoryAttention(shares=np.asarray(kept, np.float32), segments=segments, num_prompt_images=n_in,
                             asked_image=asked, view_starts=starts, view_roots=roots, correct=correct)


# ---------------------------------------------------------------------------------- summaries


def _layer_values(t: TrajectoryAttention, category: str, layer: Optional[int]) -> np.ndarray:
  """``[N]`` share on ``category`` at each generated token: one layer, or the mean over layers."""
  per_layer = t.category(category)
  return per_layer.mean(0) if layer is None else per_layer[layer]


def _binned(values: np.ndarray, progress: np.ndarray, bins: int) -> np.ndarray:
  """``[bins]`` mean of ``values`` per progress bin (NaN for an empty bin)."""
  idx = np.minimum((progress * bins).astype(int), bins - 1)
  sums = np.bincount(idx, weights=values, minlength=bins)
  counts = np.bincount(idx, minlength=bins)
  with np.errstate(invalid="ignore"):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _nanmean(rows: list, width: int) -> np.ndarray:
  if not rows:
    return np.full(width, np.nan)
  stack = np.stack(rows)
  counts = np.sum(np.isfinite(stack), axis=0)
  with np.errstate(invalid="ignore"):
    return np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)


def progress_curves(analyses: Sequence[TrajectoryAttention], *, bins: int = 10, layer: Optional[int] = None,
                    categories: Sequence[str] = CATEGORIES) -> dict[str, np.ndarray]:
  """Share per category against generation progress: the paper's Figure 1.

  Each trajectory's generated tokens are binned by ``progress`` into ``bins`` equal bins and
  averaged within a bin; the curve is the mean over trajectories (each counts once per bin it
  has tokens in; NaN where none has).

  Args:
    analyses: ``TrajectoryAttention`` s.
    bins: progress bins.
    layer: one layer's shares; None: the mean over layers.
    categories: which ``CATEGORIES``.

  Returns:
    ``{category: [bins]}`` float64.
  """
  out = {}
  for name in categories:
    rows = [_binned(_layer_values(t, name, layer), t.progress, bins) for t in analyses if t.num_generated]
    out[name] = _nanmean(rows, bins)
  return out


def layer_progress(analyses: Sequence[TrajectoryAttention], category: str = "all_images", *,
                   bins: int = 10) -> np.ndarray:
  """``[layers, bins]``: the share on ``category`` per layer against generation progress (NaN: no tokens)."""
  kept = [t for t in analyses if t.num_generated]
  if not kept:
    return np.full((0, bins), np.nan)
  layers = kept[0].shares.shape[0]
  return np.stack([_nanmean([_binned(_layer_values(t, category, i), t.progress, bins) for t in kept], bins)
                   for i in range(layers)])


def around_views(analyses: Sequence[TrajectoryAttention], *, window: int = 8, layer: Optional[int] = None,
                 categories: Sequence[str] = CATEGORIES) -> dict[str, dict[str, float]]:
  """Shares just before and just after each tool view enters the context.

  For every view that entered after at least one generated token: the mean share over the
  ``window`` generated tokens before it and over the ``window`` generated tokens after it (fewer
  where the trajectory has fewer), then the mean over views.

  Returns:
    ``{category: {"before": share, "after": share, "views": count}}`` (NaN shares without views).
  """
  out = {}
  for name in categories:
    before, after = [], []
    for t in analyses:
      values = _layer_values(t, name, layer)
      for start in t.view_starts:
        b, a = values[max(0, start - window):start], values[start:start + window]
        if len(b) and len(a) and np.all(np.isfinite(b)) and np.all(np.isfinite(a)):
          before.append(b.mean())
          after.append(a.mean())
    out[name] = {"before": float(np.mean(before)) if before else float("nan"),
                 "after": float(np.mean(after)) if after else float("nan"), "views": len(before)}
  return out
