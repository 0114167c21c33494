"""The ``eval`` stage: a checkpoint on benchmarks, judge-free, deterministic and resumable.

    python -m imagent_jax.main --config configs/eval.py --workdir W \\
        --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct \\
        --config.eval.benchmarks=vstar=/data/vstar_bench,hrbench_4k=/data/HR-Bench

Which weights (``config.eval.weights``): ``"latest"`` (default) the last RL checkpoint of
``config.eval.run_dir`` (default the workdir), else the model's own source; ``"base"`` the model's
source (``config.model.checkpoint``, a released folder, or the run's warmup base); ``"rl"`` the
last RL checkpoint, an error without one.

Each benchmark (``config.eval.benchmarks``: ``name=path`` pairs; ``data=<split>`` is the run's own
data split, e.g. the synthetic test questions) is read by ``evaluation.benchmarks.load`` (options
shuffled per question by default), rolled out with the same jitted agent rollout as training
(tools as ``config.tools``; ``tools.names=none`` is the no-tool baseline), greedy or Avg@k
(``config.eval.samples``), and scored by ``evaluation.score``. Prompt budgets are sized from the
data: the most images of a question at ``processor.max_pixels`` each, and the longest prompt text.

Written as it goes: ``W/eval/<benchmark>/results.jsonl``, one record per answer
(``evaluation.evaluator``); a killed evaluation resumes after the last complete batch. At the end:
``W/eval/summary.json`` (scores in the benchmark's official aggregation, tool use, the published
numbers beside them), a report section, and ``eval/<benchmark>/<key>`` in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import jax
from tqdm.auto import tqdm

from imagent_jax import parallel
from imagent_jax.agent.rollout import Rollout
from imagent_jax.evaluation import benchmarks, evaluator, published
from imagent_jax.evaluation.benchmarks import base as bench_base
from imagent_jax.evaluation.scoring import field
from imagent_jax.reporting import MetricsWriter, Report, markdown_table, text_table
from imagent_jax.stages import build

WEIGHTS = ("latest", "base", "rl")
CIRCULAR = ("auto", "on", "off")
DATA = "data"  # eval.benchmarks name of the run's own data split


def parse_benchmarks(spec: str) -> list[tuple[str, str]]:
  """``"vstar=/data/v,hrbench_4k=/data/hr"`` -> ``[("vstar", "/data/v"), ("hrbench_4k", "/data/hr")]``.

  ``data=<split>`` names a split of the run's own data (``config.data``). Raises ``ValueError`` on
  an entry without ``=``, an unknown name or a name given twice.
  """
  out = []
  for item in str(spec).split(","):
    item = item.strip()
    if not item:
      continue
    name, sep, path = item.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
      raise ValueError(f"config.eval.benchmarks entry {item!r} is not name=path")
    if name != DATA and name not in benchmarks.NAMES:
      raise ValueError(f"config.eval.benchmarks: unknown benchmark {name!r}; known: {', '.join(benchmarks.NAMES)}, "
                       f"and {DATA}=<split> for the run's own data")
    if name == DATA and path not in ("train", "validation", "test"):
      raise ValueError(f"config.eval.benchmarks: {DATA}={path!r}; the split must be train, validation or test")
    if any(n == name for n, _ in out):
      raise ValueError(f"config.eval.benchmarks names {name!r} twice")
    out.append((name, path))
  return out


def load_weights(config, workdir: str, mesh, weights: str | None = None, run_dir: str | None = None):
  """``(model_config, params, processor, label)`` of ``weights`` (default ``config.eval.weights``;
  module docstring) read from ``run_dir`` (default ``config.eval.run_dir``, else the workdir)."""
  weights = config.eval.weights if weights is None else weights
  model_config, params, processor, _ = build.load_model_and_processor(config, workdir, mesh)
  source = build.model_source(config, workdir) or f"random init ({config.model.preset})"
  label = f"model source {source}"
  if weights in ("latest", "rl"):
    run_dir = os.path.expanduser(run_dir or config.eval.run_dir or workdir)
    restored = build.restore_params(os.path.join(run_dir, "checkpoints"), params)
    if restored is not None:
      params, step = restored
      label = f"RL checkpoint step {step} of {run_dir}"
    elif weights == "rl":
      raise FileNotFoundError(f"weights 'rl' but {run_dir}/checkpoints has no checkpoint")
  return model_config, params, processor, label


def _examples(config, workdir: str, name: str, path: str) -> tuple[list[Any], Any]:
  """The questions of one benchmark (rotated for circular evaluation) and its ``base.Benchmark``."""
  e = config.eval
  if name == DATA:
    examples = build.eval_examples(config, workdir, path, count=e.limit or 10 ** 9)
    bench = bench_base.Benchmark(name=DATA, read=None, source=f"config.data ({config.data.source}), split {path}")
  else:
    bench = benchmarks.get(name)
    examples = benchmarks.load(name, path, split=e.split or None, option_order=e.option_order, seed=e.seed)
    if e.limit:
      examples = examples[:e.limit]
  if e.circular == "on" or (e.circular == "auto" and bench.circular):
    examples = [v for x in examples for v in benchmarks.rotations(x)]
  return examples, bench


def _num_images(example) -> int:
  return len(example["images"]) if isinstance(example, dict) else len(example.image_refs)


def rollout_config(config, model_config, processor, examples: Sequence[Any], *, samples: int | None = None,
                   batch_size: int | None = None):
  """The evaluation ``RolloutConfig`` of a benchmark: greedy (or ``samples``, default
  ``eval.samples``, sampled rollouts per question), the training limits, and prompt budgets sized
  from ``examples``: the most images of a question at ``processor.max_pixels`` each, times
  ``batch_size`` (default ``eval.batch_size``) questions, and the longest prompt (its text
  measured with the tokenizer)."""
  samples = config.eval.samples if samples is None else samples
  batch_size = config.eval.batch_size if batch_size is None else batch_size
  geometry = build._geometry(config, model_config)  # pylint: disable=protected-access
  images = max(_num_images(x) for x in examples)
  at_most = config.processor.max_pixels // geometry.pixels_per_token
  prompt = build.question_prompt(config)
  text = max(len(processor.tokenizer.encode(processor.render(prompt(x)))) for x in _distinct_prompts(examples))
  length = text + images * (at_most - 1)
  cfg = build.rollout_config(config, model_config)
  sampled = samples > 1
  return dataclasses.replace(
      cfg, group_size=samples, temperature=cfg.temperature if sampled else 0.0, top_k=cfg.top_k if sampled else 0,
      top_p=cfg.top_p if sampled else 1.0, max_prompt_len=-(-length // 64) * 64,
      max_prompt_images=batch_size * images, prompt_patches=batch_size * images * at_most * geometry.merge_unit)


def _distinct_prompts(examples):
  """One example per distinct (question, options, image count): rotations share a length."""
  seen = {}
  for x in examples:
    q = x["question"] if isinstance(x, dict) else x.question
    o = x.get("options") if isinstance(x, dict) else x.options
    seen.setdefault((q, tuple(sorted(o or ())), _num_images(x)), x)
  return seen.values()


def _read_done(path: str, samples: int) -> tuple[list[dict], set]:
  """The records of an earlier run of this benchmark and the ids answered ``samples`` times."""
  if not os.path.isfile(path):
    return [], set()
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut by a kill: that batch runs again
        break
  counts: dict[str, int] = {}
  for r in records:
    counts[r["id"]] = counts.get(r["id"], 0) + 1
  done = {i for i, c in counts.items() if c >= samples}
  return [r for r in records if r["id"] in done], done


def evaluate_benchmark(config, workdir: str, name: str, path: str, *, model, params, processor, model_config,
                       tool_cfg) -> dict[str, Any]:
  """Answers every question of one benchmark (resuming), writes its records and returns its summary
  (``evaluator.aggregate`` plus ``name``, ``path``, ``seconds``, ``published``)."""
  e = config.eval
  t0 = time.perf_counter()
  examples, bench = _examples(config, workdir, name, path)
  if not examples:
    raise ValueError(f"benchmark {name} at {path} has no questions")
  out_dir = os.path.join(workdir, "eval", name)
  os.makedirs(out_dir, exist_ok=True)
  results = os.path.join(out_dir, "results.jsonl")
  done_records, done = _read_done(results, e.samples)
  with open(results, "w") as f:  # rewritten without a cut line or a partial batch
    f.writelines(json.dumps(r) + "\n" for r in done_records)
  ids = [str(field(x, "id")) for x in examples]
  todo = [k for k, i in enumerate(ids) if i not in done]
  if done:
    print(f"eval {name}: resuming, {len(done)} of {len(examples)} questions already answered ({results})")
  if todo:
    rollout = Rollout(model, processor, rollout_config(config, model_config, processor, examples), tool_cfg)
    prompt = build.question_prompt(config)
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"eval {name}", unit="question",
               disable=not e.progress_bar)
    for i in range(0, len(todo), e.batch_size):
      positions = todo[i:i + e.batch_size]
      chunk = [examples[k] for k in positions]
      images = [x["images"] if isinstance(x, dict) else x.images for x in chunk]
      records, _ = evaluator.answer_batch(rollout, params, prompt, chunk, images=images, positions=positions,
                                          rng=jax.random.key(e.seed), fallback=e.answer_fallback)
      with open(results, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
      bar.update(len(chunk))
    bar.close()
  records, _ = _read_done(results, e.samples)
  meta = {evaluator.question_id(i): dict(field(x, "meta") or {}) for i, x in zip(ids, examples)}
  summary = evaluator.aggregate(records, bench.aggregate, meta)
  summary.update(name=name, path=path, seconds=time.perf_counter() - t0, source=bench.source,
                 option_order=f"as config.data.option_order ({config.data.option_order})" if name == DATA
                 else e.option_order,
                 circular=any(evaluator.question_id(r["id"]) != r["id"] for r in records),
                 published=[p._asdict() for p in published.published(name)])
  return summary


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  """Evaluates ``config.eval.weights`` on every benchmark of ``config.eval.benchmarks``; writes the
  records, ``eval/summary.json`` and the report table; returns ``{benchmark: overall %}``."""
  e = config.eval
  specs = parse_benchmarks(e.benchmarks)
  if not specs:
    raise ValueError("config.eval.benchmarks is empty: give name=path pairs (or data=test)")
  mesh = parallel.make_mesh(dict(config.mesh))
  model_config, params, processor, label = load_weights(config, workdir, mesh)
  model = build.build_model(config, model_config)
  tool_cfg = build.tool_config(config, model_config)
  params = parallel.local_params(params, model_config, mesh)
  print(f"eval: {label}; tools {config.tools.names}; {'greedy' if e.samples == 1 else f'Avg@{e.samples}'}; "
        f"benchmark options {e.option_order}")
  summaries = {}
  for name, path in specs:
    summaries[name] = evaluate_benchmark(config, workdir, name, path, model=model, params=params, processor=processor,
                                         model_config=model_config, tool_cfg=tool_cfg)
  if not parallel.is_primary():
    return {}
  out = {"weights": label, "tools": config.tools.names, "samples": e.samples, "option_order": e.option_order,
         "benchmarks": summaries}
  with open(os.path.join(workdir, "eval", "summary.json"), "w") as f:
    json.dump(out, f, indent=2, default=_json_default)
  flat = {}
  for name, s in summaries.items():
    flat.update({f"eval/{name}/{k}": v for k, v in s["scores"].items()})
    flat.update({f"eval/{name}/calls_per_question": s["calls_per_question"],
                 f"eval/{name}/zooms_on_target": s["zooms_on_target"]})
  metrics.write(0, "eval", **flat)
  report.add("Evaluation", _report_body(out))
  print("\n" + _text_summary(summaries))
  return {name: s["scores"]["overall"] for name, s in summaries.items()}


def _json_default(v):
  return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def _fmt(v) -> str:
  return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"


def _rows(summaries: dict) -> list[tuple]:
  rows = []
  for name, s in summaries.items():
    for key, value in s["scores"].items():
      pub = "; ".join(f"{p['model']} {p['score']}" for p in s["published"] if p["key"] == key)
      rows.append((name, key, _fmt(value), s["questions"] if key == "overall" else "", pub))
  return rows


def _text_summary(summaries: dict) -> str:
  return text_table(["benchmark", "score", "ours (%)", "questions", "published"], _rows(summaries))


def _report_body(out: dict) -> str:
  s = out["benchmarks"]
  body = (f"Weights: {out['weights']}. Tools: `{out['tools']}`. "
          f"{'Greedy' if out['samples'] == 1 else 'Avg@%d' % out['samples']}, benchmark options "
          f"{out['option_order']} (the run's own data keeps its order). "
          "Scores in percent, in each benchmark's official aggregation; records in `eval/<benchmark>/results.jsonl`.")
  body += "\n\n" + markdown_table(["benchmark", "score", "ours (%)", "questions", "published"], _rows(s))
  tool_rows = [(name, f"{v['calls_per_question']:.2f}", f"{v['zooms_per_question']:.2f}", _fmt(
      100 * v["zooms_on_target"] if math.isfinite(v["zooms_on_target"]) else None),
      " ".join(f"{k} {100 * x:.0f}%" for k, x in v["status"].items() if x), f"{v['seconds']:.0f}")
      for name, v in s.items()]
  body += "\n\n" + markdown_table(["benchmark", "tool calls / answer", "zooms / answer", "zooms on target (%)",
                                   "ended", "seconds"], tool_rows)
  sources = sorted({p["source"] for v in s.values() for p in v["published"]})
  if sources:
    body += "\n\nPublished numbers: " + " | ".join(sources) + ". Protocols differ; context, not targets."
  return body
