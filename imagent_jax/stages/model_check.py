"""The ``model`` stage: load or build the VLM, run it on a synthetic multi-image batch, report.

It is the quickest end-to-end check of a setup — checkpoint and tokenizer folders, mesh, dtypes —
before any rollout or training compiles: it prints the parameter count by part, how each image was
resized and how many tokens it became, the forward time, and the next-token prediction; with
``config.model.export_hf`` it writes the weights back as a Hugging Face folder and checks that the
reloaded model gives the same logits.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np

from imagent_jax import parallel
from imagent_jax.stages import build
from imagent_jax.data import synthetic
from imagent_jax.models import hf_io
from imagent_jax.models import registry, tree
from imagent_jax.reporting import MetricsWriter, Report, markdown_table, text_table

log = logging.getLogger("imagent_jax")


def _param_table(model_config, params) -> list[tuple[str, int, str]]:
  parts = registry.family_of(model_config).param_parts(params)
  total = tree.count_params(params)
  return [(k, tree.count_params(v), f"{100 * tree.count_params(v) / total:.1f}%") for k, v in parts.items()] + [
      ("total", total, "100%")]


def demo_batch(config, processor):
  """A batch of synthetic multi-image chats: row ``i`` shows ``num_images`` scenes of random sizes."""
  rng = np.random.default_rng(config.seed)
  d = config.demo
  messages, images = [], []
  for row in range(d.batch_size):
    n = max(0, d.num_images - row)  # rows differ in length: exercises left padding
    imgs = [synthetic.random_scene(rng, int(rng.integers(d.min_side, d.max_side + 1)),
                                   int(rng.integers(d.min_side, d.max_side + 1))) for _ in range(n)]
    content = [{"type": "image"} for _ in imgs] + [
        {"type": "text", "text": f"Which of the {n} images shows the most red shapes?"}]
    messages.append([{"role": "user", "content": content}])
    images.append(imgs)
  return messages, images


def run(config, workdir: str, report: Report, metrics: MetricsWriter) -> dict:
  """Runs the model stage; returns its summary numbers (also written to metrics.jsonl)."""
  mesh = parallel.make_mesh(dict(config.mesh))
  t0 = time.perf_counter()
  model_config, params, processor, _ = build.load_model_and_processor(config, workdir, mesh)
  t_load = time.perf_counter() - t0
  rows = _param_table(model_config, params)
  print("\nModel parameters\n" + text_table(["part", "parameters", "share"], rows))

  messages, images = demo_batch(config, processor)
  inputs = processor(messages, images)
  family = registry.family_of(model_config)
  geometry = family.geometry(model_config)
  family.check_image_tokens(model_config, inputs["input_ids"], inputs.get("image_grid_thw"))
  grids = inputs.get("image_grid_thw", np.zeros((0, 3), np.int32))
  flat_images = [im for row in images for im in row]
  img_rows = [(i, f"{im.width}x{im.height}", f"{g[2] * geometry.patch_size}x{g[1] * geometry.patch_size}",
               f"{g[1]}x{g[2]}", int(g.prod()) // geometry.merge_unit) for i, (im, g) in enumerate(zip(flat_images, grids))]
  print(f"\nImages (resized to multiples of {geometry.factor} within min/max pixels)\n" +
        text_table(["image", "input WxH", "resized WxH", "patch grid", "tokens"], img_rows))

  model = build.build_model(config, model_config)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, **x))
  feed = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in inputs}
  t0 = time.perf_counter()
  logits = jax.block_until_ready(fwd(params, feed))
  t_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits = jax.block_until_ready(fwd(params, feed))
  t_run = time.perf_counter() - t0
  logits = np.asarray(logits)
  if not np.isfinite(logits).all():
    raise FloatingPointError("the forward pass produced non-finite logits")
  b, l = inputs["input_ids"].shape
  next_ids = logits[:, -1].argmax(-1)
  print(f"\nForward: batch {b} x {l} tokens, {len(flat_images)} images -> logits {logits.shape}; "
        f"first call (compile + run) {t_first:.2f}s, then {t_run * 1e3:.1f} ms")
  note = "" if build.model_source(config, workdir) else "  (random weights: noise is expected)"
  for i, tid in enumerate(next_ids):
    print(f"  row {i}: predicted next token {int(tid)} {processor.tokenizer.id_to_token(int(tid))!r}{note}")

  summary = dict(params=rows[-1][1], batch=b, tokens=l, images=len(flat_images), load_s=round(t_load, 3),
                 compile_and_run_s=round(t_first, 3), forward_ms=round(t_run * 1e3, 2),
                 image_tokens=int((inputs["input_ids"] == family.image_token_id(model_config)).sum()))
  if config.model.export_hf:
    export = os.path.join(workdir, "hf_export")
    hf_io.save_pretrained(export, model_config, params)
    _, reloaded = hf_io.load_pretrained(export, dtype=build.DTYPES[config.model.param_dtype], mesh=mesh)
    diff = float(np.abs(np.asarray(fwd(reloaded, feed)) - logits).max())
    print(f"\nExported a Hugging Face checkpoint to {export}; reloaded max |logit diff| = {diff:.2e}")
    summary["export_max_logit_diff"] = diff
    if diff > 1e-5:
      raise RuntimeError(f"the exported checkpoint reloads with different logits (max diff {diff})")

  layout_png = None
  if len(flat_images):
    layout_png = family.plot_vision_layout(model_config, flat_images, grids, os.path.join(workdir, "vision_windows.png"))
  metrics.write(0, "model", **summary)
  src = build.model_source(config, workdir) or f"preset '{config.model.preset}' (random init)"
  body = [f"Model: {src}; compute dtype {config.model.dtype}, params {config.model.param_dtype}; "
          f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s).", "",
          markdown_table(["part", "parameters", "share"], rows), "",
          markdown_table(["image", "input WxH", "resized WxH", "patch grid", "tokens"], img_rows), "",
          markdown_table(["measure", "value"], [(k, v) for k, v in summary.items()])]
  if layout_png:
    body += ["", f"![vision windows]({os.path.basename(layout_png)})"]
  report.add("Model check", "\n".join(body))
  return summary
