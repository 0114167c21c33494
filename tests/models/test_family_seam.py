"""The model-family seam: a second family registered from outside the package runs everywhere.

The variant is Qwen2.5-VL renamed, with 16-pixel patches (so 32-pixel merged tokens and
1536-long patch rows) and its own config type. Nothing in the sampler, the jitted rollout, the
tools or the training log-prob pass may assume 14-pixel patches: generate, a rollout with a
zoom whose view is re-rendered for training, and the training pass must all run on it, with the
rollout's sampling log-probs equal to the training forward pass.
"""

import dataclasses

import jax
import numpy as np
import pytest
from toy import PIX, Toy

from imagent_jax.agent import protocol, rollout, trajectory
from imagent_jax.models import get_preset, registry
from imagent_jax.models.qwen2_5_vl.config import ModelConfig
from imagent_jax.models.qwen2_5_vl.family import Qwen25VLFamily
from imagent_jax.rl import logprobs, masks
from imagent_jax.sampling import sampler


@dataclasses.dataclass(frozen=True)
class Patch16Config(ModelConfig):
  """A config type of its own: the registry finds the family by it."""


class Patch16Family(Qwen25VLFamily):
  name = "test_qwen_patch16"
  config_type = Patch16Config
  presets = {}

  def hf_model_types(self):
    return ("test_qwen_patch16",)


def _patch16_config():
  tiny = get_preset("tiny")
  fields = {f.name: getattr(tiny, f.name) for f in dataclasses.fields(ModelConfig)}
  fields["vision"] = dataclasses.replace(tiny.vision, patch_size=16, window_size=128)
  return Patch16Config(**fields)


@pytest.fixture(scope="module")
def toy16(tmp_path_factory):
  family = Patch16Family()
  registry.FAMILIES.add(family.name, family)
  try:
    yield Toy.make(tmp_path_factory.mktemp("p16"), config=_patch16_config(), seed=3)
  finally:
    registry.FAMILIES.unregister(family.name)


def test_the_registry_finds_the_second_family_by_config_type(toy16):
  assert type(registry.family_of(toy16.config)) is Patch16Family
  assert type(registry.family_of(get_preset("tiny"))) is Qwen25VLFamily
  g = toy16.geometry
  assert (g.patch_size, g.factor, g.patch_dim) == (16, 32, 3 * 2 * 16 * 16)
  inputs = toy16.processor([toy16.prompt(2)], [toy16.images(sizes=((100, 70), (64, 64)))])
  assert inputs["pixel_values"].shape[1] == 1536
  assert all(s % 2 == 0 for s in inputs["image_grid_thw"][:, 1:].reshape(-1))


def test_generate_runs_on_the_second_family(toy16):
  inputs = toy16.processor([toy16.prompt(2)], [toy16.images(sizes=((100, 70), (64, 64)))])
  out = sampler.generate(toy16.config, toy16.params, dict(inputs), max_new_tokens=6)
  assert out["tokens"].shape == (1, 6)
  # Greedy decoding equals the argmax of the full forward pass over the growing sequence.
  ids = np.asarray(inputs["input_ids"])
  model = toy16.model()
  logits = np.asarray(model.apply({"params": toy16.params}, **dict(inputs)))
  assert int(out["tokens"][0, 0]) == int(logits[0, -1].argmax())
  extended = dict(inputs, input_ids=np.concatenate([ids, np.asarray(out["tokens"])[:, :1]], 1),
                  attention_mask=np.ones((1, ids.shape[1] + 1), np.int32))
  logits2 = np.asarray(model.apply({"params": toy16.params}, **extended))
  assert int(out["tokens"][0, 1]) == int(logits2[0, -1].argmax())


def test_rollout_and_training_logprobs_agree_on_the_second_family(toy16):
  cfg = rollout.RolloutConfig(group_size=2, max_prompt_len=900, prompt_patches=toy16.geometry.patches(
      3 * PIX["max_pixels"]) // 4 * 4, max_prompt_images=3, max_new_tokens=500, max_tool_calls=2,
                              obs_max_tokens=toy16.geometry.tokens(PIX["max_pixels"]) + 160,
                              view_max_patches=toy16.geometry.patches(PIX["max_pixels"]), temperature=1.0)
  tool_config = toy16.tool_config()
  ro = rollout.Rollout(toy16.model(), toy16.processor, cfg, tool_config)
  images = [toy16.images(sizes=((200, 150), (120, 260)))]
  turns = ["<think>zoom</think>" + protocol.render_tool_call(protocol.ToolCall("confirm", {"image": 2, "bbox_2d": [
      10, 10, 90, 70]})), "<think>done</think><answer>B</answer>"]
  ids = sum((toy16.processor.tokenizer.encode(t) for t in turns), []) + [toy16.config.eos_token_id]
  forced = np.full((2, len(ids)), -1, np.int32)
  forced[0] = ids
  out, trajs = ro(toy16.params, [toy16.prompt(2, options=("first", "second"))], images, jax.random.key(1),
                  forced_tokens=forced)
  t0 = trajs[0]
  assert t0.status == masks.STATUS_ANSWERED and t0.answer == "B"
  assert [(c.name, c.ok, c.entered) for c in t0.calls] == [("confirm", True, True)]
  view = t0.context.views[2]
  assert view.width % 32 == 0 and view.height % 32 == 0  # sized for the variant's 32-pixel tokens

  pv, grid, per_row = trajectory.training_images(trajs, patch_budget=4096, image_slots=8,
                                                 image_settings=toy16.processor.image_settings,
                                                 view_max_pixels=tool_config.view_max_pixels)
  assert pv.shape[1] == 1536 and list(per_row) == [3, 2]
  lp = np.asarray(logprobs.sequence_logprobs(ro.model, toy16.params, out["tokens"], out["attention_mask"], pv, grid,
                                             temperature=cfg.temperature))
  act = out["action_mask"].astype(bool)
  assert act[0].sum() > 10
  err = np.abs(lp[act] - out["logprobs"][act]).max()
  assert err < 1e-4, f"rollout vs training log-prob gap {err:.2e} on the patch-16 family"


def test_a_processor_of_another_geometry_is_refused(toy16, tmp_path):
  qwen = Toy.make(tmp_path)  # 14-pixel patches
  cfg = rollout.RolloutConfig(group_size=1, view_max_patches=256, obs_max_tokens=128)
  with pytest.raises(ValueError, match="use the checkpoint's own processor"):
    rollout.Rollout(toy16.model(), qwen.processor, cfg, qwen.tool_config())
