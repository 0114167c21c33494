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


# ------------------------------------------------------------- the chunked vocabulary projection

# LLVM's cheap pipeline (as in test_grpo): the same programs, compiled several times faster on 2 cores.
FAST_COMPILE = dict(compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def _dense_token_logprobs(model, params, tokens, mask, temperature, banned):
  """The unchunked pass (the implementation before chunking): ``[R, S, V]`` logits at once."""
  logits = model.apply({"params": params}, input_ids=tokens, attention_mask=mask)  # [R, S, V]
  logp, entropy = logprobs.logprobs_of(logits[:, :-1], tokens[:, 1:], temperature, banned, with_entropy=True)
  valid = mask.astype(bool)
  pad = lambda x: jnp.where(valid, jnp.concatenate([jnp.zeros_like(x[:, :1]), x], axis=1), 0.0)
  return pad(logp), pad(entropy)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  """The micro model, 3 rows of 23 tokens (one left-, one right-padded), the banned tokens, and the
  dense pass's log-probs, entropies and gradients (of ``_objective``) at temperature 0.7."""
  from toy import Toy  # pylint: disable=import-outside-toplevel
  toy = Toy.make(tmp_path_factory.mktemp("chunks"), preset="micro")
  banned = toy.family.banned_token_ids(toy.config) + (3, 7)  # the family's and two text tokens
  tokens = np.random.default_rng(1).integers(0, 400, (3, 23)).astype(np.int32)
  tokens[np.isin(tokens, banned)] = 11
  mask = np.ones((3, 23), np.int32)
  mask[1, :6] = 0  # left padding
  mask[2, 17:] = 0  # right padding
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)

  def dense(p):
    logp, entropy = _dense_token_logprobs(toy.model(), p, tokens, mask, 0.7, banned)
    return _objective(logp, entropy, mask), (logp, entropy)

  (_, (logp, entropy)), grads = jax.jit(jax.value_and_grad(dense, has_aux=True), **FAST_COMPILE)(toy.params)
  return dict(toy=toy, tokens=tokens, mask=mask, banned=banned, logp=logp, entropy=entropy, grads=grads)


def _objective(logp, entropy, mask):
  """A scalar that weighs every real position differently, so each log-prob and entropy has its own gradient."""
  w = jnp.linspace(-1.0, 2.0, logp.size).reshape(logp.shape) * mask
  return jnp.sum(w * logp) + jnp.sum(w[:, ::-1] * entropy)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 22])  # of 22 positions: 1 chunk, 22, 5 of 5 (3 padded), 1
def test_chunked_logprobs_and_gradients_equal_the_dense_pass(micro, chunk_size):
  """Values and gradients of the chunked pass equal the dense ``[R, S, V]`` pass's (fp32, temperature
  0.7, banned tokens, left and right padding)."""
  toy, tokens, mask, banned = micro["toy"], micro["tokens"], micro["mask"], micro["banned"]
  model = toy.model()

  def chunked(p):
    logp, entropy = logprobs.token_logprobs(model, p, tokens, mask, None, None, temperature=0.7, banned=banned,
                                            with_entropy=True, chunk_size=chunk_size)
    return _objective(logp, entropy, mask), (logp, entropy)

  (_, (logp, entropy)), grads = jax.jit(jax.value_and_grad(chunked, has_aux=True), **FAST_COMPILE)(toy.params)
  want_grads = micro["grads"]
  assert logp.shape == entropy.shape == tokens.shape
  np.testing.assert_allclose(logp, micro["logp"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(entropy, micro["entropy"], rtol=1e-5, atol=1e-5)
  assert (logp[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all() and (logp[:, 0] == 0).all()
  assert float(jnp.abs(micro["logp"]).sum()) > 100  # the comparison is not between zeros
  assert float(jnp.abs(want_grads["lm_head"]["kernel"]).max()) > 1e-3
  for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(want_grads)):
    scale = float(jnp.abs(want).max()) + 1e-6
    np.testing.assert_allclose(g / scale, want / scale, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  # Without entropies, through the jitted entry point: the same log-probs.
  np.testing.assert_allclose(logprobs.sequence_logprobs(model, toy.params, tokens, mask, None, None, 0.7, banned,
                                                        chunk_size=chunk_size), logp, rtol=1e-5, atol=1e-5)


def _largest_vocab_value(fn, *args, vocab):
  """Elements of the largest value over positions and the vocabulary (rank >= 3, a ``vocab``-long
  axis; not the ``[D, V]`` projection or its gradient) anywhere in ``fn``'s jaxpr, sub-jaxprs included."""
  from jax.extend import core  # pylint: disable=import-outside-toplevel

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        shape = getattr(v.aval, "shape", ())
        if len(shape) >= 3 and vocab in shape:
          yield int(np.prod(shape))
    for sub in core.subjaxprs(jaxpr):
      yield from walk(sub)

  return max(walk(jax.make_jaxpr(fn)(*args).jaxpr), default=0)


def test_the_training_pass_never_holds_the_full_logits_forward_or_backward(micro):
  """The gradient of the chunked pass holds at most one chunk's ``[R, chunk, V]``; the dense pass ``[R, S - 1, V]``."""
  toy, tokens, mask = micro["toy"], micro["tokens"], micro["mask"]
  model, vocab = toy.model(), toy.config.vocab_size
  rows, length = tokens.shape

  def loss(chunk_size):
    def fn(p):
      logp, entropy = logprobs.token_logprobs(model, p, tokens, mask, None, None, temperature=0.7, with_entropy=True,
                                              chunk_size=chunk_size)
      return _objective(logp, entropy, mask)
    return jax.grad(fn)

  assert _largest_vocab_value(loss(None), toy.params, vocab=vocab) == rows * (length - 1) * vocab
  assert _largest_vocab_value(loss(5), toy.params, vocab=vocab) == rows * 5 * vocab  # 22 positions: 5 chunks of 5
  assert _largest_vocab_value(loss(8), toy.params, vocab=vocab) == rows * 8 * vocab  # 3 chunks of 8
