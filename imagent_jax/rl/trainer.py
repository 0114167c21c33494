"""The RL trainer: rollout → rewards → masks → advantages → GRPO updates, with checkpoints and logs.

Each step draws a batch of questions, runs ``group_size`` agent rollouts per question (one jitted
program, tools on the host), turns them into the update's batch with ``batch.prepare_batch``
(rewards, the token and trajectory masks and zero-variance groups, group advantages over the same
rows as the zero-variance test, every image the trajectories saw re-rendered), and takes the GRPO
minibatch steps against the rollout's sampling log-probs.

The trainer is handed its pieces built — model and parameters, rollouts, configs, data, checkpoint
manager, metrics writer — so a test or a notebook can hand it others; ``stages.rl.build_trainer``
builds them from a run config. Everything a run needs to continue lives in the checkpoints
(orbax): parameters, optimiser state, step, RNG and the data iterator's state, so a restarted run
sees the same data in the same order as an uninterrupted one. Checkpoints are written every
``checkpoint_every`` steps, at the end, and on SIGTERM. Every step appends to ``metrics.jsonl``
(``reporting.MetricsWriter``) and TensorBoard.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from imagent_jax import compile_clock, parallel
from imagent_jax.agent.rollout import Rollout
from imagent_jax.evaluation import evaluator
from imagent_jax.evaluation.metrics import trajectory_stats
from imagent_jax.reporting import MetricsWriter
from imagent_jax.rl import batch as batch_lib
from imagent_jax.rl import grpo, masks, optim, rewards
from imagent_jax.stages import build

log = logging.getLogger("imagent_jax")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
  """How the trainer's loop runs (``config.rl``'s loop settings and ``config.seed``).

  Attributes:
    steps: the step ``train`` stops at.
    seed: the run's RNG: step ``s`` rolls out with ``fold_in(fold_in(key(seed), s), 0)`` and
      shuffles minibatches with ``fold_in(..., 1)``.
    eval_batch_size: questions per evaluation rollout.
    eval_every: steps between greedy evaluations (0: never, no base evaluation either).
    checkpoint_every: steps between checkpoints (0: only at the end and on SIGTERM).
    logprob_gap_every: steps between logging ``logprob_gap_max``, the check that the training
      forward pass gives the rollout's sampling log-probs (measured by every update's first
      minibatch step at no extra cost; 0: never logged).
    minibatch_patch_budget, minibatch_image_slots: static image budgets of a minibatch (None:
      the batch's; see ``batch.split_minibatches``).
    progress_bar: show a tqdm bar.
    prefetch: read and preprocess the next batch in a thread while this one trains.
  """
  steps: int
  seed: int
  eval_batch_size: int
  eval_every: int = 0
  checkpoint_every: int = 0
  logprob_gap_every: int = 0
  minibatch_patch_budget: int | None = None
  minibatch_image_slots: int | None = None
  progress_bar: bool = True
  prefetch: bool = True


class Trainer:
  """Owns the run's state and loop: ``Trainer(...).train()`` (``stages.rl.build_trainer(config, workdir)``).

  Args:
    model: the family's module (training forward pass).
    params: the starting parameters, placed on ``mesh`` (a checkpoint in ``checkpoints``
      replaces them).
    rollout: the training ``agent.rollout.Rollout`` (its ``cfg.group_size`` rollouts per question).
    eval_rollout: the evaluation ``Rollout`` (one greedy trajectory per question).
    prompt: ``prompt(example) -> messages``, the opening conversation of a question.
    grpo_cfg: ``grpo.GRPOConfig``.
    reward_cfg: ``rewards.RewardConfig``.
    mask_cfg: ``masks.MaskConfig``.
    batch_cfg: ``batch.BatchConfig`` (image budgets and width bucket of the training batch).
    loop: ``LoopConfig``.
    mesh: the device mesh of params and optimiser state.
    train_stream: a checkpointable iterator of lists of examples (``next``, ``get_state``,
      ``set_state``; ``data.pipeline``); None entries are skipped records.
    eval_examples: the held-out questions ``evaluate`` uses by default.
    checkpoints: an orbax ``CheckpointManager`` (``build.checkpoint_manager``).
    metrics: where logged records go (``metrics.jsonl``).
    tensorboard: a TensorBoard ``SummaryWriter``, or None.
  """

  def __init__(self, *, model, params, rollout: Rollout, eval_rollout: Rollout, prompt: Callable[[dict], Any],
               grpo_cfg: grpo.GRPOConfig, reward_cfg: rewards.RewardConfig, mask_cfg: masks.MaskConfig,
               batch_cfg: batch_lib.BatchConfig, loop: LoopConfig, mesh, train_stream,
               eval_examples: Sequence[dict], checkpoints, metrics: MetricsWriter, tensorboard=None):
    self.model, self.rollout, self.eval_rollout, self.prompt = model, rollout, eval_rollout, prompt
    self.grpo_cfg, self.reward_cfg, self.mask_cfg, self.batch_cfg = grpo_cfg, reward_cfg, mask_cfg, batch_cfg
    self.loop, self.mesh = loop, mesh
    self.process, self.processes = jax.process_index(), jax.process_count()
    self.train_stream, self.eval_examples = train_stream, list(eval_examples)
    self.checkpoints, self.metrics, self.tb = checkpoints, metrics, tensorboard
    self.step_fn = grpo.sharded_train_step(model, grpo_cfg, mesh)
    self.params = params
    init = jax.jit(optim.make_optimizer(grpo_cfg).init, out_shardings=self.step_fn.opt_state_shardings)
    self.opt_state = init(params)
    # The update donates params: the frozen reference needs its own copy.
    self.ref_params = jax.tree_util.tree_map(jnp.copy, params) if grpo_cfg.kl_coef > 0 else None
    self.step = 0
    self._pool = self._next = None  # the prefetch thread and its pending batch
    self._data_state = train_stream.get_state()  # after the last batch consumed
    self.rng = jax.random.key(loop.seed)
    self._stop = False
    self._saved_step = -1
    self._restore()

  # ------------------------------------------------------------------------------ checkpoints

  def _state(self) -> dict:
    return {"params": self.params, "opt_state": self.opt_state,
            "rng": np.asarray(jax.random.key_data(self.rng))}

  def _meta(self) -> dict:
    # Every process reads its own shard of the data: the JSON (written once) keeps all their states.
    states = parallel.allgather_json(self._data_state)
    return {"step": self.step, "data": states[0], "data_by_process": states}

  def save(self) -> None:
    """Writes a checkpoint of the current step (params, optimiser, RNG, data state), once."""
    if self._saved_step == self.step:
      return
    build.save_checkpoint(self.checkpoints, self.step, self._state(), self._meta())
    self._saved_step = self.step

  def _restore(self) -> None:
    restored = build.restore_checkpoint(self.checkpoints, self._state())
    if restored is None:
      return
    state, meta = restored
    self.params, self.opt_state = state["params"], state["opt_state"]
    self.rng = jax.random.wrap_key_data(np.asarray(state["rng"]))  # uncommitted: usable with any mesh
    self.step = int(meta["step"])
    states = meta.get("data_by_process", [meta["data"]])
    if len(states) != self.processes:
      raise ValueError(f"the checkpoint in {self.checkpoints.directory} was written by {len(states)} process(es); "
                       f"this run has {self.processes}: resume with the same number of processes")
    self.train_stream.set_state(states[self.process])
    self._data_state, self._next = states[self.process], None
    self._saved_step = self.step
    if parallel.is_primary():
      print(f"Resumed from {self.checkpoints.directory} at step {self.step}")

  @property
  def stopped(self) -> bool:
    """True once SIGTERM has stopped ``train`` before its last step (a checkpoint was saved)."""
    return self._stop

  def _on_sigterm(self, signum, frame):  # noqa: ARG002
    log.warning("SIGTERM: saving a checkpoint after this step and stopping")
    self._stop = True

  # ------------------------------------------------------------------------------------ steps

  def train_step(self) -> dict[str, float]:
    """One RL step; returns its metrics."""
    loop = self.loop
    times = {}
    compiling = compile_clock.seconds()
    t_step = t0 = time.perf_counter()
    examples, prompts, inputs = self._take_batch()
    times["data_wait_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step_rng = jax.random.fold_in(self.rng, self.step)
    row_ids = self._row_ids(len(examples))
    out, trajs = self.rollout(self._local_params(), prompts, [e["images"] for e in examples],
                              jax.random.fold_in(step_rng, 0), row_ids=row_ids, inputs=inputs)
    times["rollout_s"] = time.perf_counter() - t0
    rollout_host = self.rollout.last_host_s
    if self.loop.prefetch and self.step + 1 < self.loop.steps:
      self._prefetch()  # the next batch's examples, prompts and images, while this one trains

    t0 = time.perf_counter()
    combine = None
    if self.processes > 1:
      combine = lambda b: batch_lib.gather_rows(b, row_ids, patch_budget=self.batch_cfg.patch_budget,
                                                image_slots=self.batch_cfg.image_slots)
    prep = batch_lib.prepare_batch(out, trajs, examples, reward_cfg=self.reward_cfg, mask_cfg=self.mask_cfg,
                                   grpo_cfg=self.grpo_cfg, batch_cfg=self.batch_cfg, combine=combine)
    times["batch_s"] = time.perf_counter() - t0  # rewards, masks, advantages, training images: host only
    rew, batch = prep.rewards, prep.batch

    # The KL reference's log-probs and the log-prob check are taken inside the update's own
    # program (grpo.train_step with ref_params): no second program per batch shape.
    t0 = time.perf_counter()
    self.params, self.opt_state, upd = grpo.update(self.model, self.grpo_cfg, self.params, self.opt_state, batch,
                                                   jax.random.fold_in(step_rng, 1), step_fn=self.step_fn,
                                                   patch_budget=loop.minibatch_patch_budget,
                                                   image_slots=loop.minibatch_image_slots, ref_params=self.ref_params,
                                                   image_bucket=self.batch_cfg.image_bucket,
                                                   slot_patches=self.batch_cfg.image_patches)
    times["update_s"] = time.perf_counter() - t0
    metrics: dict[str, float] = {}
    gap = upd.pop("logprob_gap_max", None)  # the update's first step, before it changed anything
    if gap is not None and loop.logprob_gap_every and self.step % loop.logprob_gap_every == 0:  # steps 1, 1 + every, ...
      metrics["logprob_gap_max"] = float(gap)
    self.step += 1

    sampled = int(out["action_mask"].sum())
    local = {"reward": float(rew["total"].mean()), "accuracy": float(rew["accuracy"].mean()),
             "format": float(rew["format"].mean())}
    for part in ("tool_gain", "tool_helpful", "used_tool"):
      if part in rew:
        local[f"reward/{part}"] = float(rew[part].mean())
    local.update(trajectory_stats(trajs, examples, self.rollout.tool_config.enabled()))
    local.update({k: float(np.asarray(v)) for k, v in prep.mask_metrics.items()})
    local["response_tokens"] = sampled / len(trajs)
    local["sequence_tokens"] = float(out["attention_mask"].sum()) / len(trajs)
    metrics.update(_mean_over_processes(local))
    metrics.update({f"train/{k}": float(v) for k, v in upd.items()})
    metrics["learning_rate"] = float(optim.learning_rate(self.grpo_cfg, self.step))
    metrics.update({f"time/{k}": v for k, v in times.items()})
    metrics["sampled_tokens_per_s"] = sampled / max(times["rollout_s"], 1e-9)  # this process's rows
    # The share of the step the device sat idle waiting for host work: data not ready, the
    # prompts' preprocessing and the records of the rollout, rewards/masks/training images.
    step_s = time.perf_counter() - t_step
    metrics["time/host_wait_fraction"] = (times["data_wait_s"] + rollout_host + times["batch_s"]) / max(step_s, 1e-9)
    metrics["time/step_s"] = step_s
    metrics["time/compile_s"] = compile_clock.seconds() - compiling  # new batch shapes: programs made this step
    metrics["rollout_inserts"] = int(out["inserts"])  # groups of rollout.insert_rows rows; see also insert_wait
    if upd.get("skipped", 0):
      log.warning("step %d: %d update(s) skipped: non-finite loss or gradient", self.step, int(upd["skipped"]))
    return metrics

  def evaluate(self, examples: Sequence[dict] | None = None, prefix: str = "eval") -> dict[str, float]:
    """Greedy single rollouts on held-out examples (default: the validation ones), scored by the
    one evaluator (``evaluation.evaluator.answer_batch``, answers read as the rewards read them):
    accuracy and tool use, as ``{f"{prefix}/accuracy": ..., f"{prefix}/tool_calls_per_trajectory": ...}``."""
    examples = self.eval_examples if examples is None else list(examples)
    if not examples:
      return {}
    accs, trajs_all, ex_all = [], [], []
    bs = max(1, self.loop.eval_batch_size // self.processes)
    params = self._local_params()
    mine = examples[self.process::self.processes]  # each process answers its share, on its own devices
    for i in range(0, len(mine), bs):
      chunk = mine[i:i + bs]
      records, trajs = evaluator.answer_batch(self.eval_rollout, params, self.prompt, chunk,
                                              fallback=self.reward_cfg.fallback)
      accs += [float(r["correct"]) for r in records]
      for t in trajs:
        t.prompt_index += len(ex_all)
      trajs_all += trajs
      ex_all += chunk
    stats = trajectory_stats(trajs_all, ex_all, self.eval_rollout.tool_config.enabled()) if trajs_all else {}
    parts = parallel.allgather_json({"accuracy": accs, "stats": stats})
    out = {f"{prefix}/accuracy": float(np.mean([a for p in parts for a in p["accuracy"]]))}
    out.update({f"{prefix}/{k}": v for k, v in _mean_over_processes(
        stats, [p["stats"] for p in parts], [len(p["accuracy"]) for p in parts]).items()})
    return out

  # ------------------------------------------------------------------------------ data

  def _read_batch(self):
    """The next batch: ``(examples, prompts, rollout inputs, data state after it)``."""
    examples = [e for e in next(self.train_stream) if e is not None]  # JSONL 'skip' drops bad records
    state = self.train_stream.get_state()
    prompts = [self.prompt(e) for e in examples]
    return examples, prompts, self.rollout.prepare(prompts, [e["images"] for e in examples]), state

  def _prefetch(self) -> None:
    """Starts reading and preprocessing the next batch in a thread (XLA releases the GIL while
    the device trains). Only that thread touches the data iterator until ``_take_batch``."""
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
    self._next = self._pool.submit(self._read_batch)

  def _take_batch(self):
    """The prefetched batch, or one read now; records the data state the checkpoint keeps."""
    fetched, self._next = self._next, None
    examples, prompts, inputs, self._data_state = fetched.result() if fetched is not None else self._read_batch()
    return examples, prompts, inputs

  # ------------------------------------------------------------------------------ processes

  def _local_params(self):
    """The parameters the rollouts read: on this process's devices (``parallel.local_params``)."""
    return parallel.local_params(self.params, self.model.config, self.mesh)

  def _row_ids(self, questions: int) -> np.ndarray:
    """Global batch indices ``[questions * G]`` of this process's rows: its ``j``-th question is
    question ``process + j * processes`` of the global batch (``data.pipeline``'s sharding)."""
    g = self.rollout.cfg.group_size
    q = self.process + self.processes * np.arange(questions)
    return (q[:, None] * g + np.arange(g)[None, :]).reshape(-1).astype(np.int32)

  def log(self, metrics: dict[str, float], stage: str = "rl") -> None:
    """Appends ``metrics`` as one record of ``stage`` at the current step (``metrics.jsonl``, TensorBoard)."""
    if not parallel.is_primary():
      return
    self.metrics.write(self.step, stage, **metrics)
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and np.isfinite(v):
          self.tb.add_scalar(f"{stage}/{k}", v, self.step)
      self.tb.flush()

  def train(self, until_step: int | None = None) -> dict[str, float]:
    """Trains to ``loop.steps`` (or ``until_step``); returns the last step's metrics.

    With ``eval_every``, a run that starts at step 0 first evaluates the base policy (logged as
    stage ``eval`` at step 0). SIGTERM stops it after the current step with a checkpoint.
    """
    r = self.loop
    end = r.steps if until_step is None else min(until_step, r.steps)
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    last: dict[str, float] = {}
    try:
      if self.step == 0 and r.eval_every > 0:
        base = self.evaluate()
        self.log(base, stage="eval")
        if parallel.is_primary():
          print(f"step 0 (base): eval accuracy {base.get('eval/accuracy', float('nan')):.3f}, tool calls/traj "
              f"{base.get('eval/tool_calls_per_trajectory', float('nan')):.2f}")
      bar = tqdm(total=end, initial=self.step, desc="rl", disable=not (r.progress_bar and parallel.is_primary()))
      while self.step < end and not self._stop:
        last = self.train_step()
        self.log(last)
        bar.update(1)
        bar.set_postfix(reward=f"{last['reward']:.2f}", acc=f"{last['accuracy']:.2f}",
                        tools=f"{last['tool_calls_per_trajectory']:.2f}", **compile_clock.postfix(last["time/compile_s"]))
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
      build.wait_for_checkpoints(self.checkpoints)
    return last


def _mean_over_processes(local: dict[str, float], parts: Sequence[dict] | None = None,
                         weights: Sequence[int] | None = None) -> dict[str, float]:
  """Per-process metrics combined into the run's: each key's mean over the processes that have it
  (weighted by ``weights``, default equal: every process has as many rows). Shares of
  per-trajectory counts are exact; ratios of counts (``confirm_on_target``) are means of the
  processes' ratios. With one process, ``local``."""
  parts = parallel.allgather_json(local) if parts is None else parts
  if len(parts) == 1:
    return dict(parts[0])
  weights = [1] * len(parts) if weights is None else weights
  out = {}
  for k in sorted({k for p in parts for k in p}):
    vals = [(p[k], w) for p, w in zip(parts, weights) if isinstance(p.get(k), (int, float)) and np.isfinite(p[k]) and w]
    out[k] = float(sum(v * w for v, w in vals) / sum(w for _, w in vals)) if vals else float("nan")
  return out
