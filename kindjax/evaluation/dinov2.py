"""DINOv2 ViT (Oquab et al. 2023) in Flax Linen and the Fréchet DINOv2 distance (FDD).

The network is the one of ``transformers.Dinov2Model`` (any plain size, e.g. ``facebook/dinov2-large``:
patch 14, hidden 1024, 24 layers, 16 heads), on NHWC images:

    z_0   = [x_cls ; P(x)] + E_pos                  P: 14×14 stride-14 patch projection
    z'_l  = z_{l-1} + λ1_l ⊙ Attn(LN1_l(z_{l-1}))   λ: layer scale
    z_l   = z'_l    + λ2_l ⊙ MLP(LN2_l(z'_l))        MLP: fc2(GELU(fc1(·)))
    out   = LN(z_L)                                  ``last_hidden_state``; feature: out[:, 0]

``E_pos`` is stored for the pre-training grid (``image_size / patch_size`` per side)
and resampled bicubically (PyTorch's ``interpolate(mode="bicubic", align_corners=False)``,
Keys kernel a = −0.75, border replicated) to the grid of the input.

FDD follows dgm-eval (Stein et al. 2023, ``DINOv2Encoder`` without ``--clean_resize``):
each uint8 RGB image is resized to 224×224 by PIL's bicubic filter (what torchvision's
``Resize((224, 224), BICUBIC)`` does to the PIL images dgm-eval loads; reproduced here
bit-exactly in integer arithmetic), scaled to [0, 1], normalised with the ImageNet
mean/std, and the feature is the CLS token of the final layer-normed output
(``x_norm_clstoken`` of the torch-hub model, ``pooler_output`` of transformers).
:func:`load_dinov2` resamples E_pos as that torch-hub model does by default (offset 0.1,
see :class:`Dinov2`); ``interpolate_offset=0`` reproduces transformers exactly.
Weights are read from a transformers directory (``config.json`` + ``model.safetensors``)
with ``safetensors.numpy``; nothing is downloaded.

Which DINOv2: dgm-eval's default is ViT-L/14 (``DINOv2Encoder.setup`` in
``dgm_eval/models/dinov2.py`` loads ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')``
when no ``--arch`` is given), the transformers checkpoint ``facebook/dinov2-large``; so is
kindjax's (``eval.dinov2_model="vitl14"``).  :func:`load_dinov2` checks the weights against the
chosen size (:data:`DINOV2_SIZES`), so a ViT-B/14 directory cannot pass for the reference's ViT-L/14.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors.numpy import load

from kindjax.config import FDD_NORMALIZATIONS, ConfigError
from kindjax.evaluation.frechet import feature_statistics, frechet_distance
from kindjax import sharding
from kindjax.io.paths import as_path, read_json

#: ``eval.dinov2_model`` → (hidden size, layers, heads) of the torch-hub DINOv2 of that name and its
#: transformers checkpoint.  ViT-g/14 (``vitg14``, ``facebook/dinov2-giant``) has a SwiGLU MLP: not supported.
DINOV2_SIZES: dict[str, tuple[int, int, int]] = {
    "vits14": (384, 12, 6),      # facebook/dinov2-small
    "vitb14": (768, 12, 12),     # facebook/dinov2-base
    "vitl14": (1024, 24, 16),    # facebook/dinov2-large: dgm-eval's default, FDD's reference network
}
DINOV2_CHECKPOINTS = {"vits14": "facebook/dinov2-small", "vitb14": "facebook/dinov2-base",
                      "vitl14": "facebook/dinov2-large"}
#: dgm-eval's input side and ImageNet normalisation (``TF.Normalize(mean, std)``).
FDD_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The torch-hub DINOv2 models (dgm-eval's encoder) resample E_pos with scale factor (g + 0.1)/M.
TORCH_HUB_INTERPOLATE_OFFSET = 0.1

_PIL_PRECISION_BITS = 22   # Pillow's Resample.c: 32 - 8 - 2 fixed-point bits for 8-bit images
_PIL_BICUBIC_A = -0.5
_TORCH_BICUBIC_A = -0.75


# ----------------------------------------------------------------------------- resampling

def torch_bicubic_matrix(in_size: int, out_size: int, offset: float = 0.0) -> np.ndarray:
    """``(out, in)`` matrix of PyTorch's 1-D bicubic resampling (align_corners=False, no antialias).

    Source coordinate ``s_i = (i + ½)·M/(g + offset) − ½`` (``offset = 0``: ``size=g``;
    ``offset > 0``: ``scale_factor=(g + offset)/M``), taps at ``⌊s_i⌋ − 1 … ⌊s_i⌋ + 2``
    clamped to the border, Keys weights with a = −0.75.
    """
    a = _TORCH_BICUBIC_A
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / (out_size + offset)) - 0.5
    floor = np.floor(source)
    t = source - floor
    near = lambda x: ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0            # |x| ≤ 1
    far = lambda x: ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a       # 1 < |x| < 2
    weights = np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=1)
    taps = np.clip(floor[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
    return matrix


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = −0.5, support 2), in its operation order."""
    a = _PIL_BICUBIC_A
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def pil_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and fixed-point weights ``(out, K)`` of Pillow's 8-bit bicubic resize.

    As ``precompute_coeffs`` in Pillow's Resample.c: scale ``s = in/out``, kernel widened by
    ``f = max(s, 1)`` (antialias), centre ``c_i = (i + ½)·s``, window
    ``[int(c_i − 2f + ½), int(c_i + 2f + ½))`` cut to the image, weights
    ``w_j = k((j − c_i + ½)/f)`` normalised to sum 1, then rounded to ``w·2²²`` half away from 0.
    Unused taps carry weight 0.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    num_taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    offsets = np.arange(num_taps)
    valid = offsets[None, :] < (stop - start)[:, None]
    raw = np.where(valid, _pil_bicubic((start[:, None] + offsets[None, :] - center[:, None] + 0.5)
                                       * (1.0 / filter_scale)), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(num_taps):          # sequential sum, as the C loop
        total += raw[:, j]
    normalised = raw / np.where(total != 0.0, total, 1.0)[:, None]
    fixed = np.trunc(normalised * (1 << _PIL_PRECISION_BITS) + np.where(normalised < 0, -0.5, 0.5))
    index = np.where(valid, start[:, None] + offsets[None, :], 0)
    return index.astype(np.int32), fixed.astype(np.int32)


def _pil_resample_axis(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    """One 8-bit pass: ``clip(⌊(Σ_j x[idx_ij]·w_ij + 2²¹) / 2²²⌋, 0, 255)`` along ``axis`` (int32)."""
    index, weight = pil_bicubic_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    total = jnp.full(x.shape[:axis] + (out_size,) + x.shape[axis + 1:], 1 << (_PIL_PRECISION_BITS - 1),
                     dtype=jnp.int32)
    for j in range(index.shape[1]):
        total = total + jnp.take(x, jnp.asarray(index[:, j]), axis=axis) * jnp.asarray(weight[:, j]).reshape(shape)
    return jnp.clip(jnp.right_shift(total, _PIL_PRECISION_BITS), 0, 255)


def pil_bicubic_resize(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``PIL.Image.resize((w, h), BICUBIC)`` of uint8 NHWC images, bit-exact, to ``size = (h, w)``.

    Two separable passes as Pillow, each rounded to uint8: horizontal then vertical, except
    that Pillow >= 13 goes vertical first when ``H − h > 2·(W − w)`` and ``h < H`` (never for
    square inputs, so all Pillow versions agree there).
    """
    if images.dtype != jnp.uint8:
        raise ValueError(f"PIL-style resizing takes uint8 images, got {images.dtype}")
    x = images.astype(jnp.int32)
    height, width = x.shape[1:3]
    axes = [(2, size[1]), (1, size[0])]
    if size[0] < height and height - size[0] > 2 * (width - size[1]):
        axes.reverse()
    for axis, out_size in axes:
        if x.shape[axis] != out_size:
            x = _pil_resample_axis(x, out_size, axis)
    return x.astype(jnp.uint8)


def fdd_preprocess(images: jax.Array) -> jax.Array:
    """dgm-eval's DINOv2 input: ``(PILbicubic₂₂₄(x)/255 − mean)/std``, float32 NHWC."""
    resized = pil_bicubic_resize(images, (FDD_IMAGE_SIZE, FDD_IMAGE_SIZE)).astype(jnp.float32) / 255.0
    mean = jnp.asarray(IMAGENET_MEAN, dtype=jnp.float32)
    std = jnp.asarray(IMAGENET_STD, dtype=jnp.float32)
    return (resized - mean) / std


# ----------------------------------------------------------------------------- the network

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),   # transformers' "gelu" is the erf form
}


class Dinov2Attention(nn.Module):
    """Multi-head self-attention ``softmax(q kᵀ/√d_h) v`` with the output projection."""

    hidden_size: int
    num_heads: int
    qkv_bias: bool
    precision: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        head_dim = self.hidden_size // self.num_heads
        split = lambda h: h.reshape(h.shape[:2] + (self.num_heads, head_dim))
        dense = functools.partial(nn.Dense, self.hidden_size, use_bias=self.qkv_bias, precision=self.precision,
                                  dtype=self.dtype)
        q = split(dense(name="query")(x))
        k = split(dense(name="key")(x))
        v = split(dense(name="value")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision) * head_dim ** -0.5
        attention = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)   # softmax in f32
        out = jnp.einsum("bhqk,bkhd->bqhd", attention, v, precision=self.precision)
        out = out.reshape(out.shape[:2] + (self.hidden_size,))
        return nn.Dense(self.hidden_size, precision=self.precision, dtype=self.dtype, name="output")(out)


