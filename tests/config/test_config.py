"""Tests for imagent_jax.config: the schema maps onto the component dataclasses, every field is a
flag, the released presets, and validation naming each section's problems before compiling."""

import dataclasses
import os

import pytest
from absl import flags
from ml_collections import config_flags

from imagent_jax.config import presets, schema, validate
from imagent_jax.stages import build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Keys added so that every field of a component is a flag; their values are the dataclasses'
# defaults, so the default run builds the very components it built before they were keys.
ADDED_KEYS = {
    "tools": ("view_min_pixels",),
    "reward": ("min_image_calls", "helpful_without_baseline", "require_think", "fallback", "rel_tol", "abs_tol",
               "integer_exact"),
    "masks": ("group_stats_include_masked", "zero_variance_tol"),
    "rl": ("adv_eps", "b1", "b2", "adam_eps"),
}


def _fields(cls):
  return {f.name for f in dataclasses.fields(cls) if f.init}


@pytest.mark.parametrize("section", build.COMPONENT_SECTIONS)
def test_each_field_of_a_component_is_a_key_of_its_section_or_derived(section):
  """The section maps onto its dataclass one to one: a field is a key of the section or a quantity
  ``build.DERIVED`` computes from other keys; a key is a field or a stage's setting (``STAGE_KEYS``)."""
  cls = build.component_classes()[section]
  keys = set(schema.get_config()[section].keys())
  derived = set(build.DERIVED.get(section, {}))
  fields = _fields(cls)
  assert fields - keys - derived == set(), f"fields of {cls.__name__} no config.{section} key sets"
  assert keys - fields - set(build.STAGE_KEYS[section]) == set(), f"config.{section} keys that are no field"
  assert derived <= fields, f"DERIVED names fields {cls.__name__} does not have"
  assert not keys & derived, "a derived field must not also be a key"
  assert set(build.STAGE_KEYS[section]).isdisjoint(fields)


@pytest.mark.parametrize("section,key", [(s, k) for s, keys in ADDED_KEYS.items() for k in keys])
def test_added_keys_default_to_the_dataclass_defaults(section, key):
  cls = build.component_classes()[section]
  default = {f.name: f.default for f in dataclasses.fields(cls)}[key]
  for config in (schema.get_config(), schema.get_config("smoke"), presets.released_qwen_config("qwen2_5_vl_7b")):
    assert config[section][key] == default
    assert getattr(build.component(config, section), key) == default


def _parse(*overrides, config_file="configs/smoke.py"):
  values = flags.FlagValues()
  argv = ["test", f"--config={os.path.join(ROOT, config_file)}", *overrides]
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("flag,section,field,value", [
    ("--config.reward.fallback=boxed", "reward", "fallback", "boxed"),
    ("--config.reward.rel_tol=0.05", "reward", "rel_tol", 0.05),
    ("--config.reward.require_think=false", "reward", "require_think", False),
    ("--config.masks.zero_variance_tol=0.01", "masks", "zero_variance_tol", 0.01),
    ("--config.masks.group_stats_include_masked=false", "masks", "group_stats_include_masked", False),
    ("--config.rl.adv_eps=0.001", "rl", "adv_eps", 0.001),
    ("--config.rl.b2=0.95", "rl", "b2", 0.95),
    ("--config.rl.adam_eps=1e-6", "rl", "adam_eps", 1e-6),
    ("--config.tools.view_min_pixels=6272", "tools", "view_min_pixels", 6272),
    ("--config.rollout.top_k=5", "rollout", "top_k", 5),
])
def test_every_field_is_reachable_from_the_command_line(flag, section, field, value):
  config = _parse(flag)
  assert getattr(build.component(config, section), field) == value


