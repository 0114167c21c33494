"""The agent's chat format: system prompt, parsing of assistant turns, tool-response turns.

Underneath is the Qwen2.5-VL chat template (``imagent_jax.processing.chat``). One trajectory::

  <|im_start|>system\\n{system_prompt(tools)}<|im_end|>\\n
  <|im_start|>user\\nImage 1: <|vision_start|><|image_pad|><|vision_end|>\\n...{question}<|im_end|>\\n
  <|im_start|>assistant\\n<think>...</think>\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
  <|im_end|>\\n<|im_start|>user\\n<tool_response><|vision_start|><|image_pad|><|vision_end|>Image 3: zoom of
  image 2 at [10, 20, 110, 220].</tool_response><|im_end|>\\n<|im_start|>assistant\\n<think>...</think>
  <answer>B</answer><|im_end|>

The policy's turn that calls a tool ends at ``</tool_call>`` (a stop string of the sampler); the
host then appends ``observation_suffix(...)``, which closes that turn, adds the tool response as
a user turn and opens the next assistant turn, exactly as the template renders the equivalent
message list. A turn that answers ends at ``<|im_end|>``.

Images are numbered 1..N (the inputs, in order), then N+1, N+2, ... for each image a tool
returns, in order; tools address any of them by that number.

Parsing rules of ``parse_turn`` (model output is untrusted; it never raises):

* Trailing ``<|im_end|>`` / ``<|endoftext|>`` and whitespace are ignored.
* A well-formed turn is ``[<think>...</think>] (<tool_call>JSON</tool_call> | <answer>...</answer>)``
  with only whitespace between and around the blocks and no other tags or chat special tokens
  (``require_think=True`` makes the think block mandatory).
* The tool-call JSON must be an object ``{"name": str, "arguments": object}`` (strict JSON:
  double quotes; Python-style single quotes are refused with an error saying so, since a
  Qwen-style model writes JSON and accepting Python literals would need ``ast`` on untrusted
  text). Tolerated: whitespace and a Markdown code fence around the JSON, a missing
  ``"arguments"`` (read as ``{}``), and ``"arguments"`` written as a JSON string that holds an
  object.
* Several tool calls, nested or unclosed ``<tool_call>`` tags, a stray ``</tool_call>``, or an
  answer next to a tool call give ``tool_call_error`` (and no ``tool_call``): the host sends the
  error back as the observation.
* ``answer`` is ``answers.single_answer`` of the turn: the text of its only ``<answer>`` block;
  with several answer tags it is None (ambiguous answers earn nothing).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Optional, Sequence

from imagent_jax.agent import answers
from imagent_jax.processing import chat

THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = answers.ANSWER_START, answers.ANSWER_END
TOOL_CALL_START, TOOL_CALL_END = chat.TOOL_CALL_START, chat.TOOL_CALL_END
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
IMAGE_PLACEHOLDER = chat.VISION_START + chat.IMAGE_PAD + chat.VISION_END

# Tokens that end a turn; the sampler may leave them in the decoded text.
_TURN_END_TOKENS = (chat.IM_END, chat.ENDOFTEXT)
# Chat special tokens that may never appear inside a turn's text.
_SPECIAL_TOKENS = (chat.IM_START, chat.IM_END, chat.ENDOFTEXT, chat.VISION_START, chat.VISION_END,
                   chat.VISION_PAD, chat.IMAGE_PAD, chat.VIDEO_PAD)
_TAG_RE = re.compile(r"(</?(?:think|answer|tool_call|tool_response)>)")
_FENCE_RE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One parsed tool call: the tool's name and its JSON arguments."""
  name: str
  arguments: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Turn:
  """What one assistant turn says.

  Attributes:
    think: the stripped text of the first ``<think>...</think>`` block, or None.
    tool_call: the parsed call when the turn holds exactly one valid ``<tool_call>`` block and no
      answer; else None.
    tool_call_error: why the turn's tool-call tags could not be used (unclosed or nested tags,
      bad JSON, several calls, an answer next to a call, ...); None when there are no tool-call
      tags or the call parsed. Sent back to the model as the observation.
    answer: the stripped text of the only complete ``<answer>`` block, or None.
    format_ok: the turn follows the format (see the module docstring).
    format_error: why ``format_ok`` is False (for logs); None when it is True.
  """
  think: Optional[str] = None
  tool_call: Optional[ToolCall] = None
  tool_call_error: Optional[str] = None
  answer: Optional[str] = None
  format_ok: bool = False
  format_error: Optional[str] = None


