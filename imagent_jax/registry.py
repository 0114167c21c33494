"""One registry for everything a config names: tools, rewards, advantage estimators, loss
aggregations, data sources, synthetic categories, warmup tasks, model families, benchmarks.

Adding one of those is one decorated function (big_vision style)::

    REWARDS = Registry("reward")

    @REWARDS.register("accuracy")
    def _accuracy(batch): ...

    REWARDS["accuracy"]          # the function; an unknown name raises KeyError naming the choices
    "accuracy" in REWARDS        # True
    REWARDS.names()              # ("accuracy", ...) in registration order

Registering a name twice is an error (two modules claiming one config value is always a bug).
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named, ordered mapping from config names to entries (functions, classes or records).

  Args:
    kind: what the entries are, for error messages ("tool", "reward", "data source", ...).
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def add(self, name: str, entry: T) -> T:
    """Registers ``entry`` under ``name``; raises ``ValueError`` if the name is taken."""
    if not isinstance(name, str) or not name:
      raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
    if name in self._entries:
      raise ValueError(f"{self.kind} {name!r} is already registered")
    self._entries[name] = entry
    return entry

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator form of ``add``: returns the entry unchanged."""
    return lambda entry: self.add(name, entry)

  def get(self, name: str) -> T:
    """The entry of ``name``; ``KeyError`` naming the registered choices when unknown."""
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._entries)}") from None

  def __getitem__(self, name: str) -> T:
    return self.get(name)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def names(self) -> tuple[str, ...]:
    """Registered names, in registration order."""
    return tuple(self._entries)

  def items(self):
    return self._entries.items()

  def values(self):
    return self._entries.values()

  def keys(self):
    return self._entries.keys()

  def unregister(self, name: str) -> None:
    """Removes ``name`` (tests that register a temporary entry clean up with this)."""
    self._entries.pop(name, None)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}, {list(self._entries)})"
