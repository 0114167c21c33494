"""``Processor``: conversations + images -> Qwen2.5-VL model inputs, as transformers' processor makes them.

Same ``input_ids``, ``attention_mask``, ``pixel_values`` and ``image_grid_thw`` as
``Qwen2_5_VLProcessor`` called on the chat-templated texts with ``padding=True``. Placeholders are
expanded on token ids rather than on text (equivalent, since ``<|image_pad|>`` is an added token,
and it avoids tokenising thousands of pad strings). The chat template is the Qwen2.5-VL one in
``chat.py``; a folder's own Jinja template is not read.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from imagent_jax.processing import chat
from imagent_jax.processing import images as images_lib
from imagent_jax.processing.tokenizer import Tokenizer, load_tokenizer


def _image_settings(config: Mapping[str, Any]) -> dict[str, Any]:
  """``preprocess_image`` keyword arguments from a preprocessor_config.json dict.

  ``min_pixels`` / ``max_pixels`` (older files) override ``size.shortest_edge`` /
  ``size.longest_edge`` (newer files), as in transformers.
  """
  size = config.get("size") or {}
  min_pixels = size.get("shortest_edge", size.get("min_pixels", images_lib.MIN_PIXELS))
  max_pixels = size.get("longest_edge", size.get("max_pixels", images_lib.MAX_PIXELS))
  min_pixels = config.get("min_pixels", min_pixels)
  max_pixels = config.get("max_pixels", max_pixels)
  return {
      "min_pixels": int(min_pixels),
      "max_pixels": int(max_pixels),
      "patch_size": int(config.get("patch_size", images_lib.PATCH_SIZE)),
      "merge_size": int(config.get("merge_size", images_lib.MERGE_SIZE)),
      "temporal_patch_size": int(config.get("temporal_patch_size", images_lib.TEMPORAL_PATCH_SIZE)),
      "image_mean": tuple(config.get("image_mean", images_lib.OPENAI_CLIP_MEAN)),
      "image_std": tuple(config.get("image_std", images_lib.OPENAI_CLIP_STD)),
  }


def _is_conversation(sample: Any) -> bool:
  """True for a list of message dicts."""
  return isinstance(sample, Sequence) and not isinstance(sample, str) and all(
      isinstance(m, Mapping) for m in sample)


def _as_batch(messages_or_texts: Any) -> list[Any]:
  """One text / one conversation / a list of either -> a list of samples."""
  if isinstance(messages_or_texts, str):
    return [messages_or_texts]
  if _is_conversation(messages_or_texts) and len(messages_or_texts) > 0:
    return [messages_or_texts]
  if isinstance(messages_or_texts, Sequence) and len(messages_or_texts) > 0:
    for index, sample in enumerate(messages_or_texts):
      if not (isinstance(sample, str) or _is_conversation(sample)):
        raise ValueError(f"sample {index} must be a prompt string or a list of message dicts, got "
                         f"{type(sample).__name__}")
    return list(messages_or_texts)
  raise ValueError("give a prompt string, a conversation (list of message dicts) or a non-empty list of them")


def _split_images(images: Any, placeholders: list[int]) -> list[Any]:
  """Flattens ``images`` (flat, or one list per sample) after checking counts against placeholders."""
  if images is None:
    images = []
  elif not isinstance(images, (list, tuple)):
    images = [images]
  nested = len(images) > 0 and all(isinstance(x, (list, tuple)) for x in images)
  if nested:
    if len(images) != len(placeholders):
      raise ValueError(f"images has {len(images)} per-sample lists but there are {len(placeholders)} samples")
    for index, (sample_images, count) in enumerate(zip(images, placeholders)):
      if len(sample_images) != count:
        raise ValueError(f"sample {index} has {count} {chat.IMAGE_PAD} placeholders but {len(sample_images)} "
                         "images were given for it; each image needs exactly one placeholder")
    return [image for sample_images in images for image in sample_images]
  if len(images) != sum(placeholders):
    raise ValueError(f"the prompts have {sum(placeholders)} {chat.IMAGE_PAD} placeholders (per sample: "
                     f"{placeholders}) but {len(images)} images were given; each image needs exactly one "
                     "placeholder")
  return list(images)


class Processor:
  """Tokenizer + image preprocessing for Qwen2.5-VL, mirroring ``Qwen2_5_VLProcessor``.

  Attributes:
    tokenizer: the ``Tokenizer``.
    image_settings: ``preprocess_image`` keyword arguments (min/max pixels, patch/merge sizes,
      mean/std).
  """

  def __init__(self, tokenizer: Tokenizer, **image_settings):
    """Builds a processor.

    Args:
      tokenizer: a Qwen2.5-VL ``Tokenizer`` (must know ``<|image_pad|>``).
      **image_settings: preprocessor_config.json entries; ``min_pixels``, ``max_pixels``,
        ``size={"shortest_edge", "longest_edge"}``, ``patch_size``, ``merge_size``,
        ``temporal_patch_size``, ``image_mean`` and ``image_std`` are read, others ignored.
    """
    self.tokenizer = tokenizer
    self.image_settings = _image_settings(image_settings)
    self.image_pad_id = tokenizer.token_to_id(chat.IMAGE_PAD)
    if self.image_pad_id is None:
      raise ValueError(f"tokenizer has no {chat.IMAGE_PAD} token; it is not a Qwen2.5-VL tokenizer")

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "Processor":
    """Reads tokenizer.json, tokenizer_config.json and preprocessor_config.json of a local folder.

    Args:
      path: a Hugging Face Qwen2.5-VL checkpoint or tokenizer folder; without a
        preprocessor_config.json the Qwen2.5-VL defaults are used.

    Returns:
      A ``Processor``.
    """
    config: dict[str, Any] = {}
    config_file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(config_file):
      with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    return cls(load_tokenizer(path), **config)

  @property
  def merge_size(self) -> int:
    """Side of the merged patch block."""
    return self.image_settings["merge_size"]

  def render(self, sample: Any, add_generation_prompt: bool = True) -> str:
    """Prompt text of a conversation (chat template applied) or of an already-templated string."""
    if isinstance(sample, str):
      return sample
    return chat.apply_chat_template(sample, add_generation_prompt=add_generation_prompt)

  def __call__(self, messages_or_texts: Any, images: Any = None, *, padding_side: str = "left",
               add_generation_prompt: bool = True, return_tensors: str = "np") -> dict[str, np.ndarray]:
    """Builds a padded batch.

    Args:
      messages_or_texts: a conversation (list of message dicts, see ``chat.apply_chat_template``),
        a prompt string with ``<|image_pad|>`` placeholders (templated already), or a list of B
        of these.
      images: the images of all samples in placeholder order, flat or one list per sample
        (PIL images or uint8 arrays). When None, images stored under ``"image"`` in the
        conversations' image items are used.
      padding_side: "left" (default, for generation) or "right".
      add_generation_prompt: end conversations with ``<|im_start|>assistant\\n``.
      return_tensors: only "np".

    Returns:
      ``input_ids [B, L]`` int32, ``attention_mask [B, L]`` int32 (0 on padding, which holds the
      pad id), and when there are images ``pixel_values [P, 3 * T * patch_size**2]`` float32 and
      ``image_grid_thw [N, 3]`` int32 (as in transformers, both keys are absent without images).

    Raises:
      ValueError: placeholders and images disagree in number, a bad image, or bad arguments.
    """
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if return_tensors != "np":
      raise ValueError(f"return_tensors must be 'np', got {return_tensors!r}")
    samples = _as_batch(messages_or_texts)
    if images is None:
      images = [chat.message_images(s) for s in samples if not isinstance(s, str)]
      images = [image for sample_images in images for image in sample_images]
    texts = [self.render(s, add_generation_prompt) for s in samples]
    ids = self.tokenizer.encode_batch(texts)
    placeholders = [sum(1 for t in sample_ids if t == self.image_pad_id) for sample_ids in ids]
    flat_images = _split_images(images, placeholders)

    out: dict[str, np.ndarray] = {}
    if flat_images:
      pixel_values, grid_thw = images_lib.preprocess_images(flat_images, **self.image_settings)
      out["pixel_values"] = pixel_values
      out["image_grid_thw"] = grid_thw.astype(np.int32)
      start = 0
      for index, count in enumerate(placeholders):
        ids[index] = chat.expand_image_placeholders(ids[index], grid_thw[start:start + count],
                                                    merge_size=self.merge_size,
                                                    image_pad_id=self.image_pad_id)
        start += count
    input_ids, attention_mask = self._pad(ids, padding_side)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **out}

  def _pad(self, ids: list[list[int]], padding_side: str) -> tuple[np.ndarray, np.ndarray]:
    """Pads ``B`` id lists to the longest with the pad id -> ``input_ids, attention_mask [B, L]`` int32."""
    length = max(len(x) for x in ids)
    input_ids = np.full((len(ids), length), self.tokenizer.pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(ids), length), dtype=np.int32)
    for row, sample_ids in enumerate(ids):
      n = len(sample_ids)
      cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
      input_ids[row, cols] = sample_ids
      attention_mask[row, cols] = 1
    return input_ids, attention_mask

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of token ids ``[L]``."""
    return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