# --------------------------------------------------------------------------------------------
# System prompt and question prompt.


def _function_spec(tool: Mapping[str, Any]) -> dict[str, Any]:
  """``{"type": "function", "function": {...}}`` from a full spec or a bare function dict."""
  if "function" in tool:
    return dict(tool)
  return {"type": "function", "function": dict(tool)}


PROMPT_STYLES = ("full", "compact")


def system_prompt(tools: Sequence[Mapping[str, Any]] = (), style: str = "full") -> str:
  """The system message: answer format, tool list (Hermes/Qwen ``<tools>`` block), image numbering.

  Args:
    tools: JSON function specs, ``{"type": "function", "function": {"name", "description",
      "parameters"}}`` (or the bare ``function`` dicts), as ``tools.tool_schemas`` gives them.
      Empty: the no-tool prompt (think, then answer).
    style: ``"full"`` (the JSON schemas, as pretrained Qwen models expect them) or ``"compact"``
      (one line per tool with its arguments: a few hundred tokens fewer for every rollout of a
      tiny model trained from scratch, whose small tokenizer makes JSON schemas long).

  Returns:
    The system prompt text.
  """
  if style not in PROMPT_STYLES:
    raise ValueError(f"unknown system prompt style {style!r}; use one of {PROMPT_STYLES}")
  lines = ["You are a helpful assistant that looks closely at images before answering."]
  if tools and style == "compact":
    specs = [_function_spec(t)["function"] for t in tools]
    lines += [f"Think in {THINK_START}{THINK_END}, then call one tool as {TOOL_CALL_START}"
              '{"name": ..., "arguments": {...}}' f"{TOOL_CALL_END} or answer in {ANSWER_START}{ANSWER_END}.",
              "Tools: " + "; ".join(f"{f['name']}({', '.join(f.get('parameters', {}).get('properties', {}))})"
                                    f": {f.get('description', '').rstrip('.')}" for f in specs),
              "Images are numbered 1..N, then each returned image gets the next number. Boxes are "
              "[x0, y0, x1, y1] in pixels."]
    return "\n".join(lines)
  if not tools:
    lines.append(f"Think inside {THINK_START}{THINK_END}, then give the final answer inside "
                 f"{ANSWER_START}{ANSWER_END}.")
    return "\n".join(lines)
  lines += [
      f"Think inside {THINK_START}{THINK_END}. Then either call one tool, or give the final answer "
      f"inside {ANSWER_START}{ANSWER_END}.",
      "",
      "# Tools",
      "Tools are given as JSON function signatures inside <tools></tools>:",
      "<tools>",
      *(json.dumps(_function_spec(tool), ensure_ascii=False) for tool in tools),
      "</tools>",
      f"To call a tool, write one JSON object inside {TOOL_CALL_START}{TOOL_CALL_END} and stop:",
      TOOL_CALL_START,
      '{"name": <function-name>, "arguments": <args-json-object>}',
      TOOL_CALL_END,
      "Images are numbered: 1 to N are the input images; each image a tool returns gets the next "
      "number (N+1, N+2, ...). Any number can be used. Boxes are [x0, y0, x1, y1] in pixels of "
      "the image as you see it.",
  ]
  return "\n".join(lines)


def _options_text(options: Sequence[str] | Mapping[str, str]) -> str:
  """``"A. ...\\nB. ..."`` from a list (lettered A, B, ...) or a letter -> text mapping."""
  if isinstance(options, Mapping):
    items = [(str(letter), str(text)) for letter, text in options.items()]
  else:
    if len(options) > len(answers.LETTERS):
      raise ValueError(f"at most {len(answers.LETTERS)} options can be lettered, got {len(options)}")
    items = [(answers.LETTERS[i], str(text)) for i, text in enumerate(options)]
  return "\n".join(f"{letter}. {text}" for letter, text in items)


