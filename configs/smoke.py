"""The fastest run that exercises every stage (CI runs it):

    python -m imagent_jax.main --config configs/smoke.py --workdir /tmp/smoke
"""

from imagent_jax.config import schema


def get_config(arg=None):
  del arg
  return schema.get_config("smoke")
