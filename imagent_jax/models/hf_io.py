"""Hugging Face checkpoints of any registered family: load them into our params pytree and write them back.

A Hugging Face folder holds ``config.json`` and the weights as safetensors, either one
``model.safetensors`` or shards ``model-0000k-of-0000n.safetensors`` listed in
``model.safetensors.index.json``. Tensor names come in two layouts, both accepted on load:

* the published layout (for Qwen2.5-VL ``visual.blocks.0.attn.qkv.weight``,
  ``model.layers.0.mlp.up_proj.weight``, ``model.embed_tokens.weight``, ``lm_head.weight``), which
  the releases use and which transformers 4.x and 5.x both write and read, as does vLLM;
* the module layout of transformers >= 4.52 (``model.visual.*``, ``model.language_model.*``).

The family comes from ``config.json``'s ``model_type`` (``models.registry.family_for_hf``).

``save_pretrained`` writes the published layout.

Each family's ``ParamsMap`` (for Qwen2.5-VL: ``models/qwen2_5_vl/params.py``) maps tensor
families between the two naming schemes (Hugging Face name template, our param path template and
the transform between the layouts); load reads it forwards and save backwards. Transforms: torch ``Linear`` weights are ``[out, in]`` and our
kernels ``[in, out]`` (a transpose); the patch-embedding ``Conv3d`` weight ``[Dv, C, T, P, P]``
becomes the kernel ``[C*T*P*P, Dv]``; norms, biases and the embedding are copied.

Both directions stream one tensor at a time: load memory-maps the files, converts a tensor on
the host and places it (directly into its shards when a mesh is given); save gathers one
parameter to the host, converts it and appends it to the open file. Nothing is ever unpickled:
pickle checkpoints (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imagent_jax.models import registry
from imagent_jax.models.safetensors import NP_TO_ST, SafetensorsReader, write_safetensors
from imagent_jax.models.tree import flatten, unflatten

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SHARD_FILE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
# Buffers some exporters write that carry no learned weights (recomputed from the config).
_HARMLESS_RE = re.compile(r"(^|\.)(inv_freq|rotary_emb\.[A-Za-z_]+)$")
# Checkpoint dtypes a floating-point parameter is read from (float64 is cast down). Float8 is not:
# such checkpoints are quantised and need their scales, which a plain cast would drop.
_FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float32, np.float16, jnp.bfloat16, np.float64))
# config.json's size fields (Hugging Face names, at the top level or in a ``*_config`` section):
# each must be a positive integer at most this large. The bounds sit far above any released model
# and far below sizes that would exhaust memory or overflow int32 shapes before a tensor is read.
CONFIG_SIZE_LIMITS = {
    "vocab_size": 2**24, "hidden_size": 2**16, "out_hidden_size": 2**16, "intermediate_size": 2**18,
    "num_hidden_layers": 1024, "depth": 1024, "num_attention_heads": 2**12, "num_key_value_heads": 2**12,
    "num_heads": 2**12, "head_dim": 2**12, "in_channels": 64, "in_chans": 64, "patch_size": 1024,
    "spatial_merge_size": 64, "temporal_patch_size": 64, "window_size": 2**16, "max_position_embeddings": 2**24,
}

# --------------------------------------------------------------------------- the name table


@dataclasses.dataclass(frozen=True)
class ParamRow:
  """One tensor family: a Hugging Face name template, our param path template and a transform.

  Templates hold ``{name}`` placeholders; ``{i}`` is a layer index (digits), the others take the
  alternatives listed in ``choices``. ``kind`` is ``copy`` (same layout), ``linear`` (transpose)
  or ``patch`` (Conv3d weight ``[D, C, T, P, P]`` <-> flattened patch kernel ``[C*T*P*P, D]``).
  """

  hf: str
  ours: str
  kind: str
  choices: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def _regex(self, template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for k, part in enumerate(parts):
      if k % 2 == 0:
        out.append(re.escape(part))
      else:
        out.append(f"(?P<{part}>{self.choices.get(part, r'[0-9]+')})")
    return re.compile("^" + "".join(out) + "$")

  def hf_to_ours(self, name: str) -> str | None:
    m = self._regex(self.hf).match(name)
    return self.ours.format(**m.groupdict()) if m else None

  def ours_to_hf(self, path: str) -> str | None:
    m = self._regex(self.ours).match(path)
    return self.hf.format(**m.groupdict()) if m else None


@dataclasses.dataclass(frozen=True)
class ParamsMap:
  """A family's map between Hugging Face tensor names and our parameter paths.

  Attributes:
    rows: the tensor families; load reads them forwards, save backwards.
    layout_prefixes: ``(other, published)`` name prefixes; tensors saved under ``other`` (e.g.
      transformers >= 4.52's module layout) are read as if saved under ``published``.
    optional: published names a checkpoint may hold although the model has no such param (a tied
      ``lm_head.weight`` some exporters still write); skipped on load.
  """

  rows: tuple[ParamRow, ...]
  layout_prefixes: tuple[tuple[str, str], ...] = ()
  optional: tuple[str, ...] = ()

  def canonical(self, key: str) -> str:
    """``key`` rewritten from any accepted layout into the published one."""
    for old, new in self.layout_prefixes:
      if key.startswith(old):
        return new + key[len(old):]
    return key

  def match_hf(self, name: str) -> tuple[ParamRow, str] | None:
    """``(row, our path)`` of a published-layout name, or None."""
    for row in self.rows:
      ours = row.hf_to_ours(name)
      if ours is not None:
        return row, ours
    return None

  def match_ours(self, path: str) -> tuple[ParamRow, str]:
    """``(row, Hugging Face name)`` of one of our paths; ``KeyError`` if no row covers it."""
    for row in self.rows:
      hf = row.ours_to_hf(path)
      if hf is not None:
        return row, hf
    raise KeyError(f"param {path!r} has no Hugging Face name; the family's ParamsMap needs a row for it")


def _default_family():
  return registry.get_family("qwen2_5_vl")


def canonical_hf_key(key: str, family=None) -> str:
  """Rewrites a tensor name of another accepted layout into the published layout.

  For Qwen2.5-VL (the default family): ``model.visual.X`` -> ``visual.X`` and
  ``model.language_model.X`` -> ``model.X``; other names are returned unchanged.
  """
  return (family or _default_family()).params_map().canonical(key)


def hf_key_to_param_path(key: str, family=None) -> str | None:
  """Our ``/``-joined param path for a Hugging Face tensor name (either layout), or None if unknown.

  E.g. ``model.language_model.layers.3.self_attn.q_proj.weight`` -> ``layers_3/self_attn/q_proj/kernel``.
  """
  pmap = (family or _default_family()).params_map()
  row_path = pmap.match_hf(pmap.canonical(key))
  return row_path[1] if row_path else None


def param_path_to_hf_key(path: str | Sequence[str], family=None) -> str:
  """The published-layout Hugging Face tensor name of one of our params (path ``/``-joined or a tuple)."""
  pmap = (family or _default_family()).params_map()
  return pmap.match_ours(path if isinstance(path, str) else "/".join(path))[1]


def _hf_shape(kind: str, shape: Sequence[int], geometry) -> tuple[int, ...]:
  """The Hugging Face shape of a tensor whose shape in our layout is ``shape``."""
  shape = tuple(int(s) for s in shape)
  if kind == "copy":
    return shape
  if kind == "linear":
    return shape[::-1]
  if kind == "patch":  # [C*T*P*P, D] -> [D, C, T, P, P]
    g = geometry
    return (shape[1], g.in_channels, g.temporal_patch_size, g.patch_size, g.patch_size)
  raise ValueError(kind)


def _to_ours(kind: str, x: np.ndarray) -> np.ndarray:
  """Hugging Face layout -> ours (a view where possible; no copy)."""
  if kind == "linear":
    return x.T
  if kind == "patch":
    return x.reshape(x.shape[0], -1).T
  return x


def _to_hf(kind: str, x: np.ndarray, hf_shape: Sequence[int]) -> np.ndarray:
  """Our layout -> Hugging Face layout ``hf_shape``."""
  if kind == "linear":
    return x.T
  if kind == "patch":
    return x.T.reshape(hf_shape)
  return x


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One expected tensor: our path, its Hugging Face name and both shapes."""

  path: str
  hf_name: str
  kind: str
  shape: tuple[int, ...]
  hf_shape: tuple[int, ...]
  dtype: np.dtype | None = None  # the param's dtype in the model


def _expected_tensors(family, config) -> dict[str, _Tensor]:
  """Every tensor the model of ``config`` has, keyed by our param path (from ``abstract_params``)."""
  pmap, geometry = family.params_map(), family.geometry(config)
  out = {}
  for path, leaf in flatten(family.abstract_params(config)).items():
    row, hf_name = pmap.match_ours(path)
    out[path] = _Tensor(path, hf_name, row.kind, tuple(leaf.shape), _hf_shape(row.kind, leaf.shape, geometry),
                        np.dtype(leaf.dtype))
  return out


# --------------------------------------------------------------------------- folder handling


def _check_folder(path: str | os.PathLike) -> str:
  folder = os.fspath(path)
  if not os.path.isdir(folder):
    hint = (" It looks like a Hub id: download it first, e.g. `huggingface-cli download "
            f"{folder} --local-dir DIR`, and pass DIR." if re.fullmatch(r"[\w.-]+/[\w.-]+", folder)
            and not os.path.exists(folder) else "")
    raise FileNotFoundError(f"{folder!r} is not a local folder holding a Hugging Face checkpoint.{hint}")
  return folder


def load_config(path: str | os.PathLike):
  """Reads ``config.json`` of a Hugging Face folder into its family's config (``ModelConfig`` for
  Qwen2.5-VL); the family is found by the file's ``model_type``."""
  folder = _check_folder(path)
  filename = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(filename):
    raise FileNotFoundError(f"{folder!r} has no {CONFIG_NAME}; a Hugging Face folder needs its "
                            f"config.json beside the weights (found: {sorted(os.listdir(folder))[:20]})")
  try:
    with open(filename, encoding="utf-8") as f:
      d = json.load(f)
  except ValueError as e:
    raise ValueError(f"{filename} is not valid JSON: {e}") from None
  if not isinstance(d, dict):
    raise ValueError(f"{filename} must hold a JSON object, got {type(d).__name__}")
  check_config_sizes(d, filename)
  try:
    return registry.family_for_hf(d).config_from_hf(d)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{filename}: {e}") from e


def check_config_sizes(d: Mapping[str, Any], filename: str = CONFIG_NAME) -> None:
  """Refuses a ``config.json`` dict whose sizes no model could have, before any config or array is
  built from it: every field of ``CONFIG_SIZE_LIMITS`` present (at the top level or in a
  ``*_config`` section such as ``text_config``, ``vision_config``) must be a positive integer within
  its bound, and the attention heads must divide their sizes. A ``ValueError`` names ``filename``
  and the field."""
  sections = [("", d)] + [(f"{k}.", v) for k, v in d.items() if k.endswith("_config") and isinstance(v, Mapping)]
  for prefix, section in sections:
    for name, limit in CONFIG_SIZE_LIMITS.items():
      value = section.get(name)
      if value is None:
        continue  # absent: the config class's default
      field = prefix + name
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{filename}: {field} must be a positive integer, got {value!r}")
      if not 0 < value <= limit:
        raise ValueError(f"{filename}: {field} = {value} is outside [1, {limit}], the sizes this loader accepts; "
                         "is the config.json corrupt or for another model?")
    hidden, kv = section.get("hidden_size"), section.get("num_key_value_heads")
    for heads_name in ("num_attention_heads", "num_heads"):
      heads = section.get(heads_name)
      if heads and hidden and section.get("head_dim") is None and hidden % heads:
        raise ValueError(f"{filename}: {prefix}hidden_size = {hidden} is not divisible by "
                         f"{prefix}{heads_name} = {heads}")
    heads = section.get("num_attention_heads")
    if heads and kv and heads % kv:
      raise ValueError(f"{filename}: {prefix}num_attention_heads = {heads} is not a multiple of "
                       f"{prefix}num_key_value_heads = {kv} (grouped-query attention)")


def _count_nonfinite(x: np.ndarray, chunk: int = 2**22) -> int:
  """How many NaN and Inf values ``x`` (floating) holds, counted in chunks (bounded extra memory)."""
  flat = x.reshape(-1)
  return sum(int(flat[k:k + chunk].size - np.count_nonzero(np.isfinite(flat[k:k + chunk])))
             for k in range(0, flat.size, chunk))


def _weight_files(folder: str) -> list[str]:
  """The safetensors files of a checkpoint folder; refuses pickle-only folders."""
  index = os.path.join(folder, WEIGHTS_INDEX_NAME)
  if os.path.isfile(index):
    try:
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e!r}") from None
    absent = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if absent:
      raise FileNotFoundError(f"{index} lists shard files that are not in {folder!r}: {absent}")
    return [os.path.join(folder, n) for n in names]
  if os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
    return [os.path.join(folder, WEIGHTS_NAME)]
  files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  if files:
    return [os.path.join(folder, n) for n in files]
  pickles = sorted(n for n in os.listdir(folder) if n.endswith(_PICKLE_SUFFIXES))
  if pickles:
    raise ValueError(
        f"{folder!r} holds only pickle checkpoint files {pickles}; they are refused because unpickling can run "
        "arbitrary code, and nothing was read from them. Convert the checkpoint to safetensors first, in an "
        "environment you trust, e.g. `python -c \"import transformers as t; "
        "t.Qwen2_5_VLForConditionalGeneration.from_pretrained('SRC').save_pretrained('DST', "
        "safe_serialization=True)\"` (or `safetensors.torch.save_file(state_dict, 'model.safetensors')`), "
        "then load DST.")
  raise FileNotFoundError(f"{folder!r} has no weights: expected {WEIGHTS_NAME} or sharded "
                          f"model-0000k-of-0000n.safetensors with {WEIGHTS_INDEX_NAME}")


