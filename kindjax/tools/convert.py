"""Public DiT checkpoints into kindjax: the original ``DiT-XL-2-256x256.pt``-style state dict and
diffusers' ``DiTTransformer2DModel`` (e.g. ``facebook/DiT-XL-2-256``).

    python -m kindjax.tools.convert --src DiT-XL-2-256x256.pt --config configs/dit_xl.py --workdir runs/dit_xl
    python -m kindjax.tools.convert --src DIFFUSERS_DIT_DIR --config configs/dit_xl.py --workdir runs/dit_xl

writes a kindjax training checkpoint (step 0: the weights as ``params`` and ``ema_params``,
fresh optimizer state, the config as metadata) that ``python -m kindjax.evaluation``,
``init.pretrained`` and sampling read directly.  The config file gives every section but the
model's sizes, which come from the checkpoint.

diffusers' ``DiTTransformer2DModel`` is NCHW with PyTorch layouts (``Linear.weight``
is ``(out, in)``, the patch embedding a ``Conv2d``); kindjax is NHWC with Flax
``kernel`` ``(in, out)``.  diffusers keeps a copy of the timestep and label embedders
in every block (``transformer_blocks.{i}.norm1.emb``), DiT has one: a checkpoint
converts only if all copies are identical.  The original DiT code fuses q, k, v into
one ``attn.qkv`` matrix and embeds timesteps with ``ω_k = 10000^(-k/half)``
(``model.timestep_freq_shift=0``; diffusers: ``10000^(-k/(half-1))``, shift 1).

The same key table (:func:`diffusers_layout`, each leaf's :class:`Layout` both ways) writes diffusers'
layout too: :func:`dit_config_to_diffusers` and :func:`dit_params_to_diffusers`, which
``python -m kindjax.tools.export --format diffusers`` uses and this module reads back.
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
from absl import flags
from flax import traverse_util

from kindjax import checkpoints, cli
from kindjax.archs import heads_of, resolve_dims
from kindjax.config import ConfigError, base_config
from kindjax.models.dit import abstract_params, build_model, sincos_pos_embed_2d
from kindjax.io.paths import as_path

#: The embedders DiT shares; diffusers repeats them in block ``i`` under this prefix.
EMBEDDER_PREFIX = "transformer_blocks.{i}.norm1.emb."

#: DiTTransformer2DModel settings kindjax's DiT implements, with diffusers' defaults.
_FIXED_SETTINGS: dict[str, Any] = {
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "cross_attention_dim": None,
}

#: Remaining DiTTransformer2DModel defaults used when a key is absent.
_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
    "num_layers": 28, "sample_size": 32, "patch_size": 2, "num_embeds_ada_norm": 1000,
    "norm_eps": 1e-5,
}

_MAX_LISTED = 12

#: The null class label of diffusers' ``DiTPipeline`` (hard-coded: ``class_null = [1000] * batch``).
PIPELINE_NULL = 1000
#: The ``config.json`` key of what an export adds (diffusers ignores keys that start with ``_``).
KINDJAX_KEY = "_kindjax"


def dit_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A kindjax config (``base_config()`` with ``model`` filled in) for a DiTTransformer2DModel config.

    Accepts the dict of a ``transformer/config.json`` (also the legacy
    ``Transformer2DModel`` spelling of the public DiT checkpoints).  Training-only
    settings (dropout) are not carried over.  The class count is ``num_embeds_ada_norm``, or the
    :data:`KINDJAX_KEY` ``num_classes`` of a directory :func:`dit_config_to_diffusers` wrote.
    """
    for key, supported in _FIXED_SETTINGS.items():
        value = diffusers_config.get(key, supported)
        if value != supported:
            raise ValueError(f"diffusers config {key}={value!r} is not supported: kindjax's DiT "
                             f"implements {key}={supported!r}")
    get = lambda key: diffusers_config.get(key, _DEFAULTS[key])
    in_channels = get("in_channels")
    out_channels = get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"diffusers config out_channels={out_channels} must be in_channels={in_channels} "
                         f"or 2·in_channels (learned sigma)")
    config = base_config()
    config.model.update(dict(
        arch="",
        hidden_size=get("num_attention_heads") * get("attention_head_dim"),
        depth=get("num_layers"),
        num_heads=get("num_attention_heads"),
        image_size=get("sample_size"),
        in_channels=in_channels,
        patch_size=get("patch_size"),
        num_classes=diffusers_config.get(KINDJAX_KEY, {}).get("num_classes", get("num_embeds_ada_norm")),
        mlp_ratio=4.0,                 # diffusers' FeedForward default (mult=4)
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=1.0,       # CombinedTimestepLabelEmbeddings: downscale_freq_shift=1
        norm_eps=1e-6,                 # AdaLayerNormZero and norm_out hard-code 1e-6
        mlp_norm_eps=float(get("norm_eps")),
    ))
    return config


