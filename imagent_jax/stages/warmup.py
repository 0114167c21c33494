"""The ``warmup`` stage: train the tiny VLM from scratch into a tool-naive base.

Offline there is no pretrained VLM to start RL from, so the embedded default first trains one by
supervised next-token prediction (``rl.sft``) on the generated tasks of ``rl.warmup_tasks``, which
teach what a pretrained base would know and nothing about *when* to use a tool. After training
it runs the base probes (``evaluation.probes``) on held-out questions.

The trained base is saved as a Hugging Face folder under ``<workdir>/base``, with the config
entries it was trained with (``RECIPE_FILE``), and reused by later runs in the same workdir when
their recipe is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from imagent_jax import compile_clock, parallel
from imagent_jax.agent import protocol
from imagent_jax.evaluation import probes
from imagent_jax.models import hf_io
from imagent_jax.reporting import MetricsWriter, Report, markdown_table
from imagent_jax.rl import batch as batch_lib
from imagent_jax.rl import sft, warmup_tasks
from imagent_jax.stages import build


RECIPE_FILE = "warmup_recipe.json"  # beside the base's weights: the config entries it was trained with
# How the base is computed (attention implementation) and budgets of other data are not its recipe.
_NOT_IN_RECIPE = {"model": ("checkpoint", "export_hf", "from_warmup_base", "attention", "attention_block",
                            "scan_layers"),
                  "data": ("source", "data_dir", "train_size", "validation_size", "test_size", "train_path",
                           "validation_path", "test_path", "on_error", "max_images_per_question", "image_root"),
                  "warmup": ("progress_bar", "log_every", "probe_examples", "image_bucket")}


def recipe(config) -> dict:
  """The config entries that shape the warmup base: ``seed`` and the ``model``, ``processor``,
  ``data``, ``tools`` and ``warmup`` sections, without paths, dataset sizes and logging.

  Args:
    config: a ``ConfigDict`` or its plain-dict form (e.g. a run's ``config.json``).

  Returns:
    ``{"seed": ..., "model": {...}, ...}`` with JSON values (two recipes compare with ``==``).
  """
  plain = config.to_dict() if hasattr(config, "to_dict") else config
  out = {"seed": plain["seed"]}
  for section in ("model", "processor", "data", "tools", "warmup"):
    out[section] = {k: v for k, v in plain[section].items() if k not in _NOT_IN_RECIPE.get(section, ())}
  if not out["tools"].get("listed"):  # "" lists the enabled tools: the prompt of bases older than the key
    out["tools"].pop("listed", None)
  return json.loads(json.dumps(out))


def recipe_differences(trained: dict, wanted: dict) -> list[str]:
  """``"section.key: base X, config Y"`` for every recipe entry where ``trained`` and ``wanted`` differ."""
  out = []
  for section in sorted(set(trained) | set(wanted)):
    a, b = trained.get(section), wanted.get(section)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{section}.{k}: base {a.get(k, '(unset)')!r}, config {b.get(k, '(unset)')!r}"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      out.append(f"{section}: base {a!r}, config {b!r}")
  return out


def check_reused_base(config, base: str) -> None:
  """Raises ``ValueError`` (``"invalid config: ..."``) when the base in ``base`` was trained with
  another recipe than ``config``'s; a base without a recipe file (older runs) is not checked."""
  path = os.path.join(base, RECIPE_FILE)
  if not os.path.isfile(path):
    print(f"  ({base} has no {RECIPE_FILE}: its training config cannot be checked against this one)")
    return
  with open(path) as f:
    diffs = recipe_differences(json.load(f), recipe(config))
  if diffs:
    raise ValueError(f"invalid config: the warmup base in {base} was trained with another recipe "
                     f"({'; '.join(diffs)}); delete that folder to train a base for this config, or use "
                     f"another workdir")


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  """Trains (or reuses) the tool-naive base and saves it under ``<workdir>/base``."""
  out_dir = build.base_dir(workdir)
  if os.path.isfile(os.path.join(out_dir, "config.json")):
    check_reused_base(config, out_dir)
    print(f"Reusing the warmup base in {out_dir} (delete it to train again)")
    report.add("Warmup", f"Reused the tool-naive base in `{out_dir}`.")
    return {"reused": True}
  w = config.warmup
  mesh = parallel.make_mesh(dict(config.mesh))
  model_config, params, processor, tok_dir = build.load_model_and_processor(config, workdir, mesh,
                                                                               random_init=True)
  model = build.build_model(config, model_config)
  tcfg = build.tool_config(config)
  system = protocol.system_prompt(build.listed_tool_schemas(config), config.tools.prompt_style)
  warm = min(w.warmup_steps, max(1, w.steps // 2))
  schedule = optax.warmup_cosine_decay_schedule(0.0, w.learning_rate, warm, max(warm + 1, w.steps),
                                                w.learning_rate * 0.1)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=w.weight_decay))
  step_fn = sft.make_step(model, optimizer, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=step_fn.opt_state_shardings)(params)
  pad = model_config.pad_token_id if model_config.pad_token_id is not None else 0
  slot_patches = batch_lib.BatchConfig(patch_budget=w.patch_budget, image_slots=w.image_slots,
                                       image_settings=dict(processor.image_settings,
                                                           max_pixels=config.processor.max_pixels),
                                       view_max_pixels=tcfg.view_max_pixels).image_patches

  def make_batch(step: int):
    """Step ``step``'s examples and batch (its images in as few vision slots as hold them)."""
    examples = [warmup_tasks.make_example(config, step * w.batch_size + i, tcfg, system) for i in range(w.batch_size)]
    batch = sft.encode_batch(processor, examples, w.max_len, w.patch_budget, w.image_slots, pad,
                             model_config.eos_token_id)
    return examples, batch_lib.trim_image_budget(batch, w.image_bucket, slot_patches)

  t0 = time.perf_counter()
  history = []
  bar = tqdm(range(w.steps), desc="warmup", disable=not w.progress_bar)
  examples, batch = make_batch(0)
  for step in bar:
    compiling = compile_clock.seconds()
    params, opt_state, m = step_fn(params, opt_state, batch)  # dispatched: the device works while ...
    compile_s = compile_clock.seconds() - compiling  # a new batch shape compiles before it dispatches
    current = examples
    if step + 1 < w.steps:
      examples, batch = make_batch(step + 1)  # ... the host draws and encodes the next batch
    row_loss = np.asarray(m.pop("row_loss"))
    m = {k: float(v) for k, v in m.items()}
    for name in sorted({e[3] for e in current}):  # each task's mean loss: which skill lags
      m[f"loss/{name}"] = float(np.mean([l for l, e in zip(row_loss, current) if e[3] == name]))
    history.append(m)
    bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['token_accuracy']:.2f}", **compile_clock.postfix(compile_s))
    if step % max(1, w.log_every) == 0 or step == w.steps - 1:
      metrics.write(step, "warmup", **m, learning_rate=float(schedule(step)))
  seconds = time.perf_counter() - t0
  hf_io.save_pretrained(out_dir, model_config, params)
  with open(os.path.join(out_dir, RECIPE_FILE), "w") as f:
    json.dump(recipe(config), f, indent=2)
  for name in os.listdir(tok_dir):  # the tokenizer and image settings travel with the weights
    if not (name.endswith(".safetensors") or name in ("config.json", "generation_config.json",
                                                        "model.safetensors.index.json")):
      shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, name))
  last = history[-1]
  tail = history[-20:]
  task_loss = {k: float(np.mean([h[k] for h in tail if k in h])) for k in sorted({k for h in tail for k in h})
               if k.startswith("loss/")}
  print(f"Warmup: {w.steps} steps in {seconds:.0f}s; final loss {last['loss']:.3f}, "
        f"token accuracy {last['token_accuracy']:.2f}; base saved to {out_dir}")
  print("  loss by task (mean of the last 20 steps): " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in task_loss.items()))
  probe = {}
  if w.probe_examples > 0:
    held_out = build.eval_examples(config, workdir, "validation", w.probe_examples)
    probe = probes.read_zoom_probe(model_config, params, processor, held_out, tcfg, system)
    probe.update(probes.image_choice_probe(model, params, processor, held_out, tcfg, system, max_len=w.max_len))
    metrics.write(w.steps, "warmup_probe", **probe)
    options = held_out[0].get("options") if held_out else None
    chance = f" (chance {1 / len(options):.2f})" if options else ""
    print(f"Reading a handed zoom (the ceiling for RL with confirm): accuracy {probe['read_zoom_accuracy']:.3f} "
          f"on {len(held_out)} validation questions{chance}")
    if "call_on_asked_image" in probe:
      print(f"Which image its zoom names (questions with 2+ images): the asked one with probability "
            f"{probe['call_on_asked_image']:.3f} (chance {probe['call_on_asked_image_chance']:.3f}), the most "
            f"likely one for {probe['call_on_asked_image_argmax']:.0%} of them")
  report.add("Warmup", markdown_table(["measure", "value"], [
      ("steps", w.steps), ("seconds", round(seconds, 1)), ("first loss", round(history[0]["loss"], 4)),
      ("final loss", round(last["loss"], 4)), ("final token accuracy", round(last["token_accuracy"], 4)),
      ("tasks", w.tasks), ("base checkpoint", f"`{out_dir}`")]
      + [(f"{k} (mean of the last 20 steps)", round(v, 4)) for k, v in task_loss.items()]
      + [(f"{k} ({w.probe_examples} validation questions)", round(v, 4)) for k, v in probe.items()]))
  return {"steps": w.steps, "seconds": seconds, **last, **probe}
