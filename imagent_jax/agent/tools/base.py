"""What every image tool shares: the registry, the trajectory's views, the limits, the executor.

Views. A trajectory's images are numbered as the model sees them (1-based): views 1..N are the
input images, then every image a tool returned, in order. ``ToolContext`` holds them with their
provenance (``ViewRef``): the view each came from, the box in that view, and the *root* view
whose pixels are authoritative (an input image, unless a tool made new pixels) with the region
of the root the view shows. A crop of a crop is therefore always cut from the root in one
resampling step, never from an already-resized view.

Coordinates. Boxes are ``[x0, y0, x1, y1]`` in pixels of the addressed view *as the model was
shown it*: for an input image, its size after the processor's ``smart_resize``; for a tool view,
the size of the returned image (already a multiple of 28, so the processor keeps it). This is
Qwen2.5-VL's grounding convention (absolute coordinates on the resized input, as in DeepEyes).

``run_tool_call`` runs one call of the model: every malformed or refused call becomes an error
observation of one of ``ERROR_KINDS``, counted, never an exception. A returned image is resized
to the visual-token budget of a tool view (``view_max_pixels``) where it does not fit it.

The tools themselves live one per module beside this one (``reflect.py``, ``confirm.py``);
adding a tool is one new module with one registered function::

  @register_tool("flip", "Flip an image left to right.", {
      "type": "object", "properties": {"image": IMAGE_PARAM}, "required": ["image"]})
  def flip(ctx, image):
    k = ctx.check_view_index(image)
    flipped = ctx.views[k - 1].transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ToolOutput(text=f"image {k} flipped", image=flipped)

and one import line in ``agent/tools/__init__.py`` (the registration order is the order of the
system prompt's tool list).
"""


from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from PIL import Image

from imagent_jax.agent.protocol import ToolCall, Turn
from imagent_jax.processing import images as images_lib
from imagent_jax.registry import Registry

Box = tuple[float, float, float, float]
_DEFAULT_FACTOR = images_lib.PATCH_SIZE * images_lib.MERGE_SIZE  # the processor's default geometry

# Every ``error_kind`` a ToolResult can carry (also the error keys of ``ToolContext.counts``).
ERROR_KINDS = ("parse_error", "no_tool_call", "unknown_tool", "disabled_tool", "missing_argument", "extra_argument",
               "bad_argument", "bad_image_index", "bad_box", "box_outside", "extreme_aspect",
               "budget_exhausted", "tool_failed")
# The kinds that make a call *malformed* (its text is not a call of a known tool): the trajectory
# mask drops trajectories with such calls and they earn no format reward. The rest only fail
# (``disabled_tool``: a registered tool this run does not enable, e.g. one the prompt lists in a
# tool ablation, see ``config.tools.listed``).
MALFORMED_KINDS = ("parse_error", "unknown_tool")

_log = logging.getLogger(__name__)