def test_derived_quantities_follow_their_sources():
  config = _parse("--config.rollout.group_size=3", "--config.rollout.temperature=0.7", "--config.rl.steps=0",
                  "--config.tools.view_max_pixels=12544", "--config.processor.min_pixels=6272",
                  "--config.tools.view_min_pixels=6272",
                  "--config.rl.advantage=grpo_unnormalized")
  assert build.mask_config(config).group_size == 3
  grpo = build.grpo_config(config)
  assert (grpo.group_size, grpo.temperature, grpo.total_steps) == (3, 0.7, 1)  # total_steps >= 1
  assert build.rollout_config(config).view_max_patches == 12544 // 14 ** 2
  tool = build.tool_config(config)
  assert (tool.input_min_pixels, tool.input_max_pixels, tool.factor) == (6272, config.processor.max_pixels, 28)
  assert tool.tools == ("reflect", "confirm")


def test_the_config_modules():
  assert schema.validate is validate.validate  # callers that know the schema module keep working
  with pytest.raises(ValueError, match="unknown config argument"):
    schema.get_config("nope")
  smoke = schema.get_config("smoke")
  assert smoke.model.preset == "micro" and smoke.rl.steps == 2
  released = presets.released_qwen_config("qwen2_5_vl_3b", "smoke")
  assert released.model.preset == "qwen2_5_vl_3b" and released.rl.steps == 2 and released.data.source == "jsonl"


@pytest.mark.parametrize("arg,preset,steps,questions", [("3b", "qwen2_5_vl_3b", 500, 8),
                                                        ("7b", "qwen2_5_vl_7b", 500, 8),
                                                        ("7b,smoke", "qwen2_5_vl_7b", 2, 2)])
def test_released_config_takes_the_size_after_a_colon(arg, preset, steps, questions):
  config = _parse("--config.rollout.group_size=8", config_file=f"configs/qwen2_5_vl.py:{arg}")
  assert config.model.preset == preset and config.model.dtype == "bfloat16" and config.rl.steps == steps
  assert config.rollout.group_size == 8 and config.stages == "rl"
  views = config.rollout.max_tool_calls
  assert config.rl.image_slots == questions * 8 * (4 + views)  # the budgets follow the override


def _geometry():
  from imagent_jax.models import get_preset, registry
  return registry.family_of(get_preset("qwen2_5_vl_7b")).geometry(get_preset("qwen2_5_vl_7b"))


def test_released_budgets_are_derived_from_questions_batch_and_views():
  """The issue's numbers: 16 rows re-rendering one 5,120-patch input need 81,920 patches; the
  released budgets hold 4 such inputs and 4 views of 1,024 patches a row, and follow overrides."""
  config = _parse(config_file="configs/qwen2_5_vl.py:7b")
  need = build.required_budgets(config, _geometry())
  assert {k: config[k.split(".")[0]][k.split(".")[1]] for k in need} == need
  rows = config.rl.batch_size * config.rollout.group_size
  assert (config.data.max_images_per_question, config.rollout.max_tool_calls, rows) == (4, 4, 128)
  assert config.rl.patch_budget == rows * (4 * 5120 + 4 * 1024) >= 16 * 5120
  assert config.rollout.prompt_patches == 8 * 4 * 5120 and config.rollout.max_prompt_images == 8 * 4
  assert config.rollout.max_prompt_len == 4 * 1280 + build.PROMPT_TEXT_TOKENS
  assert config.rollout.obs_max_tokens == 256 + build.OBS_TEXT_TOKENS
  assert config.rl.minibatch_patch_budget == config.rl.patch_budget // 4 and config.rl.minibatch_image_slots == 32 * 8
  config = _parse("--config.data.max_images_per_question=2", "--config.processor.max_pixels=200704",
                  "--config.rl.batch_size=1", "--config.rl.num_minibatches=2", "--config.rl.patch_budget=99",
                  config_file="configs/qwen2_5_vl.py:7b")
  assert config.rollout.prompt_patches == 2 * 1024 and config.rollout.max_prompt_len == 2 * 256 + 1024
  assert config.rl.minibatch_image_slots == 8 * (2 + 4)
  assert config.rl.patch_budget == 99  # a budget set by hand replaces the derived one ...
  with pytest.raises(ValueError, match=r"config.rl.patch_budget=99 cannot hold even the prompt images of 16 rows "
                                       r"\(32768 patches; with every tool view: 98304\)"):
    validate.validate(config)  # ... and is checked


