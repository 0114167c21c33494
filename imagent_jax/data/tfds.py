"""tfds builder of the synthetic multi-image fine-grained QA set (``synthetic_mifg``), in array_record.

The examples are ``synthetic.generate_example(split_seed(seed, split), index, difficulty)`` for
``index`` in ``range(size)``, written in index order (row ``i`` of a split is example ``i``, so
any row can be regenerated and checked). Nothing is downloaded: the builder draws every image.

Splits ``train`` / ``validation`` / ``test`` (10000 / 500 / 500 by default) use the stream seeds
``3 * seed``, ``3 * seed + 1`` and ``3 * seed + 2``: disjoint for every base seed.

Features:

* ``images``: Sequence of Image (PNG; palette PNGs of 16 colours, see below), 1-4 per example.
* ``question``, ``answer`` (the option letter), ``category``: Text.
* ``options``: Sequence of Text (2-4, lettered A-D in order).
* ``target_image``: int32, 0-based; ``target_box``: int32 ``[x0, y0, x1, y1]`` in that image's
  pixels (``x1``/``y1`` exclusive).
* ``index``: int64, the example's index in its stream.

The images are 4-bit palette PNGs (4x cheaper to write than RGB). ``tf.io.decode_png(...,
channels=3)`` and Pillow decode them right; tfds' own NumPy decoding without OpenCV does not
(it returns palette indices), so read with ``TfdsSource`` (Pillow, RGB; no TensorFlow) or through
``tf.data`` (TensorFlow is not installed with the package: ``pip install tensorflow-cpu``).

Every configuration gets its own folder, named after its sizes, seed and a digest of the
difficulty and the generator version (``synthetic.GENERATOR_VERSION``), so changing any of them
never reuses stale data::

  builder = build_synthetic("/data/tfds", sizes=(10000, 500, 500))   # ~1 minute on 2 cores
  source = TfdsSource(builder, "train")                              # example dicts, RGB images
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from imagent_jax.data import synthetic, tf_example
from imagent_jax.processing import images as images_lib

SPLITS, split_seed = synthetic.SPLITS, synthetic.split_seed  # defined beside the generator (no tfds needed)
DEFAULT_SIZES = {"train": 10000, "validation": 500, "test": 500}
_PARALLEL_MIN_EXAMPLES = 256  # below this, generating in-process beats starting workers
_CHUNK = 16

Sizes = Union[Mapping[str, int], Sequence[int], None]


def _normalize_sizes(sizes: Sizes) -> dict[str, int]:
  """``{split: size}`` from a mapping, a ``(train, validation, test)`` triple, or None (defaults)."""
  if sizes is None:
    return dict(DEFAULT_SIZES)
  if isinstance(sizes, Mapping):
    unknown = set(sizes) - set(SPLITS)
    if unknown:
      raise ValueError(f"unknown splits {sorted(unknown)} in sizes; splits: {SPLITS}")
    out = {s: int(sizes.get(s, 0)) for s in SPLITS}
  else:
    if len(sizes) != len(SPLITS):
      raise ValueError(f"sizes must be (train, validation, test), got {sizes!r}")
    out = dict(zip(SPLITS, (int(v) for v in sizes)))
  if any(v < 0 for v in out.values()) or not any(out.values()):
    raise ValueError(f"split sizes must be >= 0 with at least one example, got {out}")
  return out


@dataclasses.dataclass(eq=False)
class SyntheticMifgConfig(tfds.core.BuilderConfig):
  """A ``synthetic_mifg`` configuration (make one with ``make_config``).

  Attributes:
    sizes: examples per split.
    seed: base seed; the splits use ``split_seed(seed, split)``.
    difficulty: the ``synthetic.DifficultyConfig``.
  """
  sizes: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SIZES))
  seed: int = 0
  difficulty: synthetic.DifficultyConfig = synthetic.DifficultyConfig()


def make_config(sizes: Sizes = None, seed: int = 0,
                difficulty: Optional[synthetic.DifficultyConfig] = None) -> SyntheticMifgConfig:
  """A config named after what determines its data (sizes, seed, difficulty, generator version).

  Args:
    sizes: ``{split: size}`` or ``(train, validation, test)``; None: 10000 / 500 / 500.
    seed: base seed (>= 0).
    difficulty: None: ``DifficultyConfig()``.
  """
  sizes = _normalize_sizes(sizes)
  difficulty = difficulty or synthetic.DifficultyConfig()
  synthetic.example_rng(seed, 0)  # validates the seed
  blob = json.dumps({"difficulty": difficulty.to_dict(), "categories": list(difficulty.active_categories()),
                     "generator": synthetic.GENERATOR_VERSION}, sort_keys=True)
  digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
  name = "n{}_{}_{}_s{}_{}".format(*(sizes[s] for s in SPLITS), seed, digest)
  return SyntheticMifgConfig(name=name, sizes=sizes, seed=int(seed), difficulty=difficulty,
                             description=f"sizes={sizes}, seed={seed}, difficulty={blob}")


def _features(ex: dict[str, Any]) -> dict[str, Any]:
  """A generated example (PNG images) in the builder's feature format."""
  return {"images": ex["images"], "question": ex["question"], "options": ex["options"], "answer": ex["answer"],
          "category": ex["category"], "target_image": np.int32(ex["target_image"]),
          "target_box": np.asarray(ex["target_box"], np.int32), "index": np.int64(ex["index"])}


