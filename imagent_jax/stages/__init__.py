"""The stages of a run, in the order a config usually names them (``config.stages``), and their registry.

Each stage is a module with ``run(config, workdir, report, metrics) -> dict`` (its summary);
``STAGES`` maps a stage's config name to that module, imported only when the stage runs (so
``python -m imagent_jax.main --help`` and config validation stay fast). Adding a stage is one
module and one ``STAGES.add`` line here.
"""

from __future__ import annotations

import importlib
from typing import Callable

from imagent_jax.registry import Registry

STAGES: Registry[str] = Registry("stage")  # config name -> module path
STAGES.add("model", "imagent_jax.stages.model_check")  # load or init the model, check it, export it
STAGES.add("warmup", "imagent_jax.stages.warmup")  # train the tool-naive base from scratch
STAGES.add("rollout", "imagent_jax.stages.rollout_demo")  # a readable agent rollout with tool calls
STAGES.add("rl", "imagent_jax.stages.rl")  # GRPO
STAGES.add("eval", "imagent_jax.stages.eval")  # benchmarks, judge-free and resumable
STAGES.add("analyze", "imagent_jax.stages.analyze")  # attention shares of generated tokens (Figure 1)


def configured(stages: str) -> list[str]:
  """The stage names of a comma-separated ``config.stages``, in order (blanks dropped)."""
  return [s.strip() for s in str(stages).split(",") if s.strip()]


def run_function(name: str) -> Callable:
  """The ``run`` function of stage ``name``; ``KeyError`` naming the registered stages when unknown."""
  return importlib.import_module(STAGES[name]).run
