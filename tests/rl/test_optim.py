"""The learning-rate schedule by hand and the optimiser following it."""

import math

import jax.numpy as jnp
import numpy as np

from imagent_jax.rl import grpo, optim

# ---------------------------------------------------------------------------------- optimiser


def test_schedule_warmup_then_cosine():
  cfg = grpo.GRPOConfig(group_size=2, learning_rate=1.0, warmup_steps=4, total_steps=12, end_lr_ratio=0.1,
                        max_grad_norm=None)
  expected = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 8: 0.1 + 0.9 * 0.5, 6: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
              12: 0.1, 30: 0.1}
  for step, lr in expected.items():
    np.testing.assert_allclose(optim.learning_rate(cfg, step), lr, rtol=1e-6)
  # The optimiser follows the schedule: Adam's first steps move a parameter by about lr * sign(grad).
  tx = optim.make_optimizer(cfg)
  p = {"w": jnp.zeros(())}
  state = tx.init(p)
  moves = []
  for _ in range(3):
    upd, state = tx.update({"w": jnp.ones(())}, state, p)
    moves.append(float(upd["w"]))
  np.testing.assert_allclose(moves, [-0.25, -0.5, -0.75], rtol=1e-4)
  assert int(optim.optimizer_step(state)) == 3
