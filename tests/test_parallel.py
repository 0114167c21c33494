"""Sharding on 8 fake CPU devices: a sharded forward equals the unsharded one, and shards are real."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from imagent_jax import parallel
from imagent_jax.models import get_preset
from imagent_jax.models import qwen2_5_vl as qvl


def test_eight_fake_devices():
  assert jax.device_count() == 8, "tests/conftest.py must set --xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("axes,expect", [
    ({"fsdp": -1}, {"data": 1, "fsdp": 8, "tensor": 1}),
    ({"data": 2, "fsdp": -1, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
    ({"data": 1, "fsdp": 4, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}),
])
def test_mesh_shape_fills_the_devices(axes, expect):
  assert parallel.mesh_shape(axes, 8) == expect
  mesh = parallel.make_mesh(axes)
  assert dict(mesh.shape) == expect


@pytest.mark.parametrize("axes,msg", [
    ({"data": 3, "fsdp": -1}, "does not fit 8 devices"),
    ({"data": 4, "fsdp": 4}, "needs 16 devices"),
    ({"fsdp": -1, "tensor": -1}, "at most one mesh axis may be -1"),
    ({"pipeline": 2}, "unknown mesh axes"),
    ({"fsdp": 0}, "positive or -1"),
])
def test_mesh_that_does_not_fit_is_a_clear_error(axes, msg):
  with pytest.raises(ValueError, match=msg):
    parallel.make_mesh(axes)


def test_indivisible_dimensions_fall_back_to_replication():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  # 6 is not divisible by the 4-way fsdp axis; 10 is by the 2-way tensor axis.
  assert parallel.logical_to_mesh_spec(PartitionSpec("embed", "mlp"), (6, 10), mesh) == PartitionSpec(None, "tensor")
  # The same mesh axis is never used twice in one spec.
  rules = (("a", "fsdp"), ("b", "fsdp"))
  assert parallel.logical_to_mesh_spec(PartitionSpec("a", "b"), (8, 8), mesh, rules) == PartitionSpec("fsdp", None)


def test_sharded_forward_equals_unsharded():
  config = get_preset("tiny")
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  sharded = parallel.init_sharded_params(config, jax.random.key(1), mesh)
  plain = qvl.init_params(config, jax.random.key(1))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, plain)

  # The large parameters really are split: each device holds a fraction of them.
  big = {"q_proj": sharded["layers_0"]["self_attn"]["q_proj"]["kernel"],
         "gate_proj": sharded["layers_1"]["mlp"]["gate_proj"]["kernel"],
         "embedding": sharded["embed_tokens"]["embedding"],
         "lm_head": sharded["lm_head"]["kernel"],
         "vision_qkv": sharded["visual"]["blocks_0"]["attn"]["qkv"]["kernel"]}
  for name, x in big.items():
    shard = x.addressable_shards[0].data
    assert shard.size * 8 == x.size, f"{name}: shard {shard.shape} of {x.shape} is not 1/8 of it"
  specs = jax.tree_util.tree_map(lambda x: x.sharding.spec, sharded)
  assert specs["layers_0"]["self_attn"]["q_proj"]["kernel"] == PartitionSpec("fsdp", "tensor")
  assert specs["layers_0"]["self_attn"]["o_proj"]["kernel"] == PartitionSpec("tensor", "fsdp")

  rng = np.random.RandomState(0)
  m = config.vision.spatial_merge_size
  grid = np.array([[1, 4 * m, 2 * m]], np.int32)
  pixels = rng.randn(int(grid.prod()), config.vision.patch_dim).astype(np.float32)
  n_img = int(grid.prod()) // 4
  row = [5, 6, config.vision_start_token_id] + [config.image_token_id] * n_img + [config.vision_end_token_id, 7]
  short = row[:2] + row[2:]  # same image, one text token fewer, left padded
  short = short[1:]
  ids = np.array([row, [config.pad_token_id] + short] * 4, np.int32)  # batch 8
  mask = np.array([[1] * len(row), [0] + [1] * len(short)] * 4, np.int32)
  pv = np.concatenate([pixels] * 8)
  grids = np.repeat(grid, 8, axis=0)
  model = qvl.Qwen25VL(config)
  fwd = lambda p, i, a, x, g: model.apply({"params": p}, input_ids=i, attention_mask=a, pixel_values=x,
                                          image_grid_thw=g)
  ref = jax.jit(fwd)(plain, ids, mask, pv, grids)

  batch = parallel.data_sharding(mesh, 2)
  ids_s, mask_s = jax.device_put(ids, batch), jax.device_put(mask, batch)
  out = jax.jit(fwd, out_shardings=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))(
      sharded, ids_s, mask_s, pv, grids)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=1e-4)
  # A placeholder/feature mismatch inside a sharded program must neither hang nor abort the
  # process (raising in one device's callback would): the logits come back NaN instead.
  bad = ids.copy()
  bad[1, np.flatnonzero(bad[1] == config.image_token_id)[0]] = 7
  out = jax.jit(fwd)(sharded, jax.device_put(bad, batch), mask_s, pv, grids)
  assert np.isnan(np.asarray(out)).all()


def test_a_second_init_of_equal_settings_compiles_nothing(caplog):
  config = get_preset("micro")
  layout = {"data": 1, "fsdp": 4, "tensor": 2}
  first = parallel.init_sharded_params(config, jax.random.key(0), parallel.make_mesh(layout))
  key = jax.random.key(1)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    second = parallel.init_sharded_params(config, key, parallel.make_mesh(layout))  # an equal mesh
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()], [r.getMessage() for r in caplog.records]
  q = lambda p: np.asarray(p["layers_0"]["self_attn"]["q_proj"]["kernel"])
  assert q(first).shape == q(second).shape and not np.array_equal(q(first), q(second))  # drawn from its own key
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    parallel.init_sharded_params(config, key, parallel.make_mesh(layout), param_dtype=jax.numpy.bfloat16)
  assert [r for r in caplog.records if "Compiling" in r.getMessage()]  # the check sees a compile when there is one


def test_cached_by_settings_shares_equal_hashable_settings_only():
  calls = []

  @parallel.cached_by_settings
  def build(a, b):
    calls.append((a, b))
    if a == "bad":
      raise ValueError("bad settings")
    return object()

  assert build(1, (2, 3)) is build(1, (2, 3)) and len(calls) == 1
  assert build(1, (2, 4)) is not build(1, (2, 3)) and len(calls) == 2
  assert build(1, [2, 3]) is not build(1, [2, 3]) and len(calls) == 4  # unhashable: built each time
  with pytest.raises(ValueError, match="bad settings"):
    build("bad", [1])
  assert calls[-1] == ("bad", [1]) and len(calls) == 5  # an error inside the build runs it once


def test_initialize_distributed_only_when_several_processes_are_expected(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for key in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(key, raising=False)
  parallel.initialize_distributed()  # a laptop: nothing
  monkeypatch.setenv("SLURM_NTASKS", "1")
  parallel.initialize_distributed()  # one SLURM task: nothing
  assert calls == []
  monkeypatch.setenv("SLURM_NTASKS", "4")
  parallel.initialize_distributed()
  parallel.initialize_distributed(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None),
                   dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)]
