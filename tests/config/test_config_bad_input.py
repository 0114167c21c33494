"""Config values that used to pass validation and then crash or silently do nothing: each is now an
"invalid config" before anything compiles (one table)."""

import pytest

from imagent_jax.config import schema

CASES = [  # (overrides, what the message says)
    ({"rollout.top_p": 5.0}, "top_p must lie in (0, 1]"),
    ({"rollout.top_k": -1}, "top_k must be >= 0"),
    ({"rollout.max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"rollout.temperature": -1.0}, "temperature must be >= 0"),
    ({"data.on_error": "maybe"}, "on_error must be one of"),
    ({"data.source": "jsonl"}, "config.data.source='jsonl' needs config.data.train_path, config.data.validation_path"),
    ({"warmup.tasks": "read_zoom,fly"}, "unknown or empty task(s) ['fly']"),
    ({"warmup.steps": -1}, "config.warmup.steps=-1 must be >= 1"),
    ({"warmup.batch_size": 0}, "config.warmup.batch_size=0 must be >= 1"),
    ({"seed": -1}, "config.seed=-1 must be >= 0"),
    ({"rl.steps": 0}, "config.rl.steps=0 must be >= 1"),
    ({"rl.keep_checkpoints": 0}, "config.rl.keep_checkpoints=0 must be >= 1"),
    ({"rl.checkpoint_every": -2}, "config.rl.checkpoint_every=-2 must be >= 0"),
    ({"data.source": "jsonl", "data.train_path": "/", "data.validation_path": "/", "data.test_path": "/",
      "data.image_root": "/no/such/root"}, "config.data.image_root='/no/such/root' is not a folder"),
    ({"analyze.checkpoints": "base,final"}, "config.analyze.checkpoints: unknown ['final']"),
    ({"analyze.checkpoints": ""}, "config.analyze.checkpoints is empty"),
    ({"analyze.subsets": "single,single"}, "config.analyze.subsets='single,single' names one twice"),
    ({"analyze.split": "dev"}, "config.analyze.split='dev' must be train, validation or test"),
    ({"analyze.query_chunk": 0}, "config.analyze.query_chunk=0 must be >= 1"),
    ({"stages": "analyze", "analyze.run_dir": "/no/such/run"}, "config.analyze.run_dir='/no/such/run' is not a folder"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[",".join(c[0]) for c in CASES])
def test_bad_values_are_invalid_config(overrides, message):
  config = schema.get_config("smoke")
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match="invalid config") as info:
    schema.validate(config)
  assert message in str(info.value)


def test_the_defaults_pass():
  schema.validate(schema.get_config())
  schema.validate(schema.get_config("smoke"))


def test_workdir_checks(tmp_path, monkeypatch):
  from imagent_jax import main
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="invalid workdir: .*file exists and is not a folder"):
    main.check_workdir(str(tmp_path / "file"))
  with pytest.raises(ValueError, match="invalid workdir: cannot write in .*file/run"):
    main.check_workdir(str(tmp_path / "file" / "run"))

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr("builtins.open", full)
  with pytest.raises(ValueError, match="invalid workdir: cannot write in .*No space left on device"):
    main.check_workdir(str(tmp_path / "ok"))
  monkeypatch.undo()
  main.check_workdir(str(tmp_path / "ok"))
  assert list((tmp_path / "ok").iterdir()) == []  # the probe is gone