def build_prompt_messages(question: str, num_images: int,
                          options: Sequence[str] | Mapping[str, str] | None = None, *,
                          tools: Sequence[Mapping[str, Any]], images: Sequence[Any] | None = None,
                          system_style: str = "full") -> list[dict[str, Any]]:
  """The opening conversation (system + user) of a multi-image question.

  The user turn labels each image ``Image k: `` before its placeholder, then gives the question
  and, for multiple choice, the options (``A. ...`` one a line) and asks for the letter.

  Args:
    question: the question text.
    num_images: N, the number of input images.
    options: multiple-choice options (a list, lettered A, B, ...; or a letter -> text mapping);
      None for an open question.
    tools: JSON function specs for ``system_prompt`` (``tools.tool_schemas(...)``); ``()`` for no
      tools. Required so that a no-tool prompt is never built by accident.
    images: optionally the N images, stored in the image items (``chat.message_images`` and the
      ``Processor`` pick them up from there).
    system_style: ``system_prompt`` style.

  Returns:
    ``[{"role": "system", "content": str}, {"role": "user", "content": [items]}]`` for
    ``chat.apply_chat_template``.

  Raises:
    ValueError: ``num_images`` negative or not ``len(images)``, or more than 26 listed options.
  """
  if num_images < 0:
    raise ValueError(f"num_images must be >= 0, got {num_images}")
  if images is not None and len(images) != num_images:
    raise ValueError(f"num_images={num_images} but {len(images)} images were given")
  content: list[dict[str, Any]] = []
  for k in range(num_images):
    content.append({"type": "text", "text": f"Image {k + 1}: "})
    item: dict[str, Any] = {"type": "image"}
    if images is not None:
      item["image"] = images[k]
    content.append(item)
    content.append({"type": "text", "text": "\n"})
  text = question.strip()
  if options is not None:
    text += "\n" + _options_text(options) + "\nAnswer with the option's letter."
  content.append({"type": "text", "text": text})
  return [{"role": "system", "content": system_prompt(tools, system_style)}, {"role": "user", "content": content}]


# --------------------------------------------------------------------------------------------
# Parsing one assistant turn.


def render_tool_call(call: ToolCall) -> str:
  """The text a model writes for ``call``: ``<tool_call>\\n{json}\\n</tool_call>``."""
  body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
  return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def _strip_turn_end(text: str) -> str:
  """``text`` without trailing whitespace and turn-end tokens."""
  while True:
    stripped = text.rstrip()
    for token in _TURN_END_TOKENS:
      if stripped.endswith(token):
        stripped = stripped[:-len(token)]
    if stripped == text:
      return text
    text = stripped


def _short(message: str, limit: int = 80) -> str:
  """``message`` cut to ``limit`` characters."""
  return message if len(message) <= limit else message[:limit - 3] + "..."


def _parse_call_json(body: str) -> tuple[Optional[ToolCall], Optional[str]]:
  """``(call, None)`` or ``(None, error)`` from the text between the tool-call tags."""
  body = body.strip()
  fenced = _FENCE_RE.match(body)
  if fenced:
    body = fenced.group(1)
  if not body:
    return None, "the tool call is empty; write a JSON object inside the tags"
  try:
    obj = json.loads(body)
  except RecursionError:
    return None, "the tool call JSON is nested too deeply"
  except ValueError as e:  # json.JSONDecodeError, and ints too long to convert.
    hint = " (use double quotes)" if "'" in body and '"' not in body else ""
    return None, f"the tool call is not valid JSON{hint}: {_short(str(e))}"
  if not isinstance(obj, dict):
    return None, (f"the tool call must be a JSON object {{\"name\": ..., \"arguments\": {{...}}}}, "
                  f"got a JSON {type(obj).__name__}; call one tool per turn")
  extra = sorted(set(obj) - {"name", "arguments"})
  if extra:
    return None, f"unexpected key(s) {_short(', '.join(map(json.dumps, extra)), 60)} in the tool call"
  name = obj.get("name")
  if "name" not in obj:
    return None, 'the tool call has no "name"'
  if not isinstance(name, str) or not name.strip():
    return None, '"name" must be a non-empty string'
  arguments = obj.get("arguments", {})
  if isinstance(arguments, str):
    try:
      arguments = json.loads(arguments)
    except (ValueError, RecursionError):
      return None, '"arguments" must be a JSON object'
  if not isinstance(arguments, dict):
    return None, '"arguments" must be a JSON object'
  return ToolCall(name=name.strip(), arguments=arguments), None


