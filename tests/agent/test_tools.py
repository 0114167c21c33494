"""Tests for imagent_jax.agent.tools: registry, views and provenance, reflect/confirm, errors, budget."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagent_jax.agent import protocol, tools
from imagent_jax.agent.protocol import ToolCall, parse_turn
from imagent_jax.agent.tools import (ERROR_KINDS, TOOLS, ToolConfig, ToolContext, ToolError, ToolOutput,
                                     available_tools, register_tool, run_tool_call, tool_schemas)
from imagent_jax.processing import smart_resize

# Small budgets keep resampling cheap: inputs shown at <= 448x448-ish, views at <= 224x224.
CONFIG = ToolConfig(max_tool_images=3, view_max_pixels=28 * 28 * 64, input_max_pixels=28 * 28 * 256,
                    min_box_side=28.0, max_aspect=8.0)
RED = (255, 0, 0)


def _smooth_image(width, height, seed=0):
  """A low-frequency RGB image: resampling it at different steps gives nearly the same pixels."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  channels = []
  for _ in range(3):
    fx, fy, phase = rng.uniform(1, 3, 2).tolist() + [rng.uniform(0, 6)]
    channels.append(127.5 + 120 * np.sin(2 * math.pi * (fx * x / width + fy * y / height) + phase))
  return Image.fromarray(np.stack(channels, -1).round().astype(np.uint8))


@pytest.fixture
def inputs():
  return [_smooth_image(640, 480, 0), _smooth_image(300, 500, 1), _smooth_image(1000, 200, 2)]


def _call(name, **arguments):
  return ToolCall(name, arguments)


def _confirm(ctx, image, box):
  return run_tool_call(ctx, _call("confirm", image=image, bbox_2d=list(box)))


def _assert_view_ok(result, ctx, config=CONFIG):
  assert result.ok and result.error_kind is None, result.text
  image = result.image
  assert image.mode == "RGB"
  assert image.width % 28 == 0 and image.height % 28 == 0
  assert config.view_min_pixels <= image.width * image.height <= config.view_max_pixels
  # The processor shows the view at exactly this size, so boxes on it mean what the model saw.
  assert smart_resize(image.height, image.width, min_pixels=config.input_min_pixels,
                      max_pixels=config.input_max_pixels) == (image.height, image.width)
  assert result.view_index == len(ctx.views) and ctx.views[-1] is image
  assert ctx.shown_sizes[-1] == image.size
  assert result.text.startswith(f"Image {result.view_index}: ")


# ------------------------------------------------------------------------------------------
# Context and config.


def test_context_views_and_shown_sizes(inputs):
  ctx = ToolContext(inputs, CONFIG)
  assert ctx.num_inputs == 3 and ctx.num_tool_images == 0
  for k, image in enumerate(inputs, start=1):
    ref = ctx.refs[k - 1]
    assert (ref.source, ref.box, ref.root) == (k, None, k)
    assert ref.root_box == (0, 0, image.width, image.height)
    h, w = smart_resize(image.height, image.width, min_pixels=CONFIG.input_min_pixels,
                        max_pixels=CONFIG.input_max_pixels)
    assert ctx.shown_sizes[k - 1] == (w, h)


def test_context_rejects_bad_inputs():
  with pytest.raises(ValueError, match="input image 2"):
    ToolContext([Image.new("RGB", (10, 10)), Image.new("RGB", (1000, 2))])
  grey = ToolContext([Image.new("L", (50, 60), 7)])
  assert grey.views[0].mode == "RGB"


@pytest.mark.parametrize("kwargs", [
    {"max_aspect": 200.0}, {"max_aspect": 0.5}, {"view_max_pixels": 28 * 28 * 4},
    {"view_min_pixels": 10 ** 7}, {"max_tool_images": -1}, {"min_box_side": 0.0},
    {"tools": ("confirm", "nope")}, {"input_min_pixels": 0}, {"view_max_pixels": 28 * 28 * 2000},
    {"input_min_pixels": 28 * 28 * 8},
])
def test_config_validation(kwargs):
  with pytest.raises(ValueError):
    ToolConfig(**kwargs)