class Dinov2Layer(nn.Module):
    """Pre-norm block with layer scale: ``z += λ1 ⊙ Attn(LN1 z)``; ``z += λ2 ⊙ MLP(LN2 z)``."""

    hidden_size: int
    num_heads: int
    mlp_hidden: int
    qkv_bias: bool
    layer_norm_eps: float
    hidden_act: str
    layerscale_value: float
    precision: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=self.dtype)
        scale = lambda name: self.param(name, nn.initializers.constant(self.layerscale_value),
                                        (self.hidden_size,)).astype(self.dtype)
        h = Dinov2Attention(self.hidden_size, self.num_heads, self.qkv_bias, self.precision, self.dtype,
                            name="attention")(norm(name="norm1")(z))
        z = z + scale("layer_scale1") * h
        dense = functools.partial(nn.Dense, precision=self.precision, dtype=self.dtype)
        h = dense(self.mlp_hidden, name="fc1")(norm(name="norm2")(z))
        h = dense(self.hidden_size, name="fc2")(_ACTIVATIONS[self.hidden_act](h))
        return z + scale("layer_scale2") * h


class Dinov2(nn.Module):
    """DINOv2 ViT: NHWC pixels ``(B, H, W, C)`` → final layer-normed tokens ``(B, 1 + N, D)``.

    ``image_size`` fixes the stored position grid ``M = image_size // patch_size``; other
    inputs get ``E_pos`` resampled (:func:`torch_bicubic_matrix`, ``interpolate_offset``
    0 as transformers, 0.1 as the torch-hub models on square inputs; the hub code swaps
    the two grid axes on non-square ones, which is not reproduced).  ``precision`` applies to every matmul
    ("highest": float32 on GPU/TPU too, as the PyTorch reference).  ``dtype``: the compute dtype of the
    patch embedding and the layers (f32 by default; parameters, norm statistics, softmax and the output f32).
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    patch_size: int = 14
    image_size: int = 518
    num_channels: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    layerscale_value: float = 1.0
    interpolate_offset: float = 0.0
    precision: str = "highest"
    dtype: jnp.dtype = jnp.float32

    def position_embedding(self, table: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """``E_pos`` for a ``grid = (g_h, g_w)`` patch grid: CLS row kept, patch rows resampled."""
        side = self.image_size // self.patch_size
        if grid == (side, side):
            return table
        rows = jnp.asarray(torch_bicubic_matrix(side, grid[0], self.interpolate_offset), dtype=jnp.float32)
        cols = jnp.asarray(torch_bicubic_matrix(side, grid[1], self.interpolate_offset), dtype=jnp.float32)
        patches = table[0, 1:].reshape(side, side, -1)
        patches = jnp.einsum("ym,xn,mnd->yxd", rows, cols, patches, precision=self.precision)
        return jnp.concatenate([table[:, :1], patches.reshape(1, grid[0] * grid[1], -1)], axis=1)

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        if pixels.ndim != 4 or pixels.shape[-1] != self.num_channels:
            raise ValueError(f"expected NHWC pixels with {self.num_channels} channels, got shape {pixels.shape}")
        side = self.image_size // self.patch_size
        init = nn.initializers.truncated_normal(0.02)
        x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size), strides=self.patch_size,
                    padding="VALID", precision=self.precision, dtype=self.dtype,
                    name="patch_embed")(pixels.astype(self.dtype))
        grid = x.shape[1:3]
        x = x.reshape(x.shape[0], grid[0] * grid[1], self.hidden_size)
        cls = self.param("cls_token", init, (1, 1, self.hidden_size))
        table = self.param("position_embeddings", init, (1, 1 + side * side, self.hidden_size))
        z = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_size)), x], axis=1)
        z = (z + self.position_embedding(table, grid)).astype(self.dtype)
        for i in range(self.num_layers):
            z = Dinov2Layer(self.hidden_size, self.num_heads, int(self.hidden_size * self.mlp_ratio), self.qkv_bias,
                            self.layer_norm_eps, self.hidden_act, self.layerscale_value, self.precision,
                            self.dtype, name=f"layer_{i}")(z)
        return nn.LayerNorm(epsilon=self.layer_norm_eps, use_fast_variance=False, dtype=jnp.float32,
                            name="layernorm")(z)


def dinov2_from_config(config: Mapping[str, Any], interpolate_offset: float = 0.0) -> Dinov2:
    """The :class:`Dinov2` of a transformers ``Dinov2Config`` dict (``config.json``)."""
    model_type = config.get("model_type", "dinov2")
    if model_type != "dinov2":
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; "
                          "use a plain DINOv2 checkpoint (model_type 'dinov2', e.g. facebook/dinov2-large)")
    if config.get("use_swiglu_ffn", False):
        raise ConfigError("config.json: use_swiglu_ffn=true (DINOv2-giant) is not supported; "
                          "use a ViT-S/B/L DINOv2 checkpoint (e.g. facebook/dinov2-large)")
    hidden_act = config.get("hidden_act", "gelu")
    if hidden_act not in _ACTIVATIONS:
        raise ConfigError(f"config.json: hidden_act {hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    sizes = {key: config.get(key, default) for key, default in (("image_size", 224), ("patch_size", 14))}
    for key, value in sizes.items():
        if not isinstance(value, int):
            raise ConfigError(f"config.json: {key}={value!r} must be one integer (square images and patches)")
    hidden, heads = config.get("hidden_size", 768), config.get("num_attention_heads", 12)
    if hidden % heads:
        raise ConfigError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return Dinov2(hidden_size=hidden, num_layers=config.get("num_hidden_layers", 12), num_heads=heads,
                  patch_size=sizes["patch_size"], image_size=sizes["image_size"],
                  num_channels=config.get("num_channels", 3), mlp_ratio=float(config.get("mlp_ratio", 4)),
                  qkv_bias=bool(config.get("qkv_bias", True)), layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
                  hidden_act=hidden_act, layerscale_value=float(config.get("layerscale_value", 1.0)),
                  interpolate_offset=float(interpolate_offset))


# ----------------------------------------------------------------------------- weights

_LINEAR = lambda w: w.T                                  # torch Linear (out, in) → Dense kernel (in, out)
_CONV = lambda w: w.transpose(2, 3, 1, 0)                # torch Conv2d (D, C, kh, kw) → Conv kernel (kh, kw, C, D)
_SAME = lambda w: w

#: transformers key pattern → (kindjax path template, array transform).  ``{i}``: layer index.
_KEY_RULES: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...] = (
    (r"embeddings\.cls_token", "cls_token", _SAME),
    (r"embeddings\.position_embeddings", "position_embeddings", _SAME),
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed/kernel", _CONV),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed/bias", _SAME),
    (r"encoder\.layer\.(\d+)\.norm([12])\.weight", "layer_{0}/norm{1}/scale", _SAME),
    (r"encoder\.layer\.(\d+)\.norm([12])\.bias", "layer_{0}/norm{1}/bias", _SAME),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.weight", "layer_{0}/attention/{1}/kernel", _LINEAR),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.bias", "layer_{0}/attention/{1}/bias", _SAME),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", "layer_{0}/attention/output/kernel", _LINEAR),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.bias", "layer_{0}/attention/output/bias", _SAME),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", "layer_{0}/layer_scale{1}", _SAME),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.weight", "layer_{0}/{1}/kernel", _LINEAR),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.bias", "layer_{0}/{1}/bias", _SAME),
    (r"layernorm\.weight", "layernorm/scale", _SAME),
    (r"layernorm\.bias", "layernorm/bias", _SAME),
)
#: Keys of a transformers checkpoint that inference does not use (masked-image pre-training).
_UNUSED_KEYS = ("embeddings.mask_token",)


def dinov2_params_from_state_dict(state_dict: Mapping[str, np.ndarray], module: Dinov2) -> dict:
    """Convert a transformers ``Dinov2Model`` state dict (NumPy arrays) to ``module``'s params.

    Every parameter of ``module`` must be present with its shape; keys that map to nothing
    (other than the pre-training ``mask_token``) are refused.
    """
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _UNUSED_KEYS:
            continue
        for pattern, template, transform in _KEY_RULES:
            match = re.fullmatch(pattern, key)
            if match:
                flat[template.format(*match.groups())] = np.asarray(transform(value), dtype=np.float32)
                break
        else:
            unknown.append(key)
    expected = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, module.patch_size, module.patch_size, module.num_channels)))["params"]
    expected_flat = {"/".join(k.key for k in path): leaf.shape
                     for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(expected_flat) - set(flat))
    unexpected = sorted(set(flat) - set(expected_flat)) + unknown
    wrong = [f"{k}: {flat[k].shape} != {s}" for k, s in expected_flat.items() if k in flat and flat[k].shape != s]
    if missing or unexpected or wrong:
        raise ValueError("DINOv2 weights do not fit the config: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shapes {wrong[:8]} "
                         "(expected a transformers Dinov2Model checkpoint matching its config.json)")
    params: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return params


def check_dinov2_size(module: Dinov2, model: str, where: str) -> None:
    """Refuses a network that is not the DINOv2 ``model`` names (a key of :data:`DINOV2_SIZES`, or
    ``"any"``: no check), naming what ``where`` holds and the two fixes."""
    if model == "any":
        return
    if model not in DINOV2_SIZES:
        raise ConfigError(f"eval.dinov2_model={model!r}: use one of {sorted(DINOV2_SIZES) + ['any']}")
    found = (module.hidden_size, module.num_layers, module.num_heads)
    if found == DINOV2_SIZES[model]:
        return
    named = [name for name, size in DINOV2_SIZES.items() if size == found]
    instead = f"set eval.dinov2_model='{named[0]}'" if named else "set eval.dinov2_model='any' to use it unchecked"
    raise ConfigError(f"eval.dinov2_model={model!r} needs {DINOV2_CHECKPOINTS[model]} (hidden {DINOV2_SIZES[model][0]}, "
                      f"{DINOV2_SIZES[model][1]} layers, {DINOV2_SIZES[model][2]} heads), but {where} holds a ViT with "
                      f"hidden {found[0]}, {found[1]} layers, {found[2]} heads"
                      + (f" ({named[0]})" if named else "") + f": give {DINOV2_CHECKPOINTS[model]}, or {instead}")


def read_dinov2_config(path: str, interpolate_offset: float = TORCH_HUB_INTERPOLATE_OFFSET,
                       model: str = "any") -> Dinov2:
    """The :class:`Dinov2` of the transformers directory ``path`` (its ``config.json`` only), checked to
    be ``model`` (:func:`check_dinov2_size`)."""
    config_path = os.path.join(path, "config.json")
    if not as_path(config_path).is_file():
        raise FileNotFoundError(f"{config_path} not found: give a directory saved by transformers "
                                "(Dinov2Model.save_pretrained(dir, safe_serialization=True), "
                                f"or a copy of {DINOV2_CHECKPOINTS['vitl14']})")
    module = dinov2_from_config(read_json(config_path), interpolate_offset)
    check_dinov2_size(module, model, path)
    return module


def load_dinov2(path: str, interpolate_offset: float = TORCH_HUB_INTERPOLATE_OFFSET,
                model: str = "any") -> tuple[Dinov2, dict]:
    """``(module, params)`` from a transformers directory (``config.json`` + ``model.safetensors``).

    Read with ``safetensors.numpy`` (no PyTorch, no download).  The default offset 0.1 resamples
    E_pos as the torch-hub model that dgm-eval's FDD runs (for 224² inputs to a 518² checkpoint
    this differs slightly from transformers); ``interpolate_offset=0`` gives transformers'
    ``Dinov2Model`` exactly.  ``model`` (``eval.dinov2_model``): the size the weights must be,
    e.g. ``"vitl14"`` (dgm-eval's); ``"any"`` checks nothing.  Use as
    ``module.apply({"params": params}, pixels)``.
    """
    module = read_dinov2_config(path, interpolate_offset, model)
    weights_path = os.path.join(path, "model.safetensors")
    if not as_path(weights_path).is_file():
        raise FileNotFoundError(f"{weights_path} not found: give a directory saved by transformers "
                                "(Dinov2Model.save_pretrained(dir, safe_serialization=True), "
                                f"or a copy of {DINOV2_CHECKPOINTS['vitl14']})")
    return module, dinov2_params_from_state_dict(load(as_path(weights_path).read_bytes()), module)


# ----------------------------------------------------------------------------- features and FDD

@functools.partial(jax.jit, static_argnums=0)
def _cls_features(module: Dinov2, params: dict, images: jax.Array) -> jax.Array:
    return module.apply({"params": params}, fdd_preprocess(images))[:, 0]


def dinov2_features(module: Dinov2, params: dict, images: np.ndarray, batch_size: int = 64,
                    mesh: Mesh | None = None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """FDD features ``LN(z_L)[:, CLS]`` of uint8 RGB images ``(N, H, W, 3)`` → float32 ``(N, D)``.

    Images go through :func:`fdd_preprocess` (dgm-eval: PIL bicubic to 224², ImageNet
    normalisation) inside one jit-compiled step per batch, split over ``mesh``'s batch axes when
    given; the last batch is padded so only one shape is compiled. ``progress(done, total)`` is
    called after each batch.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"expected uint8 RGB images (N >= 1, H, W, 3), got {images.dtype} {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mesh is not None:  # placed once, not at every batch
        params = jax.device_put(params, sharding.replicated(mesh))
    features = sharding.map_batches(lambda batch, _: _cls_features(module, params, batch), images, batch_size,
                                    mesh, progress)
    return features.astype(np.float32)


def fdd(features_a: np.ndarray, features_b: np.ndarray, normalize: str = "l2") -> float:
    """Fréchet DINOv2 distance: the Fréchet distance of Gaussians fitted to two feature sets, each
    feature first mapped by ``normalize`` (``eval.fdd_normalize``, :data:`kindjax.config.FDD_NORMALIZATIONS`):

    - ``"l2"``: ``f / ‖f‖₂`` (float64), dgm-eval's ``get_representations(..., normalized=True)``
      (``torch.nn.functional.normalize(pred, dim=-1)``).  Unit features bound the distance: with
      ``Tr Σ + ‖μ‖² = E‖f‖² = 1``, ``FDD = 2 − 2·μ_a·μ_b − 2·Tr((Σ_a Σ_b)^{1/2}) ≤ 4`` (up to the
      ``N/(N−1)`` of the unbiased covariance) — the scale of FDD tables reported below 1 (0.04–0.62),
      which a raw distance of ViT-L/14 features (typically hundreds) does not have; a reading, as the
      paper that reports them does not state its normalisation (docs/reproduce.md).
    - ``"none"``: the raw CLS features, as dgm-eval's command line (``normalized=False``).
    """
    if normalize not in FDD_NORMALIZATIONS:
        raise ConfigError(f"eval.fdd_normalize={normalize!r}: use one of {list(FDD_NORMALIZATIONS)}")

    def mapped(features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, np.float64)
        return features / np.linalg.norm(features, axis=-1, keepdims=True) if normalize == "l2" else features

    return frechet_distance(*feature_statistics(mapped(features_a)), *feature_statistics(mapped(features_b)))


@dataclasses.dataclass(frozen=True, eq=False)
class DinoFeatures:
    """The ``dinov2`` need of a metric (:mod:`kindjax.evaluation.metric`): :func:`dinov2_features` of
    the samples and of the reference images, and the ``normalize`` of :func:`fdd` (``eval.fdd_normalize``)."""

    samples: np.ndarray
    reference: np.ndarray
    normalize: str
