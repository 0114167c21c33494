"""MME-RealWorld (``mme_realworld``) and MME-RealWorld-Lite (``mme_realworld_lite``): 5-option
questions on high-resolution real-world images, read from the folders as published on Hugging Face.

Full set (https://huggingface.co/datasets/yifanzhang114/MME-RealWorld; the repo's README,
https://github.com/yfzhang114/MME-RealWorld#evaluation-pipeline)::

    MME-RealWorld/
      MME_RealWorld.json        (English)                       split "en"
      MME_RealWorld_CN.json     (Chinese, 5,917 questions)      split "cn"
      AutonomousDriving/ diagram_and_table/ monitoring_images/ ocr_cc/ remote_sensing/ MME-HD-CN/ ...
                                (the image folders, from the split archives ``<name>.tar.gz.part_*``:
                                 ``cat <name>.tar.gz.part_* | tar xz`` in this folder)

The older names ``MME_ReadWorld.json`` / ``MME_ReadWorld_CN.json`` (the repository's first upload)
are read too. ``path`` is the folder, or a JSON file (its folder holds the images).

Lite (https://huggingface.co/datasets/yifanzhang114/MME-RealWorld-Lite, "50 samples per task, or
all if fewer"): ``data.zip`` ("all images and question JSON files, with the question format
identical to the full split", its dataset card), extracted in place, gives
``data/MME-RealWorld-Lite.json`` and the images under ``data/imgs/`` (``imgs/<Image>``; a bare
``imgs/<file name>`` is accepted too).
``path`` is the Lite folder, its ``data/`` folder or the JSON. English only: split ``"en"``.

A JSON file is a list of records: ``Question_id`` (e.g.
``"Perception/Autonomous_Driving/Objects_Identify/0000"``,
``"perception/monitoring/Vehicle/counting/0310"``: its case and spelling vary, so group by ``Task``
/ ``Subtask``, never by the id's prefix), ``Image`` (path relative to the image root), ``Text``
(the question alone), ``Answer choices`` (``["(A) ...", ..., "(E) ..."]``; full-width ``（A）``
brackets, which lmms-eval's ``get_correct_answer`` normalises for the Chinese data, are read as
``(A)``), ``Ground truth`` (the letter), ``Task`` (``Perception`` / ``Reasoning``), ``Subtask``
(the domain: ``Monitoring``, ``Autonomous_Driving``, ``OCR with Complex Context``, ``Diagram and
Table``, ``Remote Sensing``), ``Category`` (the paper's subtask, e.g. ``Vehicle/counting``; case
varies), and optional ``Question Type`` (also spelt ``Question type``) and ``Dataset``.

Each ``Example``: ``id`` the ``Question_id`` (a repeated id gets ``#2``, ``#3``, ... and
``meta["question_id"]`` keeps it), ``question`` ``Text``, ``options`` the choices without their
``(X)``, ``answer`` ``Ground truth``, ``category`` ``Task``, ``subcategory`` ``Subtask``,
``meta["category"]`` the official scorer's normalised ``Category`` (lower case; any category naming
an ``attribute`` becomes ``<first part>/attribute``), ``meta["raw_category"]``, ``meta["language"]``.
The last option is often "E: the image does not feature ..." / "all the above answers are wrong";
shuffling (``load``'s default) moves it like any other option.

Official aggregation (``evaluation/eval_your_results.py`` of the GitHub repo; lmms-eval's
``mme_realworld_aggregate_results`` is the same): correct counts are summed per
``Task`` / ``Subtask`` / normalised ``Category``; the accuracies reported are micro averages at each
level, and **overall is the micro accuracy over every question** (``succ_all / sum_all``), not a
mean of the tasks. ``aggregate`` returns ``overall``, ``<Task>``, ``<Task>/<Subtask>`` and
``<Task>/<Subtask>/<category>``. (The paper's tables also give an unweighted "Avg-C"; the
released script does not compute it and neither does this.)
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping, Optional, Sequence

from imagent_jax.evaluation.benchmarks import base

FULL_FILES = {"en": ("MME_RealWorld.json", "MME_ReadWorld.json"),
              "cn": ("MME_RealWorld_CN.json", "MME_ReadWorld_CN.json")}
LITE_FILE = "MME-RealWorld-Lite.json"
REQUIRED = ("Question_id", "Image", "Text", "Answer choices", "Ground truth", "Task", "Subtask", "Category")
_FULL_WIDTH = str.maketrans({"（": "(", "）": ")", "．": ".", "：": ":"})


def official_category(category: str) -> str:
  """The category as ``eval_your_results.py`` groups it: lower case, and any category naming an
  ``attribute`` merged into ``<first part>/attribute``."""
  c = str(category).lower()
  return c.split("/")[0] + "/attribute" if "attribute" in c else c


def _options(choices: Any, where: tuple[str, Any]) -> list[str]:
  if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
    raise base.BenchmarkError(*where, f"'Answer choices' must be a list of strings, got {choices!r}")
  options = []
  for i, choice in enumerate(choices):
    letter, text = base.split_lettered(choice.translate(_FULL_WIDTH))
    if letter is not None and letter != base.LETTERS[i]:
      raise base.BenchmarkError(*where, f"choice {i + 1} is lettered {letter!r}, expected "
                                        f"{base.LETTERS[i]!r}: {choice!r}")
    options.append(text)
  return options


def _answer(value: Any, where: tuple[str, Any]) -> str:
  if not isinstance(value, str):
    raise base.BenchmarkError(*where, f"'Ground truth' must be a letter, got {value!r}")
  s = value.translate(_FULL_WIDTH).strip()
  if len(s) == 3 and s[0] == "(" and s[2] == ")":
    s = s[1]
  return s.upper() if len(s) == 1 else s


def _missing_images_hint(root: str) -> str:
  parts = sorted(glob.glob(os.path.join(root, "*.tar.gz*"))) + sorted(glob.glob(os.path.join(root, "*.zip")))
  if not parts:
    return ""
  return (f"; {root} still holds the archive(s) {', '.join(os.path.basename(p) for p in parts[:4])}: extract "
          "them there (split parts: cat <name>.tar.gz.part_* | tar xz; the Lite set: unzip data.zip)")


def read_records(json_path: str, image_root: str, language: str, *, flat_fallback: bool = False
                 ) -> list[base.Example]:
  """The examples of one MME-RealWorld JSON file, images resolved under ``image_root``.

  Args:
    json_path: the annotation file.
    image_root: the folder ``Image`` is relative to.
    language: ``meta["language"]``.
    flat_fallback: also look for ``image_root/<file name of Image>`` (the Lite set).
  """
  try:
    with open(json_path, encoding="utf-8") as f:
      records = json.load(f)
  except json.JSONDecodeError as e:
    raise base.BenchmarkError(json_path, None, f"not valid JSON ({e.msg} at line {e.lineno})") from None
  if not isinstance(records, list):
    raise base.BenchmarkError(json_path, None, "the file must hold a list of question records")
  out, seen = [], {}
  for n, record in enumerate(records):
    where = (json_path, f"#{n}")
    if not isinstance(record, dict):
      raise base.BenchmarkError(*where, "a record must be a JSON object")
    if "Question_id" in record:
      where = (json_path, f"{record['Question_id']} (#{n})")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
      raise base.BenchmarkError(*where, f"the record has no {missing}")
    qid = str(record["Question_id"]).strip()
    if not qid:
      raise base.BenchmarkError(*where, "'Question_id' is empty")
    for key in ("Image", "Text", "Task", "Subtask", "Category"):
      if not isinstance(record[key], str) or not record[key].strip():
        raise base.BenchmarkError(*where, f"{key!r} must be a non-empty string, got {record[key]!r}")
    relative = record["Image"].strip().replace("\\", "/")
    image = os.path.join(image_root, relative)
    if not os.path.isfile(image) and flat_fallback:
      flat = os.path.join(image_root, os.path.basename(relative))
      image = flat if os.path.isfile(flat) else image
    if not os.path.isfile(image):
      hint = "" if flat_fallback else _missing_images_hint(image_root)
      raise base.BenchmarkError(*where, f"the image {image} does not exist{hint}")
    seen[qid] = seen.get(qid, 0) + 1
    example_id = qid if seen[qid] == 1 else f"{qid}#{seen[qid]}"
    meta = {"question_id": qid, "category": official_category(record["Category"]),
            "raw_category": record["Category"], "language": language, "image": relative}
    for key in ("Question Type", "Question type", "Dataset"):
      if key in record:
        meta[key.lower().replace(" ", "_")] = record[key]
    out.append(base.make_example(
        id=example_id, question=record["Text"], options=_options(record["Answer choices"], where),
        answer=_answer(record["Ground truth"], where), category=record["Task"].strip(),
        subcategory=record["Subtask"].strip(), image_refs=[base.ImageRef(name=image, path=image)], where=where,
        meta=meta))
  if not out:
    raise base.BenchmarkError(json_path, None, "the file has no questions")
  return out


def read_full(path: str, split: Optional[str] = None) -> list[base.Example]:
  """MME-RealWorld's questions in language ``split`` (``"en"``: ``MME_RealWorld.json``; ``"cn"``:
  ``MME_RealWorld_CN.json``) from its folder, or from a given JSON file (read whatever its name).

  Raises:
    FileNotFoundError: the split's JSON is not in the folder.
    BenchmarkError: a malformed record or a missing image (file and ``Question_id`` in the message).
  """
  split = split or "en"
  if os.path.isfile(path):
    return read_records(path, os.path.dirname(path), split)
  for name in FULL_FILES[split]:
    candidate = os.path.join(path, name)
    if os.path.isfile(candidate):
      return read_records(candidate, path, split)
  raise FileNotFoundError(f"mme_realworld: expected {os.path.join(path, FULL_FILES[split][0])} (split {split!r}; "
                          "https://huggingface.co/datasets/yifanzhang114/MME-RealWorld)")


def read_lite(path: str, split: Optional[str] = None) -> list[base.Example]:
  """MME-RealWorld-Lite's questions from its folder (``data/MME-RealWorld-Lite.json`` and
  ``data/imgs/``), from its ``data/`` folder, or from the JSON file.

  Raises:
    FileNotFoundError: the JSON is not there (``data.zip`` not extracted?).
    BenchmarkError: a malformed record or a missing image.
  """
  del split
  if os.path.isfile(path):
    json_path = path
  else:
    candidates = [os.path.join(path, "data", LITE_FILE), os.path.join(path, LITE_FILE)]
    json_path = next((c for c in candidates if os.path.isfile(c)), None)
    if json_path is None:
      zipped = os.path.isfile(os.path.join(path, "data.zip"))
      raise FileNotFoundError(f"mme_realworld_lite: expected {candidates[0]}"
                              + (" (data.zip is there: extract it in place)" if zipped else "")
                              + " (https://huggingface.co/datasets/yifanzhang114/MME-RealWorld-Lite)")
  return read_records(json_path, os.path.join(os.path.dirname(json_path), "imgs"), "en", flat_fallback=True)


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """The official score, in percent: micro accuracy overall, per ``Task`` (``category``), per
  ``Task/Subtask`` (``subcategory``) and per ``Task/Subtask/<normalised Category>``
  (``meta["category"]``), groups in the order first seen.

  Args:
    rows: one per question: ``category``, ``subcategory``, ``correct`` and ``meta``.
  """
  groups: dict[str, list[bool]] = {"overall": []}
  for r in rows:
    task, subtask = str(r["category"]), str(r.get("subcategory", ""))
    category = str((r.get("meta") or {}).get("category", ""))
    for key in ("overall", task, f"{task}/{subtask}", f"{task}/{subtask}/{category}"):
      groups.setdefault(key, []).append(bool(r["correct"]))
  return {k: (100.0 * sum(v) / len(v) if v else float("nan")) for k, v in groups.items()}


_SOURCE = ("https://huggingface.co/datasets/yifanzhang114/MME-RealWorld ; "
           "https://huggingface.co/datasets/yifanzhang114/MME-RealWorld-Lite ; "
           "https://github.com/yfzhang114/MME-RealWorld (evaluation/eval_your_results.py)")
MME_REALWORLD = base.Benchmark(name="mme_realworld", read=read_full, splits=("en", "cn"), aggregate=aggregate,
                               circular=False, source=_SOURCE)
MME_REALWORLD_LITE = base.Benchmark(name="mme_realworld_lite", read=read_lite, splits=("en",), aggregate=aggregate,
                                    circular=False, source=_SOURCE)