class SyntheticMifg(tfds.core.GeneratorBasedBuilder):
  """Synthetic multi-image fine-grained QA (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [make_config()]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    # tfds' own lookup needs the importlib_resources backport, which tfds 4.9 does not install.
    return epath.Path(__file__)

  def __init__(self, *, num_workers: Optional[int] = None, **kwargs):
    """Args: ``num_workers``: generator processes (None: one per CPU; 0: in this process);
    ``**kwargs``: ``tfds.core.GeneratorBasedBuilder``'s (``data_dir``, ``config``, ...)."""
    self._num_workers = num_workers
    self._pool = None
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                                         doc="1-4 images (4-bit palette PNGs)"),
        "question": tfds.features.Text(doc="the question; images are numbered from 1"),
        "options": tfds.features.Sequence(tfds.features.Text(), doc="options, lettered A-D in order"),
        "answer": tfds.features.Text(doc="the right option's letter"),
        "category": tfds.features.Text(doc="question category (synthetic.CATEGORIES)"),
        "target_image": tfds.features.Scalar(np.int32, doc="0-based index of the image holding the answer"),
        "target_box": tfds.features.Tensor(shape=(4,), dtype=np.int32,
                                           doc="[x0, y0, x1, y1] of the answer region in that image's pixels"),
        "index": tfds.features.Scalar(np.int64, doc="index of the example in its split's stream"),
    })
    return tfds.core.DatasetInfo(
        builder=self, features=features, disable_shuffling=True,
        description="Procedural multi-image fine-grained QA whose answers need a zoom (imagent_jax).")

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    total = sum(self.builder_config.sizes.values())
    workers = self._num_workers
    if workers is None:
      workers = (os.cpu_count() or 1) if total >= _PARALLEL_MIN_EXAMPLES else 0
    with contextlib.ExitStack() as stack:
      if workers > 0:
        # spawn: the parent has TensorFlow's threads running, which fork does not survive well.
        self._pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
      try:
        super()._download_and_prepare(dl_manager, download_config)
      finally:
        self._pool = None

  def _split_generators(self, dl_manager) -> dict[str, Iterator]:
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split, size in self.builder_config.sizes.items() if size > 0}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    config = self.builder_config
    seed = split_seed(config.seed, split)
    tasks = ((seed, index, config.difficulty) for index in range(config.sizes[split]))
    if self._pool is not None:  # workers import only the generator, not tfds
      examples = self._pool.imap(synthetic.generate_png_example, tasks, chunksize=_CHUNK)
    else:
      examples = map(synthetic.generate_png_example, tasks)
    for index, example in enumerate(examples):
      yield index, _features(example)


