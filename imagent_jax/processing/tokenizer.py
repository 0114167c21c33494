"""Tokenizers from local Hugging Face folders, and a tiny Qwen-style tokenizer for tests.

``Tokenizer`` wraps the Rust ``tokenizers`` library directly rather than transformers'
``PreTrainedTokenizerFast``: it reads the same ``tokenizer.json`` (so ids are identical, special
tokens in the text are matched as single tokens), imports in milliseconds, never looks at the
network, and keeps transformers out of the rollout host loop, where ``encode``/``decode`` run
for every tool call.

``build_tiny_tokenizer`` trains a byte-level BPE tokenizer with Qwen2's normaliser,
pre-tokeniser and decoder on a small embedded agent/chat corpus and writes a folder that our
``load_tokenizer`` and transformers' ``AutoTokenizer`` / ``AutoProcessor`` (as a
``Qwen2_5_VLProcessor``, with the real Qwen2.5-VL chat template) both load. Its ten special tokens
take the top ten ids, where ``imagent_jax.models.presets.tiny`` expects them.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import BPE

from imagent_jax.processing import chat
from imagent_jax.processing import images as images_lib

# Qwen2's pre-tokenisation regex (the "Split" step of its tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# (token, special) from id ``vocab_size - 10`` up to ``vocab_size - 1``. As in Qwen2.5, the tool-call
# tags are added tokens that are not special: they survive ``skip_special_tokens``.
TINY_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (chat.ENDOFTEXT, True), (chat.IM_END, True), (chat.IM_START, True), (chat.VISION_START, True),
    (chat.VISION_END, True), (chat.VISION_PAD, True), (chat.IMAGE_PAD, True), (chat.VIDEO_PAD, True),
    (chat.TOOL_CALL_START, False), (chat.TOOL_CALL_END, False))

_CORPUS_LINES = (
    "You are a helpful assistant.",
    "You are a helpful assistant that looks closely at images before answering.",
    "Think step by step inside <think> and </think>, then answer inside <answer> and </answer>.",
    "<think>The question asks about the small object in the second image. I should zoom in.</think>",
    "<think>I need to look at the image again to check the colour of the sign.</think>",
    "<think>The crop shows the text clearly, so I can answer now.</think>",
    "<answer>B</answer>",
    "<answer>A</answer> <answer>C</answer> <answer>D</answer> <answer>yes</answer> <answer>no</answer>",
    "<answer>The red car is on the left of the tree.</answer>",
    "Tools: reflect(image) shows an image again; confirm(image, bbox_2d) crops a region and zooms in.",
    "To call a tool, write a JSON object inside tool_call tags.",
    '{"name": "reflect", "arguments": {"image": 1}}',
    '{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [10, 20, 110, 220]}}',
    "Question: Which image shows the blue umbrella? Options: (A) image 1 (B) image 2 (C) image 3 (D) image 4",
    "Question: What number is written on the small label? Answer with a single number.",
    "Question: How many people are standing near the door in the first picture?",
    "Question: What colour is the cup on the table, red, green, blue, yellow, black or white?",
    "Picture 1: Picture 2: Picture 3: Here is the zoomed view of image 2.",
    "The tool returned an error: the bounding box is empty or outside the image.",
    "Error: unknown tool name. Error: bad image index. Error: invalid JSON arguments.",
    "Please answer the question using the images. Look carefully at the details.",
    "The image shows a street with shops, a bicycle, a dog and a person holding a phone.",
    "left right top bottom center corner edge small large tiny object region crop zoom view",
    "first second third fourth last image images picture pictures photo detail details",
    "user assistant system tool observation response result status ok failed",
    "x1 y1 x2 y2 width height bbox_2d bbox box point label text number value",
)


def _tiny_corpus() -> list[str]:
  """The training text: fixed lines plus deterministically generated tool calls and numbers."""
  lines = list(_CORPUS_LINES)
  lines.append(" ".join(str(n) for n in range(1000)))
  for k in range(64):
    x1, y1 = (37 * k) % 500, (53 * k) % 400
    box = [x1, y1, x1 + 16 + (11 * k) % 300, y1 + 16 + (7 * k) % 300]
    lines.append(json.dumps({"name": "confirm", "arguments": {"image": k % 5 + 1, "bbox_2d": box}}))
    lines.append(json.dumps({"name": "reflect", "arguments": {"image": k % 7 + 1}}))
    lines.append(f"<think>Image {k % 5 + 1} may hold the answer; check region {box}.</think>")
  return lines


def _qwen2_pipeline(rust: _RustTokenizer) -> None:
  """Installs Qwen2's normaliser, pre-tokeniser, decoder and post-processor on ``rust``."""
  rust.normalizer = normalizers.NFC()
  rust.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  rust.decoder = decoders.ByteLevel()
  rust.post_processor = processors.ByteLevel(trim_offsets=False)


