"""Named model configs of every registered family (``tiny``, ``micro``, ``qwen2_5_vl_{3b,7b,32b,72b}``).

``get_preset(name)`` and ``PRESETS`` look across families (``models.registry``); the Qwen2.5-VL
ones are defined in ``models/qwen2_5_vl/presets.py``.
"""

from imagent_jax.models.qwen2_5_vl.presets import (PRESETS, TINY_TOKENIZER_PRESETS, micro, qwen2_5_vl_3b,  # noqa: F401
                                                   qwen2_5_vl_7b, qwen2_5_vl_32b, qwen2_5_vl_72b, tiny)
from imagent_jax.models.registry import get_preset  # noqa: F401