def test_tools_are_one_registry_in_prompt_order():
  """Each tool is one module registering one function; the import order is the prompt's order."""
  from imagent_jax.registry import Registry
  assert isinstance(TOOLS, Registry) and TOOLS.names() == ("reflect", "confirm")
  assert [s["function"]["name"] for s in tool_schemas()] == ["reflect", "confirm"]
  assert TOOLS["reflect"].fn is tools.reflect.reflect and TOOLS["confirm"].fn is tools.confirm.confirm


def test_registry_selection():
  assert available_tools()[:2] == ("reflect", "confirm")
  assert available_tools("confirm") == ("confirm",)
  assert available_tools("reflect, confirm,reflect") == ("reflect", "confirm")
  assert available_tools("none") == () and available_tools([]) == ()
  with pytest.raises(ValueError, match="unknown tool"):
    available_tools(["zoom"])
  schemas = tool_schemas(["confirm"])
  assert [s["function"]["name"] for s in schemas] == ["confirm"]
  assert schemas[0]["function"]["parameters"]["required"] == ["image", "bbox_2d"]
  with pytest.raises(ValueError):
    register_tool("confirm", "dup", {"type": "object", "properties": {}})
  with pytest.raises(ValueError):
    register_tool("bad_box", "an error kind", {"type": "object", "properties": {}})
  with pytest.raises(ValueError):
    register_tool("x", "bad schema", {"type": "object", "properties": {"a-b": {}}})


@pytest.mark.parametrize("enabled, blocked", [(("reflect",), "confirm"), (("confirm",), "reflect")])
def test_ablation_disables_tools(inputs, enabled, blocked):
  """Tool ablations may list every tool but enable fewer (``config.tools.listed``): calling a
  registered, disabled tool is a failed call that names the available ones, not a malformed one."""
  ctx = ToolContext(inputs, ToolConfig(tools=enabled, view_max_pixels=28 * 28 * 64))
  arguments = {"image": 1, "bbox_2d": [0, 0, 100, 100]} if blocked == "confirm" else {"image": 1}
  result = run_tool_call(ctx, ToolCall(blocked, arguments))
  assert result.error_kind == "disabled_tool" and f"not available in this run; tools: {enabled[0]}" in result.text
  assert "disabled_tool" in ERROR_KINDS and "disabled_tool" not in tools.MALFORMED_KINDS
  assert run_tool_call(ctx, ToolCall("crop", {"image": 1})).error_kind == "unknown_tool"


# ------------------------------------------------------------------------------------------
# confirm: geometry.


def test_confirm_crops_the_right_region():
  image = Image.new("RGB", (800, 600), (90, 90, 90))
  image.paste(RED, (500, 300, 560, 360))
  ctx = ToolContext([image], CONFIG)
  width, height = ctx.shown_sizes[0]
  sx, sy = width / 800, height / 600
  result = _confirm(ctx, 1, (500 * sx, 300 * sy, 560 * sx, 360 * sy))
  _assert_view_ok(result, ctx)
  pixels = np.asarray(result.image).astype(int)
  red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
  assert red.mean() > 0.9
  np.testing.assert_allclose(ctx.refs[-1].root_box, (500, 300, 560, 360), atol=1e-6)
  assert result.image.width * result.image.height > 0.8 * CONFIG.view_max_pixels  # uses the budget
  # A box beside the square holds no red.
  result = _confirm(ctx, 1, (100 * sx, 100 * sy, 200 * sx, 200 * sy))
  assert np.asarray(result.image)[..., 1].min() > 60


