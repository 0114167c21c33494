"""Where a step of the embedded default spends its time: warmup steps and RL steps, phase by phase.

Runs the README's first command's config (``schema.get_config()``: tiny model, synthetic data,
CPU) for a few warmup steps and a few RL steps in a temporary workdir, with a timer around every
phase (the functions are wrapped in place; nothing else changes), and prints seconds per step by
phase, the share of the step, compile time (JAX's own compile events) and the process's CPU time
(user / system) and peak RSS. The first steps of each part compile; they are reported apart.

    python experiments/profile_default.py                        # 10 warmup + 6 RL steps, ~3 min on 2 cores
    python experiments/profile_default.py --base runs/default/base   # RL from a trained base (real lengths)
    python experiments/profile_default.py --rl-steps 0           # warmup only

Warmup phases: ``examples`` (``warmup_tasks.make_example``: scenes, crops, prompts), ``encode``
(``sft.encode_batch``: tokenising and image preprocessing), ``train_step`` (the jitted SFT step,
waited for), one after the other (the stage itself draws the next batch while a step runs). RL phases (``rl.trainer.Trainer.train_step``): ``data`` (the next batch; prefetched
in a thread), ``rollout`` (the jitted rollout: prompt preprocessing, the program, the records)
with ``rollout.host_callback`` (the tools and observations, inside it), ``rewards``, ``masks``,
``advantages``, ``training_images`` (every image and view re-rendered and preprocessed),
``trim``, ``minibatches`` (host split) and ``train_step`` (the jitted GRPO step, waited for; it
takes the KL reference's log-probs and the rollout/training gap check in the same program), ``metrics``
(trajectory statistics, including the zoom-placement Monte Carlo), and ``other`` (the rest of
the step: logging, checkpoints).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import resource
import statistics
import sys
import tempfile
import time


class Timers:
  """Seconds per phase of the current step, and per step across steps."""

  def __init__(self):
    self.current = collections.defaultdict(float)
    self.steps: list[dict] = []

  @contextlib.contextmanager
  def phase(self, name):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.current[name] += time.perf_counter() - t0

  def wrap(self, owner, attr, name, block=False):
    """Replaces ``owner.attr`` by a timed version (waiting for its jax outputs when ``block``)."""
    import jax
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
      with self.phase(name):
        out = fn(*args, **kwargs)
        if block:
          out = jax.block_until_ready(out)
      return out

    setattr(owner, attr, timed)

  def close_step(self, total):
    self.current["step"] = total
    self.steps.append(dict(self.current))
    self.current = collections.defaultdict(float)


def table(title, steps, order, skip):
  """Prints mean seconds per phase over ``steps[skip:]`` and each phase's share of the step."""
  kept = steps[skip:] or steps
  step = statistics.mean(s["step"] for s in kept)
  print(f"\n{title}: {len(kept)} steps after {min(skip, len(steps))} compiling ones; {step:.3f} s per step")
  print(f"{'phase':<28}{'s/step':>9}{'share':>8}")
  accounted = 0.0
  for name in order:
    values = [s.get(name, 0.0) for s in kept]
    mean = statistics.mean(values)
    nested = name.startswith("  ")
    if not nested:
      accounted += mean
    print(f"{name:<28}{mean:9.3f}{mean / step:8.1%}")
  print(f"{'other':<28}{step - accounted:9.3f}{(step - accounted) / step:8.1%}")
  first = steps[0]["step"] if steps else float("nan")
  print(f"first step (compiles): {first:.1f} s")
  return step


