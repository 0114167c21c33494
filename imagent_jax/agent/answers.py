"""Reading an answer: where it is in a response, and whether it matches the gold answer.

One implementation for every reader: the protocol's turn parser (``protocol.parse_turn``), the
rewards (``rl.rewards``) and the probes and evaluation.

Where the answer is (``<answer>`` blocks; tags are exact, lower case, as the system prompt writes
them and the turn grammar reads them):

* ``answer_blocks(text)``: the stripped contents of every complete ``<answer>...</answer>`` block,
  in order. A block runs from an opening tag to the first closing tag after it and never holds
  another opening tag (in ``<answer>A<answer>B</answer>`` the block is ``B``).
* ``single_answer(text)``: a *turn's* answer: the block when the text holds exactly one opening
  and one closing tag, in that order; else None (several answers are ambiguous and earn nothing
  as the turn's answer). ``protocol.parse_turn`` uses it.
* ``extract_answer(text, fallback)``: a *response's* answer for accuracy: the last block of all
  the assistant turns, so a trajectory that answered, called a tool and answered again is judged
  on its final word; without a block, a registered fallback (``ANSWER_FALLBACKS``: ``none``, the
  default for training; ``boxed``; ``text``).

Whether it matches (``match_answer``), in order:
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
A gold answer may also be a list of acceptable answers (any one matches).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Callable, Mapping, Sequence

from imagent_jax.registry import Registry

ANSWER_START, ANSWER_END = "<answer>", "</answer>"

# ----------------------------------------------------------------------------------------------
# Where the answer is

_BLOCK_RE = re.compile(re.escape(ANSWER_START) + r"((?:(?!" + re.escape(ANSWER_START) + r").)*?)"
                       + re.escape(ANSWER_END), re.DOTALL)


def answer_blocks(text: str) -> list[str]:
  """Stripped contents of the complete ``<answer>...</answer>`` blocks of ``text``, in order."""
  return [block.strip() for block in _BLOCK_RE.findall(text)]


def single_answer(text: str) -> str | None:
  """A turn's answer: the stripped block when ``text`` has exactly one ``<answer>`` and one
  ``</answer>``, in that order; else None."""
  if text.count(ANSWER_START) != 1 or text.count(ANSWER_END) != 1:
    return None
  blocks = answer_blocks(text)
  return blocks[0] if blocks else None


# What ``extract_answer`` returns when the text has no complete answer block; each
# ``fn(text) -> str | None``.
ANSWER_FALLBACKS: Registry[Callable[[str], str | None]] = Registry("answer fallback")

_BOXED_RE = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_OTHER_BLOCKS_RE = re.compile(r"<(think|tool_call|tool_response)>.*?</\1>", re.DOTALL | re.IGNORECASE)


@ANSWER_FALLBACKS.register("none")
def _no_fallback(text: str) -> str | None:
  """Nothing: the strict default for training (the protocol asks for the tags, and paying for
  untagged answers would fight the format reward)."""
  del text
  return None


@ANSWER_FALLBACKS.register("boxed")
def _boxed_fallback(text: str) -> str | None:
  """The last ``\\boxed{...}`` (models prompted in the math style)."""
  found = _BOXED_RE.findall(text)
  return found[-1].strip() if found else None


@ANSWER_FALLBACKS.register("text")
def _text_fallback(text: str) -> str | None:
  """The whole text outside ``<think>``/``<tool_call>``/``<tool_response>`` blocks (base models)."""
  rest = _OTHER_BLOCKS_RE.sub(" ", text)
  rest = re.sub(r"</?answer>", " ", rest, flags=re.IGNORECASE).strip()
  return rest or None


def extract_answer(text: str, fallback: str = "none") -> str | None:
  """A response's answer: the stripped text of its last complete ``<answer>`` block.

  Args:
    text: a response (all assistant turns joined, or the last turn).
    fallback: a name in ``ANSWER_FALLBACKS``, used when there is no complete answer block.

  Returns:
    The answer string, or None when there is none.
  """
  blocks = answer_blocks(text)
  if blocks:
    return blocks[-1]
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

