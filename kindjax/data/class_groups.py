"""The class tables of KIND (ICML 2025, Appendix A.3) and the class selection of a config.

Data files in ``tables/`` beside this module:

- ``imagenet_synsets.txt``: the 1000 ImageNet-1K synsets in TFDS's label order
  (``tfds.builder("imagenet2012").info.features["label"].names``).
- ``superclasses.tsv`` (Tables 10, 11): synsets merged into a WordNet superclass.
- ``tasks.tsv`` (Table 9): the merged classes of the 18 downstream tasks.

Grouping ``"kind"`` maps each ImageNet synset to a merged class: its superclass if it is
listed in ``superclasses.tsv``, else itself. Merged classes are numbered in sorted
synset order. The tasks' classes are the novel classes; the other merged classes are
the pre-training classes (task ``"pretrain"``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import re
from collections.abc import Sequence

import numpy as np

from kindjax.config import ConfigError

GROUPINGS = ("", "kind")
NUM_KIND_TASKS = 18
_TASK_PATTERN = re.compile(r"task_(\d+)$")


def _table_lines(filename: str) -> list[list[str]]:
    text = (importlib.resources.files("kindjax") / "data" / "tables" / filename).read_text()
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1K synsets; index = TFDS ``imagenet2012`` label."""
    return tuple(row[0] for row in _table_lines("imagenet_synsets.txt"))


@functools.cache
def kind_superclasses() -> dict[str, tuple[str, ...]]:
    """Superclass synset → the ImageNet synsets merged into it (Tables 10, 11)."""
    return {row[0]: tuple(row[1].split()) for row in _table_lines("superclasses.tsv")}


@functools.cache
def kind_tasks() -> dict[str, tuple[str, ...]]:
    """``"task_1"``…``"task_18"`` → the task's merged classes, in Table 9's order."""
    return {row[0]: tuple(row[1].split()) for row in _table_lines("tasks.tsv")}


@functools.cache
def kind_merged_class() -> dict[str, str]:
    """ImageNet synset → its merged class (a superclass, or the synset itself)."""
    merged = {synset: synset for synset in imagenet_synsets()}
    for superclass, members in kind_superclasses().items():
        merged.update({member: superclass for member in members})
    return merged


@functools.cache
def kind_classes() -> tuple[str, ...]:
    """All merged classes, sorted: the label space of grouping ``"kind"``."""
    return tuple(sorted(set(kind_merged_class().values())))


@functools.cache
def kind_pretrain_classes() -> tuple[str, ...]:
    """The merged classes in no task (sorted): KIND's pre-training classes."""
    novel = {c for classes in kind_tasks().values() for c in classes}
    return tuple(c for c in kind_classes() if c not in novel)


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


def _task_classes(task: str) -> tuple[str, ...]:
    if task == "pretrain":
        return kind_pretrain_classes()
    tasks = kind_tasks()
    if task not in tasks:
        match = _TASK_PATTERN.match(task)
        detail = (f"there are tasks task_1..task_{NUM_KIND_TASKS}" if match
                  else "use 'pretrain' or 'task_1'..'task_18'")
        raise ConfigError(f"config.data.task={task!r} is not a KIND task: {detail}")
    return tasks[task]


def select_classes(base_names: Sequence[str], grouping: str = "", task: str = "",
                   classes: Sequence[int] = ()) -> ClassSelection:
    """The label of each base class under ``grouping``, then ``task``, then ``classes``.

    ``grouping=""`` keeps the base classes; ``"kind"`` merges ImageNet synsets into the
    KIND classes. ``task`` ("pretrain", "task_1".."task_18"; needs grouping "kind") keeps
    its classes, relabelled ``0..n-1`` in its order. ``classes`` then keeps those
    labels, class ``classes[j]`` relabelled ``j``.
    """
    base_names = tuple(base_names)
    if grouping not in GROUPINGS:
        raise ConfigError(f"config.data.grouping={grouping!r}: use one of {GROUPINGS} "
                          f"('' keeps the data set's classes, 'kind' merges ImageNet into KIND's classes)")
    if grouping == "":
        if task:
            raise ConfigError(f"config.data.task={task!r} selects KIND classes: set config.data.grouping='kind'")
        names = base_names
        base_to_name = np.arange(len(base_names))
    else:
        merged = kind_merged_class()
        unknown = [name for name in base_names if name not in merged]
        if unknown:
            raise ConfigError(f"config.data.grouping='kind' needs ImageNet synset class names, but "
                              f"{unknown[:5]} (of {len(unknown)}) are not ImageNet-1K synsets; "
                              f"use config.data.grouping='' for other data")
        names = _task_classes(task) if task else kind_classes()
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
