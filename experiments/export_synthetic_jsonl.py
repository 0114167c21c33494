"""Writes synthetic multi-image questions as a JSONL dataset in our schema (``data/jsonl.py``): a
local benchmark folder for the eval stage (``--config.eval.benchmarks=jsonl=<out>``) or a JSONL
training set, with the answers' target boxes.

    python experiments/export_synthetic_jsonl.py --out /tmp/synth_mi --count 64 --seed 7 --images 2,4

The questions are the embedded default's generator (``data.synthetic``) on a stream of their own
(``--seed``: pick one the run's splits do not use), with the default's difficulty for the
processor's pixel budget; images are PNG files under ``<out>/images``.
"""

from __future__ import annotations

import argparse
import os

from tqdm.auto import tqdm


def export(out: str, count: int, seed: int, images: str = "2,4", categories: str = "mosaic") -> str:
  """Writes ``count`` questions to ``<out>/test.jsonl`` (+ images); returns the JSONL path."""
  from imagent_jax.config import schema
  from imagent_jax.data import jsonl, synthetic
  from imagent_jax.stages import build

  config = schema.get_config()
  config.data.images_per_question, config.data.categories = images, categories
  difficulty = build.difficulty(config)
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  records = []
  for i in tqdm(range(count), desc="export", unit="question"):
    e = synthetic.generate_example(seed, i, difficulty)
    names = []
    for k, image in enumerate(e["images"]):
      names.append(f"images/{i:05d}_{k}.png")
      image.save(os.path.join(out, names[-1]))
    records.append({"id": f"s{seed}_{i:05d}", "images": names, "question": e["question"], "options": e["options"],
                    "answer": e["answer"], "category": e["category"], "target_image": e["target_image"],
                    "target_box": e["target_box"]})
  path = os.path.join(out, "test.jsonl")
  jsonl.write_jsonl(path, records)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="the dataset folder to write")
  parser.add_argument("--count", type=int, default=64)
  parser.add_argument("--seed", type=int, default=7, help="the synthetic stream (not one of the run's splits)")
  parser.add_argument("--images", default="2,4", help="min,max images per question")
  parser.add_argument("--categories", default="mosaic")
  args = parser.parse_args()
  print(export(args.out, args.count, args.seed, args.images, args.categories))


if __name__ == "__main__":
  main()
