"""``reflect(image)``: visual reflection, the paper's first tool.

Re-shows a view whole, so the model can look at an image again after a long stretch of text
(VLMs neglect images as their reasoning grows longer). The view keeps its shown size, shrunk to
the tool-view budget (``ToolConfig.view_max_pixels``) when larger; a view more elongated than
``max_aspect``:1 is refused (``extreme_aspect``): zoom into a part of it instead.
"""

from __future__ import annotations

from typing import Any

from imagent_jax.agent.tools.base import (IMAGE_PARAM, ToolContext, ToolError, ToolOutput, ViewRef, aspect,
                                          fit_view_size, register_tool)


@register_tool("reflect", "Show an image again, to look at it once more.", {
    "type": "object", "properties": {"image": IMAGE_PARAM}, "required": ["image"]})
def reflect(ctx: ToolContext, image: Any) -> ToolOutput:
  """Re-shows view ``image`` whole, at its shown size (shrunk to the view budget if larger)."""
  k = ctx.check_view_index(image)
  width, height = ctx.shown_sizes[k - 1]
  if aspect(width, height) > ctx.config.max_aspect:
    raise ToolError("extreme_aspect", f"image {k} ({width}x{height}) is too elongated to show again; "
                                      "zoom into a part of it with a box instead")
  ref = ctx.refs[k - 1]
  size = fit_view_size(width, height, ctx.config, upscale=False)
  view = ctx.render(ref.root, ref.root_box, size)
  return ToolOutput(text=f"image {k} again", image=view,
                    ref=ViewRef(source=k, box=None, root=ref.root, root_box=ref.root_box))
