"""Qwen2.5-VL in Flax linen: config, presets, layers, the model and Hugging Face interop."""

from imagent_jax.models.qwen2_5_vl.config import ModelConfig, VisionConfig
from imagent_jax.models.presets import get_preset, PRESETS

__all__ = ["ModelConfig", "VisionConfig", "get_preset", "PRESETS"]
