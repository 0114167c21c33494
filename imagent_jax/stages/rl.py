"""The ``rl`` stage: GRPO from the warmup base (or a checkpoint), with curves in the report."""

from __future__ import annotations

import json
import math
import os
import time

from imagent_jax.stages import build
from imagent_jax.analysis import plots
from imagent_jax.reporting import MetricsWriter, Report, markdown_table, text_table

_TEST_KEYS = ("accuracy", "tool_calls_per_trajectory", "image_calls_per_trajectory", "malformed_calls_per_trajectory",
              "confirm_on_target", "confirm_on_target_chance", "confirm_on_image", "confirm_on_image_chance")
_EVAL_KEYS = ("accuracy", "tool_calls_per_trajectory", "image_calls_per_trajectory")  # 16 questions: the rest is noise
_TABLE_KEYS = ("reward", "accuracy", "format", "tool_calls_per_trajectory", "image_calls_per_trajectory",
               "failed_calls_per_trajectory", "malformed_calls_per_trajectory", "confirm_on_target",
               "confirm_on_target_chance", "confirm_on_image", "confirm_on_image_chance", "mask/kept_fraction",
               "mask/zero_variance_groups", "logprob_gap_max", "train/pg_loss", "train/kl", "train/clip_fraction",
               "train/grad_norm", "response_tokens", "time/rollout_s", "time/update_s", "sampled_tokens_per_s")
_MEAN_OF = 10  # the training table averages the last steps: one batch of 16 trajectories is noisy


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  from imagent_jax.rl.trainer import Trainer  # local: keeps `python -m imagent_jax.main --help` fast

  t0 = time.perf_counter()
  trainer = Trainer(config, workdir)
  test = (build.eval_examples(config, workdir, "test", config.rl.test_examples)
          if config.rl.test_examples > 0 else [])
  if test and trainer.step == 0:  # the base, before any update (a resumed run logged it already)
    trainer.log(trainer.evaluate(test, prefix="test"), stage="test")
  last = trainer.train()
  if trainer.stopped:  # preempted: exit quickly; the same command resumes from the checkpoint
    print(f"Stopped by SIGTERM after step {trainer.step} (checkpoint saved); run the same command again to "
          f"resume. The test of the result is left for the finished run.")
  elif test:
    trainer.log(trainer.evaluate(test, prefix="test"), stage="test")
  seconds = time.perf_counter() - t0
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["stage"] == "rl"]
  evals = [r for r in records if r["stage"] == "eval"]
  tests = [r for r in records if r["stage"] == "test"]
  curves = plots.plot_training_curves(train, evals, os.path.join(workdir, "rl_curves.png"))
  body = f"{trainer.step} steps in {seconds:.0f}s (this run)."
  if trainer.stopped:
    body += f" **Stopped by SIGTERM before step {config.rl.steps}**: run again to resume."
  if len(tests) >= 2:
    rows = [(k, _fmt(tests[0].get(f"test/{k}")), _fmt(tests[-1].get(f"test/{k}"))) for k in _TEST_KEYS]
    head = [f"test split, greedy ({len(test)} questions)", f"base (step {tests[0]['step']})",
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


def _nanmean(values):
  vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
  return sum(vals) / len(vals) if vals else None


def _fmt(v):
  return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else v
