"""What a parameter is, decided by its path alone.

Every mask in kindjax (optimizer partitions, the class gate, checkpoint slicing,
parameter counts) derives from these rules, never from hand-kept lists:

- a path with a ``tailors`` component is a **tailor** leaf; its leading axis is the class;
- the label-embedding table ``y_embedder/embedding`` is **mixed**: row c < num_classes
  belongs to tailor c, the last row (the null class) to the learngene;
- every other leaf is **learngene** (class-agnostic).

The same rules apply to optimizer-state leaves, whose paths end in the parameter path.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

PyTree = Any

TAILORS = "tailors"
LABEL_TABLE = ("y_embedder", "embedding")


def path_names(path: tuple) -> tuple[str, ...]:
    """Key names of a ``jax.tree_util`` path (dict keys, attribute names, sequence indices)."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return tuple(names)


def path_string(path: tuple) -> str:
    """``block_0/attn/q/kernel`` style string of a tree path."""
    return "/".join(path_names(path))


def is_tailor(path: tuple) -> bool:
    return TAILORS in path_names(path)


def is_label_table(path: tuple) -> bool:
    return path_names(path)[-2:] == LABEL_TABLE


def has_class_rows(path: tuple) -> bool:
    """True for leaves whose leading axis is indexed by class (tailors, the label table)."""
    return is_tailor(path) or is_label_table(path)


def map_with_path(fn: Callable[[tuple, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(fn, tree, *rest)


def match_any(patterns: Iterable[str]) -> Callable[[tuple], bool]:
    """Predicate: the path string matches one of the regular expressions (``re.search``)."""
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(c.search(path_string(path)) for c in compiled)


def gate_class_rows(new: PyTree, old: PyTree, present: jax.Array) -> PyTree:
    """The class gate on a whole tree: keep ``old`` rows of classes absent from the step.

    ``present`` is a bool vector over the ``num_classes`` real classes.  For class-row
    leaves ``out[c] = new[c] if present[c] else old[c]``; the null row of the label
    table and every other leaf take ``new``.  Applied to parameters and optimizer
    state alike, so the AdamW moments of an absent class's tailor do not advance.
    """
    num_classes = present.shape[0]

    def gate(path, n, o):
        if not has_class_rows(path) or n.ndim == 0:
            return n
        rows = jnp.concatenate([present, jnp.ones((n.shape[0] - num_classes,), bool)])
        return jnp.where(rows.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return map_with_path(gate, new, old)


def count(tree: PyTree, predicate: Callable[[tuple], bool] = lambda path: True) -> int:
    """Number of scalars in leaves whose path satisfies ``predicate``."""
    return sum(int(leaf.size) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
               if predicate(path))