def dit_config_to_diffusers(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ``config.json`` of a DiTTransformer2DModel computing ``config``'s dense DiT: the inverse of
    :func:`dit_config_from_diffusers`.  The label table has :data:`PIPELINE_NULL` real rows at least
    (:func:`dit_params_to_diffusers` pads it), the true class count under :data:`KINDJAX_KEY`.
    Refuses, in one line, what diffusers' DiT fixes otherwise (timestep shift 1, LayerNorm eps 1e-6
    in adaLN and the final layer, MLP ratio 4, no DiffFit scales)."""
    m = config.model if "model" in config else config
    dims = resolve_dims(m)
    fixed = {"model.timestep_freq_shift": (m.timestep_freq_shift, 1.0, "its timestep embedding is "
                                           "CombinedTimestepLabelEmbeddings' (downscale_freq_shift=1)"),
             "model.norm_eps": (m.norm_eps, 1e-6, "AdaLayerNormZero and norm_out hard-code eps=1e-6"),
             "model.mlp_ratio": (m.mlp_ratio, 4.0, "its FeedForward has mult=4"),
             **{f"model.{key}": (bool(m.get(key, False)), False, "it has no DiffFit scales")
                for key in ("residual_scales", "attention_scales", "output_scale")}}
    for key, (value, supported, why) in fixed.items():
        if value != supported:
            raise ValueError(f"{key}={value!r} has no diffusers DiTTransformer2DModel form ({why}, {key}="
                             f"{supported!r}): export this model with --format safetensors or sample it with kindjax")
    return {
        "_class_name": "DiTTransformer2DModel",
        **{k: v for k, v in _FIXED_SETTINGS.items() if k != "cross_attention_dim"},   # a Transformer2DModel key
        "num_attention_heads": dims.num_heads,
        "attention_head_dim": dims.hidden_size // dims.num_heads,
        "in_channels": m.in_channels,
        "out_channels": 2 * m.in_channels if m.learn_sigma else m.in_channels,
        "num_layers": dims.depth,
        "sample_size": m.image_size,
        "patch_size": m.patch_size,
        "num_embeds_ada_norm": max(m.num_classes, PIPELINE_NULL),
        "norm_eps": float(m.mlp_norm_eps),
        "dropout": 0.0,
        "upcast_attention": False,
        KINDJAX_KEY: {"num_classes": m.num_classes},
    }


def dit_params_to_diffusers(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """diffusers' DiT state dict (float32 numpy) of the dense kindjax DiT ``params`` (``{'params': …}``
    or the tree under it): the inverse of :func:`dit_params_from_diffusers` through the same key table,
    the embedders repeated in every block, the label table padded to :data:`PIPELINE_NULL` real rows."""
    layout = diffusers_layout(config)
    flat = traverse_util.flatten_dict(dict(params.get("params", params)))
    if set(flat) != set(layout.leaves):
        raise ValueError(f"these parameters are not the dense DiT of the config: missing "
                         f"{sorted('/'.join(k) for k in set(layout.leaves) - set(flat))[:4]}, unexpected "
                         f"{sorted('/'.join(k) for k in set(flat) - set(layout.leaves))[:4]}")
    arrays = {path: np.asarray(flat[path], np.float32) for path in layout.leaves}
    wrong = [f"{'/'.join(path)}: {arrays[path].shape}" for path, (key, form) in layout.leaves.items()
             if form.shape(arrays[path].shape, layout.patch_size) != layout.shapes[key]]
    if wrong:
        raise ValueError("parameter shapes do not match the model config: " + "; ".join(wrong[:_MAX_LISTED]))
    state = {key: np.ascontiguousarray(form.to_diffusers(arrays[path], layout.shapes[key]))
             for path, (key, form) in layout.leaves.items()}
    state.update({copy: state[key].copy() for copy, key in layout.copies})
    return _padded_labels(state)


def _is_label_table(key: str) -> bool:
    return key.endswith("class_embedder.embedding_table.weight")


def _padded_labels(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every label table ``(k + 1, D)`` (rows: the classes, then the null class) with copies of its null
    row inserted before it up to :data:`PIPELINE_NULL` ``+ 1`` rows, so that label 1000 (DiTPipeline's
    null class) is the null class; unused labels ``k … 999`` act as the null class too."""
    def pad(table: np.ndarray) -> np.ndarray:
        extra = PIPELINE_NULL + 1 - table.shape[0]
        return table if extra <= 0 else np.concatenate([table[:-1], np.repeat(table[-1:], extra, 0), table[-1:]])

    return {key: pad(value) if _is_label_table(key) else value for key, value in state.items()}


