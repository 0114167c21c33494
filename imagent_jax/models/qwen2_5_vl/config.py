"""Frozen, validated configs of the Qwen2.5-VL architecture.

Field names follow the Hugging Face ``config.json`` of ``Qwen2_5_VLForConditionalGeneration`` so that
``ModelConfig.from_hf_dict`` / ``to_hf_dict`` are plain renames. Numerics (dtypes) are not part of the
architecture and live on the model module instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from imagent_jax.models.interface import PatchGeometry


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower: ViT with 2-D RoPE, window attention and a 2x2 patch merger."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  out_hidden_size: int = 3584  # = text hidden size; the merger projects into it.
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  window_size: int = 112  # in pixels; window attention covers window_size**2 pixels.
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
    if self.hidden_size % self.num_heads:
      raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if (self.hidden_size // self.num_heads) % 4:
      raise ValueError("vision head_dim must be a multiple of 4 (2-D rotary embedding over h and w)")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"fullatt_block_indexes {bad} are outside [0, depth={self.depth})")
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ValueError("window_size must be a multiple of patch_size * spatial_merge_size")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def geometry(self) -> PatchGeometry:
    """How the tower cuts images into patches and merges them into tokens."""
    return PatchGeometry(patch_size=self.patch_size, merge_size=self.spatial_merge_size,
                         temporal_patch_size=self.temporal_patch_size, in_channels=self.in_channels)

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch in ``pixel_values``: C * T * P * P."""
    return self.geometry.patch_dim

  @property
  def merge_unit(self) -> int:
    return self.geometry.merge_unit

  @property
  def window_units(self) -> int:
    """Side of an attention window counted in merged (2x2) units."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The whole VLM: text decoder fields at the top level, the vision tower in ``vision``."""

  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  pad_token_id: int | None = None
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  vision_token_id: int = 151654
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)

  def __post_init__(self):
    object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    if isinstance(self.vision, Mapping):
      object.__setattr__(self, "vision", VisionConfig(**self.vision))
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError("num_attention_heads must be a multiple of num_key_value_heads (grouped-query attention)")
    if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
      raise ValueError(
          f"mrope_section {self.mrope_section} must have 3 parts (t, h, w) summing to head_dim/2 = {self.head_dim // 2}")
    if self.vision.out_hidden_size != self.hidden_size:
      raise ValueError(
          f"vision.out_hidden_size {self.vision.out_hidden_size} must equal the text hidden_size {self.hidden_size}")
    for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
      if not 0 <= getattr(self, name) < self.vocab_size:
        raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def replace(self, **kw) -> "ModelConfig":
    if "vision" in kw and isinstance(kw["vision"], Mapping):
      kw["vision"] = dataclasses.replace(self.vision, **kw["vision"])
    return dataclasses.replace(self, **kw)

  # ---------------------------------------------------------------- Hugging Face config.json

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a Hugging Face Qwen2.5-VL ``config.json`` dict (transformers 4.x or 5.x)."""
    if d.get("model_type") not in (None, "qwen2_5_vl"):
      raise ValueError(f"expected a qwen2_5_vl config, got model_type={d.get('model_type')!r}")
    text = dict(d)
    # transformers >= 4.52 may nest the decoder fields under "text_config".
    if isinstance(d.get("text_config"), Mapping):
      text.update({k: v for k, v in d["text_config"].items() if v is not None})
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    mrope = rope.get("mrope_section", (16, 24, 24))
    rope_theta = text.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
    vd = dict(d.get("vision_config") or {})
    vfields = {f.name for f in dataclasses.fields(VisionConfig)}
    if "in_chans" in vd and "in_channels" not in vd:
      vd["in_channels"] = vd["in_chans"]
    vision = VisionConfig(**{k: v for k, v in vd.items() if k in vfields})
    fields = {f.name for f in dataclasses.fields(cls)} - {"vision", "mrope_section", "rope_theta"}
    kw = {k: text[k] for k in fields if k in text and text[k] is not None}
    eos = kw.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
      kw["eos_token_id"] = int(eos[0])
    return cls(**kw, mrope_section=tuple(mrope), rope_theta=float(rope_theta), vision=vision)

  def to_hf_dict(self) -> dict[str, Any]:
    """The ``config.json`` dict that transformers' ``Qwen2_5_VLConfig`` reads (4.x and 5.x)."""
    text = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "vision"}
    text["mrope_section"] = list(self.mrope_section)
    text["rope_scaling"] = {"type": "mrope", "rope_type": "default", "mrope_section": list(self.mrope_section)}
    vision = dataclasses.asdict(self.vision)
    vision["fullatt_block_indexes"] = list(self.vision.fullatt_block_indexes)
    vision["in_chans"] = self.vision.in_channels
    vision["model_type"] = "qwen2_5_vl"
    out = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **{k: v for k, v in text.items() if k != "mrope_section"},
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "vision_config": vision,
        "text_config": {**{k: v for k, v in text.items() if k != "mrope_section"}, "model_type": "qwen2_5_vl_text",
                        "use_sliding_window": False, "attention_dropout": 0.0},
    }
    if self.pad_token_id is None:
      out.pop("pad_token_id")
      out["text_config"].pop("pad_token_id")
    return out