def _tokenizer_config() -> dict:
  """tokenizer_config.json of the tiny tokenizer, shaped like Qwen2.5-VL's."""
  return {
      "tokenizer_class": "Qwen2Tokenizer",
      "bos_token": None,
      "eos_token": chat.IM_END,
      "pad_token": chat.ENDOFTEXT,
      "unk_token": None,
      "add_prefix_space": False,
      "clean_up_tokenization_spaces": False,
      "errors": "replace",
      "model_max_length": 32768,
      "split_special_tokens": False,
      "extra_special_tokens": [token for token, special in TINY_ADDED_TOKENS
                               if special and token not in (chat.ENDOFTEXT, chat.IM_END)],
      "chat_template": chat.QWEN2_5_VL_CHAT_TEMPLATE,
  }


def _preprocessor_config(min_pixels: int, max_pixels: int) -> dict:
  """preprocessor_config.json with Qwen2.5-VL's image processor settings."""
  return {
      "image_processor_type": "Qwen2VLImageProcessor",
      "processor_class": "Qwen2_5_VLProcessor",
      "do_resize": True,
      "resample": 3,
      "do_rescale": True,
      "rescale_factor": 1 / 255,
      "do_normalize": True,
      "do_convert_rgb": True,
      "image_mean": list(images_lib.OPENAI_CLIP_MEAN),
      "image_std": list(images_lib.OPENAI_CLIP_STD),
      "min_pixels": min_pixels,
      "max_pixels": max_pixels,
      "patch_size": images_lib.PATCH_SIZE,
      "temporal_patch_size": images_lib.TEMPORAL_PATCH_SIZE,
      "merge_size": images_lib.MERGE_SIZE,
  }


def build_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 512, *,
                         min_pixels: int = images_lib.MIN_PIXELS,
                         max_pixels: int = images_lib.MAX_PIXELS) -> str:
  """Trains and writes a small byte-level BPE Qwen2.5-VL tokenizer + processor folder.

  Deterministic: the same arguments give byte-identical files. Ids ``vocab_size - 10`` ..
  ``vocab_size - 1`` are ``TINY_ADDED_TOKENS``; if the corpus runs out of merges before
  ``vocab_size - 10`` learned tokens, ``<|reserved_k|>`` special tokens fill the gap.

  Args:
    path: folder to write (created if missing).
    vocab_size: total vocabulary size, at least 266 (256 byte tokens plus the 10 added ones).
    min_pixels: ``min_pixels`` of the written preprocessor_config.json.
    max_pixels: ``max_pixels`` of the written preprocessor_config.json.

  Returns:
    ``path`` as a string. The folder holds tokenizer.json, tokenizer_config.json (with the
    Qwen2.5-VL chat template), chat_template.jinja and preprocessor_config.json.

  Raises:
    ValueError: ``vocab_size`` below 266.
  """
  num_added = len(TINY_ADDED_TOKENS)
  base_size = vocab_size - num_added
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if base_size < len(alphabet):
    raise ValueError(f"vocab_size must be at least {len(alphabet) + num_added} (256 bytes + {num_added} "
                     f"special tokens), got {vocab_size}")
  rust = _RustTokenizer(BPE())
  _qwen2_pipeline(rust)
  trainer = trainers.BpeTrainer(vocab_size=base_size, min_frequency=1, show_progress=False,
                                initial_alphabet=alphabet, special_tokens=[])
  rust.train_from_iterator(_tiny_corpus(), trainer=trainer)
  learned = rust.get_vocab_size(with_added_tokens=False)
  fillers = [AddedToken(f"<|reserved_{k}|>", special=True, normalized=False)
             for k in range(base_size - learned)]
  if fillers:
    rust.add_special_tokens(fillers)
  for token, special in TINY_ADDED_TOKENS:
    added = AddedToken(token, special=special, normalized=False)
    if special:
      rust.add_special_tokens([added])
    else:
      rust.add_tokens([added])
  if rust.get_vocab_size(with_added_tokens=True) != vocab_size:
    raise RuntimeError(f"built {rust.get_vocab_size(with_added_tokens=True)} ids, expected {vocab_size}")
  os.makedirs(path, exist_ok=True)
  rust.save(os.path.join(path, "tokenizer.json"))
  _write_json(os.path.join(path, "tokenizer_config.json"), _tokenizer_config())
  with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
    f.write(chat.QWEN2_5_VL_CHAT_TEMPLATE)
  _write_json(os.path.join(path, "preprocessor_config.json"), _preprocessor_config(min_pixels, max_pixels))
  return str(path)


