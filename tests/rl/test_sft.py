"""rl.sft: the warmup's batches train only the response, the loss is the response's cross-entropy,
and a non-finite step changes nothing."""

import jax
import numpy as np
import optax
import pytest

from imagent_jax import parallel
from imagent_jax.rl import sft

from toy import Toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return Toy.make(tmp_path_factory.mktemp("sft"), preset="micro")


def _examples(toy):
  images = Toy.images(sizes=((64, 80),))
  system = {"role": "system", "content": "You answer."}
  user = {"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Colour?"}]}
  return [([system, user], images, "<think>x</think><answer>red</answer>", "a"),
          ([system, {"role": "user", "content": "Say B."}], [], "<answer>B</answer>", "b")]


def _batch(toy, examples, max_len=160):
  return sft.encode_batch(toy.processor, examples, max_len, 256, 2, toy.config.pad_token_id, toy.config.eos_token_id)


def test_encode_batch_trains_the_response_and_its_end(toy):
  examples = _examples(toy)
  batch = _batch(toy, examples)
  tok = toy.processor.tokenizer
  for row, (messages, images, response, _) in enumerate(examples):
    n = int(batch["attention_mask"][row].sum())
    trained = batch["input_ids"][row][batch["loss_mask"][row] > 0].tolist()
    assert trained == tok.encode(response) + [toy.config.eos_token_id]
    assert batch["loss_mask"][row, n - len(trained):n].all() and not batch["loss_mask"][row, n:].any()
    assert (batch["input_ids"][row, n:] == toy.config.pad_token_id).all()
  assert batch["image_grid_thw"][0].prod() > 0 and not batch["image_grid_thw"][1].any()
  with pytest.raises(ValueError, match="max_len=20"):
    _batch(toy, examples, max_len=20)


def test_sft_loss_is_the_mean_response_cross_entropy(toy):
  model = toy.model()
  batch = _batch(toy, _examples(toy))
  loss, aux = sft.sft_loss(model, toy.params, batch)
  logits = np.asarray(model.apply({"params": toy.params}, input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                                  image_grid_thw=batch["image_grid_thw"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll, right, rows = [], [], []
  for r in range(2):
    at = np.flatnonzero(batch["loss_mask"][r])  # predicted from position t - 1
    row = [-logp[r, t - 1, batch["input_ids"][r, t]] for t in at]
    nll += row
    rows.append(np.mean(row))
    right += [logits[r, t - 1].argmax() == batch["input_ids"][r, t] for t in at]
  assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
  assert float(aux["token_accuracy"]) == pytest.approx(np.mean(right))
  np.testing.assert_allclose(aux["row_loss"], rows, rtol=1e-5)


def test_make_step_learns_and_skips_non_finite_steps(toy):
  model = toy.model()
  batch = _batch(toy, _examples(toy))
  mesh = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  optimizer = optax.adam(1e-2)
  step = sft.make_step(model, optimizer, mesh)
  copy = lambda tree: jax.tree_util.tree_map(np.array, tree)
  params = jax.device_put(copy(toy.params), step.param_shardings)
  opt_state = jax.jit(optimizer.init, out_shardings=step.opt_state_shardings)(params)
  losses = []
  for _ in range(3):
    params, opt_state, m = step(params, opt_state, batch)
    losses.append(float(m["loss"]))
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["grad_norm"]))
  assert losses[-1] < losses[0]
  broken = copy(params)
  broken["lm_head"]["kernel"][0, 0] = np.nan
  before, before_opt = copy(broken), copy(opt_state)
  new, new_opt, m = step(jax.device_put(broken, step.param_shardings), opt_state, batch)
  assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(copy(new))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(before_opt), jax.tree_util.tree_leaves(copy(new_opt))):
    np.testing.assert_array_equal(a, b)
