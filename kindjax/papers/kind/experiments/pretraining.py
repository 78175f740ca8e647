"""The two pre-trainings KIND's experiments compare from: a dense DiT and the KIND DiT."""
from __future__ import annotations

import ml_collections
from etils import epath

from kindjax.sweep.grid import Run


def dense(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with dense linear layers."""
    c = config.copy_and_resolve_references()
    c.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    return c


def pretrain_runs(config: ml_collections.ConfigDict, workdir: str) -> list[Run]:
    """The dense and the KIND pre-training on the config's classes (same data, steps and optimiser)."""
    kind = config.copy_and_resolve_references()
    kind.job = "train"
    kind.transfer.classes = ()
    root = epath.Path(workdir) / "pretrain"
    return [Run(dict(role="prerequisite", method=name), str(root / name), c)
            for name, c in (("dense", dense(kind)), ("kind", kind))]
