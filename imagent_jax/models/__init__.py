"""Vision-language models: the family interface (``interface.VLMFamily``), the registered families
(``registry.family_of(config)``; Qwen2.5-VL in ``qwen2_5_vl/``), shared layers and Hugging Face interop."""

from imagent_jax.models.qwen2_5_vl.config import ModelConfig, VisionConfig
from imagent_jax.models.presets import PRESETS, get_preset
from imagent_jax.models.registry import family_of, get_family

__all__ = ["ModelConfig", "VisionConfig", "family_of", "get_family", "get_preset", "PRESETS"]