def _unpadded_labels(state_dict: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """The inverse of :func:`_padded_labels` for a model of ``num_classes``: a label table of more than
    ``num_classes + 1`` rows loses rows ``num_classes … −2``, which must equal its null row."""
    out = dict(state_dict)
    for key, value in state_dict.items():
        if not _is_label_table(key) or _to_numpy(value).shape[0] <= num_classes + 1:
            continue
        table = _to_numpy(value)
        padding = table[num_classes:-1]
        if not np.array_equal(padding, np.broadcast_to(table[-1:], padding.shape)):
            raise ValueError(f"{key} has {table.shape[0]} rows for {num_classes} classes, and rows {num_classes}.."
                             f"{table.shape[0] - 2} are not copies of its null row: not a padded export")
        out[key] = np.concatenate([table[:num_classes], table[-1:]])
    return out


def _to_numpy(value: Any) -> np.ndarray:
    """A float32 numpy array from a torch tensor (without importing torch) or any array-like."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _patch_conv(array: np.ndarray) -> np.ndarray:
    """Conv2d weight ``(D, C, p, p)`` → kernel ``(p·p·C, D)`` over (row, column, channel) patches."""
    return array.transpose(2, 3, 1, 0).reshape(-1, array.shape[0])


def _patch_unconv(kernel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Kernel ``(p·p·C, D)`` → Conv2d weight ``shape = (D, C, p, p)``: the inverse of :func:`_patch_conv`."""
    d, c, p, _ = shape
    return kernel.reshape(p, p, c, d).transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one leaf is stored on each side: ``to_kindjax(array)`` turns the diffusers array into the
    kindjax leaf, ``to_diffusers(leaf, shape)`` turns it back into the diffusers ``shape``, and
    ``shape(kindjax_shape, p)`` is that diffusers shape (``p``: the patch size)."""

    to_kindjax: Callable[[np.ndarray], np.ndarray]
    to_diffusers: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    shape: Callable[[tuple[int, ...], int], tuple[int, ...]]


#: ``nn.Linear.weight`` ``(out, in)`` ↔ Flax ``kernel`` ``(in, out)``.
LINEAR = Layout(lambda a: a.T, lambda a, shape: a.T, lambda shape, p: shape[::-1])
#: Stored alike on both sides (biases, the label table).
SAME = Layout(lambda a: a, lambda a, shape: a, lambda shape, p: shape)
#: The patch embedding: ``Conv2d`` weight ``(D, C, p, p)`` ↔ dense kernel ``(p·p·C, D)``.
PATCH_CONV = Layout(_patch_conv, _patch_unconv, lambda shape, p: (shape[1], shape[0] // p ** 2, p, p))


def _leaf_map(depth: int) -> dict[tuple[str, ...], tuple[str, Layout]]:
    """kindjax leaf path (under ``params``) → (diffusers key, layout): the one table both directions use."""
    emb = EMBEDDER_PREFIX.format(i=0)
    modules = {
        ("t_embedder", "linear_1"): emb + "timestep_embedder.linear_1",
        ("t_embedder", "linear_2"): emb + "timestep_embedder.linear_2",
        ("final_layer", "adaln_modulation"): "proj_out_1",
        ("final_layer", "linear"): "proj_out_2",
    }
    for i in range(depth):
        block, ours = f"transformer_blocks.{i}.", f"block_{i}"
        modules.update({
            (ours, "adaln_modulation"): block + "norm1.linear",
            (ours, "attn", "q"): block + "attn1.to_q",
            (ours, "attn", "k"): block + "attn1.to_k",
            (ours, "attn", "v"): block + "attn1.to_v",
            (ours, "attn", "attn_out"): block + "attn1.to_out.0",
            (ours, "mlp_in"): block + "ff.net.0.proj",
            (ours, "mlp_out"): block + "ff.net.2",
        })
    leaves = {
        ("x_embedder", "kernel"): ("pos_embed.proj.weight", PATCH_CONV),
        ("x_embedder", "bias"): ("pos_embed.proj.bias", SAME),
        ("y_embedder", "embedding"): (emb + "class_embedder.embedding_table.weight", SAME),
    }
    for path, prefix in modules.items():
        leaves[path + ("kernel",)] = (prefix + ".weight", LINEAR)
        leaves[path + ("bias",)] = (prefix + ".bias", SAME)
    return leaves


@dataclasses.dataclass(frozen=True)
class DiffusersLayout:
    """A dense kindjax DiT's leaves in diffusers' state dict: its ``depth`` and ``patch_size``,
    ``leaves`` (kindjax path → key, layout),
    ``shapes`` (every diffusers key → its shape) and ``copies`` (``(copy, key)``: the embedder
    ``key`` of block 0 repeated in block ``i > 0``)."""

    depth: int
    patch_size: int
    leaves: dict[tuple[str, ...], tuple[str, Layout]]
    shapes: dict[str, tuple[int, ...]]
    copies: frozenset[tuple[str, str]]


def diffusers_layout(config: ml_collections.ConfigDict) -> DiffusersLayout:
    """The :class:`DiffusersLayout` of ``config``'s dense DiT (a full config or its ``model`` section)."""
    model_config = config.model if "model" in config else config
    if model_config.linear.kind != "dense":
        raise ValueError(f"diffusers' DiT is the dense DiT (model.linear.kind='dense'), got "
                         f"{model_config.linear.kind!r}: convert first, then decompose; materialize before export")
    model = build_model(config)
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract_params(model)).items()}
    leaves = _leaf_map(model.depth)
    if set(shapes) != set(leaves):
        raise NotImplementedError(f"the diffusers key table does not cover these kindjax parameters: "
                                  f"{sorted(set(shapes) ^ set(leaves))}")
    expected = {key: layout.shape(shapes[path], model.patch_size) for path, (key, layout) in leaves.items()}
    first = EMBEDDER_PREFIX.format(i=0)
    tied = [key[len(first):] for key in expected if key.startswith(first)]
    copies = frozenset((EMBEDDER_PREFIX.format(i=i) + name, first + name)
                       for i in range(1, model.depth) for name in tied)
    expected.update({copy: expected[key] for copy, key in copies})
    return DiffusersLayout(model.depth, model.patch_size, leaves, expected, copies)


