"""The Qwen2.5-VL chat template, written in Python, and image-placeholder expansion.

``apply_chat_template`` gives, character for character, the text that the Jinja chat template
shipped with Qwen2.5-VL checkpoints renders (``QWEN2_5_VL_CHAT_TEMPLATE`` below, which
``build_tiny_tokenizer`` writes into its tokenizer folders so transformers uses it too)::

  <|im_start|>system
  You are a helpful assistant.<|im_end|>
  <|im_start|>user
  <|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>
  <|im_start|>assistant

Each image in the prompt is one ``<|image_pad|>``; ``expand_image_placeholders`` then repeats it
once per LLM token the image occupies (``t * h * w / merge_size**2``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import numpy as np

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The chat template of the Qwen2.5-VL Instruct checkpoints (their chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

Message = Mapping[str, Any]


def _is_image_item(item: Mapping[str, Any]) -> bool:
  """The template's test for an image content item."""
  return item.get("type") == "image" or "image" in item or "image_url" in item


def _is_video_item(item: Mapping[str, Any]) -> bool:
  """The template's test for a video content item (checked after the image test)."""
  return item.get("type") == "video" or "video" in item


def _render_content(content: Sequence[Mapping[str, Any]], counts: dict[str, int],
                    add_vision_id: bool) -> str:
  """Text of one message's list of content items; ``counts`` carries image/video numbers on."""
  parts = []
  for item in content:
    if _is_image_item(item):
      counts["image"] += 1
      if add_vision_id:
        parts.append(f"Picture {counts['image']}: ")
      parts.append(VISION_START + IMAGE_PAD + VISION_END)
    elif _is_video_item(item):
      counts["video"] += 1
      if add_vision_id:
        parts.append(f"Video {counts['video']}: ")
      parts.append(VISION_START + VIDEO_PAD + VISION_END)
    elif "text" in item:
      parts.append(str(item["text"]))
  return "".join(parts)


def apply_chat_template(messages: Sequence[Message], *, add_generation_prompt: bool = True,
                        add_vision_id: bool = False) -> str:
  """Renders a conversation with the Qwen2.5-VL chat template.

  Args:
    messages: ``[{"role": "system" | "user" | "assistant" | ..., "content": str | list}]``;
      list content holds items ``{"type": "image"}`` (or any item with an ``image`` /
      ``image_url`` key), ``{"type": "video"}`` and ``{"type": "text", "text": str}``.
      A conversation that does not start with a system message gets
      ``"You are a helpful assistant."``.
    add_generation_prompt: end with ``<|im_start|>assistant\\n`` for the model to continue.
    add_vision_id: prefix images with ``Picture k: `` (and videos with ``Video k: ``).

  Returns:
    The prompt text, with one ``<|image_pad|>`` per image.

  Raises:
    ValueError: a message without ``role`` or ``content``, or content of another type.
  """
  counts = {"image": 0, "video": 0}
  parts = []
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
      raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
    role, content = message["role"], message["content"]
    if index == 0 and role != "system":
      parts.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
    parts.append(f"{IM_START}{role}\n")
    if isinstance(content, str):
      parts.append(content + f"{IM_END}\n")
    elif isinstance(content, Sequence) and all(isinstance(item, Mapping) for item in content):
      parts.append(_render_content(content, counts, add_vision_id) + f"{IM_END}\n")
    else:
      raise ValueError(f"message {index} content must be a string or a list of dicts, got {content!r}")
  if add_generation_prompt:
    parts.append(f"{IM_START}assistant\n")
  return "".join(parts)


def message_images(messages: Sequence[Message]) -> list[Any]:
  """The image objects stored in a conversation's image items, in order.

  Args:
    messages: a conversation as ``apply_chat_template`` takes it.

  Returns:
    The values of the ``image`` keys of image items that carry one (items that are only
    ``{"type": "image"}`` contribute nothing).
  """
  found = []
  for message in messages:
    content = message.get("content")
    if isinstance(content, str) or content is None:
      continue
    for item in content:
      if _is_image_item(item) and item.get("image") is not None:
        found.append(item["image"])
  return found


def _tokens_per_image(grid_thw, merge_size: int) -> list[int]:
  """``[N, 3]`` grids -> the number of LLM tokens of each image."""
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  return [int(n) for n in np.prod(grid, axis=-1) // (merge_size * merge_size)]


def expand_image_placeholders(text_or_ids: Union[str, Sequence[int]], grid_thw, *, merge_size: int = 2,
                              image_pad_id: int | None = None) -> Union[str, list[int]]:
  """Repeats the k-th ``<|image_pad|>`` once per LLM token of image k.

  Args:
    text_or_ids: prompt text, or its token ids ``[L]``.
    grid_thw: ``[N, 3]`` (or ``[3]`` for one image) grids of the prompt's N images, in order.
    merge_size: side of the merged patch block; image k takes
      ``prod(grid_thw[k]) // merge_size**2`` tokens.
    image_pad_id: the id of ``<|image_pad|>``; required for token ids.

  Returns:
    The text, or ids ``[L + sum_k (tokens_k - 1)]``, with placeholders expanded.

  Raises:
    ValueError: the number of placeholders is not N, or ids come without ``image_pad_id``.
  """
  counts = _tokens_per_image(grid_thw, merge_size)
  if isinstance(text_or_ids, str):
    pieces = text_or_ids.split(IMAGE_PAD)
    if len(pieces) - 1 != len(counts):
      raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_PAD} placeholders but {len(counts)} images "
                       "were given; each image needs exactly one placeholder")
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
      out.append(IMAGE_PAD * count + piece)
    return "".join(out)
  if image_pad_id is None:
    raise ValueError("expanding token ids needs image_pad_id, the id of <|image_pad|>")
  ids = [int(i) for i in text_or_ids]
  placeholders = sum(1 for i in ids if i == image_pad_id)
  if placeholders != len(counts):
    raise ValueError(f"prompt has {placeholders} {IMAGE_PAD} placeholders (id {image_pad_id}) but "
                     f"{len(counts)} images were given; each image needs exactly one placeholder")
  out_ids: list[int] = []
  remaining = iter(counts)
  for token in ids:
    if token == image_pad_id:
      out_ids.extend([image_pad_id] * next(remaining))
    else:
      out_ids.append(token)
  return out_ids
