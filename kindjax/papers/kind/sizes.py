"""KIND Table 1: a model of a chosen size from one KIND pre-training, and the baselines at that size.

The library of ``python -m kindjax.sweep --experiment table1`` (:mod:`kindjax.papers.kind.experiments.table1`,
the one command that builds, trains and scores Table 1). The entries (each a config, a workdir and the
steps it still trains) come from the two pre-trainings' *configs* (:func:`table1_configs`, what the
sweep builds its grid with before the pre-trainings exist; :func:`table1_entries` reads the configs
from the runs' checkpoints), and :func:`build_entry` / :func:`build` write what each starts from once
the runs exist:

- ``trad_pt`` (0 extra steps): the dense pre-trained DiT itself, its label table cut to the ``k``
  classes' rows and the null row (:func:`build_trad_pt`; on those classes it computes what the full
  model computes), in the step-0 checkpoint of ``out/trad_pt``.
- ``kind`` (0 extra steps): the learngene plus the tailors of ``k`` classes, assembled
  (:func:`kindjax.checkpoints.learngene.assemble`) into the step-0 checkpoint of ``out/kind``. Its size is
  ``|G| + k·|T|`` (:func:`kind_size`: ``|G|`` the learngene's scalars, ``|T|`` one class's tailor
  scalars and label row), and ``k`` is **the most classes whose tailors fit in the chosen size**
  (:func:`classes_for_size`); the classes are the first ``k`` training classes (model labels
  ``0..k-1``) unless ``classes`` names them. The entry's size is that exact count (at most
  ``size``), and every baseline is matched to it.
- ``heur_lg``, ``auto_lg`` (``steps``, Table 1: 100K): a dense DiT of the source's width whose depth
  ``L'`` makes its size closest to the KIND entry's (:func:`depth_for_size`; **tolerance: half of one
  block's parameters**, the step a whole-block depth can take; refused beyond it). It inherits
  ``n = ⌊L'/2⌋`` blocks (half its depth, as Table 2's rule of :func:`kindjax.papers.kind.methods.matched_sizes`)
  of the dense pre-trained DiT, chosen on the full source by Heur-LG's gradient score or Auto-LG's
  CKA probe (:mod:`kindjax.transfer.layer_selection`), **stacked in their source order on top of**
  ``L' − n`` fresh blocks (Heur-LG's descendant model: inherited high layers over new low ones), and
  trains all parameters on the ``k`` classes at lr 1e-4. The build writes the inherited blocks at
  their new positions to ``out/<entry>_source``, the ``init.pretrained`` of the entry's config, with
  ``init.blocks`` their positions.
- ``laptop_diff`` (``steps``): a DiT of the same depth ``L'`` pruned from Trad. PT and distilled
  from it (:func:`laptop_diff_config`, the growth baselines' ``prune_distill_config``), so teacher
  and student share the ``k`` classes' labels; asking for it builds ``trad_pt`` too.

The 0-step entries have ``train.num_steps=0``: :func:`kindjax.train.stages.stage` records their written model
finished. Every entry serves the same ``k`` classes (``data.classes``), so all are evaluated against
the same reference batch (the sweep writes it: :func:`kindjax.evaluation.reference.write_reference_batch`
on the entry's config).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.archs import resolve_dims, with_depth
from kindjax.config import ConfigError, differences
from kindjax.checkpoints.learngene import assemble, load_learngene, load_params, load_tailors
from kindjax.papers.kind.facts import TABLE1_ENTRIES, TABLE1_STEPS
from kindjax.papers.kind.methods import METHODS
from kindjax.models.dit import abstract_params, build_model, init_params
from kindjax.io.paths import as_path
from kindjax.config import start_keys
from kindjax.papers.fine.growth import prune_distill_config
from kindjax.transfer.layer_selection import auto_lg_scores, heur_lg_scores
from kindjax.transfer.pretrained import init_from_pretrained

#: Table 1's rows, in its order.
ENTRIES = TABLE1_ENTRIES
#: The data settings that say which classes a label means; the KIND and dense runs must agree on them.
DATA_SELECTION = ("name", "root", "grouping", "task", "classes", "latents")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Table 1 model: ``config`` (its classes, its model), ``workdir`` (where it is trained or,
    for ``train_steps == 0``, already written by :func:`build`), and its stored ``params`` count."""

    name: str
    config: ml_collections.ConfigDict
    workdir: str
    train_steps: int
    params: int


