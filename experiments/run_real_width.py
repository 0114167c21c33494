"""The released-checkpoint path at the 7B's real widths, on CPU, through the normal command line.

    python experiments/run_real_width.py --root runs/real_width            # 7B widths, 1 decoder layer
    python experiments/run_real_width.py --root runs/rw_small --widths small   # the test's small widths

1. ``make_checkpoint``: a transformers ``Qwen2_5_VLForConditionalGeneration`` built from a config
   with Qwen2.5-VL-7B's widths (hidden 3584, 28 heads, 4 kv heads, intermediate 18944; vision
   hidden 1280, 16 heads, intermediate 3420, window 112, out_hidden 3584) but ``--layers`` decoder
   layers, two vision blocks (one windowed, one full attention) and a reduced vocabulary, random
   weights, saved by transformers' ``save_pretrained`` (bf16 safetensors, sharded with an index, as
   released) beside a tokenizer in the released layout (tokenizer.json, tokenizer_config.json with
   the chat template, chat_template.json, preprocessor_config.json, generation_config.json): the
   tiny byte-level BPE tokenizer of ``processing.build_tiny_tokenizer`` with the Qwen special
   tokens (``<tool_call>`` and ``</tool_call>`` single tokens) at the top of the vocabulary.
2. ``make_dataset``: a JSONL dataset of a few multiple-choice questions with 1-2 small images each.
3. ``run_main`` runs ``python -m imagent_jax.main --config configs/qwen2_5_vl.py:7b`` on them:
   the released config with lengths, steps and batch shrunk (``overrides``), widths kept: rollouts,
   two GRPO steps and a checkpoint; then the same command with ``rl.steps`` raised by one, which
   resumes from the checkpoint. It prints each command's wall time and stage times (parsed from the
   main job's ``=== stage X done in Ys ===`` lines), the steps' rollout and update times from
   ``metrics.jsonl``, and the peak RSS of the runs (``resource.getrusage(RUSAGE_CHILDREN)``).
4. The eval stage (``configs/eval.py:7b``) on the run's latest RL checkpoint, the dataset as a
   ``jsonl`` benchmark (``eval_overrides``).

``tests/test_released_run.py`` runs the same functions at ``--widths small``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Architecture of each width setting: (decoder fields, vision fields). "7b" is Qwen2.5-VL-7B's.
WIDTHS = {
    "7b": (dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944),
           dict(hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584)),
    "small": (dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                   mrope_section=(8, 12, 12)),
              dict(hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=256)),
}


def model_config(widths: str = "7b", layers: int = 1, vocab_size: int = 1024):
  """Our ``ModelConfig`` of the run's checkpoint: Qwen2.5-VL-7B's preset with ``WIDTHS[widths]``,
  ``layers`` decoder layers, two vision blocks (block 0 windowed over 112 pixels, block 1 full
  attention), ``vocab_size`` ids and the special tokens where the tiny tokenizer puts them (the top
  ten ids, ``models.presets.tiny``)."""
  from imagent_jax.models import presets

  text, vision = WIDTHS[widths]
  tokens = presets.tiny(vocab_size)
  token_fields = ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
                  "vision_token_id", "image_token_id", "video_token_id")
  return presets.qwen2_5_vl_7b().replace(
      vocab_size=vocab_size, num_hidden_layers=layers, **text, **{f: getattr(tokens, f) for f in token_fields},
      vision=dict(depth=2, fullatt_block_indexes=(1,), window_size=112, **vision))


def make_checkpoint(folder: str, config, *, seed: int = 0, max_shard_size: str = "1GB") -> str:
  """Writes a released-layout Qwen2.5-VL folder of ``config`` (our ``ModelConfig``) with random weights.

  The model is transformers' ``Qwen2_5_VLForConditionalGeneration`` (its own random init, std 0.02,
  seeded by ``seed``), saved in bfloat16 by ``save_pretrained`` (safetensors, shards of
  ``max_shard_size`` with ``model.safetensors.index.json`` when larger); the tokenizer folder of
  ``processing.build_tiny_tokenizer`` for ``config.vocab_size`` ids (the Qwen2.5-VL chat template,
  preprocessor_config.json), plus chat_template.json and generation_config.json as released.

  Returns:
    ``folder``.
  """
  import torch
  import transformers

  from imagent_jax.processing import build_tiny_tokenizer, chat

  torch.manual_seed(seed)
  hf_config = transformers.Qwen2_5_VLConfig(**config.to_hf_dict())
  model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config).to(torch.bfloat16).eval()
  model.save_pretrained(folder, max_shard_size=max_shard_size)
  del model
  build_tiny_tokenizer(folder, vocab_size=config.vocab_size, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
  with open(os.path.join(folder, "chat_template.json"), "w") as f:
    json.dump({"chat_template": chat.QWEN2_5_VL_CHAT_TEMPLATE}, f)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:  # as Qwen2.5-VL-7B-Instruct's
    json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": [config.eos_token_id, config.pad_token_id],
               "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 1e-6,
               "repetition_penalty": 1.05}, f, indent=2)
  return folder


def make_dataset(folder: str, questions: int = 4, *, seed: int = 0) -> str:
  """Writes ``folder/train.jsonl`` (``data.jsonl`` schema) with ``questions`` multiple-choice questions
  of 1-2 small random scenes each (PNG, 80-200 pixels a side); returns the JSONL path."""
  from imagent_jax.data import jsonl, synthetic

  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  records = []
  for q in range(questions):
    names = []
    for k in range(1 + q % 2):
      name = f"images/q{q}_{k}.png"
      synthetic.random_scene(rng, int(rng.integers(80, 201)), int(rng.integers(80, 201))).save(
          os.path.join(folder, name))
      names.append(name)
    records.append({"id": f"q{q}", "images": names, "question": "Which image shows more red shapes?",
                    "options": ["Image 1", "Image 2"] if len(names) > 1 else ["yes", "no"],
                    "answer": "A", "category": "count"})
  path = os.path.join(folder, "train.jsonl")
  jsonl.write_jsonl(path, records)
  return path


def overrides(checkpoint: str, data: str, *, steps: int, dtype: str = "float32") -> list[str]:
  """The command line's ``--config.*`` flags: the checkpoint and data, and the released config's
  lengths, batch and steps shrunk for a CPU (widths untouched): 2 questions x 2 rollouts, images of
  at most 16 tokens (tool views 16), 48 new tokens, 2 calls, no evaluation, ``dtype`` params and
  compute (bf16 matmuls are slow on CPU)."""
  values = {
      "model.checkpoint": checkpoint, "data.train_path": data, "data.validation_path": data,
      "model.dtype": dtype, "model.param_dtype": dtype, "data.max_images_per_question": 2,
      "processor.max_pixels": 28 * 28 * 16, "tools.view_max_pixels": 28 * 28 * 16,
      "rollout.group_size": 2, "rollout.max_new_tokens": 48, "rollout.max_tool_calls": 2,
      "rl.batch_size": 2, "rl.num_minibatches": 1, "rl.steps": steps, "rl.eval_every": 0, "rl.progress_bar": False,
  }
  return [f"--config.{k}={v}" for k, v in values.items()]


def eval_overrides(checkpoint: str, data: str, run_dir: str, *, dtype: str = "float32") -> list[str]:
  """The flags of the eval stage (``configs/eval.py:7b``) on the run's latest RL checkpoint: the JSONL
  dataset as a benchmark, greedy, with the run's shrunk image and length settings."""
  values = {
      "model.checkpoint": checkpoint, "model.dtype": dtype, "model.param_dtype": dtype,
      "processor.max_pixels": 28 * 28 * 16, "tools.view_max_pixels": 28 * 28 * 16, "rollout.max_new_tokens": 48,
      "rollout.max_tool_calls": 2, "eval.benchmarks": f"jsonl={data}", "eval.run_dir": run_dir,
      "eval.batch_size": 2, "eval.progress_bar": False,
  }
  return [f"--config.{k}={v}" for k, v in values.items()]