def build_synthetic(data_dir: Union[str, os.PathLike], sizes: Sizes = None,
                    difficulty: Optional[synthetic.DifficultyConfig] = None, *, seed: int = 0,
                    num_workers: Optional[int] = None) -> SyntheticMifg:
  """The ``synthetic_mifg`` builder for these settings, built into ``data_dir`` unless it is there.

  Calling it again with the same settings only reads the dataset info (well under a second).
  Build on one host (or into per-host local folders); tfds writes to a temporary folder and
  renames it when done, so an interrupted build leaves nothing that looks finished.

  Args:
    data_dir: the tfds data folder (``<data_dir>/synthetic_mifg/<config>/1.0.0/``).
    sizes: ``{split: size}`` or ``(train, validation, test)``; None: 10000 / 500 / 500.
    difficulty: None: ``DifficultyConfig()``.
    seed: base seed.
    num_workers: generator processes; None: one per CPU (in-process for small builds).

  Returns:
    The prepared builder (``builder.as_data_source(split)``, ``TfdsSource(builder, split)``).
  """
  config = make_config(sizes, seed, difficulty)
  default = SyntheticMifg.BUILDER_CONFIGS[0]
  builder = SyntheticMifg(data_dir=os.fspath(data_dir), config=default.name if config.name == default.name else config,
                          num_workers=num_workers)
  if not builder.is_prepared():
    sizes_text = ", ".join(f"{k} {v}" for k, v in config.sizes.items())
    print(f"Generating the synthetic dataset once into {builder.data_dir} ({sizes_text}); tfds calls this "
          "'downloading and preparing', but nothing is downloaded.", flush=True)
    download_config = tfds.download.DownloadConfig(try_download_gcs=False,
                                                   compute_stats=tfds.download.ComputeStatsMode.SKIP)
    builder.download_and_prepare(file_format="array_record", download_config=download_config,
                                 download_dir=os.path.join(os.fspath(data_dir), "downloads"))
  return builder


class TfdsSource:
  """Random-access source over one split of an array_record tfds dataset with this schema.

  ``__getitem__`` returns the pipeline's example dict (``synthetic.EXAMPLE_KEYS``): images
  decoded with Pillow to RGB, text as ``str``, ``target_box`` as a list of ints (None when the
  dataset has none; ``target_image`` is then -1). Any builder with ``images`` (a Sequence of
  Image), ``question``, ``options`` and ``answer`` features works; ``category``,
  ``target_image``, ``target_box`` and ``index`` are optional. Records are read as raw bytes and
  parsed here (``tf_example.parse_example``), so reading never imports TensorFlow (~0.5 GB of
  resident memory and its thread pools); tfds' NumPy image decoding is bypassed.
  """

  def __init__(self, builder: Any, split: Optional[str] = None):
    """Opens a split.

    Args:
      builder: a prepared array_record builder; or a data source from
        ``builder.as_data_source(split)`` (then ``split`` is taken from it).
      split: a tfds split spec (``"train"``, ``"train[:10%]"``, ...); needed with a builder.
    """
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    if isinstance(builder, tfds.core.DatasetBuilder):
      if split is None:
        raise ValueError("TfdsSource(builder, split) needs a split")
      self._source = builder.as_data_source(split, deserialize_method=raw)
      info = builder.info
    elif hasattr(builder, "dataset_info") and hasattr(builder, "split"):
      info, split = builder.dataset_info, builder.split
      self._source = type(builder)(dataset_info=info, split=split, deserialize_method=raw)
    else:
      raise TypeError(f"TfdsSource needs a tfds builder or data source, got {type(builder).__name__}")
    self.name = f"{info.full_name}/{split}"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    try:
      features = tf_example.parse_example(self._source[index])
    except ValueError as e:
      raise ValueError(f"{self.name}[{index}]: the record is not a tf.train.Example: {e}") from e
    images = []
    for k, data in enumerate(features.get("images", [])):
      try:
        image = Image.open(io.BytesIO(data))
        image.load()
        images.append(images_lib.to_rgb(image))
      except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{self.name}[{index}]: image {k} cannot be decoded: {e}") from e
    box = features.get("target_box", [])
    number = features.get("index", []) or [index]
    options = [o.decode("utf-8") for o in features.get("options", [])]
    return {"id": f"{self.name}/{number[0]}", "images": images, "question": _text(features, "question"),
            "options": options or None, "answer": _text(features, "answer"), "category": _text(features, "category"),
            "target_image": int((features.get("target_image", []) or [-1])[0]),
            "target_box": [int(v) for v in box] if len(box) == 4 else None}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, {len(self)} examples)"


def _text(features: dict[str, list], key: str) -> str:
  values = features.get(key)
  return values[0].decode("utf-8") if values else ""
