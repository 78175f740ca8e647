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


def is_learngene(path: tuple) -> bool:
    """A whole leaf of the learngene bundle (the label table is mixed, so it is not)."""
    return not has_class_rows(path)


def gate_class_rows(new: PyTree, old: PyTree, present: jax.Array, update_null_row: bool = True) -> PyTree:
    """The class gate on a whole tree: keep ``old`` rows of classes absent from the step.

    ``present`` is a bool vector over the ``num_classes`` real classes.  For class-row
    leaves ``out[c] = new[c] if present[c] else old[c]``; the null row of the label
    table (learngene) takes ``new`` when ``update_null_row``, and every other leaf ``new``.  Applied to parameters and optimizer
    state alike, so the AdamW moments of an absent class's tailor do not advance.
    """
    num_classes = present.shape[0]

    def gate(path, n, o):
        if not has_class_rows(path) or n.ndim == 0:
            return n
        rows = jnp.concatenate([present, jnp.full((n.shape[0] - num_classes,), update_null_row)])
        return jnp.where(rows.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return map_with_path(gate, new, old)


def count(tree: PyTree, predicate: Callable[[tuple], bool] = lambda path: True) -> int:
    """Number of scalars in leaves whose path satisfies ``predicate``."""
    return sum(int(leaf.size) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
               if predicate(path))


def split_learngene_tailors(params: PyTree, classes: Iterable[int] | None = None) -> tuple[dict, dict]:
    """Splits a parameter tree into its learngene and tailor bundles (nested dicts).

    learngene: every non-tailor leaf; the label table contributes its null row only
    (shape ``(1, H)``).  tailors: every tailor leaf and the label-table rows, kept for
    ``classes`` (all when ``None``), in that order along the leading (class) axis.
    """
    from flax import traverse_util

    flat = traverse_util.flatten_dict(_as_dict(params))
    learngene, tailors = {}, {}
    for key, leaf in flat.items():
        path = tuple(jax.tree_util.DictKey(k) for k in key)
        rows = None if classes is None else jnp.asarray(list(classes), jnp.int32)
        if is_label_table(path):
            learngene[key] = leaf[-1:]
            real = leaf[:-1]
            tailors[key] = real if rows is None else real[rows]
        elif is_tailor(path):
            tailors[key] = leaf if rows is None else leaf[rows]
        else:
            learngene[key] = leaf
    return traverse_util.unflatten_dict(learngene), traverse_util.unflatten_dict(tailors)


def merge_learngene_tailors(learngene: PyTree, tailors: PyTree) -> dict:
    """Inverse of :func:`split_learngene_tailors`: one parameter tree whose classes are
    the tailors' (label table = tailor rows followed by the learngene's null row)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(_as_dict(learngene))
    for key, leaf in traverse_util.flatten_dict(_as_dict(tailors)).items():
        path = tuple(jax.tree_util.DictKey(k) for k in key)
        flat[key] = jnp.concatenate([leaf, flat[key]], axis=0) if is_label_table(path) else leaf
    return traverse_util.unflatten_dict(flat)


def _as_dict(tree: PyTree) -> dict:
    from flax.core import unfreeze

    return unfreeze(tree) if not isinstance(tree, dict) else tree