class ToolError(Exception):
  """A tool's refusal of its arguments; becomes an error observation of kind ``kind``."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind
    self.message = message


# --------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class Tool:
  """A registered tool.

  Attributes:
    name: the name the model calls it by.
    description: one line for the system prompt.
    parameters: JSON schema of the arguments (an object schema; ``required`` lists mandatory
      ones; no other argument is accepted).
    fn: ``fn(ctx, **arguments) -> ToolOutput``; raises ``ToolError`` to refuse.
  """
  name: str
  description: str
  parameters: Mapping[str, Any]
  fn: Callable[..., "ToolOutput"]

  def schema(self) -> dict[str, Any]:
    """The JSON function spec for the system prompt."""
    return {"type": "function", "function": {"name": self.name, "description": self.description,
                                             "parameters": dict(self.parameters)}}


TOOLS: Registry[Tool] = Registry("tool")  # name -> Tool, in registration order (the prompt's order)
IMAGE_PARAM = {"type": "integer", "description": "Image number."}  # the schema of an image argument


def register_tool(name: str, description: str, parameters_schema: Mapping[str, Any]):
  """Decorator registering ``fn(ctx, **arguments) -> ToolOutput`` as tool ``name``.

  Args:
    name: tool name; an identifier not yet registered and not an error kind.
    description: what the tool does, for the model.
    parameters_schema: ``{"type": "object", "properties": {...}, "required": [...]}``; property
      names must be Python identifiers (they become keyword arguments).

  Returns:
    The decorator; it returns ``fn`` unchanged.

  Raises:
    ValueError: a bad name, a duplicate, or a malformed schema.
  """
  if not name.isidentifier() or name in TOOLS or name in ERROR_KINDS:
    raise ValueError(f"cannot register tool {name!r}: names must be identifiers, unique, and not an "
                     f"error kind; registered: {sorted(TOOLS)}")
  properties = parameters_schema.get("properties", {})
  if parameters_schema.get("type") != "object" or not isinstance(properties, Mapping):
    raise ValueError(f"tool {name!r}: parameters_schema must be an object schema with 'properties'")
  if not all(isinstance(p, str) and p.isidentifier() for p in properties):
    raise ValueError(f"tool {name!r}: property names must be identifiers, got {list(properties)}")
  missing = set(parameters_schema.get("required", ())) - set(properties)
  if missing:
    raise ValueError(f"tool {name!r}: required {sorted(missing)} not among the properties")

  def decorator(fn):
    TOOLS.add(name, Tool(name=name, description=description, parameters=parameters_schema, fn=fn))
    return fn

  return decorator


def available_tools(config_names: Union[str, Sequence[str], None] = None) -> tuple[str, ...]:
  """Resolves a config's tool selection to registered names (for ablations).

  Args:
    config_names: None or ``"all"``: every registered tool, in registration order; ``""`` or
      ``"none"``: no tools; otherwise names as a sequence or a comma-separated string.

  Returns:
    The tool names, duplicates dropped, in the given order.

  Raises:
    ValueError: an unknown name.
  """
  if config_names is None or config_names == "all":
    return tuple(TOOLS)
  if isinstance(config_names, str):
    config_names = [] if config_names.strip() in ("", "none") else config_names.split(",")
  names = tuple(dict.fromkeys(n.strip() for n in config_names))
  unknown = [n for n in names if n not in TOOLS]
  if unknown:
    raise ValueError(f"unknown tool(s) {unknown}; registered tools: {list(TOOLS)}")
  return names


def tool_schemas(names: Union[str, Sequence[str], None] = None) -> list[dict[str, Any]]:
  """JSON function specs of the selected tools (see ``available_tools``), for ``system_prompt``."""
  return [TOOLS[n].schema() for n in available_tools(names)]


# --------------------------------------------------------------------------------------------
# Context: config, views and provenance.


@dataclasses.dataclass(frozen=True)
class ToolConfig:
  """Limits of the tools, shared by all trajectories of a run.

  Attributes:
    tools: enabled tool names (None: every registered tool); others answer ``unknown_tool``.
    max_tool_images: images the tools may return per trajectory.
    view_min_pixels: smallest area of a returned view, at least ``input_min_pixels``.
    view_max_pixels: visual-token budget of a returned view, in pixels (``factor**2`` per token),
      at most ``input_max_pixels`` (so the processor shows a view at its own size).
    input_min_pixels: the processor's ``min_pixels`` (how the inputs were shown).
    input_max_pixels: the processor's ``max_pixels``.
    min_box_side: shortest crop side, in root pixels (smaller boxes grow around their centre).
    max_aspect: most elongated crop or re-shown view allowed (long side / short side).
    factor: the model's resize multiple (patch size x merge size, ``PatchGeometry.factor``):
      returned views have sides that are multiples of it.
  """
  tools: Optional[tuple[str, ...]] = None
  max_tool_images: int = 4
  view_min_pixels: int = images_lib.MIN_PIXELS
  view_max_pixels: int = _DEFAULT_FACTOR * _DEFAULT_FACTOR * 256
  input_min_pixels: int = images_lib.MIN_PIXELS
  input_max_pixels: int = images_lib.MAX_PIXELS
  min_box_side: float = float(_DEFAULT_FACTOR)
  max_aspect: float = 8.0
  factor: int = _DEFAULT_FACTOR

  def __post_init__(self):
    if self.tools is not None:
      object.__setattr__(self, "tools", available_tools(self.tools))
    if self.max_tool_images < 0:
      raise ValueError(f"max_tool_images must be >= 0, got {self.max_tool_images}")
    # Views inside the processor's [min_pixels, max_pixels] with sides multiples of factor are shown
    # at their own size, so boxes in a view's pixels mean what the model saw.
    if not (0 < self.input_min_pixels <= self.view_min_pixels <= self.view_max_pixels
            <= self.input_max_pixels):
      raise ValueError("need 0 < input_min_pixels <= view_min_pixels <= view_max_pixels <= "
                       f"input_max_pixels, got {self.input_min_pixels}, {self.view_min_pixels}, "
                       f"{self.view_max_pixels}, {self.input_max_pixels}")
    if not 1.0 <= self.max_aspect < images_lib.MAX_ASPECT_RATIO:
      raise ValueError(f"max_aspect must lie in [1, {images_lib.MAX_ASPECT_RATIO}), got {self.max_aspect}")
    f = self.factor
    if not f > 0:
      raise ValueError(f"factor must be > 0, got {f}")
    if self.view_max_pixels < f * f * self.max_aspect:
      raise ValueError(f"view_max_pixels={self.view_max_pixels} is too small for max_aspect="
                       f"{self.max_aspect}: a view's short side would drop below {f} pixels; need "
                       f">= {math.ceil(f * f * self.max_aspect)}")
    if not self.min_box_side > 0:
      raise ValueError(f"min_box_side must be > 0, got {self.min_box_side}")

  def enabled(self) -> tuple[str, ...]:
    """The enabled tool names."""
    return self.tools if self.tools is not None else tuple(TOOLS)


@dataclasses.dataclass(frozen=True)
class ViewRef:
  """Where a view's pixels come from. View numbers are 1-based, as the model sees them.

  Attributes:
    source: the view it was made from (itself for inputs and for new pixels).
    box: the box in ``source``'s shown pixels (after clamping and growing); None: all of it.
    root: the view whose stored pixels it is cut from (an input image, or a tool view that
      made new pixels).
    root_box: the region of ``root``, in the root's own stored pixels.
  """
  source: int
  box: Optional[Box]
  root: int
  root_box: Box


@dataclasses.dataclass(frozen=True)
class ToolOutput:
  """What a tool function returns.

  Attributes:
    text: short description of the result (``"zoom of image 2 at [...]"``); the executor
      prefixes ``"Image k: "`` when there is an image.
    image: the returned image, or None for a text-only result.
    ref: provenance of ``image``; None: the image is new pixels (its own root).
  """
  text: str
  image: Optional[Image.Image] = None
  ref: Optional[ViewRef] = None


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """The observation of one tool call.

  Attributes:
    ok: the call succeeded.
    image: the returned view (RGB, sides multiples of 28, area within the view budget) or None.
    text: the observation text for ``protocol.observation_suffix`` (result or error).
    error_kind: one of ``ERROR_KINDS`` when not ok.
    view_index: the 1-based number of the new view, when an image was returned.
  """
  ok: bool
  image: Optional[Image.Image]
  text: str
  error_kind: Optional[str] = None
  view_index: Optional[int] = None


class ToolContext:
  """One trajectory's views, their provenance, its tool limits and its call counts.

  Attributes:
    config: the ``ToolConfig``.
    views: the views' images, 0-based list (view k is ``views[k - 1]``): the inputs as given
      (RGB), then each returned view at the size the model was shown it.
    refs: the ``ViewRef`` of each view.
    shown_sizes: ``(width, height)`` the model saw each view at.
    num_inputs: N.
    counts: ``Counter`` of error kinds and, for successes, tool names.
  """

  def __init__(self, images: Sequence[images_lib.ImageLike], config: ToolConfig = ToolConfig()):
    """Starts a trajectory.

    Args:
      images: the N input images (PIL or uint8 arrays, any mode), full resolution.
      config: tool limits.

    Raises:
      ValueError: an input image that the processor would refuse (empty, > 200:1).
    """
    self.config = config
    self.views: list[Image.Image] = []
    self.refs: list[ViewRef] = []
    self.shown_sizes: list[tuple[int, int]] = []
    self.counts: collections.Counter = collections.Counter()
    for index, image in enumerate(images):
      try:
        rgb = images_lib.to_rgb(image)
        height, width = images_lib.smart_resize(rgb.height, rgb.width, factor=config.factor,
                                                min_pixels=config.input_min_pixels,
                                                max_pixels=config.input_max_pixels)
      except ValueError as e:
        raise ValueError(f"input image {index + 1}: {e}") from e
      self.views.append(rgb)
      self.refs.append(ViewRef(source=index + 1, box=None, root=index + 1,
                               root_box=(0.0, 0.0, float(rgb.width), float(rgb.height))))
      self.shown_sizes.append((width, height))
    self.num_inputs = len(self.views)

  @property
  def num_tool_images(self) -> int:
    """Views returned by tools so far."""
    return len(self.views) - self.num_inputs

  @property
  def errors(self) -> collections.Counter:
    """Failed calls by error kind."""
    return collections.Counter({k: v for k, v in self.counts.items() if k in ERROR_KINDS})

  @property
  def successes(self) -> collections.Counter:
    """Successful calls by tool name."""
    return collections.Counter({k: v for k, v in self.counts.items() if k not in ERROR_KINDS})

  def check_view_index(self, value: Any) -> int:
    """A valid 1-based view number from a JSON argument; ``ToolError`` otherwise.

    Integers and integral floats (``2.0``) are accepted; booleans and strings are not.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ToolError("bad_image_index", f"image must be an integer, got {describe(value)}")
    if isinstance(value, float):
      if not math.isfinite(value) or value != int(value):
        raise ToolError("bad_image_index", f"image must be an integer, got {value!r}")
      value = int(value)
    if not 1 <= value <= len(self.views):
      raise ToolError("bad_image_index", f"there is no image {describe(value)}; images are numbered 1 "
                                         f"to {len(self.views)}")
    return value

  def render(self, root: int, root_box: Box, size: tuple[int, int]) -> Image.Image:
    """The region ``root_box`` of view ``root``'s pixels resampled (bicubic) to ``size``.

    Args:
      root: 1-based view number.
      root_box: ``(x0, y0, x1, y1)`` in that view's pixels (fractional allowed).
      size: ``(width, height)`` of the result.

    Returns:
      An RGB image of ``size``.
    """
    return self.views[root - 1].resize(size, resample=Image.Resampling.BICUBIC, box=root_box)

  def to_root(self, view: int, box: Box) -> Box:
    """Maps ``box`` from view ``view``'s shown pixels to its root's pixels."""
    (a0, b0, a1, b1), (width, height) = self.refs[view - 1].root_box, self.shown_sizes[view - 1]
    sx, sy = (a1 - a0) / width, (b1 - b0) / height
    x0, y0, x1, y1 = box
    return (a0 + x0 * sx, b0 + y0 * sy, a0 + x1 * sx, b0 + y1 * sy)

  def from_root(self, view: int, root_box: Box) -> Box:
    """Maps ``root_box`` from view ``view``'s root pixels to the view's shown pixels."""
    (a0, b0, a1, b1), (width, height) = self.refs[view - 1].root_box, self.shown_sizes[view - 1]
    sx, sy = width / (a1 - a0), height / (b1 - b0)
    x0, y0, x1, y1 = root_box
    return ((x0 - a0) * sx, (y0 - b0) * sy, (x1 - a0) * sx, (y1 - b0) * sy)

  def add_view(self, image: Image.Image, ref: Optional[ViewRef]) -> int:
    """Appends a returned view (``ref`` None: its own root); returns its 1-based number."""
    number = len(self.views) + 1
    if ref is None:
      ref = ViewRef(source=number, box=None, root=number,
                    root_box=(0.0, 0.0, float(image.width), float(image.height)))
    self.views.append(image)
    self.refs.append(ref)
    self.shown_sizes.append(image.size)
    return number


