"""Device mesh, logical-axis sharding rules and sharded parameter creation.

Parameters carry logical axis names (``embed``, ``heads``, ``mlp``, ``vocab`` …, see
``imagent_jax.models.layers``). A rule table maps each logical axis onto mesh axes
(``data``, ``fsdp``, ``tensor``); ``param_shardings`` turns the two into ``NamedSharding``s and
``init_sharded_params`` creates the parameters directly in their shards with
``jax.jit(init, out_shardings=...)`` (what ``pjit`` became), never whole on one device.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). First match wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed_act", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("patch", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merge", "fsdp"),
    ("vision_merge_hidden", "tensor"),
)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one ``-1`` entry to fill the devices; raises a clear error when the mesh does not fit.

  Args:
    axes: sizes by mesh axis name, e.g. ``{'data': 1, 'fsdp': -1, 'tensor': 2}``.
    num_devices: devices available.
  """
  unknown = set(axes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {fill}")
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"mesh {sizes} does not fit {num_devices} devices: {num_devices} is not a multiple of "
                       f"the fixed axes' product {fixed}")
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available; "
                     "set one axis to -1 to fill the rest")
  return sizes


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``Mesh`` with axes ``('data', 'fsdp', 'tensor')``; default: all devices on ``fsdp``."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(axes or {"fsdp": -1}, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    dev = mesh_utils.create_device_mesh(shape, devices)  # topology-aware on TPU/GPU
  except Exception:  # noqa: BLE001 - fall back to a plain reshape (CPU, odd shapes)
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES)


def logical_to_mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh, rules=None) -> PartitionSpec:
  """Maps a logical ``PartitionSpec`` onto mesh axes for an array of ``shape``.

  A dimension keeps a mesh axis only if the axis divides it and no earlier dimension took that
  axis; otherwise it is replicated (a 7B model's 4 kv heads on an 8-way tensor axis, for one).
  """
  table = dict(DEFAULT_RULES if rules is None else rules)
  used: set[str] = set()
  out = []
  for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    keep = []
    for a in axes:
      n = mesh.shape[a]
      if a in used or n == 1:
        continue
      if size % (math.prod(mesh.shape[k] for k in keep) * n) == 0:
        keep.append(a)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return PartitionSpec(*out)


