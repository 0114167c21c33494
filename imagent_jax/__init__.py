"""imagent_jax: multi-image vision agents trained with end-to-end RL in JAX/Flax."""

__version__ = "0.1.0"
