"""From one rollout to the GRPO update's batch, and from that batch to its minibatches (host side).

* ``prepare_batch`` — the one pipeline from a rollout to training: rewards
  (``score_trajectories``), the two-layer loss mask and the zero-variance groups (``masks``),
  group advantages over the same rows as the zero-variance test (``advantages``), and the
  training batch: every image the trajectories saw re-rendered from its provenance
  (``agent.trajectory.training_images``), only the token columns some row uses
  (``trim_padding_columns``). The trainer, the ``rollout`` stage and the agent-loop notebook all
  call it.
* ``split_minibatches`` — whole rows per minibatch, each minibatch with its own images.

Images. A batch keeps the patches of all its images in one ``pixel_values [P, D]`` array, row by
row (each row's prompt images, then its tool views), with ``image_grid_thw [N, 3]`` in the same
order and ``images_per_row [R]`` saying how many of them each row owns (from
``training_images``). Slicing rows therefore means slicing a data-dependent, contiguous patch
range per row, which is host work: ``split_minibatches`` rebuilds each minibatch's own
``pixel_values`` / ``image_grid_thw``, padded to static budgets so one compiled step serves every
minibatch. The rows' image placeholder counts are checked against ``images_per_row``: a mismatch
is a clear error before anything is compiled.

Shapes: ``R`` rows (trajectories), ``T`` tokens per row; groups are contiguous rows
(row ``r`` is in group ``r // group_size``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from imagent_jax.agent import trajectory as trajectory_lib
from imagent_jax.rl import masks, rewards
from imagent_jax.rl.advantages import compute_advantages

Batch = Mapping[str, Any]


# ------------------------------------------------------------------------ rollout -> batch


def score_trajectories(trajs: Sequence[trajectory_lib.Trajectory], examples: Sequence[dict], group_size: int,
                       reward_config: rewards.RewardConfig) -> dict[str, np.ndarray]:
  """``rewards.compute_rewards`` of rollout trajectories against their questions' answers.

  Args:
    trajs: ``[R]`` trajectories, ``group_size`` consecutive ones per question.
    examples: the questions (``answer``, optional ``options``), indexed by ``Trajectory.prompt_index``.
    group_size: trajectories per question.
    reward_config: the reward.

  Returns:
    ``compute_rewards``' dict of ``[R]`` arrays (``total``, ``accuracy``, ``format``, ...).
  """
  return rewards.compute_rewards([t.turns for t in trajs], [examples[t.prompt_index]["answer"] for t in trajs],
                                 [examples[t.prompt_index].get("options") for t in trajs],
                                 [t.num_successful_image_calls for t in trajs], group_size, reward_config,
                                 num_malformed_calls=[t.num_malformed_calls for t in trajs])


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchConfig:
  """How a rollout's trajectories become a training batch.

  Attributes:
    patch_budget: static ``pixel_values`` length of the batch (all rows' images).
    image_slots: static ``image_grid_thw`` length.
    image_settings: ``Processor.image_settings`` (input pixel limits, patch geometry).
    view_max_pixels: the pixel budget of a tool view (``ToolConfig.view_max_pixels``).
    length_bucket: the used token span is rounded up to a multiple of this; 0 keeps the
      rollout's static width (``trim_padding_columns``).
    image_bucket: the image slots are cut to the images the batch has, rounded up to a multiple
      of this, and the patches to what that many slots can hold (``trim_image_budget``); 0 keeps
      the static budgets.
  """
  patch_budget: int
  image_slots: int
  image_settings: Mapping[str, Any] = dataclasses.field(hash=False)
  view_max_pixels: int
  length_bucket: int = 256
  image_bucket: int = 0

  @property
  def image_patches(self) -> int:
    """The most patches one image of the batch can have: a prompt image at the processor's
    ``max_pixels`` or a tool view at ``view_max_pixels`` (what one vision-tower slot holds)."""
    s = self.image_settings
    unit = int(s["merge_size"]) ** 2
    return max(int(s["max_pixels"]), int(self.view_max_pixels)) // int(s["patch_size"]) ** 2 // unit * unit


class Prepared(NamedTuple):
  """What ``prepare_batch`` makes of one rollout (numpy, on the host)."""
  rewards: dict[str, np.ndarray]  # compute_rewards' [R] arrays: total, accuracy, format, ...
  loss_mask: np.ndarray  # [R, T] float32: token x trajectory x zero-variance masks (rollout width)
  mask_metrics: dict[str, np.ndarray]  # masks.loss_mask's counts, scalars
  advantages: np.ndarray  # [R] float32
  batch: dict[str, np.ndarray] | None  # grpo.update's batch ([R, T'] fields), None without a BatchConfig

  @property
  def sampled(self) -> np.ndarray | None:
    """``[R, T']`` bool: the tokens the policy sampled (the batch's ``action_mask``), or None."""
    return None if self.batch is None else np.asarray(self.batch["action_mask"]).astype(bool)


def prepare_batch(out: Mapping[str, Any], trajs: Sequence[trajectory_lib.Trajectory], examples: Sequence[dict], *,
                  reward_cfg: rewards.RewardConfig, mask_cfg: masks.MaskConfig, grpo_cfg,
                  batch_cfg: BatchConfig | None = None, combine=None) -> Prepared:
  """Rewards, masks, advantages and the GRPO batch of one rollout: the one rollout-to-training pipeline.

  1. rewards of each trajectory against its question (``score_trajectories``);
  2. the loss mask, layer 1 (sampled tokens) x layer 2 (whole trajectories) x zero-variance
     groups (``masks.loss_mask``);
  3. advantages by ``grpo_cfg.advantage`` over the rows ``masks.group_stats_mask`` counts, with
     the masks' zero-variance tolerance (``advantages.compute_advantages``);
  4. with ``batch_cfg``: the training batch, every image the trajectories saw re-rendered from
     its provenance into the budgets, and only the token columns some row uses.

  Args:
    out: the rollout's arrays: ``tokens``, ``attention_mask``, ``action_mask``, ``logprobs``
      ``[R, T]`` and ``status [R]``.
    trajs: its ``[R]`` trajectories, ``group_size`` consecutive ones per question.
    examples: the questions, indexed by ``Trajectory.prompt_index``.
    reward_cfg: the reward.
    mask_cfg: the masks (its ``group_size`` is the rollout's G).
    grpo_cfg: a ``grpo.GRPOConfig`` with the same ``group_size`` (the advantage estimator).
    batch_cfg: budgets of the training batch; None stops after the advantages (``batch`` and
      ``sampled`` are None), for callers that only look.
    combine: ``combine(batch) -> batch`` applied to the training batch at the rollout's full
      width, before the padding columns are trimmed: multi-host training passes ``gather_rows``,
      so every process goes on with all processes' rows (``batch`` and ``sampled`` are then the
      global batch; ``rewards``, ``loss_mask``, ``advantages`` and ``mask_metrics`` stay this
      process's).

  Returns:
    ``Prepared``. Its ``batch`` holds ``tokens``, ``attention_mask``, ``loss_mask``, ``old_logp``
    and ``action_mask`` (the sampled tokens, where the update checks its log-probs) ``[R, T']``,
    ``advantages [R]``, ``pixel_values [patch_budget, D]``, ``image_grid_thw [image_slots, 3]``
    and ``images_per_row [R]``: what ``grpo.update`` takes (with ``ref_params``, or
    ``ref_logp`` added, for a KL term).
  """
  g = mask_cfg.group_size
  if grpo_cfg.group_size != g:
    raise ValueError(f"the masks' group_size={g} and GRPO's group_size={grpo_cfg.group_size} differ")
  rew = score_trajectories(trajs, examples, g, reward_cfg)
  malformed = np.array([t.num_malformed_calls for t in trajs], np.int32)
  loss_mask, mask_metrics = masks.loss_mask(out["action_mask"], out["attention_mask"], out["status"], malformed,
                                            rew["total"], mask_cfg)
  stats_rows = masks.group_stats_mask(out["status"], malformed, mask_cfg)
  advantages = compute_advantages(grpo_cfg, rew["total"], stats_rows, mask_cfg.zero_variance_tol)
  loss_mask, advantages, mask_metrics = jax.device_get((loss_mask, advantages, mask_metrics))
  batch = None
  if batch_cfg is not None:
    pv, grid, per_row = trajectory_lib.training_images(
        trajs, patch_budget=batch_cfg.patch_budget, image_slots=batch_cfg.image_slots,
        image_settings=batch_cfg.image_settings, view_max_pixels=batch_cfg.view_max_pixels)
    batch = dict(tokens=out["tokens"], attention_mask=out["attention_mask"], loss_mask=loss_mask,
                 advantages=advantages, old_logp=out["logprobs"], pixel_values=pv, image_grid_thw=grid,
                 images_per_row=per_row, action_mask=out["action_mask"])
    if combine is not None:
      batch = combine(batch)
    batch = trim_padding_columns(batch, batch_cfg.length_bucket)  # the used span only: less attention
    batch = trim_image_budget(batch, batch_cfg.image_bucket, batch_cfg.image_patches)  # no empty vision slots
  return Prepared(rew, loss_mask, mask_metrics, advantages, batch)


def gather_rows(batch: Batch, row_ids, *, patch_budget: int, image_slots: int) -> dict[str, np.ndarray]:
  """Every process's rows of a training batch, in global row order (multi-host; host side).

  Each process rolls out and prepares its own rows; this all-gathers their untrimmed batches
  (equal shapes on every process: the rollout's static width, the static image budgets), puts
  the rows in the order of their global ids and re-packs every row's images behind each other,
  so the result equals the batch one process with all the rows would have made. With one
  process it is ``batch`` with its rows ordered by ``row_ids``.

  Args:
    batch: ``prepare_batch``'s batch before trimming: ``[R, T]`` token fields, ``[R]`` fields,
      ``pixel_values [patch_budget, D]``, ``image_grid_thw [image_slots, 3]``, ``images_per_row [R]``.
    row_ids: ``[R]`` int, this process's rows' indices in the global batch.
    patch_budget, image_slots: the global batch's image budgets.

  Returns:
    The same fields for the ``processes * R`` rows of the global batch.
  """
  from imagent_jax import parallel
  from imagent_jax.processing import images as images_lib
  parts = parallel.allgather({**{k: np.asarray(v) for k, v in batch.items()}, "row_ids": np.asarray(row_ids)})
  order = np.argsort(parts.pop("row_ids").reshape(-1), kind="stable")
  pv, grid, per_row = parts.pop("pixel_values"), parts.pop("image_grid_thw"), parts["images_per_row"]
  patches, grids = [], []
  for p in range(pv.shape[0]):
    starts, ends, patch_ends = _image_bounds(grid[p].astype(np.int64), per_row[p].astype(np.int64))
    for first, end in zip(starts, ends):
      patches.append(pv[p][patch_ends[first]:patch_ends[end]])
      grids.append(grid[p][first:end])
  out = {k: v.reshape((-1,) + v.shape[2:])[order] for k, v in parts.items()}
  out["pixel_values"], out["image_grid_thw"] = images_lib.pack_patches(
      [patches[i] for i in order], [grids[i] for i in order], patch_budget=patch_budget, image_slots=image_slots,
      patch_dim=pv.shape[-1], what="the global batch's images")
  return out


# --------------------------------------------------------------------------- batch -> minibatches


def _image_bounds(grid: np.ndarray, per_row: np.ndarray):
  """``(first image [R], end image [R], patch offsets [N + 1])`` of rows whose images lie row by row
  in ``grid [N, 3]`` (``per_row [R]`` of them each; the unused all-zero slots after them)."""
  if np.any(per_row < 0):
    raise ValueError(f"images_per_row must give a count >= 0 for each of the {len(per_row)} rows, "
                     f"got {per_row.tolist()}")
  patches = grid.prod(-1)
  ends = np.cumsum(per_row)
  count = int(ends[-1]) if len(ends) else 0
  if count > len(grid) or np.any(patches[:count] <= 0) or np.any(patches[count:] > 0):
    raise ValueError(f"images_per_row counts {count} images but image_grid_thw holds {int(np.sum(patches > 0))} (in "
                     f"{len(grid)} slots, the used ones first): the images must be the rows' images, contiguously, "
                     "in row order")
  return ends - per_row, ends, np.concatenate([[0], np.cumsum(patches[:count])])


def row_image_spans(tokens, attention_mask, image_grid_thw, images_per_row, *, image_token_id: int,
                    merge_unit: int) -> list[tuple[int, int, int, int]]:
  """Which images (and patches) each row owns, from ``images_per_row``, checked against the tokens.

  Images are laid out row by row (``agent.trajectory.training_images``): row ``r`` owns the next
  ``images_per_row[r]`` images of ``image_grid_thw``. Their merged features must add up to the
  row's image placeholder count.

  Args:
    tokens: ``[R, T]`` int (numpy).
    attention_mask: ``[R, T]``.
    image_grid_thw: ``[N, 3]``; all-zero rows are unused slots (at the end).
    images_per_row: ``[R]`` int, the images of each row, in row order.
    image_token_id: the placeholder id.
    merge_unit: patches per merged feature (``vision.merge_unit``).

  Returns:
    ``[(first_image, end_image, first_patch, end_patch)]``, one per row.

  Raises:
    ValueError: ``images_per_row`` does not match the grids, or a row's placeholders do not
      match its images.
  """
  tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask).astype(bool)
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  patches = grid.prod(-1)
  per_row = np.asarray(images_per_row, np.int64).reshape(-1)
  if len(per_row) != len(tokens):
    raise ValueError(f"images_per_row must give a count >= 0 for each of the {len(tokens)} rows, "
                     f"got {per_row.tolist()}")
  starts, ends, patch_ends = _image_bounds(grid, per_row)
  need = ((tokens == image_token_id) & attention_mask).sum(1)
  spans = []
  for r, n_feat in enumerate(need):
    got = int(np.sum(patches[starts[r]:ends[r]] // merge_unit))
    if got != n_feat:
      raise ValueError(f"row {r} has {n_feat} image placeholder tokens but its {per_row[r]} image(s) give {got} "
                       "merged features: pixel_values/image_grid_thw/images_per_row must hold each row's images "
                       "contiguously, in row order")
    spans.append((int(starts[r]), int(ends[r]), int(patch_ends[starts[r]]), int(patch_ends[ends[r]])))
  return spans


def trim_image_budget(batch: Batch, bucket: int, slot_patches: int) -> dict[str, np.ndarray]:
  """Host-side: cuts ``image_grid_thw`` to the images the batch has and ``pixel_values`` to match.

  The static budgets hold the worst case (every row with its most images); the vision tower runs
  one slot per ``image_grid_thw`` row, used or not, so a batch with half its slots empty pays for
  twice the images it has. The slots kept are the used ones rounded up to a multiple of
  ``bucket`` (a run compiles a few sizes, not one per step), the patches ``slots * slot_patches``
  (no more than before): enough for any images that fill those slots. Values do not change: the
  images stay where they were and only all-padding rows go.

  Args:
    batch: ``pixel_values [P, D]``, ``image_grid_thw [N, 3]`` (used slots first) and any other fields.
    bucket: slot granularity; 0 returns the batch as it is.
    slot_patches: the most patches one image can have (a multiple of the merge unit).

  Returns:
    the batch with ``image_grid_thw [N', 3]`` and ``pixel_values [P', D]``, ``N' <= N``, ``P' <= P``.
  """
  if bucket <= 0:
    return dict(batch)
  grid, pv = np.asarray(batch["image_grid_thw"]), np.asarray(batch["pixel_values"])
  used = int(np.sum(grid.prod(-1) > 0))
  slots = min(len(grid), max(bucket, -(-used // bucket) * bucket))
  patches = min(len(pv), slots * slot_patches)
  if int(grid[:used].prod(-1).sum()) > patches:
    raise ValueError(f"the batch's {used} images have {int(grid[:used].prod(-1).sum())} patches, more than "
                     f"{slots} slots of {slot_patches} patches")
  return {**batch, "image_grid_thw": grid[:slots], "pixel_values": pv[:patches]}


def trim_padding_columns(batch: Batch, multiple: int = 256) -> dict[str, np.ndarray]:
  """Host-side: drops the leading and trailing columns that are padding in every row.

  A rollout batch is laid out at its static budget (left-padded prompt, right-padded response);
  most of it is padding early in training. Keeping only the used span, rounded up to a multiple
  of ``multiple`` (so a run compiles a few widths, not one per step), cuts the training pass's
  attention cost. Log-probs and M-RoPE positions do not change: positions come from the
  attention mask, and only all-padding columns go.

  Args:
    batch: ``train_step`` fields (and any other per-token ``[R, T]`` arrays, such as an action
      mask); every 2-D field except ``pixel_values`` / ``image_grid_thw`` is cut the same way,
      per-row fields (``advantages``, ``images_per_row``) stay as they are.
    multiple: width granularity; 0 keeps the batch as it is.

  Returns:
    the batch with ``[R, T']`` fields, ``T' <= T``.
  """
  host = {k: (None if v is None else np.asarray(v)) for k, v in batch.items()}
  width_all = host["tokens"].shape[1]
  used = host["attention_mask"].astype(bool).any(axis=0)
  if multiple <= 0 or not used.any():
    return host
  first = int(np.argmax(used))
  last = width_all - 1 - int(np.argmax(used[::-1]))
  width = min(width_all, -(-(last - first + 1) // multiple) * multiple)
  start = min(first, width_all - width)
  cut = lambda v: v[:, start:start + width]
  per_token = lambda k, v: v is not None and k not in ("pixel_values", "image_grid_thw") and v.ndim == 2
  return {k: (cut(v) if per_token(k, v) else v) for k, v in host.items()}


def split_minibatches(batch: Batch, num_minibatches: int, *, image_token_id: int, merge_unit: int, perm=None,
                      patch_budget: int | None = None, image_slots: int | None = None) -> list[dict[str, np.ndarray]]:
  """Host-side: splits a rollout batch into minibatches of whole rows, each with its own images.

  Args:
    batch: the ``train_step`` fields for all ``R`` rows (numpy or jax) and ``images_per_row [R]``,
      images laid out row by row (``pixel_values`` absent or None for a text-only batch).
    num_minibatches: must divide ``R``.
    image_token_id: the model's image placeholder id (the consistency check).
    merge_unit: patches per merged image feature.
    perm: ``[R]`` row order (a shuffle); minibatch ``k`` takes ``perm[k*R/M:(k+1)*R/M]``.
    patch_budget: static ``pixel_values`` length of every minibatch (default: the batch's own
      ``pixel_values`` length, which always fits). Pass about ``P / num_minibatches`` plus slack
      to save vision compute.
    image_slots: static ``image_grid_thw`` length (default: the batch's).

  Returns:
    ``num_minibatches`` dicts of numpy arrays: the ``train_step`` fields of the batch, the
    images those rows own re-laid out from slot 0 (``images_per_row`` is used up here).

  Raises:
    ValueError: rows do not divide, the images and their placeholders disagree, or a
      minibatch's images do not fit the budgets.
  """
  host = {k: np.asarray(v) for k, v in batch.items() if v is not None}
  per_row = host.pop("images_per_row", None)
  rows = host["tokens"].shape[0]
  if num_minibatches < 1 or rows % num_minibatches:
    raise ValueError(f"{rows} rows do not split into {num_minibatches} minibatches")
  perm = np.arange(rows) if perm is None else np.asarray(perm)
  if sorted(perm.tolist()) != list(range(rows)):
    raise ValueError(f"perm must be a permutation of the {rows} rows")
  size = rows // num_minibatches
  chunks = [perm[k * size:(k + 1) * size] for k in range(num_minibatches)]
  if "pixel_values" not in host:  # a text-only batch
    if np.any((host["tokens"] == image_token_id) & host["attention_mask"].astype(bool)):
      raise ValueError("the batch has image placeholder tokens but no pixel_values")
    return [{key: v[idx] for key, v in host.items()} for idx in chunks]
  if per_row is None:
    raise ValueError("a batch with pixel_values needs images_per_row (which images are whose; "
                     "agent.trajectory.training_images returns it)")
  pv, grid = host["pixel_values"], host["image_grid_thw"].reshape(-1, 3)
  patch_budget = pv.shape[0] if patch_budget is None else int(patch_budget)
  image_slots = grid.shape[0] if image_slots is None else int(image_slots)
  if patch_budget % merge_unit:
    raise ValueError(f"patch_budget={patch_budget} must be a multiple of merge_unit={merge_unit}")
  spans = row_image_spans(host["tokens"], host["attention_mask"], grid, per_row, image_token_id=image_token_id,
                          merge_unit=merge_unit)
  out = []
  for k, idx in enumerate(chunks):
    mb = {key: v[idx] for key, v in host.items() if key not in ("pixel_values", "image_grid_thw")}
    mb_pv = [pv[spans[r][2]:spans[r][3]] for r in idx]
    used = sum(len(p) for p in mb_pv)
    mb_grid = np.concatenate([grid[:0]] + [grid[spans[r][0]:spans[r][1]] for r in idx])
    if used > patch_budget or len(mb_grid) > image_slots:
      raise ValueError(f"minibatch {k} needs {used} patches in {len(mb_grid)} images; the budgets are "
                       f"patch_budget={patch_budget}, image_slots={image_slots}")
    mb["pixel_values"] = np.zeros((patch_budget, pv.shape[1]), pv.dtype)  # the padding is never written
    np.concatenate([pv[:0]] + mb_pv, out=mb["pixel_values"][:used])
    mb["image_grid_thw"] = np.concatenate([mb_grid, np.zeros((image_slots - len(mb_grid), 3), grid.dtype)])
    out.append(mb)
  return out


def stack_micro_batches(pieces: Sequence[Batch], *, image_bucket: int = 0, slot_patches: int = 0) -> dict[str, np.ndarray]:
  """Host-side: micro-batches of one minibatch (``split_minibatches``' pieces) stacked on a new
  leading axis, the layout ``grpo.train_step`` takes with ``grad_accum > 1``.

  Each piece's images are first cut to the slots it uses (``trim_image_budget`` with
  ``image_bucket`` and ``slot_patches``; ``image_bucket=0`` keeps the pieces' budgets), then every
  piece is padded with empty slots and zero patches to the largest piece's budgets, so they stack.

  Args:
    pieces: ``k`` dicts of the same fields: per-row ``[r, ...]`` arrays of equal shapes, and
      optionally ``pixel_values [P_i, D]`` and ``image_grid_thw [N_i, 3]`` (used slots first).
    image_bucket, slot_patches: as ``trim_image_budget``.

  Returns:
    dict of ``[k, ...]`` numpy arrays: ``pixel_values [k, P, D]`` and ``image_grid_thw [k, N, 3]``
    with ``P``, ``N`` the largest piece's budgets after the cut.
  """
  pieces = [{key: np.asarray(v) for key, v in p.items() if v is not None} for p in pieces]
  if "pixel_values" in pieces[0] and image_bucket > 0:
    pieces = [trim_image_budget(p, image_bucket, slot_patches) for p in pieces]  # views: nothing copied yet
  out = {}
  for key in pieces[0]:  # one copy per field: each piece into its slice, zero-padded to the largest
    first = pieces[0][key]
    out[key] = np.zeros((len(pieces), max(len(p[key]) for p in pieces)) + first.shape[1:], first.dtype)
    for i, p in enumerate(pieces):
      out[key][i, :len(p[key])] = p[key]
  return out
