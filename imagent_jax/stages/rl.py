"""The ``rl`` stage: GRPO from the warmup base (or a checkpoint), with curves in the report.

``build_trainer`` builds an ``rl.trainer.Trainer``'s pieces from a run config (with the
``stages.build`` functions every stage uses); ``run`` trains and reports.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Sequence

import jax

from imagent_jax import host_memory, parallel
from imagent_jax.agent.rollout import Rollout
from imagent_jax.analysis import plots
from imagent_jax.reporting import MetricsWriter, Report, markdown_table, text_table
from imagent_jax.rl import batch as batch_lib
from imagent_jax.rl import trainer as trainer_lib
from imagent_jax.stages import build

_TEST_KEYS = ("accuracy", "tool_calls_per_trajectory", "image_calls_per_trajectory", "malformed_calls_per_trajectory",
              "confirm_on_target", "confirm_on_target_chance", "confirm_on_image", "confirm_on_image_chance")
_EVAL_KEYS = ("accuracy", "tool_calls_per_trajectory", "image_calls_per_trajectory")  # 16 questions: the rest is noise
_TABLE_KEYS = ("reward", "accuracy", "format", "tool_calls_per_trajectory", "image_calls_per_trajectory",
               "failed_calls_per_trajectory", "malformed_calls_per_trajectory", "confirm_on_target",
               "confirm_on_target_chance", "confirm_on_image", "confirm_on_image_chance", "mask/kept_fraction",
               "mask/zero_variance_groups", "logprob_gap_max", "train/pg_loss", "train/kl", "train/clip_fraction",
               "train/grad_norm", "response_tokens", "time/rollout_s", "time/update_s", "sampled_tokens_per_s")
_MEAN_OF = 10  # the training table averages the last steps: one batch of 16 trajectories is noisy


def batch_config(config, image_settings) -> batch_lib.BatchConfig:
  """``rl.batch.BatchConfig`` of a run: ``config.rl``'s image budgets and length bucket, tool views
  of ``config.tools.view_max_pixels``, inputs at ``config.processor``'s pixel limits.

  Args:
    config: the run config.
    image_settings: the processor's ``image_settings`` (patch geometry, normalisation).
  """
  settings = dict(image_settings, min_pixels=config.processor.min_pixels, max_pixels=config.processor.max_pixels)
  return batch_lib.BatchConfig(patch_budget=config.rl.patch_budget, image_slots=config.rl.image_slots,
                               image_settings=settings, view_max_pixels=config.tools.view_max_pixels,
                               length_bucket=config.rl.length_bucket, image_bucket=config.rl.image_bucket)


def loop_config(config) -> trainer_lib.LoopConfig:
  """``rl.trainer.LoopConfig`` from ``config.rl`` and ``config.seed``."""
  r = config.rl
  return trainer_lib.LoopConfig(steps=r.steps, seed=config.seed, eval_batch_size=r.batch_size,
                                eval_every=r.eval_every, checkpoint_every=r.checkpoint_every,
                                logprob_gap_every=r.logprob_gap_every,
                                minibatch_patch_budget=r.minibatch_patch_budget or None,
                                minibatch_image_slots=r.minibatch_image_slots or None, progress_bar=r.progress_bar,
                                prefetch=r.prefetch)


def build_trainer(config, workdir: str, *, metrics: MetricsWriter | None = None, train_stream=None,
                  eval_examples: Sequence[dict] | None = None) -> trainer_lib.Trainer:
  """An ``rl.trainer.Trainer`` of ``config`` in ``workdir``, resumed from its checkpoints if any.

  Model and processor (``build.load_model_and_processor``) on the mesh of ``config.mesh``, the
  training and evaluation rollouts, the reward / mask / GRPO configs, the train stream and the
  validation examples, the checkpoint manager of ``<workdir>/checkpoints``, ``metrics.jsonl``
  and TensorBoard.

  Args:
    config: the run config.
    workdir: the run's folder.
    metrics: the run's metrics writer (default: a new one for ``<workdir>/metrics.jsonl``).
    train_stream: replaces the config's train data (``build.example_stream``).
    eval_examples: replace the config's validation examples (``build.eval_examples``).
  """
  mesh = parallel.make_mesh(dict(config.mesh))
  model_config, params, processor, _ = build.load_model_and_processor(config, workdir, mesh)
  model = build.build_model(config, model_config, remat=config.rl.remat)
  tool_cfg = build.tool_config(config, model_config)
  prompt = build.question_prompt(config)
  return trainer_lib.Trainer(
      model=model, params=params,
      rollout=Rollout(model, processor, build.rollout_config(config, model_config), tool_cfg),
      eval_rollout=Rollout(model, processor, build.eval_rollout_config(config, model_config), tool_cfg),
      prompt=prompt, grpo_cfg=build.grpo_config(config), reward_cfg=build.reward_config(config),
      mask_cfg=build.mask_config(config), batch_cfg=batch_config(config, processor.image_settings),
      loop=loop_config(config), mesh=mesh,
      train_stream=train_stream or build.example_stream(config, workdir, "train",
                                                        config.rl.batch_size // jax.process_count()),
      eval_examples=build.eval_examples(config, workdir) if eval_examples is None else eval_examples,
      checkpoints=build.checkpoint_manager(config, workdir), metrics=metrics or MetricsWriter(workdir),
      tensorboard=build.tensorboard_writer(workdir))


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  """Trains (or resumes) to ``config.rl.steps``, tests the base and the result on the test split,
  and adds the tables and curves to the report; returns the summary (``steps``, ``seconds``,
  ``stopped``, the last step's float metrics)."""
  t0 = time.perf_counter()
  trainer = build_trainer(config, workdir, metrics=metrics)
  n_test = 0
  if config.rl.test_examples > 0 and trainer.step == 0:  # the base, before any update (a resumed run logged it)
    n_test = _test(trainer, config, workdir)
    host_memory.trim()
  last = trainer.train()
  if trainer.stopped:  # preempted: exit quickly; the same command resumes from the checkpoint
    print(f"Stopped by SIGTERM after step {trainer.step} (checkpoint saved); run the same command again to "
          f"resume. The test of the result is left for the finished run.")
  elif config.rl.test_examples > 0:
    n_test = _test(trainer, config, workdir)
  seconds = time.perf_counter() - t0
  if not parallel.is_primary():  # process 0 writes the metrics and the report
    return {"steps": trainer.step, "seconds": seconds, "stopped": trainer.stopped}
  records = [json.loads(l) for l in open(metrics.path)]
  train = [r for r in records if r["stage"] == "rl"]
  evals = [r for r in records if r["stage"] == "eval"]
  tests = [r for r in records if r["stage"] == "test"]
  curves = plots.plot_training_curves(train, evals, os.path.join(workdir, "rl_curves.png"))
  body = f"{trainer.step} steps in {seconds:.0f}s (this run)."
  if trainer.stopped:
    body += f" **Stopped by SIGTERM before step {config.rl.steps}**: run again to resume."
  if len(tests) >= 2:
    rows = [(k, _fmt(tests[0].get(f"test/{k}")), _fmt(tests[-1].get(f"test/{k}"))) for k in _TEST_KEYS]
    head = [f"test split, greedy ({n_test} questions)", f"base (step {tests[0]['step']})",
            f"after RL (step {tests[-1]['step']})"]
    print("\n" + text_table(head, rows))
    body += "\n\n" + markdown_table(head, rows)
  if evals:
    rows = [(k, _fmt(evals[0].get(f"eval/{k}")), _fmt(evals[-1].get(f"eval/{k}"))) for k in _EVAL_KEYS]
    body += "\n\n" + markdown_table(["validation, greedy", f"step {evals[0]['step']}", f"step {evals[-1]['step']}"],
                                      rows)
  tail = train[-_MEAN_OF:]
  rows = [(k, _fmt(_nanmean([r.get(k) for r in tail]))) for k in _TABLE_KEYS if any(k in r for r in tail)]
  if rows:
    head = [f"training batches (sampled), mean of steps {tail[0]['step']}-{tail[-1]['step']}", "value"]
    print(f"\n{head[0]}:\n" + "\n".join(f"  {k}: {v}" for k, v in rows))
    body += "\n\n" + markdown_table(head, rows)
  report.add("RL (GRPO)", body + f"\n\n![training curves]({os.path.basename(curves)})")
  return {"steps": trainer.step, "seconds": seconds, "stopped": trainer.stopped,
          **{k: v for k, v in last.items() if isinstance(v, float)}}


def _test(trainer: trainer_lib.Trainer, config, workdir: str) -> int:
  """Greedy test of the trainer's policy on the first ``config.rl.test_examples`` of the test split,
  logged as stage "test"; returns how many questions it had. The examples are read here and let go
  after: their decoded images (0.38 GB for the default's 64 questions) would otherwise stay
  resident through every RL step."""
  examples = build.eval_examples(config, workdir, "test", config.rl.test_examples)
  trainer.log(trainer.evaluate(examples, prefix="test"), stage="test")
  return len(examples)


def _nanmean(values):
  vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
  return sum(vals) / len(vals) if vals else None


def _fmt(v):
  return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else v
