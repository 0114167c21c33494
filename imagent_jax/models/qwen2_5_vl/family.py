"""Qwen2.5-VL as a ``VLMFamily``: what the sampler, rollout, training, sharding and ``hf_io`` use."""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from imagent_jax.models import layers, registry
from imagent_jax.models.interface import PatchGeometry, VLMFamily  # noqa: F401
from imagent_jax.models.qwen2_5_vl import model as model_lib
from imagent_jax.models.qwen2_5_vl import presets as presets_lib
from imagent_jax.models.qwen2_5_vl.config import ModelConfig
from imagent_jax.models.qwen2_5_vl.positions import mrope_positions


# Cache prefixes a CPU decode step chooses from (``Qwen25VL.decode_windows``, one ``lax.switch``
# branch each): a decode loop then reads on average about half of the cache slots it would.
CPU_DECODE_WINDOWS = 6


class Qwen25VLFamily(VLMFamily):
  """Qwen2.5-VL: ViT with window attention and a 2x2 merger, M-RoPE decoder (``model.Qwen25VL``)."""

  name = "qwen2_5_vl"
  config_type = ModelConfig
  presets = presets_lib.PRESETS

  def module(self, config, *, dtype: Any = None, param_dtype: Any = None, remat: bool | str = "none",
             max_frame_patches: int = 0, attention: str = "dense", attention_block: int = 512,
             scan_layers: bool = False, record_attention: bool = False):
    dtype = dtype or jnp.float32
    layers.check_attention(attention, dtype=dtype)
    return model_lib.Qwen25VL(config, dtype=dtype, param_dtype=param_dtype or jnp.float32,
                              remat=layers.remat_name(remat), max_frame_patches=max_frame_patches,
                              attention=attention, attention_block=attention_block,
                              scan_layers=scan_layers, record_attention=record_attention)

  def init_cache(self, config, batch: int, max_len: int, dtype: Any):
    return model_lib.init_cache(config, batch, max_len, dtype)

  def place_prefix(self, config, cache, prefix, starts):
    return model_lib.place_prefix(cache, prefix, starts)

  def for_decoding(self, model, backend: str):
    """On CPU, decode steps attend over the used prefix of the cache (``CPU_DECODE_WINDOWS``).
    Elsewhere the model is unchanged: on an accelerator a ``lax.switch`` in every layer may cost
    a host sync a layer, which no lent device has measured yet."""
    if backend != "cpu" or model.decode_windows > 1:
      return model
    return model.clone(decode_windows=CPU_DECODE_WINDOWS)

  def positions(self, config, input_ids, attention_mask, image_grid_thw, *, offset=None):
    return mrope_positions(input_ids, attention_mask, image_grid_thw, image_token_id=config.image_token_id,
                           spatial_merge_size=config.vision.spatial_merge_size, offset=offset)

  def num_real_features(self, config, image_grid_thw):
    return model_lib.num_real_features(image_grid_thw, config)

  def check_image_tokens(self, config, input_ids, image_grid_thw) -> None:
    model_lib.check_image_tokens(input_ids, image_grid_thw, config)

  def geometry(self, config) -> PatchGeometry:
    return config.vision.geometry

  def image_token_id(self, config) -> int:
    return config.image_token_id

  def banned_token_ids(self, config) -> tuple[int, ...]:
    return tuple(sorted({config.vision_start_token_id, config.vision_end_token_id, config.vision_token_id,
                         config.image_token_id, config.video_token_id}))

  def boxed_init(self, config, rng, param_dtype):
    return model_lib._boxed_init(config, rng, param_dtype)  # pylint: disable=protected-access

  def plot_vision_layout(self, config, images, image_grid_thw, path: str) -> str | None:
    from imagent_jax.models.qwen2_5_vl import window_plot  # pylint: disable=import-outside-toplevel
    return window_plot.plot_window_layout(images, image_grid_thw, config.vision, path)

  def param_parts(self, params) -> dict[str, Any]:
    parts = {"vision tower": params["visual"], "token embedding": params["embed_tokens"],
             "decoder layers": {k: v for k, v in params.items() if k.startswith("layers_")},
             "final norm": params["norm"]}
    if "lm_head" in params:
      parts["lm head"] = params["lm_head"]
    return parts

  def config_from_hf(self, hf_config: Mapping[str, Any]):
    return self.config_type.from_hf_dict(hf_config)

  def config_to_hf(self, config) -> dict[str, Any]:
    return config.to_hf_dict()

  def hf_model_types(self) -> tuple[str, ...]:
    return ("qwen2_5_vl", None)

  def params_map(self):
    from imagent_jax.models.qwen2_5_vl.params import PARAMS_MAP  # pylint: disable=import-outside-toplevel
    return PARAMS_MAP

  def generation_config(self, config) -> dict[str, Any]:
    out = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
      out["pad_token_id"] = config.pad_token_id
    return out


FAMILY = Qwen25VLFamily()
if FAMILY.name not in registry.FAMILIES:
  registry.FAMILIES.add(FAMILY.name, FAMILY)