def _listing(keys: set[str]) -> str:
    shown = sorted(keys)[:_MAX_LISTED]
    more = f", … and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def dit_params_from_diffusers(state_dict: Mapping[str, Any],
                              config: ml_collections.ConfigDict) -> dict[str, Any]:
    """kindjax DiT params ``{'params': …}`` (float32 numpy) from a diffusers DiT state dict.

    ``config`` is a full config or its ``model`` section (e.g. from
    :func:`dit_config_from_diffusers`) with the dense linear layer.  Raises
    ``ValueError`` on missing/unexpected keys, on a shape that does not match the
    config (naming the key and both shapes), and on embedders that differ between blocks.
    """
    layout = diffusers_layout(config)
    expected, leaves = layout.shapes, layout.leaves
    state_dict = _unpadded_labels(state_dict, (config.model if "model" in config else config).num_classes)
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not match a diffusers DiT with depth {layout.depth}: "
                         f"missing keys [{_listing(missing)}]; unexpected keys [{_listing(unexpected)}]")
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    wrong = [f"{key}: checkpoint {arrays[key].shape}, config expects {shape}"
             for key, shape in expected.items() if arrays[key].shape != shape]
    if wrong:
        raise ValueError("checkpoint shapes do not match the model config (another model size?): "
                         + "; ".join(wrong[:_MAX_LISTED]))
    for copy, key in sorted(layout.copies):
        if not np.array_equal(arrays[copy], arrays[key]):
            raise ValueError(f"{copy} differs from {key} (max |Δ| = "
                             f"{np.abs(arrays[copy] - arrays[key]).max():.3g}): kindjax's DiT has one "
                             f"timestep/label embedder, the checkpoint's blocks must share it")

    params = {path: np.ascontiguousarray(form.to_kindjax(arrays[key])) for path, (key, form) in leaves.items()}
    return {"params": traverse_util.unflatten_dict(params)}


