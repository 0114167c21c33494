"""Named model configs: ``tiny`` for tests and CPU runs, and the public Qwen2.5-VL releases.

The 3B/7B/32B/72B values are those of the published ``config.json`` files of
Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct.
"""

from __future__ import annotations

from typing import Callable

from imagent_jax.models.qwen2_5_vl.config import ModelConfig, VisionConfig


def _qwen_vision(out_hidden_size: int, intermediate_size: int) -> VisionConfig:
  return VisionConfig(depth=32, hidden_size=1280, intermediate_size=intermediate_size, num_heads=16,
                      out_hidden_size=out_hidden_size, fullatt_block_indexes=(7, 15, 23, 31))


def qwen2_5_vl_3b() -> ModelConfig:
  return ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                     vision=_qwen_vision(2048, 3420))


def qwen2_5_vl_7b() -> ModelConfig:
  return ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                     vision=_qwen_vision(3584, 3420))


def qwen2_5_vl_32b() -> ModelConfig:
  return ModelConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                     num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False,
                     vision=_qwen_vision(5120, 3456))


def qwen2_5_vl_72b() -> ModelConfig:
  return ModelConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False,
                     vision=_qwen_vision(8192, 3456))


def tiny(vocab_size: int = 512) -> ModelConfig:
  """A few-hundred-thousand-parameter model with every architectural feature of the real ones.

  Window attention plus full attention on blocks 1 and 3, GQA (4 query / 2 kv heads), an uneven
  ``mrope_section`` and untied head. Special tokens sit at the top of the vocabulary, where the
  tiny tokenizer of ``imagent_jax.processing.tokenizer`` puts them (ids counted from the top):
  -10 ``<|endoftext|>`` (bos and pad), -9 ``<|im_end|>`` (eos), -8 ``<|im_start|>``,
  -7 ``<|vision_start|>``, -6 ``<|vision_end|>``, -5 ``<|vision_pad|>``, -4 ``<|image_pad|>``,
  -3 ``<|video_pad|>``, -2 ``<tool_call>``, -1 ``</tool_call>``.
  """
  top = vocab_size
  return ModelConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, mrope_section=(2, 3, 3),
      max_position_embeddings=4096, tie_word_embeddings=False,
      bos_token_id=top - 10, eos_token_id=top - 9, pad_token_id=top - 10,
      vision_start_token_id=top - 7, vision_end_token_id=top - 6, vision_token_id=top - 5,
      image_token_id=top - 4, video_token_id=top - 3,
      vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=(1, 3), window_size=112))


def micro(vocab_size: int = 512) -> ModelConfig:
  """``tiny`` cut to one decoder layer and two vision blocks (one windowed, one full attention):
  the fastest model to compile that still has every architectural feature (the smoke config)."""
  cfg = tiny(vocab_size)
  return cfg.replace(num_hidden_layers=1, vision=dict(depth=2, fullatt_block_indexes=(1,)))


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "micro": micro,
    "qwen2_5_vl_3b": qwen2_5_vl_3b,
    "qwen2_5_vl_7b": qwen2_5_vl_7b,
    "qwen2_5_vl_32b": qwen2_5_vl_32b,
    "qwen2_5_vl_72b": qwen2_5_vl_72b,
}


# Presets whose special tokens sit where the tiny tokenizer (``processing.build_tiny_tokenizer``)
# puts them: runs without a checkpoint build that tokenizer in the workdir.
TINY_TOKENIZER_PRESETS = ("tiny", "micro")


def get_preset(name: str, **overrides) -> ModelConfig:
  """Returns the named preset, with top-level fields (or ``vision={...}``) replaced by ``overrides``."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  cfg = PRESETS[name]()
  return cfg.replace(**overrides) if overrides else cfg
