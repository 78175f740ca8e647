"""DiT sizes and the one rule that resolves a model config's dimensions.

Imports nothing from kindjax, so every module (layers, models, configs, accounting)
can read the dimensions of a model config without an import cycle.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

#: DiT sizes (Peebles & Xie 2023, Table 1): name → (hidden size, depth, heads).
DIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclasses.dataclass(frozen=True)
class Dims:
    """Resolved widths of a DiT: hidden size, depth, heads and the MLP's inner width."""

    hidden_size: int
    depth: int
    num_heads: int
    mlp_hidden: int


def with_depth(model_config: Mapping, depth: int) -> dict:
    """The settings that make ``model_config``'s DiT ``depth`` blocks deep at the same width and heads:
    ``arch`` cleared and the dimensions written out (a named ``arch`` would override ``depth``)."""
    dims = resolve_dims(model_config)
    return dict(arch="", hidden_size=dims.hidden_size, num_heads=dims.num_heads, depth=depth)


def heads_of(hidden_size: int, depth: int) -> int | None:
    """The head count of the DiT size with ``hidden_size`` and ``depth`` (None when no size has them)."""
    return next((heads for h, d, heads in DIT_ARCHS.values() if (h, d) == (hidden_size, depth)), None)


def resolve_dims(model_config: Mapping) -> Dims:
    """``model.arch`` (S/B/L/XL) when set, else ``hidden_size``/``depth``/``num_heads``;
    ``mlp_hidden = int(hidden_size · mlp_ratio)``."""
    arch = model_config.get("arch") or ""
    if arch:
        hidden, depth, heads = DIT_ARCHS[arch]
    else:
        hidden, depth, heads = model_config["hidden_size"], model_config["depth"], model_config["num_heads"]
    return Dims(hidden, depth, heads, int(hidden * model_config["mlp_ratio"]))
