"""agent.answers: where an answer is in a turn or a response, and the rules that match it.

The table below holds the strings on which the two answer readers that existed before
``answers`` (the turn parser's and the reward's) disagreed, and what each reader gives now.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagent_jax.agent import answers, protocol

OPTS = ["a dog", "a cat", "a bird", "a fish"]

# (text, single_answer: a turn's answer, extract_answer: a response's answer)
READERS = [
    # What the tiny model writes: one block, maybe closed by the end-of-turn token.
    ("<think>I look at the images.</think><answer>B</answer>", "B", "B"),
    ("<think>x</think>\n<answer> B </answer><|im_end|>", "B", "B"),
    ("<answer>\nB\n</answer>", "B", "B"),
    ("<answer></answer>", "", ""),  # empty, not missing (the parser calls it an empty answer)
    # Cut by the length limit, or a tool-call turn: no answer for either reader.
    ("<think>x</think><answer>B", None, None),
    ("<think>x</think><answer>B</answ", None, None),
    ('<think>x</think><tool_call>{"name": "reflect", "arguments": {"image": 1}}</tool_call>', None, None),
    ("</answer> B <answer>", None, None),  # closing tag first: no block
    # Several tags: a turn's answer is ambiguous, a response is judged on its last block.
    ("<answer>A</answer><answer>B</answer>", None, "B"),
    ("<answer>A</answer> wait <answer>B</answer>", None, "B"),
    ("<answer>A<answer>B</answer>", None, "B"),  # a block never holds an opening tag
    ("<answer>A</answer></answer>", None, "A"),
    ("</answer><answer>A</answer>", None, "A"),
    # Tags are exact: other spellings are no tags (the reward once read them case-insensitively).
    ("<ANSWER>c</ANSWER>", None, None),
    ("<Answer>B</Answer>", None, None),
    ("<answer>B</ANSWER>", None, None),
]


@pytest.mark.parametrize("text, single, last", READERS)
def test_answer_readers(text, single, last):
  assert answers.single_answer(text) == single
  assert answers.extract_answer(text) == last
  assert protocol.parse_turn(text).answer == single  # the turn parser reads the same


def test_fallbacks():
  assert answers.extract_answer("so \\boxed{42} it is", "boxed") == "42"
  assert answers.extract_answer("so \\boxed{42} it is") is None  # the default: nothing untagged
  assert answers.extract_answer("<think>hmm</think> B ", "text") == "B"
  assert answers.extract_answer("<ANSWER>c</ANSWER>", "text") == "c"  # base models: any spelling of the tags
  assert answers.extract_answer("<answer>A</answer> \\boxed{B}", "boxed") == "A"  # a block wins
  assert answers.ANSWER_FALLBACKS.names() == ("none", "boxed", "text")
  with pytest.raises(KeyError, match="unknown answer fallback 'nope'"):
    answers.extract_answer("x", "nope")


_PIECES = st.sampled_from(["<answer>", "</answer>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<ANSWER>",
                           "<|im_end|>", "A", "b", " ", "\n", "answer", "<", ">", "/"])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=12))
def test_readers_agree_on_one_tag_pair(pieces):
  """With at most one opening and one closing tag (every turn the protocol accepts), a turn's
  answer and a response's answer are the same; the turn parser's answer is always ``single_answer``."""
  text = "".join(pieces)
  assert protocol.parse_turn(text).answer == answers.single_answer(text)
  if text.count("<answer>") <= 1 and text.count("</answer>") <= 1:
    assert answers.single_answer(text) == answers.extract_answer(text)
  blocks = answers.answer_blocks(text)
  assert answers.extract_answer(text) == (blocks[-1] if blocks else None)
  assert all("<answer>" not in b for b in blocks)


def test_parse_choice():
  assert answers.parse_choice("(C)", OPTS) == 2
  assert answers.parse_choice("a fish", OPTS) == 3
  assert answers.parse_choice("A and B", OPTS) is None
  assert answers.parse_choice("F", OPTS) is None
  assert answers.parse_choice("F") == 5  # without options any letter is a choice


@pytest.mark.parametrize("text, value", [("1,000", 1000.0), ("-3.5", -3.5), ("50%", 50.0), ("1/2", 0.5),
                                         ("three", 3.0), ("twenty-one", 21.0), ("1/0", None), ("3 cats", None),
                                         ("1e400", None)])
def test_parse_number(text, value):
  assert answers.parse_number(text) == value


def test_normalize_text_and_options():
  assert answers.normalize_text("  The Eiffel-Tower!  ") == "eiffel tower"
  assert answers.normalize_options(["A. 2", "(B) 3", "C) 4", "x"]) == ["2", "3", "4", "x"]
  assert answers.normalize_options(["B. 2"]) == ["B. 2"]  # a prefix that is not the option's own letter stays
  assert answers.normalize_options({"b": "blue", "(A)": "red"}) == ["red", "blue"]
  assert answers.normalize_options(None) == []


def test_match_answer_reads_predictions_not_responses():
  assert answers.match_answer("B", "B", OPTS)
  assert answers.match_answer("a cat", "B", OPTS)
  assert not answers.match_answer(None, "B", OPTS)
  assert not answers.match_answer("<answer>B</answer>", "B", OPTS)  # extraction is extract_answer's job
