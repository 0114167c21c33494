"""rl.logprobs: the one log-prob of a token under the sampling distribution, and the training pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagent_jax.rl import logprobs


def _reference(logits, tokens, temperature, banned):
  """float64 numpy: log softmax(logits / t) with banned tokens removed, and the entropy."""
  x = np.asarray(logits, np.float64) / (1.0 if temperature == 0 else temperature)
  x[..., list(banned)] = -np.inf
  logp = x - x.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  p = np.exp(logp)
  entropy = -np.where(p > 0, p * np.where(p > 0, logp, 0), 0).sum(-1)
  return np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0], entropy


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7, 1.3])
@pytest.mark.parametrize("banned", [(), (3, 7)])
def test_logprobs_of_matches_a_float64_reference(temperature, banned):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  tokens = rng.integers(0, 11, size=(2, 5))
  tokens[tokens == 3] = 4
  tokens[tokens == 7] = 8
  logp, entropy = logprobs.logprobs_of(jnp.asarray(logits), jnp.asarray(tokens), temperature, banned,
                                       with_entropy=True)
  ref_logp, ref_entropy = _reference(logits, tokens, temperature, banned)
  assert logp.shape == entropy.shape == (2, 5)
  np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
  np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5)
  np.testing.assert_array_equal(logprobs.logprobs_of(jnp.asarray(logits), jnp.asarray(tokens), temperature, banned),
                                logp)
  if banned:
    assert (logprobs.logprobs_of(jnp.asarray(logits), jnp.full((2, 5), banned[0]), temperature, banned) < -1e20).all()


def test_greedy_and_unit_temperature_are_the_plain_log_softmax():
  """t = 0 is read as 1, and at 1 the log-prob is exactly ``log_softmax(logits)`` (the SFT loss's)."""
  logits = jax.random.normal(jax.random.key(0), (4, 9)) * 4
  tokens = jnp.arange(4)
  plain = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
  for t in (0.0, 1.0):
    np.testing.assert_array_equal(logprobs.logprobs_of(logits, tokens, t), plain)
    np.testing.assert_array_equal(jax.jit(lambda x, k: logprobs.logprobs_of(x, k, t))(logits, tokens), plain)
  assert not np.array_equal(logprobs.logprobs_of(logits, tokens, 0.5), plain)


def test_token_logprobs_aligns_with_tokens_and_zeroes_padding(tmp_path):
  from toy import Toy  # pylint: disable=import-outside-toplevel
  toy = Toy.make(tmp_path, preset="micro")
  model = toy.model()
  tokens = jnp.asarray([[5, 9, 17, 33, 2], [0, 0, 12, 40, 41]], jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], jnp.int32)
  logp, entropy = logprobs.token_logprobs(model, toy.params, tokens, mask, None, None, temperature=0.9,
                                          with_entropy=True)
  logits = model.apply({"params": toy.params}, input_ids=tokens, attention_mask=mask)
  banned = toy.family.banned_token_ids(toy.config)
  want, want_entropy = logprobs.logprobs_of(logits[:, :-1], tokens[:, 1:], 0.9, banned, with_entropy=True)
  np.testing.assert_array_equal(logp[:, 1:] * mask[:, 1:], want * mask[:, 1:])
  np.testing.assert_array_equal(entropy[:, 1:] * mask[:, 1:], want_entropy * mask[:, 1:])
  assert (logp[:, 0] == 0).all() and (logp[1, :2] == 0).all() and (entropy[1, :2] == 0).all()
  np.testing.assert_array_equal(logprobs.sequence_logprobs(model, toy.params, tokens, mask, None, None, 0.9), logp)
