"""Qwen2.5-VL's Hugging Face parameter-name map (``hf_io.ParamsMap``).

Published names (``visual.blocks.0.attn.qkv.weight``, ``model.layers.0.mlp.up_proj.weight``,
``model.embed_tokens.weight``, ``lm_head.weight``) on one side, our Flax paths
(``visual/blocks_0/attn/qkv/kernel``, ...) on the other. transformers >= 4.52 may save the module
layout (``model.visual.*``, ``model.language_model.*``), which load reads as the published one.
"""

from __future__ import annotations

from imagent_jax.models.hf_io import ParamRow, ParamsMap

_PROJ = "q_proj|k_proj|v_proj|o_proj"
_MLP = "gate_proj|up_proj|down_proj"

PARAMS_MAP = ParamsMap(
    rows=(
        # Vision tower.
        ParamRow("visual.patch_embed.proj.weight", "visual/patch_embed/kernel", "patch"),
        ParamRow("visual.blocks.{i}.{n}.weight", "visual/blocks_{i}/{n}/scale", "copy", {"n": "norm1|norm2"}),
        ParamRow("visual.blocks.{i}.attn.{m}.weight", "visual/blocks_{i}/attn/{m}/kernel", "linear", {"m": "qkv|proj"}),
        ParamRow("visual.blocks.{i}.attn.{m}.bias", "visual/blocks_{i}/attn/{m}/bias", "copy", {"m": "qkv|proj"}),
        ParamRow("visual.blocks.{i}.mlp.{m}.weight", "visual/blocks_{i}/mlp/{m}/kernel", "linear", {"m": _MLP}),
        ParamRow("visual.blocks.{i}.mlp.{m}.bias", "visual/blocks_{i}/mlp/{m}/bias", "copy", {"m": _MLP}),
        ParamRow("visual.merger.ln_q.weight", "visual/merger/ln_q/scale", "copy"),
        ParamRow("visual.merger.mlp.{j}.weight", "visual/merger/mlp_{j}/kernel", "linear", {"j": "0|2"}),
        ParamRow("visual.merger.mlp.{j}.bias", "visual/merger/mlp_{j}/bias", "copy", {"j": "0|2"}),
        # Text decoder.
        ParamRow("model.embed_tokens.weight", "embed_tokens/embedding", "copy"),
        ParamRow("model.layers.{i}.{n}.weight", "layers_{i}/{n}/scale", "copy",
                 {"n": "input_layernorm|post_attention_layernorm"}),
        ParamRow("model.layers.{i}.self_attn.{m}.weight", "layers_{i}/self_attn/{m}/kernel", "linear", {"m": _PROJ}),
        ParamRow("model.layers.{i}.self_attn.{m}.bias", "layers_{i}/self_attn/{m}/bias", "copy", {"m": _PROJ}),
        ParamRow("model.layers.{i}.mlp.{m}.weight", "layers_{i}/mlp/{m}/kernel", "linear", {"m": _MLP}),
        ParamRow("model.layers.{i}.mlp.{m}.bias", "layers_{i}/mlp/{m}/bias", "copy", {"m": _MLP}),
        ParamRow("model.norm.weight", "norm/scale", "copy"),
        ParamRow("lm_head.weight", "lm_head/kernel", "linear"),
    ),
    layout_prefixes=(("model.visual.", "visual."), ("model.language_model.", "model.")),
    optional=("lm_head.weight",),  # tied checkpoints (3B) may still carry it
)
