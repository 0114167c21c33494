"""The RL trainer: kill-and-resume equals an uninterrupted run; SIGTERM checkpoints and stops."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from imagent_jax.config import schema
from imagent_jax.rl import masks, rewards
from imagent_jax.rl.trainer import Trainer
from imagent_jax.stages.rl import build_trainer

# An untrained policy never answers right, so every group would have zero reward variance and no
# gradient. This test reward (characters written) varies within groups: the update really runs.
if "test_response_length" not in rewards.REWARDS:
  rewards.register_reward("test_response_length")(
      lambda batch: {"total": np.array([sum(map(len, turns)) / 100 for turns in batch.turns], np.float32)})


def _config(steps=3):
  c = schema.get_config("smoke")
  with c.unlocked():
    c.data.source = "synthetic"  # drawn on the fly: no tfds build in this test
    c.rollout.max_new_tokens = 40
    c.rollout.max_prompt_len = 512
    c.rl.steps = steps
    c.rl.warmup_steps = 1
    c.rl.eval_every = 0
    c.rl.checkpoint_every = 0
    c.rl.logprob_gap_every = 0
    c.rl.progress_bar = False
    c.rl.learning_rate = 1e-2  # large, so that every step visibly moves the parameters
    c.reward.name = "test_response_length"
  return c


def _flat(params):
  return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(params)])


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
  full = build_trainer(_config(), str(tmp_path / "full"))
  start = _flat(full.params)
  full.train()
  assert full.step == 3
  assert not np.allclose(_flat(full.params), start)  # training moved the params

  part = build_trainer(_config(), str(tmp_path / "resumed"))
  part.train(until_step=2)  # "killed" after step 2: a checkpoint is written on the way out
  assert part.step == 2
  assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "2")
  del part
  resumed = build_trainer(_config(), str(tmp_path / "resumed"))
  assert resumed.step == 2  # restored: params, optimiser, RNG and data position
  resumed.train()
  np.testing.assert_allclose(_flat(resumed.params), _flat(full.params), rtol=1e-5, atol=1e-6)

  def rows(workdir):
    return [json.loads(l) for l in open(workdir / "metrics.jsonl") if '"stage": "rl"' in l]

  a, b = rows(tmp_path / "full"), rows(tmp_path / "resumed")
  assert [r["step"] for r in a] == [1, 2, 3] and [r["step"] for r in b] == [1, 2, 3]
  for key in ("reward", "response_tokens", "sequence_tokens"):  # same data, same samples
    assert [r[key] for r in a] == [r[key] for r in b], key
  for key in ("mask/kept_fraction", "tool_calls_per_trajectory", "learning_rate", "train/grad_norm"):
    assert key in a[-1]
  for r in a:  # status/<name> are fractions of the step's trajectories, mask/status/<name> their counts
    fractions = [r[f"status/{name}"] for name in masks.STATUS_NAMES]
    counts = [r[f"mask/status/{name}"] for name in masks.STATUS_NAMES]
    assert sum(fractions) == pytest.approx(1.0) and all(0 <= f <= 1 for f in fractions), r
    assert [c / sum(counts) for c in counts] == pytest.approx(fractions), r


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
  trainer = build_trainer(_config(steps=3), str(tmp_path))
  original = trainer.train_step

  def step_then_sigterm():
    out = original()
    os.kill(os.getpid(), signal.SIGTERM)
    return out

  trainer.train_step = step_then_sigterm
  trainer.train()
  assert trainer.step == 1 and trainer.stopped
  assert os.path.isdir(tmp_path / "checkpoints" / "1")
  assert signal.getsignal(signal.SIGTERM) is not trainer._on_sigterm  # handler restored


def test_rl_stage_stopped_by_sigterm_skips_the_final_test(tmp_path, monkeypatch, capsys):
  """A preempted rl stage exits right after its checkpoint: no test of a half-trained policy
  logged as the result, and ``stopped`` in its summary (main then exits 143)."""
  from imagent_jax.stages import rl as rl_stage
  from imagent_jax.reporting import MetricsWriter, Report
  original = Trainer.train_step

  def step_then_sigterm(self):
    out = original(self)
    os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
  config = _config(steps=3)
  with config.unlocked():
    config.rl.test_examples = 2
  out = rl_stage.run(config, str(tmp_path), Report(str(tmp_path), "t"), MetricsWriter(str(tmp_path)))
  assert out["stopped"] and out["steps"] == 1
  assert "Stopped by SIGTERM after step 1" in capsys.readouterr().out
  tests = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"stage": "test"' in l]
  assert [r["step"] for r in tests] == [0]  # the base only


def test_invalid_rl_config_is_refused_before_compiling():
  c = _config()
  with c.unlocked():
    c.rollout.group_size = 1  # std-normalised advantages need groups of at least 2
  with pytest.raises(ValueError, match="config.rl"):
    schema.validate(c)
