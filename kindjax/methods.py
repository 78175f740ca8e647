"""The transfer methods the papers compare, each as config settings on a downstream config.

A method is a linear-layer variant (``model.linear``), a parameter-selection rule
(``train.trainable``: regexes on parameter paths), a source (a pre-trained dense DiT,
``init.pretrained``, or a KIND learngene, ``init.learngene``) and its learning rate
(KIND paper, Table 7).  Nothing here touches the trainer: :func:`method_config` only
edits a config.  Every method that adapts to new classes also trains the new classes'
label-embedding rows (``y_embedder``), which no pre-trained model has.

Sizes follow the KIND paper's matching rule: the adapters' rank ``r`` equals the
number of tailor components of the new classes, ``N_cls·N_T`` (its Table 7), and
KIND's own learngene is ``N_G`` components.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from kindjax.archs import resolve_dims
from kindjax.config import ConfigError
from kindjax.params import ADAPTER_PATHS as ADAPTERS
from kindjax.params import BIAS_PATHS as BIASES
from kindjax.params import LABEL_PATHS as LABELS
from kindjax.transfer.kind import as_kind_transfer


@dataclasses.dataclass(frozen=True)
class Sizes:
    """``rank``: adapter rank (= N_cls·N_T); ``n_learngene``/``n_tailor``: KIND's N_G and N_T;
    ``oft_blocks``: OFT's block number; ``num_blocks``: blocks a layer-transfer learngene inherits."""

    rank: int
    n_learngene: int
    n_tailor: int
    oft_blocks: int
    num_blocks: int


def matched_sizes(classes: int, n_learngene: int, n_tailor: int, hidden: int, depth: int,
                  oft_blocks: int = 0) -> Sizes:
    """The KIND paper's matching rule for ``classes`` new classes: adapter rank ``classes·N_T``
    (its Table 7); OFT ``oft_blocks`` blocks (default: blocks of 32 channels, peft's default block
    size, on the ``hidden`` width); Heur-/Auto-LG inherit half of the ``depth`` blocks."""
    return Sizes(rank=classes * n_tailor, n_learngene=n_learngene, n_tailor=n_tailor,
                 oft_blocks=oft_blocks or hidden // 32, num_blocks=max(depth // 2, 1))


def config_sizes(config: ml_collections.ConfigDict, classes: int, n_learngene: int = 0,
                 n_tailor: int = 0) -> Sizes:
    """:func:`matched_sizes` for ``classes`` new classes on this config's width and depth, with
    the given ``N_G``, ``N_T`` or those of its KIND layers."""
    linear, dims = config.model.linear, resolve_dims(config.model)
    if not (n_learngene and n_tailor) and linear.kind != "kind":
        raise ValueError("give --n_learngene and --n_tailor, or a KIND config (model.linear.kind='kind')")
    return matched_sizes(classes, n_learngene or linear.n_learngene, n_tailor or linear.n_tailor,
                         dims.hidden_size, dims.depth)


@dataclasses.dataclass(frozen=True)
class Method:
    """``source``: "dense" or "kind" (which pre-trained model it starts from)."""

    name: str
    source: str
    lr: float
    trainable: tuple[str, ...]
    description: str


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("full_ft", "dense", 1e-4, (".*",), "full fine-tuning of the dense DiT"),
    Method("lora", "dense", 1e-3, (ADAPTERS, LABELS), "LoRA: W + (α/r)·BA"),
    Method("dora", "dense", 1e-3, (ADAPTERS, LABELS), "DoRA: m·(W + sBA)/‖W + sBA‖"),
    Method("pissa", "dense", 1e-3, (ADAPTERS, LABELS), "PiSSA: LoRA on the principal singular components"),
    Method("oft", "dense", 1e-4, (ADAPTERS, LABELS), "OFT: block-diagonal orthogonal R·W (Cayley)"),
    Method("loha", "dense", 1e-3, (ADAPTERS, LABELS), "LoHa: W + (W1a·W1b) ⊙ (W2a·W2b)"),
    Method("svdiff", "dense", 5e-3, (ADAPTERS, LABELS), "SVDiff: U·diag(ReLU(σ + δ))·Vᵀ, δ trained"),
    Method("bitfit", "dense", 1e-3, (BIASES, LABELS), "BitFit: biases"),
    Method("difffit", "dense", 1e-3, (BIASES, "/gamma_", LABELS),
           "DiffFit: biases, label embedding, residual scales γ (init 1)"),
    Method("heur_lg", "dense", 1e-4, (".*",), "Heur-LG: inherit the blocks of least gradient change"),
    Method("auto_lg", "dense", 1e-4, (".*",), "Auto-LG: inherit the blocks whose features the task keeps"),
    Method("kind", "kind", 1e-3, (".*",), "KIND: frozen learngene, fresh tailors, class gate"),
    Method("ablation_1", "dense", 1e-3, (ADAPTERS, LABELS), "#1: N_G random SVD components + LoRA"),
    Method("ablation_2", "kind", 1e-3, (ADAPTERS, LABELS), "#2: KIND learngene + LoRA"),
    Method("ablation_3", "kind", 1e-3, (".*",), "#3: KIND learngene + tailors, no class gate"),
]}


def adapter_linear(kind: str, sizes: Sizes) -> ml_collections.ConfigDict:
    """``model.linear`` of an adapter variant at the matched size."""
    if kind == "oft":
        return ml_collections.ConfigDict(dict(kind="oft", r=sizes.oft_blocks, oft_block_size=0))
    if kind == "svdiff":
        return ml_collections.ConfigDict(dict(kind="svdiff"))
    return ml_collections.ConfigDict(dict(kind=kind, rank=sizes.rank, alpha=float(sizes.rank)))


def method_config(config: ml_collections.ConfigDict, method: str, sizes: Sizes, *,
                  pretrained: str = "", learngene: str = "") -> ml_collections.ConfigDict:
    """``config`` (the downstream task: its data classes and ``model.num_classes``) set up for
    ``method``, starting from ``pretrained`` (a dense DiT checkpoint) or ``learngene`` (a KIND one)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    m = METHODS[method]
    c = config.copy_and_resolve_references()
    c.optim.lr = m.lr
    c.train.trainable = m.trainable
    if m.source == "kind" and method != "ablation_2":
        return as_kind_transfer(c, learngene, sizes.n_learngene, sizes.n_tailor,
                                "ungated" if method == "ablation_3" else "gated")
    c.init.pretrained = learngene if method == "ablation_2" else pretrained
    if method in ("lora", "dora", "pissa", "oft", "loha", "svdiff"):
        c.model.linear = adapter_linear(method, sizes)
    elif method in ("ablation_1", "ablation_2"):
        c.model.linear = adapter_linear("lora", sizes)
        if method == "ablation_1":
            c.init.svd_components = sizes.n_learngene
    elif method == "difffit":
        c.model.residual_scales = True
    elif method in ("heur_lg", "auto_lg"):
        c.init.update(select=method, num_blocks=sizes.num_blocks)
    return c
