"""Judge-free scoring of a response against a benchmark question: rules anyone can re-run.

``score(example, response_text) -> bool`` reads the response's answer and compares it with the
gold answer by ``agent.answers.match_answer`` (the one matching rule of rewards, probes and
evaluation). Where the answer is, in order:

1. the last complete ``<answer>...</answer>`` block (the protocol's answers);
2. else (``fallback="text"``, the default) the text outside ``<think>`` / ``<tool_call>`` /
   ``<tool_response>`` blocks, as a whole ("B", "(B)", "B. a cat", "The answer is b", the
   option's text);
3. else, for multiple choice, the last explicit statement of a letter in that text: "the answer
   is (B)", "Answer: B", "the correct option is B", "**B**" at the end of a line.

A prediction naming several options ("A or B") is wrong. ``score`` never raises: any string (and
anything that is not one) gets True or False.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from imagent_jax.agent import answers

# "the answer is (B)", "Answer: B", "final answer: **b**", "the correct option is B." (the last one counts)
# A lower-case letter counts only before punctuation or the end ("the answer is a red bird" names no letter).
_STATED_RE = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:|=)?\s*[*_`\"'(\[]*\s*(?:([A-Z])|([a-z])(?=[)\]*_`\"'.,;:!?]|$))"
                        r"\s*[)\]]?[*_`\"']*\s*(?=$|[.,;:!?\s])")
_FALLBACKS = ("text", "none", "boxed")


def field(example: Any, name: str, default: Any = None) -> Any:
  """``example``'s field ``name``: an attribute of a ``benchmarks.Example`` or a key of an example dict."""
  if isinstance(example, Mapping):
    return example.get(name, default)
  return getattr(example, name, default)


def response_answer(example: Any, response_text: Any, fallback: str = "text") -> Optional[str]:
  """The answer ``score`` reads from a response (None when it finds none).

  Args:
    example: a ``benchmarks.Example`` or an example dict (``options``).
    response_text: the response (every assistant turn joined, tool responses included or not).
    fallback: ``"text"`` (the rules of the module docstring), ``"none"`` (answer blocks only, as
      the training rewards read them) or ``"boxed"`` (the last ``\\boxed{...}``).
  """
  if not isinstance(response_text, str):
    return None
  if fallback not in _FALLBACKS:
    raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
  found = answers.extract_answer(response_text, fallback)
  options = list(field(example, "options") or [])
  if found is None or fallback != "text" or not options:
    return found
  if answers.parse_choice(found, options) is not None:
    return found
  stated = _STATED_RE.findall(found)
  letters = [(upper or lower).upper() for upper, lower in stated]
  letters = [k for k in letters if k in answers.LETTERS[:len(options)]]
  return letters[-1] if letters else found


def score(example: Any, response_text: Any, *, fallback: str = "text") -> bool:
  """Whether ``response_text`` answers ``example`` correctly (rule-based, no judge; never raises).

  Args:
    example: a ``benchmarks.Example`` (or an example dict): ``options`` (texts, in the order the model saw them) and
      ``answer`` (the correct letter of those options, or the gold text of an open question;
      ``meta["answers"]`` may list more acceptable golds of an open question).
    response_text: the model's response.
    fallback: where the answer is read without an ``<answer>`` block (``response_answer``).

  Returns:
    True when the response's answer names the correct option (as a letter or by its text), or
    matches the open question's gold answer.
  """
  try:
    predicted = response_answer(example, response_text, fallback)
    golds = list((field(example, "meta") or {}).get("answers", ())) or [field(example, "answer")]
    return bool(answers.match_answer(predicted, golds, list(field(example, "options") or []) or None))
  except Exception:  # noqa: BLE001 - a score is a bool whatever the text is
    return False
