"""``confirm(image, bbox_2d)``: visual confirmation, the paper's second tool.

Crops a region of any view (an input image or an earlier tool view) and returns it zoomed in to
the tool-view budget (``ToolConfig.view_max_pixels``, via ``smart_resize``), cut from the view's
root in one resampling step.

Box rules (each failure is an error observation, never an exception):

* a box must be a list of 4 finite JSON numbers, otherwise ``bad_box``;
* reversed corners are swapped (the region is unambiguous);
* the box is clamped to the view; nothing left: ``box_outside`` (``bad_box`` for a zero-area box);
* a side shorter than ``min_box_side`` *root* pixels grows around its centre (shifted to stay
  inside the view), which bounds how far zooms of zooms can magnify the root;
* a region more elongated than ``max_aspect``:1 is refused (``extreme_aspect``).

``zoom_view`` and ``legibility`` run the tool outside a rollout: what a zoom on a box of an image
shows, and how large a data example's deciding detail is there and at the base view.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from PIL import Image

from imagent_jax.agent.protocol import ToolCall
from imagent_jax.agent.tools.base import (IMAGE_PARAM, Box, ToolConfig, ToolContext, ToolError, ToolOutput, ViewRef,
                                          aspect, describe, fit_view_size, register_tool, run_tool_call)
from imagent_jax.processing import images as images_lib


def _check_box(value: Any) -> Box:
  """Four finite numbers from a JSON box argument; ``ToolError("bad_box")`` otherwise."""
  if not isinstance(value, (list, tuple)) or len(value) != 4:
    raise ToolError("bad_box", f"bbox_2d must be a list of 4 numbers [x0, y0, x1, y1], got "
                               f"{describe(value)}")
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    raise ToolError("bad_box", f"bbox_2d must hold 4 numbers, got {describe(value)}")
  try:
    box = tuple(float(v) for v in value)
  except OverflowError:  # ints too large for a float.
    raise ToolError("bad_box", "bbox_2d numbers are too large") from None
  if not all(math.isfinite(v) for v in box):
    raise ToolError("bad_box", f"bbox_2d must hold finite numbers, got {describe(value)}")
  return box  # type: ignore[return-value]


def _grow(lo: float, hi: float, side: float, limit_lo: float, limit_hi: float) -> tuple[float, float]:
  """Widens ``[lo, hi]`` to ``side`` around its centre, shifted to stay in ``[limit_lo, limit_hi]``."""
  if hi - lo >= side:
    return lo, hi
  centre = (lo + hi) / 2
  lo = min(max(centre - side / 2, limit_lo), limit_hi - side)
  return lo, lo + side


@register_tool("confirm", "Crop a region of an image and show it zoomed in, to check details.", {
    "type": "object", "properties": {
        "image": IMAGE_PARAM,
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                    "description": "Region [x0, y0, x1, y1] in pixels of that image."}},
    "required": ["image", "bbox_2d"]})
def confirm(ctx: ToolContext, image: Any, bbox_2d: Any) -> ToolOutput:
  """Crops ``bbox_2d`` (shown pixels of view ``image``) from the root and zooms it to the budget."""
  k = ctx.check_view_index(image)
  x0, y0, x1, y1 = _check_box(bbox_2d)
  x0, x1 = min(x0, x1), max(x0, x1)
  y0, y1 = min(y0, y1), max(y0, y1)
  width, height = ctx.shown_sizes[k - 1]
  if x1 - x0 <= 0 or y1 - y0 <= 0:
    raise ToolError("bad_box", f"bbox_2d {describe(list(bbox_2d), 60)} is empty (zero width or height)")
  cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
  if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
    raise ToolError("box_outside", f"bbox_2d {describe(list(bbox_2d), 60)} lies outside image {k}, "
                                   f"which is {width}x{height} pixels")
  ref = ctx.refs[k - 1]
  a0, b0, a1, b1 = ref.root_box
  r0, s0, r1, s1 = ctx.to_root(k, (cx0, cy0, cx1, cy1))
  side = ctx.config.min_box_side
  r0, r1 = _grow(r0, r1, min(side, a1 - a0), a0, a1)
  s0, s1 = _grow(s0, s1, min(side, b1 - b0), b0, b1)
  if aspect(r1 - r0, s1 - s0) > ctx.config.max_aspect:
    raise ToolError("extreme_aspect", f"bbox_2d is too elongated ({cx1 - cx0:.0f}x{cy1 - cy0:.0f}); keep "
                                      f"the long side within {ctx.config.max_aspect:g} times the short side")
  root_box = (r0, s0, r1, s1)
  box = ctx.from_root(k, root_box)
  view = ctx.render(ref.root, root_box, fit_view_size(r1 - r0, s1 - s0, ctx.config, upscale=True))
  shown = "[" + ", ".join(str(round(v)) for v in box) + "]"
  return ToolOutput(text=f"zoom of image {k} at {shown}", image=view,
                    ref=ViewRef(source=k, box=box, root=ref.root, root_box=root_box))


# --------------------------------------------------------------------------------------------
# The tool outside a rollout.


def zoom_view(image: Image.Image, box: Sequence[float], *, min_pixels: int = images_lib.MIN_PIXELS,
              max_pixels: int = 28 * 28 * 64, view_max_pixels: int = 28 * 28 * 64,
              min_box_side: float = 28.0) -> tuple[Image.Image, tuple[float, float, float, float]]:
  """What ``confirm`` returns for ``box`` (in the image's own pixels), run through the real tool.

  Args:
    image: a full-resolution input image.
    box: ``[x0, y0, x1, y1]`` in ``image``'s pixels.
    min_pixels: the processor's ``min_pixels``.
    max_pixels: the processor's ``max_pixels`` (the base view the model gives boxes in).
    view_max_pixels: the tool view budget.
    min_box_side: the tools' shortest crop side in image pixels.

  Returns:
    ``(view, region)``: the zoomed RGB view and the region of ``image`` it shows (after growing).
  """
  config = ToolConfig(tools=("confirm",), input_min_pixels=min_pixels, input_max_pixels=max_pixels,
                      view_min_pixels=max(min_pixels, images_lib.MIN_PIXELS), view_max_pixels=view_max_pixels,
                      min_box_side=min_box_side)
  ctx = ToolContext([image], config)
  width, height = ctx.shown_sizes[0]
  sx, sy = width / ctx.views[0].width, height / ctx.views[0].height
  shown = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
  result = run_tool_call(ctx, ToolCall("confirm", {"image": 1, "bbox_2d": shown}))
  if not result.ok:
    raise ValueError(f"confirm refused box {list(box)}: {result.text}")
  return result.image, ctx.refs[-1].root_box


def legibility(example: dict[str, Any], *, min_pixels: int = images_lib.MIN_PIXELS, max_pixels: int = 28 * 28 * 64,
               view_max_pixels: int = 28 * 28 * 64, min_box_side: float = 28.0) -> dict[str, Any]:
  """How large the deciding detail of a generated example is at the base view and in a zoom.

  The example is a ``data.synthetic.generate_example`` record (``images``, ``target_image``,
  ``target_box``, ``detail_size``). The zoom is ``confirm`` on ``target_box``. Sizes are the
  detail's ``detail_size`` times the view's linear scale (geometric mean of the x and y scales).

  Returns:
    ``base_px`` and ``zoom_px`` (detail size in base-view and zoom pixels), ``base_scale`` and
    ``zoom_scale``, and the two views ``base_view`` / ``zoom_view`` of the target image.
  """
  image = images_lib.to_rgb(example["images"][example["target_image"]])
  width, height = image.size
  bh, bw = images_lib.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
  base_scale = math.sqrt(bw / width * bh / height)
  zoom, (x0, y0, x1, y1) = zoom_view(image, example["target_box"], min_pixels=min_pixels, max_pixels=max_pixels,
                                     view_max_pixels=view_max_pixels, min_box_side=min_box_side)
  zoom_scale = math.sqrt(zoom.width / (x1 - x0) * zoom.height / (y1 - y0))
  detail = float(example["detail_size"])
  return {"base_px": detail * base_scale, "zoom_px": detail * zoom_scale, "base_scale": base_scale,
          "zoom_scale": zoom_scale, "base_view": image.resize((bw, bh), resample=Image.Resampling.BICUBIC),
          "zoom_view": zoom}