def profile_config(base: str = "", overrides=()):
  """The README's first command's config for measuring steps in-process: no progress bars,
  evaluations or checkpoints, synthetic data drawn on the fly (no tfds build), the model from
  ``base`` (a trained base's folder; empty: random init), then ``overrides`` (``key=value``)."""
  from imagent_jax.config import schema

  config = schema.get_config()
  for item in overrides:
    key, _, value = item.partition("=")
    section, _, name = key.rpartition(".")
    target = config[section] if section else config
    target[name] = type(target[name])(value) if not isinstance(target[name], bool) else value.lower() == "true"
  config.warmup.progress_bar = False
  config.rl.progress_bar = False
  config.rl.eval_every = 0
  config.rl.checkpoint_every = 0
  config.data.source = "synthetic"
  if base:
    config.model.checkpoint = os.path.abspath(os.path.expanduser(base))
  return config


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--warmup-steps", type=int, default=10)
  p.add_argument("--rl-steps", type=int, default=6)
  p.add_argument("--skip", type=int, default=2, help="first steps of each part left out of the means (compiles)")
  p.add_argument("--base", default="", help="a trained base (e.g. runs/default/base) for the RL part")
  p.add_argument("--set", action="append", default=[], help="config override key=value (e.g. rl.length_bucket=128)")
  args = p.parse_args(argv)

  import jax

  from imagent_jax import compile_clock, parallel
  from imagent_jax.agent import rollout as rollout_lib
  from imagent_jax.agent import trajectory as trajectory_lib
  from imagent_jax.rl import batch as batch_lib
  from imagent_jax.rl import grpo, masks, sft, trainer as trainer_lib, warmup_tasks
  from imagent_jax.stages import build
  from imagent_jax.stages import rl as rl_stage

  config = profile_config(args.base, args.set)
  workdir = tempfile.mkdtemp(prefix="profile_default_")
  t_start, cpu_start = time.perf_counter(), os.times()
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices, {os.cpu_count()} CPUs); "
        f"workdir {workdir}")

  # ---------------------------------------------------------------- warmup
  timers = Timers()
  if args.warmup_steps:
    w = config.warmup
    mesh = parallel.make_mesh(dict(config.mesh))
    model_config, params, processor, _ = build.load_model_and_processor(config, workdir, mesh, random_init=True)
    model = build.build_model(config, model_config)
    import optax
    from imagent_jax.agent import protocol
    tcfg = build.tool_config(config)
    system = protocol.system_prompt(build.listed_tool_schemas(config), config.tools.prompt_style)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    step_fn = sft.make_step(model, optimizer, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=step_fn.opt_state_shardings)(params)
    pad = model_config.pad_token_id or 0
    slot_patches = batch_lib.BatchConfig(patch_budget=w.patch_budget, image_slots=w.image_slots,
                                         image_settings=dict(processor.image_settings,
                                                             max_pixels=config.processor.max_pixels),
                                         view_max_pixels=tcfg.view_max_pixels).image_patches
    index = 0
    c0 = compile_clock.seconds('compile')
    for _ in range(args.warmup_steps):
      t0 = time.perf_counter()
      with timers.phase("examples"):
        examples = [warmup_tasks.make_example(config, index + i, tcfg, system) for i in range(w.batch_size)]
      index += w.batch_size
      with timers.phase("encode"):
        batch = sft.encode_batch(processor, examples, w.max_len, w.patch_budget, w.image_slots, pad,
                                 model_config.eos_token_id)
        batch = batch_lib.trim_image_budget(batch, w.image_bucket, slot_patches)  # as the stage does
      with timers.phase("train_step"):
        params, opt_state, m = step_fn(params, opt_state, batch)
        jax.block_until_ready(m)
      timers.close_step(time.perf_counter() - t0)
    per_step = table("warmup", timers.steps, ["examples", "encode", "train_step"], args.skip)
    print(f"warmup compile time: {compile_clock.seconds('compile') - c0:.1f} s; {config.warmup.steps} steps at this rate: "
          f"{per_step * config.warmup.steps:.0f} s")

  # ---------------------------------------------------------------- RL
  if args.rl_steps:
    timers = Timers()
    wrap = timers.wrap
    wrap(rollout_lib, "_host_step", "  rollout.host_callback")
    wrap(batch_lib, "score_trajectories", "rewards")
    wrap(masks, "loss_mask", "masks")
    wrap(batch_lib, "compute_advantages", "advantages")
    wrap(trajectory_lib, "training_images", "training_images")
    wrap(batch_lib, "trim_padding_columns", "trim")
    wrap(grpo, "split_minibatches", "minibatches")
    wrap(trainer_lib, "trajectory_stats", "metrics")
    wrap(rollout_lib.Rollout, "__call__", "rollout", block=True)
    trainer = rl_stage.build_trainer(config, workdir)
    wrap(trainer, "step_fn", "train_step", block=True)
    wrap(trainer, "_take_batch", "data")
    c0 = compile_clock.seconds('compile')
    for _ in range(args.rl_steps):
      t0 = time.perf_counter()
      m = trainer.train_step()
      timers.close_step(time.perf_counter() - t0)
      print(f"  step {trainer.step}: {timers.steps[-1]['step']:.2f} s, {m['sequence_tokens']:.0f} tokens per row, "
            f"{m['response_tokens']:.0f} response tokens, {m['rollout_inserts']} inserts")
    per_step = table("rl", timers.steps, ["data", "rollout", "  rollout.host_callback", "rewards", "masks",
                                          "advantages", "training_images", "trim", "minibatches",
                                          "train_step", "metrics"], args.skip)
    print(f"rl compile time: {compile_clock.seconds('compile') - c0:.1f} s; {config.rl.steps} steps at this rate: "
          f"{per_step * 100:.0f} s for the default's 100")

  cpu = os.times()
  user, system = cpu.user - cpu_start.user, cpu.system - cpu_start.system
  usage = resource.getrusage(resource.RUSAGE_SELF)
  rss = usage.ru_maxrss / 1e6  # KiB -> GB (Linux)
  print(f"\nwall {time.perf_counter() - t_start:.0f} s; CPU user {user:.0f} s, system {system:.0f} s "
        f"({system / max(user + system, 1e-9):.0%} system); {usage.ru_minflt / 1e6:.1f} million minor page faults; "
        f"compiles {compile_clock.seconds('compile'):.0f} s; peak RSS {rss:.2f} GB")


if __name__ == "__main__":
  sys.exit(main())
