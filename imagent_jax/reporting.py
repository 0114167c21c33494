"""What a run leaves in its workdir: ``metrics.jsonl`` (one JSON object per logged step) and
``report.md`` (sections of Markdown with PNG plots beside it)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Sequence


class MetricsWriter:
  """Appends one JSON object per call to ``<workdir>/metrics.jsonl``: the one writer of that file."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, step: int, stage: str, **metrics: Any) -> None:
    """Appends ``{"step", "stage", "time", **metrics}`` as one line.

    NumPy and 0-d array values become Python numbers; a non-finite float (NaN, as in a share of
    zero calls) becomes ``null``, so every line is strict JSON.
    """
    record = {"step": int(step), "stage": stage, "time": round(time.time(), 3)}
    record.update({k: _json_value(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _json_value(v: Any) -> Any:
  v = _plain(v)
  return None if isinstance(v, float) and not math.isfinite(v) else v


def _plain(v: Any) -> Any:
  try:
    import numpy as np
    if isinstance(v, np.generic) or (hasattr(v, "shape") and v.shape == ()):
      return v.item()
  except ImportError:  # pragma: no cover
    pass
  return v


def _cell(x: Any) -> str:
  """A table cell: floats (Python, NumPy or 0-d arrays) to 4 significant digits, the rest as ``str``."""
  x = _plain(x)
  return f"{x:.4g}" if isinstance(x, float) else str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-flavoured Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """The same table aligned for a terminal."""
  cells = [list(map(str, header))] + [[_cell(x) for x in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
  out.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(out)


class Report:
  """Collects Markdown sections and writes ``<workdir>/report.md``."""

  def __init__(self, workdir: str, title: str):
    self.workdir = workdir
    self.sections: list[str] = [f"# {title}\n"]

  def add(self, heading: str, body: str) -> None:
    self.sections.append(f"## {heading}\n\n{body.strip()}\n")

  def write(self) -> str:
    """Writes ``report.md``, merged with the one already there: a section of the same heading is
    replaced in place, the others are kept (a stage run on its own in a finished run's workdir,
    e.g. ``eval`` or ``analyze``, adds its section to the run's report instead of wiping it)."""
    path = os.path.join(self.workdir, "report.md")
    new = dict(_split_sections(self.sections[1:]))
    out = [self.sections[0]]
    if os.path.isfile(path):
      with open(path) as f:
        old = _split_sections(re.split(r"(?m)^(?=## )", f.read())[1:])
      for heading, text in old:
        out.append(new.pop(heading, text))
    out += list(new.values())
    with open(path, "w") as f:
      f.write("\n".join(s if s.endswith("\n") else s + "\n" for s in out))
    return path


def _split_sections(sections: Sequence[str]) -> list[tuple[str, str]]:
  """``[(heading, section text)]`` of Markdown sections that each start with ``## heading``."""
  return [(s.split("\n", 1)[0][3:].strip(), s) for s in sections]
