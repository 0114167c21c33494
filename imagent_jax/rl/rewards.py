"""Rule-based rewards: answer checking, protocol format and the tool-use reward gain (DESIGN §2).

Host-side Python on decoded text; no LLM judge. A reward is one function registered by name
(``@register_reward``); the trainer picks it with ``RewardConfig.name`` and calls
``compute_rewards``, which returns the total and every part as ``[R]`` arrays for logging.

Registered rewards:
  * ``accuracy``          total = acc.
  * ``format``            total = fmt.
  * ``accuracy_format``   total = w_acc·acc + w_fmt·fmt (the "no tool gain" ablation).
  * ``tool_gain``         total = w_acc·acc + w_fmt·fmt + gain·[acc ∧ successful image calls ≥ k]
                          (DeepEyes' conditional tool bonus; defaults 0.8 / 0.2 / 1.2, k = 1).
  * ``tool_gain_helpful`` as ``tool_gain``, but the gain is paid only in groups where the rollouts
                          that used a tool are more accurate on average than those that did not.

Only *successful* image calls count for the gain: calls whose returned view entered the context
(``num_successful_image_calls`` from the rollout). A malformed or failed call earns nothing, which
removes the cheapest way to farm the bonus.

Answer checking (``match_answer``), in order:
  1. Multiple choice, when the gold answer is a choice letter or the text of one of the options:
     the prediction must name exactly that one choice — as a letter in the usual forms ("B",
     "(B)", "B)", "B.", "B: ...", "b", "Answer: (B)", "option B", "the answer is b",
     "B) a cat"), as the option's text ("a cat"), or as the option's number. Anything naming
     several choices ("A or B", "A, B, C, D", "(A) (B)") is wrong.
  2. Numbers, when the gold answer is a number ("1,000", "3.5", "50%", "1/2", or a number word
     from zero to ninety-nine): the prediction must be a number, or text containing exactly one
     number ("There are 3 cats."). A gold written as an integer ("3") must be matched exactly
     (counting questions: 101 is not 100) unless ``integer_exact`` is off; other golds match
     within ``max(rel_tol·|gold|, abs_tol)``.
  3. Otherwise normalised exact match: case, punctuation, the articles a/an/the and whitespace
     are ignored.
A gold answer may also be a list of acceptable answers (any one matches). The prediction is the
text of the *last* ``<answer>`` block of the whole response (``extract_answer``); a response with
several answers still fails ``format``.

Format (``format_ok``): every assistant turn parses as ``format_ok`` under
``protocol.parse_turn`` (the parser the rollout uses), every turn but the last makes one valid
tool call, the last turn holds the one answer, and the rollout counted no malformed call (an
unknown tool name is well formed text but still malformed).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import unicodedata
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from imagent_jax.agent import protocol

# ----------------------------------------------------------------------------------------------
# Answer extraction

_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL | re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_BLOCK_RE = re.compile(r"<(think|tool_call|tool_response)>.*?</\1>", re.DOTALL | re.IGNORECASE)


def _no_fallback(text: str) -> str | None:
  del text
  return None


def _boxed_fallback(text: str) -> str | None:
  found = _BOXED_RE.findall(text)
  return found[-1].strip() if found else None


def _text_fallback(text: str) -> str | None:
  rest = _BLOCK_RE.sub(" ", text)
  rest = re.sub(r"</?answer>", " ", rest, flags=re.IGNORECASE).strip()
  return rest or None


# What ``extract_answer`` returns when the text has no complete <answer>…</answer>:
#   none  — nothing (strict, the default for training: the protocol asks for the tags, and
#           paying for untagged answers would fight the format reward);
#   boxed — the last \boxed{…} (evaluating models prompted in the math style);
#   text  — the whole text outside <think>/<tool_call>/<tool_response> blocks (base models).
ANSWER_FALLBACKS: dict[str, Callable[[str], str | None]] = {
    "none": _no_fallback,
    "boxed": _boxed_fallback,
    "text": _text_fallback,
}


def extract_answer(text: str, fallback: str = "none") -> str | None:
  """The stripped text inside the last ``<answer>…</answer>`` of ``text``.

  Args:
    text: a response (all assistant turns joined, or the last turn).
    fallback: a key of ``ANSWER_FALLBACKS``, used when there is no complete answer block.

  Returns:
    The answer string, or None when there is none.
  """
  found = _ANSWER_RE.findall(text)
  if found:
    return found[-1].strip()
  return ANSWER_FALLBACKS[fallback](text)


# ----------------------------------------------------------------------------------------------
# Normalisation and numbers

_ARTICLES_RE = re.compile(r"\b(?:a|an|the)\b")
_LEAD_IN_RE = re.compile(
    r"^(?:(?:so|thus|therefore|hence)\b[,:]?\s*)?(?:i\s+(?:think|believe)\s+)?(?:the\s+)?"
    r"(?:final\s+|correct\s+|right\s+|best\s+)?(?:answer|option|choice)\b(?:\s+is\b)?\s*[:=]?\s*",
    re.IGNORECASE)

_UNITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
          "nineteen")
_TENS = ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
NUMBER_WORDS: dict[str, int] = {w: i for i, w in enumerate(_UNITS)}
NUMBER_WORDS.update({w: 20 + 10 * i for i, w in enumerate(_TENS)})
NUMBER_WORDS.update({f"{t}{sep}{u}": 20 + 10 * i + j for i, t in enumerate(_TENS)
                     for j, u in enumerate(_UNITS[1:10], 1) for sep in ("-", " ")})

_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|[-+]?\.\d+%?"
_NUMBER_RE = re.compile(rf"^(?:{_NUM})$")
_NUMBER_WORD_RE = "|".join(sorted((re.escape(w) for w in NUMBER_WORDS), key=len, reverse=True))
_NUMBER_TOKEN_RE = re.compile(rf"(?<![\w.,/])(?:{_NUM}|{_NUMBER_WORD_RE})(?![\w/]|[.,]\d)", re.IGNORECASE)


def normalize_text(text: str) -> str:
  """Lower case, punctuation to spaces, articles (a/an/the) dropped, whitespace collapsed."""
  s = unicodedata.normalize("NFKC", text).lower()
  s = re.sub(r"[\W_]+", " ", s)
  s = _ARTICLES_RE.sub(" ", s)
  return " ".join(s.split())


def _clean(text: str) -> str:
  """Strips wrappers models put around an answer: whitespace, markdown, quotes, \\boxed, lead-ins."""
  s = unicodedata.normalize("NFKC", text).strip()
  for _ in range(3):
    prev = s
    s = s.strip(" \t\r\n*`\"'")
    m = re.fullmatch(r"\\(?:boxed|text|mathrm)\{(.*)\}", s, re.DOTALL)
    if m:
      s = m.group(1)
    s = _LEAD_IN_RE.sub("", s, count=1)
    if s == prev:
      break
  return s.strip()


def parse_number(text: str) -> float | None:
  """The value of ``text`` when it is one number ("1,000", "-3.5", "50%", "1/2", "three").

  Percentages are read as their number ("50%" is 50). Returns None otherwise.
  """
  s = unicodedata.normalize("NFKC", text).strip().rstrip(".").strip().lower()
  if s in NUMBER_WORDS:
    return float(NUMBER_WORDS[s])
  if not _NUMBER_RE.match(s):
    return None
  s = s.rstrip("%").replace(",", "")
  if "/" in s:
    num, den = s.split("/")
    value = float(num) / float(den) if float(den) != 0 else math.nan
  else:
    value = float(s)
  return value if math.isfinite(value) else None


def _numbers_in(text: str) -> list[float]:
  out = []
  for m in _NUMBER_TOKEN_RE.finditer(unicodedata.normalize("NFKC", text)):
    value = parse_number(m.group(0))
    if value is not None:
      out.append(value)
  return out


def _is_integer_written(gold: str) -> bool:
  s = gold.strip().rstrip(".").lower()
  return s in NUMBER_WORDS or re.fullmatch(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)", s) is not None


# ----------------------------------------------------------------------------------------------
# Multiple choice

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OPTION_PREFIX_RE = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])[.:)])\s*")
_BARE_LETTER_RE = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
_LETTER_DELIM_RE = re.compile(r"^(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.:),\]]|([A-Z])\s+[-–]\s)\s*(.+)$",
                              re.DOTALL)
_LETTER_SPACE_RE = re.compile(r"^([A-Z])\s+(.+)$", re.DOTALL)


def normalize_options(options: Sequence[str] | Mapping[str, str] | None) -> list[str]:
  """Option contents in letter order (A first), without "A." / "(A)" prefixes.

  Args:
    options: a list of option texts (option k has letter ``LETTERS[k]``), a mapping from letter
      to text, or None.

  Returns:
    The list of option texts (empty when there are no options).
  """
  if not options:
    return []
  if isinstance(options, Mapping):
    items = sorted((str(k).strip().strip("()").upper(), str(v)) for k, v in options.items())
    return [v for _, v in items]
  out = []
  for i, opt in enumerate(options):
    opt = str(opt)
    m = _OPTION_PREFIX_RE.match(opt)
    if m and (m.group(1) or m.group(2)).upper() == LETTERS[i % 26]:
      opt = opt[m.end():]
    out.append(opt.strip())
  return out


def _option_by_text(text: str, options: list[str]) -> int | None:
  """Index of the one option whose content matches ``text`` (normalised, or as a number)."""
  norm = normalize_text(text)
  hits = [i for i, opt in enumerate(options) if norm and normalize_text(opt) == norm]
  if not hits:
    value = parse_number(text)
    if value is not None:
      hits = [i for i, opt in enumerate(options) if parse_number(opt) == value]
  return hits[0] if len(hits) == 1 else None


def _mentions_other_letter(rest: str, letter: int, num_letters: int) -> bool:
  for m in re.finditer(r"\(([A-Za-z])\)|\b([A-Z])\b", rest):
    k = LETTERS.find((m.group(1) or m.group(2)).upper())
    if 0 <= k < num_letters and k != letter:
      return True
  return False


def parse_choice(prediction: str, options: Sequence[str] | Mapping[str, str] | None = None,
                 num_letters: int | None = None) -> int | None:
  """The one choice a prediction names, as an index (0 = A), or None.

  Args:
    prediction: the extracted answer text.
    options: the options (see ``normalize_options``); their texts are matched too.
    num_letters: how many letters are valid (default: the number of options, or 26 without).

  Returns:
    The choice index, or None when the prediction names no choice or several.
  """
  opts = normalize_options(options)
  return _parse_choice(prediction, opts, num_letters or len(opts) or 26)


def _parse_choice(prediction: str, opts: list[str], n: int) -> int | None:
  s = _clean(prediction)
  if not s:
    return None
  by_text = _option_by_text(s, opts)
  if by_text is not None:
    return by_text
  m = _BARE_LETTER_RE.match(s)
  if m:
    k = LETTERS.find(m.group(1).upper())
    return k if k < n else None
  m = _LETTER_DELIM_RE.match(s)
  if m:
    k = LETTERS.find(next(g for g in m.groups()[:4] if g).upper())
    rest = m.group(5).strip()
    if k >= n:
      return None
    if opts and normalize_text(rest) == normalize_text(opts[k]):
      return k
    if opts and _option_by_text(rest, opts) is not None:
      return None  # "B) <text of another option>"
    if _BARE_LETTER_RE.match(rest) or _mentions_other_letter(rest, k, n):
      return None  # "A, B", "(A) or (B)", "B. C."
    return k
  m = _LETTER_SPACE_RE.match(s)  # "B a cat": only when the text is B's
  if m and opts:
    k = LETTERS.find(m.group(1))
    if k < len(opts) and normalize_text(m.group(2)) == normalize_text(opts[k]):
      return k
  return None


def _gold_choice(gold: str, opts: list[str]) -> int | None:
  """The choice a gold answer denotes: a letter in range, or the text of exactly one option."""
  s = gold.strip()
  m = _BARE_LETTER_RE.match(s)
  if m:
    k = LETTERS.find(m.group(1).upper())
    if k < (len(opts) or 26):
      return k
  if not opts:
    return None
  m = _LETTER_DELIM_RE.match(s)
  if m:
    k = LETTERS.find(next(g for g in m.groups()[:4] if g).upper())
    if k < len(opts) and normalize_text(m.group(5)) == normalize_text(opts[k]):
      return k
  return _option_by_text(s, opts)


# ----------------------------------------------------------------------------------------------
# Accuracy


def match_answer(prediction: str | None, answer: str | Sequence[str],
                 options: Sequence[str] | Mapping[str, str] | None = None, *, rel_tol: float = 1e-2,
                 abs_tol: float = 0.0, integer_exact: bool = True) -> bool:
  """Whether an extracted prediction matches the gold answer (rules in the module docstring).

  Args:
    prediction: the extracted answer text (None: no answer, never correct).
    answer: the gold answer, or a list of acceptable gold answers.
    options: multiple-choice options, if any.
    rel_tol: relative tolerance for non-integer numeric golds.
    abs_tol: absolute tolerance for non-integer numeric golds.
    integer_exact: golds written as integers must be matched exactly.

  Returns:
    True when the prediction is correct.
  """
  if prediction is None:
    return False
  golds = [answer] if isinstance(answer, str) else list(answer)
  opts = normalize_options(options)
  for gold in golds:
    gold = str(gold)
    choice = _gold_choice(gold, opts)
    if choice is not None:
      if _parse_choice(prediction, opts, len(opts) or 26) == choice:
        return True
      continue
    pred = _clean(prediction)
    gold_value = parse_number(gold)
    if gold_value is not None:
      value = parse_number(pred)
      if value is None:
        found = _numbers_in(pred)
        value = found[0] if len(found) == 1 else None
      if value is None:
        continue
      if integer_exact and _is_integer_written(gold):
        ok = value == gold_value
      else:
        ok = abs(value - gold_value) <= max(rel_tol * abs(gold_value), abs_tol)
      if ok:
        return True
      continue
    norm = normalize_text(gold)
    if norm and normalize_text(pred) == norm:
      return True
  return False


def accuracy(response: str, answer: str | Sequence[str],
             options: Sequence[str] | Mapping[str, str] | None = None, *, fallback: str = "none",
             rel_tol: float = 1e-2, abs_tol: float = 0.0, integer_exact: bool = True) -> float:
  """1.0 when the answer in ``response`` is correct, else 0.0. Never raises on any text.

  Args:
    response: the model's response text (the last ``<answer>…</answer>`` is checked).
    answer: the gold answer, or a list of acceptable ones.
    options: multiple-choice options, if any.
    fallback: a key of ``ANSWER_FALLBACKS`` for responses without an answer block.
    rel_tol, abs_tol, integer_exact: numeric matching, see ``match_answer``.
  """
  prediction = extract_answer(response, fallback)
  return float(match_answer(prediction, answer, options, rel_tol=rel_tol, abs_tol=abs_tol,
                            integer_exact=integer_exact))


# ----------------------------------------------------------------------------------------------
# Format


def format_ok(turns: Sequence[str], *, require_think: bool = True) -> bool:
  """Whether a trajectory follows the protocol (``protocol.parse_turn`` decides each turn).

  Every assistant turn is ``format_ok``; every turn but the last makes one valid tool call; the
  last turn gives the trajectory's one and only answer.

  Args:
    turns: the assistant turns of one trajectory, in order (tool responses excluded).
    require_think: each turn must open with a ``<think>`` block (the system prompt asks for it).
  """
  if not turns:
    return False
  parsed = [protocol.parse_turn(t, require_think=require_think) for t in turns]
  if not all(t.format_ok for t in parsed):
    return False
  # A format_ok turn holds exactly one action: a valid tool call or a non-empty answer.
  return all(t.tool_call is not None for t in parsed[:-1]) and parsed[-1].answer is not None


# ----------------------------------------------------------------------------------------------
# Config, batch and registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
  """Which reward the trainer uses and its weights.

  Attributes:
    name: a key of ``REWARDS``.
    w_acc: weight of accuracy.
    w_fmt: weight of format.
    gain: tool-use reward gain, paid when the answer is correct and the trajectory made at least
      ``min_image_calls`` successful image calls.
    min_image_calls: successful image calls needed for the gain.
    helpful_without_baseline: ``tool_gain_helpful`` in a group where *every* rollout used a tool
      (no non-tool rollouts to compare with): True pays the gain as ``tool_gain`` would (the
      reward of a correct tool answer does not jump when the last non-tool rollout disappears;
      with std-normalised GRPO advantages the choice changes nothing inside such a group); False
      pays nothing.
    require_think: format needs a ``<think>`` block opening every turn.
    fallback: answer extraction fallback, a key of ``ANSWER_FALLBACKS``.
    rel_tol, abs_tol, integer_exact: numeric answer matching (see ``match_answer``).
  """
  name: str = "tool_gain"
  w_acc: float = 0.8
  w_fmt: float = 0.2
  gain: float = 1.2
  min_image_calls: int = 1
  helpful_without_baseline: bool = True
  require_think: bool = True
  fallback: str = "none"
  rel_tol: float = 1e-2
  abs_tol: float = 0.0
  integer_exact: bool = True

  def __post_init__(self):
    if self.name not in REWARDS:
      raise ValueError(f"unknown reward {self.name!r}; registered: {sorted(REWARDS)}")
    if self.fallback not in ANSWER_FALLBACKS:
      raise ValueError(f"unknown answer fallback {self.fallback!r}; available: {sorted(ANSWER_FALLBACKS)}")
    if self.min_image_calls < 1:
      raise ValueError(f"RewardConfig.min_image_calls must be >= 1, got {self.min_image_calls}")
    if self.rel_tol < 0 or self.abs_tol < 0:
      raise ValueError("RewardConfig.rel_tol and abs_tol must be >= 0")


@dataclasses.dataclass(frozen=True, eq=False)
class RewardBatch:
  """One rollout batch as the rewards see it. ``R`` rows; group ``g`` is rows ``[g·G, (g+1)·G)``.

  Attributes:
    turns: per trajectory, its assistant turns (tool responses excluded).
    answers: per trajectory, the gold answer (or list of acceptable answers).
    options: per trajectory, the options (list, mapping or None).
    num_successful_image_calls: ``[R]`` int, successful calls whose view entered the context.
    num_malformed_calls: ``[R]`` int, malformed tool calls (a trajectory with any fails format).
    group_size: G.
    config: the reward config.
  """
  turns: Sequence[Sequence[str]]
  answers: Sequence[Any]
  options: Sequence[Any]
  num_successful_image_calls: np.ndarray
  num_malformed_calls: np.ndarray
  group_size: int
  config: RewardConfig

  @property
  def size(self) -> int:
    return len(self.turns)

  @functools.cached_property
  def accuracy(self) -> np.ndarray:
    """``[R]`` float32 0/1 answer correctness (the last answer over all turns)."""
    c = self.config
    return np.array([accuracy("\n".join(t), a, o, fallback=c.fallback, rel_tol=c.rel_tol, abs_tol=c.abs_tol,
                              integer_exact=c.integer_exact)
                     for t, a, o in zip(self.turns, self.answers, self.options)], np.float32)

  @functools.cached_property
  def format(self) -> np.ndarray:
    """``[R]`` float32 0/1: protocol followed and no malformed tool call."""
    ok = np.array([format_ok(t, require_think=self.config.require_think) for t in self.turns], bool)
    return (ok & (self.num_malformed_calls == 0)).astype(np.float32)

  @functools.cached_property
  def used_tool(self) -> np.ndarray:
    """``[R]`` float32 0/1: at least ``min_image_calls`` successful image calls."""
    return (self.num_successful_image_calls >= self.config.min_image_calls).astype(np.float32)


RewardFn = Callable[[RewardBatch], dict[str, np.ndarray]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Registers ``fn(batch: RewardBatch) -> {"total": [R], <part>: [R], ...}`` under ``name``."""
  def wrap(fn: RewardFn) -> RewardFn:
    if name in REWARDS:
      raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = fn
    return fn
  return wrap


