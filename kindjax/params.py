"""What a parameter is, and what a training step may do to it, decided by its path alone.

Every mask in kindjax (optimizer partitions, the class gate, checkpoint slicing,
parameter counts) derives from these rules, never from hand-kept lists:

- a path with a ``tailors`` component is a **tailor** leaf; its leading axis is the class;
- the label-embedding table ``y_embedder/embedding`` is **mixed**: row c < num_classes
  belongs to tailor c, the last row (the null class) to the learngene;
- every other leaf is **learngene** (class-agnostic);
- an ``adapter`` component marks the leaves a PEFT variant adds beside its base weight.

:func:`update_rule` turns a config into the one :class:`UpdateRule` the trainer applies.
The same rules apply to optimizer-state leaves, whose paths end in the parameter path.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from kindjax.layers import is_class_gated

PyTree = Any

TAILORS = "tailors"
LABEL_TABLE = ("y_embedder", "embedding")

#: ``train.trainable`` patterns (regexes on ``block_0/attn/q/kernel``-style paths) for the
#: leaf families the methods select: adapter leaves, the label table, biases.
ADAPTER_PATHS = "/adapter/"
LABEL_PATHS = "^y_embedder/"
BIAS_PATHS = "/bias$"


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


def classes_present(labels: jax.Array, num_classes: int) -> jax.Array:
    """Bool ``(num_classes,)``: which real classes ``labels`` contain (the null class is not one)."""
    return jnp.zeros((num_classes + 1,), bool).at[labels].set(True)[:num_classes]


def gate_class_rows(new: PyTree, old: PyTree, present: jax.Array, update_null_row: bool = True) -> PyTree:
    """The class gate on a whole tree: keep ``old`` rows of classes absent from the step.

    ``present`` is a bool vector over the ``num_classes`` real classes.  For class-row
    leaves ``out[c] = new[c] if present[c] else old[c]``; the null row of the label
    table (learngene) takes ``new`` when ``update_null_row``, and every other leaf ``new``.
    Applied to parameters and optimizer state alike, so the AdamW moments of an absent
    class's tailor do not advance.
    """
    num_classes = present.shape[0]

    def gate(path, n, o):
        if not has_class_rows(path) or n.ndim == 0:
            return n
        rows = jnp.concatenate([present, jnp.full((n.shape[0] - num_classes,), update_null_row)])
        return jnp.where(rows.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return map_with_path(gate, new, old)


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """What a training step may do to each leaf, by path.

    ``trainable(path)``: the leaf receives optimizer updates (all others stay bit-identical
    and carry no optimizer state).  ``class_gated``: leaves with class rows change only in
    the rows of the classes present in the step's labels, parameters and optimizer state
    alike.  ``null_row``: whether the label table's null row may change.
    """

    trainable: Callable[[tuple], bool]
    class_gated: bool
    null_row: bool

    def labels(self, tree: PyTree) -> PyTree:
        """``"trainable"`` or ``"frozen"`` per leaf (the optimizer's partition)."""
        return map_with_path(lambda path, _: "trainable" if self.trainable(path) else "frozen", tree)

    def labelled_rows(self, tree: PyTree) -> PyTree | None:
        """Per leaf, whether a batch's gradient lives in its labels' rows only (the class-row leaves
        under the class gate; :func:`kindjax.sharding.gather_class_rows`); None without a gate."""
        return map_with_path(lambda path, _: has_class_rows(path), tree) if self.class_gated else None

    def restrict(self, new: PyTree, old: PyTree, labels: jax.Array, num_classes: int) -> PyTree:
        """``new`` with the class rows the step may not change taken from ``old``."""
        if not self.class_gated and self.null_row:
            return new
        present = classes_present(labels, num_classes) if self.class_gated else jnp.ones((num_classes,), bool)
        return gate_class_rows(new, old, present, self.null_row)


def update_rule(config: ml_collections.ConfigDict) -> UpdateRule:
    """The config's :class:`UpdateRule`: ``train.trainable`` regexes, minus every learngene
    leaf (and the null label row) under ``train.freeze_learngene``; class rows gated when
    the linear variant is class-gated (:func:`kindjax.layers.is_class_gated`)."""
    matches = match_any(config.train.trainable)
    frozen = bool(config.train.freeze_learngene)
    trainable = (lambda path: matches(path) and not is_learngene(path)) if frozen else matches
    return UpdateRule(trainable, class_gated=is_class_gated(config.model), null_row=not frozen)


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

    flat = traverse_util.flatten_dict(as_dict(params))
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

    flat = traverse_util.flatten_dict(as_dict(learngene))
    for key, leaf in traverse_util.flatten_dict(as_dict(tailors)).items():
        path = tuple(jax.tree_util.DictKey(k) for k in key)
        flat[key] = jnp.concatenate([leaf, flat[key]], axis=0) if is_label_table(path) else leaf
    return traverse_util.unflatten_dict(flat)


def as_dict(tree: PyTree) -> dict:
    """A parameter tree as nested plain dicts (unfrozen)."""
    from flax.core import unfreeze

    return unfreeze(tree) if not isinstance(tree, dict) else tree


def map_layers(tree: Mapping[str, Any], is_layer: Callable[[str, Mapping], bool],
               fn: Callable[[dict, jax.Array], dict], key: jax.Array) -> dict:
    """``tree`` with ``fn(node, key_j)`` applied to every sub-tree ``node`` (under key ``name``)
    for which ``is_layer(name, node)``; ``key_j = fold_in(key, j)`` for the j-th such layer."""
    counter = iter(range(1 << 30))

    def visit(node: Any, name: str) -> Any:
        if not isinstance(node, Mapping):
            return node
        if is_layer(name, node):
            return fn(dict(node), jax.random.fold_in(key, next(counter)))
        return {k: visit(v, k) for k, v in node.items()}

    return visit(tree, "")
