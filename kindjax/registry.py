"""Named parts that packages outside the core add: linear variants, jobs, starts, experiments, ….

The core defines each registry and never imports the packages that fill it.  A paper package
(``kindjax/papers/<paper>/``, or any installed package) declares itself in the entry-point group
:data:`GROUP` (``pyproject.toml``: ``[project.entry-points."kindjax.papers"]``); the first read of
any registry imports every package of the group once, and each registers its parts on import.
"""
from __future__ import annotations

from importlib import metadata
from typing import Generic, Iterator, Mapping, TypeVar

#: The entry-point group whose modules register parts on import.
GROUP = "kindjax.papers"

T = TypeVar("T")

_state = "unloaded"   # → "loading" → "loaded"; back to "unloaded" if an import fails


def load_packages() -> None:
    """Imports every module of the entry-point group :data:`GROUP` (once per process; a registry read
    while they import sees what is registered so far)."""
    global _state
    if _state != "unloaded":
        return
    _state = "loading"
    try:
        for entry in metadata.entry_points(group=GROUP):
            entry.load()
    except BaseException:
        _state = "unloaded"
        raise
    _state = "loaded"


def packages() -> tuple[str, ...]:
    """The modules of the entry-point group :data:`GROUP`."""
    return tuple(sorted(entry.value for entry in metadata.entry_points(group=GROUP)))


class UnknownName(KeyError, ValueError):
    """A name no package registered (a ``KeyError`` for ``Mapping.get``, a ``ValueError`` for the
    command line's one-line errors); ``str()`` is the message: the known names and the fix."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Mapping[str, T], Generic[T]):
    """``name → part`` for one kind of part (``what``, e.g. "linear variant"); reading it loads the
    packages of :data:`GROUP` first, so their parts are there whichever module asks."""

    def __init__(self, what: str, key: str = "") -> None:
        self.what = what
        self.key = key          # the config key that names a part of this registry, for messages
        self._parts: dict[str, T] = {}

    def register(self, name: str, part: T) -> T:
        """Adds ``part`` as ``name``; a second, different part of the same name is refused."""
        if name in self._parts and self._parts[name] is not part:
            raise ValueError(f"two {self.what}s are registered as {name!r}: {self._parts[name]!r} and {part!r}")
        self._parts[name] = part
        return part

    def __getitem__(self, name: str) -> T:
        load_packages()
        if name not in self._parts:
            where = f"{self.key}={name!r}" if self.key else repr(name)
            hint = "" if packages() else (f" (no package of the entry-point group {GROUP!r} is installed: "
                                          f"install kindjax with `pip install -e .`)")
            raise UnknownName(f"{where} is not a known {self.what}; use one of {sorted(self._parts)}{hint}")
        return self._parts[name]

    def __iter__(self) -> Iterator[str]:
        load_packages()
        return iter(self._parts)

    def __len__(self) -> int:
        load_packages()
        return len(self._parts)

    def __contains__(self, name: object) -> bool:
        load_packages()
        return name in self._parts
