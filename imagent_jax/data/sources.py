"""Sources of multi-image QA examples: the synthetic tfds builder, JSONL files, and a registry of them.

Every source is random access (``__len__``, ``__getitem__``) and yields the example dicts of
``synthetic.EXAMPLE_KEYS`` (RGB PIL images); ``pipeline.make_iterator`` batches any of them.

A config picks its source by name (``make_source(name, **kwargs)``); adding one is one
registered factory (``@register_source("name")``). Registered:

* ``synthetic``       ``SyntheticSource(size, seed, difficulty)``: drawn on the fly, no files.
* ``synthetic_mifg``  ``build_synthetic(data_dir, sizes, difficulty, seed=...)`` (built once),
                      then ``TfdsSource(builder, split)``.
* ``tfds``            any prepared array_record tfds dataset with this schema:
                      ``tfds.builder(name, data_dir=...)``, then ``TfdsSource(builder, split)``.
* ``jsonl``           ``JsonlSource(path, on_error=..., max_image_pixels=...)``.

The tfds modules load lazily (``import tensorflow_datasets`` takes a second or more), so a
JSONL-only run never imports them.
"""

from __future__ import annotations

from typing import Any, Callable

from imagent_jax.data.jsonl import DataError, JsonlSource, write_jsonl

SOURCES: dict[str, Callable[..., Any]] = {}
_LAZY = ("SyntheticMifg", "SyntheticMifgConfig", "TfdsSource", "build_synthetic", "make_config")


def register_source(name: str):
  """Decorator registering ``factory(**kwargs) -> source`` under ``name``."""
  if name in SOURCES:
    raise ValueError(f"source {name!r} is already registered")

  def decorator(factory):
    SOURCES[name] = factory
    return factory

  return decorator


def make_source(name: str, **kwargs) -> Any:
  """The source registered as ``name``, made with ``kwargs``.

  Raises:
    ValueError: an unknown name.
  """
  if name not in SOURCES:
    raise ValueError(f"unknown data source {name!r}; registered: {sorted(SOURCES)}")
  return SOURCES[name](**kwargs)


@register_source("synthetic")
def _synthetic(size: int, seed: int = 0, difficulty: Any = None) -> Any:
  from imagent_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.SyntheticSource(size, seed, difficulty or synthetic.DifficultyConfig())


@register_source("synthetic_mifg")
def _synthetic_mifg(data_dir: str, split: str = "train", sizes: Any = None, difficulty: Any = None, seed: int = 0,
                    num_workers: Any = None) -> Any:
  from imagent_jax.data import tfds as data_tfds  # pylint: disable=g-import-not-at-top
  builder = data_tfds.build_synthetic(data_dir, sizes, difficulty, seed=seed, num_workers=num_workers)
  return data_tfds.TfdsSource(builder, split)


@register_source("tfds")
def _tfds(name: str, data_dir: str, split: str = "train") -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from imagent_jax.data import tfds as data_tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared under {data_dir}; nothing is downloaded")
  return data_tfds.TfdsSource(builder, split)


@register_source("jsonl")
def _jsonl(path: str, on_error: str = "raise", max_image_pixels: Any = None) -> Any:
  return JsonlSource(path, on_error=on_error, max_image_pixels=max_image_pixels)


def __getattr__(name: str) -> Any:
  if name == "split_seed":  # lives with the generator: no tfds import
    from imagent_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.split_seed
  if name in _LAZY:
    from imagent_jax.data import tfds as data_tfds  # pylint: disable=g-import-not-at-top
    return getattr(data_tfds, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "JsonlSource", "SOURCES", "make_source", "register_source", "write_jsonl", "split_seed", *_LAZY]
