"""The main job as a user runs it: a subprocess on the smoke config, and config errors at start."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", "imagent_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_smoke_config_end_to_end(tmp_path):
  res = _main("--config", "configs/smoke.py", "--workdir", str(tmp_path))
  assert res.returncode == 0, res.stderr[-3000:]
  for stage in ("model", "warmup", "rollout", "rl"):
    assert f"=== stage {stage} done" in res.stdout
  assert "reloaded max |logit diff| = 0.00e+00" in res.stdout
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert records[0]["stage"] == "model" and records[0]["params"] > 0 and records[0]["images"] == 3
  report = (tmp_path / "report.md").read_text()
  assert "| total |" in report and "vision_windows.png" in report
  assert (tmp_path / "vision_windows.png").stat().st_size > 1000
  assert (tmp_path / "hf_export" / "model.safetensors").exists()
  assert json.loads((tmp_path / "config.json").read_text())["model"]["preset"] == "micro"
  # The rollout stage: readable trajectories, tool views saved as PNGs, its metrics logged.
  assert "scripted demo policy) status=answered" in res.stdout and "-> tool confirm: ok" in res.stdout
  assert any(p.name.startswith("traj0_view") for p in (tmp_path / "rollout").iterdir())
  warm = [r for r in records if r["stage"] == "warmup"]
  assert warm and all(np.isfinite(r["loss"]) for r in warm)
  assert (tmp_path / "base" / "model.safetensors").exists() and (tmp_path / "base" / "tokenizer.json").exists()
  assert "## Warmup" in report
  rollout = [r for r in records if r["stage"] == "rollout"][0]
  assert rollout["stage"] == "rollout" and rollout["calls_ok/confirm"] >= 1 and "mask/kept_fraction" in rollout
  assert "## Agent rollout" in report
  # The rl stage: GRPO steps from the warmup base, logged, checkpointed, plotted.
  rl_rows = [r for r in records if r["stage"] == "rl"]
  assert [r["step"] for r in rl_rows] == [1, 2]
  for key in ("reward", "accuracy", "tool_calls_per_trajectory", "mask/kept_fraction", "logprob_gap_max",
              "train/grad_norm", "time/rollout_s", "time/update_s", "time/compile_s"):
    assert key in rl_rows[-1], key
  assert rl_rows[0]["time/compile_s"] > 0  # the first step compiles its programs
  assert rl_rows[-1]["logprob_gap_max"] < 1e-3  # rollout and training see the same tokens and positions
  assert [r["step"] for r in records if r["stage"] == "eval"] == [0, 2]
  assert [r["step"] for r in records if r["stage"] == "test"] == [0, 2]  # base and result on the test split
  assert "test split, greedy (2 questions)" in res.stdout and "after RL (step 2)" in res.stdout
  assert "training batches (sampled), mean of steps 1-2" in report
  assert (tmp_path / "checkpoints" / "2").is_dir()
  assert "## RL (GRPO)" in report and (tmp_path / "rl_curves.png").stat().st_size > 1000


@pytest.mark.parametrize("override,message", [
    ("--config.mesh.tensor=3", "config.mesh: mesh"),
    ("--config.stages=model,fly", "unknown stages ['fly']"),
    ("--config.model.dtype=float8", "config.model.dtype='float8'"),
    ("--config.model.checkpoint=/nonexistent", "is not a folder with a config.json"),
    ("--config.tools.names=zoom", "config.tools: unknown tool(s) ['zoom']"),
    ("--config.reward.fallback=guess", "config.reward: unknown answer fallback 'guess'"),
    ("--config.data.source=web", "config.data.source='web' is not one of"),
    ("--config.tools.view_max_pixels=1000000", "exceeds config.processor.max_pixels"),
    ("--config.rl.batch_size=9", "cannot hold rl.batch_size=9 questions"),
])
def test_invalid_config_fails_before_compiling(tmp_path, override, message):
  res = _main("--config", "configs/smoke.py", "--workdir", str(tmp_path), override, timeout=120)
  assert res.returncode == 2, res.stderr[-2000:]
  assert message in res.stderr
  assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_config_key_is_refused(tmp_path):
  for config in (["--config", "configs/smoke.py"], []):  # the embedded default reads its overrides at import
    res = _main(*config, "--workdir", str(tmp_path), "--config.model.presett=tiny", timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        'error: invalid config: no such key: config.model.presett (Did you mean "preset" instead of "presett"?)']


def test_stages_come_from_the_registry():
  from imagent_jax import stages
  assert stages.STAGES.names() == ("model", "warmup", "rollout", "rl", "eval", "analyze")
  assert stages.configured(" model, rl,,") == ["model", "rl"]
  from imagent_jax.stages import rollout_demo
  assert stages.run_function("rollout") is rollout_demo.run
  with pytest.raises(KeyError, match="unknown stage 'fly'"):
    stages.run_function("fly")


@pytest.mark.parametrize("name,arg", [("synthetic_tiny", None), ("smoke", None), ("qwen2_5_vl", "3b"),
                                      ("qwen2_5_vl", "7b"), ("eval", None), ("eval", "7b")])
def test_every_config_file_is_valid(tmp_path, name, arg):
  import importlib.util

  from imagent_jax.config import validate
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()  # as ml_collections calls it for name.py[:arg]
  if arg:  # a released size: the checkpoint, the data and the benchmarks are the user's
    assert config.model.preset == f"qwen2_5_vl_{arg}" and config.model.dtype == "bfloat16"
    with pytest.raises(ValueError, match="needs config.model.tokenizer"):
      validate.validate(config)
    (tmp_path / "config.json").write_text("{}")
    config.model.checkpoint = str(tmp_path)
    if name == "eval":
      assert config.stages == "eval"
      with pytest.raises(ValueError, match="config.eval.benchmarks is empty"):
        validate.validate(config, num_devices=8)
      config.eval.benchmarks = f"vstar={tmp_path}"
    else:
      with pytest.raises(ValueError, match="needs config.data.train_path, config.data.validation_path"):
        validate.validate(config, num_devices=8)
      (tmp_path / "data.jsonl").write_text("")
      config.data.train_path = config.data.validation_path = str(tmp_path / "data.jsonl")
  validate.validate(config, num_devices=8)