def _original_renames(depth: int, hidden: int) -> dict[str, list[tuple[str, slice]]]:
    """Original DiT key → the diffusers keys it becomes, each with the rows it keeps (q, k, v are
    the three ``hidden``-row thirds of ``attn.qkv``; embedders are copied into every block)."""
    everything = slice(None)
    emb = [EMBEDDER_PREFIX.format(i=i) for i in range(depth)]
    renames = {
        "x_embedder.proj.weight": [("pos_embed.proj.weight", everything)],
        "x_embedder.proj.bias": [("pos_embed.proj.bias", everything)],
        "y_embedder.embedding_table.weight": [(e + "class_embedder.embedding_table.weight", everything) for e in emb],
        "final_layer.adaLN_modulation.1.weight": [("proj_out_1.weight", everything)],
        "final_layer.adaLN_modulation.1.bias": [("proj_out_1.bias", everything)],
        "final_layer.linear.weight": [("proj_out_2.weight", everything)],
        "final_layer.linear.bias": [("proj_out_2.bias", everything)],
    }
    for layer, ours in (("0", "linear_1"), ("2", "linear_2")):
        for kind in ("weight", "bias"):
            renames[f"t_embedder.mlp.{layer}.{kind}"] = [(f"{e}timestep_embedder.{ours}.{kind}", everything)
                                                         for e in emb]
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            renames[f"{src}attn.qkv.{kind}"] = [(f"{dst}attn1.to_{n}.{kind}", slice(j * hidden, (j + 1) * hidden))
                                               for j, n in enumerate("qkv")]
            for theirs, ours in (("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"),
                                 ("mlp.fc2", "ff.net.2"), ("adaLN_modulation.1", "norm1.linear")):
                renames[f"{src}{theirs}.{kind}"] = [(f"{dst}{ours}.{kind}", everything)]
    return renames


