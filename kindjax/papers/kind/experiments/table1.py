"""The sweep's ``table1`` experiment: KIND Table 1, models of chosen sizes for the training classes.

From a KIND pre-training config (``configs/kind_dit_b.py`` / ``kind_dit_l.py`` with no task, or a KIND
digits config such as ``configs/kind_digits.py`` for a miniature):

1. the dense and the KIND pre-trainings (:func:`kindjax.papers.kind.experiments.pretraining.pretrain_runs`);
2. for each size of ``--sizes`` (default: the smallest KIND model, the learngene and one class's
   tailors) and each seed (``--seeds``, default 1), Table 1's entries in its row order
   (:func:`kindjax.papers.kind.sizes.table1_configs`, workdirs ``W/size_<S>/seed_<s>/<entry>``):

   - ``trad_pt``, 0 steps: the dense pre-trained DiT with its label table cut to the entry's ``k``
     classes and the null row (:func:`kindjax.papers.kind.sizes.build_trad_pt`);
   - ``heur_lg``, ``laptop_diff``, ``auto_lg``: dense DiTs within half a block of the KIND entry's
     size, trained ``--steps`` steps (Table 1: 100K) on the ``k`` classes; Laptop-Diff is pruned
     from Trad. PT and distilled from it, so it needs that run (a prerequisite when ``--methods``
     leaves ``trad_pt`` out);
   - ``kind``, 0 steps: the learngene plus the tailors of the ``k`` classes
     (:func:`kindjax.papers.kind.sizes.build_kind`).

   ``--methods`` picks a subset. What an entry starts from (the 0-step models, Heur-/Auto-LG's
   inherited blocks) is written by :func:`table1_prepare` once the pre-trainings are finished; a
   0-step entry is then recorded finished by :func:`kindjax.train.stages.stage`, so a rerun skips it.

Scores: the entries of one size serve the same ``k`` classes, so one reference batch of their real
images scores them all: ``eval.reference`` with ``{task}`` replaced by ``size_<S>``, or by default
``W/references/size_<S>.npz``, written from the classes' validation images (the digits: every digit
of the classes) when missing; the chosen metrics of ``python -m kindjax.evaluation``'s pipeline
(:func:`kindjax.sweep.common.pipeline_report`; by default ADM's). Tables: ``W/table1.md/.csv/.png`` in
Table 1's layout: per size, the rows Trad. PT, Heur-LG, Laptop-diff, Auto-LG, KIND with Para. (M) (the
entry's stored parameters), Time (extra training steps), and a column per metric (FID, sFID, IS,
Prec., Recall; mean ± std over seeds).
"""
from __future__ import annotations

import jax
import ml_collections
from etils import epath

from kindjax.sweep import tables
from kindjax.papers.kind.experiments.pretraining import pretrain_runs
from kindjax.evaluation.metrics import metric_values
from kindjax.sweep.common import check_reference_pattern, pipeline_report, reference_path
from kindjax.sweep.grid import Experiment, Run, Scores
from kindjax.papers.kind.sizes import (ENTRIES, TABLE1_STEPS, Entry, build_entry, kind_size, parse_size, table1_configs,
                                   written)

#: Table 1's row names.
NAMES = {"trad_pt": "Trad. PT", "heur_lg": "Heur-LG", "laptop_diff": "Laptop-diff", "auto_lg": "Auto-LG",
         "kind": "KIND"}
#: Auto-LG's fine-tuning steps before its CKA probe (:func:`kindjax.papers.kind.sizes.build_layer_transfer`).
PROBE_STEPS = 50
#: Table 1's columns before the metrics'.
COLUMNS = [("size", "Size", ""), ("entry", "Method", ""), ("para_m", "Para. (M)", ".1f"), ("time", "Time", "")]


def sizes(kind: ml_collections.ConfigDict, given: tuple[str, ...]) -> list[tuple[str, int]]:
    """``(label, parameter count)`` of each ``--sizes`` entry (``94.4M``); none: the smallest KIND model
    (learngene + one class's tailors), labelled by its exact count."""
    if given:
        try:
            return [(text, parse_size(text)) for text in given]
        except ValueError as e:
            raise ValueError(f"--sizes: {e}") from None
    learngene, tailor = kind_size(kind)
    return [(str(learngene + tailor), learngene + tailor)]


def steps_text(steps: int) -> str:
    """Table 1's Time column: ``0``, ``100K``, ``2``."""
    return f"{steps // 1000}K" if steps >= 1000 and steps % 1000 == 0 else str(steps)


