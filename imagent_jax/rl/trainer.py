"""The RL trainer: rollout → rewards → masks → advantages → GRPO updates, with checkpoints and logs.

Each step draws a batch of questions, runs ``group_size`` agent rollouts per question (one jitted
program, tools on the host), scores them (``agent.rewards``), masks them (``agent.masks``: token
and trajectory layers, zero-variance groups), computes group advantages over the same rows as the
zero-variance test, re-renders every image the trajectories saw, and takes the GRPO minibatch
steps against the rollout's sampling log-probs.

Everything a run needs to continue lives in ``<workdir>/checkpoints`` (orbax): parameters,
optimiser state, step, RNG and the data iterator's state, so a restarted run sees the same data
in the same order as an uninterrupted one. Checkpoints are written every ``checkpoint_every``
steps, at the end, and on SIGTERM. Every step appends to ``metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from imagent_jax import parallel
from imagent_jax.stages import build
from imagent_jax.agent import protocol
from imagent_jax.rl import masks, rewards
from imagent_jax.agent import rollout as rl
from imagent_jax.agent import trajectory
from imagent_jax.rl import grpo, logprobs

log = logging.getLogger("imagent_jax")


class ExampleStream:
  """A checkpointable stream of examples: ``make_example(index) -> dict``, drawn in order.

  The state is the next index, so restoring it replays exactly the batches an uninterrupted run
  would have drawn. Same interface as ``data.pipeline.ExampleIterator`` (``next``, ``get_state``,
  ``set_state``), which the trainer uses by default; this one is for tests and custom data.
  """

  def __init__(self, make_example: Callable[[int], dict], batch_size: int, start: int = 0):
    self.make_example, self.batch_size, self.index = make_example, batch_size, start

  def __iter__(self):
    return self

  def __next__(self) -> list[dict]:
    batch = [self.make_example(self.index + i) for i in range(self.batch_size)]
    self.index += self.batch_size
    return batch

  def get_state(self) -> dict:
    return {"next_index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["next_index"])


class ConfirmHits(NamedTuple):
  """Where one trajectory's successful ``confirm`` calls went (sums over those calls)."""
  hits: int  # on the target image and covering half of the target box or more
  total: int  # successful confirm calls
  chance: float  # expected hits of same-size boxes placed uniformly on a uniformly chosen input image
  on_image: int  # on the asked (target) image, wherever on it
  on_image_chance: float  # expected on_image of a uniformly chosen input image: total / number of images


