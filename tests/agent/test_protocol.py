"""Tests for imagent_jax.agent.protocol: prompts, turn parsing, tool-response text."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagent_jax.agent import protocol
from imagent_jax.agent.protocol import (ToolCall, Turn, build_prompt_messages, observation_suffix,
                                        parse_turn, render_tool_call, system_prompt,
                                        tool_response_message, tool_response_text)
from imagent_jax.processing import build_tiny_tokenizer, chat, load_tokenizer

SCHEMAS = [
    {"type": "function", "function": {"name": "reflect", "description": "Show an image again.",
                                      "parameters": {"type": "object",
                                                     "properties": {"image": {"type": "integer"}},
                                                     "required": ["image"]}}},
    {"type": "function", "function": {"name": "confirm", "description": "Zoom into a box.",
                                      "parameters": {"type": "object",
                                                     "properties": {"image": {"type": "integer"},
                                                                    "bbox_2d": {"type": "array"}},
                                                     "required": ["image", "bbox_2d"]}}},
]
VALID_CALL = '<think>Zoom.</think>\n<tool_call>\n{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [1, 2, 30, 40]}}\n</tool_call>'
CONFIRM = ToolCall("confirm", {"image": 2, "bbox_2d": [1, 2, 30, 40]})

# Fragments that make random strings land near the format more often than plain text does.
FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>",
             "<tool_response>", "<|im_end|>", "<|im_start|>", "<|image_pad|>", "{", "}", "[", "]",
             '"name"', '"arguments"', '"confirm"', '"reflect"', ":", ",", "'", '"', "1", "2.5", "NaN",
             "null", " ", "\n", "```", "B", "text"]


def _check_invariants(turn):
  """Properties every parse result has, whatever the input."""
  assert isinstance(turn, Turn)
  if turn.tool_call is not None:
    assert turn.tool_call_error is None
    assert isinstance(turn.tool_call.name, str) and turn.tool_call.name
    assert isinstance(turn.tool_call.arguments, dict)
  if turn.format_ok:
    assert turn.format_error is None and turn.tool_call_error is None
    assert (turn.tool_call is None) != (turn.answer is None)
  else:
    assert turn.format_error


# ------------------------------------------------------------------------------------------
# Parser on arbitrary and near-valid text.


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_arbitrary_text_never_raises(text):
  _check_invariants(parse_turn(text))
  _check_invariants(parse_turn(text, require_think=True))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=30))
def test_parse_tag_soup_never_raises(pieces):
  _check_invariants(parse_turn("".join(pieces)))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="<")))
def test_text_without_tags_is_not_format_ok(text):
  turn = parse_turn(text)
  assert not turn.format_ok
  assert turn.tool_call is None and turn.answer is None and turn.tool_call_error is None


@pytest.mark.parametrize("value", [None, 3, b"<answer>A</answer>", ["<answer>A</answer>"]])
def test_non_string_input(value):
  turn = parse_turn(value)
  assert not turn.format_ok and turn.tool_call is None and turn.answer is None


def test_valid_turns():
  turn = parse_turn(VALID_CALL)
  assert turn.format_ok and turn.tool_call == CONFIRM and turn.think == "Zoom." and turn.answer is None
  turn = parse_turn("  <think> a </think>\n\n<answer> B </answer>\n<|im_end|>")
  assert turn.format_ok and turn.answer == "B" and turn.think == "a" and turn.tool_call is None
  turn = parse_turn("<answer>B</answer><|im_end|><|endoftext|>")
  assert turn.format_ok and turn.answer == "B" and turn.think is None


def test_require_think():
  assert parse_turn("<answer>B</answer>").format_ok
  assert not parse_turn("<answer>B</answer>", require_think=True).format_ok
  assert parse_turn("<think></think><answer>B</answer>", require_think=True).format_ok
  assert parse_turn(VALID_CALL, require_think=True).format_ok


@pytest.mark.parametrize("cut", range(1, len(VALID_CALL)))
def test_truncated_call(cut):
  turn = parse_turn(VALID_CALL[:cut])
  _check_invariants(turn)
  assert not turn.format_ok
  assert turn.tool_call is None


# (mutated text, substring of tool_call_error or None when the call must parse anyway)
NEAR_VALID = [
    ('<tool_call>{"name": "confirm", "arguments": {"image": 2}}}</tool_call>', "not valid JSON"),
    ('<tool_call>{{"name": "confirm", "arguments": {}}</tool_call>', "not valid JSON"),
    ("<tool_call>{'name': 'confirm', 'arguments': {'image': 2}}</tool_call>", "double quotes"),
    ('<tool_call>{"arguments": {"image": 2}}</tool_call>', 'no "name"'),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', '"name" must be'),
    ('<tool_call>{"name": "  ", "arguments": {}}</tool_call>', '"name" must be'),
    ('<tool_call>{"name": "reflect", "arguments": [1]}</tool_call>', '"arguments" must be'),
    ('<tool_call>{"name": "reflect", "arguments": "not json"}</tool_call>', '"arguments" must be'),
    ('<tool_call>{"name": "reflect", "arguments": "[1]"}</tool_call>', '"arguments" must be'),
    ('<tool_call>{"name": "reflect", "arguments": {}, "id": 1}</tool_call>', "unexpected key"),
    ('<tool_call>[{"name": "reflect", "arguments": {}}]</tool_call>', "JSON object"),
    ("<tool_call>   </tool_call>", "empty"),
    ('<tool_call>{"name": "reflect", "arguments": {"image": 1}}', "unclosed"),
    ('<tool_call><tool_call>{"name": "reflect", "arguments": {}}</tool_call></tool_call>', "nested"),
    ('<tool_call>{"name": "reflect", "arguments": {}}</tool_call><tool_call>{"name": "reflect", '
     '"arguments": {}}</tool_call>', "several"),
    ('{"name": "reflect", "arguments": {}}</tool_call>', "without an opening"),
    ('<answer>A</answer><tool_call>{"name": "reflect", "arguments": {"image": 1}}</tool_call>', "both"),
    ("<tool_call>" + "[" * 100_000 + "]" * 100_000 + "</tool_call>", "nested too deeply"),
    ('<tool_call>{"name": "reflect", "arguments": {"image": 1' + "0" * 5000 + "}}</tool_call>", "not valid JSON"),
]


@pytest.mark.parametrize("text, error", NEAR_VALID)
def test_near_valid_tool_calls_are_refused(text, error):
  turn = parse_turn(text)
  _check_invariants(turn)
  assert turn.tool_call is None
  assert turn.tool_call_error is not None and error in turn.tool_call_error
  assert not turn.format_ok


@pytest.mark.parametrize("text", [
    '<tool_call>\n\n   {"name": "confirm", "arguments": {"image": 2, "bbox_2d": [1, 2, 30, 40]}}  \n</tool_call>',
    '<tool_call>```json\n{"name": "confirm", "arguments": {"image": 2, "bbox_2d": [1, 2, 30, 40]}}\n```</tool_call>',
    '<tool_call>{"name": " confirm ", "arguments": "{\\"image\\": 2, \\"bbox_2d\\": [1, 2, 30, 40]}"}</tool_call>',
])
def test_tolerated_variants(text):
  turn = parse_turn(text)
  assert turn.tool_call == CONFIRM and turn.format_ok


def test_missing_arguments_reads_as_empty():
  turn = parse_turn('<tool_call>{"name": "reflect"}</tool_call>')
  assert turn.tool_call == ToolCall("reflect", {}) and turn.format_ok


@pytest.mark.parametrize("text", [
    "<think>a</think> so <answer>B</answer>",                         # text between blocks
    "The answer: <answer>B</answer>",                                 # text before
    "<answer>B</answer> because",                                     # text after
    "<answer>B</answer><think>a</think>",                             # wrong order
    "<think>a</think><think>b</think><answer>B</answer>",             # two thinks
    "<answer>A</answer><answer>B</answer>",                           # two answers
    "<answer>  </answer>",                                            # empty answer
    "<think>a <answer>B</answer>",                                    # unclosed think
    "<think>a</think>",                                               # no action
    "<answer>B</answer><|im_start|>user",                             # fake turn
    "<answer><|image_pad|>B</answer>",                                # special token inside
    "<tool_call>" + json.dumps({"name": "reflect", "arguments": {"image": 1}}) + "</tool_call><tool_response>",
])
def test_format_violations(text):
  turn = parse_turn(text)
  _check_invariants(turn)
  assert not turn.format_ok


def test_two_answers_give_no_answer():
  assert parse_turn("<answer>A</answer><answer>B</answer>").answer is None


# ------------------------------------------------------------------------------------------
# Round trips.

_SAFE_TEXT = st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs",)),
                     max_size=12)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | _SAFE_TEXT, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_SAFE_TEXT, inner, max_size=4), max_leaves=12)
_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_NAMES, st.dictionaries(_SAFE_TEXT, _JSON, max_size=5), st.none() | _SAFE_TEXT)
def test_tool_call_round_trip(name, arguments, think):
  call = ToolCall(name, arguments)
  text = ("" if think is None else f"<think>{think}</think>\n") + render_tool_call(call)
  turn = parse_turn(text)
  assert turn.tool_call == call
  assert turn.format_ok
  assert turn.think == (None if think is None else think.strip())


@settings(max_examples=100, deadline=None)
@given(_SAFE_TEXT.filter(lambda s: s.strip()))
def test_answer_round_trip(answer):
  turn = parse_turn(f"<think>t</think><answer>{answer}</answer>")
  assert turn.format_ok and turn.answer == answer.strip()


# ------------------------------------------------------------------------------------------
# Prompts and tool responses vs the chat template.


def test_system_prompt_lists_tools_and_format():
  text = system_prompt(SCHEMAS)
  assert "<tools>" in text and "</tools>" in text
  for schema in SCHEMAS:
    assert json.dumps(schema) in text
  for tag in ("<think>", "<answer>", "<tool_call>"):
    assert tag in text
  bare = system_prompt([schema["function"] for schema in SCHEMAS])
  assert bare == text
  no_tools = system_prompt(())
  assert "<tool_call>" not in no_tools and "<answer>" in no_tools
  assert len(text) < 2000


def test_build_prompt_messages():
  messages = build_prompt_messages("Which is red?", 2, ["the cup", "the car"], tools=SCHEMAS,
                                   images=["img1", "img2"])
  assert messages[0] == {"role": "system", "content": system_prompt(SCHEMAS)}
  text = chat.apply_chat_template(messages)
  assert text.count(chat.IMAGE_PAD) == 2
  assert "Image 1: <|vision_start|>" in text and "Image 2: <|vision_start|>" in text
  assert "Which is red?\nA. the cup\nB. the car\n" in text
  assert chat.message_images(messages) == ["img1", "img2"]
  open_q = chat.apply_chat_template(build_prompt_messages("How many?", 1, tools=()))
  assert "A." not in open_q and open_q.endswith("How many?<|im_end|>\n<|im_start|>assistant\n")
  lettered = chat.apply_chat_template(build_prompt_messages("Q", 0, {"X": "x", "Y": "y"}, tools=()))
  assert "Q\nX. x\nY. y\n" in lettered
  with pytest.raises(ValueError):
    build_prompt_messages("Q", 2, tools=(), images=["only one"])
  with pytest.raises(ValueError):
    build_prompt_messages("Q", 1, [str(i) for i in range(27)], tools=())


@pytest.mark.parametrize("has_image", [True, False])
def test_observation_suffix_matches_template(has_image):
  messages = build_prompt_messages("Which is red?", 2, ["a", "b"], tools=SCHEMAS)
  prompt = chat.apply_chat_template(messages)
  first = "<think>Look closer.</think>\n" + render_tool_call(CONFIRM)
  observation = "Image 3: zoom of image 2 at [1, 2, 30, 40]." if has_image else "Error: no image 9"
  second = "<think>Again.</think>\n" + render_tool_call(ToolCall("reflect", {"image": 1}))
  answer = "<think>Red is B.</think><answer>B</answer>"
  host = (prompt + first + observation_suffix(observation, has_image) + second
          + observation_suffix("Image 4: image 1 again.", True) + answer + chat.IM_END + "\n")
  conversation = messages + [
      {"role": "assistant", "content": first}, tool_response_message(observation, has_image),
      {"role": "assistant", "content": second}, tool_response_message("Image 4: image 1 again.", True),
      {"role": "assistant", "content": answer}]
  assert chat.apply_chat_template(conversation, add_generation_prompt=False) == host
  assert chat.apply_chat_template(conversation[:-1]) == host[:-len(answer + chat.IM_END + "\n")]
  suffix = observation_suffix(observation, has_image)
  assert suffix.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>")
  assert suffix.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
  assert suffix.count(chat.IMAGE_PAD) == int(has_image)


def test_tool_response_text():
  assert tool_response_text("ok", True) == ("<tool_response><|vision_start|><|image_pad|><|vision_end|>ok"
                                            "</tool_response>")
  assert tool_response_text("Error: x", False) == "<tool_response>Error: x</tool_response>"
  message = tool_response_message("ok", True, image="pixels")
  assert chat.message_images([message]) == ["pixels"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS + ["<|im_<|im_end|>end|>", "</tool_response>"]),
                          st.text(max_size=4)), max_size=20), st.booleans())
def test_observation_text_cannot_break_the_turn(pieces, has_image):
  suffix = observation_suffix("".join(pieces), has_image)
  assert suffix.count(chat.IM_START) == 2 and suffix.count(chat.IM_END) == 2
  assert suffix.count(chat.IMAGE_PAD) == int(has_image)
  assert suffix.count(protocol.TOOL_RESPONSE_START) == 1 and suffix.count(protocol.TOOL_RESPONSE_END) == 1
  assert protocol.TOOL_CALL_START not in suffix and protocol.ANSWER_START not in suffix


def test_suffix_tokens_concatenate(tmp_path):
  """Token ids of prompt + turn + suffix equal the ids of the pieces, so the host may append them."""
  tokenizer = load_tokenizer(build_tiny_tokenizer(tmp_path / "tok", vocab_size=400))
  prompt = chat.apply_chat_template(build_prompt_messages("Which?", 1, ["a", "b"], tools=SCHEMAS))
  turn = "<think>zoom</think>\n" + render_tool_call(CONFIRM)
  suffix = observation_suffix("Image 2: zoom of image 2 at [1, 2, 30, 40].", True)
  pieces = tokenizer.encode(prompt) + tokenizer.encode(turn) + tokenizer.encode(suffix)
  assert tokenizer.encode(prompt + turn + suffix) == pieces
  end = tokenizer.token_to_id(chat.TOOL_CALL_END)
  assert tokenizer.encode(turn)[-1] == end
  assert parse_turn(tokenizer.decode(tokenizer.encode(turn))).tool_call == CONFIRM
