"""Procedural images and the synthetic multi-image fine-grained QA task. numpy + PIL only, no files.

The **synthetic multi-image fine-grained QA** task (DESIGN §2) is the embedded default data set:
``generate_example(seed, index, difficulty)`` makes one question over 1-4 images whose answer
hangs on a detail (a glyph on a tag, the shape or colour of a small mark, a count of small
marks, a square of a tiny mosaic) that the base view cannot resolve once the processor has shrunk
the image to its ``max_pixels``, but that a ``confirm`` zoom shows plainly. One module per job:

* ``scenes``      drawing: the palette, equal-ink marks, glyph tags, mosaics, ``Scene``; and
                  ``random_scene``, a quick scene for demos and model tests.
* ``categories``  the question categories (``CATEGORIES``, ``register_category``) and where a
                  zoom on a question's detail goes (``view_box``, ``zoom_box``).
* ``difficulty``  ``DifficultyConfig``: image sizes, mark sizes, clutter, categories, hints.
* ``examples``    ``generate_example`` (a pure function of ``(seed, index)``), split seeds, PNG
                  encoding, ``SyntheticSource``.

Each example records ``category``, ``target_image`` (0-based) and ``target_box``
(``[x0, y0, x1, y1]`` in that image's own pixels, ``x1``/``y1`` exclusive): the region a good
zoom covers. How large the detail is at the base view and in a real ``confirm`` zoom is measured
by the agent's tool, beside it: ``agent.tools.confirm.legibility`` (also reachable here as
``synthetic.legibility``; the generator itself never runs agent code).
"""

from typing import Any

from imagent_jax.data.synthetic.categories import (CATEGORIES, HINT_PAD, OPTION_LETTERS, Category, Question,
                                                   register_category, view_box, zoom_box)
from imagent_jax.data.synthetic.difficulty import OPTION_ORDERS, DifficultyConfig
from imagent_jax.data.synthetic.examples import (EXAMPLE_KEYS, GENERATOR_VERSION, IMAGE_FORMATS, SPLITS,
                                                 SyntheticSource, encode_png, example_rng, generate_example,
                                                 generate_png_example, shown_size, split_seed)
from imagent_jax.data.synthetic.scenes import DIGITS, LETTERS, MARK_COLORS, PALETTE, SHAPES, Box, Scene, random_scene


def __getattr__(name: str) -> Any:
  if name == "legibility":  # measured with the agent's confirm tool, so it lives there
    from imagent_jax.agent.tools import confirm  # pylint: disable=g-import-not-at-top
    return confirm.legibility
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Box", "CATEGORIES", "Category", "DIGITS", "DifficultyConfig", "EXAMPLE_KEYS", "GENERATOR_VERSION", "HINT_PAD",
    "IMAGE_FORMATS", "LETTERS", "MARK_COLORS", "OPTION_LETTERS", "OPTION_ORDERS", "PALETTE", "Question", "SHAPES",
    "SPLITS", "Scene", "SyntheticSource", "encode_png", "example_rng", "generate_example", "generate_png_example",
    "random_scene", "register_category", "shown_size", "split_seed", "view_box", "zoom_box",
]
