"""Memory plan at paper scale: per-device bytes of the GRPO update and the rollout, compiled ahead of time.

Nothing is allocated and no weight is read: parameters, optimiser state and batches are
``jax.ShapeDtypeStruct`` s carrying the trainer's shardings (``parallel.param_shardings``,
``grpo.opt_state_shardings``, ``parallel.batch_shardings``) on a fake mesh of N CPU devices,
and each program is ``jax.jit(...).lower(...).compile()``-d; XLA's ``memory_analysis()`` of the
compiled per-device program gives its arguments, outputs (less what aliases donated arguments),
temporaries and generated code. Their sum is the table's "GB/device" (GB = 1e9 bytes).

    python experiments/plan_memory.py                      # the target setting (grpo_7b), ~75 s on 2 cores
    python experiments/plan_memory.py --all                # every setting: README's table, ~13 minutes
    python experiments/plan_memory.py --only grpo_3b,rollout_7b
    python experiments/plan_memory.py --devices 16 --rows 32 --only grpo_7b

Programs:

* ``grpo``: ``rl.grpo.train_step`` on one minibatch (``rows / num_minibatches`` rows of ``tokens``
  tokens, each with ``images`` images of ``image_tokens`` visual tokens; params and optimiser state
  donated, as ``grpo.sharded_train_step`` jits it), with the model built as the rl stage builds it
  (``stages.build.build_model``: ``config.model.attention``, ``config.model.scan_layers``,
  ``config.rl.remat``).
* ``rollout``: the jitted agent rollout (``agent.rollout._rollout_program``: prefill of the
  questions' prompts, the decode loop with its KV cache and observation inserts), params sharded
  as in training, inputs as the rollout stage passes them (replicated).

The numbers are XLA:CPU's: its fusion and buffer assignment differ from XLA:GPU's and XLA:TPU's
(e.g. CPU upcasts some bfloat16 work to float32), so read them as a plan, within some ten percent,
not as a measurement on the accelerator.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import sys
import time


def _set_devices(argv) -> None:
  """The fake device count must be set before jax is imported."""
  n = 8
  for i, a in enumerate(argv):
    if a.startswith("--devices="):
      n = int(a.split("=", 1)[1])
    elif a == "--devices" and i + 1 < len(argv):
      n = int(argv[i + 1])
  # XLA:CPU's memory-optimised scheduler (its default orders for concurrency and keeps more alive;
  # the GPU and TPU schedulers are memory-aware too).
  flags = f" --xla_force_host_platform_device_count={n} --xla_cpu_enable_concurrency_optimized_scheduler=false"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's SPMD warnings about the rollout's host-callback values


if __name__ == "__main__":
  _set_devices(sys.argv[1:])

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from imagent_jax import parallel  # noqa: E402
from imagent_jax.config import presets, schema  # noqa: E402
from imagent_jax.models import registry  # noqa: E402
from imagent_jax.rl import grpo  # noqa: E402
from imagent_jax.stages import build  # noqa: E402

GB = 1e9
PRESETS = {"3b": "qwen2_5_vl_3b", "7b": "qwen2_5_vl_7b"}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the table.

  Attributes:
    name: the row's name (``--only``).
    program: "grpo" or "rollout".
    model: "3b" or "7b" (``PRESETS``).
    rows: trajectories of the update (grpo: all minibatches together) or of the rollout
      (questions x group_size).
    tokens: tokens per row (grpo: the training length; rollout: prompt + new tokens).
    images: images per row (grpo) or per question (rollout), each of ``image_tokens`` tokens.
    image_tokens: visual tokens per image (x 4 patches).
    attention: ``config.model.attention``.
    remat: ``config.rl.remat`` (grpo only).
    scan_layers: ``config.model.scan_layers``.
    num_minibatches: ``config.rl.num_minibatches`` (grpo only): one step holds rows / this.
    new_tokens: rollout only: tokens generated (and observations inserted) after the prompt.
    group_size: rollout only: trajectories per question.
  """

  name: str
  program: str
  model: str
  rows: int
  tokens: int
  images: int
  image_tokens: int = 1280
  attention: str = "blocked"
  remat: str = "full"
  scan_layers: bool = True
  num_minibatches: int = 1
  new_tokens: int = 0
  group_size: int = 16


