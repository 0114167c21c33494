"""rl.rewards: accuracy (answers read by agent.answers), format, tool gain, the reward registry."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagent_jax.agent import answers
from imagent_jax.rl import rewards

OPTS = ["a dog", "a cat", "a bird", "a fish"]
NUM_OPTS = ["A. 2", "B. 3", "C. 4"]  # prefixed option texts, numeric contents


def ans(text):
  return f"<think>looking</think>\n<answer>{text}</answer>"


# (response, gold answer, options, expected accuracy)
ACCURACY_TABLE = [
    # Multiple choice, the letter in the forms people and models write it.
    (ans("B"), "B", OPTS, 1.0),
    (ans("(B)"), "B", OPTS, 1.0),
    (ans("B)"), "B", OPTS, 1.0),
    (ans("B."), "B", OPTS, 1.0),
    (ans("B) a cat"), "B", OPTS, 1.0),
    (ans("B: a cat"), "B", OPTS, 1.0),
    (ans("b"), "B", OPTS, 1.0),
    (ans("the answer is b"), "B", OPTS, 1.0),
    (ans("Answer: (B)"), "B", OPTS, 1.0),
    (ans("option B"), "B", OPTS, 1.0),
    (ans("The correct answer is option B."), "B", OPTS, 1.0),
    (ans("**B**"), "B", OPTS, 1.0),
    (ans("\\boxed{B}"), "B", OPTS, 1.0),
    (ans("B, because it meows"), "B", OPTS, 1.0),
    (ans("B a cat"), "B", OPTS, 1.0),
    # ... or the option's text.
    (ans("a cat"), "B", OPTS, 1.0),
    (ans("Cat"), "B", OPTS, 1.0),
    (ans("A cat."), "B", OPTS, 1.0),
    # Wrong, ambiguous or out of range.
    (ans("A"), "B", OPTS, 0.0),
    (ans("A or B"), "B", OPTS, 0.0),
    (ans("A, B, C, D"), "B", OPTS, 0.0),
    (ans("(A) (B)"), "B", OPTS, 0.0),
    (ans("B or C"), "B", OPTS, 0.0),
    (ans("B, C, D"), "B", OPTS, 0.0),
    (ans("(B) or (C)"), "B", OPTS, 0.0),
    (ans("B. C."), "B", OPTS, 0.0),
    (ans("AB"), "B", OPTS, 0.0),
    (ans("B. a dog"), "B", OPTS, 0.0),  # letter and text disagree
    (ans("E"), "B", OPTS, 0.0),  # no option E
    (ans("cat"), "A", ["cat", "Cat", "dog"], 0.0),  # the text names two options
    (ans("a cat or a dog"), "B", OPTS, 0.0),
    (ans(""), "B", OPTS, 0.0),
    ("<think>it is B</think>", "B", OPTS, 0.0),  # no answer block
    ("B", "B", OPTS, 0.0),  # untagged answers earn nothing with the default fallback
    ("<answer>A</answer> wait <answer>B</answer>", "B", OPTS, 1.0),  # the last answer counts
    ("<answer>B</answer> wait <answer>A</answer>", "B", OPTS, 0.0),
    # Gold given other ways; options given other ways.
    (ans("B"), "a cat", OPTS, 1.0),  # gold is the option's text
    (ans("b"), "(B)", OPTS, 1.0),
    (ans("Red"), "A", {"A": "red", "B": "blue"}, 1.0),
    (ans("3"), "B", NUM_OPTS, 1.0),
    (ans("3.0"), "B", NUM_OPTS, 1.0),
    (ans("2"), "B", NUM_OPTS, 0.0),
    (ans("B"), "B", None, 1.0),  # a letter gold without options
    (ans("A or B"), "B", None, 0.0),
    # Open answers: numbers.
    (ans("3"), "3", None, 1.0),
    (ans("3.0"), "3", None, 1.0),
    (ans("three"), "3", None, 1.0),
    (ans("Twenty-one"), "21", None, 1.0),
    (ans("1,000"), "1000", None, 1.0),
    (ans("1000"), "1,000", None, 1.0),
    (ans("There are 3 cats."), "3", None, 1.0),
    (ans("3 or 4"), "3", None, 0.0),
    (ans("101"), "100", None, 0.0),  # integer golds are exact (counts)
    (ans("3.5"), "3", None, 0.0),
    (ans("-2"), "2", None, 0.0),
    (ans("2nd"), "2", None, 0.0),
    (ans("3.14"), "3.1416", None, 1.0),  # within 1 %
    (ans("3.2"), "3.1416", None, 0.0),
    (ans("50%"), "50", None, 1.0),
    (ans("0.5"), "1/2", None, 1.0),
    # Open answers: normalised exact match.
    (ans("The Eiffel Tower!"), "eiffel tower", None, 1.0),
    (ans("the answer is Red"), "red", None, 1.0),
    (ans("  RED  "), "red", None, 1.0),
    (ans("Eiffel"), "eiffel tower", None, 0.0),
    (ans("dark red"), "red", None, 0.0),
    (ans("crimson"), ["red", "crimson"], None, 1.0),  # several acceptable golds
    (ans("blue"), ["red", "crimson"], None, 0.0),
]


def test_accuracy_table_is_large():
  assert len(ACCURACY_TABLE) >= 30


@pytest.mark.parametrize("response, answer, options, expected", ACCURACY_TABLE)
def test_accuracy(response, answer, options, expected):
  assert rewards.accuracy(response, answer, options) == expected


def test_numeric_tolerances_are_configurable():
  assert rewards.accuracy(ans("101"), "100", integer_exact=False) == 1.0  # 1 % relative
  assert rewards.accuracy(ans("10.5"), "10.0", rel_tol=0.0) == 0.0
  assert rewards.accuracy(ans("10.5"), "10.0", rel_tol=0.0, abs_tol=0.5) == 1.0


def test_accuracy_reads_the_last_answer_block_or_the_fallback():
  assert rewards.accuracy("<answer> A </answer><answer>\nB\n</answer>", "B", OPTS) == 1.0
  assert rewards.accuracy("<ANSWER>B</ANSWER>", "B", OPTS) == 0.0  # tags are exact (agent/test_answers.py)
  assert rewards.accuracy("<think>x</think>B", "B", OPTS, fallback="text") == 1.0
  assert rewards.accuracy("so \\boxed{B}", "B", OPTS, fallback="boxed") == 1.0
  with pytest.raises(KeyError):
    rewards.accuracy("x", "B", OPTS, fallback="nope")


# ------------------------------------------------------------------------------------------------
# Format

CALL = ('<think>zoom in</think>\n<tool_call>\n{"name": "confirm", "arguments": {"image": 1, "bbox_2d": [0, 0, 9, 9]}}'
        "\n</tool_call>")
ANSWER = "<think>I see it</think>\n<answer>B</answer><|im_end|>"


@pytest.mark.parametrize("turns, expected", [
    ([ANSWER], True),
    ([CALL, ANSWER], True),
    ([CALL, CALL, ANSWER], True),
    ([], False),
    ([CALL], False),  # ended on a tool call (turn limit): no answer
    ([ANSWER, ANSWER], False),  # answered twice
    (["<think>x</think><answer>A</answer><answer>B</answer>"], False),  # two answers in one turn
    ([CALL.replace('"name"', "'name'"), ANSWER], False),  # bad JSON
    (["<think>a</think><tool_call>{\"name\": \"confirm\"}</tool_call><answer>B</answer>"], False),
    (["<answer>B</answer>"], False),  # no think block
    (["<think>x</think> So: <answer>B</answer>"], False),  # text outside the blocks
    (["<think>x</think><answer></answer>"], False),  # empty answer
])
def test_format_ok(turns, expected):
  assert rewards.format_ok(turns) is expected


def test_format_without_required_think():
  assert rewards.format_ok(["<answer>B</answer>"], require_think=False)


# ------------------------------------------------------------------------------------------------
# Tool gain


def _rows(*rows):
  """rows of (correct, well formed, successful image calls) -> compute_rewards arguments."""
  responses, calls = [], []
  for correct, formatted, n in rows:
    text = f"<answer>{'B' if correct else 'A'}</answer>"
    responses.append([f"<think>t</think>{text}"] if formatted else [text])
    calls.append(n)
  return responses, ["B"] * len(rows), [OPTS] * len(rows), np.array(calls)


def test_tool_gain_basic():
  responses, answers, options, calls = _rows((1, 1, 1), (1, 1, 0), (0, 1, 2), (1, 0, 3))
  out = rewards.compute_rewards(responses, answers, options, calls, 2, rewards.RewardConfig(name="tool_gain"))
  np.testing.assert_allclose(out["accuracy"], [1, 1, 0, 1])
  np.testing.assert_allclose(out["format"], [1, 1, 1, 0])
  np.testing.assert_allclose(out["used_tool"], [1, 0, 1, 1])
  np.testing.assert_allclose(out["tool_gain"], [1.2, 0, 0, 1.2])
  np.testing.assert_allclose(out["total"], [2.2, 1.0, 0.2, 2.0], rtol=1e-6)
  assert all(v.dtype == np.float32 and v.shape == (4,) for v in out.values())


def test_tool_gain_counts_only_successful_image_calls():
  responses, answers, options, _ = _rows((1, 1, 0), (1, 1, 0))
  out = rewards.compute_rewards(responses, answers, options, np.array([0, 1]), 2)  # default: tool_gain
  np.testing.assert_allclose(out["tool_gain"], [0, 1.2])
  cfg = rewards.RewardConfig(min_image_calls=2)
  out = rewards.compute_rewards(responses, answers, options, np.array([1, 2]), 2, cfg)
  np.testing.assert_allclose(out["tool_gain"], [0, 1.2])


def test_malformed_calls_fail_format():
  responses, answers, options, calls = _rows((1, 1, 1), (1, 1, 1))
  out = rewards.compute_rewards(responses, answers, options, calls, 2, num_malformed_calls=np.array([0, 1]))
  np.testing.assert_allclose(out["format"], [1, 0])


HELPFUL_GROUPS = {
    # name: rows (correct, used tool) of one group of 4; expected gain per row with/without baseline rule.
    "tools_help": ([(1, 1), (1, 1), (1, 0), (0, 0)], [1.2, 1.2, 0, 0], [1.2, 1.2, 0, 0]),
    "tools_do_not_help": ([(1, 1), (0, 1), (1, 0), (1, 0)], [0, 0, 0, 0], [0, 0, 0, 0]),
    "tie": ([(1, 1), (0, 1), (1, 0), (0, 0)], [0, 0, 0, 0], [0, 0, 0, 0]),
    "all_use_tools": ([(1, 1), (0, 1), (1, 1), (0, 1)], [1.2, 0, 1.2, 0], [0, 0, 0, 0]),
    "none_use_tools": ([(1, 0), (1, 0), (0, 0), (0, 0)], [0, 0, 0, 0], [0, 0, 0, 0]),
}


@pytest.mark.parametrize("without_baseline", [True, False])
def test_tool_gain_helpful(without_baseline):
  rows, expected = [], []
  for group, with_rule, without_rule in HELPFUL_GROUPS.values():
    rows += [(correct, 1, used) for correct, used in group]
    expected += with_rule if without_baseline else without_rule
  responses, answers, options, calls = _rows(*rows)
  cfg = rewards.RewardConfig(name="tool_gain_helpful", helpful_without_baseline=without_baseline)
  out = rewards.compute_rewards(responses, answers, options, calls, 4, cfg)
  np.testing.assert_allclose(out["tool_gain"], expected)
  np.testing.assert_allclose(out["total"], 0.8 * out["accuracy"] + 0.2 * out["format"] + np.array(expected),
                             rtol=1e-6)
  helpful = out["tool_helpful"].reshape(-1, 4)
  assert (helpful == helpful[:, :1]).all()  # one verdict per group
  np.testing.assert_array_equal(helpful[:, 0], [1, 0, 0, float(without_baseline), 0])


def test_tool_helpful_needs_whole_groups():
  with pytest.raises(ValueError, match="group_size=4"):
    rewards.tool_helpful(np.ones(6), np.ones(6), 4)


# ------------------------------------------------------------------------------------------------
# Registry and compute_rewards


@pytest.mark.parametrize("name, total", [
    ("accuracy", [1, 1, 0]),
    ("format", [1, 0, 1]),
    ("accuracy_format", [1.0, 0.8, 0.2]),
    ("tool_gain", [2.2, 0.8, 0.2]),
])
def test_registered_rewards_by_name(name, total):
  responses, answers, options, calls = _rows((1, 1, 1), (1, 0, 0), (0, 1, 1))
  out = rewards.compute_rewards(responses, answers, options, calls, 1, rewards.RewardConfig(name=name))
  np.testing.assert_allclose(out["total"], total, rtol=1e-6)
  assert {"total", "accuracy", "format", "used_tool"} <= set(out)


def test_register_a_new_reward():
  @rewards.register_reward("test_only_constant")
  def _constant(batch):
    return {"total": np.full(batch.size, 0.5), "bonus": np.ones(batch.size)}

  try:
    responses, answers, options, calls = _rows((1, 1, 0), (0, 1, 0))
    out = rewards.compute_rewards(responses, answers, options, calls, 2,
                                  rewards.RewardConfig(name="test_only_constant"))
    np.testing.assert_allclose(out["total"], [0.5, 0.5])
    np.testing.assert_allclose(out["accuracy"], [1, 0])
    with pytest.raises(ValueError, match="already registered"):
      rewards.register_reward("test_only_constant")(_constant)
  finally:
    rewards.REWARDS.unregister("test_only_constant")


def test_compute_rewards_validates_inputs():
  responses, answers, options, calls = _rows((1, 1, 0), (0, 1, 0), (0, 1, 0))
  with pytest.raises(ValueError, match="group_size=2"):
    rewards.compute_rewards(responses, answers, options, calls, 2)
  with pytest.raises(ValueError, match="one entry per trajectory"):
    rewards.compute_rewards(responses, answers[:2], options, calls, 1)
  with pytest.raises(ValueError, match=r"shape \[3\]"):
    rewards.compute_rewards(responses, answers, options, calls[:2], 1)
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.RewardConfig(name="nope")
  with pytest.raises(ValueError, match="fallback"):
    rewards.RewardConfig(fallback="nope")


def test_compute_rewards_accepts_plain_strings_and_no_options():
  out = rewards.compute_rewards([ans("3"), ans("4")], ["3", "3"], None, [0, 0], 2,
                                rewards.RewardConfig(name="accuracy"))
  np.testing.assert_allclose(out["total"], [1, 0])


# ------------------------------------------------------------------------------------------------
# Properties

_PIECES = st.sampled_from(["<answer>", "</answer>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                           "A", "b", "(", ")", ".", ",", " or ", "option ", "answer is ", "1,000", "3.5",
                           "-", "/", "%", "\\boxed{", "}", "three", " ", "\n", "*", "0/0", "1e400"])
_NUMBERISH = st.from_regex(r"[-+]?\d{0,4}(,\d{3})?(\.\d{0,2})?(/\d{0,2})?%?", fullmatch=True)
_TEXT = st.one_of(st.text(max_size=60), st.lists(_PIECES, max_size=20).map("".join), _NUMBERISH,
                  _NUMBERISH.map(ans))
_OPTIONS = st.one_of(st.none(), st.lists(_TEXT, max_size=5),
                     st.dictionaries(st.sampled_from("ABCDE"), _TEXT, max_size=5))


@settings(max_examples=300, deadline=None)
@given(response=_TEXT, answer=st.one_of(_TEXT, st.lists(_TEXT, max_size=3)), options=_OPTIONS)
def test_accuracy_never_raises(response, answer, options):
  assert rewards.accuracy(response, answer, options) in (0.0, 1.0)
  assert rewards.accuracy(response, answer, options, fallback="text") in (0.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(turns=st.lists(_TEXT, max_size=4))
def test_format_never_raises(turns):
  assert rewards.format_ok(turns) in (True, False)


@settings(max_examples=200, deadline=None)
@given(num_options=st.integers(2, 6), gold=st.integers(0, 5), pred=st.integers(0, 5),
       form=st.sampled_from(["{}", "({})", "{})", "{}.", "Answer: {}", "option {}", "the answer is {}"]))
def test_single_letter_correct_iff_same_choice(num_options, gold, pred, form):
  gold, pred = gold % num_options, pred % num_options
  options = [f"thing number {i}" for i in range(num_options)]
  letter = answers.LETTERS[pred]
  response = ans(form.format(letter if pred % 2 else letter.lower()))
  assert rewards.accuracy(response, answers.LETTERS[gold], options) == float(gold == pred)
