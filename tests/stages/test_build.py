"""Tests for imagent_jax.stages.build: components from their config sections, data sources from the registry."""

import dataclasses
import os

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


# ---------------------------------------------------------------------------------- budgets


def test_budget_formulas_of_values_and_of_references_agree():
  """The formulas are one: with numbers they check a config, with FieldReferences they derive
  budgets that follow later overrides of their inputs."""
  from imagent_jax.models import get_preset, registry
  geometry = registry.family_of(get_preset("tiny")).geometry(get_preset("tiny"))
  config = schema.get_config()
  need = build.required_budgets(config, geometry)
  rows, per_input, per_view = 4 * 4, 64, 64  # tokens of an input image / a view at 28*28*64 pixels
  assert need == {"rollout.max_prompt_images": 4 * 4, "rollout.prompt_patches": 4 * 4 * per_input * 4,
                  "rollout.max_prompt_len": 4 * per_input + build.PROMPT_TEXT_TOKENS,
                  "rollout.obs_max_tokens": per_view + build.OBS_TEXT_TOKENS, "rl.image_slots": rows * (4 + 3),
                  "rl.patch_budget": rows * (4 * per_input + 3 * per_view) * 4,
                  "rl.minibatch_image_slots": rows * 7, "rl.minibatch_patch_budget": rows * (4 + 3) * 64 * 4}
  with config.unlocked():
    refs = build.budget_formulas(lambda k: (config.data.get_ref("max_images_per_question") if k == "images" else
                                            config[k.split(".")[0]].get_ref(k.split(".")[1])), geometry)
  assert {k: r.get() for k, r in refs.items()} == need  # max_images_per_question (4) = the synthetic "1,4"
  config.rl.batch_size, config.rl.num_minibatches = 2, 2
  assert refs["rollout.prompt_patches"].get() == 2 * 4 * per_input * 4
  assert refs["rl.minibatch_image_slots"].get() == 2 * 4 // 2 * 7


def test_images_per_question_follows_the_source():
  config = schema.get_config("smoke")
  assert build.images_per_question(config) == 2  # synthetic "1,2"
  config.data.source, config.data.max_images_per_question = "jsonl", 3
  assert build.images_per_question(config) == 3


def test_prompt_length_is_the_processors_token_count(tmp_path):
  """``prompt_length`` with ``image_tokens`` of each image's size counts exactly the tokens the
  rollout's processor makes of that question."""
  from imagent_jax.agent import protocol
  from imagent_jax.data import synthetic
  from imagent_jax.processing import build_tiny_tokenizer
  import numpy as np
  config = schema.get_config("smoke")
  tok = build_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=512)
  processor = build.run_processor(config, tok)
  assert processor.image_settings["max_pixels"] == config.processor.max_pixels
  rng = np.random.default_rng(0)
  images = [synthetic.random_scene(rng, 300, 200), synthetic.random_scene(rng, 40, 90)]
  tokens = [build.image_tokens(im.size, processor.image_settings) for im in images]
  assert tokens[0] <= 64 and tokens[1] >= 4  # shrunk to max_pixels / grown to min_pixels
  messages = protocol.build_prompt_messages("Which is red?", 2, ["a", "b"], tools=build.listed_tool_schemas(config),
                                            system_style=config.tools.prompt_style)
  ids = processor(messages, images)["input_ids"]
  assert build.prompt_length(config, processor, "Which is red?", ["a", "b"], tokens) == ids.shape[1]


def test_tokenizer_dir_is_the_one_the_run_reads(tmp_path):
  config = schema.get_config("smoke")
  assert build.tokenizer_dir(config, str(tmp_path)) == str(tmp_path / "tokenizer")
  config.model.checkpoint = "/ckpt"
  assert build.tokenizer_dir(config, str(tmp_path)) == "/ckpt"
  assert build.tokenizer_dir(config, str(tmp_path), random_init=True) == str(tmp_path / "tokenizer")
  config.model.tokenizer = "~/tok"
  assert build.tokenizer_dir(config, str(tmp_path)) == os.path.expanduser("~/tok")


def _jsonl_data(folder, images_per_record=(1, 3, 2), question="Which image is red?"):
  from imagent_jax.data import jsonl, synthetic
  import numpy as np
  rng = np.random.default_rng(0)
  os.makedirs(folder / "img", exist_ok=True)
  records = []
  for q, n in enumerate(images_per_record):
    names = []
    for k in range(n):
      synthetic.random_scene(rng, 120, 100).save(folder / "img" / f"{q}_{k}.png")
      names.append(f"img/{q}_{k}.png")
    records.append({"images": names, "question": question, "answer": "A", "options": ["x", "y"]})
  jsonl.write_jsonl(folder / "data.jsonl", records)
  return str(folder / "data.jsonl")


def _jsonl_config(path):
  config = schema.get_config("smoke")
  config.data.source, config.data.train_path, config.data.max_images_per_question = "jsonl", path, 2
  return config


def test_jsonl_records_beyond_the_image_budget_are_bad_records(tmp_path):
  from imagent_jax.data import jsonl
  config = _jsonl_config(_jsonl_data(tmp_path))
  with pytest.raises(jsonl.DataError, match=r"data.jsonl:2: \[too_many_images\] 3 images; the run's image budgets "
                                            r"hold 2 per question \(config.data.max_images_per_question\)"):
    build.data_source(config, str(tmp_path / "run"), "train")
  config.data.on_error = "skip"
  source = build.data_source(config, str(tmp_path / "run"), "train")
  assert len(source) == 2 and source.error_counts == {"too_many_images": 1}
  assert [len(source[i]["images"]) for i in range(2)] == [1, 2]
  config.data.max_images_per_question = 3
  assert len(build.data_source(config, str(tmp_path / "run"), "train")) == 3


def test_jsonl_prompts_longer_than_the_budget_are_bad_records(tmp_path):
  """With the run's tokenizer in place, every prompt is measured before anything compiles; image
  sizes are read from the headers of the records that could exceed the budget."""
  from imagent_jax.data import jsonl
  from imagent_jax.processing import build_tiny_tokenizer
  config = _jsonl_config(_jsonl_data(tmp_path, (1, 2), question="Which image is red? " + "Look closely. " * 40))
  workdir = tmp_path / "run"
  build.data_source(config, str(workdir), "train")  # no tokenizer yet: image counts only
  build_tiny_tokenizer(str(workdir / "tokenizer"), vocab_size=512)
  processor = build.run_processor(config, str(workdir / "tokenizer"))
  q = "Which image is red? " + "Look closely. " * 40
  per_image = build.image_tokens((120, 100), processor.image_settings)
  lengths = [build.prompt_length(config, processor, q, ["x", "y"], [per_image] * n) for n in (1, 2)]
  config.rollout.max_prompt_len = lengths[1] - 1  # the 2-image question is one token too long
  message = (rf"data.jsonl:2: \[prompt_too_long\] its prompt has {lengths[1]} tokens \({2 * per_image} of them "
             rf"image tokens\), more than config.rollout.max_prompt_len={lengths[1] - 1}")
  with pytest.raises(jsonl.DataError, match=message):
    build.data_source(config, str(workdir), "train")
  config.rollout.max_prompt_len = lengths[1]  # fits exactly (the bound at max_pixels would not)
  assert len(build.data_source(config, str(workdir), "train")) == 2
