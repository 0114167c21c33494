"""M-RoPE positions: re-exported from ``imagent_jax.models.qwen2_5_vl.positions`` (model knowledge,
kept importable here for users' scripts)."""

from imagent_jax.models.qwen2_5_vl.positions import mrope_positions  # noqa: F401
