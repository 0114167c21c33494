"""Checks every benchmark reader's tests share."""

from imagent_jax.evaluation import benchmarks


def check_shuffles(name: str, path: str) -> None:
  """Shuffled options keep each question's answer text, repeat for a seed and differ across seeds."""
  published = {e.id: e for e in benchmarks.load(name, path, option_order="as_published")}
  runs = [benchmarks.load(name, path, seed=s) for s in (0, 0, 1, 2, 3)]
  for run in runs:
    for e in run:
      assert e.answer_text == published[e.id].answer_text
  assert [e.options for e in runs[0]] == [e.options for e in runs[1]]
  assert len({tuple(e.options for e in run) for run in runs}) > 1
