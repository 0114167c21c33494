"""Benchmark readers: each benchmark's local copy, read exactly as it is published.

    from imagent_jax.evaluation import benchmarks
    examples = benchmarks.load("hrbench_4k", "/data/HR-Bench")        # options shuffled, seed 0
    examples = benchmarks.load("vstar", "/data/vstar_bench", option_order="as_published")

``load(name, path, *, split=None, option_order="shuffled", seed=0) -> list[Example]``; ``name`` one
of ``NAMES``, ``path`` the dataset's folder as a user downloads it (nothing is downloaded here).
Each reader's module docstring cites the files and the official evaluation it follows.

Why shuffle by default: some benchmarks list the correct option first in every record (V*'s
annotation files do), so an evaluator that keeps that order lets a model that always answers "A"
score 100%. ``"shuffled"`` permutes each question's options by a seeded permutation of its own
(``base.shuffle_options``: the same for a question whatever else is loaded) and moves the answer
letter with them; ``"as_published"`` keeps the file's order.

Readers register in ``BENCHMARKS`` as ``"module:ATTRIBUTE"`` of a ``base.Benchmark`` and are
imported only when loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Optional

from imagent_jax.evaluation.benchmarks.base import (OPTION_ORDERS, Benchmark, BenchmarkError, Example, ImageRef,
                                                    rotations, shuffle_options)
from imagent_jax.registry import Registry

BENCHMARKS: Registry[str] = Registry("benchmark")  # name -> "module:ATTRIBUTE" of its base.Benchmark
BENCHMARKS.add("vstar", "imagent_jax.evaluation.benchmarks.vstar:VSTAR")
BENCHMARKS.add("hrbench_4k", "imagent_jax.evaluation.benchmarks.hrbench:HRBENCH_4K")
BENCHMARKS.add("hrbench_8k", "imagent_jax.evaluation.benchmarks.hrbench:HRBENCH_8K")
BENCHMARKS.add("mme_realworld", "imagent_jax.evaluation.benchmarks.mme_realworld:MME_REALWORLD")
BENCHMARKS.add("mme_realworld_lite", "imagent_jax.evaluation.benchmarks.mme_realworld:MME_REALWORLD_LITE")
BENCHMARKS.add("muirbench", "imagent_jax.evaluation.benchmarks.muirbench:MUIRBENCH")
BENCHMARKS.add("blink", "imagent_jax.evaluation.benchmarks.blink:BLINK")
BENCHMARKS.add("mmiu", "imagent_jax.evaluation.benchmarks.mmiu:MMIU")
BENCHMARKS.add("jsonl", "imagent_jax.evaluation.benchmarks.jsonl:JSONL")
NAMES = BENCHMARKS.names()


def get(name: str) -> Benchmark:
  """The ``base.Benchmark`` registered as ``name`` (``ValueError`` naming the choices if unknown)."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(NAMES)}")
  module, attribute = BENCHMARKS[name].split(":")
  return getattr(importlib.import_module(module), attribute)


def load(name: str, path: str, *, split: Optional[str] = None, option_order: str = "shuffled",
         seed: int = 0) -> list[Example]:
  """The examples of benchmark ``name`` from its local folder.

  Args:
    name: one of ``NAMES``.
    path: the dataset's folder (or file) as published; ``~`` is expanded.
    split: one of the benchmark's ``splits`` (None: its default, the first).
    option_order: ``"shuffled"`` (a seeded permutation per question, the answer letter moved with
      the options) or ``"as_published"``.
    seed: the shuffle's seed.

  Returns:
    The examples in the published order (``Example``: id, images, question, options, answer letter,
    category, ...).

  Raises:
    ValueError: an unknown name, split or option order.
    FileNotFoundError: ``path`` or a file the benchmark needs is missing.
    BenchmarkError: a malformed file or record (naming the file and the record).
  """
  if option_order not in OPTION_ORDERS:
    raise ValueError(f"option_order must be one of {OPTION_ORDERS}, got {option_order!r}")
  benchmark = get(name)
  if split is not None and split not in benchmark.splits:
    raise ValueError(f"benchmark {name!r} has splits {benchmark.splits}, not {split!r}")
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{name}: {path} does not exist (the benchmark's folder as published)")
  examples = [dataclasses.replace(e, benchmark=name) if e.benchmark != name else e
              for e in benchmark.read(path, split or benchmark.splits[0])]
  if option_order == "shuffled":
    examples = [shuffle_options(e, seed) for e in examples]
  return examples


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "Example", "ImageRef", "NAMES", "get", "load", "rotations",
           "shuffle_options"]
