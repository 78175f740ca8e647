"""The class tables of KIND (ICML 2025, Appendix A.3): the grouping ``"kind"`` of ImageNet's classes.

Data files in ``tables/`` beside this module:

- ``superclasses.tsv`` (Tables 10, 11): synsets merged into a WordNet superclass.
- ``tasks.tsv`` (Table 9): the merged classes of the 18 downstream tasks.

Grouping ``"kind"`` maps each ImageNet synset to a merged class: its superclass if it is
listed in ``superclasses.tsv``, else itself. Merged classes are numbered in sorted
synset order. The tasks' classes are the novel classes; the other merged classes are
the pre-training classes (task ``"pretrain"``).
"""
from __future__ import annotations

import functools
import re

from kindjax.config import ConfigError
from kindjax.data.class_groups import Grouping, imagenet_synsets, table_lines

NUM_KIND_TASKS = 18
_TASK_PATTERN = re.compile(r"task_(\d+)$")


@functools.cache
def kind_superclasses() -> dict[str, tuple[str, ...]]:
    """Superclass synset → the ImageNet synsets merged into it (Tables 10, 11)."""
    return {row[0]: tuple(row[1].split()) for row in table_lines("kindjax.papers.kind", "tables", "superclasses.tsv")}


@functools.cache
def kind_tasks() -> dict[str, tuple[str, ...]]:
    """``"task_1"``…``"task_18"`` → the task's merged classes, in Table 9's order."""
    return {row[0]: tuple(row[1].split()) for row in table_lines("kindjax.papers.kind", "tables", "tasks.tsv")}


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




def task_classes(task: str) -> tuple[str, ...]:
    if task == "pretrain":
        return kind_pretrain_classes()
    tasks = kind_tasks()
    if task not in tasks:
        match = _TASK_PATTERN.match(task)
        detail = (f"there are tasks task_1..task_{NUM_KIND_TASKS}" if match
                  else "use 'pretrain' or 'task_1'..'task_18'")
        raise ConfigError(f"config.data.task={task!r} is not a KIND task: {detail}")
    return tasks[task]


#: ``config.data.grouping="kind"``: ImageNet merged into KIND's classes.
GROUPING = Grouping(kind_merged_class, kind_classes, task_classes, "ImageNet merged into KIND's classes")
