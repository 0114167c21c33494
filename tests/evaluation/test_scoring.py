"""``evaluation.score``: judge-free scoring of the forms models write, never raising."""

import hypothesis
from hypothesis import strategies as st

from imagent_jax.evaluation import response_answer, score
from imagent_jax.evaluation.benchmarks import base

EXAMPLE = base.make_example(id="q1", question="Which animal is it?", options=["a cat", "a dog", "a red bird"],
                            answer="B", category="animals", image_refs=[base.ImageRef("x.png", path="x.png")],
                            where=("test", 1))

RIGHT = ["B", "b", "(B)", "B.", "B)", "B. a dog", "(B) a dog", "The answer is b", "The answer is (B).", "Answer: B",
         "a dog", "dog", "A dog", "<answer>B</answer>", "<think>A? no.</think><answer>(B)</answer>", "**B**",
         "Option B", "the correct option is B.", "Looking closely, it is brown and barks. Answer: B",
         "The answer is A. Wait, no: the answer is B.", "\\boxed{B}"]
WRONG = ["A", "C", "(A) a cat", "a cat", "A or B", "A, B", "(A) (B)", "B: a cat", "", "   ", "E", "I cannot tell.",
         "The answer is a red bird, because it flies", "<answer>A</answer> B", "<answer>B</answer><answer>A</answer>"]


def test_typical_forms_are_scored_right():
  assert [t for t in RIGHT if not score(EXAMPLE, t)] == []
  assert [t for t in WRONG if score(EXAMPLE, t)] == []


def test_the_letter_follows_the_options_as_listed():
  shuffled = base.reorder(EXAMPLE, [1, 2, 0])  # dog, red bird, cat: the dog is now A
  assert shuffled.answer == "A" and shuffled.answer_text == "a dog"
  assert score(shuffled, "A") and not score(shuffled, "B") and score(shuffled, "a dog")


def test_answer_blocks_only_with_fallback_none():
  assert score(EXAMPLE, "<answer>B</answer>", fallback="none")
  assert not score(EXAMPLE, "B", fallback="none")  # the training rewards' strict reading
  assert response_answer(EXAMPLE, "B", "none") is None


def test_open_questions_and_example_dicts():
  assert score({"options": None, "answer": "3"}, "There are 3 cats.")
  assert not score({"options": None, "answer": "3"}, "There are 3 or 4 cats.")
  assert score({"options": ["red", "blue"], "answer": "B"}, "<answer>blue</answer>")
  several = base.make_example(id="q2", question="?", options=[], answer="paris", category="", meta={
      "answers": ["paris", "Paris, France"]}, image_refs=[base.ImageRef("x", path="x")], where=("t", 2))
  assert score(several, "Paris, France") and score(several, "paris") and not score(several, "Lyon")


@hypothesis.given(st.one_of(st.text(max_size=300), st.binary(max_size=50), st.none(), st.integers(),
                            st.lists(st.text(max_size=5), max_size=3)))
@hypothesis.settings(max_examples=1500, deadline=None)
def test_score_never_raises(text):
  assert score(EXAMPLE, text) in (True, False)
  assert score({"options": None, "answer": "3.5"}, text) in (True, False)


@hypothesis.given(st.text(alphabet=st.sampled_from(list("ABCDab()[]<>/.:*answer is option ")), max_size=60))
@hypothesis.settings(max_examples=1500, deadline=None)
def test_score_never_raises_on_answer_like_strings(text):
  assert score(EXAMPLE, text) in (True, False)
  assert score(EXAMPLE, f"<answer>{text}</answer>") in (True, False)