def test_embedded_default_budgets_are_unchanged():
  """The default keeps its own (hand-set) budgets: the same components as before budgets were derived."""
  for config, values in ((schema.get_config(), (640, 4096, 16, 240, 24576, 112, 0, 0)),
                         (schema.get_config("smoke"), (640, 4096, 16, 240, 3072, 24, 0, 0))):
    r, ro = config.rl, config.rollout
    assert (ro.max_prompt_len, ro.prompt_patches, ro.max_prompt_images, ro.obs_max_tokens, r.patch_budget,
            r.image_slots, r.minibatch_patch_budget, r.minibatch_image_slots) == values
    validate.validate(config, num_devices=8)


def _checkpoint(folder, tokenizer=True):
  """A checkpoint folder as far as validation reads it: the 7B's config.json (and a tokenizer)."""
  import json
  from imagent_jax.models import get_preset
  from imagent_jax.processing import build_tiny_tokenizer
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(get_preset("qwen2_5_vl_7b").to_hf_dict(), f)
  if tokenizer:
    build_tiny_tokenizer(str(folder), vocab_size=512)
  return str(folder)


def test_released_config_is_valid_with_a_checkpoint_and_refuses_what_makes_no_sense(tmp_path):
  config = presets.released_qwen_config("qwen2_5_vl_7b")
  with pytest.raises(ValueError, match=r"config.stages \['rl'\] with config.model.preset='qwen2_5_vl_7b' and no "
                                       r"config.model.checkpoint would roll out and train random weights"):
    validate.validate(config)
  config.model.checkpoint = _checkpoint(tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"config.data.source='jsonl' needs config.data.train_path, "
                                       r"config.data.validation_path"):
    validate.validate(config, num_devices=8)
  data = tmp_path / "data.jsonl"
  data.write_text("")
  config.data.train_path = config.data.validation_path = str(data)
  validate.validate(config, num_devices=8)
  config.stages = "warmup,rl"
  with pytest.raises(ValueError, match=r"config.stages has 'warmup' with config.model.checkpoint=.*ckpt': the warmup "
                                       r"trains a tiny model from random weights and would ignore the checkpoint"):
    validate.validate(config)
  config.stages, config.model.checkpoint, config.model.tokenizer = "warmup", "", str(tmp_path / "ckpt")
  with pytest.raises(ValueError, match=r"'warmup' with config.model.preset='qwen2_5_vl_7b': the warmup trains the "
                                       r"tiny presets \(tiny, micro\)"):
    validate.validate(config)


def test_validate_checks_budgets_for_jsonl_data_too(tmp_path):
  config = presets.released_qwen_config("qwen2_5_vl_7b")
  config.model.checkpoint = _checkpoint(tmp_path / "ckpt")
  config.stages = "rollout,rl"
  config.rollout.max_prompt_len = 4096  # the old released value: 4 images of up to 1280 tokens do not fit
  config.rollout.prompt_patches = 4 * 5120  # the old value: one question's images, not rl.batch_size questions'
  config.rl.image_slots = 4 * 4 * 7  # the default's
  config.rl.num_minibatches = 3
  config.rollout.num_prompts = 9
  config.data.train_path = str(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError) as e:
    validate.validate(config)
  text = str(e.value)
  text_tokens = build.prompt_length(config, build.run_processor(config, config.model.checkpoint), "", None,
                                    [1] * 4) - 4  # the system prompt and markup, measured with the tokenizer
  for message in (
      f"config.rollout.max_prompt_len=4096 cannot hold 4 images of up to 1280 tokens and the prompt's {text_tokens} "
      f"text tokens without a question (need >= {5120 + text_tokens}",
      "config.rollout.prompt_patches=20480 cannot hold rl.batch_size=8 questions of 4 images of up to 5120 patches "
      "(163840)",
      "config.rl.num_minibatches=3 must divide the 128 rows of a step",
      "config.rollout.num_prompts=9 > rl.batch_size=8",
      f"config.data.train_path='{tmp_path}/nope.jsonl' does not exist"):
    assert message in text, (message, text)
  config.rl.num_minibatches = 4
  with pytest.raises(ValueError, match=r"config.rl.image_slots=112 cannot hold 128 rows of 4 prompt images and "
                                       r"rollout.max_tool_calls=4 views \(need 1024\)"):
    validate.validate(config)