# The target (issue 17): the 7B update of 16 trajectories x 8,192 tokens with 4 images of up to
# 1,280 visual tokens each, on 8 devices, in at most 60 GB per device. The last row is the target;
# the others show what each setting buys.
SETTINGS = (
    Setting("grpo_7b_text_unscanned", "grpo", "7b", 16, 8192, 0, scan_layers=False),
    Setting("grpo_7b_text", "grpo", "7b", 16, 8192, 0),
    Setting("grpo_3b", "grpo", "3b", 16, 8192, 4),
    Setting("grpo_3b_32rows", "grpo", "3b", 32, 8192, 4),
    Setting("grpo_7b_32rows", "grpo", "7b", 32, 8192, 4),
    Setting("rollout_3b", "rollout", "3b", 16, 8192, 4, new_tokens=2048),
    Setting("rollout_7b", "rollout", "7b", 16, 8192, 4, new_tokens=2048),
    Setting("grpo_7b", "grpo", "7b", 16, 8192, 4),
)
TARGET = "grpo_7b"


def run_config(s: Setting):
  """The released config of ``s.model`` (configs/qwen2_5_vl.py) with the setting's memory knobs."""
  c = presets.released_qwen_config(PRESETS[s.model])
  c.model.attention = s.attention
  c.rl.remat = s.remat
  c.model.scan_layers = s.scan_layers
  c.rl.num_minibatches = s.num_minibatches
  return c


@contextlib.contextmanager
def _activation_rules(mesh):
  """Traces with the model's activation sharding constraints in force: ``nn.with_logical_constraint``
  (the decoder's ``("batch", "length", "embed_act")``) is a no-op unless logical-axis rules and a
  mesh are set while tracing; without them XLA is free to keep activations unsharded over rows."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
    yield


def _abstract(tree, shardings):
  return jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def _report(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
             temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)
  out["total"] = sum(out.values())
  return {k: v / GB for k, v in out.items()}


def plan_grpo(s: Setting, mesh) -> dict[str, float]:
  """Per-device GB of one ``grpo.train_step`` (one minibatch) of setting ``s`` on ``mesh``."""
  config = run_config(s)
  model_config = registry.get_preset(PRESETS[s.model])
  family = registry.family_of(model_config)
  model = build.build_model(config, model_config, remat=config.rl.remat)
  cfg = build.grpo_config(config)
  geometry = family.geometry(model_config)
  rows = s.rows // s.num_minibatches
  patches = rows * s.images * s.image_tokens * geometry.merge_unit
  param_dtype = build.DTYPES[config.model.param_dtype]
  params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype),
                                  family.abstract_params(model_config))
  opt_state = jax.eval_shape(grpo.make_optimizer(cfg).init, params)
  p_shard = parallel.param_shardings(model_config, mesh)
  o_shard = grpo.opt_state_shardings(cfg, model_config, mesh)
  f32, i32 = jnp.float32, jnp.int32
  batch = dict(tokens=((rows, s.tokens), i32), attention_mask=((rows, s.tokens), i32),
               loss_mask=((rows, s.tokens), f32), advantages=((rows,), f32), old_logp=((rows, s.tokens), f32),
               pixel_values=((patches, geometry.patch_dim), f32), image_grid_thw=((rows * s.images, 3), i32))
  if cfg.kl_coef > 0:
    batch["ref_logp"] = ((rows, s.tokens), f32)
  if not patches:  # a text-only batch
    del batch["pixel_values"], batch["image_grid_thw"]
  batch = {k: jax.ShapeDtypeStruct(*v) for k, v in batch.items()}
  b_shard = parallel.batch_shardings(batch, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(lambda p, o, b: grpo.train_step(model, cfg, p, o, b), in_shardings=(p_shard, o_shard, b_shard),
                 out_shardings=(p_shard, o_shard, replicated), donate_argnums=(0, 1))
  with _activation_rules(mesh):
    lowered = step.lower(_abstract(params, p_shard), _abstract(opt_state, o_shard), _abstract(batch, b_shard))
  return _report(lowered.compile())


def plan_rollout(s: Setting, mesh) -> dict[str, float]:
  """Per-device GB of the jitted rollout of setting ``s`` (``s.rows // s.group_size`` questions)."""
  from imagent_jax.agent import rollout as rollout_lib

  config = run_config(s)
  model_config = registry.get_preset(PRESETS[s.model])
  family = registry.family_of(model_config)
  model = build.build_model(config, model_config)
  geometry = family.geometry(model_config)
  questions = max(1, s.rows // s.group_size)
  prompt_len = s.tokens - s.new_tokens
  view_tokens = config.tools.view_max_pixels // geometry.pixels_per_token
  cfg = rollout_lib.RolloutConfig(
      group_size=s.group_size, max_prompt_len=prompt_len, prompt_patches=questions * s.images * s.image_tokens * 4,
      max_prompt_images=questions * s.images, max_new_tokens=s.new_tokens, max_tool_calls=config.rollout.max_tool_calls,
      obs_max_tokens=view_tokens + build.OBS_TEXT_TOKENS, view_max_patches=view_tokens * geometry.merge_unit,
      temperature=1.0)
  param_dtype = build.DTYPES[config.model.param_dtype]
  p_shard = parallel.param_shardings(model_config, mesh)
  params = _abstract(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype),
                                            family.abstract_params(model_config)), p_shard)
  replicated = NamedSharding(mesh, PartitionSpec())
  arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  i32 = jnp.int32
  args = [arr((questions, prompt_len), i32), arr((questions, prompt_len), i32),
          arr((cfg.prompt_patches, geometry.patch_dim), jnp.float32), arr((cfg.max_prompt_images, 3), i32),
          None, jax.eval_shape(lambda: jax.random.key(0)), arr((), i32)]
  if "row_ids" in inspect.signature(rollout_lib._rollout_program).parameters:  # pylint: disable=protected-access
    args.append(arr((questions * s.group_size,), i32))
  special = (model_config.eos_token_id, model_config.eos_token_id + 1, model_config.pad_token_id or 0)
  special += family.banned_token_ids(model_config)
  with _activation_rules(mesh):
    lowered = rollout_lib._rollout_program.lower(model, params, *args, cfg=cfg, special=special)  # pylint: disable=protected-access
  return _report(lowered.compile())


