"""The transfer methods the papers compare, each as config settings on a downstream config.

A method is a linear-layer variant (``model.linear``), a parameter-selection rule
(``train.trainable``: regexes on parameter paths), a source (a pre-trained dense DiT,
``init.pretrained``, or a KIND learngene, ``init.learngene``) and its learning rate
(KIND paper, Table 7).  Nothing here touches the trainer: :func:`method_config` only
edits a config.  Every method that adapts to new classes also trains the new classes'
label-embedding rows (``y_embedder``), which no pre-trained model has.

Sizes follow the KIND paper's matching rule (its Table 7): the rank ``r`` of LoRA, PiSSA
and DoRA equals the number of tailor components of the new classes, ``N_cls·N_T``; LoHa,
whose update has two rank-``r`` pairs, gets ``⌊N_cls·N_T/2⌋`` (Table 7's LoHa row), so all
four train about as many parameters as KIND's tailors; OFT gets Table 7's block number
(:data:`KIND_OFT_BLOCKS`); KIND's own learngene is ``N_G`` components.

LoRA's α (also DoRA's, PiSSA's, LoHa's): ``α = r``, so the update scale ``s = α/r`` is 1 at
every rank.  The paper and its Table 7 give ranks but no α; peft's default (``r = α = 8``)
is ``s = 1``, and keeping ``s = 1`` keeps the effective step of Table 7's learning rate
(1e-3) the same for every task, whereas peft's fixed ``α = 8`` would shrink the update by
``8/r`` (to 0.06 at the ``r = 140`` of DiT-L task 18).  Any other α is one setting away
(``--config.model.linear.alpha``).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from kindjax.archs import resolve_dims
from kindjax.config import ConfigError
from kindjax.papers.kind.classes import kind_tasks
from kindjax.params import ADAPTER_PATHS as ADAPTERS
from kindjax.params import BIAS_PATHS as BIASES
from kindjax.params import LABEL_PATHS as LABELS
from kindjax.papers.kind.transfer import as_kind_transfer


# KIND paper, Table 7: OFT's block number r for task #1..#18 (both DiT-B and DiT-L).
KIND_OFT_BLOCKS = (21, 11, 8, 7, 6, 6, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """``rank``: LoRA/PiSSA/DoRA rank (= N_cls·N_T; LoHa: :attr:`loha_rank`);
    ``n_learngene``/``n_tailor``: KIND's N_G and N_T; ``oft_blocks``: OFT's block number;
    ``num_blocks``: blocks a layer-transfer learngene inherits."""

    rank: int
    n_learngene: int
    n_tailor: int
    oft_blocks: int
    num_blocks: int

    @property
    def loha_rank(self) -> int:
        """LoHa's rank ``⌊r/2⌋`` (at least 1): two rank-``r/2`` pairs, as many parameters as rank ``r``."""
        return max(self.rank // 2, 1)


def matched_sizes(classes: int, n_learngene: int, n_tailor: int, hidden: int, depth: int,
                  oft_blocks: int = 0) -> Sizes:
    """The KIND paper's matching rule for ``classes`` new classes (its Table 7): rank
    ``r = classes·N_T`` (LoHa: :attr:`Sizes.loha_rank`); OFT ``oft_blocks`` blocks (default: blocks of 32
    channels, peft's default block size, on the ``hidden`` width); Heur-/Auto-LG inherit half of the
    ``depth`` blocks."""
    return Sizes(rank=classes * n_tailor, n_learngene=n_learngene, n_tailor=n_tailor,
                 oft_blocks=oft_blocks or hidden // 32, num_blocks=max(depth // 2, 1))


def kind_task_sizes(task: str, n_learngene: int, n_tailor: int, hidden: int, depth: int) -> tuple[int, Sizes]:
    """``(classes, sizes)`` of KIND downstream task ``task`` ("task_1".."task_18", Table 9): its
    number of classes and :func:`matched_sizes` with Table 7's OFT block number."""
    tasks = kind_tasks()
    if task not in tasks:
        raise ConfigError(f"unknown KIND task {task!r}: use one of task_1..task_{len(tasks)} (KIND Table 9)")
    classes = len(tasks[task])
    return classes, matched_sizes(classes, n_learngene, n_tailor, hidden, depth,
                                  oft_blocks=KIND_OFT_BLOCKS[int(task.removeprefix("task_")) - 1])


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


def adapter_linear(kind: str, sizes: Sizes, oft_block_fit: str = "pad") -> ml_collections.ConfigDict:
    """``model.linear`` of an adapter variant at the matched size, with ``α = r``.

    OFT keeps Table 7's block number where it does not divide a matrix's input size
    (``block_fit="pad"``, blocks of ⌈d_in/r⌉): that is the reading Table 2's OFT parameter counts
    imply (14.2M on DiT-B, 50.5M on DiT-L); ``oft_block_fit="peft"`` takes peft's nearest divisor
    instead (:func:`kindjax.layers.adapters.oft_blocks`).
    """
    if kind == "oft":
        return ml_collections.ConfigDict(dict(kind="oft", r=sizes.oft_blocks, oft_block_size=0,
                                              block_fit=oft_block_fit))
    if kind == "svdiff":
        return ml_collections.ConfigDict(dict(kind="svdiff"))
    rank = sizes.loha_rank if kind == "loha" else sizes.rank
    return ml_collections.ConfigDict(dict(kind=kind, rank=rank, alpha=float(rank)))


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
