"""FINE's baselines as initialisers of a dense DiT of any depth ``L′`` (``init.grow``), same width as
the source.  Blocks are ``block_0 .. block_{L-1}``; ``i`` below is that 0-based index.

- ``scratch`` — He init: every kernel ``~ N(0, 2/fan_in)`` (Kaiming-normal, fan-in = ``d_in``), biases 0;
  DiT's zero-initialised layers keep their init (each block's ``adaln_modulation`` — adaLN-Zero, or the
  small Gaussian of adaLN-Gaussian — and ``final_layer``), so every block still starts as the identity;
  the label table keeps ``N(0, 0.02²)``.
- ``mimetic`` — Trockman & Kolter 2023: per head ``h``, ``K_q,h K_k,hᵀ`` is the best rank-``d_h``
  approximation of ``α₁Z + β₁I``, and ``K_v K_o = α₂Z′ − β₂I`` exactly (:func:`mimetic_pair`,
  ``Z ~ N(0, 1/d)``; kernels act as ``x·K``); ``α₁ = β₁ = 0.7``, ``α₂ = β₂ = 0.4`` (the paper's
  ViT setting, as best known).  Every other leaf keeps DiT's init.
- ``share`` — Share init: target block ``i`` ← source block ``⌊i·L/L′⌋`` (:func:`stretch_blocks`).
- ``prune`` — Laptop-Diff / BK-SDM's first half: keep ``L′ < L`` evenly spaced source blocks
  ``round(i·(L−1)/(L′−1))`` (first and last kept; :func:`prune_blocks`), then train with output
  distillation from the unpruned teacher (:func:`prune_distill_config`).  ``init.grow_blocks``
  overrides the map of ``share`` and ``prune``.
- ``tleg`` — from a ``model.linear.kind='tleg'`` source: ``θ_l = θ_A + (l/L′)·θ_B``, ``l = i + 1``
  (:func:`tleg_expand`); the per-block adaLN modulation follows the Share map.
- ``ligo`` — two runs: a ``kind='ligo'`` model of depth ``L′`` whose stacks are the dense source's
  layers (frozen) and whose coefficients learn (``train.trainable = ('/coef$',)``), then a dense DiT
  with ``W′_l = Σ_j c_{l,j}W_j`` materialised (:func:`ligo_materialize`; from the run's raw weights,
  not its EMA, which after so few steps would still be the start).  :func:`grow_config` writes
  both configs.

Embedders and the final layer are copied from the source; the label table is copied whole when the
source has the same classes (else only its null row, new classes fresh:
:func:`kindjax.transfer.pretrained.init_from_pretrained`, which does every copy here).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.archs import resolve_dims, with_depth
from kindjax.config import ConfigError
from kindjax.papers.fine.facts import GROWTH, GROWTH_FROM_SOURCE
from kindjax.layers import ROLES
from kindjax.papers.fine.ligo import COEF, SOURCE, combine, ligo_config, stretch_blocks
from kindjax.papers.fine.tleg import BASES as TLEG_BASES
from kindjax.papers.fine.tleg import tleg_coefficient, tleg_weights
from kindjax.checkpoints.learngene import load_params
from kindjax.models.dit import build_model
from kindjax.transfer.pretrained import dense_kernel, init_from_pretrained

#: Mimetic init's ``(α₁, β₁, α₂, β₂)``: ``K_qK_kᵀ ≈ α₁Z + β₁I``, ``K_vK_o ≈ α₂Z − β₂I``.
MIMETIC = (0.7, 0.7, 0.4, 0.4)
#: Kernels that keep DiT's own (zero or small Gaussian) init under He init.
KEEP_DIT_INIT = ("adaln_modulation", "final_layer")


def he_init(fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """Every kernel ``K (d_in, d_out) ~ N(0, 2/d_in)`` except :data:`KEEP_DIT_INIT`'s (module doc)."""
    normal = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    flat = traverse_util.flatten_dict(param_rules.as_dict(fresh))
    out = {}
    for i, (names, leaf) in enumerate(flat.items()):
        keep = names[-1] != "kernel" or any(n in KEEP_DIT_INIT for n in names)
        out[names] = leaf if keep else normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
    return traverse_util.unflatten_dict(out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def mimetic_pair(key: jax.Array, d: int, rank: int, alpha: float, beta: float) -> tuple[jax.Array, jax.Array]:
    """``(A (d, r), B (r, d))`` with ``A·B`` the best rank-``r`` approximation of ``M = α·Z + β·I``,
    ``Z ~ N(0, 1/d)``: ``M = U S Vᵀ``, ``A = U_r √S_r``, ``B = √S_r V_rᵀ`` (``A·B = M`` when ``r = d``)."""
    z = jax.random.normal(key, (d, d), jnp.float32) / np.sqrt(d)
    u, s, vt = jnp.linalg.svd(alpha * z + beta * jnp.eye(d), full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def mimetic_init(fresh: Mapping[str, Any], key: jax.Array, num_heads: int,
                 constants: Sequence[float] = MIMETIC) -> dict:
    """Attention kernels of every block set as in the module doc; the rest of ``fresh`` unchanged."""
    alpha1, beta1, alpha2, beta2 = constants
    params = param_rules.as_dict(fresh)
    out = dict(params)
    for b in range(sum(k.startswith("block_") for k in params)):
        block = params[f"block_{b}"]
        attn = {k: dict(v) for k, v in block["attn"].items()}
        d = attn["q"]["kernel"].shape[0]
        k_b = jax.random.fold_in(key, b)
        heads = [mimetic_pair(jax.random.fold_in(k_b, h), d, d // num_heads, alpha1, beta1) for h in range(num_heads)]
        attn["q"]["kernel"] = jnp.concatenate([a for a, _ in heads], axis=1)
        attn["k"]["kernel"] = jnp.concatenate([bt.T for _, bt in heads], axis=1)
        attn["v"]["kernel"], attn["attn_out"]["kernel"] = mimetic_pair(jax.random.fold_in(k_b, num_heads), d, d,
                                                                       alpha2, -beta2)
        out[f"block_{b}"] = {**block, "attn": attn}
    return out


def prune_blocks(source_depth: int, depth: int) -> tuple[int, ...]:
    """The ``depth`` evenly spaced source blocks ``round(i·(L−1)/(L′−1))`` a pruned DiT keeps."""
    return tuple(int(b) for b in np.round(np.linspace(0, source_depth - 1, depth)))


def _depth(tree: Mapping[str, Any]) -> int:
    return sum(k.startswith("block_") for k in tree)


def layer_paths(tree: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """``role → path inside a block`` of the six main matrices (e.g. ``q → ('attn', 'q')``), read from
    ``block_0`` of ``tree``."""
    found = {}
    for key in traverse_util.flatten_dict(param_rules.as_dict(tree["block_0"])):
        for j, name in enumerate(key):
            if name in ROLES:
                found[name] = key[:j + 1]
    return found


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """``tree`` (nested dicts, copied along ``path``) with ``value`` at ``path``."""
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(dict(tree.get(path[0], {})), path[1:], value)}


def remap_blocks(source: Mapping[str, Any], mapping: Sequence[int]) -> dict:
    """``source`` with ``block_i ← source block_{mapping[i]}`` for ``i < len(mapping)`` (other leaves kept)."""
    tree = param_rules.as_dict(source)
    blocks = {f"block_{i}": tree[f"block_{m}"] for i, m in enumerate(mapping)}
    return {**{k: v for k, v in tree.items() if not k.startswith("block_")}, **blocks}


def tleg_expand(source: Mapping[str, Any], depth: int, paths: Mapping[str, tuple[str, ...]]) -> dict:
    """A ``depth``-block dense tree from a TLEG model: the layer at ``paths[role]`` of block ``i`` is
    ``θ_A + ((i+1)/L′)·θ_B`` (:func:`kindjax.papers.fine.tleg.tleg_weights`); each block's other leaves
    (adaLN modulation) from source block ``⌊i·L/L′⌋``."""
    tree = param_rules.as_dict(source)
    out = remap_blocks(tree, stretch_blocks(_depth(tree), depth))
    for i in range(depth):
        for role, path in paths.items():
            out = _set(out, (f"block_{i}",) + path, tleg_weights(tree[TLEG_BASES][role], tleg_coefficient(i, depth)))
    return out


def ligo_stacks(source: Mapping[str, Any], paths: Mapping[str, tuple[str, ...]]) -> dict:
    """``role → {kernel (L, d_in, d_out), bias (L, d_out)}``: a dense (or KIND) DiT's layers stacked."""
    tree = param_rules.as_dict(source)
    stacks = {}
    for role, path in paths.items():
        nodes = []
        for j in range(_depth(tree)):
            node = tree[f"block_{j}"]
            for name in path:
                node = node[name]
            nodes.append(node)
        kernels = [dense_kernel(n) for n in nodes]
        stacks[role] = {"kernel": jnp.stack(kernels),
                        "bias": jnp.stack([jnp.asarray(n.get("bias", np.zeros(k.shape[1], np.float32)))
                                           for n, k in zip(nodes, kernels)])}
    return stacks


def ligo_materialize(source: Mapping[str, Any], paths: Mapping[str, tuple[str, ...]]) -> dict:
    """A dense tree from a LiGO model: block ``i``'s layer at ``paths[role]`` is
    ``{kernel: Σ_j c_{i,j} K_j, bias: Σ_j c_{i,j} b_j}`` (:func:`kindjax.papers.fine.ligo.combine`)."""
    tree = param_rules.as_dict(source)
    out = dict(tree)
    for i in range(_depth(tree)):
        for role, path in paths.items():
            node = tree[f"block_{i}"]
            for name in path:
                node = node[name]
            out = _set(out, (f"block_{i}",) + path, combine(node[COEF], tree[SOURCE][role]))
    return out


def _check_map(mapping: Sequence[int], source_depth: int, depth: int) -> tuple[int, ...]:
    mapping = tuple(int(m) for m in mapping)
    if len(mapping) != depth or not all(0 <= m < source_depth for m in mapping):
        raise ConfigError(f"init.grow_blocks={mapping} must give one source block in [0, {source_depth}) for "
                          f"each of the {depth} target blocks")
    return mapping


def _require_kind(grow: str, kind: str, allowed: Sequence[str], path: str) -> None:
    if kind not in allowed:
        raise ConfigError(f"init.grow={grow!r} needs a source with model.linear.kind in {list(allowed)}, but "
                          f"{path} holds kind={kind!r}")


def grown_source(config: ml_collections.ConfigDict, fresh: Mapping[str, Any]) -> dict:
    """The source of ``init.grow_from`` rearranged into the tree of this ``L′``-block model (module doc)."""
    init, model = config.init, config.model
    # A LiGO operator trains for a few steps only, so its EMA would still be its start: read the raw weights.
    operator = checkpoints.config_of(checkpoints.locate(init.grow_from)).model.linear.kind == "ligo"
    source, source_config = load_params(init.grow_from, ema=not operator)
    src, dst = resolve_dims(source_config.model), resolve_dims(model)
    if src.hidden_size != dst.hidden_size:
        raise ConfigError(f"init.grow={init.grow!r} keeps the width: {init.grow_from} has hidden size "
                          f"{src.hidden_size}, this model {dst.hidden_size} (set model.hidden_size/arch to match)")
    kind, paths = source_config.model.linear.kind, layer_paths(fresh)
    if init.grow in ("share", "prune"):
        _require_kind(init.grow, kind, ("dense", "kind"), init.grow_from)
        if init.grow == "prune" and dst.depth >= src.depth:
            raise ConfigError(f"init.grow='prune' drops blocks: the target depth {dst.depth} must be below the "
                              f"source's {src.depth} (use 'share' to grow)")
        default = stretch_blocks if init.grow == "share" else prune_blocks
        mapping = init.grow_blocks or default(src.depth, dst.depth)
        return remap_blocks(source, _check_map(mapping, src.depth, dst.depth))
    if init.grow == "tleg":
        _require_kind("tleg", kind, ("tleg",), init.grow_from)
        return tleg_expand(source, dst.depth, paths)
    if model.linear.kind == "ligo":
        _require_kind("ligo", kind, ("dense", "kind"), init.grow_from)
        if model.linear.source_depth != src.depth:
            raise ConfigError(f"model.linear.source_depth={model.linear.source_depth} but {init.grow_from} has "
                              f"{src.depth} blocks: set it to {src.depth}")
        return {**remap_blocks(source, stretch_blocks(src.depth, dst.depth)), SOURCE: ligo_stacks(source, paths)}
    _require_kind("ligo", kind, ("ligo",), init.grow_from)
    if src.depth != dst.depth:
        raise ConfigError(f"init.grow='ligo' materialises the {src.depth}-block LiGO model of {init.grow_from}: "
                          f"set the depth to {src.depth}")
    return ligo_materialize(source, paths)


def copy_from(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], source: Mapping[str, Any],
              key: jax.Array) -> dict:
    """``fresh`` with every leaf of the same path in ``source`` copied (:func:`init_from_pretrained`);
    the label table whole when ``source``'s has the same shape."""
    every = config.copy_and_resolve_references()
    every.init.update(blocks=(), svd_components=0)
    params = init_from_pretrained(fresh, source, key, every)
    table = source.get("y_embedder", {}).get("embedding")
    if table is not None and tuple(table.shape) == tuple(params["y_embedder"]["embedding"].shape):
        params["y_embedder"] = {**params["y_embedder"], "embedding": jnp.asarray(table)}
    return params


#: ``init.grow`` → ``init(config, fresh, key)``: one for each of FINE's baselines (:data:`GROWTH`).
GROWERS = {
    "scratch": lambda config, fresh, key: he_init(fresh, key),
    "mimetic": lambda config, fresh, key: mimetic_init(fresh, key, resolve_dims(config.model).num_heads),
    **{name: lambda config, fresh, key: copy_from(config, fresh, grown_source(config, param_rules.as_dict(fresh)), key)
       for name in GROWTH_FROM_SOURCE},
}
assert tuple(GROWERS) == GROWTH, (tuple(GROWERS), GROWTH)


def grow_init(config: ml_collections.ConfigDict, fresh: Mapping[str, Any], key: jax.Array) -> dict:
    """The step-0 parameters of a run with ``init.grow`` (see the module doc)."""
    return GROWERS[config.init.grow](config, fresh, key)


def _target_model(model: ml_collections.ConfigDict, depth: int) -> ml_collections.ConfigDict:
    """``model`` at ``depth`` blocks (same width and heads, ``arch`` resolved), dense layers."""
    out = model.copy_and_resolve_references()
    out.update(**with_depth(model, depth),
               linear=ml_collections.ConfigDict(dict(kind="dense")))
    return out


def grow_config(config: ml_collections.ConfigDict, grow: str, source: str, depth: int,
                operator_steps: int = 100,
                source_model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """``config`` set to initialise a ``depth``-block dense DiT by ``grow``; the model is the source's
    (its width and heads) when ``grow`` reads one, else ``config``'s own.  ``grow='ligo'`` from a dense
    or KIND source gives the coefficient-learning run (kind='ligo', only ``coef`` trains, ``operator_steps``
    steps, LiGO's 100 by default); from that run's workdir, the materialising run.  ``source_model``: the
    source's ``model`` config when it is known before the source exists (a sweep builds its grid before
    training the sources); by default it is read from the checkpoint at ``source``."""
    c = config.copy_and_resolve_references()
    model = c.model
    if grow in GROWTH_FROM_SOURCE:   # the source's model settings over this config's (keys it predates keep theirs)
        if source_model is None:
            source_model = checkpoints.config_of(checkpoints.locate(source)).model
        model = model.copy_and_resolve_references()
        for key, value in source_model.items():
            model[key] = value
    c.model = _target_model(model, depth)
    c.init.update(grow=grow, grow_from=source if grow in GROWTH_FROM_SOURCE else "")
    if grow == "ligo" and source_model.linear.kind != "ligo":
        c.model.linear = ligo_config(resolve_dims(source_model).depth)
        c.train.update(trainable=("/coef$",), num_steps=operator_steps)
    return c


def prune_distill_config(config: ml_collections.ConfigDict, source_workdir: str, depth: int,
                         weight: float = 1.0,
                         source_model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """A layer-pruned, distilled DiT: ``depth`` evenly spaced blocks of the dense DiT at
    ``source_workdir`` (``init.grow='prune'``), trained on ``loss + weight·mean‖ε − ε_teacher‖²``
    with that unpruned DiT as the frozen teacher (``train.distill``); ``source_model`` as in
    :func:`grow_config`."""
    c = grow_config(config, "prune", source_workdir, depth, source_model=source_model)
    c.train.distill.update(teacher=source_workdir, weight=weight)
    return c
