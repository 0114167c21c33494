"""BLINK (Fu et al., ECCV 2024): 14 perception subtasks recast as multiple-choice questions over
one to four images (3,807 questions: 1,901 in val with answers, the rest in test with hidden answers).

Layout, as ``huggingface-cli download --repo-type dataset BLINK-Benchmark/BLINK`` writes it (one
config per subtask, the dataset card's ``configs``)::

    BLINK/
      Art_Style/val-00000-of-00001.parquet
      Art_Style/test-00000-of-00001.parquet
      Counting/...   (14 subtask folders, SUBTASKS)

Columns: ``idx`` ("val_Art_Style_1", unique over the subtasks), ``question`` (the short question),
``sub_task`` ("Art Style"), ``image_1`` ... ``image_4`` (``Image`` structs; the unused ones null),
``choices`` (option texts), ``answer`` ("(A)"), ``prompt`` (the full prompt the paper used:
task context, the question, then "Select from the following choices." and the lettered choices),
``explanation``.

What the reader returns: ``question`` is ``prompt`` up to "Select from the following choices"
(the context some subtasks need -- the action of Functional_Correspondence, which image is the
reference in Art_Style -- is only in ``prompt``; the lettered choices after it are ``options``); a prompt
without that marker falls back to ``question``. The official script also prepends a refusal
disclaimer to the prompts of Forensic_Detection, Jigsaw and Art_Style for GPT-4V; that is a
prompting choice, not part of the question, and is left out. ``category`` is the subtask's folder
name ("Art_Style", as in ``idx`` and the official script). Images are ``image_1`` ... in order;
a null image before a present one is an error (the prompts name images by position).

Splits: ``val`` only. The test answers are hidden (``answer`` is "hidden"; scoring is on EvalAI,
https://eval.ai/web/challenges/challenge-page/2287), so ``load("blink", ..., split="test")`` is a
``ValueError``.

Official aggregation (github.com/zeyofu/BLINK_Benchmark eval/evaluate.py ``eval_prediction``):
accuracy per subtask, and the total is the MEAN OF THE 14 SUBTASK ACCURACIES, not the share of all
questions (lmms-eval's ``blink_aggregate_results`` reports the latter, which is not the paper's
number). ``aggregate`` returns ``overall`` (the mean of subtask accuracies), ``micro`` (the share
of all questions, for comparison) and one entry per subtask.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from imagent_jax.evaluation.benchmarks import base
from imagent_jax.evaluation.benchmarks import parquet

SUBTASKS = ("Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
            "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
            "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity")
IMAGE_COLUMNS = ("image_1", "image_2", "image_3", "image_4")
COLUMNS = ("idx", "question", "image_1", "choices", "answer", "prompt")
OPTIONAL = ("image_2", "image_3", "image_4")  # every config has all four; read what is there
CHOICES_MARKER = "Select from the following choices"


def question_text(prompt: Any, question: Any) -> str:
  """The prompt's text before "Select from the following choices" (context and question); the
  ``question`` column when the prompt has no such marker."""
  if isinstance(prompt, str):
    cut = prompt.rfind(CHOICES_MARKER)
    if cut >= 0 and prompt[:cut].strip():
      return prompt[:cut].strip()
  return question if isinstance(question, str) else ""


def answer_letter(answer: Any) -> Optional[str]:
  """"(B)" (or "B") -> "B"; anything else (the test split's "hidden") -> None."""
  if not isinstance(answer, str):
    return None
  letter, rest = base.split_lettered(answer)
  if letter and not rest:
    return letter
  s = answer.strip()
  return s.upper() if len(s) == 1 and s.upper() in base.LETTERS else None


def _image_refs(r: Mapping[str, Any], file: str, record: str) -> list[base.ImageRef]:
  present = [r.get(c) is not None for c in IMAGE_COLUMNS]
  n = sum(present)
  if not present[0] or present[:n] != [True] * n:
    raise base.BenchmarkError(file, record, "the images must be image_1, image_2, ... with no null before a "
                                            f"present one; present: {[c for c, p in zip(IMAGE_COLUMNS, present) if p]}")
  return [parquet.image_ref(r[c], path=file, record=record, what=c) for c in IMAGE_COLUMNS[:n]]


def read(path: str, split: Optional[str] = None) -> list[base.Example]:
  """The questions of the 14 subtasks (``SUBTASKS`` order), each file in its row order.

  Raises:
    FileNotFoundError: a subtask folder or its ``<split>-*.parquet`` is missing.
    BenchmarkError: a missing column, a bad record (answer not "(X)" for a listed choice, no
      image_1, a gap in the images) or a repeated ``idx``.
  """
  split = split or "val"
  missing = [t for t in SUBTASKS if not os.path.isdir(os.path.join(path, t))]
  if missing:
    raise FileNotFoundError(f"blink: {path} lacks the subtask folder(s) {missing} (expected the Hub snapshot of "
                            f"BLINK-Benchmark/BLINK: one folder per subtask, {SUBTASKS})")
  out, seen = [], {}
  for subtask in SUBTASKS:
    for file in parquet.split_files(os.path.join(path, subtask), split):
      for row, r in enumerate(parquet.read_records(file, COLUMNS, OPTIONAL)):
        qid, record = parquet.record_id(r["idx"], path=file, row=row, seen=seen)
        choices = parquet.string_list(r["choices"], path=file, record=record, what="choices")
        letter = answer_letter(r["answer"])
        if letter is None:
          raise base.BenchmarkError(file, record, f"answer {r['answer']!r} is not an option letter like '(A)'"
                                                  + (" (BLINK's test answers are hidden)" if split == "test" else ""))
        out.append(base.make_example(id=qid, question=question_text(r["prompt"], r["question"]), options=choices,
                                     answer=letter, category=subtask, image_refs=_image_refs(r, file, record),
                                     where=(file, record)))
  return out


mean_of_subtasks = base.mean_of_categories  # the official aggregation: the mean of the per-category accuracies


BLINK = base.Benchmark(
    name="blink", read=read, splits=("val",), aggregate=mean_of_subtasks,
    source=("https://huggingface.co/datasets/BLINK-Benchmark/BLINK (<Subtask>/val-*.parquet); "
            "https://github.com/zeyofu/BLINK_Benchmark/blob/main/eval/evaluate.py (eval_prediction: mean of subtask "
            "accuracies)"))