@register_reward("accuracy")
def _accuracy_reward(batch: RewardBatch) -> dict[str, np.ndarray]:
  return {"total": batch.accuracy}


@register_reward("format")
def _format_reward(batch: RewardBatch) -> dict[str, np.ndarray]:
  return {"total": batch.format}


@register_reward("accuracy_format")
def _accuracy_format_reward(batch: RewardBatch) -> dict[str, np.ndarray]:
  c = batch.config
  return {"total": c.w_acc * batch.accuracy + c.w_fmt * batch.format}


@register_reward("tool_gain")
def _tool_gain_reward(batch: RewardBatch) -> dict[str, np.ndarray]:
  c = batch.config
  tool_gain = c.gain * batch.accuracy * batch.used_tool
  return {"total": c.w_acc * batch.accuracy + c.w_fmt * batch.format + tool_gain, "tool_gain": tool_gain}


def tool_helpful(acc: np.ndarray, used_tool: np.ndarray, group_size: int,
                 without_baseline: bool = True) -> np.ndarray:
  """Per row, whether tools helped in its group.

  Tools helped when the group's tool-using rollouts have a strictly higher mean accuracy than its
  non-tool rollouts. A group with no tool-using rollout: False (nothing to pay). A group where
  every rollout used a tool: ``without_baseline``.

  Args:
    acc: ``[R]`` 0/1 accuracy.
    used_tool: ``[R]`` 0/1 tool use.
    group_size: G; ``R`` must be a multiple of it.
    without_baseline: the answer for groups without non-tool rollouts.

  Returns:
    ``[R]`` float32 0/1, constant within each group.
  """
  acc = np.asarray(acc, np.float64)
  used = np.asarray(used_tool) > 0
  if acc.shape[0] % group_size:
    raise ValueError(f"{acc.shape[0]} trajectories do not split into groups of group_size={group_size}")
  acc, used = acc.reshape(-1, group_size), used.reshape(-1, group_size)
  n_tool, n_plain = used.sum(1), (~used).sum(1)
  mean_tool = np.where(used, acc, 0).sum(1) / np.maximum(n_tool, 1)
  mean_plain = np.where(used, 0, acc).sum(1) / np.maximum(n_plain, 1)
  helpful = np.where(n_plain == 0, without_baseline, mean_tool > mean_plain)  # no tool rows: mean_tool = 0
  return np.repeat(helpful, group_size).astype(np.float32)


