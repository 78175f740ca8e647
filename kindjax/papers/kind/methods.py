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
(:data:`kindjax.papers.kind.facts.OFT_BLOCKS`); KIND's own learngene is ``N_G`` components.

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

from typing import Callable

from kindjax.archs import resolve_dims
from kindjax.config import ConfigError
from kindjax.papers.kind.classes import kind_tasks
from kindjax.papers.kind.facts import ARCH_LEARNING_RATES, BATCH_SIZES, LEARNING_RATES, OFT_BLOCKS
from kindjax.papers.kind.transfer import as_kind_transfer
from kindjax.params import ADAPTER_PATHS as ADAPTERS
from kindjax.params import BIAS_PATHS as BIASES
from kindjax.params import LABEL_PATHS as LABELS


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
                                  oft_blocks=OFT_BLOCKS[int(task.removeprefix("task_")) - 1])


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
    """One transfer method as config settings.

    ``source``: the pre-trained model it starts from, ``"dense"`` (``init.pretrained``) or ``"kind"``
    (the KIND pre-training); ``lr``: its learning rate (Table 7's, :data:`LEARNING_RATES`);
    ``trainable``: ``train.trainable``; ``layers``: the linear layers it trains with — ``""`` the
    source's own (copied into dense layers), an adapter variant at the matched size, or ``"kind"``:
    KIND layers on the frozen learngene with fresh tailors (``init.learngene``), class-gated or not
    (``formulation``); ``init``: further ``config.init`` settings from the matched :class:`Sizes`;
    ``model``: further ``config.model`` settings from the model config (DiffFit's learned scales γ)."""

    name: str
    source: str
    lr: float
    trainable: tuple[str, ...]
    description: str
    layers: str = ""
    formulation: str = "gated"
    init: Callable[[Sizes], dict] | None = None
    model: Callable[[ml_collections.ConfigDict], dict] | None = None


def _method(name: str, source: str, trainable: tuple[str, ...], description: str, lr: float = 0.0,
            **settings) -> Method:
    """A :class:`Method` at Table 7's learning rate unless ``lr`` is given."""
    return Method(name, source, lr or LEARNING_RATES[name], trainable, description, **settings)


METHODS: dict[str, Method] = {m.name: m for m in [
    _method("full_ft", "dense", (".*",), "full fine-tuning of the dense DiT"),
    _method("lora", "dense", (ADAPTERS, LABELS), "LoRA: W + (α/r)·BA", layers="lora"),
    _method("dora", "dense", (ADAPTERS, LABELS), "DoRA: m·(W + sBA)/‖W + sBA‖", layers="dora"),
    _method("pissa", "dense", (ADAPTERS, LABELS), "PiSSA: LoRA on the principal singular components",
            layers="pissa"),
    _method("oft", "dense", (ADAPTERS, LABELS), "OFT: block-diagonal orthogonal R·W (Cayley)", layers="oft"),
    _method("loha", "dense", (ADAPTERS, LABELS), "LoHa: W + (W1a·W1b) ⊙ (W2a·W2b)", layers="loha"),
    _method("svdiff", "dense", (ADAPTERS, LABELS), "SVDiff: U·diag(ReLU(σ + δ))·Vᵀ, δ trained", layers="svdiff"),
    _method("bitfit", "dense", (BIASES, LABELS), "BitFit: biases"),
    # DiffFit's final setting (§4.5, Table 4c row 8): γ of its rows 2, 5, 6 in blocks 1→L/2 (14 of 28 for XL).
    _method("difffit", "dense", (BIASES, "/gamma_", LABELS),
            "DiffFit's final setting: biases, label embedding, γ (init 1) on the residual branches, q, k, v and "
            "the attention projection of the first half of the blocks, and on the final layer",
            model=lambda m: dict(residual_scales=True, attention_scales=True, output_scale=True,
                                 scale_blocks=max(resolve_dims(m).depth // 2, 1))),
    _method("difffit_residual", "dense", (BIASES, "/gamma_", LABELS),
            "DiffFit's Alg. 1 alone: biases, label embedding, γ (init 1) on every block's residual branches",
            LEARNING_RATES["difffit"], model=lambda m: dict(residual_scales=True)),
    _method("heur_lg", "dense", (".*",), "Heur-LG: inherit the blocks of least gradient change",
            init=lambda sizes: dict(select="heur_lg", num_blocks=sizes.num_blocks)),
    _method("auto_lg", "dense", (".*",), "Auto-LG: inherit the blocks whose features the task keeps",
            init=lambda sizes: dict(select="auto_lg", num_blocks=sizes.num_blocks)),
    _method("kind", "kind", (".*",), "KIND: frozen learngene, fresh tailors, class gate", layers="kind"),
    # Table 4's ablations, at KIND's learning rate.
    _method("ablation_1", "dense", (ADAPTERS, LABELS), "#1: N_G random SVD components + LoRA",
            LEARNING_RATES["kind"], layers="lora", init=lambda sizes: dict(svd_components=sizes.n_learngene)),
    _method("ablation_2", "kind", (ADAPTERS, LABELS), "#2: KIND learngene + LoRA", LEARNING_RATES["kind"],
            layers="lora"),
    _method("ablation_3", "kind", (".*",), "#3: KIND learngene + tailors, no class gate", LEARNING_RATES["kind"],
            layers="kind", formulation="ungated"),
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
    ``method`` (:class:`Method`), starting from ``pretrained`` (a dense DiT checkpoint) or ``learngene``
    (a KIND one).  On a DiT size of the paper (``model.arch``), Table 7's settings of that size apply
    too (:data:`BATCH_SIZES`, :data:`ARCH_LEARNING_RATES`)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    m = METHODS[method]
    c = config.copy_and_resolve_references()
    c.optim.lr = ARCH_LEARNING_RATES.get((method, c.model.arch), m.lr)
    if c.model.arch and method in BATCH_SIZES:
        c.train.batch_size = BATCH_SIZES[method]
    c.train.trainable = m.trainable
    source = learngene if m.source == "kind" else pretrained
    if m.layers == "kind":
        return as_kind_transfer(c, source, sizes.n_learngene, sizes.n_tailor, m.formulation)
    c.init.pretrained = source
    if m.layers:
        c.model.linear = adapter_linear(m.layers, sizes)
    if m.init is not None:
        c.init.update(m.init(sizes))
    if m.model is not None:
        c.model.update(m.model(c.model))
    return c
