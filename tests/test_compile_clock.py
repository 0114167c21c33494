"""The compile clock the training loops report per step (imagent_jax/compile_clock.py)."""

import jax
import jax.numpy as jnp

from imagent_jax import compile_clock


def test_counts_compiles_and_not_cached_calls():
  f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
  x = jnp.ones((64, 64))
  t0 = compile_clock.seconds()
  f(x).block_until_ready()  # traces, lowers and compiles
  t1 = compile_clock.seconds()
  assert t1 > t0
  kinds = [compile_clock.seconds(k) for k in ("trace", "lower", "compile")]
  assert all(k > 0 for k in kinds) and abs(sum(kinds) - t1) < 1e-9
  for _ in range(3):
    f(x).block_until_ready()  # cached: no compile
  assert compile_clock.seconds() == t1
  f(jnp.ones((32, 64))).block_until_ready()  # a new shape compiles again
  assert compile_clock.seconds() > t1


def test_postfix_names_only_real_compiles():
  assert compile_clock.postfix(7.2) == {"compiled": "7s"}
  assert compile_clock.postfix(0.1) == {}
