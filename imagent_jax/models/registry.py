"""The registered VLM families, and lookups by config, by Hugging Face ``model_type`` and by preset.

``family_of(config)`` is how every family-agnostic module (sampler, rollout, training, sharding,
``hf_io``) reaches the model: by the type of its config. The built-in families register on first
lookup; a new family registers itself with ``FAMILIES.add(name, family)`` (see
``models/interface.py`` for what it implements).
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from imagent_jax.registry import Registry

FAMILIES: Registry = Registry("model family")
_BUILTIN = ("imagent_jax.models.qwen2_5_vl.family",)


def _load_builtin() -> None:
  for module in _BUILTIN:
    importlib.import_module(module)


def get_family(name: str):
  """The family registered as ``name``."""
  _load_builtin()
  return FAMILIES[name]


def family_of(config: Any):
  """The family whose ``config_type`` is ``type(config)`` (else the nearest base class's)."""
  _load_builtin()
  for cls in type(config).__mro__:
    for family in FAMILIES.values():
      if family.config_type is cls:
        return family
  raise TypeError(f"no registered model family has config type {type(config).__name__}; registered: "
                  f"{[f.config_type.__name__ for f in FAMILIES.values()]}")


def family_for_hf(hf_config: Mapping[str, Any]):
  """The family that reads a Hugging Face ``config.json`` dict (by its ``model_type``)."""
  _load_builtin()
  model_type = hf_config.get("model_type")
  for family in FAMILIES.values():
    if model_type in family.hf_model_types():
      return family
  raise ValueError(f"no registered model family reads model_type={model_type!r}; supported: "
                   f"{sorted(t for f in FAMILIES.values() for t in f.hf_model_types() if t)}")


def presets() -> dict[str, Any]:
  """Every family's named configs: ``{preset name: zero-argument constructor}``."""
  _load_builtin()
  out = {}
  for family in FAMILIES.values():
    for name, make in family.presets.items():
      if name in out:
        raise ValueError(f"preset {name!r} is defined by two families")
      out[name] = make
  return out


def get_preset(name: str, **overrides):
  """The named preset of any family, with fields replaced by ``overrides`` (``config.replace``)."""
  table = presets()
  if name not in table:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(table)}")
  config = table[name]()
  return config.replace(**overrides) if overrides else config
