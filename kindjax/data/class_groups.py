"""The class selection of a config: a data set's own classes, or ImageNet's merged by a grouping.

``tables/imagenet_synsets.txt`` beside this module holds the 1000 ImageNet-1K synsets in TFDS's
label order (``tfds.builder("imagenet2012").info.features["label"].names``).  A package registers
a :class:`Grouping` (:data:`GROUPINGS`) that merges them into its own classes and tasks.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from collections.abc import Sequence
from typing import Callable, Mapping

import numpy as np

from kindjax.config import ConfigError
from kindjax.registry import Registry


def table_lines(package: str, *path: str) -> list[list[str]]:
    """The tab-separated rows of a data file shipped in ``package`` (``#`` lines and blanks skipped)."""
    text = importlib.resources.files(package).joinpath(*path).read_text()
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1K synsets; index = TFDS ``imagenet2012`` label."""
    return tuple(row[0] for row in table_lines("kindjax.data", "tables", "imagenet_synsets.txt"))


@dataclasses.dataclass(frozen=True)
class Grouping:
    """A relabelling of ImageNet-1K's classes (``config.data.grouping``).

    ``merged_class()``: synset → its merged class (a name); ``classes()``: every merged class, in label
    order; ``task_classes(task)``: the classes of ``config.data.task`` (ConfigError naming the tasks
    for an unknown one); ``what``: one phrase for messages ("ImageNet merged into … classes")."""

    merged_class: Callable[[], Mapping[str, str]]
    classes: Callable[[], tuple[str, ...]]
    task_classes: Callable[[str], tuple[str, ...]]
    what: str


#: ``config.data.grouping`` → :class:`Grouping` ("" keeps a data set's own classes).
GROUPINGS: Registry[Grouping] = Registry("class grouping", key="config.data.grouping")


@dataclasses.dataclass(frozen=True)
class ClassSelection:
    """Which base classes (a source's own: synsets or folder names) are kept, and their labels.

    ``base_to_label[b]`` is the label (``0..num_classes-1``) of base class ``b``, or −1
    when images of ``b`` are dropped; label ``j`` is named ``class_names[j]``.
    """

    base_to_label: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def keeps_all(self) -> bool:
        """True when no base class is dropped."""
        return bool(np.all(self.base_to_label >= 0))


def select_classes(base_names: Sequence[str], grouping: str = "", task: str = "",
                   classes: Sequence[int] = ()) -> ClassSelection:
    """The label of each base class under ``grouping``, then ``task``, then ``classes``.

    ``grouping=""`` keeps the base classes; a registered grouping (:data:`GROUPINGS`) merges ImageNet
    synsets into its classes. ``task`` (one of the grouping's) keeps its classes, relabelled
    ``0..n-1`` in its order. ``classes`` then keeps those
    labels, class ``classes[j]`` relabelled ``j``.
    """
    base_names = tuple(base_names)
    if grouping == "":
        if task:
            raise ConfigError(f"config.data.task={task!r} selects a task of a class grouping: set "
                              f"config.data.grouping, e.g. " + ", ".join(f"grouping={g!r}" for g in sorted(GROUPINGS)))
        names = base_names
        base_to_name = np.arange(len(base_names))
    else:
        if grouping not in GROUPINGS:
            raise ConfigError(f"config.data.grouping={grouping!r}: use '' (the data set's classes) or one of "
                              f"{sorted(GROUPINGS)}")
        group = GROUPINGS[grouping]
        merged = group.merged_class()
        unknown = [name for name in base_names if name not in merged]
        if unknown:
            raise ConfigError(f"config.data.grouping={grouping!r} needs ImageNet synset class names, but "
                              f"{unknown[:5]} (of {len(unknown)}) are not ImageNet-1K synsets; "
                              f"use config.data.grouping='' for other data")
        names = group.task_classes(task) if task else group.classes()
        position = {name: j for j, name in enumerate(names)}
        base_to_name = np.array([position.get(merged[name], -1) for name in base_names], dtype=np.int64)
    relabel = np.arange(len(names))
    classes = [int(c) for c in classes]
    if classes:
        bad = [c for c in classes if not 0 <= c < len(names)]
        if bad:
            raise ConfigError(f"config.data.classes has class ids {bad} out of range 0..{len(names) - 1} "
                              f"(the {len(names)} classes of grouping={grouping!r}, task={task!r}); "
                              f"fix the ids or the selection")
        if len(set(classes)) != len(classes):
            raise ConfigError(f"config.data.classes={tuple(classes)} repeats class ids; list each once")
        relabel = np.full(len(names), -1)
        relabel[classes] = np.arange(len(classes))
        names = tuple(names[c] for c in classes)
    base_to_label = np.where(base_to_name >= 0, relabel[np.maximum(base_to_name, 0)], -1).astype(np.int32)
    return ClassSelection(base_to_label=base_to_label, class_names=tuple(names))