def _block_count(state_dict: Mapping[str, Any]) -> int:
    return len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})


def dit_config_from_original(state_dict: Mapping[str, Any], num_heads: int = 0) -> ml_collections.ConfigDict:
    """A kindjax config (``base_config()`` with ``model`` filled in) for an original DiT state dict.

    Sizes are read from the arrays; the head count, which no array shows, from ``num_heads`` or
    the DiT size of that width and depth (S/B/L/XL).  Original settings: timestep frequencies
    ``10000^(-k/half)`` (shift 0), every LayerNorm eps 1e-6.
    """
    missing = [k for k in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                           "final_layer.linear.weight") if k not in state_dict]
    if missing:
        raise ValueError(f"not an original DiT state dict (DiT-XL-2-256x256.pt style): no {missing}")
    conv = _to_numpy(state_dict["x_embedder.proj.weight"])
    hidden, in_channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    depth = _block_count(state_dict)
    if not num_heads:
        num_heads = heads_of(hidden, depth)
        if num_heads is None:
            raise ValueError(f"hidden size {hidden} and depth {depth} are not a DiT size (S/B/L/XL): "
                             f"give the head count (--num_heads)")
    tokens = _to_numpy(state_dict["pos_embed"]).shape[-2]
    out = _to_numpy(state_dict["final_layer.linear.weight"]).shape[0] // patch ** 2
    config = base_config()
    config.model.update(dict(
        arch="", hidden_size=hidden, depth=depth, num_heads=num_heads,
        image_size=int(round(tokens ** 0.5)) * patch, in_channels=in_channels, patch_size=patch,
        num_classes=_to_numpy(state_dict["y_embedder.embedding_table.weight"]).shape[0] - 1,
        mlp_ratio=_to_numpy(state_dict["blocks.0.mlp.fc1.weight"]).shape[0] / hidden,
        learn_sigma=out == 2 * in_channels, timestep_freq_shift=0.0, norm_eps=1e-6, mlp_norm_eps=1e-6))
    return config


def dit_params_from_original(state_dict: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, Any]:
    """kindjax DiT params from an original DiT state dict: renamed to diffusers' layout (q, k, v
    split out of ``attn.qkv``), then :func:`dit_params_from_diffusers`, which checks every key and
    shape.  The fixed ``pos_embed`` must be the 2-D sin-cos table kindjax computes."""
    model = build_model(config)
    grid = model.image_size // model.patch_size
    pos = _to_numpy(state_dict["pos_embed"]).reshape(-1, model.hidden_size)
    expected = sincos_pos_embed_2d(model.hidden_size, grid)
    if pos.shape != expected.shape or not np.allclose(pos, expected, atol=1e-5):
        raise ValueError(f"the checkpoint's pos_embed {pos.shape} is not DiT's fixed 2-D sin-cos table for a "
                         f"{grid}×{grid} grid of width {model.hidden_size}: another image size or a learned embedding")
    renames = _original_renames(_block_count(state_dict), model.hidden_size)
    unknown = sorted(set(state_dict) - set(renames) - {"pos_embed"})
    if unknown:
        raise ValueError(f"unexpected keys in the original DiT state dict: [{_listing(set(unknown))}]")
    diffusers_dict = {new: _to_numpy(state_dict[old])[rows] for old, targets in renames.items()
                      if old in state_dict for new, rows in targets}
    return dit_params_from_diffusers(diffusers_dict, config)


