"""The grain input pipeline: deterministic, sharded, checkpointable batches of example dicts.

``make_iterator(source, batch_size=..., seed=...)`` reads any random-access source of example
dicts (``synthetic.EXAMPLE_KEYS``: ``id``, ``images`` as RGB PIL images, ``question``,
``options``, ``answer``, ``category``, ``target_image``, ``target_box``):

* ``data.tfds.TfdsSource`` over an array_record tfds split (e.g. ``build_synthetic``), or a raw
  ``builder.as_data_source(split)`` (wrapped in a ``TfdsSource`` here);
* ``data.jsonl.JsonlSource`` over JSONL files;
* ``synthetic.SyntheticSource`` (examples drawn on the fly; no files).

Order. The rows are shuffled with ``seed`` and every epoch gets a new permutation (grain's
per-epoch index shuffle: the epoch number is folded into the seed). Host ``shard_index`` of
``shard_count`` takes the positions ``shard_index::shard_count`` of that one global order and
reads only those examples, so its ``k``-th batch holds examples ``k*B + shard_index + j*shard_count``
(``B = batch_size * shard_count``): the hosts' batches together are exactly the global batch a
single host with batch size ``B`` reads (multi-host training equals one process). Examples are
decoded in ``num_threads`` threads but come out in index order, so the batches depend only on
(source, seed, shards). A batch is a list of ``batch_size`` example dicts (the images differ in
number and size).

Checkpoints. The iterator is a ``grain.DatasetIterator``: ``get_state()`` is a small JSON-able
dict and ``set_state(state)`` puts a freshly made iterator (same arguments) exactly where the
saved one was; the following batches equal the uninterrupted run's. The state also records the
pipeline's settings, and ``set_state`` refuses a state saved under other ones (another seed,
shard layout or source length), which would silently repeat or skip data. For orbax, either
``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)`` in a
``CompositeCheckpointHandler`` (one JSON file per process), or ``json.dumps(iterator.get_state())``
stored with the other items (``ocp.args.JsonSave``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import grain

_log = logging.getLogger(__name__)

Batch = list  # list[dict[str, Any]]: example dicts


def as_source(source: Any) -> Sequence:
  """``source`` as a random-access source of example dicts.

  Args:
    source: an object with ``__len__`` and ``__getitem__`` returning example dicts (or None to
      skip one), or a tfds array_record data source (``builder.as_data_source(split)``).

  Returns:
    The source (tfds data sources wrapped in ``data.tfds.TfdsSource``).

  Raises:
    TypeError: not a random-access source.
  """
  if hasattr(source, "dataset_info") and hasattr(source, "split") and not hasattr(source, "name"):
    from imagent_jax.data import tfds as data_tfds  # pylint: disable=g-import-not-at-top
    return data_tfds.TfdsSource(source)
  if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
    raise TypeError(f"a source needs __len__ and __getitem__, got {type(source).__name__}")
  return source


def _source_name(source: Any) -> str:
  return str(getattr(source, "name", type(source).__name__))


class ExampleIterator(grain.DatasetIterator):
  """The pipeline's iterator: batches (lists of example dicts), with a guarded checkpoint state.

  ``get_state()`` -> ``{"pipeline": settings, "iterator": grain's state}``; ``set_state``
  checks the settings first (the source's name only warns: a moved data folder is fine).
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent: grain.DatasetIterator, settings: dict[str, Any]):
    super().__init__(parent)
    self._settings = settings

  def __next__(self) -> Batch:
    self._assert_not_closed()
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"pipeline": dict(self._settings), "iterator": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "pipeline" not in state or "iterator" not in state:
      raise ValueError("not a state of imagent_jax.data.pipeline.ExampleIterator (expected keys 'pipeline' and "
                       f"'iterator', got {sorted(state) if isinstance(state, dict) else type(state).__name__})")
    saved = state["pipeline"]
    differ = [k for k in self._settings if k != "source" and saved.get(k) != self._settings[k]]
    if differ:
      details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {self._settings[k]!r}" for k in differ)
      raise ValueError(f"the data iterator state was saved by a different pipeline ({details}); restoring it "
                       "would repeat or skip examples. Use the saved settings, or start the data afresh.")
    if saved.get("source") != self._settings["source"]:
      _log.warning("restoring a data iterator saved on source %r onto %r (same length)", saved.get("source"),
                   self._settings["source"])
    self._parent.set_state(state["iterator"])

  def __str__(self) -> str:
    return f"ExampleIterator({self._settings})"


def make_iterator(source: Any, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: Optional[int] = None, shard_index: int = 0, shard_count: int = 1,
                  drop_remainder: bool = False, num_threads: int = 2,
                  prefetch_buffer_size: Optional[int] = None) -> ExampleIterator:
  """A checkpointable iterator of batches of example dicts over ``source``.

  Args:
    source: a random-access source of example dicts (see ``as_source``).
    batch_size: examples per batch (per host).
    seed: shuffle seed, in ``[0, 2**32)``.
    shuffle: shuffle (a new permutation each epoch); False: index order.
    num_epochs: passes over this host's rows; None: forever (batches run across epoch ends).
    shard_index: this host's shard (``jax.process_index()``).
    shard_count: number of shards (``jax.process_count()``); shard ``i`` reads positions
      ``i, i + shard_count, ...`` of the shuffled global order (see the module docstring). With
      finite epochs hosts may see different numbers of batches; train on a step count instead.
    drop_remainder: drop a last, smaller batch (finite epochs only).
    num_threads: threads decoding examples (0: decode in the calling thread).
    prefetch_buffer_size: examples decoded ahead; default ``2 * batch_size`` (decoded images
      are large: keep it small).

  Returns:
    An ``ExampleIterator`` (``next`` -> list of example dicts; ``get_state`` / ``set_state``;
    ``close`` stops its threads).

  Raises:
    ValueError: bad arguments, an empty source or an empty shard.
  """
  source = as_source(source)
  length = len(source)
  problems = []
  if batch_size < 1:
    problems.append(f"batch_size must be >= 1, got {batch_size}")
  if not 0 <= seed < 2 ** 32:
    problems.append(f"seed must lie in [0, 2**32), got {seed}")
  if not 0 <= shard_index < shard_count:
    problems.append(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
  elif length < shard_count:
    problems.append(f"the source has {length} examples, too few for {shard_count} shards")
  if num_epochs is not None and num_epochs < 1:
    problems.append(f"num_epochs must be >= 1 or None (forever), got {num_epochs}")
  if num_threads < 0:
    problems.append(f"num_threads must be >= 0, got {num_threads}")
  if problems:
    raise ValueError("make_iterator: " + "; ".join(problems))
  settings = {"source": _source_name(source), "length": length, "seed": int(seed), "shuffle": bool(shuffle),
              "num_epochs": num_epochs, "shard_index": int(shard_index), "shard_count": int(shard_count)}
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)  # the shuffle below it sees epoch-folded indices: a new order each epoch
  if shard_count > 1:
    ds = ds[shard_index::shard_count]  # positions of the one global order: hosts' batches tile the global one
  buffer = prefetch_buffer_size if prefetch_buffer_size is not None else 2 * batch_size
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, buffer))
  # Sources return None for records found bad under on_error="skip"; allow_nones=False drops them.
  it_ds = ds.to_iter_dataset(read_options, allow_nones=False)
  it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)
  return ExampleIterator(iter(it_ds), settings)