@register_reward("tool_gain_helpful")
def _tool_gain_helpful_reward(batch: RewardBatch) -> dict[str, np.ndarray]:
  c = batch.config
  helpful = tool_helpful(batch.accuracy, batch.used_tool, batch.group_size, c.helpful_without_baseline)
  tool_gain = c.gain * batch.accuracy * batch.used_tool * helpful
  return {"total": c.w_acc * batch.accuracy + c.w_fmt * batch.format + tool_gain, "tool_gain": tool_gain,
          "tool_helpful": helpful}


def compute_rewards(responses: Sequence[str | Sequence[str]], answers: Sequence[Any],
                    options: Sequence[Any] | None, num_successful_image_calls, group_size: int,
                    config: RewardConfig | None = None, *, num_malformed_calls=None) -> dict[str, np.ndarray]:
  """Rewards of a rollout batch, with every part for logging.

  Args:
    responses: per trajectory, its list of assistant turns, or one string (a single turn).
    answers: per trajectory, the gold answer (or a list of acceptable answers).
    options: per trajectory, its options (list / mapping / None), or None for no options at all.
    num_successful_image_calls: ``[R]`` int, successful calls whose returned view entered the context.
    group_size: rollouts per prompt; rows of a group are contiguous.
    config: the reward config (default ``RewardConfig()``: ``tool_gain``).
    num_malformed_calls: ``[R]`` int, or None (zeros).

  Returns:
    ``{"total": [R], "accuracy": [R], "format": [R], "used_tool": [R], ...}`` float32 arrays, plus
    the parts the chosen reward adds (``tool_gain``, ``tool_helpful``).
  """
  config = config or RewardConfig()
  num_rows = len(responses)
  if group_size < 1 or num_rows % group_size:
    raise ValueError(f"{num_rows} trajectories do not split into groups of group_size={group_size}")
  if len(answers) != num_rows or (options is not None and len(options) != num_rows):
    raise ValueError(f"responses, answers and options must have one entry per trajectory ({num_rows})")
  calls = np.asarray(num_successful_image_calls).reshape(-1)
  malformed = np.zeros(num_rows, np.int64) if num_malformed_calls is None else np.asarray(num_malformed_calls)
  if calls.shape != (num_rows,) or malformed.shape != (num_rows,):
    raise ValueError(f"per-trajectory call counts must have shape [{num_rows}]")
  batch = RewardBatch(
      turns=[(r,) if isinstance(r, str) else tuple(r) for r in responses],
      answers=list(answers),
      options=list(options) if options is not None else [None] * num_rows,
      num_successful_image_calls=calls,
      num_malformed_calls=malformed,
      group_size=group_size,
      config=config)
  out = dict(REWARDS[config.name](batch))
  out.setdefault("accuracy", batch.accuracy)
  out.setdefault("format", batch.format)
  out.setdefault("used_tool", batch.used_tool)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}