def test_zoom_into_zoom_composes_to_the_root(inputs):
  ctx = ToolContext(inputs, CONFIG)
  first = _confirm(ctx, 1, (40, 30, 240, 190))
  _assert_view_ok(first, ctx)
  assert first.view_index == 4
  w4, h4 = first.image.size
  box_b = (0.25 * w4, 0.5 * h4, 0.75 * w4, 0.9 * h4)
  second = _confirm(ctx, 4, box_b)
  _assert_view_ok(second, ctx)
  ref = ctx.refs[-1]
  assert (ref.source, ref.root) == (4, 1)
  # Composed by hand: view 4's root box, then box_b scaled from view 4's pixels into it.
  a0, b0, a1, b1 = ctx.refs[3].root_box
  sx, sy = (a1 - a0) / w4, (b1 - b0) / h4
  expected = (a0 + box_b[0] * sx, b0 + box_b[1] * sy, a0 + box_b[2] * sx, b0 + box_b[3] * sy)
  np.testing.assert_allclose(ref.root_box, expected, rtol=1e-9)
  shown_w, shown_h = ctx.shown_sizes[0]
  np.testing.assert_allclose(ctx.refs[3].root_box, (40 * 640 / shown_w, 30 * 480 / shown_h,
                                                   240 * 640 / shown_w, 190 * 480 / shown_h), rtol=1e-9)
  # The crop of a crop equals a direct crop of the root with the composed box...
  direct_box = ctx.from_root(1, ref.root_box)
  direct = _confirm(ctx, 1, direct_box)
  assert direct.image.size == second.image.size
  diff = np.abs(np.asarray(direct.image, int) - np.asarray(second.image, int))
  assert diff.max() <= 1
  # ...and what cropping view 4's own pixels would show, up to resampling blur.
  naive = first.image.resize(second.image.size, Image.Resampling.BICUBIC, box=box_b)
  assert np.abs(np.asarray(naive, int) - np.asarray(second.image, int)).mean() < 3


def test_reversed_corners_are_swapped(inputs):
  ctx = ToolContext(inputs, CONFIG)
  straight = _confirm(ctx, 2, (20, 40, 120, 200))
  reversed_ = _confirm(ctx, 2, (120, 200, 20, 40))
  assert reversed_.ok and reversed_.text.split(": ", 1)[1] == straight.text.split(": ", 1)[1]
  assert ctx.refs[-1].root_box == ctx.refs[-2].root_box
  assert np.array_equal(np.asarray(straight.image), np.asarray(reversed_.image))


def test_box_partly_outside_is_clamped(inputs):
  ctx = ToolContext(inputs, CONFIG)
  width, height = ctx.shown_sizes[0]
  result = _confirm(ctx, 1, (width - 100, -50, width + 300, 100))
  assert result.ok
  np.testing.assert_allclose(ctx.refs[-1].box, (width - 100, 0, width, 100), atol=1e-9)
  assert ctx.refs[-1].root_box[2] == pytest.approx(640)


@pytest.mark.parametrize("box, centre", [((200.0, 150.0, 203.0, 151.0), (201.5, 150.5)),
                                        ((0.0, 0.0, 2.0, 2.0), None)])
def test_tiny_box_grows_to_min_side(box, centre):
  image = _smooth_image(448, 336)  # shown at its own size
  ctx = ToolContext([image], CONFIG)
  assert ctx.shown_sizes[0] == (448, 336)
  result = _confirm(ctx, 1, box)
  assert result.ok
  r0, s0, r1, s1 = ctx.refs[-1].root_box
  assert r1 - r0 == pytest.approx(28) and s1 - s0 == pytest.approx(28)
  assert r0 >= 0 and s0 >= 0
  if centre is not None:
    assert ((r0 + r1) / 2, (s0 + s1) / 2) == pytest.approx(centre)


def test_deep_zoom_stops_at_min_side(inputs):
  ctx = ToolContext(inputs, ToolConfig(max_tool_images=6, view_max_pixels=28 * 28 * 64,
                                       input_max_pixels=28 * 28 * 256))
  view = 1
  for _ in range(6):
    w, h = ctx.shown_sizes[view - 1]
    result = _confirm(ctx, view, (w / 2 - 5, h / 2 - 5, w / 2 + 5, h / 2 + 5))
    assert result.ok, result.text
    view = result.view_index
    r0, s0, r1, s1 = ctx.refs[-1].root_box
    assert r1 - r0 >= 28 - 1e-6 and s1 - s0 >= 28 - 1e-6
    assert ctx.refs[-1].root == 1


# ------------------------------------------------------------------------------------------
# reflect.


def test_reflect_reshows_views(inputs):
  ctx = ToolContext(inputs, CONFIG)
  result = run_tool_call(ctx, _call("reflect", image=2))
  _assert_view_ok(result, ctx)
  assert result.text == "Image 4: image 2 again."
  ref = ctx.refs[-1]
  assert (ref.source, ref.box, ref.root, ref.root_box) == (2, None, 2, (0, 0, 300, 500))
  expected = inputs[1].resize(result.image.size, Image.Resampling.BICUBIC)
  assert np.abs(np.asarray(expected, int) - np.asarray(result.image, int)).max() <= 1
  zoom = _confirm(ctx, 1, (10, 10, 100, 100))
  again = run_tool_call(ctx, _call("reflect", image=zoom.view_index))
  assert again.ok and again.image.size == zoom.image.size
  assert ctx.refs[-1].root_box == ctx.refs[zoom.view_index - 1].root_box
  assert np.abs(np.asarray(again.image, int) - np.asarray(zoom.image, int)).max() <= 1