def run_main(workdir: str, flags: list[str], *, config: str = "configs/qwen2_5_vl.py:7b", timeout: float = 3600,
             env: dict | None = None) -> dict:
  """Runs ``python -m imagent_jax.main --config config --workdir workdir *flags`` in a subprocess.

  Returns:
    ``{"returncode", "stdout", "stderr", "seconds" (wall), "stages" ({stage: seconds}, from the
    main job's lines), "peak_rss_gb" (the largest resident set of any child process so far)}``.
  """
  cmd = [sys.executable, "-m", "imagent_jax.main", "--config", config, "--workdir", workdir, *flags]
  t0 = time.perf_counter()
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
  seconds = time.perf_counter() - t0
  stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"=== stage (\w+) done in ([\d.]+)s ===", res.stdout)}
  peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
  return {"returncode": res.returncode, "stdout": res.stdout, "stderr": res.stderr, "seconds": seconds,
          "stages": stages, "peak_rss_gb": peak_kb / 2 ** 20, "command": cmd}


def step_times(workdir: str) -> list[dict]:
  """``{"step", "time/rollout_s", "time/batch_s", "time/update_s"}`` of each logged rl step."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  keys = ("step", "time/rollout_s", "time/batch_s", "time/update_s")
  return [{k: r.get(k) for k in keys} for r in rows if r["stage"] == "rl"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", default="runs/real_width")
  parser.add_argument("--widths", choices=sorted(WIDTHS), default="7b")
  parser.add_argument("--layers", type=int, default=1)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=2)
  args = parser.parse_args(argv)
  root = os.path.abspath(args.root)
  checkpoint, workdir = os.path.join(root, "checkpoint"), os.path.join(root, "run")
  t0 = time.perf_counter()
  config = model_config(args.widths, args.layers, args.vocab)
  if not os.path.isfile(os.path.join(checkpoint, "config.json")):
    make_checkpoint(checkpoint, config)
  data = make_dataset(os.path.join(root, "data"))
  print(f"checkpoint {checkpoint} ({args.widths} widths, {args.layers} decoder layer(s), vocabulary {args.vocab}) "
        f"and data ready in {time.perf_counter() - t0:.0f}s; peak RSS of this process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")
  for steps in (args.steps, args.steps + 1):  # the second command resumes from the first's checkpoint
    out = run_main(workdir, overrides(checkpoint, data, steps=steps, dtype=args.dtype))
    print(f"\n$ {' '.join(out['command'][1:])}\n  exit {out['returncode']}, {out['seconds']:.0f}s wall; stages "
          + ", ".join(f"{k} {v:.0f}s" for k, v in out["stages"].items())
          + f"; peak RSS of the runs so far {out['peak_rss_gb']:.2f} GB")
    resumed = [line for line in out["stdout"].splitlines() if line.startswith("Resumed from")]
    if resumed:
      print("  " + resumed[0])
    if out["returncode"] != 0:
      print(out["stdout"][-3000:] + out["stderr"][-5000:])
      return out["returncode"]
  for row in step_times(workdir):
    print("  step {step}: rollout {time/rollout_s:.1f}s, batch {time/batch_s:.1f}s, update {time/update_s:.1f}s"
          .format(**row))
  out = run_main(os.path.join(root, "eval"), eval_overrides(checkpoint, data, workdir, dtype=args.dtype),
                 config="configs/eval.py:7b")
  print(f"\n$ {' '.join(out['command'][1:])}\n  exit {out['returncode']}, {out['seconds']:.0f}s wall; stages "
        + ", ".join(f"{k} {v:.0f}s" for k, v in out["stages"].items())
        + f"; peak RSS of the runs so far {out['peak_rss_gb']:.2f} GB")
  if out["returncode"] != 0:
    print(out["stdout"][-3000:] + out["stderr"][-5000:])
    return out["returncode"]
  summary = json.load(open(os.path.join(root, "eval", "eval", "summary.json")))
  print(f"  {summary['weights']}: jsonl overall {summary['benchmarks']['jsonl']['scores']['overall']:.1f}% "
        f"({summary['benchmarks']['jsonl']['questions']} questions; random weights: the number means nothing)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
