"""Memory plan at paper scale: per-device bytes of the GRPO update, the rollout and the attention analysis,
compiled ahead of time.

Nothing is allocated and no weight is read: parameters, optimiser state and batches are
``jax.ShapeDtypeStruct`` s carrying the trainer's shardings (``parallel.param_shardings``,
``grpo.opt_state_shardings``, ``parallel.batch_shardings``) on a fake mesh of N CPU devices,
and each program is ``jax.jit(...).lower(...).compile()``-d; XLA's ``memory_analysis()`` of the
compiled per-device program gives its arguments, outputs (less what aliases donated arguments),
temporaries and generated code. Their sum is the table's "GB/device" (GB = 1e9 bytes).

    python experiments/plan_memory.py                      # the target setting (grpo_7b), ~75 s on 2 cores
    python experiments/plan_memory.py --all                # every setting: README's table, ~14 minutes
    python experiments/plan_memory.py --only grpo_3b,rollout_7b
    python experiments/plan_memory.py --devices 16 --rows 32 --only grpo_7b
    python experiments/plan_memory.py --only analyze_7b   # the attention analysis of one 8k trajectory, one device
    python experiments/plan_memory.py --only analyze_7b --layers 2   # the same decoder cut to 2 layers

Programs:

* ``grpo``: ``rl.grpo.train_step`` on one minibatch (``rows / num_minibatches`` rows of ``tokens``
  tokens, each with ``images`` images of ``image_tokens`` visual tokens; params and optimiser state
  donated, as ``grpo.sharded_train_step`` jits it), with the model built as the rl stage builds it
  (``stages.build.build_model``: ``config.model.attention``, ``config.model.scan_layers``,
  ``config.rl.remat``).
* ``rollout``: the jitted agent rollout (``agent.rollout._rollout_program``: prefill of the
  questions' prompts, the decode loop with its KV cache and observation inserts), params sharded
  as in training, inputs as the rollout stage passes them (replicated).
* ``analyze``: the attention-shares pass of the analyze stage (``analysis.attention._shares_program``,
  what ``analysis.trajectory_attention.analyze_trajectories`` runs on ``rows`` trajectories at a
  time) on ONE device, nothing sharded: the model as the analyze stage builds it
  (``build.build_model(...).clone(attention_block=query_chunk)``, bf16 params and compute), ``rows``
  rows of ``tokens`` tokens holding ``images`` prompt images and ``views`` tool views, and the
  ``[rows, tokens, 3 + images + views]`` one-hot key segments. Each decoder layer attends a chunk of
  ``query_chunk`` queries at a time and keeps ``[rows, tokens, segments]`` shares; the table's notes
  give, for contrast, the bytes of the dense ``[layers, heads, tokens, tokens]`` float32
  probabilities (arithmetic, times ``rows``). ``--layers N`` cuts the decoder to ``N`` layers (a
  faster compile) and adds the full depth's parameter bytes by arithmetic.

The numbers are XLA:CPU's: its fusion and buffer assignment differ from XLA:GPU's and XLA:TPU's
(e.g. CPU upcasts some bfloat16 work to float32), so read them as a plan, within some ten percent,
not as a measurement on the accelerator.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
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
from imagent_jax.analysis import attention as attention_lib  # noqa: E402
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
    program: "grpo", "rollout" or "analyze".
    model: "3b" or "7b" (``PRESETS``).
    rows: trajectories of the update (grpo: all minibatches together), of the rollout
      (questions x group_size) or of one analysis pass (analyze: ``analyze.rows_per_pass``).
    tokens: tokens per row (grpo: the training length; rollout: prompt + new tokens).
    images: images per row (grpo, analyze: the prompt images) or per question (rollout), each of
      ``image_tokens`` tokens.
    image_tokens: visual tokens per image (x 4 patches).
    attention: ``config.model.attention``.
    remat: ``config.rl.remat`` (grpo only).
    scan_layers: ``config.model.scan_layers``.
    num_minibatches: ``config.rl.num_minibatches`` (grpo only): one step holds rows / this.
    grad_accum: ``config.rl.grad_accum`` (grpo only): the step's rows as this many micro-batches.
    new_tokens: rollout only: tokens generated (and observations inserted) after the prompt.
    group_size: rollout only: trajectories per question.
    views: analyze only: tool views per row (after the prompt images), each of ``view_tokens`` tokens.
    view_tokens: analyze only: visual tokens per tool view (x 4 patches).
    query_chunk: analyze only: queries per attention chunk (``analyze.query_chunk``).
    layers: decoder layers compiled (0: the model's own depth).
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
  grad_accum: int = 1
  new_tokens: int = 0
  group_size: int = 16
  views: int = 0
  view_tokens: int = 1024
  query_chunk: int = 256
  layers: int = 0


# The target (issue 17): the 7B update of 16 trajectories x 8,192 tokens with 4 images of up to
# 1,280 visual tokens each, on 8 devices, in at most 60 GB per device. The last row is the target;
# the others show what each setting buys.
SETTINGS = (
    Setting("grpo_7b_text_unscanned", "grpo", "7b", 16, 8192, 0, scan_layers=False),
    Setting("grpo_7b_text", "grpo", "7b", 16, 8192, 0),
    Setting("grpo_3b", "grpo", "3b", 16, 8192, 4),
    Setting("grpo_3b_32rows", "grpo", "3b", 32, 8192, 4),
    Setting("grpo_7b_32rows", "grpo", "7b", 32, 8192, 4),
    Setting("grpo_7b_32rows_accum2", "grpo", "7b", 32, 8192, 4, grad_accum=2),
    Setting("rollout_3b", "rollout", "3b", 16, 8192, 4, new_tokens=2048),
    Setting("rollout_7b", "rollout", "7b", 16, 8192, 4, new_tokens=2048),
    Setting("grpo_7b", "grpo", "7b", 16, 8192, 4),
    # The attention analysis (issue: it "must run on a 7B trajectory of 8k tokens on one
    # accelerator"): one row of 8,192 tokens with 2 prompt images and 2 tool views of 1,024 visual
    # tokens each (1 x 64 x 64 patches), 3 + 4 key segments, queries 256 (analyze.query_chunk) or
    # 512 at a time, on one device.
    Setting("analyze_7b", "analyze", "7b", 1, 8192, 2, image_tokens=1024, views=2, query_chunk=256),
    Setting("analyze_7b_chunk512", "analyze", "7b", 1, 8192, 2, image_tokens=1024, views=2, query_chunk=512),
    Setting("analyze_7b_16k", "analyze", "7b", 1, 16384, 2, image_tokens=1024, views=2, query_chunk=256),
    Setting("analyze_7b_4rows", "analyze", "7b", 4, 8192, 2, image_tokens=1024, views=2, query_chunk=256),
)
TARGET = "grpo_7b"
ANALYZE_TARGET = "analyze_7b"


def run_config(s: Setting):
  """The released config of ``s.model`` (configs/qwen2_5_vl.py) with the setting's memory knobs."""
  c = presets.released_qwen_config(PRESETS[s.model])
  c.model.attention = s.attention
  c.rl.remat = s.remat
  c.model.scan_layers = s.scan_layers
  c.rl.num_minibatches = s.num_minibatches
  c.rl.grad_accum = s.grad_accum
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
  k = cfg.grad_accum  # micro-batches stacked on a leading axis (batch.stack_micro_batches)
  if k > 1:
    batch = {name: ((k, shape[0] // k) + shape[1:], dtype) for name, (shape, dtype) in batch.items()}
  batch = {name: jax.ShapeDtypeStruct(*v) for name, v in batch.items()}
  b_shard = parallel.batch_shardings(batch, mesh, row_axis=grpo.batch_row_axis(cfg))
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
    # The plan is an accelerator's: the CPU-only decode form (attention over the used cache
    # prefix, family.for_decoding) is left out although this lowers on CPU.
    lowered = rollout_lib._rollout_program.lower(model, params, *args, cfg=cfg, special=special,  # pylint: disable=protected-access
                                                  decode_backend="gpu")
  return _report(lowered.compile())


def image_grid(tokens: int, merge_size: int = 2) -> tuple[int, int, int]:
  """The ``(t, h, w)`` patch grid of a still image of ``tokens`` merged tokens (``t*h*w // merge_size**2 ==
  tokens``): the merged grid is the most square factorisation, e.g. 1,024 -> (1, 64, 64), 1,280 -> (1, 64, 80)."""
  gh = max(d for d in range(1, int(tokens ** 0.5) + 1) if tokens % d == 0)
  return (1, gh * merge_size, tokens // gh * merge_size)


def analysis_inputs(model_config, s: Setting) -> tuple[dict, jax.ShapeDtypeStruct]:
  """Abstract inputs of one attention-shares pass of ``s``: ``(inputs, key_segments)``.

  ``s.rows`` rows of ``s.tokens`` tokens; every row holds ``s.images`` prompt images of
  ``s.image_tokens`` and ``s.views`` tool views of ``s.view_tokens`` merged tokens, ``image_grid``
  grids, so the images have ``sum(t*h*w)`` patches. As ``analysis.trajectory_attention`` packs a
  pass (``images.pack_patches``), ``pixel_values`` is padded to a multiple of 64 tokens' patches
  and ``image_grid_thw`` to a multiple of 8 image slots (unused slots: zero rows). ``key_segments``
  is ``[rows, tokens, 3 + images + views]`` float32 one-hot.
  """
  geometry = registry.family_of(model_config).geometry(model_config)
  grids = ([image_grid(s.image_tokens, geometry.merge_size)] * s.images
           + [image_grid(s.view_tokens, geometry.merge_size)] * s.views) * s.rows
  patches = sum(t * h * w for t, h, w in grids)
  visual = patches // geometry.merge_unit
  if visual > s.rows * s.tokens:
    raise ValueError(f"{s.name}: {visual} visual tokens do not fit {s.rows} x {s.tokens} tokens")
  unit = 64 * geometry.merge_unit
  patches, slots = -(-patches // unit) * unit, -(-len(grids) // 8) * 8
  i32, f32 = jnp.int32, jnp.float32
  inputs = dict(input_ids=((s.rows, s.tokens), i32), attention_mask=((s.rows, s.tokens), i32))
  if grids:
    inputs.update(pixel_values=((patches, geometry.patch_dim), f32), image_grid_thw=((slots, 3), i32))
  segments = attention_lib.FIRST_IMAGE + s.images + s.views
  return ({k: jax.ShapeDtypeStruct(*v) for k, v in inputs.items()},
          jax.ShapeDtypeStruct((s.rows, s.tokens, segments), f32))


def _param_bytes(model_config, dtype) -> int:
  shapes = registry.family_of(model_config).abstract_params(model_config)
  return sum(math.prod(x.shape) * jnp.dtype(dtype).itemsize for x in jax.tree_util.tree_leaves(shapes))


def dense_probs_bytes(model_config, s: Setting) -> int:
  """Bytes of the dense ``[layers, heads, L, L]`` float32 softmax probabilities of ``s.rows`` rows
  (what keeping every layer's attention, e.g. ``output_attentions=True``, would hold)."""
  return s.rows * model_config.num_hidden_layers * model_config.num_attention_heads * s.tokens ** 2 * 4


def plan_analyze(s: Setting, mesh=None) -> dict[str, float]:
  """GB of one attention-shares pass of setting ``s`` on one device (``mesh`` unused).

  The returned dict also has, in GB: ``params_full``, the full-depth parameters (arithmetic);
  ``dense_probs``, the dense probabilities (``dense_probs_bytes``, full depth); ``resident``, what
  the device holds while the pass runs in the analyze stage: every parameter (the stage keeps the
  rollout's, so the ones the compiled pass drops as unused -- ``lm_head``, the last layer's values,
  output projection and MLP, whose outputs no share needs -- stay too), the pass's inputs, outputs,
  temporaries and code. With ``s.layers`` cutting the decoder, ``resident`` is that of the full depth
  by arithmetic: the pass holds one layer's activations at a time (its temporaries do not grow with
  depth; compare ``--layers 2`` and ``--layers 4``), and only the parameters and the ``[layers, rows,
  tokens, segments]`` shares (kilobytes a layer) do.
  """
  del mesh
  config = run_config(s)
  full_config = registry.get_preset(PRESETS[s.model])
  model_config = full_config.replace(num_hidden_layers=s.layers) if s.layers else full_config
  family = registry.family_of(model_config)
  model = build.build_model(config, model_config).clone(attention_block=s.query_chunk)  # as stages/analyze.py
  param_dtype = build.DTYPES[config.model.param_dtype]
  params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype),
                                  family.abstract_params(model_config))
  inputs, segments = analysis_inputs(model_config, s)
  lowered = attention_lib._shares_program.lower(model, params, inputs, segments)  # pylint: disable=protected-access
  out = _report(lowered.compile())
  input_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves((inputs, segments)))
  out["params_full"] = _param_bytes(full_config, param_dtype) / GB
  out["dense_probs"] = dense_probs_bytes(full_config, s) / GB
  out["resident"] = out["params_full"] + input_bytes / GB + out["outputs"] + out["temporaries"] + out["code"]
  return out


def plan(s: Setting, mesh) -> dict[str, float]:
  """``plan_grpo``, ``plan_rollout`` or ``plan_analyze`` of ``s``."""
  return {"grpo": plan_grpo, "rollout": plan_rollout, "analyze": plan_analyze}[s.program](s, mesh)


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
  ap.add_argument("--query_chunk", type=int, default=0, help="override every analyze setting's query chunk")
  ap.add_argument("--layers", type=int, default=0,
                  help="compile the decoder cut to this many layers (analyze; full-depth params added by arithmetic)")
  args = ap.parse_args(argv)
  mesh = parallel.make_mesh({"fsdp": -1})
  mesh_text = "x".join(f"{a}{n}" for a, n in mesh.shape.items() if n > 1) or "1"
  names = [s.name for s in SETTINGS] if args.all else args.only.split(",") if args.only else [TARGET]
  unknown = sorted(set(names) - {s.name for s in SETTINGS})
  if unknown:
    ap.error(f"unknown settings {unknown}; known: {[s.name for s in SETTINGS]}")
  settings = [s for s in SETTINGS if s.name in names]
  over = {k: getattr(args, k) for k in ("attention", "remat", "num_minibatches", "rows", "tokens", "query_chunk",
                                        "layers") if getattr(args, k)}
  settings = [dataclasses.replace(s, **over) for s in settings]
  header = (f"| setting | program | model | mesh | rows/step | tokens | images/row | attention | remat | scan | arguments | "
            f"outputs | temporaries | code | GB/device | compile s |")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  results, notes = {}, []
  for s in settings:
    t0 = time.perf_counter()
    r = plan(s, mesh)
    results[s.name] = r
    rows = s.rows // s.num_minibatches if s.program == "grpo" else s.rows
    remat = s.remat if s.program == "grpo" else "-"
    images, attention, scan, where = f"{s.images}x{s.image_tokens}", s.attention, s.scan_layers, mesh_text
    model = s.model
    if s.program == "analyze":  # one device; the analysis path loops over the layers, attends in query chunks
      images += f"+{s.views}x{s.view_tokens} views" if s.views else ""
      attention, scan, where = f"shares/{s.query_chunk}", False, "1"
      model += f" ({s.layers} layers)" if s.layers else ""
      depth = "" if not s.layers else ", full depth"
      notes.append(f"{s.name}: {r['resident']:.2f} GB/device resident (all {r['params_full']:.2f} GB of bf16 "
                   f"params{depth}); the dense [layers, heads, L, L] float32 probabilities of {s.rows} x {s.tokens} "
                   f"tokens would be {r['dense_probs']:.2f} GB")
    print(f"| {s.name} | {s.program} | {model} | {where} | {rows} | {s.tokens} | {images} | "
          f"{attention} | {remat} | {'yes' if scan else 'no'} | {r['arguments']:.2f} | {r['outputs']:.2f} | "
          f"{r['temporaries']:.2f} | {r['code']:.3f} | {r['total']:.2f} | {time.perf_counter() - t0:.0f} |", flush=True)
  for note in notes:
    print(note)
  if TARGET in results:
    print(f"grpo_update_7b_gb_per_device={results[TARGET]['total']:.2f}")
  if ANALYZE_TARGET in results:
    print(f"analyze_7b_gb_per_device={results[ANALYZE_TARGET]['resident']:.2f}")


if __name__ == "__main__":
  main()