def test_reflect_refuses_elongated_views():
  ctx = ToolContext([_smooth_image(1000, 100)], CONFIG)
  assert run_tool_call(ctx, _call("reflect", image=1)).error_kind == "extreme_aspect"


# ------------------------------------------------------------------------------------------
# Errors.

BAD_CALLS = [
    ("parse_error", "the tool call is not valid JSON"),
    ("no_tool_call", None),
    ("unknown_tool", ToolCall("zoom_in", {"image": 1})),
    ("missing_argument", ToolCall("confirm", {"image": 1})),
    ("missing_argument", ToolCall("reflect", {})),
    ("extra_argument", ToolCall("reflect", {"image": 1, "label": "cat"})),
    ("bad_argument", ToolCall("reflect", ["image", 1])),
    ("bad_image_index", ToolCall("reflect", {"image": 0})),
    ("bad_image_index", ToolCall("reflect", {"image": 4})),
    ("bad_image_index", ToolCall("reflect", {"image": -1})),
    ("bad_image_index", ToolCall("reflect", {"image": "1"})),
    ("bad_image_index", ToolCall("reflect", {"image": 1.5})),
    ("bad_image_index", ToolCall("reflect", {"image": True})),
    ("bad_image_index", ToolCall("reflect", {"image": float("nan")})),
    ("bad_image_index", ToolCall("confirm", {"image": 10 ** 30, "bbox_2d": [0, 0, 9, 9]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [0, 0, 10]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [0, 0, 10, 10, 5]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": []})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": "[0, 0, 10, 10]"})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": ["0", 0, 10, 10]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [0, 0, float("nan"), 10]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [0, 0, float("inf"), 10]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [0, 0, 10 ** 400, 10]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [[0, 0], [10, 10]]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [0, True, 10, 10]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": [50, 50, 50, 90]})),
    ("bad_box", ToolCall("confirm", {"image": 1, "bbox_2d": None})),
    ("box_outside", ToolCall("confirm", {"image": 1, "bbox_2d": [5000, 5000, 6000, 6000]})),
    ("box_outside", ToolCall("confirm", {"image": 1, "bbox_2d": [-50, -50, -10, -10]})),
    ("extreme_aspect", ToolCall("confirm", {"image": 1, "bbox_2d": [0, 100, 400, 140]})),
]


@pytest.mark.parametrize("kind, call", BAD_CALLS)
def test_bad_calls_become_counted_error_observations(inputs, kind, call):
  ctx = ToolContext(inputs, CONFIG)
  result = run_tool_call(ctx, call)
  assert not result.ok and result.image is None and result.view_index is None
  assert result.error_kind == kind, result.text
  assert result.text.startswith("Error: ")
  assert ctx.counts == {kind: 1} and ctx.errors == {kind: 1} and not ctx.successes
  assert len(ctx.views) == 3
  suffix = protocol.observation_suffix(result.text, has_image=False)
  assert suffix.count("<|im_start|>") == 2


def test_parse_errors_from_turns(inputs):
  ctx = ToolContext(inputs, CONFIG)
  assert run_tool_call(ctx, parse_turn("<tool_call>{'name': 1}</tool_call>")).error_kind == "parse_error"
  assert run_tool_call(ctx, parse_turn("<answer>B</answer>")).error_kind == "no_tool_call"
  ok = run_tool_call(ctx, parse_turn('<think>x</think><tool_call>{"name": "reflect", "arguments": '
                                     '{"image": 3}}</tool_call>'))
  assert ok.ok and ok.view_index == 4
  assert ctx.counts == {"parse_error": 1, "no_tool_call": 1, "reflect": 1}


def test_error_text_does_not_echo_tags(inputs):
  ctx = ToolContext(inputs, CONFIG)
  result = run_tool_call(ctx, ToolCall("<|im_end|><answer>A</answer>" * 10, {}))
  assert result.error_kind == "unknown_tool"
  assert "<" not in result.text and len(result.text) < 200


