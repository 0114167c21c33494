"""Multi-host for real: two processes on localhost (CPU collectives over gloo, four fake devices
each) train the smoke RL steps on one global 8-device mesh through the command line, and give
the losses and parameters of one process with eight devices; a two-process run killed with
SIGKILL after its first checkpoint resumes to the same result."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ARGS = ["--config", "imagent_jax/config/schema.py:smoke", "--config.stages=rl", "--config.data.source=synthetic",
         "--config.rl.steps=2", "--config.rl.checkpoint_every=1", "--config.rl.test_examples=0",
         "--config.rl.eval_every=0", "--config.rollout.max_new_tokens=256", "--config.rl.progress_bar=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, processes: int, devices_per_process: int):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
             JAX_PLATFORMS="cpu")
  port = _free_port()
  procs = []
  for pid in range(processes):
    extra = [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={pid}"]
    log = open(os.path.join(workdir, f"process{pid}.log"), "w")
    procs.append(subprocess.Popen([sys.executable, "-m", "imagent_jax.main", *_ARGS, "--workdir", str(workdir)]
                                  + (extra if processes > 1 else []), cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  return procs


def _wait(procs, workdir, timeout=600):
  for i, p in enumerate(procs):
    rc = p.wait(timeout=timeout)
    assert rc == 0, open(os.path.join(workdir, f"process{i}.log")).read()[-4000:]


def _rl_records(workdir):
  return [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if r["stage"] == "rl"]


def _params(workdir, step):
  """The parameters of a checkpoint, restored onto this process's first device."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  like = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                ocp.StandardCheckpointer().metadata(path).item_metadata)
  restored = ocp.StandardCheckpointer().restore(path, like)
  return {"/".join(map(str, k)): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored["params"])}


def test_two_processes_equal_one_and_resume_after_kill(tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir()
  two.mkdir()
  # One process with eight devices.
  _wait(_start(one, 1, 8), one)
  # Two processes of four devices each, the same global mesh: killed (SIGKILL) once step 1's
  # checkpoint is complete, then the same command again.
  procs = _start(two, 2, 4)
  deadline = time.time() + 600
  while not (two / "checkpoints" / "1").is_dir():
    assert time.time() < deadline, "no checkpoint 1 in time"
    assert all(p.poll() is None for p in procs), open(two / "process0.log").read()[-4000:]
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert not (two / "checkpoints" / "2").exists()
  first = _rl_records(two)
  _wait(_start(two, 2, 4), two)
  assert "Resumed from" in open(two / "process0.log").read()
  assert "Resumed from" not in open(two / "process1.log").read()  # process 0 speaks for the run

  a, b = _rl_records(one), first[:1] + [r for r in _rl_records(two) if r["step"] == 2]
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
  for ra, rb in zip(a, b):
    for key in ("train/pg_loss", "train/kl", "train/grad_norm", "reward", "response_tokens", "logprob_gap_max"):
      np.testing.assert_allclose(rb[key], ra[key], rtol=1e-4, atol=1e-6, err_msg=f"step {ra['step']}: {key}")
  pa, pb = _params(one, 2), _params(two, 2)
  assert pa.keys() == pb.keys() and len(pa) > 10
  for k in pa:
    np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-6, err_msg=k)