def plan(s: Setting, mesh) -> dict[str, float]:
  """``plan_grpo`` or ``plan_rollout`` of ``s``."""
  return (plan_grpo if s.program == "grpo" else plan_rollout)(s, mesh)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--devices", type=int, default=8, help="fake CPU devices (the mesh: fsdp over all of them)")
  ap.add_argument("--all", action="store_true", help="every setting of SETTINGS (the table; some 25 minutes)")
  ap.add_argument("--only", default="", help="comma list of setting names (default: the target, grpo_7b)")
  ap.add_argument("--attention", default="", help="override every setting's attention")
  ap.add_argument("--remat", default="", help="override every setting's remat policy")
  ap.add_argument("--num_minibatches", type=int, default=0, help="override every grpo setting's num_minibatches")
  ap.add_argument("--rows", type=int, default=0, help="override every setting's rows")
  ap.add_argument("--tokens", type=int, default=0, help="override every setting's tokens")
  args = ap.parse_args(argv)
  mesh = parallel.make_mesh({"fsdp": -1})
  mesh_text = "x".join(f"{a}{n}" for a, n in mesh.shape.items() if n > 1) or "1"
  names = [s.name for s in SETTINGS] if args.all else args.only.split(",") if args.only else [TARGET]
  unknown = sorted(set(names) - {s.name for s in SETTINGS})
  if unknown:
    ap.error(f"unknown settings {unknown}; known: {[s.name for s in SETTINGS]}")
  settings = [s for s in SETTINGS if s.name in names]
  over = {k: getattr(args, k) for k in ("attention", "remat", "num_minibatches", "rows", "tokens") if getattr(args, k)}
  settings = [dataclasses.replace(s, **over) for s in settings]
  header = (f"| setting | program | model | mesh | rows/step | tokens | images/row | attention | remat | scan | arguments | "
            f"outputs | temporaries | code | GB/device | compile s |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  results = {}
  for s in settings:
    t0 = time.perf_counter()
    r = plan(s, mesh)
    results[s.name] = r
    rows = s.rows // s.num_minibatches if s.program == "grpo" else s.rows
    remat = s.remat if s.program == "grpo" else "-"
    print(f"| {s.name} | {s.program} | {s.model} | {mesh_text} | {rows} | {s.tokens} | {s.images}x{s.image_tokens} | "
          f"{s.attention} | {remat} | {'yes' if s.scan_layers else 'no'} | {r['arguments']:.2f} | {r['outputs']:.2f} | {r['temporaries']:.2f} | "
          f"{r['code']:.3f} | {r['total']:.2f} | {time.perf_counter() - t0:.0f} |", flush=True)
  if TARGET in results:
    print(f"grpo_update_7b_gb_per_device={results[TARGET]['total']:.2f}")


if __name__ == "__main__":
  main()
