"""A restart after a corrupt latest checkpoint resumes from the newest intact one and sets the
corrupt step aside (moved, not deleted); when none is intact, one clear error."""

import glob
import logging
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagent_jax.stages import build

# A failed orbax restore can leave a tensorstore callback that fires after orbax closed its event
# loop ("Event loop is closed", printed and ignored by Python): noise, not a failure of the test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _truncate(pattern):
  for f in _files(pattern):
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _zero(pattern):
  for f in _files(pattern):
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
      fh.write(b"\0" * size)


def _delete(pattern):
  for f in _files(pattern):
    os.remove(f)


def _files(pattern):
  files = [f for f in glob.glob(pattern) if os.path.isfile(f)]
  assert files, f"nothing to corrupt at {pattern}: has orbax's layout changed?"
  return files


# (name, corruption of a step folder, does the step still restore). The layout is orbax 0.12.8's:
# state/ holds the arrays in one OCDBT database (manifest.ocdbt, d/<data files>) and their
# _METADATA (JSON); meta/metadata is the JSON meta; _CHECKPOINT_METADATA is the step's own record.
CASES = [
    ("truncated array file", lambda d: _truncate(f"{d}/state/d/*"), False),
    ("zeroed array file", lambda d: _zero(f"{d}/state/d/*"), False),
    ("truncated array metadata JSON", lambda d: _truncate(f"{d}/state/_METADATA"), False),
    ("truncated meta JSON", lambda d: _truncate(f"{d}/meta/metadata"), False),
    ("zeroed meta JSON", lambda d: _zero(f"{d}/meta/metadata"), False),
    ("deleted OCDBT manifest", lambda d: _delete(f"{d}/state/manifest.ocdbt"), False),
    ("zeroed OCDBT manifest", lambda d: _zero(f"{d}/state/manifest.ocdbt"), False),
    ("deleted _METADATA", lambda d: _delete(f"{d}/state/_METADATA"), False),
    ("deleted meta JSON", lambda d: _delete(f"{d}/meta/metadata"), False),
    # Orbax needs neither to read the step back: its data are intact, so it is kept and restored.
    ("deleted _CHECKPOINT_METADATA", lambda d: _delete(f"{d}/_CHECKPOINT_METADATA"), True),
    ("truncated _CHECKPOINT_METADATA", lambda d: _truncate(f"{d}/_CHECKPOINT_METADATA"), True),
]


def _mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _state(value, mesh):
  w = jax.device_put(jnp.full((8, 4), value, jnp.float32), NamedSharding(mesh, PartitionSpec("data", "model")))
  b = jax.device_put(jnp.full((3,), value, jnp.float32), NamedSharding(mesh, PartitionSpec()))
  return {"params": {"w": w, "b": b}, "rng": np.arange(2, dtype=np.uint32) + int(value)}


def _manager(workdir):
  return build.checkpoint_manager(types.SimpleNamespace(rl=types.SimpleNamespace(keep_checkpoints=5)), str(workdir))


def _save_steps(workdir, mesh, steps=(1, 2)):
  manager = _manager(workdir)
  for step in steps:
    build.save_checkpoint(manager, step, _state(float(step), mesh), {"step": step, "data": {"position": 10 * step}})
  manager.wait_until_finished()
  manager.close()


def _check(restored, step):
  state, meta = restored
  assert meta == {"step": step, "data": {"position": 10 * step}}
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((8, 4), step, np.float32))
  np.testing.assert_array_equal(np.asarray(state["params"]["b"]), np.full((3,), step, np.float32))
  np.testing.assert_array_equal(np.asarray(state["rng"]), np.arange(2) + step)


@pytest.mark.parametrize("name,corrupt,intact", CASES, ids=[c[0] for c in CASES])
def test_a_corrupt_latest_step_falls_back_and_is_set_aside(tmp_path, caplog, name, corrupt, intact):
  mesh = _mesh()
  _save_steps(tmp_path, mesh)
  corrupt(str(tmp_path / "checkpoints" / "2"))
  manager = _manager(tmp_path)
  with caplog.at_level(logging.WARNING, logger="imagent_jax.stages.build"):
    restored = build.restore_checkpoint(manager, _state(0.0, mesh))
  if intact:
    _check(restored, 2)
    assert manager.all_steps() == [1, 2] and not (tmp_path / "checkpoints_corrupt").exists()
    return
  _check(restored, 1)
  assert not (tmp_path / "checkpoints" / "2").exists()
  assert (tmp_path / "checkpoints_corrupt" / "2").is_dir(), name  # set aside, not deleted
  assert manager.all_steps() == [1]  # the manager no longer lists it
  warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(warnings) == 1 and str(tmp_path / "checkpoints" / "2") in warnings[0]
  assert "\n" not in warnings[0] and "tensorstore_spec" not in warnings[0]
  # The run goes on: the next save and restart see step 1 then the new step, not the bad one.
  build.save_checkpoint(manager, 3, _state(3.0, mesh), {"step": 3, "data": {"position": 30}})
  manager.wait_until_finished()
  _check(build.restore_checkpoint(_manager(tmp_path), _state(0.0, mesh)), 3)


