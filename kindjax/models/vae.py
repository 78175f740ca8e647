"""The SD-VAE (diffusers ``AutoencoderKL``) in Flax Linen, NHWC, loading diffusers safetensors.

Architecture (Rombach et al. 2022, as built by diffusers for ``stabilityai/sd-vae-ft-ema``):

- encoder: conv_in → per level ``layers_per_block`` ResNet blocks (+ a stride-2 downsample
  except at the last level) → mid block (ResNet, single-head self-attention, ResNet) →
  GroupNorm → SiLU → conv_out to ``2·latent_channels`` → ``quant_conv`` (1×1); the result
  is split into the posterior mean and log-variance (clipped to [-30, 20]).
- decoder: ``post_quant_conv`` (1×1) → conv_in → mid block → per level (reversed)
  ``layers_per_block + 1`` ResNet blocks (+ a nearest ×2 upsample and conv except at the
  last level) → GroupNorm → SiLU → conv_out.

Every GroupNorm has ε = 1e-6.  Parameter paths mirror the diffusers state-dict keys with
``.<index>.`` folded into names (``encoder.down_blocks.0.resnets.1.conv1.weight`` →
``encoder/down_blocks_0_resnets_1/conv1/kernel``), so :func:`params_from_diffusers` is a
rename plus the layout change OIHW → HWIO (convolutions) and (out, in) → (in, out) (dense).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kindjax.io.paths import as_path, read_json

#: The diffusers config of ``stabilityai/sd-vae-ft-ema`` (and ``-ft-mse``): the architecture keys.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, act_fn="silu",
    scaling_factor=0.18215,
)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
LOGVAR_RANGE = (-30.0, 20.0)

#: Attention parameter names of older diffusers checkpoints (``AttentionBlock``) → current names.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _group_norm(groups: int, name: str, dtype: jnp.dtype) -> nn.GroupNorm:
    """GroupNorm whose statistics are f32 whatever ``dtype`` (Flax reduces in at least f32)."""
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def _conv3x3(features: int, name: str, dtype: jnp.dtype) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x))))))``; shortcut = 1×1 conv iff channels change."""

    features: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv3x3(self.features, "conv1", self.dtype)(nn.silu(_group_norm(self.groups, "norm1", self.dtype)(x)))
        h = _conv3x3(self.features, "conv2", self.dtype)(nn.silu(_group_norm(self.groups, "norm2", self.dtype)(h)))
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class AttentionBlock(nn.Module):
    """``x + W_o·softmax(q kᵀ/√C)·v`` over the H·W positions, one head; q, k, v = W·GN(x) + b."""

    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _group_norm(self.groups, "group_norm", self.dtype)(x).reshape(b, hgt * wid, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        out = jax.nn.dot_product_attention(q, k, v)
        return x + nn.Dense(c, dtype=self.dtype, name="to_out_0")(out).reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Zero-pad one row (bottom) and one column (right), then a 3×3 stride-2 valid conv."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv3x3(x.shape[-1], "conv", self.dtype)(x)


def _mid_block(x: jax.Array, features: int, groups: int, attention: bool, dtype: jnp.dtype) -> jax.Array:
    """ResNet → (attention) → ResNet, created as ``mid_block_*`` in the calling compact module."""
    x = ResnetBlock(features, groups, dtype, name="mid_block_resnets_0")(x)
    if attention:
        x = AttentionBlock(groups, dtype, name="mid_block_attentions_0")(x)
    return ResnetBlock(features, groups, dtype, name="mid_block_resnets_1")(x)


class Encoder(nn.Module):
    """Image (B, H, W, C_in) → (B, H/f, W/f, out_features), f = 2^(levels − 1)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    groups: int
    out_features: int
    mid_attention: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = _conv3x3(self.block_out_channels[0], "conv_in", self.dtype)(x)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(self.block_out_channels):
            for j in range(self.layers_per_block):
                h = ResnetBlock(ch, self.groups, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(h)
            if i < last:
                h = Downsample(self.dtype, name=f"down_blocks_{i}_downsamplers_0")(h)
        h = _mid_block(h, self.block_out_channels[-1], self.groups, self.mid_attention, self.dtype)
        h = nn.silu(_group_norm(self.groups, "conv_norm_out", self.dtype)(h))
        return _conv3x3(self.out_features, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    """Latent (B, h, w, C_lat) → image (B, h·f, w·f, out_features)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    groups: int
    out_features: int
    mid_attention: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = _conv3x3(self.block_out_channels[-1], "conv_in", self.dtype)(z)
        h = _mid_block(h, self.block_out_channels[-1], self.groups, self.mid_attention, self.dtype)
        last = len(self.block_out_channels) - 1
        for i, ch in enumerate(reversed(self.block_out_channels)):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(ch, self.groups, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(h)
            if i < last:
                h = Upsample(self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
        h = nn.silu(_group_norm(self.groups, "conv_norm_out", self.dtype)(h))
        return _conv3x3(self.out_features, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode(x) = (mean, logvar)`` of q(z|x) = N(mean, exp(logvar)), ``decode(z)``.

    Images are NHWC in [-1, 1]; the latent side is the image side / 2^(levels − 1).
    ``__call__`` decodes the posterior mean (used to initialise parameters).  ``dtype``: the
    compute dtype of the convolutions and matmuls (parameters f32, norm statistics f32,
    outputs returned in f32).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        arch = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                    groups=self.norm_num_groups, mid_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(out_features=2 * self.latent_channels, **arch)
        self.decoder = Decoder(out_features=self.out_channels, **arch)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior moments ``(mean, logvar)``, each (B, h, w, latent_channels); logvar ∈ [-30, 20]."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """Image (B, h·f, w·f, out_channels) of latent ``z`` (unscaled: divide by the scale first)."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])


def autoencoder_from_diffusers_config(config: Mapping[str, Any]) -> AutoencoderKL:
    """The :class:`AutoencoderKL` of a diffusers ``config.json`` dict (missing keys: diffusers' defaults).

    Only what this module implements is accepted: ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``
    levels and the SiLU activation.
    """
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"VAE config is for {name!r}; kindjax loads diffusers 'AutoencoderKL' configs only")
    channels = tuple(int(c) for c in config.get("block_out_channels", (64,)))
    down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
    up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",)))
    if down != ("DownEncoderBlock2D",) * len(channels) or up != ("UpDecoderBlock2D",) * len(channels):
        raise ValueError(f"VAE config has down_block_types={down}, up_block_types={up}; kindjax supports one "
                         f"'DownEncoderBlock2D' and one 'UpDecoderBlock2D' per entry of block_out_channels "
                         f"{channels}")
    act = config.get("act_fn", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"VAE config has act_fn={act!r}; kindjax supports 'silu' only")
    return AutoencoderKL(
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        latent_channels=int(config.get("latent_channels", 4)),
        block_out_channels=channels,
        layers_per_block=int(config.get("layers_per_block", 1)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
    )


def _flax_path(key: str) -> tuple[str, ...]:
    """``encoder.mid_block.attentions.0.to_out.0.weight`` → ``(encoder, mid_block_attentions_0, to_out_0, weight)``."""
    parts = key.split(".")
    for old, new in _LEGACY_ATTENTION_NAMES.items():
        if len(parts) >= 2 and parts[-2] == old and "attentions" in parts:
            parts = parts[:-2] + new.split(".") + parts[-1:]
    if parts[-3:-1] == ["to_out", "0"]:
        parts = parts[:-3] + ["to_out_0", parts[-1]]
    layer, leaf = parts[-2:]
    prefix = parts[:-2]
    if prefix:
        prefix = [prefix[0]] + (["_".join(prefix[1:])] if len(prefix) > 1 else [])
    return tuple(prefix) + (layer, leaf)


def _convert_leaf(path: tuple[str, ...], value: np.ndarray, shapes: Mapping[tuple[str, ...], Any]
                  ) -> tuple[tuple[str, ...], np.ndarray] | None:
    """diffusers (PyTorch layout) leaf → Flax path and array; None if the model has no such leaf."""
    value = np.asarray(value, dtype=np.float32)
    layer, leaf = path[:-1], path[-1]
    if leaf == "bias" and layer + ("bias",) in shapes:
        return layer + ("bias",), value
    if leaf != "weight":
        return None
    if value.ndim == 1 and layer + ("scale",) in shapes:      # GroupNorm γ
        return layer + ("scale",), value
    kernel = shapes.get(layer + ("kernel",))
    if kernel is None or value.ndim < 2:
        return None
    if len(kernel.shape) == 2:                                 # dense: (out, in[, 1, 1]) → (in, out)
        return layer + ("kernel",), value.reshape(value.shape[0], -1).T
    if value.ndim != 4:
        return None
    return layer + ("kernel",), value.transpose(2, 3, 1, 0)    # conv: OIHW → HWIO


def params_from_diffusers(state: Mapping[str, np.ndarray], model: AutoencoderKL) -> dict:
    """Flax parameters of ``model`` from a diffusers ``AutoencoderKL`` state dict (NumPy arrays).

    Checks that the keys and shapes match the model exactly and names every difference.
    """
    from flax import traverse_util

    side = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, model.in_channels), jnp.float32)
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    flat, unexpected = {}, []
    for key, value in state.items():
        converted = _convert_leaf(_flax_path(key), value, shapes)
        if converted is None:
            unexpected.append(key)
            continue
        path, array = converted
        if array.shape != tuple(shapes[path].shape):
            raise ValueError(f"VAE weight {key}: shape {tuple(np.shape(value))} does not fit the model "
                             f"({'/'.join(path)} needs {tuple(shapes[path].shape)}); is config.json the one "
                             f"of these weights?")
        flat[path] = array
    missing = sorted("/".join(p) for p in shapes if p not in flat)
    if missing or unexpected:
        raise ValueError(f"VAE weights do not match the model: missing {missing[:8]}"
                         f"{' …' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}"
                         f"{' …' if len(unexpected) > 8 else ''}; is config.json the one of these weights?")
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainedVAE:
    """A loaded VAE: the module, its parameters, its latent scaling factor and its diffusers config."""

    model: AutoencoderKL
    params: dict
    scaling_factor: float
    config: dict
    path: str


def _resolve(path: str) -> tuple[str, str | None]:
    """(safetensors file, config.json or None) of a weights file, a diffusers model directory,
    or a pipeline snapshot holding a ``vae/`` sub-directory."""
    if as_path(path).is_file():
        config = os.path.join(os.path.dirname(path), CONFIG_NAME)
        return path, config if as_path(config).is_file() else None
    for directory in (path, os.path.join(path, "vae")):
        weights, config = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
        if as_path(weights).is_file() and as_path(config).is_file():
            return weights, config
    raise FileNotFoundError(
        f"no diffusers AutoencoderKL at {path!r}: expected a directory holding {CONFIG_NAME} and {WEIGHTS_NAME} "
        f"(e.g. a local snapshot of stabilityai/sd-vae-ft-ema), its parent with a vae/ sub-directory, "
        f"or the .safetensors file itself")


def load_vae(path: str, dtype: str = "float32") -> PretrainedVAE:
    """Loads a diffusers ``AutoencoderKL`` from ``path`` without PyTorch.

    ``path``: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors``
    (or a pipeline snapshot with them in ``vae/``), or a ``.safetensors`` file — then the
    ``config.json`` beside it, else :data:`SD_VAE_CONFIG`, gives the architecture.  ``dtype``: the
    compute dtype (``config.vae.compute_dtype``; parameters stay f32).
    """
    from safetensors.numpy import load

    weights, config_path = _resolve(path)
    if config_path is None:
        config = dict(SD_VAE_CONFIG)
    else:
        config = read_json(config_path)
    model = autoencoder_from_diffusers_config(config).clone(dtype=jnp.dtype(dtype))
    params = params_from_diffusers(load(as_path(weights).read_bytes()), model)
    return PretrainedVAE(model=model, params=params, scaling_factor=float(config.get("scaling_factor", 0.18215)),
                         config=config, path=str(as_path(path)))
