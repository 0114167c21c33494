"""``analysis.attention.attention_probs`` equals transformers' ``output_attentions=True`` (eager
attention) on a tiny random model: text only, one image, three images of different sizes, a
left-padded batch; within 1e-5 at every real query position."""

import hf_fixtures
import numpy as np
import pytest
import torch
from PIL import Image

from imagent_jax.analysis.attention import attention_probs
from imagent_jax.models import hf_io

TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = hf_fixtures.save_tiny_hf_checkpoint(tmp_path_factory.mktemp("attn"), seed=5)
  config, params = hf_io.load_pretrained(path)
  return config, params, hf_fixtures.make_tiny_hf_model(seed=5)


@pytest.fixture(scope="module")
def images():
  from transformers import Qwen2VLImageProcessor
  rng = np.random.RandomState(0)
  pil = [Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(60, 90), (150, 84), (84, 84)]]
  out = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64)(images=pil, return_tensors="np")
  grid = out["image_grid_thw"].astype(np.int32)
  bounds = np.concatenate([[0], np.cumsum(grid.prod(-1))])
  return [(out["pixel_values"][bounds[i]:bounds[i + 1]], grid[i]) for i in range(len(pil))]


def _torch_attentions(model, config, ids, mask, imgs):
  ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
  grid = torch.tensor(np.stack([g for _, g in imgs])) if imgs else None
  pos, _ = model.model.get_rope_index(ids_t, (ids_t == config.image_token_id).int(), image_grid_thw=grid,
                                      attention_mask=mask_t)
  with torch.no_grad():
    out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos, image_grid_thw=grid,
                pixel_values=torch.tensor(np.concatenate([p for p, _ in imgs])) if imgs else None,
                output_attentions=True)
  return np.stack([a.numpy() for a in out.attentions])  # [layers, B, H, L, L]


CASES = {"text only": [[12]], "one image": [[4, 2, 6]], "three images of different sizes": [[3, 0, 2, 1, 4, 2, 5]],
         "left-padded batch": [[5], [3, 0, 7]]}  # ints: text lengths at even places, image indices at odd ones


@pytest.mark.parametrize("case", list(CASES))
def test_attention_probs_equal_transformers_eager(models, images, case):
  config, params, torch_model = models
  rng = np.random.RandomState(7)
  rows, used = [], []
  for spec in CASES[case]:
    parts = []
    for k, x in enumerate(spec):
      if k % 2:
        parts.append(images[x][1])
        used.append(images[x])
      else:
        parts.append(x)
    rows.append(hf_fixtures.token_row(config, rng, parts))
  ids, mask = hf_fixtures.padded_batch(config, rows, side="left")
  inputs = {"input_ids": ids, "attention_mask": mask}
  if used:
    inputs.update(pixel_values=np.concatenate([p for p, _ in used]), image_grid_thw=np.stack([g for _, g in used]))
  ours = attention_probs(config, params, inputs)
  ref = _torch_attentions(torch_model, config, ids, mask, used)
  assert ours.shape == ref.shape == (config.num_hidden_layers, len(rows), config.num_attention_heads,
                                     ids.shape[1], ids.shape[1])
  real = mask.astype(bool)  # [B, L] real query positions
  err = max(np.abs(ours[:, b, :, real[b]] - ref[:, b, :, real[b]]).max() for b in range(len(rows)))
  assert err < TOL, f"max |prob diff| {err:.2e}"
  assert np.allclose(ours[:, 0, :, real[0]].sum(-1), 1.0, atol=1e-5)  # each real query's shares sum to 1
  one = attention_probs(config, params, inputs, layers=[1, 0])
  np.testing.assert_array_equal(one, ours[[1, 0]])


def test_bad_arguments(models):
  config, params, _ = models
  with pytest.raises(ValueError, match="out of range"):
    attention_probs(config, params, {"input_ids": np.zeros((1, 3), np.int32)}, layers=[99])
  with pytest.raises(ValueError, match="unknown inputs"):
    attention_probs(config, params, {"input_ids": np.zeros((1, 3), np.int32), "position_ids": None})