def test_released_config_needs_a_size():
  import importlib.util
  spec = importlib.util.spec_from_file_location("qwen2_5_vl", os.path.join(ROOT, "configs", "qwen2_5_vl.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in (None, "", "5b"):
    with pytest.raises(ValueError, match=r"needs a size argument, one of \['3b', '7b', '32b', '72b'\]"):
      module.get_config(arg)


def test_validate_names_the_problem_of_every_section_at_once():
  config = schema.get_config("smoke")
  config.reward.fallback = "nope"
  config.masks.zero_variance_tol = -1.0
  config.rl.b1 = 1.5
  config.rollout.obs_max_tokens = 20
  config.data.categories = "nope"
  config.tools.prompt_style = "verbose"
  with pytest.raises(ValueError) as e:
    validate.validate(config)
  text = str(e.value)
  assert text.startswith("invalid config:")
  for message in ("config.reward: unknown answer fallback 'nope'", "config.masks: MaskConfig.zero_variance_tol",
                  "config.rl: GRPOConfig: need 0 <= b1", "config.rollout: obs_max_tokens=20",
                  "config.data: invalid DifficultyConfig: unknown categories ['nope']", "config.tools:"):
    assert message in text, (message, text)


def test_validate_cross_section_and_stage_checks():
  config = schema.get_config("smoke")
  validate.validate(config, num_devices=8)
  config.data.source = "nope"
  config.stages = "model,fly"
  config.rollout.group_size = 1  # std-normalised GRPO needs two rollouts per prompt
  config.tools.view_max_pixels = 28 * 28 * 128
  with pytest.raises(ValueError) as e:
    validate.validate(config)
  text = str(e.value)
  for message in ("config.data.source='nope' is not one of ['synthetic', 'synthetic_mifg', 'jsonl']",
                  "unknown stages ['fly']; available: ['model', 'warmup', 'rollout', 'rl', 'eval', 'analyze']",
                  "config.rl: GRPOConfig: group_size=1", "exceeds config.processor.max_pixels"):
    assert message in text, (message, text)


def test_multihost_runs_are_checked():
  from imagent_jax.config import schema
  c = schema.get_config("smoke")
  with pytest.raises(ValueError) as e:
    schema.validate(c, num_processes=2)
  assert "stages ['model', 'warmup', 'rollout'] run on one process" in str(e.value)
  with c.unlocked():
    c.stages, c.rl.batch_size, c.rollout.num_prompts = "rl", 3, 1
  with pytest.raises(ValueError, match=r"rl.batch_size=3 must be a multiple of the 2 processes"):
    schema.validate(c, num_processes=2)
  with c.unlocked():
    c.rl.batch_size = 2
  schema.validate(c, num_processes=2)


def test_validate_checks_that_grad_accum_divides_a_minibatch():
  config = schema.get_config()
  assert config.rl.grad_accum == 2
  validate.validate(config)  # the default is valid
  config.rl.grad_accum = 3
  with pytest.raises(ValueError, match=r"config.rl.grad_accum=3 must divide the 16 rows of a minibatch"):
    validate.validate(config)
  assert build.grpo_config(schema.get_config()).grad_accum == 2  # reaches the GRPO config