# ----------------------------------------------------------------------------- sizes

def _count(config: ml_collections.ConfigDict) -> int:
    return _model_count(json.dumps(checkpoints.config_json(config)["model"], sort_keys=True))


@functools.lru_cache(maxsize=256)
def _model_count(model_json: str) -> int:
    """Stored parameters of the model config ``model_json`` (a trace of shapes; cached, as a grid of
    sizes asks for the same models again)."""
    return param_rules.count(abstract_params(build_model(ml_collections.ConfigDict(json.loads(model_json)))))


def _with(config: ml_collections.ConfigDict, **model: Any) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    c.model.update(model)
    return c


def kind_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(|G|, |T|)`` of a KIND config: a model assembled for ``k`` classes stores ``|G| + k·|T|``
    scalars (``|G|``: learngene leaves and the null label row; ``|T|``: one class's tailor rows and
    label row). From parameter shapes only."""
    if config.model.linear.kind != "kind":
        raise ConfigError(f"{config.model.linear.kind!r} model: Table 1's recombination needs a KIND one")
    one, two = _count(_with(config, num_classes=1)), _count(_with(config, num_classes=2))
    return 2 * one - two, two - one


def classes_for_size(config: ml_collections.ConfigDict, size: int) -> int:
    """The most classes ``k`` whose tailors fit with the learngene in ``size`` scalars:
    ``⌊(size − |G|)/|T|⌋``, refused outside ``1..model.num_classes``."""
    learngene, tailor = kind_size(config)
    n = config.model.num_classes
    k = (size - learngene) // tailor
    if not 1 <= k:
        raise ValueError(f"size {size:,} is below the smallest KIND model, the learngene and one class's "
                         f"tailors: {learngene + tailor:,} parameters")
    if k > n:
        raise ValueError(f"size {size:,} is above the full KIND model ({n} classes: {learngene + n * tailor:,} "
                         f"parameters); give at most that")
    return int(k)


def dense_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(a, b)`` of a dense config: at depth ``L`` it stores ``a + L·b`` scalars (``b``: one block)."""
    one, two = _count(_explicit_depth(config, 1)), _count(_explicit_depth(config, 2))
    return 2 * one - two, two - one


def depth_for_size(config: ml_collections.ConfigDict, size: int, max_depth: int) -> int:
    """The depth ``L' ≤ max_depth`` whose dense size is closest to ``size``; refused when even the
    closest misses by more than half a block (the tolerance of Table 1's matched sizes)."""
    a, b = dense_size(config)
    depth = int(min(max(round((size - a) / b), 1), max_depth))
    miss = a + depth * b - size
    if 2 * abs(miss) > b:
        raise ValueError(f"no dense DiT of depth 1..{max_depth} is within half a block ({b // 2:,} parameters) of "
                         f"{size:,}: the closest, depth {depth}, has {a + depth * b:,}. Choose a size between "
                         f"{a + b // 2:,} and {a + max_depth * b + b // 2:,}")
    return depth


# ----------------------------------------------------------------------------- entry configs

def _subset(config: ml_collections.ConfigDict, classes: Sequence[int]) -> ml_collections.ConfigDict:
    """``config`` on model classes ``classes`` of its data selection, relabelled ``0..k-1``."""
    c = copy.deepcopy(config)
    base = tuple(c.data.classes)
    c.data.classes = tuple(base[i] for i in classes) if base else tuple(int(i) for i in classes)
    c.model.num_classes = len(classes)
    c.init.update({start: "" for start in start_keys()}, blocks=(), select="", num_blocks=0, svd_components=0)
    c.job = "train"
    return c


