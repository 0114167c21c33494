"""The shared toy setup of the tests: the tiny model of any family, its tokenizer and processor,
random parameters, small pixel budgets and a multi-image prompt.

    from toy import Toy
    toy = Toy.make(tmp_path)                    # tiny Qwen2.5-VL, tokenizer folder in tmp_path
    toy.config, toy.params, toy.processor, toy.model, toy.tool_config, toy.images(), toy.prompt()

Every test that needs "a small model that runs" starts here, so they all exercise the same model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from imagent_jax.agent import protocol, tools
from imagent_jax.data import synthetic
from imagent_jax.models import get_preset, registry
from imagent_jax.processing import Processor, build_tiny_tokenizer

# Small images: the tiny config's processor budget (64 merged tokens at most per image).
PIX = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64)


@dataclasses.dataclass
class Toy:
  """A tiny model with its processor: what most tests need."""

  config: Any
  params: Any
  processor: Processor
  tokenizer_dir: str

  @classmethod
  def make(cls, folder, preset: str = "tiny", seed: int = 0, config=None, min_pixels: int = PIX["min_pixels"],
           max_pixels: int = PIX["max_pixels"]) -> "Toy":
    """Builds the model (``preset`` or ``config``), random params (``seed``) and a tiny tokenizer in ``folder``.

    The processor's patch geometry is the model's (a family with another patch size gets a
    processor that cuts its patches).
    """
    config = config or get_preset(preset)
    family = registry.family_of(config)
    params = family.init_params(config, jax.random.key(seed))
    tok = os.path.join(os.fspath(folder), "tokenizer")
    if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
      build_tiny_tokenizer(tok, vocab_size=config.vocab_size, min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Processor.from_pretrained(tok)
    processor.image_settings.update(family.geometry(config).image_settings())
    return cls(config, params, processor, tok)

  @property
  def family(self):
    return registry.family_of(self.config)

  @property
  def geometry(self):
    return self.family.geometry(self.config)

  def model(self, **kw):
    """The family's module (float32 unless ``dtype=`` says otherwise)."""
    return self.family.module(self.config, **kw)

  def tool_config(self, **kw) -> tools.ToolConfig:
    """Tools sized for the processor's budgets and the model's geometry."""
    s = self.processor.image_settings
    return tools.ToolConfig(**{"input_min_pixels": s["min_pixels"], "input_max_pixels": s["max_pixels"],
                               "view_max_pixels": s["max_pixels"], "factor": self.geometry.factor,
                               "min_box_side": float(self.geometry.factor), **kw})

  @staticmethod
  def images(seed: int = 0, sizes=((200, 150), (120, 260), (90, 90))) -> list:
    """Random scenes of the given ``(height, width)`` sizes."""
    rng = np.random.default_rng(seed)
    return [synthetic.random_scene(rng, h, w) for h, w in sizes]

  @staticmethod
  def prompt(num_images: int = 3, question: str = "Which image has the most red shapes?",
             options=("first", "second", "third")) -> list[dict]:
    """A multi-image multiple-choice conversation listing every tool."""
    return protocol.build_prompt_messages(question, num_images, list(options), tools=tools.tool_schemas())
