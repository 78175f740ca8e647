"""What makes a checkpoint read trustworthy: two 32-bit sums of every array's bits, recorded in its
``meta`` when it is written and compared on every read.

Orbax's zstd frames carry no checksum: a flipped bit on disk decodes silently into another weight.
A training step records ``meta["checksums"][item][key path] = [h1, h2]`` for ``params``,
``ema_params`` and ``opt_state``; a sliced checkpoint for its part.  :func:`verify` is the one check
every reader runs on what it read (a whole item or a partial restore of some of its leaves).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, with what is left and the fix in the message."""


def _leaf_checksums(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(h1, h2, finite)`` of one array: with ``b_i`` its bits as uint32 and ``i`` the flat index,
    ``h1 = Σ b_i·(2i+1)`` and ``h2 = Σ (b_i ⊕ 2654435761·i)·(2i+1)²``, both mod 2³² (integer sums:
    the same under any sharding).  A flipped bit ``k`` changes ``h1`` by ``±2^k·(2i+1) ≠ 0``."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2 ** 32)
        stride *= x.shape[d]
    odd = 2 * index + 1
    h1 = jnp.sum(bits * odd, dtype=jnp.uint32)
    h2 = jnp.sum((bits ^ (index * jnp.uint32(2654435761))) * odd * odd, dtype=jnp.uint32)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return h1, h2, finite


@jax.jit
def _checksums(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    return [_leaf_checksums(x) for x in leaves]


def tree_checksums(trees: dict[str, Any]) -> tuple[dict[str, dict[str, list[int]]], bool]:
    """``{name: {key path: [h1, h2]}}`` of every array of each tree in ``trees`` (one device call,
    computed where the arrays live; only the sums come to the host), and whether every float in
    them is finite."""
    paths = {name: jax.tree_util.tree_leaves_with_path(tree) for name, tree in trees.items()}
    sums = iter(jax.device_get(_checksums([x for name in trees for _, x in paths[name]])))
    table: dict[str, dict[str, list[int]]] = {}
    finite = True
    for name in trees:
        table[name] = {}
        for path, _ in paths[name]:
            h1, h2, ok = next(sums)
            table[name][jax.tree_util.keystr(path)] = [int(h1), int(h2)]
            finite = finite and bool(ok)
    return table, finite


def differing(meta: dict, item: str, sums: dict[str, list[int]]) -> list[str]:
    """``item<key path>`` of each entry of ``sums`` (:func:`tree_checksums` of item ``item``, or of any
    subset of its leaves) that differs from what ``meta`` records; empty when they agree, and for a
    checkpoint written before checksums were recorded (no ``meta["checksums"][item]``)."""
    recorded = meta.get("checksums", {}).get(item)
    if recorded is None:
        return []
    return [f"{item}{path}" for path, pair in sums.items() if recorded.get(path) != pair]


def verify(meta: dict, item: str, tree: Any, where: str) -> Any:
    """``tree`` (what was read of item ``item`` of the checkpoint at ``where``: all its leaves or
    some) when it matches the checksums in ``meta``; else a one-line :class:`CheckpointError` naming
    the leaves and the fix."""
    if meta.get("checksums", {}).get(item) is None:
        return tree
    changed = differing(meta, item, tree_checksums({item: tree})[0][item])
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise CheckpointError(f"{where} is damaged: {changed[0]}{more} differs from its checksum (a flipped bit or "
                              f"a bad copy); nothing was loaded. Copy it again from a good source, or read "
                              f"another step of its workdir (--step S, or the path of checkpoints/S)")
    return tree
