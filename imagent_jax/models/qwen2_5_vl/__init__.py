"""The Qwen2.5-VL family: the Flax model, its config, presets, Hugging Face parameter map and
M-RoPE positions. ``Qwen25VL(config).apply({'params': p}, input_ids=..., ...)`` is the public
contract of DESIGN.md §5."""

from imagent_jax.models.qwen2_5_vl.config import ModelConfig, VisionConfig
from imagent_jax.models.qwen2_5_vl.model import (INITS, Attention, DecoderLayer, ImageTokenMismatchError, PatchMerger,
                                                 Qwen25VL, VisionAttention, VisionBlock, VisionTower, abstract_params,
                                                 causal_mask, check_image_tokens, count_params, init_cache, init_params,
                                                 logical_axes, merge_image_features, num_real_features, rescale_init,
                                                 vision_layout, vision_rope, write_cache)
from imagent_jax.models.qwen2_5_vl.positions import mrope_positions
