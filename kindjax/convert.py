"""Load diffusers-format DiT checkpoints (e.g. ``facebook/DiT-XL-2-256``) into kindjax.

diffusers' ``DiTTransformer2DModel`` is NCHW with PyTorch layouts (``Linear.weight``
is ``(out, in)``, the patch embedding a ``Conv2d``); kindjax is NHWC with Flax
``kernel`` ``(in, out)``.  diffusers keeps a copy of the timestep and label embedders
in every block (``transformer_blocks.{i}.norm1.emb``), DiT has one: a checkpoint
converts only if all copies are identical.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
from flax import traverse_util

from kindjax.config import base_config
from kindjax.models.dit import abstract_params, build_model

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


def dit_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A kindjax config (``base_config()`` with ``model`` filled in) for a DiTTransformer2DModel config.

    Accepts the dict of a ``transformer/config.json`` (also the legacy
    ``Transformer2DModel`` spelling of the public DiT checkpoints).  Training-only
    settings (dropout) are not carried over.
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
        num_classes=get("num_embeds_ada_norm"),
        mlp_ratio=4.0,                 # diffusers' FeedForward default (mult=4)
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=1.0,       # CombinedTimestepLabelEmbeddings: downscale_freq_shift=1
        norm_eps=1e-6,                 # AdaLayerNormZero and norm_out hard-code 1e-6
        mlp_norm_eps=float(get("norm_eps")),
    ))
    return config


def _to_numpy(value: Any) -> np.ndarray:
    """A float32 numpy array from a torch tensor (without importing torch) or any array-like."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _linear(array: np.ndarray) -> np.ndarray:
    return array.T


def _same(array: np.ndarray) -> np.ndarray:
    return array


def _patch_conv(array: np.ndarray) -> np.ndarray:
    """Conv2d weight ``(D, C, p, p)`` → kernel ``(p·p·C, D)`` over (row, column, channel) patches."""
    return array.transpose(2, 3, 1, 0).reshape(-1, array.shape[0])


def _leaf_map(depth: int) -> dict[tuple[str, ...], tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """kindjax leaf path (under ``params``) → (diffusers key, layout conversion)."""
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
        ("x_embedder", "kernel"): ("pos_embed.proj.weight", _patch_conv),
        ("x_embedder", "bias"): ("pos_embed.proj.bias", _same),
        ("y_embedder", "embedding"): (emb + "class_embedder.embedding_table.weight", _same),
    }
    for path, prefix in modules.items():
        leaves[path + ("kernel",)] = (prefix + ".weight", _linear)
        leaves[path + ("bias",)] = (prefix + ".bias", _same)
    return leaves


def _diffusers_shape(layout: Callable, shape: tuple[int, ...], patch_size: int) -> tuple[int, ...]:
    """The diffusers-layout shape of a kindjax leaf of ``shape``."""
    if layout is _linear:
        return shape[::-1]
    if layout is _patch_conv:
        return (shape[1], shape[0] // patch_size ** 2, patch_size, patch_size)
    return shape


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
    model_config = config.model if "model" in config else config
    if model_config.linear.kind != "dense":
        raise ValueError(f"diffusers DiT weights load into the dense DiT (model.linear.kind='dense'), "
                         f"got {model_config.linear.kind!r}; convert first, then decompose")
    model = build_model(config)
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract_params(model)).items()}
    leaves = _leaf_map(model.depth)
    if set(shapes) != set(leaves):
        raise NotImplementedError(f"the converter does not fill these kindjax parameters: "
                                  f"{sorted(set(shapes) - set(leaves))}")

    expected = {key: _diffusers_shape(layout, shapes[path], model.patch_size)
                for path, (key, layout) in leaves.items()}
    first = EMBEDDER_PREFIX.format(i=0)
    tied = [key[len(first):] for key in expected if key.startswith(first)]
    copies = {(EMBEDDER_PREFIX.format(i=i) + name, first + name)
              for i in range(1, model.depth) for name in tied}
    expected.update({copy: expected[key] for copy, key in copies})

    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not match a diffusers DiT with depth {model.depth}: "
                         f"missing keys [{_listing(missing)}]; unexpected keys [{_listing(unexpected)}]")
    arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
    wrong = [f"{key}: checkpoint {arrays[key].shape}, config expects {shape}"
             for key, shape in expected.items() if arrays[key].shape != shape]
    if wrong:
        raise ValueError("checkpoint shapes do not match the model config (another model size?): "
                         + "; ".join(wrong[:_MAX_LISTED]))
    for copy, key in sorted(copies):
        if not np.array_equal(arrays[copy], arrays[key]):
            raise ValueError(f"{copy} differs from {key} (max |Δ| = "
                             f"{np.abs(arrays[copy] - arrays[key]).max():.3g}): kindjax's DiT has one "
                             f"timestep/label embedder, the checkpoint's blocks must share it")

    params = {path: np.ascontiguousarray(layout(arrays[key])) for path, (key, layout) in leaves.items()}
    return {"params": traverse_util.unflatten_dict(params)}