# --------------------------------------------------------------------------------------------
# Sizing and error-text helpers.


def describe(value: Any, limit: int = 24) -> str:
  """A short, tag-free rendering of an untrusted JSON value for error texts."""
  text = repr(value) if not isinstance(value, str) else '"' + value + '"'
  text = "".join(c for c in text if c not in "<>|")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def aspect(width: float, height: float) -> float:
  """Long side over short side."""
  return max(width, height) / min(width, height)


def fit_view_size(width: float, height: float, config: ToolConfig, *, upscale: bool) -> tuple[int, int]:
  """``(width, height)`` of a returned view of a ``width x height`` region, within the budget.

  Args:
    width: region width (> 0, any unit; only the aspect and, without ``upscale``, the size count).
    height: region height (> 0).
    config: gives ``view_min_pixels`` / ``view_max_pixels``.
    upscale: scale the region to use the whole budget (zoom) rather than keep its size.

  Returns:
    Sides that are multiples of ``config.factor`` with area in ``[view_min_pixels, view_max_pixels]`` (for
    aspect ratios up to ``max_aspect``).
  """
  if upscale:
    scale = math.sqrt(config.view_max_pixels / (width * height))
    width, height = width * scale, height * scale
  h, w = images_lib.smart_resize(max(1, round(height)), max(1, round(width)), factor=config.factor,
                                 min_pixels=config.view_min_pixels, max_pixels=config.view_max_pixels)
  return w, h


