"""The ``rollout`` stage: run the jitted agent rollout on synthetic multi-image questions and show it.

For each trajectory it prints the turns — thinking, tool calls, observations, the answer — with
the end status, the reward and whether the masks keep it, and it saves every input image and
every tool view as a PNG under ``<workdir>/rollout/``. Before RL (and without a trained
checkpoint) the policy's samples are noise; ``config.rollout.scripted_rows`` rows per group then
follow a scripted demo policy (forced tokens: zoom on the mark, re-show an image, answer) so that
the tool machinery is visible. Those rows are labelled as scripted. Rewards and masks come from
``rl.batch.prepare_batch``, as in training.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from imagent_jax import parallel
from imagent_jax.stages import build
from imagent_jax.agent import protocol
from imagent_jax.rl import batch, masks
from imagent_jax.agent import rollout as rl
from imagent_jax.agent import tools
from imagent_jax.reporting import MetricsWriter, Report, markdown_table, text_table


def _demo_script(example, ctx: tools.ToolContext, tokenizer, eos_id: int) -> list[int]:
  """Forced tokens of the scripted demo policy: zoom on the mark, re-show image 1, answer."""
  k = example["target_image"]
  (w0, h0), (ws, hs) = ctx.views[k].size, ctx.shown_sizes[k]
  x0, y0, x1, y1 = example["target_box"]
  pad = 12
  box = [round(max(0, x0 - pad) * ws / w0), round(max(0, y0 - pad) * hs / h0), round(min(w0, x1 + pad) * ws / w0),
         round(min(h0, y1 + pad) * hs / h0)]
  turns = [f"<think>The mark is small; zoom in on image {k + 1}.</think>"
           + protocol.render_tool_call(protocol.ToolCall("confirm", {"image": k + 1, "bbox_2d": box})),
           "<think>Look at image 1 once more.</think>" + protocol.render_tool_call(
               protocol.ToolCall("reflect", {"image": 1})),
           f"<think>The zoom shows it.</think><answer>{example['answer']}</answer>"]
  ids = []
  for t in turns:
    ids += tokenizer.encode(t)
  return ids + [eos_id]


def _print_trajectory(row: int, traj: rl.Trajectory, reward: dict, kept: float, scripted: bool, example) -> str:
  head = (f"--- trajectory {row} (prompt {traj.prompt_index}, {'scripted demo policy' if scripted else 'sampled'}) "
          f"status={masks.STATUS_NAMES[traj.status]} answer={traj.answer!r} gold={example['answer']!r} "
          f"reward={reward['total']:.2f} (acc {reward['accuracy']:.0f}, fmt {reward['format']:.0f}) "
          f"{'kept' if kept else 'masked'}")
  lines = [head]
  for i, turn in enumerate(traj.turns):
    parsed = protocol.parse_turn(turn)
    text = turn if len(turn) < 220 else turn[:200] + f"... [{len(turn)} chars]"
    lines.append(f"  turn {i + 1}: {text!r}")
    if i < len(traj.calls):
      c = traj.calls[i]
      what = f"view {c.view_index}" if c.view_index else c.error_kind
      lines.append(f"     -> tool {c.name or '?'}: {'ok' if c.ok else 'FAILED'} ({what})"
                   + ("" if parsed.tool_call_error is None else f" [{parsed.tool_call_error}]"))
  return "\n".join(lines)


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  """Rolls out ``config.rollout.num_prompts`` validation questions (G trajectories each), prints and
  saves them, and logs their rewards and masks (stage ``rollout``); returns that summary."""
  mesh = parallel.make_mesh(dict(config.mesh))
  model_config, params, processor, _ = build.load_model_and_processor(config, workdir, mesh)
  model = build.build_model(config, model_config)
  cfg, tcfg = build.rollout_config(config, model_config), build.tool_config(config, model_config)
  ro = rl.Rollout(model, processor, cfg, tcfg)
  examples = build.eval_examples(config, workdir, "validation", config.rollout.num_prompts)
  schemas = build.listed_tool_schemas(config)
  prompts = [protocol.build_prompt_messages(e["question"], len(e["images"]), e["options"], tools=schemas,
                                           system_style=config.tools.prompt_style) for e in examples]
  images = [e["images"] for e in examples]

  g, r = cfg.group_size, len(examples) * cfg.group_size
  scripted = np.zeros(r, bool)
  forced = None
  n_scripted = config.rollout.scripted_rows
  if n_scripted < 0:
    n_scripted = 0 if build.model_source(config, workdir) else 1
  if n_scripted:
    scripts = {}
    for row in range(r):
      if row % g < n_scripted:
        ex = examples[row // g]
        ctx = tools.ToolContext(ex["images"], tcfg)
        scripts[row] = _demo_script(ex, ctx, processor.tokenizer, model_config.eos_token_id)
    width = max(len(s) for s in scripts.values())
    forced = np.full((r, width), -1, np.int32)
    for row, ids in scripts.items():
      forced[row, :len(ids)] = ids
      scripted[row] = True

  t0 = time.perf_counter()
  out, trajs = ro(params, prompts, images, jax.random.key(config.seed), forced_tokens=forced)
  t_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out, trajs = ro(params, prompts, images, jax.random.key(config.seed + 1), forced_tokens=forced)
  t_run = time.perf_counter() - t0

  prep = batch.prepare_batch(out, trajs, examples, reward_cfg=build.reward_config(config),
                             mask_cfg=build.mask_config(config), grpo_cfg=build.grpo_config(config))
  rew, mask_metrics = prep.rewards, prep.mask_metrics
  kept = prep.loss_mask.sum(1) > 0

  view_dir = os.path.join(workdir, "rollout")
  os.makedirs(view_dir, exist_ok=True)
  print(f"\n{len(examples)} prompts x {g} rollouts; compile + run {t_first:.1f}s, then {t_run:.2f}s")
  for row, t in enumerate(trajs):
    ex = examples[t.prompt_index]
    print(_print_trajectory(row, t, {k: float(v[row]) for k, v in rew.items()}, kept[row], scripted[row], ex))
    for v, img in enumerate(t.context.views):
      if v < t.context.num_inputs and row % g:
        continue  # the inputs are the same for the whole group
      kind = "input" if v < t.context.num_inputs else "view"
      img.save(os.path.join(view_dir, f"traj{row}_{kind}{v + 1}.png"))
  n_views = sum(len(t.context.views) - t.context.num_inputs for t in trajs)
  print(f"\nSaved input images and {n_views} tool views under {view_dir}/")

  calls_ok = {name: sum(c.ok and c.name == name for t in trajs for c in t.calls) for name in tcfg.enabled()}
  failed = sum((not c.ok) for t in trajs for c in t.calls)
  gen_tokens = int(out["action_mask"].sum())
  summary = {"reward": float(rew["total"].mean()), "accuracy": float(rew["accuracy"].mean()),
             "tool_calls_per_trajectory": float(np.mean([len(t.calls) for t in trajs])),
             **{f"calls_ok/{k}": v for k, v in calls_ok.items()}, "calls_failed": failed,
             "rollout_s": round(t_run, 3), "compile_and_run_s": round(t_first, 3),
             "sampled_tokens_per_s": round(gen_tokens / t_run, 1),
             **{k: float(np.asarray(v)) for k, v in mask_metrics.items()}}
  metrics.write(0, "rollout", **summary)
  rows = [(i, "scripted" if scripted[i] else "sampled", masks.STATUS_NAMES[t.status], len(t.calls),
           t.num_successful_image_calls, t.answer, examples[t.prompt_index]["answer"], float(rew["total"][i]),
           "yes" if kept[i] else "no") for i, t in enumerate(trajs)]
  header = ["traj", "policy", "status", "calls", "image calls", "answer", "gold", "reward", "in loss"]
  print("\n" + text_table(header, rows))
  first_view = next((f"traj{i}_view{len(t.context.views)}.png" for i, t in enumerate(trajs)
                     if len(t.context.views) > t.context.num_inputs), None)
  body = [markdown_table(header, rows), "", markdown_table(["measure", "value"], list(summary.items()))]
  if first_view:
    body += ["", f"A tool view: ![tool view](rollout/{first_view})"]
  report.add("Agent rollout", "\n".join(body))
  return summary
