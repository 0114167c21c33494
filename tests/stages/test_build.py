"""Tests for imagent_jax.stages.build: components from their config sections, data sources from the registry."""

import dataclasses

import pytest

from imagent_jax.config import schema
from imagent_jax.data import sources, synthetic
from imagent_jax.stages import build


@dataclasses.dataclass(frozen=True)
class _Part:
  size: int
  scale: float = 1.0
  name: str = "part"

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"size must be >= 1, got {self.size}")


def test_from_section_fills_fields_by_name():
  section = {"scale": 2.0, "steps": 7}  # "steps": a stage's key, not a field
  assert build.from_section(_Part, section, size=3) == _Part(size=3, scale=2.0)
  assert build.from_section(_Part, {"size": 4, "name": "x"}) == _Part(size=4, name="x")
  assert build.from_section(_Part, {"size": 4}, size=5).size == 5  # a derived value wins
  with pytest.raises(TypeError, match="no field"):
    build.from_section(_Part, section, size=3, colour="red")
  with pytest.raises(ValueError, match="size must be >= 1"):  # the dataclass checks its own values
    build.from_section(_Part, {"size": 0})


def test_components_of_the_default_config():
  config = schema.get_config()
  rollout = build.rollout_config(config)
  assert (rollout.group_size, rollout.max_prompt_len, rollout.view_max_patches) == (4, 640, 256)
  evaluation = build.eval_rollout_config(config)
  assert (evaluation.group_size, evaluation.temperature, evaluation.max_prompt_len) == (1, 0.0, 640)
  assert build.reward_config(config).name == "tool_gain" and build.mask_config(config).group_size == 4
  grpo = build.grpo_config(config)
  assert (grpo.group_size, grpo.total_steps, grpo.kl_coef, grpo.learning_rate) == (4, 100, 0.1, 1e-4)
  tool = build.tool_config(config)
  assert (tool.view_max_pixels, tool.min_box_side, tool.input_max_pixels) == (28 * 28 * 64, 2.0, 28 * 28 * 64)
  assert [s["function"]["name"] for s in build.listed_tool_schemas(config)] == ["reflect", "confirm"]


@pytest.fixture
def fake_source():
  requests = []

  @sources.register_source("fake_for_test")
  def _fake(request):
    requests.append(request)
    return ["example"]

  yield requests
  sources.SOURCES.unregister("fake_for_test")


def test_data_source_comes_from_the_registry(tmp_path, fake_source):
  config = schema.get_config()
  config.data.source = "fake_for_test"
  config.data.validation_path = "~/val.jsonl"
  assert build.data_source(config, str(tmp_path), "validation") == ["example"]
  (request,) = fake_source
  assert request.split == "validation" and request.path == "~/val.jsonl" and request.seed == 0
  assert request.sizes == {"train": 10000, "validation": 500, "test": 500}
  assert request.data_dir == str(tmp_path / "data") and request.difficulty == build.difficulty(config)


def test_on_the_fly_source_draws_the_split_stream(tmp_path):
  config = schema.get_config("smoke")
  config.data.source = "synthetic"
  source = build.data_source(config, str(tmp_path), "test")
  assert len(source) == 4 and source.seed == synthetic.split_seed(0, "test")
  config.data.source = "jsonl"
  with pytest.raises(ValueError, match="needs config.data.train_path"):
    build.data_source(config, str(tmp_path), "train")
  assert isinstance(sources.SOURCES, type(synthetic.CATEGORIES))  # both are imagent_jax.registry.Registry