def confirm_hits(traj: rl.Trajectory, example: dict, samples: int = 256) -> ConfirmHits:
  """Where ``traj``'s successful ``confirm`` zooms went, against two chance baselines.

  A zoom hits when its box, mapped back to the root input image, is on the example's
  ``target_image`` and overlaps its ``target_box`` by at least half of the target's area.
  ``chance`` is the expected number of hits had each call put a box of the same size uniformly at
  random on a uniformly chosen input image (Monte Carlo over ``samples`` placements, fixed seed),
  the baseline ``confirm_on_target`` must beat to show that the model aims its zooms.
  ``on_image`` counts zooms on the asked image, against ``on_image_chance`` (one over the number
  of input images per call): where the detail's place is fixed, this is the part of aiming that
  is left, which image to zoom on.
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


def trajectory_stats(trajs: Sequence[rl.Trajectory], examples: Sequence[dict], tool_names: Sequence[str],
                     group_size: int) -> dict[str, float]:
  """Tool-use numbers of a batch of trajectories for logging (per trajectory means)."""
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


def score_trajectories(trajs: Sequence[rl.Trajectory], examples: Sequence[dict], group_size: int,
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


def training_batch(config, out: dict, trajs: Sequence[rl.Trajectory], loss_mask, advantages,
                   image_settings=None) -> tuple[dict, np.ndarray]:
  """The GRPO update's batch from one rollout.

  Re-renders every image the trajectories saw (``trajectory.training_images``, from each view's
  provenance, into ``config.rl.patch_budget`` / ``image_slots``) and keeps only the token columns
  some row uses (rounded up to ``config.rl.length_bucket``).

  Args:
    config: the run config (``rl``, ``processor``, ``tools`` sections).
    out: the rollout's arrays (``tokens``, ``attention_mask``, ``action_mask``, ``logprobs``: ``[R, T]``).
    trajs: its ``[R]`` trajectories.
    loss_mask: ``[R, T]`` (``masks.loss_mask``).
    advantages: ``[R]`` (``grpo.compute_advantages``).
    image_settings: the processor's ``image_settings`` (geometry; default: the processor's
      defaults with ``config.processor``'s pixel limits).

  Returns:
    ``(batch, sampled)``: ``batch`` with ``tokens``, ``attention_mask``, ``loss_mask``, ``old_logp``
    ``[R, T']``, ``advantages [R]``, ``pixel_values``, ``image_grid_thw`` (what ``grpo.update`` takes;
    add ``ref_logp`` for a KL term), and ``sampled [R, T']`` bool, the tokens the policy sampled.
  """
  c = config
  settings = dict(image_settings or {}, min_pixels=c.processor.min_pixels, max_pixels=c.processor.max_pixels)
  pv, grid, _ = trajectory.training_images(trajs, patch_budget=c.rl.patch_budget, image_slots=c.rl.image_slots,
                                           image_settings=settings, view_max_pixels=c.tools.view_max_pixels)
  batch = dict(tokens=out["tokens"], attention_mask=out["attention_mask"], loss_mask=np.asarray(loss_mask),
               advantages=np.asarray(advantages), old_logp=out["logprobs"], pixel_values=pv, image_grid_thw=grid,
               action_mask=out["action_mask"])
  batch = grpo.trim_padding_columns(batch, c.rl.length_bucket)  # the used span only: less attention
  return batch, batch.pop("action_mask").astype(bool)


class Trainer:
  """Owns the run's state and loop. ``Trainer(config, workdir).train()``."""

  def __init__(self, config, workdir: str, *, train_stream=None, eval_examples: Sequence[dict] | None = None,
               make_prompt: Callable[[dict], Any] | None = None):
    self.config, self.workdir = config, workdir
    r = config.rl
    self.mesh = parallel.make_mesh(dict(config.mesh))
    self.model_config, params, self.processor, _ = build.load_model_and_processor(config, workdir, self.mesh)
    self.model = build.build_model(config, self.model_config, remat=r.remat)
    self.rollout_cfg = build.rollout_config(config, self.model_config)
    self.tool_cfg = build.tool_config(config, self.model_config)
    self.rollout = rl.Rollout(self.model, self.processor, self.rollout_cfg, self.tool_cfg)
    self.reward_cfg = build.reward_config(config)
    self.mask_cfg = build.mask_config(config)
    self.grpo_cfg = build.grpo_config(config)
    self.optimizer = grpo.make_optimizer(self.grpo_cfg)
    self.step_fn = grpo.sharded_train_step(self.model, self.grpo_cfg, self.mesh)
    self.schemas = build.listed_tool_schemas(config)
    self.train_stream = train_stream or build.example_stream(config, workdir, "train", r.batch_size)
    self.eval_examples = (list(eval_examples) if eval_examples is not None
                          else build.eval_examples(config, workdir))
    self.params = params
    self.opt_state = jax.jit(self.optimizer.init, out_shardings=self.step_fn.opt_state_shardings)(params)
    # The update donates params: the frozen reference needs its own copy.
    self.ref_params = jax.tree_util.tree_map(jnp.copy, params) if self.grpo_cfg.kl_coef > 0 else None
    self.step = 0
    self.rng = jax.random.key(config.seed)
    self.ckpt = build.checkpoint_manager(config, workdir)
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.tb = build.tensorboard_writer(workdir)
    self._stop = False
    self._saved_step = -1
    self._restore()

  # ------------------------------------------------------------------------------ checkpoints

  def _state(self) -> dict:
    return {"params": self.params, "opt_state": self.opt_state,
            "rng": jax.random.key_data(self.rng)}

  def _meta(self) -> dict:
    return {"step": self.step, "data": self.train_stream.get_state()}

  def save(self) -> None:
    """Writes a checkpoint of the current step (params, optimiser, RNG, data state), once."""
    if self._saved_step == self.step:
      return
    build.save_checkpoint(self.ckpt, self.step, self._state(), self._meta())
    self._saved_step = self.step

  def _restore(self) -> None:
    restored = build.restore_checkpoint(self.ckpt, self._state())
    if restored is None:
      return
    state, meta = restored
    self.params, self.opt_state = state["params"], state["opt_state"]
    self.rng = jax.random.wrap_key_data(np.asarray(state["rng"]))  # uncommitted: usable with any mesh
    self.step = int(meta["step"])
    self.train_stream.set_state(meta["data"])
    self._saved_step = self.step
    print(f"Resumed from {self.ckpt.directory} at step {self.step}")

  @property
  def stopped(self) -> bool:
    """True once SIGTERM has stopped ``train`` before its last step (a checkpoint was saved)."""
    return self._stop

  def _on_sigterm(self, signum, frame):  # noqa: ARG002
    log.warning("SIGTERM: saving a checkpoint after this step and stopping")
    self._stop = True

  # ------------------------------------------------------------------------------------ steps

  def prompts(self, examples: Sequence[dict]):
    style = self.config.tools.prompt_style
    return [protocol.build_prompt_messages(e["question"], len(e["images"]), e.get("options"), tools=self.schemas,
                                           system_style=style) for e in examples]

  def score(self, trajs, examples, group_size: int) -> dict[str, np.ndarray]:
    return score_trajectories(trajs, examples, group_size, self.reward_cfg)

  def train_step(self) -> dict[str, float]:
    """One RL step; returns its metrics."""
    c, g = self.config, self.rollout_cfg.group_size
    times = {}
    t0 = time.perf_counter()
    examples = [e for e in next(self.train_stream) if e is not None]  # JSONL 'skip' drops bad records
    step_rng = jax.random.fold_in(self.rng, self.step)
    out, trajs = self.rollout(self.params, self.prompts(examples), [e["images"] for e in examples],
                              jax.random.fold_in(step_rng, 0))
    times["rollout_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rew = self.score(trajs, examples, g)
    malformed = np.array([t.num_malformed_calls for t in trajs], np.int32)
    loss_mask, mask_metrics = masks.loss_mask(out["action_mask"], out["attention_mask"], out["status"], malformed,
                                              rew["total"], self.mask_cfg)
    stats_rows = masks.group_stats_mask(out["status"], malformed, self.mask_cfg)
    advantages = grpo.compute_advantages(self.grpo_cfg, rew["total"], stats_rows)
    batch, act = training_batch(c, out, trajs, loss_mask, advantages, self.processor.image_settings)
    pv, grid = batch["pixel_values"], batch["image_grid_thw"]
    metrics: dict[str, float] = {}
    if c.rl.logprob_gap_every and self.step % c.rl.logprob_gap_every == 0:  # steps 1, 1 + every, ...
      fwd = np.asarray(logprobs.sequence_logprobs(self.model, self.params, batch["tokens"], batch["attention_mask"],
                                                  pv, grid, temperature=self.rollout_cfg.temperature))
      metrics["logprob_gap_max"] = float(np.abs(fwd[act] - batch["old_logp"][act]).max()) if act.any() else 0.0
    if self.ref_params is not None:
      batch["ref_logp"] = np.asarray(logprobs.sequence_logprobs(self.model, self.ref_params, batch["tokens"],
                                                                batch["attention_mask"], pv, grid,
                                                                temperature=self.rollout_cfg.temperature))
    times["prepare_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    self.params, self.opt_state, upd = grpo.update(self.model, self.grpo_cfg, self.params, self.opt_state, batch,
                                                   jax.random.fold_in(step_rng, 1), step_fn=self.step_fn,
                                                   patch_budget=c.rl.minibatch_patch_budget or None,
                                                   image_slots=c.rl.minibatch_image_slots or None)
    times["update_s"] = time.perf_counter() - t0
    self.step += 1

    sampled = int(out["action_mask"].sum())
    metrics.update({"reward": float(rew["total"].mean()), "accuracy": float(rew["accuracy"].mean()),
                    "format": float(rew["format"].mean())})
    for part in ("tool_gain", "tool_helpful", "used_tool"):
      if part in rew:
        metrics[f"reward/{part}"] = float(rew[part].mean())
    metrics.update(trajectory_stats(trajs, examples, self.tool_cfg.enabled(), g))
    metrics.update({k: float(np.asarray(v)) for k, v in mask_metrics.items()})
    metrics.update({f"train/{k}": float(v) for k, v in upd.items()})
    metrics["response_tokens"] = sampled / len(trajs)
    metrics["sequence_tokens"] = float(out["attention_mask"].sum()) / len(trajs)
    metrics["learning_rate"] = float(grpo.learning_rate(self.grpo_cfg, self.step))
    metrics.update({f"time/{k}": v for k, v in times.items()})
    metrics["sampled_tokens_per_s"] = sampled / max(times["rollout_s"], 1e-9)
    metrics["rollout_inserts"] = int(out["inserts"])  # see rollout.insert_wait
    if upd.get("skipped", 0):
      log.warning("step %d: %d update(s) skipped: non-finite loss or gradient", self.step, int(upd["skipped"]))
    return metrics

  def evaluate(self, examples: Sequence[dict] | None = None, prefix: str = "eval") -> dict[str, float]:
    """Greedy single rollouts on held-out examples (default: the validation ones): accuracy and
    tool use, as ``{f"{prefix}/accuracy": ..., f"{prefix}/tool_calls_per_trajectory": ..., ...}``."""
    examples = self.eval_examples if examples is None else list(examples)
    if not examples:
      return {}
    cfg = build.eval_rollout_config(self.config, self.model_config)
    ro = rl.Rollout(self.model, self.processor, cfg, self.tool_cfg)
    accs, trajs_all, ex_all = [], [], []
    bs = self.config.rl.batch_size
    for i in range(0, len(examples), bs):
      chunk = examples[i:i + bs]
      _, trajs = ro(self.params, self.prompts(chunk), [e["images"] for e in chunk], jax.random.key(0))
      rew = self.score(trajs, chunk, 1)
      accs += rew["accuracy"].tolist()
      for t in trajs:
        t.prompt_index += len(ex_all)
      trajs_all += trajs
      ex_all += chunk
    out = {f"{prefix}/accuracy": float(np.mean(accs))}
    out.update({f"{prefix}/{k}": v for k, v in trajectory_stats(trajs_all, ex_all, self.tool_cfg.enabled(), 1).items()})
    return out

  def log(self, metrics: dict[str, float], stage: str = "rl") -> None:
    record = {"step": self.step, "stage": stage, "time": round(time.time(), 3)}
    record.update({k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()})
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
          self.tb.add_scalar(f"{stage}/{k}", v, self.step)
      self.tb.flush()

  def train(self, until_step: int | None = None) -> dict[str, float]:
    """Trains to ``config.rl.steps`` (or ``until_step``); returns the last step's metrics."""
    r = self.config.rl
    end = r.steps if until_step is None else min(until_step, r.steps)
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    last: dict[str, float] = {}
    try:
      if self.step == 0 and r.eval_every > 0:
        base = self.evaluate()
        self.log(base, stage="eval")
        print(f"step 0 (base): eval accuracy {base.get('eval/accuracy', float('nan')):.3f}, tool calls/traj "
              f"{base.get('eval/tool_calls_per_trajectory', float('nan')):.2f}")
      bar = tqdm(total=end, initial=self.step, desc="rl", disable=not r.progress_bar)
      while self.step < end and not self._stop:
        last = self.train_step()
        self.log(last)
        bar.update(1)
        bar.set_postfix(reward=f"{last['reward']:.2f}", acc=f"{last['accuracy']:.2f}",
                        tools=f"{last['tool_calls_per_trajectory']:.2f}")
        if r.eval_every > 0 and self.step % r.eval_every == 0:
          ev = self.evaluate()
          self.log(ev, stage="eval")
          last.update(ev)
        if r.checkpoint_every > 0 and self.step % r.checkpoint_every == 0:
          self.save()
      bar.close()
      if self.step > 0 and (self._stop or self.step >= end):
        self.save()
    finally:
      signal.signal(signal.SIGTERM, previous)
      build.wait_for_checkpoints(self.ckpt)
    return last