def param_shardings(config, mesh: Mesh, rules=None):
  """``NamedSharding`` pytree (the params' structure) for a model ``config`` on ``mesh``."""
  from imagent_jax.models.registry import family_of  # local: parallel.py imports no model at import time

  family = family_of(config)
  logical = family.logical_axes(config)
  shapes = family.abstract_params(config)
  return jax.tree_util.tree_map(
      lambda spec, s: NamedSharding(mesh, logical_to_mesh_spec(spec, s.shape, mesh, rules)), logical, shapes,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def cached_by_settings(build):
  """``build`` memoised on its arguments when all of them are hashable: calls with equal settings
  (model config, mesh, rules, ...) share one result, e.g. one jitted program, so a second model or
  trainer of the same settings in a process compiles nothing again. A call with an unhashable
  argument (a list of rules, a dict of jit options) gets a fresh result."""
  cached = functools.lru_cache(maxsize=8)(build)

  @functools.wraps(build)
  def get(*args):
    try:
      hash(args)
    except TypeError:
      return build(*args)
    return cached(*args)

  return get


def init_sharded_params(config, rng, mesh: Mesh, rules=None, param_dtype=None):
  """Random parameters created directly in their shards (``jax.jit(init, out_shardings=...)``).

  The jitted init is shared by calls with equal ``config``, ``mesh``, ``rules`` and
  ``param_dtype`` (``cached_by_settings``).
  """
  return _sharded_init(config, mesh, rules, param_dtype)(rng)


@cached_by_settings
def _sharded_init(config, mesh: Mesh, rules, param_dtype):
  import jax.numpy as jnp
  import flax.linen as nn
  from imagent_jax.models.registry import family_of

  shardings = param_shardings(config, mesh, rules)
  family = family_of(config)
  init = lambda r: nn.unbox(family.boxed_init(config, r, param_dtype or jnp.float32))
  return jax.jit(init, out_shardings=shardings)


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch-major array: dimension 0 over ``('data', 'fsdp')``, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def optimizer_state_shardings(optimizer, config, mesh: Mesh, rules=None):
  """``NamedSharding`` pytree of ``optimizer.init(params)`` for a model ``config``: every subtree
  shaped like the params (Adam moments, ...) sharded like them, every other leaf replicated."""
  from imagent_jax.models.registry import family_of

  p_shard = param_shardings(config, mesh, rules)
  abstract = jax.eval_shape(optimizer.init, family_of(config).abstract_params(config))
  params_def = jax.tree_util.tree_structure(p_shard)
  replicated = NamedSharding(mesh, PartitionSpec())
  like_params = lambda x: jax.tree_util.tree_structure(x) == params_def
  return jax.tree_util.tree_map(lambda x: p_shard if like_params(x) else replicated, abstract, is_leaf=like_params)


def batch_shardings(batch, mesh: Mesh, replicated_keys=("pixel_values", "image_grid_thw"), row_axis: int = 0):
  """Per-field ``NamedSharding`` of a dict batch of row-major arrays.

  Rows (axis ``row_axis``: 0, or 1 for micro-batches stacked on a leading axis) go over
  ``('data', 'fsdp')`` when the row count (of the first field not in ``replicated_keys``) divides
  that product; otherwise, and for ``replicated_keys`` (the packed images, whose axis there is
  patches, not rows), the field is replicated. ``None`` fields are left out.
  """
  rows = next(int(np.shape(v)[row_axis]) for k, v in batch.items() if v is not None and k not in replicated_keys)
  split = rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
  out = {}
  for k, v in batch.items():
    if v is None:
      continue
    spec = [None] * np.ndim(v)
    if k not in replicated_keys and split:
      spec[row_axis] = ("data", "fsdp")
    out[k] = NamedSharding(mesh, PartitionSpec(*spec))
  return out


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Multi-host start-up: ``jax.distributed.initialize`` when more than one process is expected.

  Explicit arguments win; else ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` from the environment; else JAX's own discovery on TPU pods
  (``TPU_WORKER_HOSTNAMES``) and SLURM jobs of several tasks. A single-process run (a laptop,
  one GPU box) does nothing. CPU processes exchange collectives over gloo (set here, before any
  backend starts; it does not touch GPU or TPU backends).

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator.
    num_processes: processes in the job.
    process_id: this process's index.
  """
  import os
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES", "").isdigit():
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID", "").isdigit():
    process_id = int(env["JAX_PROCESS_ID"])
  if coordinator_address is None and num_processes in (None, 1):
    multi_slurm = env.get("SLURM_NTASKS", "1").isdigit() and int(env.get("SLURM_NTASKS", "1")) > 1
    if not (multi_slurm or "TPU_WORKER_HOSTNAMES" in env):
      return
  if num_processes == 1:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def is_primary() -> bool:
  """True on the process that writes the run's files (metrics, report, TensorBoard): process 0."""
  return jax.process_index() == 0


def local_mesh(mesh: Mesh) -> Mesh:
  """The mesh of this process's own devices, with ``mesh``'s axis names and tensor size.

  With one process this is ``mesh``. With several, every process's devices form a mesh of their
  own (``data = 1``, ``fsdp`` = local devices / ``tensor``): the rollout runs on it, on this
  process's rows, with its tools on this host (``local_params``), so no collective crosses
  hosts while decoding.
  """
  if jax.process_count() == 1:
    return mesh
  devices = _process_major_devices(mesh)[jax.process_index()]
  return Mesh(devices.reshape((1,) + devices.shape), MESH_AXES)


def _process_major_devices(mesh: Mesh) -> np.ndarray:
  """``[processes, local / tensor, tensor]`` devices of ``mesh``, grouped by process."""
  tensor = mesh.shape["tensor"]
  per_process = jax.local_device_count()
  if per_process % tensor:
    raise ValueError(f"mesh.tensor={tensor} does not divide the {per_process} devices of a process: tensor "
                     "parallelism must stay within a host")
  devices = sorted(mesh.devices.reshape(-1), key=lambda d: (d.process_index, d.id))
  return np.asarray(devices, dtype=object).reshape(jax.process_count(), per_process // tensor, tensor)


def local_params(params, config, mesh: Mesh, rules=None):
  """``params`` (sharded over the whole ``mesh``) as a full copy on this process's devices.

  One collective (an all-gather across hosts, compiled once) lays the parameters out sharded over
  each process's own devices and replicated across processes; this process's shards then form
  arrays on ``local_mesh(mesh)`` without another copy. With one process, ``params`` itself.

  Args:
    params: the parameter pytree, laid out by ``param_shardings(config, mesh, rules)``.
    config: the model config (its logical axes).
    mesh: the global mesh.
    rules: logical-axis rules.

  Returns:
    The parameter pytree on ``local_mesh(mesh)``, sharded by the same rules.
  """
  if jax.process_count() == 1:
    return params
  replicated = _replica_reshard(config, mesh, rules)(params)
  local = param_shardings(config, local_mesh(mesh), rules)

  def wrap(x, sharding):
    by_device = {s.device: s.data for s in x.addressable_shards}
    shards = [by_device[d] for d in sharding.mesh.devices.flat]  # the local mesh's order
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)

  return jax.tree_util.tree_map(wrap, replicated, local)


@cached_by_settings
def _replica_reshard(config, mesh: Mesh, rules):
  replica = Mesh(_process_major_devices(mesh), MESH_AXES)  # 'data' = processes: params never use it
  return jax.jit(lambda p: p, out_shardings=param_shardings(config, replica, rules))


def allgather(tree):
  """Host arrays of every process, stacked: each leaf ``[...]`` becomes ``[processes, ...]``
  (numpy). Every process must call it with leaves of equal shapes and dtypes."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], tree)
  from jax.experimental import multihost_utils
  return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=False))


def allgather_json(obj) -> list:
  """``[obj of process 0, obj of process 1, ...]`` for any JSON-able ``obj`` (shapes may differ)."""
  import json
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = allgather(np.int64(len(data)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(allgather(padded), sizes)]


def to_global(tree, mesh: Mesh):
  """Host arrays (equal on every process) as arrays replicated over ``mesh``, for a jitted
  function whose other arguments live on it; with one process, ``tree`` unchanged."""
  if jax.process_count() == 1:
    return tree
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(lambda x: None if x is None else jax.device_put(np.asarray(x), replicated), tree)


def sharded_state_step(fn, mesh: Mesh, param_sharding, opt_sharding, jit_kwargs=None, row_axis: int = 0):
  """``fn(params, opt_state, batch[, frozen]) -> (params, opt_state, metrics)`` jitted on ``mesh``.

  Params and optimizer state keep ``param_sharding`` / ``opt_sharding`` in and out and are
  donated; batch fields are laid out by ``batch_shardings`` (rows on axis ``row_axis``); metrics come back replicated. An
  optional fourth argument (a frozen copy of the params, e.g. a KL reference) is sharded like the
  params and not donated. One compiled program per batch layout, cached. The returned step carries
  ``param_shardings`` and ``opt_state_shardings`` (to ``jax.device_put`` or initialise a state onto).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  compiled = {}

  def step(params, opt_state, batch, frozen=None):
    batch = {k: v for k, v in batch.items() if v is not None}
    b_shard = batch_shardings(batch, mesh, row_axis=row_axis)
    extra = () if frozen is None else (frozen,)
    key = (tuple(sorted((k, s.spec) for k, s in b_shard.items())), bool(extra))
    if key not in compiled:
      compiled[key] = jax.jit(fn, in_shardings=(param_sharding, opt_sharding, b_shard) + (param_sharding,) * len(extra),
                              out_shardings=(param_sharding, opt_sharding, replicated), donate_argnums=(0, 1),
                              **dict(jit_kwargs or {}))
    return compiled[key](params, opt_state, jax.device_put(batch, b_shard), *extra)  # a no-op for arrays laid out so

  step.param_shardings, step.opt_state_shardings = param_sharding, opt_sharding
  return step


def to_host(x) -> np.ndarray:
  """A jitted function's output as one numpy array on every process (its shards may live on other
  hosts' devices); with one process, ``np.asarray(x)``."""
  if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
