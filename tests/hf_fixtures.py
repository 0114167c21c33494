"""Tiny random Hugging Face Qwen2.5-VL models for tests (no download; torch on CPU).

Plain functions, imported by tests as ``import hf_fixtures``:

* ``tiny_hf_config(**overrides)``: transformers ``Qwen2_5_VLConfig`` equal to ``get_preset('tiny')``.
* ``make_tiny_hf_model(seed, tie)``: a float32, eval-mode ``Qwen2_5_VLForConditionalGeneration``
  whose every parameter is random, norms and biases included (so that a wrongly mapped or
  dropped norm/bias shows up in parity tests).
* ``save_tiny_hf_checkpoint(tmp_dir, seed, tie, max_shard_size)``: that model saved by
  transformers' own ``save_pretrained``.
* ``torch_to_param_arrays(model)``: the model's weights in our params layout, computed here
  independently of ``imagent_jax.models.hf_io`` (reference for loader tests).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np

from imagent_jax.models.qwen2_5_vl.config import ModelConfig
from imagent_jax.models.presets import get_preset


def tiny_model_config(**overrides) -> ModelConfig:
  """Our ``tiny`` preset with ``overrides`` (top-level ``ModelConfig`` fields or ``vision={...}``)."""
  return get_preset("tiny", **overrides)


def tiny_hf_config(**overrides):
  """A transformers ``Qwen2_5_VLConfig`` equal to ``get_preset('tiny', **overrides)``.

  Window attention with full-attention blocks (1, 3), GQA 4/2, ``mrope_section`` (2, 3, 3),
  vocabulary 512 and the preset's special token ids; e.g. ``tiny_hf_config(tie_word_embeddings=True)``.
  Built through ``ModelConfig.to_hf_dict()``, the same dict ``save_pretrained`` writes.
  """
  import transformers  # pylint: disable=import-outside-toplevel

  return transformers.Qwen2_5_VLConfig(**tiny_model_config(**overrides).to_hf_dict())


def make_tiny_hf_model(seed: int = 0, tie: bool = False, attn_implementation: str = "eager", **overrides):
  """A random float32 torch ``Qwen2_5_VLForConditionalGeneration`` in eval mode.

  Every parameter is drawn from a generator seeded by ``seed`` (so the same seed gives the same
  weights): linear and conv weights ~ N(0, 0.05), the embedding ~ N(0, 0.1), norm weights
  ~ N(1, 0.1) and biases ~ N(0, 0.1).

  Args:
    seed: weights seed.
    tie: tie the LM head to the token embedding (``tie_word_embeddings``).
    attn_implementation: transformers attention backend (``eager`` is the plain reference math).
    **overrides: further ``ModelConfig`` overrides for ``tiny_hf_config``.

  Returns:
    The torch model.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  config = tiny_hf_config(tie_word_embeddings=tie, **overrides)
  config._attn_implementation = attn_implementation  # pylint: disable=protected-access
  model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied weights appear once
      if name.endswith(".bias"):
        mean, std = 0.0, 0.1
      elif p.ndim == 1:  # RMSNorm weights
        mean, std = 1.0, 0.1
      elif name.endswith("embed_tokens.weight"):
        mean, std = 0.0, 0.1
      else:
        mean, std = 0.0, 0.05
      p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)
  if tie:
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
  return model


def save_tiny_hf_checkpoint(tmp_dir: str | os.PathLike, seed: int = 0, tie: bool = False,
                            max_shard_size: int | str | None = None, **overrides) -> str:
  """Saves ``make_tiny_hf_model(seed, tie)`` with transformers' ``save_pretrained`` (safetensors).

  Args:
    tmp_dir: parent folder; the checkpoint goes into a subfolder named after seed and tie.
    seed: weights seed.
    tie: tied embeddings.
    max_shard_size: e.g. ``"100KB"`` to get several shards and an index; None for one file.
    **overrides: further ``ModelConfig`` overrides.

  Returns:
    The checkpoint folder.
  """
  model = make_tiny_hf_model(seed=seed, tie=tie, **overrides)
  path = os.path.join(os.fspath(tmp_dir), f"hf_tiny_seed{seed}{'_tied' if tie else ''}"
                      f"{'_sharded' if max_shard_size else ''}")
  kwargs: dict[str, Any] = {}
  if max_shard_size is not None:
    kwargs["max_shard_size"] = max_shard_size
  if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers 4.x
    kwargs["safe_serialization"] = True
  model.save_pretrained(path, **kwargs)
  return path


