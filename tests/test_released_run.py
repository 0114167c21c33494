"""The released-checkpoint path as shipped, through the command line: ``configs/qwen2_5_vl.py:7b`` on a
transformers checkpoint in the released layout (small widths here; ``experiments/run_real_width.py``
runs the same functions at the 7B's widths) and a JSONL dataset: rl only, two GRPO steps and a
checkpoint, then a resume, then the eval stage on the result."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def real_width():
  spec = importlib.util.spec_from_file_location("run_real_width", os.path.join(ROOT, "experiments",
                                                                               "run_real_width.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def checkpoint(real_width, tmp_path_factory):
  """``(model config, folder)``: the small-width checkpoint, in shards of 2 MB (with an index, as released)."""
  config = real_width.model_config("small", layers=1, vocab_size=512)
  return config, real_width.make_checkpoint(str(tmp_path_factory.mktemp("ckpt")), config, max_shard_size="2MB")


def test_checkpoint_in_the_released_layout(real_width, checkpoint):
  from imagent_jax.models import hf_io
  from imagent_jax.processing import chat, load_tokenizer

  config, folder = checkpoint
  assert (config.hidden_size, config.vision.depth, config.vision.fullatt_block_indexes) == (256, 2, (1,))
  for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.json", "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(folder, name)), name
  assert "chat_template" in json.load(open(os.path.join(folder, "tokenizer_config.json")))
  tokenizer = load_tokenizer(folder)
  for token in (chat.TOOL_CALL_START, chat.TOOL_CALL_END, chat.IMAGE_PAD, chat.IM_END):
    assert len(tokenizer.encode(token)) == 1, token
  assert tokenizer.token_to_id(chat.IMAGE_PAD) == config.image_token_id
  assert hf_io.load_config(folder) == config  # what transformers wrote is the architecture we asked for
  real_7b = real_width.model_config("7b", layers=1, vocab_size=1024)
  assert (real_7b.hidden_size, real_7b.num_attention_heads, real_7b.num_key_value_heads, real_7b.intermediate_size,
          real_7b.vision.hidden_size, real_7b.vision.num_heads, real_7b.vision.intermediate_size,
          real_7b.vision.window_size, real_7b.vision.out_hidden_size) == (3584, 28, 4, 18944, 1280, 16, 3420, 112, 3584)


def test_released_config_trains_from_the_checkpoint_and_resumes(real_width, checkpoint, tmp_path):
  """Two GRPO steps and a checkpoint, then the same command with one step more resumes: the
  released config runs its ``rl`` stage only (no warmup, no random init)."""
  _, checkpoint = checkpoint
  data = real_width.make_dataset(str(tmp_path / "data"), questions=4)
  workdir = str(tmp_path / "run")
  fast = ["--config.rl.logprob_gap_every=0"]  # one forward pass fewer to compile
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

  def rl_steps():
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))
            if json.loads(line)["stage"] == "rl"]

  first = real_width.run_main(workdir, real_width.overrides(checkpoint, data, steps=2) + fast, timeout=300, env=env)
  assert first["returncode"] == 0, first["stderr"][-3000:]
  assert list(first["stages"]) == ["rl"] and "=== stage warmup" not in first["stdout"]
  assert not os.path.exists(os.path.join(workdir, "base")) and "Resumed from" not in first["stdout"]
  assert rl_steps() == [1, 2] and os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["stages"] == "rl" and saved["model"]["checkpoint"] == checkpoint
  assert saved["rl"]["patch_budget"] == 2 * 2 * (2 * 16 + 2 * 16) * 4  # derived from the overrides

  second = real_width.run_main(workdir, real_width.overrides(checkpoint, data, steps=3) + fast, timeout=300, env=env)
  assert second["returncode"] == 0, second["stderr"][-3000:]
  assert f"Resumed from {os.path.join(workdir, 'checkpoints')} at step 2" in second["stdout"]
  assert list(second["stages"]) == ["rl"] and rl_steps() == [1, 2, 3]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))

  evaluation = str(tmp_path / "eval")  # the eval stage, released config, on the run's latest RL checkpoint
  third = real_width.run_main(evaluation, real_width.eval_overrides(checkpoint, data, workdir), timeout=300, env=env,
                              config="configs/eval.py:7b")
  assert third["returncode"] == 0, third["stderr"][-3000:]
  assert list(third["stages"]) == ["eval"]
  summary = json.load(open(os.path.join(evaluation, "eval", "summary.json")))
  assert summary["weights"] == f"RL checkpoint step 3 of {workdir}"
  assert summary["benchmarks"]["jsonl"]["questions"] == 4
  records = [json.loads(line) for line in open(os.path.join(evaluation, "eval", "jsonl", "results.jsonl"))]
  assert sorted(r["id"] for r in records) == ["q0", "q1", "q2", "q3"]
