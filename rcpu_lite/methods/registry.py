"""One shape for every registry of methods: name -> (function, one-line help), filled by a decorator.

The registries feed validation (an unknown name is refused with the known ones), --help and presets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    fn: F
    help: str


def registrar(table: dict[str, Entry]) -> Callable[[str, str], Callable[[F], F]]:
    """The decorator `@register(name, help)` that adds a function to `table`."""

    def register(name: str, help: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in table:
                raise ValueError(f"{name!r} is registered twice")
            table[name] = Entry(name, fn, help)
            return fn

        return add

    return register
