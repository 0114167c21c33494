"""What a VLM family provides to the rest of the package.

The sampler, the jitted rollout, the training log-prob pass, sharding, ``hf_io`` and the
processor's image geometry talk to a model only through this interface, so a second family
(Qwen3-VL, a variant with another patch size) is one folder under ``models/`` that implements
``VLMFamily`` and registers it in ``models.registry.FAMILIES``. Nothing outside a family's folder
names its classes or writes its patch size.

The module a family builds (``family.module(config, ...)``) is a Flax linen module with five
entry points, called with ``module.apply({'params': p}, ..., method=NAME)``:

* ``__call__(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
  return_hidden=False)`` -> logits ``[B, L, V]`` float32: the inputs transformers' forward takes
  (DESIGN.md §5). With ``return_hidden=True`` it returns the final (normed) hidden states
  ``[B, L, D]`` instead, the input of ``logits``. ``key_segments [B, L, C]`` (one-hot, the
  attention analysis only) makes every decoder layer sow
  ``intermediates/layers_<i>/self_attn/attention_shares [B, L, C]``: the head-mean share of each
  query's attention on each key segment, computed a chunk of queries at a time.
* ``logits(hidden [..., D])`` -> ``[..., V]`` float32: the vocabulary projection the forward pass
  ends with. The training log-prob pass (``rl.logprobs.token_logprobs``) applies it to chunks of
  positions so that ``[B, L, V]`` float32 logits never exist at once.
* ``encode_images(pixel_values [P, patch_dim], image_grid_thw [N, 3], max_image_patches=None)``
  -> merged image features ``[P // merge_unit, D]`` in processor order (padded patch slots
  allowed); ``max_image_patches`` is an optional bound on every image's patches (the rollout
  passes its tool views' budget) that a family may use to size per-image work.
* ``embed(input_ids [B, L], features [F, D] | None, num_features=None)`` -> ``[B, L, D]`` token
  embeddings with the image placeholders replaced by ``features`` in row-major order.
* ``decode(inputs_embeds [B, L, D], positions, key_mask [B, S] | [B, L], cache=None,
  cache_index=None, logits_at=None)`` -> ``(logits, cache)``: the decoder over embeddings,
  writing into a KV cache from ``family.init_cache`` at ``cache_index`` when one is given, and
  projecting only the positions ``logits_at [B]`` when given (``[B, V]``).

Positions are whatever ``family.positions`` returns (M-RoPE ``[3, B, L]`` for Qwen2.5-VL); the
sampler and rollout only carry them and the scalar ``next_pos`` per row, which every family
advances by one per generated text token.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class PatchGeometry:
  """How a family cuts images into patches and merges patches into tokens.

  Attributes:
    patch_size: pixels per patch side (14 for Qwen2.5-VL).
    merge_size: patches per merged token side (2: a token is 2x2 patches).
    temporal_patch_size: frames per patch (2; a still image is repeated).
    in_channels: 3 (RGB).
  """

  patch_size: int
  merge_size: int
  temporal_patch_size: int = 2
  in_channels: int = 3

  @property
  def factor(self) -> int:
    """Image sides are resized to multiples of this (one merged token's side in pixels)."""
    return self.patch_size * self.merge_size

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch in ``pixel_values``: C * T * p * p."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches per merged token."""
    return self.merge_size ** 2

  @property
  def pixels_per_patch(self) -> int:
    return self.patch_size ** 2

  @property
  def pixels_per_token(self) -> int:
    return self.factor ** 2

  def patches(self, pixels: int) -> int:
    """Patches of an image of at most ``pixels`` pixels (a pixel budget in patches)."""
    return int(pixels) // self.pixels_per_patch

  def tokens(self, pixels: int) -> int:
    """Merged tokens of an image of at most ``pixels`` pixels."""
    return int(pixels) // self.pixels_per_token

  def image_settings(self) -> dict[str, int]:
    """The processor's geometry keys (``Processor.image_settings``)."""
    return dict(patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size)


class VLMFamily(abc.ABC):
  """One model family: its config type, module, cache, positions, geometry, tokens and checkpoint map.

  Subclass it in ``models/<family>/family.py`` and register an instance in
  ``models.registry.FAMILIES``; ``models.registry.family_of(config)`` finds it by config type.
  """

  name: str = ""
  config_type: type = object

  # ------------------------------------------------------------------ the module and its state

  @abc.abstractmethod
  def module(self, config, *, dtype: Any = None, param_dtype: Any = None, remat: bool | str = "none",
             max_frame_patches: int = 0, attention: str = "dense", attention_block: int = 512,
             scan_layers: bool = False, record_attention: bool = False):
    """The Flax module (see the module docstring for its methods).

    Args:
      config: a ``config_type`` instance.
      dtype, param_dtype: compute and parameter dtypes (default float32).
      remat: what each block keeps for the backward pass (``layers.REMAT_POLICIES``: "none",
        "full", "dots", "dots_no_batch"; the old bools mean "none" / "full").
      max_frame_patches: the largest image frame in patches (bounds the vision attention bands;
        0: dense).
      attention: how the decoder attends over a whole sequence (``layers.ATTENTION_IMPLS``:
        "dense", "blocked", "xla", "cudnn"); ``ValueError`` when it cannot run here
        (``layers.check_attention``: "cudnn" off a GPU).
      attention_block: query and key block of ``attention="blocked"``.
      scan_layers: run the decoder layers of a pass without a KV cache as one ``lax.scan``
        (same parameter tree, same values; flat compile time, one layer's gathered weights at
        a time).
      record_attention: the attention-analysis variant: every decoder layer's softmax
        probabilities are sown as ``intermediates`` (``analysis.attention.attention_probs``).
    """

  @abc.abstractmethod
  def init_cache(self, config, batch: int, max_len: int, dtype: Any) -> Any:
    """An empty KV cache pytree for ``batch`` rows of ``max_len`` slots."""

  @abc.abstractmethod
  def place_prefix(self, config, cache, prefix, starts) -> Any:
    """``cache`` (``B`` rows) with the 1-row ``prefix`` cache's ``K`` slots copied into every row
    ``b`` at slots ``starts[b] ..`` (``starts [B]``): a prompt prefix prefilled once for all rows."""

  def for_decoding(self, model, backend: str):
    """The module that decode steps (and the observation inserts between them) run with on
    ``backend`` ("cpu", "gpu", "tpu"): the same model over the same parameters, in whatever form
    that backend steps fastest (Qwen2.5-VL on CPU: attention over the used part of the cache;
    ``sampler.decode_model``). Default: ``model``."""
    del backend
    return model

  @abc.abstractmethod
  def positions(self, config, input_ids, attention_mask, image_grid_thw, *, offset=None):
    """``(positions, deltas [B])`` of a (padded) batch, in-graph; ``offset [B]`` continues rows.

    ``deltas`` is ``max(position) + 1 - L`` per row: the token at cache slot ``c`` that follows
    has position ``c + delta``.
    """

  @abc.abstractmethod
  def num_real_features(self, config, image_grid_thw):
    """Merged features the images of ``image_grid_thw [N, 3]`` give (int if concrete, else traced)."""

  @abc.abstractmethod
  def check_image_tokens(self, config, input_ids, image_grid_thw) -> None:
    """Host check: raises ``ValueError`` unless the image placeholders fit the grids."""

  # ------------------------------------------------------------------------ geometry and tokens

  @abc.abstractmethod
  def geometry(self, config) -> PatchGeometry:
    """The patch geometry of ``config``'s vision tower."""

  @abc.abstractmethod
  def image_token_id(self, config) -> int:
    """The image placeholder token."""

  @abc.abstractmethod
  def banned_token_ids(self, config) -> tuple[int, ...]:
    """Tokens the policy may never sample (image/video placeholders and their brackets)."""

  # ------------------------------------------------------------------------------- parameters

  @abc.abstractmethod
  def boxed_init(self, config, rng, param_dtype) -> Any:
    """Random parameters still carrying their logical-axis boxes (``nn.Partitioned``)."""

  def logical_axes(self, config):
    """Pytree of ``PartitionSpec`` over logical axis names, structured like the params."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    boxed = jax.eval_shape(lambda r: self.boxed_init(config, r, np.float32), jax.random.key(0))
    return nn.get_partition_spec(boxed)

  def abstract_params(self, config, param_dtype: Any = np.float32):
    """``jax.ShapeDtypeStruct`` pytree of the parameters, without allocating them."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    return jax.eval_shape(lambda r: nn.unbox(self.boxed_init(config, r, param_dtype)), jax.random.key(0))

  def init_params(self, config, rng, param_dtype: Any = np.float32):
    """Random parameters (a plain pytree of arrays)."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    return nn.unbox(jax.jit(lambda r: self.boxed_init(config, r, param_dtype))(rng))

  def plot_vision_layout(self, config, images, image_grid_thw, path: str) -> str | None:
    """Optionally draws how the vision tower groups the patches of ``images``; the PNG's path or None."""
    del config, images, image_grid_thw, path
    return None

  def param_parts(self, params) -> dict[str, Any]:
    """The parameters split into named parts for a size table (default: one part)."""
    return {"all parameters": params}

  # ------------------------------------------------------------------- checkpoints and presets

  @abc.abstractmethod
  def config_from_hf(self, hf_config: Mapping[str, Any]):
    """The family's config from a Hugging Face ``config.json`` dict."""

  @abc.abstractmethod
  def config_to_hf(self, config) -> dict[str, Any]:
    """The ``config.json`` dict transformers reads."""

  @abc.abstractmethod
  def hf_model_types(self) -> tuple[str, ...]:
    """``model_type`` values of the Hugging Face configs this family reads."""

  @abc.abstractmethod
  def params_map(self) -> Any:
    """The Hugging Face parameter-name map (``models.hf_io.ParamsMap``)."""

  def generation_config(self, config) -> dict[str, Any]:
    """The ``generation_config.json`` dict written beside a saved checkpoint."""
    out = {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {k: v for k, v in out.items() if v is not None}

  presets: Mapping[str, Callable[[], Any]] = {}

  def __repr__(self) -> str:
    return f"<VLMFamily {self.name}>"