def _format_shape(shape: Sequence[int]) -> str:
  return "[" + ", ".join(str(s) for s in shape) + "]"


# --------------------------------------------------------------------------- load


def _progress_bar(total: int, desc: str, enabled: bool | None):
  """A tqdm bar over ``total`` tensors, or None; ``enabled=None`` shows it on a terminal for many tensors."""
  if enabled is None:
    enabled = total >= 64 and sys.stderr.isatty()
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit="tensor", leave=False)


def load_pretrained(path: str | os.PathLike, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    rules: Any = None, *, progress: bool | None = None) -> tuple[Any, dict[str, Any]]:
  """Loads a local Hugging Face Qwen2.5-VL checkpoint folder, tensor by tensor.

  Reads ``config.json`` and the safetensors weights (one file, or shards with
  ``model.safetensors.index.json``; names in either the published or the transformers >= 4.52
  layout). Each tensor is memory-mapped, converted to our layout on the host, cast to ``dtype`` and
  placed at once, so the host holds at most one converted tensor besides the page cache. With a
  ``mesh`` each tensor goes straight into its shards (``imagent_jax.parallel.param_shardings``);
  without one it goes to the default device.

  Every check runs before any tensor is read: ``config.json``'s sizes are checked first
  (``check_config_sizes``), then a mismatch with the model it describes raises one ``ValueError``
  naming every missing, unexpected, duplicated and mis-shaped tensor, and every tensor of a float
  parameter stored as anything but float32, float16, bfloat16 or float64 (integers, bool, float8).
  Rotary ``inv_freq`` buffers are ignored, and so is ``lm_head.weight`` when the config ties the
  embeddings (the model then has no ``lm_head`` params). A tensor holding NaN or Inf values is
  loaded with a warning naming it and the count.

  Args:
    path: local folder with ``config.json`` and ``*.safetensors``.
    dtype: dtype of the returned floating-point params (e.g. ``jnp.bfloat16``); None keeps the
      checkpoint's dtypes.
    mesh: optional device mesh; the params are then sharded by ``param_shardings(config, mesh, rules)``.
    rules: optional logical-axis rules passed on to ``param_shardings``.
    progress: show a tqdm bar; None shows it on a terminal when there are many tensors.

  Returns:
    ``(config, params)``: the family's config (``ModelConfig`` for Qwen2.5-VL) and the params pytree (nested dict of ``jax.Array``)
    with the structure and shapes of the family's ``abstract_params(config)``, e.g.
    ``layers_0/self_attn/q_proj/kernel`` of shape ``[hidden, heads * head_dim]``.

  Raises:
    FileNotFoundError: the folder, its ``config.json`` or its weights are missing.
    ValueError: pickle-only checkpoint (refused, never unpickled), corrupt files, sizes in
      ``config.json`` out of bounds, or tensors that do not match the config (names, shapes, dtypes).
  """
  folder = _check_folder(path)
  config = load_config(folder)
  family = registry.family_of(config)
  pmap = family.params_map()
  readers = [SafetensorsReader(f) for f in _weight_files(folder)]
  expected = _expected_tensors(family, config)

  found: dict[str, tuple[SafetensorsReader, str]] = {}
  unexpected, duplicated, misshaped, mistyped = [], [], [], []
  for reader in readers:
    for key in reader.entries:
      name = pmap.canonical(key)
      if _HARMLESS_RE.search(name):
        continue
      match = pmap.match_hf(name)
      if name in pmap.optional and (match is None or match[1] not in expected):
        continue  # e.g. a tied head some exporters still write; the model reads the embedding instead
      if match is None or match[1] not in expected:
        unexpected.append(f"{key} {_format_shape(reader.shape(key))} ({os.path.basename(reader.filename)})")
        continue
      our_path = match[1]
      if our_path in found:
        other_reader, other_key = found[our_path]
        duplicated.append(f"{key} ({os.path.basename(reader.filename)}) and {other_key} "
                          f"({os.path.basename(other_reader.filename)})")
        continue
      found[our_path] = (reader, key)
      want = expected[our_path].hf_shape
      if reader.shape(key) != want:
        misshaped.append(f"{key}: expected {_format_shape(want)}, got {_format_shape(reader.shape(key))}")
      have, param_dtype = reader.entries[key][0], expected[our_path].dtype
      if param_dtype is not None and jnp.issubdtype(param_dtype, jnp.floating) and have not in _FLOAT_DTYPES:
        mistyped.append(f"{key} ({os.path.basename(reader.filename)}): {have.name}, but the parameter is "
                        f"floating point (float32, float16, bfloat16 or float64 expected)")
  missing = [f"{t.hf_name} {_format_shape(t.hf_shape)}" for p, t in expected.items() if p not in found]
  if missing or unexpected or duplicated or misshaped or mistyped:
    counts = ", ".join(f"{len(v)} {k}" for k, v in (("missing", missing), ("unexpected", unexpected),
                                                      ("duplicated", duplicated), ("mis-shaped", misshaped),
                                                      ("with a wrong dtype", mistyped)) if v)
    lines = [f"checkpoint {folder!r} does not match the model its config.json describes ({counts}):"]
    lines += [f"  missing: {m}" for m in missing]
    lines += [f"  unexpected: {u}" for u in unexpected]
    lines += [f"  duplicated: {d}" for d in duplicated]
    lines += [f"  wrong shape: {s}" for s in misshaped]
    lines += [f"  wrong dtype: {t}" for t in mistyped]
    raise ValueError("\n".join(lines))

  shardings = None
  if mesh is not None:
    from imagent_jax import parallel  # pylint: disable=import-outside-toplevel
    shardings = flatten(parallel.param_shardings(config, mesh, rules))
  target = None if dtype is None else np.dtype(dtype)

  # Read in file order, so that large checkpoints stream sequentially from disk.
  rank = {id(r): k for k, r in enumerate(readers)}
  order = sorted(expected, key=lambda p: (rank[id(found[p][0])], found[p][0].entries[found[p][1]][2]))
  flat = {}
  bar = _progress_bar(len(order), "loading", progress)
  for our_path in order:
    t = expected[our_path]
    reader, key = found[our_path]
    src = _to_ours(t.kind, reader.read(key))
    out_dtype = target if target is not None and jnp.issubdtype(src.dtype, jnp.inexact) else src.dtype
    host = np.empty(src.shape, out_dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow to Inf is counted and reported below
      np.copyto(host, src, casting="unsafe")  # the single host copy: mmap -> converted, cast tensor
    if jnp.issubdtype(host.dtype, jnp.inexact):
      bad = _count_nonfinite(host)
      if bad:
        cast = f" (after the cast from {src.dtype.name} to {host.dtype.name})" if src.dtype != host.dtype else ""
        log.warning("%s: tensor %s has %d non-finite (NaN or Inf) value(s) of %d%s",
                    reader.filename, key, bad, host.size, cast)
    del src
    if shardings is None:
      flat[our_path] = jax.device_put(host)
    else:
      flat[our_path] = jax.make_array_from_callback(host.shape, shardings[our_path], lambda idx, h=host: h[idx])
    del host
    if bar is not None:
      bar.update()
  if bar is not None:
    bar.close()
  for reader in readers:
    reader.close()
  return config, unflatten({p: flat[p] for p in expected})


# --------------------------------------------------------------------------- save


def _parse_size(size: int | str) -> int:
  """``5GB`` -> 5 * 10**9, ``2GiB`` -> 2 * 2**30, ``500KB``, ``123`` (bytes)."""
  if isinstance(size, (int, np.integer)):
    return int(size)
  m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB, 2GiB or a number of bytes")
  unit = (m.group(2) or "B").upper()
  scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
  return int(float(m.group(1)) * scale)


def _to_host(x: Any) -> np.ndarray:
  """One param on the host, gathered from all devices (and all hosts when it spans several)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def save_pretrained(path: str | os.PathLike, config: Any, params: Mapping[str, Any],
                    max_shard_size: int | str = "5GB", dtype: Any = None, *, progress: bool | None = None) -> None:
  """Writes a Hugging Face Qwen2.5-VL checkpoint folder that transformers and vLLM load.

  Writes ``config.json`` (``config.to_hf_dict()`` plus the weights dtype), ``generation_config.json``
  and the weights in the published tensor layout as safetensors: ``model.safetensors``, or shards
  ``model-0000k-of-0000n.safetensors`` of at most ``max_shard_size`` bytes each (a single larger
  tensor gets a shard of its own) with ``model.safetensors.index.json``. Parameters are gathered to
  the host one at a time. An earlier checkpoint in the folder is replaced once the new weights are
  completely written (its leftover ``model*.safetensors`` shards are removed). In a
  multi-host run every process must call this (parameters are all-gathered); process 0 writes.

  Args:
    path: output folder (created if needed).
    config: the model config.
    params: params pytree with the structure of the family's ``abstract_params(config)``
      (``jax.Array`` or numpy leaves, sharded or not).
    max_shard_size: bytes per shard, as an int or a string such as ``"5GB"`` or ``"500MB"``.
    dtype: dtype of the saved floating-point tensors (e.g. ``jnp.bfloat16``); None keeps each
      param's dtype.
    progress: show a tqdm bar; None shows it on a terminal when there are many tensors.

  Raises:
    ValueError: params do not match ``config`` (every missing, unexpected and mis-shaped param named).
  """
  folder = os.fspath(path)
  limit = _parse_size(max_shard_size)
  family = registry.family_of(config)
  expected = _expected_tensors(family, config)
  flat = flatten(params)
  missing = [f"{p} {_format_shape(t.shape)}" for p, t in expected.items() if p not in flat]
  unexpected = [p for p in flat if p not in expected]
  misshaped = [f"{p}: expected {_format_shape(expected[p].shape)}, got {_format_shape(np.shape(x))}"
               for p, x in flat.items() if p in expected and tuple(np.shape(x)) != expected[p].shape]
  if missing or unexpected or misshaped:
    lines = ["params do not match the model of the config:"]
    lines += [f"  missing: {m}" for m in missing] + [f"  unexpected: {u}" for u in unexpected]
    lines += [f"  wrong shape: {s}" for s in misshaped]
    raise ValueError("\n".join(lines))

  target = None if dtype is None else np.dtype(dtype)
  plan = []  # (hf_name, our_path, dtype, hf_shape), in Hugging Face name order
  for p, t in expected.items():
    leaf_dtype = np.dtype(flat[p].dtype)
    out_dtype = target if target is not None and jnp.issubdtype(leaf_dtype, jnp.inexact) else leaf_dtype
    if out_dtype not in NP_TO_ST:
      raise ValueError(f"param {p} has dtype {out_dtype}, which safetensors cannot store")
    plan.append((t.hf_name, p, out_dtype, t.hf_shape))
  plan.sort()

  shards: list[list[tuple[str, str, np.dtype, tuple[int, ...]]]] = [[]]
  shard_bytes = 0
  for item in plan:
    nbytes = math.prod(item[3]) * item[2].itemsize
    if shards[-1] and shard_bytes + nbytes > limit:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(item)
    shard_bytes += nbytes
  n = len(shards)
  names = [WEIGHTS_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(folder, exist_ok=True)

  by_name = {item[0]: item for item in plan}
  bar = _progress_bar(len(plan), "saving", progress if writer else False)

  def fetch(hf_name: str) -> np.ndarray:
    _, p, out_dtype, hf_shape = by_name[hf_name]
    host = _to_host(flat[p])
    if bar is not None:
      bar.update()
    return _to_hf(expected[p].kind, host.astype(out_dtype, copy=False), hf_shape)

  for name, shard in zip(names, shards):
    items = [(hf_name, out_dtype, hf_shape) for hf_name, _, out_dtype, hf_shape in shard]
    if writer:  # under a temporary name: an earlier checkpoint here stays intact until all is written
      write_safetensors(os.path.join(folder, name + ".tmp"), items, fetch, {"format": "pt"})
    else:  # take part in the all-gathers of params that span hosts, write nothing
      for hf_name, _, _ in items:
        x = flat[by_name[hf_name][1]]
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
          _to_host(x)

  if bar is not None:
    bar.close()
  if not writer:
    return
  for name in names:
    os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
  for old in os.listdir(folder):  # shards and index of an earlier save that this one does not overwrite
    if (_SHARD_FILE_RE.match(old) and old not in names) or (old == WEIGHTS_INDEX_NAME and n == 1):
      os.remove(os.path.join(folder, old))
  if n > 1:
    total = sum(math.prod(s) * d.itemsize for _, _, d, s in plan)
    index = {"metadata": {"total_size": total, "total_parameters": sum(math.prod(s) for *_, s in plan)},
             "weight_map": {hf_name: names[k] for k, shard in enumerate(shards) for hf_name, *_ in shard}}
    _write_json(os.path.join(folder, WEIGHTS_INDEX_NAME), index)
  dtypes = [d for _, _, d, _ in plan if jnp.issubdtype(d, jnp.inexact)]
  dtype_name = max(set(dtypes), key=dtypes.count).name if dtypes else "float32"
  hf_config = family.config_to_hf(config)
  hf_config["torch_dtype"] = hf_config["dtype"] = dtype_name
  if isinstance(hf_config.get("text_config"), dict):
    hf_config["text_config"]["dtype"] = hf_config["text_config"]["torch_dtype"] = dtype_name
  _write_json(os.path.join(folder, CONFIG_NAME), hf_config)
  _write_json(os.path.join(folder, GENERATION_CONFIG_NAME), family.generation_config(config))


def _write_json(filename: str, obj: Any) -> None:
  tmp = filename + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, filename)


__all__ = [
    "ParamRow", "ParamsMap", "load_pretrained", "save_pretrained", "load_config", "canonical_hf_key",
    "hf_key_to_param_path", "param_path_to_hf_key",
]