def _untrained(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.train.num_steps = 0      # the step-0 checkpoint :func:`build` writes is the model
    return config


def kind_entry_config(pretrain: ml_collections.ConfigDict, classes: Sequence[int]) -> ml_collections.ConfigDict:
    """The recombined KIND model's config: the pre-training config on ``classes`` (its model labels),
    0 steps."""
    return _untrained(_subset(pretrain, classes))


def trad_pt_config(dense: ml_collections.ConfigDict, classes: Sequence[int]) -> ml_collections.ConfigDict:
    """Table 1's Trad. PT: the dense pre-trained DiT itself on ``classes``, 0 steps; its label table is
    cut to those classes' rows and the null row (:func:`build_trad_pt`)."""
    return _untrained(_subset(dense, classes))


def _explicit_depth(config: ml_collections.ConfigDict, depth: int) -> ml_collections.ConfigDict:
    return _with(config, **with_depth(config.model, depth))


def layer_transfer_config(dense: ml_collections.ConfigDict, classes: Sequence[int], depth: int,
                          num_blocks: int, method: str, source: str, steps: int) -> ml_collections.ConfigDict:
    """Heur-LG or Auto-LG at depth ``depth``: the dense pre-training config on ``classes``, the top
    ``num_blocks`` blocks inherited from ``source`` (written by :func:`build_layer_transfer`), all
    parameters trained ``steps`` steps at the method's learning rate (Table 7: 1e-4)."""
    if method not in ("heur_lg", "auto_lg"):
        raise ValueError(f"method={method!r}: a layer-transfer learngene is 'heur_lg' or 'auto_lg'")
    if not 1 <= num_blocks <= depth:
        raise ValueError(f"num_blocks={num_blocks} must be in 1..{depth} (the depth)")
    c = _explicit_depth(_subset(dense, classes), depth)
    c.optim.lr = METHODS[method].lr
    c.train.update(trainable=METHODS[method].trainable, freeze_learngene=False, num_steps=steps)
    c.init.update(pretrained=source, blocks=tuple(range(depth - num_blocks, depth)))
    return c


def laptop_diff_config(config: ml_collections.ConfigDict, source: str, depth: int,
                       source_model: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """Table 1's Laptop-Diff entry: ``config`` (the dense DiT on the entry's classes) pruned to ``depth``
    blocks of the run ``source`` and distilled from it (:func:`kindjax.papers.fine.growth.prune_distill_config`:
    evenly spaced blocks kept, output distillation). ``source`` is the Trad. PT entry (the dense
    pre-trained DiT cut to the entry's classes), so student and teacher share the classes' labels;
    ``source_model``: its model config, when it is not written yet."""
    return prune_distill_config(config, source, depth, source_model=source_model)


def _check_same_classes(kind: ml_collections.ConfigDict, dense: ml_collections.ConfigDict) -> None:
    def selection(config: ml_collections.ConfigDict) -> dict:
        return {"data": {k: config.data[k] for k in DATA_SELECTION}, "model": {"num_classes": config.model.num_classes}}

    diffs = differences(selection(kind), selection(dense), ("KIND ", "dense "))
    if diffs:
        raise ValueError("the KIND and the dense pre-training runs are on different classes, so a label would not "
                         "mean the same class in every entry: " + "; ".join(diffs))


def _model_classes(config: ml_collections.ConfigDict, size: int | None, classes: Sequence[int]) -> tuple[int, ...]:
    n = config.model.num_classes
    if classes:
        classes = tuple(int(c) for c in classes)
        if size is not None and len(classes) != classes_for_size(config, size):
            raise ValueError(f"classes names {len(classes)} classes but size {size:,} fits "
                             f"{classes_for_size(config, size)}: give one of them")
        bad = [c for c in classes if not 0 <= c < n]
        if bad or len(set(classes)) != len(classes):
            raise ValueError(f"classes {list(classes)}: give distinct model labels in 0..{n - 1}")
        return classes
    if size is None:
        raise ValueError("give a size (e.g. 94.4M) or the classes (the training classes to keep)")
    return tuple(range(classes_for_size(config, size)))


def table1_configs(kind_pre: ml_collections.ConfigDict, out: str, *,
                   dense_pre: ml_collections.ConfigDict | None = None, pretrained: str = "", size: int | None = None,
                   classes: Sequence[int] = (), steps: int = TABLE1_STEPS, num_blocks: int = 0,
                   entries: Sequence[str] = ("kind", "heur_lg", "auto_lg")) -> list[Entry]:
    """The Table 1 entries (module doc) of the KIND pre-training config ``kind_pre`` and the dense one
    ``dense_pre`` (needed by every entry but ``kind``; its run is at ``pretrained``), with workdirs
    under ``out``: ``kind`` first (every size is matched to it), then the others in :data:`ENTRIES`
    order. From the configs alone (a sweep builds them before the pre-trainings exist);
    :func:`build` writes what the entries start from."""
    unknown = sorted(set(entries) - set(ENTRIES))
    if unknown:
        raise ValueError(f"unknown entries {unknown}; choose from {list(ENTRIES)}")
    kept = _model_classes(kind_pre, size, classes)
    kind_config = kind_entry_config(kind_pre, kept)
    target = _count(kind_config)
    result = []
    if "kind" in entries:
        result.append(Entry("kind", kind_config, os.path.join(out, "kind"), 0, target))
    wanted = set(entries) | ({"trad_pt"} if "laptop_diff" in entries else set())   # Laptop-Diff's source
    baselines = [e for e in ENTRIES if e in wanted and e != "kind"]
    if not baselines:
        return result
    if dense_pre is None or not pretrained:
        raise ValueError(f"the entries {baselines} start from a dense pre-trained DiT: give --pretrained")
    if dense_pre.model.linear.kind != "dense":
        raise ValueError(f"--pretrained {pretrained} holds a {dense_pre.model.linear.kind!r} DiT; Trad. PT, "
                         f"Heur-LG, Auto-LG and Laptop-Diff start from a dense one (model.linear.kind='dense')")
    _check_same_classes(kind_pre, dense_pre)
    source_depth = resolve_dims(dense_pre.model).depth
    depth = depth_for_size(_subset(dense_pre, kept), target, source_depth)
    inherit = num_blocks or max(depth // 2, 1)
    trad_pt = trad_pt_config(dense_pre, kept)
    for name in baselines:
        workdir = os.path.join(out, name)
        if name == "trad_pt":
            result.append(Entry(name, trad_pt, workdir, 0, _count(trad_pt)))
            continue
        if name == "laptop_diff":
            config = laptop_diff_config(_subset(dense_pre, kept), os.path.join(out, "trad_pt"), depth, trad_pt.model)
            config.train.num_steps = steps
        else:
            config = layer_transfer_config(dense_pre, kept, depth, inherit, name,
                                           os.path.join(out, f"{name}_source"), steps)
        result.append(Entry(name, config, workdir, steps, _count(config)))
    return result


def table1_entries(learngene: str, out: str, *, pretrained: str = "", size: int | None = None,
                   classes: Sequence[int] = (), steps: int = TABLE1_STEPS, num_blocks: int = 0,
                   entries: Sequence[str] = ("kind", "heur_lg", "auto_lg")) -> list[Entry]:
    """:func:`table1_configs` of the KIND run ``learngene`` and the dense run ``pretrained``: their
    configs read from the checkpoints' metadata."""
    kind_pre = checkpoints.config_of(checkpoints.locate(learngene))
    dense_pre = checkpoints.config_of(checkpoints.locate(pretrained)) if pretrained else None
    return table1_configs(kind_pre, out, dense_pre=dense_pre, pretrained=pretrained, size=size, classes=classes,
                          steps=steps, num_blocks=num_blocks, entries=entries)


# ----------------------------------------------------------------------------- building

def _write_step(workdir: str, params: Any, config: ml_collections.ConfigDict, origin: dict) -> None:
    """``params`` as the step-0 training checkpoint of ``workdir`` (EMA = params, fresh optimizer
    state), read by ``python -m kindjax.evaluation`` and by training."""
    from kindjax.train.optimizer import make_optimizer

    if (epath.Path(workdir) / checkpoints.CHECKPOINTS).exists():
        raise FileExistsError(f"{workdir} already holds checkpoints; give another --workdir or remove it")
    params = jax.tree.map(jax.numpy.asarray, params)
    state = {"step": np.int32(0), "params": params, "ema_params": jax.tree.map(jax.numpy.copy, params),
             "opt_state": make_optimizer(config).init(params)}
    mngr = checkpoints.manager(os.path.join(workdir, checkpoints.CHECKPOINTS))
    checkpoints.save(mngr, state, config, origin)
    mngr.wait_until_finished()
    mngr.close()


def build_kind(entry: Entry, learngene: str) -> dict:
    """Writes the recombined KIND model of ``entry`` (learngene + the tailors of its classes, no training)
    to ``entry.workdir``; returns what it wrote."""
    classes = _kept(entry.config, checkpoints.config_of(checkpoints.locate(learngene)))
    assembled = assemble(load_learngene(learngene), load_tailors(learngene, classes))
    if checkpoints.config_json(assembled.config)["model"] != checkpoints.config_json(entry.config)["model"]:
        raise ValueError(f"the learngene at {learngene} is not the model of the entry's config")
    count = param_rules.count(assembled.params)
    if count != entry.params:
        raise AssertionError(f"assembled {count:,} parameters, the entry's shapes say {entry.params:,}")
    _write_step(entry.workdir, assembled.params, entry.config, {"learngene": learngene, "classes": list(classes)})
    return {"classes": list(classes), "params": count}


def _kept(config: ml_collections.ConfigDict, pretrain: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The pre-training model labels of an entry's ``data.classes``."""
    base = tuple(pretrain.data.classes)
    return tuple(base.index(c) for c in config.data.classes) if base else tuple(config.data.classes)


def cut_label_table(params: dict, classes: Sequence[int]) -> dict:
    """``params`` with the label table ``y_embedder/embedding`` (``num_classes + 1`` rows, the last the
    null class of guidance) cut to the rows ``classes`` in that order (model label ``j`` becomes
    pre-training label ``classes[j]``) and the null row."""
    table = np.asarray(params["y_embedder"]["embedding"])
    rows = np.asarray([*classes, table.shape[0] - 1])
    return {**params, "y_embedder": {**params["y_embedder"], "embedding": table[rows]}}


def build_trad_pt(entry: Entry, pretrained: str) -> dict:
    """Writes Trad. PT (the dense pre-trained DiT of ``pretrained``, no training) for ``entry``'s classes to
    ``entry.workdir``: the same parameters with the label table cut to the classes' rows and the null
    row (:func:`cut_label_table`), so on those classes it computes what the full model computes."""
    params, source_config = load_params(pretrained)
    classes = _kept(entry.config, source_config)
    cut = cut_label_table(params, classes)
    count = param_rules.count(cut)
    if count != entry.params:
        raise AssertionError(f"cut model has {count:,} parameters, the entry's shapes say {entry.params:,}")
    _write_step(entry.workdir, cut, entry.config, {"pretrained": pretrained, "classes": list(classes)})
    return {"classes": list(classes), "params": count}


def build_layer_transfer(entry: Entry, pretrained: str, key: jax.Array, probe_steps: int = 50) -> dict:
    """Chooses the blocks ``entry`` inherits on the full dense run ``pretrained`` (Heur-LG: gradient
    score on its pre-training data; Auto-LG: CKA after ``probe_steps`` steps on the entry's classes)
    and writes them, at their positions in the entry's shallower model, with the source's other shared
    leaves to ``entry.config.init.pretrained``; returns the scores and the mapping."""
    params, source_config = load_params(pretrained)
    source_depth = resolve_dims(source_config.model).depth
    blocks = tuple(entry.config.init.blocks)
    if entry.name == "heur_lg":
        scores = heur_lg_scores(params, source_config, key)
        order = np.argsort(scores, kind="stable")
    else:
        full = _explicit_depth(entry.config, source_depth)
        full.init.blocks = ()
        fresh = init_params(jax.random.fold_in(key, 1), build_model(full))
        scores = auto_lg_scores(init_from_pretrained(fresh, params, key, full), full, key, probe_steps)
        order = np.argsort(-scores, kind="stable")
    chosen = sorted(int(b) for b in order[:len(blocks)])
    derived = {name: leaf for name, leaf in params.items() if not name.startswith("block_")}
    derived.update({f"block_{position}": params[f"block_{b}"] for position, b in zip(blocks, chosen)})
    record = {"method": entry.name, "source": str(pretrained), "scores": np.round(scores, 6).tolist(),
              "source_blocks": chosen, "positions": list(blocks), "depth": resolve_dims(entry.config.model).depth}
    out = epath.Path(entry.config.init.pretrained).absolute()
    if out.exists():
        raise FileExistsError(f"{out} exists; give another --workdir or remove it")
    meta = {"step": 0, "config": checkpoints.config_json(entry.config), "origin": {}, "layer_transfer": record}
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(out, args=ocp.args.Composite(**{
        "params": ocp.args.PyTreeSave(derived), "ema_params": ocp.args.PyTreeSave(derived),
        checkpoints.META: ocp.args.JsonSave(meta)}))
    return record


def written(entry: Entry) -> bool:
    """Whether what ``entry`` starts from is written: the step-0 checkpoint of a 0-step entry, the
    inherited blocks of Heur-/Auto-LG; Laptop-Diff's start is another entry's (always True)."""
    if entry.name in ("kind", "trad_pt"):
        try:
            checkpoints.locate(entry.workdir)
        except FileNotFoundError:
            return False
        return True
    if entry.name in ("heur_lg", "auto_lg"):
        return epath.Path(entry.config.init.pretrained).exists()
    return True


def build_entry(entry: Entry, learngene: str, pretrained: str, key: jax.Array, probe_steps: int = 50) -> dict:
    """Writes what ``entry`` starts from: the KIND or Trad. PT model itself, Heur-/Auto-LG's inherited
    blocks (Laptop-Diff starts from Trad. PT by its config: nothing). Returns its record."""
    if entry.name == "kind":
        return build_kind(entry, learngene)
    if entry.name == "trad_pt":
        return build_trad_pt(entry, pretrained)
    if entry.name in ("heur_lg", "auto_lg"):
        return build_layer_transfer(entry, pretrained, key, probe_steps)
    return {}


def build(entries: Sequence[Entry], learngene: str, pretrained: str = "", seed: int = 0,
          probe_steps: int = 50) -> dict[str, dict]:
    """Writes what each entry starts from (:func:`build_entry`; entry ``i``'s key is ``seed`` folded
    with ``i``). Returns the records of the entries that start from something written."""
    records = {entry.name: build_entry(entry, learngene, pretrained, jax.random.fold_in(jax.random.key(seed), i),
                                       probe_steps) for i, entry in enumerate(entries)}
    return {name: record for name, record in records.items() if record}


def parse_size(text: str) -> int:
    """``"70.2M"``, ``"245900000"`` or ``"1.2e8"`` → scalars."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a parameter count: give one such as 70.2M or 70200000") from None
    return int(round(value))

