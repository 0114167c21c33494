"""The attention-shares pass (``analysis.attention._shares_program``) never holds ``[layers, heads, L, L]``:
compiled ahead of time from abstract arrays for the tiny model (2 decoder layers, 4 heads, two
images), XLA's temporaries grow about linearly in the length at a fixed query chunk, stay far
below the dense probabilities, and do not grow with the depth. The same measure on a chunk holding
every query (one layer's dense ``[heads, L, L]``) grows 4x per doubled length, so a change that
makes the analysis materialise full attention fails here. The 7B figures are
``experiments/plan_memory.py --only analyze_7b``."""

import functools

import jax
import jax.numpy as jnp

from imagent_jax.analysis import attention
from imagent_jax.models import registry

CHUNK = 128
SEGMENTS = attention.FIRST_IMAGE + 2  # text, generated, tool text, two images
IMAGE_GRID = (1, 8, 8)  # 64 patches, 16 merged tokens


def _config(layers: int):
  return registry.get_preset("tiny").replace(num_hidden_layers=layers)


@functools.lru_cache(maxsize=None)
def _compiled(layers: int, length: int, chunk: int):
  """The compiled shares program of one row of ``length`` tokens: ``(temporary bytes, output shape)``."""
  config = _config(layers)
  family = registry.family_of(config)
  patch_dim = family.geometry(config).patch_dim
  s = jax.ShapeDtypeStruct
  inputs = dict(input_ids=s((1, length), jnp.int32), attention_mask=s((1, length), jnp.int32),
                pixel_values=s((2 * IMAGE_GRID[0] * IMAGE_GRID[1] * IMAGE_GRID[2], patch_dim), jnp.float32),
                image_grid_thw=s((2, 3), jnp.int32))
  model = family.module(config, attention_block=chunk)
  program = attention._shares_program  # pylint: disable=protected-access
  lowered = program.lower(model, family.abstract_params(config), inputs, s((1, length, SEGMENTS), jnp.float32))
  compiled = lowered.compile()
  out = jax.tree_util.tree_leaves(lowered.out_info)[0]
  return compiled.memory_analysis().temp_size_in_bytes, (tuple(out.shape), out.dtype)


def _dense_bytes(layers: int, length: int) -> int:
  """The dense ``[layers, heads, L, L]`` float32 probabilities of one row."""
  return layers * _config(layers).num_attention_heads * length ** 2 * 4


def test_shares_are_layers_rows_length_segments():
  _, (shape, dtype) = _compiled(2, 2048, CHUNK)
  assert shape == (2, 1, 2048, SEGMENTS) and dtype == jnp.float32


def test_temporaries_linear_in_length_and_far_below_dense():
  short, _ = _compiled(2, 2048, CHUNK)
  long, _ = _compiled(2, 4096, CHUNK)
  # Linear terms double; the one quadratic term, the boolean [B, L, L] causal mask (1 byte a pair,
  # no heads, no layers), adds a little. Full attention would make this ~4. (Measured, jax 0.10.2
  # XLA:CPU: 19.9 MB -> 47.1 MB, x2.37.)
  assert long / short < 3.0, (short, long)
  # Dense probabilities of every layer at 4,096 tokens: 537 MB; of one layer: 268 MB.
  assert long < _dense_bytes(2, 4096) / 8, (long, _dense_bytes(2, 4096))


def test_measure_detects_full_attention():
  """A chunk of every query is one layer's dense [heads, L, L] probabilities: the ratio the test above
  bounds by 3 is then ~4, and the temporaries exceed one layer's dense bytes (measured: 136 MB -> 539 MB,
  x3.97)."""
  short, _ = _compiled(2, 2048, 2048)
  long, _ = _compiled(2, 4096, 4096)
  assert long / short > 3.5, (short, long)
  assert long > _dense_bytes(1, 4096), (long, _dense_bytes(1, 4096))


def test_temporaries_do_not_grow_with_depth():
  two, _ = _compiled(2, 2048, CHUNK)
  four, (shape, _) = _compiled(4, 2048, CHUNK)
  assert shape[0] == 4
  # Kept probabilities would add 2 x 67 MB; the shares add 2 x 41 kB (measured: 19.9 MB -> 20.9 MB).
  assert four < 1.25 * two, (two, four)