def _write_json(filename: str, obj: dict) -> None:
  """Writes ``obj`` as indented JSON."""
  with open(filename, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _token_content(value) -> str | None:
  """A token string from a tokenizer_config.json entry (a string or an AddedToken dict)."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class Tokenizer:
  """Encode/decode with a local Hugging Face ``tokenizer.json``, plus its special-token ids.

  Attributes:
    eos_token: end-of-turn token string (``<|im_end|>`` for Qwen2.5-VL Instruct).
    pad_token: padding token string (``<|endoftext|>``).
  """

  def __init__(self, rust: _RustTokenizer, *, eos_token: str | None, pad_token: str | None):
    self._rust = rust
    self.eos_token = eos_token
    self.pad_token = pad_token

  def encode(self, text: str) -> list[int]:
    """Token ids ``[L]`` of ``text``; no BOS/EOS added, special tokens in the text are single ids."""
    return self._rust.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """``encode`` of each text (tokenised in parallel by the Rust library)."""
    return [e.ids for e in self._rust.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of token ids ``[L]``; ``skip_special_tokens`` drops special tokens (not tool-call tags)."""
    return self._rust.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    """Id of a token string, or None when it is not in the vocabulary."""
    return self._rust.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    """Token string of an id, or None when out of range."""
    return self._rust.id_to_token(int(token_id))

  def _required_id(self, token: str | None, name: str) -> int:
    """Id of a configured special token; ValueError when it is unset or unknown."""
    token_id = None if token is None else self._rust.token_to_id(token)
    if token_id is None:
      raise ValueError(f"tokenizer has no {name} token (configured: {token!r})")
    return token_id

  @property
  def eos_id(self) -> int:
    """Id of ``eos_token``."""
    return self._required_id(self.eos_token, "eos")

  @property
  def pad_id(self) -> int:
    """Id of ``pad_token``."""
    return self._required_id(self.pad_token, "pad")

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (the embedding table may be larger)."""
    return self._rust.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Loads the tokenizer of a local Hugging Face folder; never touches the network.

  Args:
    path: folder with tokenizer.json and (optionally) tokenizer_config.json, whose ``eos_token``
      and ``pad_token`` are used (when unset: ``<|im_end|>`` / ``<|endoftext|>``, Qwen2.5-VL's).

  Returns:
    A ``Tokenizer``.

  Raises:
    FileNotFoundError: no tokenizer.json in ``path``.
  """
  tokenizer_file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tokenizer_file):
    raise FileNotFoundError(f"no tokenizer.json in {os.fspath(path)!r}; point to a local Hugging Face "
                            "tokenizer folder (tokenizer.json + tokenizer_config.json)")
  rust = _RustTokenizer.from_file(tokenizer_file)
  config = {}
  config_file = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(config_file):
    with open(config_file, encoding="utf-8") as f:
      config = json.load(f)
  eos_token = _token_content(config.get("eos_token")) or chat.IM_END
  pad_token = _token_content(config.get("pad_token")) or chat.ENDOFTEXT
  return Tokenizer(rust, eos_token=eos_token, pad_token=pad_token)