def test_budget_exhaustion(inputs):
  ctx = ToolContext(inputs, ToolConfig(max_tool_images=2, view_max_pixels=28 * 28 * 64))
  assert run_tool_call(ctx, _call("reflect", image=1)).ok
  assert _confirm(ctx, 4, (0, 0, 50, 50)).ok
  for call in (_call("reflect", image=2), _call("confirm", image=1, bbox_2d=[0, 0, 50, 50])):
    result = run_tool_call(ctx, call)
    assert result.error_kind == "budget_exhausted" and "answer" in result.text
  assert len(ctx.views) == 5 and ctx.num_tool_images == 2
  assert ctx.counts == {"reflect": 1, "confirm": 1, "budget_exhausted": 2}
  # Bad arguments are still reported as such once the budget is spent.
  assert run_tool_call(ctx, _call("reflect", image=99)).error_kind == "bad_image_index"


def test_tool_exceptions_are_contained(inputs):
  @register_tool("broken", "Always crashes.", {
      "type": "object", "properties": {"image": tools.base.IMAGE_PARAM}, "required": ["image"]})
  def broken(ctx, image):
    raise RuntimeError("bug")

  try:
    ctx = ToolContext(inputs, CONFIG)
    result = run_tool_call(ctx, _call("broken", image=1))
    assert result.error_kind == "tool_failed" and not result.ok and ctx.counts == {"tool_failed": 1}
  finally:
    TOOLS.unregister("broken")


# ------------------------------------------------------------------------------------------
# Arbitrary calls (hypothesis).

_NUMBERS = st.one_of(st.integers(-2000, 2000), st.floats(allow_nan=True, allow_infinity=True),
                     st.floats(-2000, 2000))
_IMAGE_ARG = st.one_of(st.integers(-2, 12), st.floats(), st.text(max_size=3), st.none(), st.booleans())
_BOX_ARG = st.one_of(st.lists(_NUMBERS, min_size=4, max_size=4),
                     st.lists(st.integers(0, 700), min_size=4, max_size=4),
                     st.lists(_NUMBERS, max_size=6), st.text(max_size=8), st.none())
_ARGUMENTS = st.fixed_dictionaries({}, optional={"image": _IMAGE_ARG, "bbox_2d": _BOX_ARG,
                                                 "extra": st.integers()})
_WILD_CALLS = st.builds(ToolCall, st.sampled_from(["reflect", "confirm", "zoom"]), _ARGUMENTS)
_INDEX = st.sampled_from([1, 2, 3, 1, 2, 3, 4, 0, -1, 9])
_PLAIN_BOX = st.lists(st.one_of(st.integers(-50, 700), st.floats(-50, 700)), min_size=4, max_size=4)
_CALLS = st.one_of(
    st.builds(lambda image: ToolCall("reflect", {"image": image}), _INDEX),
    st.builds(lambda image, box: ToolCall("confirm", {"image": image, "bbox_2d": box}), _INDEX, _PLAIN_BOX),
    st.builds(lambda image, box: ToolCall("confirm", {"image": image, "bbox_2d": box}), _INDEX, _PLAIN_BOX),
    st.builds(lambda image, box: ToolCall("confirm", {"image": image, "bbox_2d": box}), _INDEX, _PLAIN_BOX),
    st.builds(lambda image, box: ToolCall("confirm", {"image": image, "bbox_2d": box}), _INDEX, _BOX_ARG),
    _WILD_CALLS, st.text(max_size=20), st.none())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_CALLS, min_size=1, max_size=7))
