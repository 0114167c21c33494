"""The ``analyze`` stage: where the agent looks as it generates, before and after tools (the paper's Figure 1).

    # the embedded default's base and RL result, on its synthetic test questions
    python -m imagent_jax.main --config configs/analyze.py --workdir runs/tiny

For each checkpoint of ``config.analyze.checkpoints`` (``base``: the model's source, e.g. the
warmup base or a released folder; ``rl``: the last RL checkpoint of ``analyze.run_dir``, default
the workdir; ``latest``: that, else the source) and each subset of ``analyze.subsets`` (``single``:
questions with one image; ``multi``: with several), it rolls out ``analyze.questions`` questions
of ``analyze.split`` greedily with the jitted agent rollout (tools as ``config.tools``), replays
every trajectory through the model's attention-shares pass (``analysis.trajectory_attention``,
``analyze.query_chunk`` queries at a time) and summarises where each generated token's attention
went: to the question text, the prompt images (the asked one apart), earlier generated tokens,
tool views and tool-response text.

Written: ``W/analyze/attention_progress.png`` (Figure 1: shares against generation progress),
``W/analyze/attention_layers.png`` (image share per layer against progress),
``W/analyze/attention_views.png`` (shares just before and after each tool view enters),
``W/analyze/summary.json`` (every curve and number), ``analyze/<checkpoint>/<subset>/...`` in
metrics.jsonl and a report section.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from imagent_jax import parallel
from imagent_jax.agent.rollout import Rollout
from imagent_jax.analysis import plots
from imagent_jax.analysis import trajectory_attention as ta
from imagent_jax.evaluation import evaluator
from imagent_jax.reporting import MetricsWriter, Report, markdown_table, text_table
from imagent_jax.stages import build
from imagent_jax.stages import eval as eval_stage

CHECKPOINTS = ("base", "rl", "latest")
SUBSETS = ("single", "multi", "all")
FIGURE_CATEGORIES = ("text", "image", "generated", "tool_views", "tool_text")
VIEW_CATEGORIES = ("image", "all_images", "asked_image", "asked_views", "generated", "text")


def parse_list(spec: str, allowed, what: str) -> list[str]:
  """``"base,rl"`` -> ``["base", "rl"]``; ``ValueError`` for an empty list, an unknown or a repeated name."""
  names = [s.strip() for s in str(spec).split(",") if s.strip()]
  if not names:
    raise ValueError(f"config.analyze.{what} is empty; give some of {allowed}")
  bad = [n for n in names if n not in allowed]
  if bad:
    raise ValueError(f"config.analyze.{what}: unknown {bad}; known: {allowed}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.analyze.{what}={spec!r} names one twice")
  return names


def _in_subset(example, subset: str) -> bool:
  n = len(example["images"])
  return subset == "all" or (n == 1) == (subset == "single")


def select_questions(config, workdir: str) -> dict[str, list[dict]]:
  """``{subset: questions}``: the first ``analyze.questions`` questions of ``analyze.split`` in each subset."""
  a = config.analyze
  subsets = parse_list(a.subsets, SUBSETS, "subsets")
  pool = build.eval_examples(config, workdir, a.split, count=max(64, 8 * a.questions))
  out = {s: [x for x in pool if _in_subset(x, s)][:a.questions] for s in subsets}
  empty = [s for s, xs in out.items() if not xs]
  if empty:
    raise ValueError(f"analyze: no {'/'.join(empty)} questions among the first {len(pool)} of split {a.split!r} "
                     f"(data.images_per_question={config.data.images_per_question!r})")
  return out


def analyze_checkpoint(config, workdir: str, weights: str, questions: dict, mesh) -> tuple[str, dict]:
  """Rolls out and analyses every subset with one checkpoint: ``(label, {subset: (analyses, records)},
  {"rollout_s", "shares_s"})`` (the seconds of the rollouts and of the attention-shares passes, compiles included)."""
  a = config.analyze
  model_config, params, processor, label = eval_stage.load_weights(config, workdir, mesh, weights, a.run_dir or None)
  params = parallel.local_params(params, model_config, mesh)
  model = build.build_model(config, model_config)
  shares_model = model.clone(attention_block=a.query_chunk)
  tool_cfg = build.tool_config(config, model_config)
  prompt = build.question_prompt(config)
  everything = [x for xs in questions.values() for x in xs]
  rcfg = eval_stage.rollout_config(config, model_config, processor, everything, samples=1, batch_size=a.batch_size)
  rollout = Rollout(model, processor, rcfg, tool_cfg)
  out, timing = {}, {"rollout_s": 0.0, "shares_s": 0.0}
  for subset, examples in questions.items():
    analyses, records = [], []
    bar = tqdm(total=len(examples), desc=f"analyze {weights} {subset}", unit="question", disable=not a.progress_bar)
    for i in range(0, len(examples), a.batch_size):
      chunk = examples[i:i + a.batch_size]
      t0 = time.perf_counter()
      arrays, trajs = rollout(params, [prompt(x) for x in chunk], [x["images"] for x in chunk], jax.random.key(0))
      recs = [evaluator.record(t, chunk[t.prompt_index]) for t in trajs]
      t1 = time.perf_counter()
      analyses += ta.analyze_trajectories(shares_model, params, arrays, trajs, prompt_len=rcfg.max_prompt_len,
                                          image_settings=processor.image_settings,
                                          view_max_pixels=tool_cfg.view_max_pixels, examples=chunk,
                                          correct=[r["correct"] for r in recs], rows_per_pass=a.rows_per_pass)
      timing["rollout_s"] += t1 - t0
      timing["shares_s"] += time.perf_counter() - t1
      records += recs
      bar.update(len(chunk))
    bar.close()
    out[subset] = (analyses, records)
  return label, out, timing


def summarize(analyses, records, *, bins: int, window: int) -> dict:
  """The numbers of one (checkpoint, subset): curves, the layer map, around views and counts."""
  curves = ta.progress_curves(analyses, bins=bins)
  return {"trajectories": len(analyses), "generated_tokens": int(sum(t.num_generated for t in analyses)),
          "views": int(sum(len(t.view_starts) for t in analyses)),
          "accuracy": float(np.mean([r["correct"] for r in records])) if records else float("nan"),
          "zooms_per_answer": float(np.mean([r["zooms"] for r in records])) if records else float("nan"),
          "curves": {k: v.tolist() for k, v in curves.items()},
          "mean": {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in curves.items()},
          "layers": ta.layer_progress(analyses, "all_images", bins=bins).tolist(),
          "layers_image": ta.layer_progress(analyses, "image", bins=bins).tolist(),
          "around_views": ta.around_views(analyses, window=window)}


def metrics_of(summaries: dict) -> dict:
  """Flat ``analyze/<checkpoint>/<subset>/<key>`` numbers for metrics.jsonl."""
  flat = {}
  for (ckpt, subset), s in summaries.items():
    p = f"analyze/{ckpt}/{subset}"
    flat.update({f"{p}/trajectories": s["trajectories"], f"{p}/views": s["views"], f"{p}/accuracy": s["accuracy"]})
    for name, values in s["curves"].items():
      flat[f"{p}/{name}/start"] = values[0]
      flat[f"{p}/{name}/end"] = values[-1]
      flat[f"{p}/{name}/mean"] = s["mean"][name]
    for name in VIEW_CATEGORIES:
      v = s["around_views"].get(name, {})
      flat[f"{p}/{name}/before_view"] = v.get("before")
      flat[f"{p}/{name}/after_view"] = v.get("after")
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in flat.items()}


def _fmt(v) -> str:
  return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}"


def _table_rows(summaries: dict) -> list[tuple]:
  rows = []
  for (ckpt, subset), s in summaries.items():
    c = s["curves"]
    rows.append((ckpt, subset, s["trajectories"], _fmt(s["accuracy"]),
                 *[f"{_fmt(c[k][0])} → {_fmt(c[k][-1])}" for k in ("text", "image", "generated", "tool_views")],
                 f"{_fmt(s['around_views']['all_images']['before'])} → {_fmt(s['around_views']['all_images']['after'])}"
                 f" ({s['around_views']['all_images']['views']})",
                 f"{_fmt(s['around_views']['asked_image']['before'])} → {_fmt(s['around_views']['asked_image']['after'])}"))
  return rows


_HEADER = ["checkpoint", "questions", "n", "accuracy (%)", "text (%)", "image (%)", "generated (%)",
           "tool views (%)", "all images around a view (%)", "asked image around a view (%)"]


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  """Analyses every checkpoint on every subset; writes the figures, ``analyze/summary.json``, metrics
  and the report section; returns ``{"<checkpoint>/<subset>/image_start|end": share}``."""
  a = config.analyze
  t0 = time.perf_counter()
  checkpoints = parse_list(a.checkpoints, CHECKPOINTS, "checkpoints")
  questions = select_questions(config, workdir)
  mesh = parallel.make_mesh(dict(config.mesh))
  summaries, labels, seconds, timing = {}, {}, {}, {}
  for weights in checkpoints:
    t1 = time.perf_counter()
    labels[weights], results, timing[weights] = analyze_checkpoint(config, workdir, weights, questions, mesh)
    for subset, (analyses, records) in results.items():
      summaries[(weights, subset)] = summarize(analyses, records, bins=a.bins, window=a.window)
    seconds[weights] = time.perf_counter() - t1
    print(f"analyze {weights}: {labels[weights]}; {seconds[weights]:.0f} s (rollouts {timing[weights]['rollout_s']:.0f} s, "
          f"attention shares {timing[weights]['shares_s']:.0f} s)")
  if not parallel.is_primary():
    return {}
  out_dir = os.path.join(workdir, "analyze")
  os.makedirs(out_dir, exist_ok=True)
  figures = {
      "progress": plots.plot_attention_progress({k: s["curves"] for k, s in summaries.items()},
                                                os.path.join(out_dir, "attention_progress.png"),
                                                categories=FIGURE_CATEGORIES),
      "layers": plots.plot_layer_progress({k: np.asarray(s["layers"]) for k, s in summaries.items()},
                                          os.path.join(out_dir, "attention_layers.png"), category="all_images"),
      "views": plots.plot_around_views({f"{c}, {s}": v["around_views"] for (c, s), v in summaries.items()},
                                       os.path.join(out_dir, "attention_views.png"))}
  total = time.perf_counter() - t0
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump({"checkpoints": labels, "split": a.split, "bins": a.bins, "window": a.window, "seconds": total,
               "seconds_per_checkpoint": seconds, "timing": timing,
               "results": {f"{c}/{s}": v for (c, s), v in summaries.items()}}, f, indent=1,
              default=lambda v: None)
  metrics.write(0, "analyze", **metrics_of(summaries), **{"analyze/seconds": total})
  rows = _table_rows(summaries)
  print("\nattention of the generated tokens, first → last tenth of the generation (mean over layers and heads); "
        "around a view: the 8 generated tokens before → after it enters\n" + text_table(_HEADER, rows))
  body = (f"Split `{a.split}`, greedy, {a.questions} questions per subset. "
          + "; ".join(f"**{k}**: {v}" for k, v in labels.items()) + ". "
          f"Shares are of the attention of the step that produced each generated token, averaged over heads and "
          f"layers, first → last of {a.bins} progress bins; around a view: the {a.window} generated tokens before → "
          f"after a tool view enters. {total:.0f} s.\n\n" + markdown_table(_HEADER, rows)
          + "".join(f"\n\n![{k}](analyze/{os.path.basename(p)})" for k, p in figures.items()))
  report.add("Attention analysis", body)
  return {f"{c}/{s}/image_{end}": v["curves"]["image"][0 if end == "start" else -1]
          for (c, s), v in summaries.items() for end in ("start", "end")}