def read_checkpoint(src: str, num_heads: int = 0) -> tuple[ml_collections.ConfigDict, dict[str, Any], str]:
    """``(model config, params, format)`` of ``src``: an original DiT ``.pt`` (read with
    ``torch.load(weights_only=True)``), or a diffusers DiT directory (``config.json`` + safetensors;
    a pipeline directory's ``transformer/`` is found)."""
    path = as_path(src)
    if path.is_dir():
        if (path / "transformer" / "config.json").exists():
            path = path / "transformer"
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{src} has no config.json: give a diffusers DiT directory (or its pipeline "
                                    f"directory with transformer/) or an original DiT .pt file")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"{path} has no .safetensors weights")
        from safetensors.numpy import load

        state_dict = {k: v for w in weights for k, v in load(w.read_bytes()).items()}
        config = dit_config_from_diffusers(json.loads((path / "config.json").read_text()))
        return config, dit_params_from_diffusers(state_dict, config), "diffusers"
    if not path.exists():
        raise FileNotFoundError(f"{src} does not exist")
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {src} needs PyTorch: pip install torch") from None
    with path.open("rb") as f:
        state_dict = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    state_dict = state_dict.get("ema", state_dict.get("model", state_dict))  # training checkpoints keep both
    config = dit_config_from_original(state_dict, num_heads)
    return config, dit_params_from_original(state_dict, config), "original"


#: Model keys a converted checkpoint takes from the weights; every other key comes from the config file.
CONVERTED_KEYS = ("arch", "hidden_size", "depth", "num_heads", "image_size", "in_channels", "patch_size",
                  "num_classes", "mlp_ratio", "learn_sigma", "timestep_freq_shift", "norm_eps", "mlp_norm_eps")


def convert(src: str, config: ml_collections.ConfigDict, workdir: str, num_heads: int = 0) -> ml_collections.ConfigDict:
    """Writes ``src`` as step 0 of a kindjax training checkpoint in ``workdir``; returns its config:
    ``config`` with the model sizes of ``src`` (:data:`CONVERTED_KEYS`)."""
    import jax

    from kindjax.train.optimizer import make_optimizer
    from kindjax.train.trainer import state_from_params

    if config.model.linear.kind != "dense":
        raise ConfigError(f"public DiT weights convert into the dense DiT: model.linear.kind="
                          f"{config.model.linear.kind!r}; convert, then start another variant from it with "
                          f"--config.init.pretrained=WORKDIR")
    directory = as_path(workdir) / checkpoints.CHECKPOINTS
    if directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} already holds checkpoints: give an empty --workdir")
    found, params, _ = read_checkpoint(src, num_heads)
    config = config.copy_and_resolve_references()
    config.model.update({k: found.model[k] for k in CONVERTED_KEYS})
    state = state_from_params(jax.tree.map(np.asarray, params["params"]), make_optimizer(config))
    mngr = checkpoints.manager(directory)
    checkpoints.save(mngr, state, config)
    mngr.wait_until_finished()
    mngr.close()
    return config


def main(argv: list[str]) -> None:
    """Converts ``--src`` into a kindjax checkpoint in ``--workdir`` and prints how to use it."""
    del argv
    f = flags.FLAGS
    config = convert(f.src, f.config, f.workdir, f.num_heads)
    overrides = " ".join(f"--config.model.{k}={config.model[k]}" for k in CONVERTED_KEYS
                         if config.model[k] != f.config.model[k])
    model = checkpoints.config_json(config)["model"]
    print(f"kindjax.tools.convert: {f.src} → {f.workdir} (step 0, a {model['depth']}-block DiT). Sample and "
          f"evaluate it with\n  python -m kindjax.evaluation --config {f['config'].config_filename} {overrides} "
          f"--run {f.workdir} --config.eval.reference=... --config.eval.inception_weights=... "
          f"--config.vae.weights=...")


if __name__ == "__main__":
    flags.DEFINE_string("src", None, "An original DiT .pt state dict, or a diffusers DiT directory.")
    cli.define_config("Config file for every section but the model's sizes (e.g. configs/dit_xl.py).")
    flags.DEFINE_string("workdir", None, "Empty directory for the kindjax checkpoint (written: a run at step 0).")
    flags.DEFINE_integer("num_heads", 0, "Attention heads (original format; default: from the DiT size).")
    flags.mark_flags_as_required(["src", "config", "workdir"])
    cli.run(main)