def table1_runs(config: ml_collections.ConfigDict, workdir: str, options: dict) -> list[Run]:
    """The pre-trainings, then size × seed × entry (module doc)."""
    pretraining = config.data.name == "digits" or (config.data.grouping == "kind" and config.data.task == "pretrain")
    if config.model.linear.kind != "kind" or not pretraining:
        raise ValueError("the table1 experiment needs a KIND pre-training config (KIND layers; ImageNet: "
                         "data.grouping='kind', data.task='pretrain', e.g. configs/kind_dit_b.py with no task; "
                         "or a KIND digits config, e.g. configs/kind_digits.py)")
    methods = tuple(options.get("methods") or ENTRIES)
    unknown = sorted(set(methods) - set(ENTRIES))
    if unknown:
        raise ValueError(f"unknown entries {unknown} for table1; choose from {list(ENTRIES)}")
    steps = options.get("steps") or TABLE1_STEPS
    dense, kind = pretrain_runs(config, workdir)
    runs = [dense, kind]
    chosen = sizes(kind.config, tuple(options.get("sizes", ())))
    check_reference_pattern(config.eval.reference, workdir, "size", f"size_{chosen[0][0]}")
    for label, size in chosen:
        task = f"size_{label}"
        reference = reference_path(config.eval.reference, workdir, task)
        for seed in range(options.get("seeds", 1)):
            out = str(epath.Path(workdir) / task / f"seed_{seed}")
            try:
                entries = table1_configs(kind.config, out, dense_pre=dense.config, pretrained=dense.workdir, size=size,
                                         steps=steps, entries=methods)
            except ValueError as e:
                raise ValueError(f"--sizes {label}: {e}") from None
            by_name = {e.name: e for e in entries}
            for name in (n for n in ENTRIES if n in by_name):
                runs.append(entry_run(by_name[name], label, seed, config.eval.seed, name in methods,
                                      dict(reference=reference, params=by_name[name].params, learngene=kind.workdir,
                                           pretrained=dense.workdir, probe_steps=options.get("probe_steps", PROBE_STEPS)),
                                      kind.workdir, dense.workdir))
    return runs


def entry_run(entry: Entry, size: str, seed: int, eval_seed: int, in_table: bool, extra: dict, kind_dir: str,
              dense_dir: str) -> Run:
    """The run of one entry: ``seed`` sets its training and data seeds and shifts its sampling seed."""
    c = entry.config.copy_and_resolve_references()
    c.train.seed = c.data.seed = seed
    c.eval.update(seed=eval_seed + seed, reference="")   # the scorer sets the reference
    if entry.train_steps:
        c.train.update(checkpoint_every=min(c.train.checkpoint_every, entry.train_steps),
                       sample_every=entry.train_steps)
    needs = {"kind": (kind_dir,), "laptop_diff": (dense_dir, c.train.distill.teacher)}.get(entry.name, (dense_dir,))
    labels = dict(size=size, method=entry.name, seed=seed) if in_table else \
        dict(role="prerequisite", method=entry.name, size=size, seed=seed)
    return Run(labels, entry.workdir, c, needs, extra)


def table1_prepare(run: Run) -> None:
    """Writes what an entry starts from (:func:`kindjax.papers.kind.sizes.build_entry`) unless it is there
    (:func:`kindjax.papers.kind.sizes.written`; a resumed sweep calls this again)."""
    if "size" not in run.labels:   # the pre-trainings start from nothing
        return
    name = run.labels["method"]
    entry = Entry(name, run.config, run.workdir, run.config.train.num_steps, run.extra["params"])
    if not written(entry):
        key = jax.random.fold_in(jax.random.key(run.labels["seed"]), ENTRIES.index(name))
        build_entry(entry, run.extra["learngene"], run.extra["pretrained"], key, run.extra["probe_steps"])


def table1_score(run: Run, metrics: dict) -> Scores:
    """The evaluation pipeline's metrics of the entry against its size's reference (by default ADM's),
    its stored parameters and extra steps."""
    del metrics
    report = pipeline_report(run)
    return {**metric_values(report["metrics"]), "params": float(run.extra["params"]),
            "steps": float(run.config.train.num_steps)}


def table1_rows(runs: list[Run], scores: dict[str, Scores]) -> list[dict]:
    """Per (size, entry) in Table 1's order: mean ± std over seeds of the metrics."""
    rows, names = [], tables.scored_metrics(scores)
    for (size, name), members in tables.group(runs, scores, ("size", "method")).items():
        row = dict(size=size, method=name, entry=NAMES[name], seeds=len(members),
                   para_m=members[0][1]["params"] / 1e6, time=steps_text(int(members[0][1]["steps"])))
        for m in names:
            row[m], row[m + "_std"] = tables.mean_std([s[m] for _, s in members])
        rows.append(row)
    order = {name: i for i, name in enumerate(ENTRIES)}
    sizes_in_order = list(dict.fromkeys(r["size"] for r in rows))
    return sorted(rows, key=lambda r: (sizes_in_order.index(r["size"]), order[r["method"]]))


def table1_write(runs: list[Run], scores: dict[str, Scores], workdir: str) -> list[dict]:
    rows = table1_rows(runs, scores)
    columns = tables.metric_columns(tables.scored_metrics(scores))
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        text = tables.write(root / "table1", rows, COLUMNS + columns)
        plotted = [{**r, "method": f"{r['entry']} ({r['size']})"} for r in rows]
        tables.plot_against_parameters(plotted, "para_m", [(k, h) for k, h, _ in columns[:3]],
                                       root / "table1.png", "KIND Table 1 layout: models of chosen sizes")
        print(text, flush=True)
        print(f"Wrote {workdir}/table1.md/.csv/.png", flush=True)
    return rows


TABLE1 = Experiment("table1", table1_runs, None, table1_score, table1_write, table1_prepare, ENTRIES)
