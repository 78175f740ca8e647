"""The linear-factory protocol every variant implements (see :mod:`kindjax.layers`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kindjax.config import QKV_INITS, ConfigError

#: The key of ``config.model.linear`` that names the variant (:data:`kindjax.layers.VARIANTS`).
VARIANT_KEY = "kind"

#: Roles a factory may ask the DiT to build as one matrix (``fused_roles``): ``"qkv"`` (one
#: ``d → 3d`` matrix whose output is split into q, k, v) and ``"adaln"`` (the block's adaLN
#: modulation ``d → 6d``, otherwise a plain dense layer of the DiT).
FUSABLE_ROLES = ("qkv", "adaln")

#: The roles that ``model.qkv_init="fused"`` initialises as thirds of one matrix.
QKV_ROLES = ("q", "k", "v")


def xavier_fan_out(role: str, features: int, qkv_init: str = "fused") -> int:
    """The fan-out a fresh matrix of ``role`` with ``features`` outputs takes in its xavier variance
    ``2/(fan_in + fan_out)``, by ``model.qkv_init`` (:data:`kindjax.config.QKV_INITS`): ``"fused"``
    (default): q, k, v are each a third of one ``d → 3d`` xavier-uniform matrix, fan-out ``3·features``,
    entry variance ``2/(d + 3d) = 1/(2d)`` (the DiT reference code builds q, k, v as one such matrix);
    ``"separate"``, and every other role: its own fan-out ``features`` (q, k, v: variance ``1/d``)."""
    if qkv_init not in QKV_INITS:
        raise ConfigError(f"model.qkv_init={qkv_init!r}: use one of {list(QKV_INITS)}")
    return 3 * features if qkv_init == "fused" and role in QKV_ROLES else features


class LinearFactory(Protocol):
    def __call__(self, role: str, features: int, name: str, shared: Any = None) -> nn.Module:
        """Returns the layer for matrix ``role`` with ``features`` outputs; ``shared`` is the
        output of the factory's :class:`SharedParams` module (``None`` when it has none).  The layer is
        called as ``layer(x, y)``; one whose class sets :func:`applies_residual` also as
        ``layer(x, y, residual=r, gate=g)``, returning ``r + g ⊙ layer(x, y)``."""


@dataclasses.dataclass(frozen=True)
class SharedParams:
    """Parameters a variant holds once per model: ``module(name=name)`` is built by the DiT at
    the top level (its leaves live under ``name/``), called with no arguments, and its
    output is passed as ``shared=`` to every layer the factory makes."""

    name: str
    module: Callable[..., nn.Module]


def shared_params(factory: LinearFactory) -> SharedParams | None:
    """The factory's :class:`SharedParams`, or ``None`` for a variant without shared parameters."""
    return getattr(factory, "shared_params", None)


def fused_roles(factory: LinearFactory) -> frozenset[str]:
    """The :data:`FUSABLE_ROLES` the factory declares (attribute ``fused_roles``; none by default)."""
    return frozenset(getattr(factory, "fused_roles", ()))


def fused_mlp(factory: LinearFactory) -> Callable[..., jax.Array] | None:
    """The factory's block-MLP function (attribute ``fused_mlp``; None by default): called by the DiT block
    as ``fused_mlp(mlp_in, mlp_out, x, y, shift, scale, gate, eps)`` with the block's two MLP layers (built,
    not yet called), it returns ``x + gate ⊙ mlp_out(gelu(mlp_in(LN(x)·(1 + scale) + shift)))``."""
    return getattr(factory, "fused_mlp", None)


def counted_twin(factory: LinearFactory) -> LinearFactory:
    """The factory's layers computing the same function with XLA's own operations only (attribute
    ``counted_twin``, where its layers run a Pallas kernel, whose FLOPs XLA's cost analysis of a
    host-side trace does not see); ``factory`` itself otherwise."""
    return getattr(factory, "counted_twin", factory)


def check_linear_keys(linear_config: Mapping, allowed: Sequence[str], kind: str) -> None:
    """ConfigError naming the keys of ``config.model.linear`` that variant ``kind`` does not take."""
    unknown = sorted(set(linear_config.keys()) - set(allowed))
    if unknown:
        raise ConfigError(f"config.model.linear has unknown keys {unknown} for kind={kind!r}; "
                          f"allowed keys: {list(allowed)}")


def positive_int(linear_config: Mapping, key: str, kind: str, meaning: str = "") -> int:
    """``config.model.linear[key]``, or a ConfigError unless it is a positive int (``meaning``: what it counts)."""
    value = linear_config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = f" ({meaning})" if meaning else ""
        raise ConfigError(f"config.model.linear.{key} must be a positive int for kind={kind!r}{what}, "
                          f"got {value!r}")
    return value


def one_of(linear_config: Mapping, key: str, default: str, allowed: Sequence[str], kind: str,
           meaning: str = "") -> str:
    """``config.model.linear[key]`` (``default`` when absent), or a ConfigError unless it is in ``allowed``."""
    value = linear_config.get(key, default)
    if value not in allowed:
        raise ConfigError(f"config.model.linear.{key}={value!r} for kind={kind!r}: use one of {list(allowed)}"
                          + (f" ({meaning})" if meaning else ""))
    return value


def applies_residual(layer: nn.Module) -> bool:
    """Whether ``layer`` sums a block's residual branch ``r + g ⊙ layer(x, y)`` itself (class attribute
    ``applies_residual``; false by default), where that sum fuses into its product and would not outside."""
    return bool(getattr(layer, "applies_residual", False))


def gated_sum(residual: jax.Array, gate: jax.Array, out: jax.Array) -> jax.Array:
    """A block's residual branch ``residual + gate ⊙ out``, one ``gate`` row per sample (``(B, d)``)
    broadcast over the tokens of ``out`` (``(B, …, d)``)."""
    return residual + jnp.expand_dims(gate, tuple(range(1, out.ndim - 1))) * out
