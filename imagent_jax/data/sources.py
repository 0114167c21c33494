"""Sources of multi-image QA examples and the registry a config picks them from (``config.data.source``).

Every source is random access (``__len__``, ``__getitem__``) and yields the example dicts of
``synthetic.EXAMPLE_KEYS`` (RGB PIL images); ``pipeline.make_iterator`` batches any of them.

A run asks for one split with a ``SourceRequest`` (``stages.build.data_source`` fills it from
``config.data``) and ``make_source(name, request)`` hands it to the factory registered under
``name``, which reads the fields it needs. Adding a source is one registered factory::

    @register_source("my_set")
    def _my_set(request: SourceRequest):
      return MySource(request.path, split=request.split)

Registered:

* ``synthetic``       ``synthetic.SyntheticSource``: the split's examples drawn on the fly, no files.
* ``synthetic_mifg``  the same examples built once through tfds (``tfds.build_synthetic``, array_record,
                      under ``data_dir``), then read with ``tfds.TfdsSource``.
* ``jsonl``           ``jsonl.JsonlSource`` over the split's file or folder (``path``).

The tfds modules load lazily (``import tensorflow_datasets`` takes a second or more), so a
JSONL-only or on-the-fly run never imports them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from imagent_jax.data.jsonl import JsonlSource
from imagent_jax.registry import Registry

SOURCES: Registry[Callable[["SourceRequest"], Any]] = Registry("data source")  # name -> factory(request)


@dataclasses.dataclass(frozen=True)
class SourceRequest:
  """One split of a run's data, as ``config.data`` describes it; each source reads what it needs.

  Attributes:
    split: ``"train"``, ``"validation"`` or ``"test"``.
    sizes: examples per split (generated sources).
    seed: base seed; a generated split draws the stream ``synthetic.split_seed(seed, split)``.
    difficulty: the ``synthetic.DifficultyConfig`` of generated sources (None: the default one).
    data_dir: the folder of built datasets (``synthetic_mifg``).
    path: the split's file or folder (``jsonl``).
    on_error: bad records of file sources: ``"raise"`` or ``"skip"`` (counted).
    image_root: the folder a file source's images must lie in ("": each file's own folder).
  """
  split: str = "train"
  sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  seed: int = 0
  difficulty: Any = None
  data_dir: str = ""
  path: str = ""
  on_error: str = "raise"
  image_root: str = ""


  def __post_init__(self):
    from imagent_jax.data.jsonl import ON_ERROR  # pylint: disable=g-import-not-at-top
    if self.split not in ("train", "validation", "test"):
      raise ValueError(f"split must be train, validation or test, got {self.split!r}")
    if self.on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")


def register_source(name: str):
  """Decorator registering ``factory(request: SourceRequest) -> source`` under ``name``."""
  return SOURCES.register(name)


def make_source(name: str, request: SourceRequest) -> Any:
  """The source registered as ``name``, made for ``request``.

  Raises:
    ValueError: an unknown name, or a request the source cannot serve.
  """
  if name not in SOURCES:
    raise ValueError(f"unknown data source {name!r}; registered: {sorted(SOURCES)}")
  return SOURCES[name](request)


@register_source("synthetic")
def _synthetic(request: SourceRequest) -> Any:
  from imagent_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.SyntheticSource(request.sizes[request.split], synthetic.split_seed(request.seed, request.split),
                                   request.difficulty or synthetic.DifficultyConfig())


@register_source("synthetic_mifg")
def _synthetic_mifg(request: SourceRequest) -> Any:
  from imagent_jax.data import tfds as data_tfds  # pylint: disable=g-import-not-at-top
  builder = data_tfds.build_synthetic(request.data_dir, request.sizes or None, request.difficulty, seed=request.seed)
  return data_tfds.TfdsSource(builder, request.split)


@register_source("jsonl")
def _jsonl(request: SourceRequest) -> Any:
  if not request.path:
    raise ValueError(f"config.data.source='jsonl' needs config.data.{request.split}_path")
  return JsonlSource(os.path.expanduser(request.path), on_error=request.on_error, image_root=request.image_root or None)


__all__ = ["JsonlSource", "SOURCES", "SourceRequest", "make_source", "register_source"]
