"""imagent_jax.registry.Registry: the one registry every config name goes through."""

import pytest

from imagent_jax.registry import Registry


def test_register_get_and_order():
  r = Registry("widget")

  @r.register("b")
  def b():
    return 2

  r.add("a", 1)
  assert r["b"] is b and r.get("a") == 1
  assert r.names() == ("b", "a") and list(r) == ["b", "a"] and len(r) == 2
  assert "a" in r and "c" not in r
  r.unregister("a")
  assert r.names() == ("b",)


def test_duplicates_and_unknown_names_fail_with_the_choices():
  r = Registry("reward")
  r.add("accuracy", 1)
  with pytest.raises(ValueError, match="reward 'accuracy' is already registered"):
    r.add("accuracy", 2)
  with pytest.raises(KeyError, match=r"unknown reward 'acc'; registered: \['accuracy'\]"):
    r["acc"]
  with pytest.raises(ValueError, match="non-empty string"):
    r.add("", 3)