def _extract_tool_call(text: str) -> tuple[Optional[ToolCall], Optional[str]]:
  """The turn's tool call or the reason it cannot be used; ``(None, None)`` without call tags."""
  starts, ends = text.count(TOOL_CALL_START), text.count(TOOL_CALL_END)
  if starts == 0 and ends == 0:
    return None, None
  if starts == 0:
    return None, f"found {TOOL_CALL_END} without an opening {TOOL_CALL_START}"
  begin = text.find(TOOL_CALL_START) + len(TOOL_CALL_START)
  end = text.find(TOOL_CALL_END, begin)
  if end < 0:
    return None, f"unclosed {TOOL_CALL_START}: end the call with {TOOL_CALL_END}"
  if TOOL_CALL_START in text[begin:end]:
    return None, f"nested {TOOL_CALL_START} tags"
  if starts > 1 or ends > 1:
    return None, "several tool calls in one turn; call one tool per turn"
  if ANSWER_START in text or ANSWER_END in text:
    return None, "the turn has both an answer and a tool call; write one of them"
  return _parse_call_json(text[begin:end])


def _extract_think(text: str) -> Optional[str]:
  """Stripped text of the first ``<think>`` block (up to the next ``</think>``), or None."""
  begin = text.find(THINK_START)
  if begin < 0:
    return None
  begin += len(THINK_START)
  stop = text.find(THINK_END, begin)
  return None if stop < 0 else text[begin:stop].strip()


def _format_error(text: str, require_think: bool, tool_call: Optional[ToolCall],
                  tool_call_error: Optional[str], answer: Optional[str]) -> Optional[str]:
  """Why ``text`` breaks the turn format, or None when it follows it.

  Grammar, over the text split at tags: ``ws [<think> text </think> ws] action ws`` where
  ``action`` is ``<tool_call> json </tool_call>`` or ``<answer> text </answer>`` and ``ws`` is
  whitespace-only text.
  """
  for token in _SPECIAL_TOKENS:
    if token in text:
      return f"special token {token} inside the turn"
  if tool_call_error is not None:
    return f"bad tool call: {tool_call_error}"
  pieces = _TAG_RE.split(text)  # text, tag, text, tag, ..., text
  texts, tags = pieces[0::2], pieces[1::2]
  if any(t.strip() for t in (texts[0], texts[-1])):
    return "text outside the think/answer/tool_call blocks"
  position = 0
  if tags[:2] == [THINK_START, THINK_END]:
    position = 2
    if len(texts) > 2 and texts[2].strip():
      return "text between </think> and the next block"
  elif require_think:
    return f"the turn must start with {THINK_START}...{THINK_END}"
  action = tags[position:]
  if action == [TOOL_CALL_START, TOOL_CALL_END]:
    return None if tool_call is not None else "bad tool call"
  if action == [ANSWER_START, ANSWER_END]:
    return None if answer else "empty answer"
  if not action:
    return f"no {TOOL_CALL_START} or {ANSWER_START} block"
  return "tags out of order or repeated: " + _short(" ".join(tags), 120)


