"""The ``rl`` stage: GRPO from the warmup base (or a checkpoint), with curves in the report."""

from __future__ import annotations

import json
import os
import time

from imagent_jax import components
from imagent_jax.analysis import plots
from imagent_jax.reporting import MetricsWriter, Report, markdown_table

_TABLE_KEYS = ("reward", "accuracy", "format", "tool_calls_per_trajectory", "image_calls_per_trajectory",
               "failed_calls_per_trajectory", "confirm_on_target", "confirm_on_target_chance", "confirm_on_image",
               "confirm_on_image_chance", "mask/kept_fraction", "mask/zero_variance_groups",
               "logprob_gap_max", "train/pg_loss", "train/clip_fraction", "train/grad_norm", "train/entropy",
               "response_tokens", "time/rollout_s", "time/update_s", "sampled_tokens_per_s")


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  from imagent_jax.rl.trainer import Trainer  # local: keeps `python -m imagent_jax.main --help` fast

  t0 = time.perf_counter()
  trainer = Trainer(config, workdir)
  test = (components.eval_examples(config, workdir, "test", config.rl.test_examples)
          if config.rl.test_examples > 0 else [])
  if test and trainer.step == 0:  # the base, before any update (a resumed run logged it already)
    trainer.log(trainer.evaluate(test, prefix="test"), stage="test")
  last = trainer.train()
  if test:
    trainer.log(trainer.evaluate(test, prefix="test"), stage="test")
  seconds = time.perf_counter() - t0
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["stage"] == "rl"]
  evals = [r for r in records if r["stage"] == "eval"]
  tests = [r for r in records if r["stage"] == "test"]
  curves = plots.plot_training_curves(train, evals, os.path.join(workdir, "rl_curves.png"))
  rows = [(k, _fmt(train[-1].get(k)) if train else "-") for k in _TABLE_KEYS]
  if evals:
    rows += [(f"eval/{k} (step {e['step']})", _fmt(e.get(f"eval/{k}"))) for e in (evals[0], evals[-1])
             for k in ("accuracy", "tool_calls_per_trajectory", "confirm_on_target")]
  if len(tests) >= 2:
    rows += [(f"test/{k} ({name}, {len(test)} questions)", _fmt(e.get(f"test/{k}")))
             for name, e in (("base", tests[0]), ("after RL", tests[-1]))
             for k in ("accuracy", "tool_calls_per_trajectory", "confirm_on_target", "confirm_on_target_chance",
                       "confirm_on_image", "confirm_on_image_chance")]
  print("\n" + "\n".join(f"  {k}: {v}" for k, v in rows))
  report.add("RL (GRPO)", f"{trainer.step} steps in {seconds:.0f}s (this run).\n\n"
             + markdown_table(["metric (last step)", "value"], rows) + f"\n\n![training curves]({os.path.basename(curves)})")
  return {"steps": trainer.step, "seconds": seconds, **{k: v for k, v in last.items() if isinstance(v, float)}}


def _fmt(v):
  return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else v