def _conforms(image: Image.Image, config: ToolConfig) -> bool:
  """The image's sides are multiples of ``config.factor`` and its area lies within the view budget."""
  w, h = image.size
  return (w % config.factor == 0 and h % config.factor == 0
          and config.view_min_pixels <= w * h <= config.view_max_pixels)


# --------------------------------------------------------------------------------------------
# Executor.


def _failure(ctx: ToolContext, kind: str, message: str) -> ToolResult:
  """Counts and returns an error observation."""
  ctx.counts[kind] += 1
  return ToolResult(ok=False, image=None, text=f"Error: {message}", error_kind=kind)


def _check_arguments(tool: Tool, arguments: Mapping[str, Any]) -> Optional[tuple[str, str]]:
  """``(kind, message)`` for missing or unexpected arguments, or None."""
  properties = tool.parameters.get("properties", {})
  missing = [p for p in tool.parameters.get("required", ()) if p not in arguments]
  if missing:
    return "missing_argument", f"{tool.name} needs argument(s) {', '.join(missing)}"
  extra = [a for a in arguments if a not in properties]
  if extra:
    names = ", ".join(describe(a) for a in extra[:3])
    return "extra_argument", f"{tool.name} takes no argument(s) {names}; it takes {', '.join(properties)}"
  return None


