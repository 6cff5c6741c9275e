"""A registry of named classes: the one lookup behind attention methods and cache schedulers."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes deriving from ``base``, each registered under its class attribute ``name``.

    ``kind`` names an entry in messages (``"attention method"``); ``listing`` introduces the valid names after
    an unknown one (``"registered methods"``), so errors read ``unknown attention method 'x'; registered
    methods: [...]``.
    """

    def __init__(self, kind: str, base: type[T], listing: str) -> None:
        self.kind = kind
        self.base = base
        self.listing = listing
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Add ``cls`` under ``cls.name`` (usable as a class decorator); registering the same class again is a
        no-op, another class under a taken name a ``ValueError``."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            article = "an" if self.base.__name__[0] in "AEIOU" else "a"
            raise TypeError(f"the {self.kind} registry expects {article} {self.base.__name__} subclass, got {cls!r}")
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
        known = self._classes.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"{self.kind} {name!r} is already registered by {known.__name__}")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; ``ValueError`` naming the registered ones otherwise."""
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; {self.listing}: {self.names()}")
        return self._classes[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes
