"""Named model configs (``tiny``, ``micro``, the released Qwen2.5-VL sizes): re-exported from
``imagent_jax.models.qwen2_5_vl.presets``."""

from imagent_jax.models.qwen2_5_vl.presets import (PRESETS, TINY_TOKENIZER_PRESETS, get_preset, micro,  # noqa: F401
                                                   qwen2_5_vl_3b, qwen2_5_vl_7b, qwen2_5_vl_32b, qwen2_5_vl_72b,
                                                   tiny)