def test_a_step_set_aside_twice_keeps_both(tmp_path):
  mesh = _mesh()
  for steps in ((1, 2), (2,)):
    _save_steps(tmp_path, mesh, steps)
    _zero(str(tmp_path / "checkpoints" / "2" / "state" / "d" / "*"))
    _check(build.restore_checkpoint(_manager(tmp_path), _state(0.0, mesh)), 1)
  aside = sorted(os.listdir(tmp_path / "checkpoints_corrupt"))
  assert len(aside) == 2 and aside[0] == "2" and aside[1].startswith("2."), aside


def test_no_intact_step_is_one_clear_error_and_moves_nothing(tmp_path):
  mesh = _mesh()
  _save_steps(tmp_path, mesh)
  _delete(str(tmp_path / "checkpoints" / "2" / "state" / "_METADATA"))
  _truncate(str(tmp_path / "checkpoints" / "1" / "state" / "d" / "*"))
  with pytest.raises(RuntimeError) as info:
    build.restore_checkpoint(_manager(tmp_path), _state(0.0, mesh))
  message = str(info.value)
  assert str(tmp_path / "checkpoints") in message and "tried steps 2 (" in message and ", 1 (" in message
  assert "--workdir" in message and "removing" in message
  # A changed model config fails every step alike: nothing is moved until a person decides.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert not (tmp_path / "checkpoints_corrupt").exists()


def test_no_checkpoint_is_none(tmp_path):
  assert build.restore_checkpoint(_manager(tmp_path), _state(0.0, _mesh())) is None
  assert build.restore_params(str(tmp_path / "missing"), _state(0.0, _mesh())["params"]) is None


def test_restore_params_skips_a_corrupt_step_without_moving_it(tmp_path, caplog):
  mesh = _mesh()
  _save_steps(tmp_path, mesh)
  _zero(str(tmp_path / "checkpoints" / "2" / "state" / "d" / "*"))
  like = _state(0.0, mesh)["params"]
  with caplog.at_level(logging.WARNING, logger="imagent_jax.stages.build"):
    params, step = build.restore_params(str(tmp_path / "checkpoints"), like)
  assert step == 1
  np.testing.assert_array_equal(np.asarray(params["w"]), np.full((8, 4), 1, np.float32))
  assert any("does not restore" in r.getMessage() for r in caplog.records)
  assert (tmp_path / "checkpoints" / "2").is_dir() and not (tmp_path / "checkpoints_corrupt").exists()
  _truncate(str(tmp_path / "checkpoints" / "1" / "state" / "_METADATA"))
  with pytest.raises(RuntimeError, match="no checkpoint in .* restores"):
    build.restore_params(str(tmp_path / "checkpoints"), like)


def test_trainer_resumes_from_the_newest_intact_step(tmp_path):
  """Kill-resume: a run whose last checkpoint (step 2) is corrupt restarts at step 1, with step 1's
  parameters and data position."""
  from test_trainer import _config, _flat  # noqa: PLC0415 - its config and reward registration

  from imagent_jax.stages.rl import build_trainer
  trainer = build_trainer(_config(), str(tmp_path))
  trainer.step = 1
  trainer.save()
  at_one, data_at_one = _flat(trainer.params), trainer._data_state
  trainer._take_batch()  # the data moves on
  trainer.params = jax.tree_util.tree_map(lambda x: x + 1, trainer.params)
  trainer.step = 2
  trainer.save()
  build.wait_for_checkpoints(trainer.checkpoints)
  assert trainer._data_state != data_at_one
  del trainer
  _truncate(str(tmp_path / "checkpoints" / "2" / "state" / "d" / "*"))
  resumed = build_trainer(_config(), str(tmp_path))
  assert resumed.step == 1
  np.testing.assert_array_equal(_flat(resumed.params), at_one)
  assert resumed._data_state == data_at_one
  assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()
