"""Published numbers to put beside ours, with where they come from and how they were measured.

Percent accuracy, by benchmark name (``benchmarks.NAMES``) and score key (``"overall"`` or a
category). Each entry says its source; protocols differ between papers (prompts, greedy or Avg@k,
option order, judge or rules), so these are context for a reproduction, not targets of one.
"""

from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
  model: str
  score: float
  key: str  # the score it compares with: "overall" or a category
  source: str  # paper and table, and what is known of its protocol


_IMAGENT = "IMAgent paper (arXiv 2512.08980), as extracted by a third party; protocol not restated there"
_MINI_O3 = "Mini-o3 paper (\"Scaling Up Reasoning Patterns and Interaction Turns for Visual Search\"), main table; its own prompts and sampling"

PUBLISHED: dict[str, tuple[Published, ...]] = {
    "vstar": (Published("IMAgent-7B", 88.48, "overall", _IMAGENT),
              Published("Qwen2.5-VL-7B", 75.5, "overall", _MINI_O3),
              Published("Mini-o3-7B", 88.2, "overall", _MINI_O3)),
    "hrbench_4k": (Published("IMAgent-7B", 73.5, "overall", _IMAGENT),
                   Published("Qwen2.5-VL-7B", 68.2, "overall", _MINI_O3),
                   Published("Mini-o3-7B", 77.5, "overall", _MINI_O3)),
    "hrbench_8k": (Published("Qwen2.5-VL-7B", 62.7, "overall", _MINI_O3),
                   Published("Mini-o3-7B", 73.3, "overall", _MINI_O3)),
    # Which MME-RealWorld set (full or Lite) these use is not stated in what we have: both are shown.
    "mme_realworld": (Published("IMAgent-7B", 64.83, "overall", _IMAGENT + "; full set or Lite unknown"),
                      Published("Qwen2.5-VL-7B", 57.3, "overall", _MINI_O3 + "; 'MME-RW'"),
                      Published("Mini-o3-7B", 65.5, "overall", _MINI_O3 + "; 'MME-RW'")),
    "mme_realworld_lite": (Published("IMAgent-7B", 64.83, "overall", _IMAGENT + "; full set or Lite unknown"),),
    "jsonl": (Published("IMAgent-7B (MIFG-QA, Nature)", 50.24, "nature", _IMAGENT + "; MIFG-QA is not released"),),
}


def published(name: str) -> tuple[Published, ...]:
  """The published numbers of benchmark ``name`` (empty when we have none)."""
  return PUBLISHED.get(name, ())