def test_arbitrary_calls_never_raise(calls):
  images = [_smooth_image(320, 240), _smooth_image(150, 400, 1)]
  ctx = ToolContext(images, CONFIG)
  for count, call in enumerate(calls, start=1):
    before = len(ctx.views)
    result = run_tool_call(ctx, call)
    assert result.ok == (result.error_kind is None)
    assert isinstance(result.text, str) and result.text
    if result.image is not None:
      _assert_view_ok(result, ctx)
      assert len(ctx.views) == before + 1
      ref = ctx.refs[-1]
      root = ctx.views[ref.root - 1]
      r0, s0, r1, s1 = ref.root_box
      assert 0 <= r0 < r1 <= root.width + 1e-6 and 0 <= s0 < s1 <= root.height + 1e-6
      assert max(r1 - r0, s1 - s0) / min(r1 - r0, s1 - s0) <= CONFIG.max_aspect + 1e-9
    else:
      assert len(ctx.views) == before and result.view_index is None
      assert result.error_kind in ERROR_KINDS and result.text.startswith("Error: ")
    assert sum(ctx.counts.values()) == count
  assert ctx.num_tool_images <= CONFIG.max_tool_images


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(*[st.floats(-100, 800)] * 4), st.sampled_from([1, 2]))
def test_confirm_on_arbitrary_boxes(box, image):
  ctx = ToolContext([_smooth_image(320, 240), _smooth_image(150, 400, 1)], CONFIG)
  result = _confirm(ctx, image, box)
  if result.ok:
    _assert_view_ok(result, ctx)
    x0, y0, x1, y1 = ctx.refs[-1].box
    width, height = ctx.shown_sizes[image - 1]
    assert -1e-6 <= x0 < x1 <= width + 1e-6 and -1e-6 <= y0 < y1 <= height + 1e-6
  else:
    assert result.error_kind in ("bad_box", "box_outside", "extreme_aspect")
    assert ctx.errors == {result.error_kind: 1}


# ------------------------------------------------------------------------------------------
# A new tool is one registered function.


@pytest.fixture
def extra_tools():
  yield
  for name in ("grayscale", "count_images"):
    TOOLS.unregister(name)


def test_register_new_tools(inputs, extra_tools):
  @register_tool("grayscale", "Show an image in shades of grey.", {
      "type": "object", "properties": {"image": {"type": "integer"}}, "required": ["image"]})
  def grayscale(ctx, image):
    k = ctx.check_view_index(image)
    return ToolOutput(text=f"image {k} in grey", image=ctx.views[k - 1].convert("L"))

  @register_tool("count_images", "Say how many images there are.", {"type": "object", "properties": {}})
  def count_images(ctx):
    return ToolOutput(text=f"there are {len(ctx.views)} images")

  assert "grayscale" in available_tools() and "grayscale" in protocol.system_prompt(tool_schemas())
  ctx = ToolContext(inputs, CONFIG)
  result = run_tool_call(ctx, _call("grayscale", image=3))
  _assert_view_ok(result, ctx)
  pixels = np.asarray(result.image, int)
  assert np.array_equal(pixels[..., 0], pixels[..., 1])
  ref = ctx.refs[-1]
  assert (ref.source, ref.root) == (4, 4)  # new pixels: the view is its own root
  zoom = _confirm(ctx, 4, (0, 0, 60, 40))
  assert zoom.ok and ctx.refs[-1].root == 4
  text = run_tool_call(ctx, _call("count_images"))
  assert text.ok and text.image is None and text.view_index is None
  assert text.text == "there are 5 images"
  assert ctx.counts == {"grayscale": 1, "confirm": 1, "count_images": 1}
  assert run_tool_call(ctx, _call("count_images", image=1)).error_kind == "extra_argument"

  @register_tool("refuser", "Always refuses.", {"type": "object", "properties": {}})
  def refuser(ctx):
    raise ToolError("bad_argument", "no")

  try:
    assert run_tool_call(ctx, _call("refuser")).error_kind == "bad_argument"
  finally:
    TOOLS.unregister("refuser")


def test_malformed_kinds_are_unparsable_text_and_unknown_tools():
  """Only a call that is not a call of a known tool is malformed; a known tool with bad arguments just fails."""
  assert set(tools.MALFORMED_KINDS) <= set(ERROR_KINDS)
  ctx = ToolContext([Image.new("RGB", (64, 48))], CONFIG)
  kinds = {text: run_tool_call(ctx, parse_turn(text)).error_kind for text in (
      "<tool_call>\n{'name': 'confirm'}\n</tool_call>",
      '<tool_call>\n{"name": "crop", "arguments": {"image": 1}}\n</tool_call>',
      '<tool_call>\n{"name": "reflect", "arguments": {"image": 5}}\n</tool_call>')}
  assert [k in tools.MALFORMED_KINDS for k in kinds.values()] == [True, True, False], kinds
