"""The benchmark model shared by the scripts in experiments/: the ``tiny`` preset widened."""

from imagent_jax.models import get_preset


def widened_tiny(num_hidden_layers: int):
  """``tiny`` with a 768-wide, 12-head (4 kv) decoder of ``num_hidden_layers`` layers, a 128-wide
  vision tower and a 4096-row vocabulary (the tiny tokenizer uses 512 ids, special tokens at
  502..511; real checkpoints pad their vocabularies the same way). 8 layers: ~58M parameters."""
  return get_preset("tiny").replace(
      vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=num_hidden_layers,
      num_attention_heads=12, num_key_value_heads=4, mrope_section=(8, 12, 12),
      vision=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=768))