def torch_to_param_arrays(model) -> dict[str, np.ndarray]:
  """The torch model's weights in our layout, keyed by our ``/``-joined param path.

  Written independently of ``hf_io`` from the documented layout rules: ``Linear`` weights
  ``[out, in]`` are transposed to kernels ``[in, out]``; the patch ``Conv3d`` weight
  ``[Dv, C, T, P, P]`` becomes ``reshape(Dv, -1).T``; norm weights become ``scale``; the
  embedding is copied; ``lm_head`` is left out when tied.
  """
  tied = bool(model.config.tie_word_embeddings)
  out = {}
  for name, t in model.state_dict().items():
    x = t.detach().to("cpu").float().numpy()
    parts = name.split(".")
    if parts[:2] == ["model", "visual"]:
      parts = ["visual"] + parts[2:]
    elif parts[:2] == ["model", "language_model"]:
      parts = parts[2:]
    if parts[0] == "lm_head" and tied:
      continue
    if "inv_freq" in parts[-1]:
      continue
    leaf = parts[-1]
    if name.endswith("patch_embed.proj.weight"):
      parts, x = ["visual", "patch_embed", "kernel"], x.reshape(x.shape[0], -1).T
    elif name.endswith("embed_tokens.weight"):
      parts = ["embed_tokens", "embedding"]
    elif leaf == "weight" and x.ndim == 1:
      parts = parts[:-1] + ["scale"]
    elif leaf == "weight":
      parts, x = parts[:-1] + ["kernel"], x.T
    merged = []  # "layers", "0" -> "layers_0"; "mlp", "0" inside the merger -> "mlp_0"
    for p in parts:
      if p.isdigit():
        merged[-1] = f"{merged[-1]}_{p}"
      else:
        merged.append(p)
    out["/".join(merged)] = np.ascontiguousarray(x)
  return out


def torch_logits(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> np.ndarray:
  """Logits ``[B, L, V]`` of the torch model, as float32 numpy, for numpy or torch inputs.

  Passes ``mm_token_type_ids`` (1 at image tokens): transformers 5.x only builds the 3-D M-RoPE
  positions of image tokens when it is given, and silently falls back to 1-D positions otherwise.
  """
  import torch  # pylint: disable=import-outside-toplevel

  def t(x):
    return None if x is None else torch.as_tensor(np.asarray(x))

  ids = t(input_ids).long()
  kwargs = {"input_ids": ids, "attention_mask": t(attention_mask) if attention_mask is not None else None}
  if pixel_values is not None:
    kwargs.update(pixel_values=t(pixel_values).float(), image_grid_thw=t(image_grid_thw).long(),
                  mm_token_type_ids=(ids == model.config.image_token_id).long())
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()


def token_row(config, rng, parts) -> list[int]:
  """Token ids of a row described by ``parts``: ints are random text lengths, arrays are image grids
  (each becomes vision start, its image placeholders, vision end)."""
  ids = []
  for part in parts:
    if isinstance(part, int):
      ids += list(rng.randint(0, config.vocab_size - 16, size=part))
    else:
      n = int(np.prod(part)) // config.vision.merge_unit
      ids += [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
  return ids


def padded_batch(config, rows, side="left"):
  """``(input_ids, attention_mask)`` int64 ``[B, width]`` of token rows padded on ``side``."""
  width = max(len(r) for r in rows)
  ids = np.full((len(rows), width), config.pad_token_id, np.int64)
  mask = np.zeros((len(rows), width), np.int64)
  for i, r in enumerate(rows):
    sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
    ids[i, sl], mask[i, sl] = r, 1
  return ids, mask