def parse_turn(text: Any, *, require_think: bool = False) -> Turn:
  """Parses one assistant turn's decoded text; never raises.

  Args:
    text: the text the policy generated in this turn (trailing ``<|im_end|>`` allowed); any
      value (non-strings give a Turn with ``format_ok=False``).
    require_think: a turn without a leading ``<think>`` block is not ``format_ok``.

  Returns:
    A ``Turn``; see the module docstring for the rules.
  """
  if not isinstance(text, str):
    return Turn(format_ok=False, format_error=f"turn text is a {type(text).__name__}, not a string")
  try:
    text = _strip_turn_end(text)
    tool_call, tool_call_error = _extract_tool_call(text)
    answer = answers.single_answer(text)
    think = _extract_think(text)
    error = _format_error(text, require_think, tool_call, tool_call_error, answer)
    return Turn(think=think, tool_call=tool_call, tool_call_error=tool_call_error, answer=answer,
                format_ok=error is None, format_error=error)
  except Exception as e:  # noqa: BLE001 - untrusted text must never crash the rollout.
    return Turn(format_ok=False, tool_call_error=f"could not parse the turn ({type(e).__name__})",
                format_error=f"parser failure: {type(e).__name__}: {_short(str(e))}")


# --------------------------------------------------------------------------------------------
# Tool responses.


def sanitize_observation(text: str) -> str:
  """``text`` with chat special tokens and protocol tags removed, so an observation cannot fake
  turns, images or tool calls (repeated until none is left, since removing one can form another).
  """
  forbidden = _SPECIAL_TOKENS + (THINK_START, THINK_END, ANSWER_START, ANSWER_END, TOOL_CALL_START,
                                 TOOL_CALL_END, TOOL_RESPONSE_START, TOOL_RESPONSE_END)
  while True:
    cleaned = text
    for token in forbidden:
      cleaned = cleaned.replace(token, "")
    if cleaned == text:
      return cleaned
    text = cleaned


def tool_response_text(observation_text: str, has_image: bool) -> str:
  """``<tool_response>[image placeholder]{text}</tool_response>``, the tool turn's content.

  Args:
    observation_text: the tool's short result or error text (sanitised here).
    has_image: the tool returned an image; one ``<|image_pad|>`` placeholder goes before the text.

  Returns:
    The content text, with one unexpanded placeholder when ``has_image``.
  """
  image = IMAGE_PLACEHOLDER if has_image else ""
  return f"{TOOL_RESPONSE_START}{image}{sanitize_observation(observation_text)}{TOOL_RESPONSE_END}"


def tool_response_message(observation_text: str, has_image: bool, image: Any = None) -> dict[str, Any]:
  """The user message carrying a tool result, rendering to ``tool_response_text``.

  Args:
    observation_text: the tool's result or error text.
    has_image: whether the message holds the returned image.
    image: optionally the returned image, stored in the image item.

  Returns:
    ``{"role": "user", "content": [items]}`` for ``chat.apply_chat_template``.
  """
  text = sanitize_observation(observation_text)
  if not has_image:
    return {"role": "user", "content": [{"type": "text", "text": f"{TOOL_RESPONSE_START}{text}"
                                                                 f"{TOOL_RESPONSE_END}"}]}
  item: dict[str, Any] = {"type": "image"}
  if image is not None:
    item["image"] = image
  return {"role": "user", "content": [{"type": "text", "text": TOOL_RESPONSE_START}, item,
                                      {"type": "text", "text": f"{text}{TOOL_RESPONSE_END}"}]}


def observation_suffix(observation_text: str, has_image: bool) -> str:
  """The exact text the host appends after the policy emitted ``</tool_call>``.

  Closes the assistant turn, adds the tool response as a user turn and opens the next assistant
  turn: ``<|im_end|>\\n<|im_start|>user\\n<tool_response>...</tool_response><|im_end|>\\n
  <|im_start|>assistant\\n``. Prompt + assistant text + this suffix equals
  ``chat.apply_chat_template`` of the conversation with the assistant message and
  ``tool_response_message(...)`` appended (``add_generation_prompt=True``).

  Args:
    observation_text: the tool's result or error text.
    has_image: the tool returned an image (one unexpanded ``<|image_pad|>`` in the suffix).

  Returns:
    The suffix text.
  """
  return (f"{chat.IM_END}\n{chat.IM_START}user\n{tool_response_text(observation_text, has_image)}"
          f"{chat.IM_END}\n{chat.IM_START}assistant\n")