def _finish_image(ctx: ToolContext, output: ToolOutput) -> Image.Image | ToolResult:
  """The output image as a view (RGB, within the budget), or an error result."""
  image = images_lib.to_rgb(output.image)
  if _conforms(image, ctx.config):
    return image
  if aspect(image.width, image.height) > ctx.config.max_aspect:
    return _failure(ctx, "extreme_aspect", f"the result ({image.width}x{image.height}) is too elongated")
  size = fit_view_size(image.width, image.height, ctx.config, upscale=False)
  return image.resize(size, resample=Image.Resampling.BICUBIC)


def run_tool_call(ctx: ToolContext, call_or_error: Union[ToolCall, Turn, str, None]) -> ToolResult:
  """Runs one tool call of the model against its trajectory's views; never raises.

  Args:
    ctx: the trajectory's context; a returned image is appended as the next view.
    call_or_error: a parsed ``ToolCall``; a ``Turn`` (its call or its ``tool_call_error``); a
      parse-error string (``parse_error``); None (no call found: ``no_tool_call``).

  Returns:
    A ``ToolResult``. Failures carry ``ok=False``, ``error_kind`` and an ``"Error: ..."`` text the
    model reads; every call is counted in ``ctx.counts`` (error kind, or tool name on success).
  """
  try:
    return _run(ctx, call_or_error)
  except Exception as e:  # noqa: BLE001 - the model's actions must never crash the rollout.
    _log.exception("tool call %r failed", call_or_error)
    return _failure(ctx, "tool_failed", f"the tool failed ({type(e).__name__})")


def _run(ctx: ToolContext, call: Union[ToolCall, Turn, str, None]) -> ToolResult:
  """``run_tool_call`` without the last-resort exception guard."""
  if isinstance(call, Turn):
    call = call.tool_call if call.tool_call is not None else call.tool_call_error
  if isinstance(call, str):
    return _failure(ctx, "parse_error", call)
  if not isinstance(call, ToolCall):
    return _failure(ctx, "no_tool_call", "no tool call found; write <tool_call>{\"name\": ..., "
                                         "\"arguments\": {...}}</tool_call>")
  enabled = ctx.config.enabled()
  if call.name not in TOOLS:
    return _failure(ctx, "unknown_tool", f"there is no tool {describe(call.name)}; tools: "
                                         f"{', '.join(enabled) or 'none'}")
  if call.name not in enabled:
    return _failure(ctx, "disabled_tool", f"the tool {call.name} is not available in this run; tools: "
                                          f"{', '.join(enabled) or 'none'}")
  tool = TOOLS[call.name]
  if not isinstance(call.arguments, Mapping):
    return _failure(ctx, "bad_argument", "arguments must be a JSON object")
  problem = _check_arguments(tool, call.arguments)
  if problem is not None:
    return _failure(ctx, *problem)
  try:
    output = tool.fn(ctx, **call.arguments)
  except ToolError as e:
    kind = e.kind if e.kind in ERROR_KINDS else "tool_failed"
    return _failure(ctx, kind, e.message)
  if output.image is None:
    ctx.counts[tool.name] += 1
    return ToolResult(ok=True, image=None, text=output.text)
  if ctx.num_tool_images >= ctx.config.max_tool_images:
    return _failure(ctx, "budget_exhausted", f"no images left: at most {ctx.config.max_tool_images} tool "
                                             "images per question; answer now")
  image = _finish_image(ctx, output)
  if isinstance(image, ToolResult):
    return image
  number = ctx.add_view(image, output.ref)
  ctx.counts[tool.name] += 1
  return ToolResult(ok=True, image=image, text=f"Image {number}: {output.text}.", view_index=number)
