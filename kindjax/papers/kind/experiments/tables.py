"""The sweep's experiments (:class:`kindjax.sweep.grid.Experiment`): ``digits`` and ``kind_tables``
(others: ``fine_depths``, :mod:`kindjax.papers.fine.experiments.depths`; ``table1``, :mod:`kindjax.papers.kind.experiments.table1`;
``domain_shift``, :mod:`kindjax.papers.kind.experiments.domain_shift`, which reuses ``kind_tables``' task configs and scorer;
all by name: :mod:`kindjax.sweep.registry`).

``digits`` (a KIND digits config with ``transfer.classes``, e.g. ``configs/kind_digits.py``):
pre-train a dense DiT and the config's KIND DiT on ``data.classes`` (``train.num_steps``, same
budget), then on each task (default: the novel digits ``transfer.classes`` as one task ``novel``;
``--tasks=7+8,9``: one task per group) every method of :mod:`kindjax.papers.kind.methods` plus two dense DiTs
from scratch (adaLN-Zero, adaLN-Gaussian), ``transfer.num_steps`` steps, ``--seeds`` seeds.  Scores:
the chosen metrics of the EMA samples at the end of training (``eval.metrics``; by default the digits
evaluator's accuracy and Fréchet distance), trainable parameters, wall time.  Tables:
``table.md/.csv/.json/.png`` (per method: the mean over tasks, mean ± std over seeds; a column per
metric) and ``table_per_task.md/.csv``.

``kind_tables`` (a KIND ImageNet pre-training config, ``configs/kind_dit_b.py`` / ``kind_dit_l.py``):
pre-train the KIND DiT and a dense DiT on the training classes, then the 18 tasks of KIND Table 9 ×
methods × seeds (the config file's task configs, ``get_config("task_K,METHOD")``, with the
overrides given to the sweep's config file applied to each, the methods' sizes from the sweep config's
model, and ``transfer.num_steps`` steps: 50K).  Each
run is scored by ``python -m kindjax.evaluation``'s pipeline against its task's reference batch:
``eval.reference`` with ``{task}`` replaced by the task, or by default ``DIR/references/<task>.npz``,
which the sweep writes from the task's ImageNet **validation** images (every image, ADM centre crop)
when it is missing.  Tables: ``table2.md/.csv/.png`` (the KIND paper's Table 2 layout: Para.,
FLOPs and the chosen metrics of Inception features — by default FID, sFID, IS, precision, recall — of
each method's samples pooled over the tasks against the pooled references: the aggregation the paper's
numbers imply, see the README), ``table2_task_mean`` (the plain mean over tasks of every chosen metric,
reported beside it) and ``table8.md/.csv`` (per task × method).
"""
from __future__ import annotations

import json
from typing import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from kindjax.papers.kind.accounting import parameter_counts, table2_flops
from kindjax.archs import resolve_dims
from kindjax.papers.kind.classes import kind_tasks
from kindjax.evaluation.end_of_training import evaluate_samples
from kindjax.evaluation.metrics import METRICS, metric_values
from kindjax.papers.kind.methods import METHODS, Sizes, config_sizes, kind_task_sizes, method_config
from kindjax.sweep import tables
from kindjax.papers.kind.experiments.pretraining import dense, pretrain_runs
from kindjax.sweep.common import check_reference_pattern, pipeline_report, reference_path
from kindjax.sweep.grid import Experiment, Run, Scores
from kindjax.papers.kind.transfer import novel_task

#: Runs that train a dense DiT from scratch on the novel classes (no transfer).
SCRATCH = {"scratch_adaln_zero": "zero", "scratch_adaln_gaussian": "gaussian"}


# ----------------------------------------------------------------------------------------- digits

def digit_tasks(config: ml_collections.ConfigDict, tasks: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``--tasks`` (groups such as ``7+8+9``) → ``name → digits``; none: ``novel`` = ``transfer.classes``."""
    if not tasks:
        return {"novel": tuple(config.transfer.classes)}
    out = {}
    for t in tasks:
        try:
            digits = tuple(int(d) for d in t.split("+"))
        except ValueError:
            raise ValueError(f"--tasks: {t!r} is not a digit group; write digits joined by '+', e.g. "
                             f"--tasks=7+8,9") from None
        unknown = sorted(set(digits) - set(config.transfer.classes))
        if unknown:
            raise ValueError(f"--tasks: digits {unknown} of {t!r} are not novel classes (transfer.classes="
                             f"{tuple(config.transfer.classes)})")
        out[t] = digits
    return out


def digits_runs(config: ml_collections.ConfigDict, workdir: str, options: dict) -> list[Run]:
    """Pre-trainings, then task × (methods + scratch) × seed (module doc)."""
    if config.model.linear.kind != "kind" or not config.transfer.classes or config.data.name != "digits":
        raise ValueError("the digits experiment needs a KIND digits config with transfer.classes "
                         "(e.g. configs/kind_digits.py)")
    pre = pretrain_runs(config, workdir)
    sources = {r.labels["method"]: r.workdir for r in pre}
    runs = list(pre)
    task_classes = digit_tasks(config, tuple(options.get("tasks", ())))
    for task, classes in task_classes.items():
        for name in tuple(options.get("methods") or METHODS) + tuple(SCRATCH):
            for seed in range(options.get("seeds", 3)):
                base = config.copy_and_resolve_references()
                base.transfer.classes = classes
                base = dense(novel_task(base, seed))
                base.train.checkpoint_every = min(base.train.checkpoint_every, base.train.num_steps)
                base.train.sample_every = base.train.num_steps
                if name in SCRATCH:
                    c, needs = base, ()
                    c.model.adaln_init = SCRATCH[name]
                else:
                    c = method_config(base, name, config_sizes(config, len(classes)), pretrained=sources["dense"],
                                      learngene=sources["kind"])
                    needs = (sources[METHODS[name].source],)
                where = epath.Path(workdir).joinpath("adapt", *(() if list(task_classes) == ["novel"] else (task,)))
                runs.append(Run(dict(task=task, method=name, seed=seed), str(where.joinpath(name, f"seed_{seed}")), c,
                                needs))
    return runs


def digits_score(run: Run, metrics: dict) -> Scores:
    """The metrics of the run's training stage (:func:`kindjax.evaluation.end_of_training.evaluate_samples`:
    ``eval.metrics``, by default the digits classifier's sample accuracy and Fréchet distance), its
    trainable parameters and wall time."""
    return dict(**metric_values(metrics), wall_seconds=metrics.get("wall_seconds", 0.0),
                trainable=float(parameter_counts(run.config)[0]))


def digits_rows(runs: list[Run], scores: dict[str, Scores]) -> list[dict]:
    """Per method (mean over tasks; mean ± std over seeds), with the keys of ``table.json``: each metric
    under its short key (``accuracy``, ``frechet``)."""
    names = tables.scored_metrics(scores)
    rows = []
    for r in tables.task_mean(runs, scores, names + ("wall_seconds", "trainable")):
        row = dict(method=r["method"])
        for n in names:
            row[METRICS[n].key], row[METRICS[n].key + "_std"] = r[n], r[n + "_std"]
        rows.append(dict(**row, trainable=int(round(r["trainable"])), wall=r["wall_seconds"],
                         wall_std=r["wall_seconds_std"], seeds=r["seeds"], tasks=r["tasks"]))
    return rows


def digits_columns(names: tuple[str, ...]) -> list[tables.Column]:
    """The digits table's columns: method, each metric (by its short key), trainable parameters, wall time."""
    return [("method", "method", ""), *((METRICS[n].key, METRICS[n].label, METRICS[n].fmt) for n in names),
            ("trainable", "trainable params", ","), ("wall", "wall time (s)", ".0f")]


def digits_tables(runs: list[Run], scores: dict[str, Scores], workdir: str) -> list[dict]:
    rows = digits_rows(runs, scores)
    names = tables.scored_metrics(scores)
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        table = tables.markdown(rows, digits_columns(names))
        (root / "table.md").write_text(table + "\n")
        (root / "table.json").write_text(json.dumps(rows, indent=2))
        (root / "table.csv").write_text(tables.csv_text(rows))
        tables.plot_against_parameters(rows, "trainable", [(METRICS[n].key, METRICS[n].label) for n in names],
                                       root / "table.png", "Novel digits: quality vs. trainable parameters")
        tables.write(root / "table_per_task", tables.per_task(runs, scores, names + ("wall_seconds", "trainable")),
                     [("task", "task", ""), ("method", "method", ""), *tables.metric_columns(names)])
        print(table, flush=True)
        print(f"Wrote {workdir}/table.md, .csv, .png, .json and table_per_task.md, .csv", flush=True)
    return rows


DIGITS = Experiment("digits", digits_runs, evaluate_samples, digits_score, digits_tables, methods=tuple(METHODS),
                    selects=lambda c: c.data.name == "digits" and c.model.linear.kind != "fine")


# ------------------------------------------------------------------------------------ kind_tables

#: Keys a task config takes from its task and method, never from the sweep config's overrides.
TASK_KEYS = ("data.task", "model.num_classes", "train.num_steps", "optim.lr", "train.trainable",
             "train.freeze_learngene", "init", "model.residual_scales", "model.attention_scales",
             "model.output_scale", "model.scale_blocks", "transfer", "job")


def flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """``dotted key → value``; ``model.linear`` is one value (its keys depend on the variant)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict) and f"{prefix}{k}" != "model.linear":
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def overrides(config: ml_collections.ConfigDict, default: ml_collections.ConfigDict) -> dict:
    """The settings of ``config`` that differ from ``default`` (the command line's overrides), except
    :data:`TASK_KEYS` and ``model.linear``."""
    now, base = flat(config), flat(default)
    return {k: v for k, v in now.items() if k != "model.linear" and base.get(k, object()) != v
            and not any(k == t or k.startswith(t + ".") for t in TASK_KEYS)}


def set_key(config: ml_collections.ConfigDict, key: str, value) -> None:
    """``config.a.b.c = value`` for ``key = "a.b.c"``."""
    *sections, leaf = key.split(".")
    for section in sections:
        config = config[section]
    config[leaf] = value


def config_file(path: str) -> Callable[[str], ml_collections.ConfigDict]:
    """``get_config`` of the config file ``path`` (``configs/kind_dit_b.py``; a ``:spec`` tail is dropped)."""
    import importlib.util

    path = path.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("kindjax_sweep_config", path)
    if spec is None or not epath.Path(path).exists():
        raise ValueError(f"no config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


def task_sizes(config: ml_collections.ConfigDict, task: str) -> Sizes:
    """Table 7's sizes of ``task`` on the pre-training config's model: its ``N_G``, ``N_T``, width and depth."""
    dims = resolve_dims(config.model)
    return kind_task_sizes(task, config.model.linear.n_learngene, config.model.linear.n_tailor, dims.hidden_size,
                           dims.depth)[1]


def kind_task_config(config: ml_collections.ConfigDict, get_config: Callable[[str], ml_collections.ConfigDict],
                     task: str, method: str, seed: int, sources: dict[str, str]) -> ml_collections.ConfigDict:
    """Task ``task`` with ``method`` as the config file gives it (``get_config("task_K,method")``), with
    the sweep config's overrides of that file's pre-training config applied, the method's sizes
    (:func:`task_sizes`) from the sweep config's model (so a model resized on the command line gets
    a learngene and adapters that fit it), ``transfer.num_steps`` steps, seed ``seed``, started from
    ``sources``."""
    c = get_config(f"{task},{method}")
    for key, value in overrides(config, get_config("")).items():
        set_key(c, key, value)
    lr = c.optim.lr   # the config file's, which may differ from the method's default (SVDiff on DiT-L)
    c = method_config(c, method, task_sizes(config, task))
    c.optim.lr = lr
    c.train.num_steps = config.transfer.num_steps
    c.train.seed = c.data.seed = seed
    if METHODS[method].layers == "kind":
        c.init.learngene = sources[METHODS[method].source]
    else:
        c.init.pretrained = sources[METHODS[method].source]
    return c


def kind_tables_runs(config: ml_collections.ConfigDict, workdir: str, options: dict) -> list[Run]:
    """Pre-trainings, then the 18 tasks (or ``--tasks``) × methods × seeds (module doc)."""
    if config.data.grouping != "kind" or config.data.task != "pretrain" or config.model.linear.kind != "kind":
        raise ValueError("the kind_tables experiment needs a KIND ImageNet pre-training config (data.grouping='kind', "
                         "data.task='pretrain', KIND layers), e.g. configs/kind_dit_b.py with no task")
    names = tuple(options.get("tasks") or kind_tasks())
    unknown = [t for t in names if t not in kind_tasks()]
    if unknown:
        raise ValueError(f"--tasks: unknown KIND tasks {unknown}; use task_1..task_18 (KIND Table 9)")
    if not options.get("config_file"):
        raise ValueError("the kind_tables experiment builds each task's config from the config file: give "
                         "options['config_file'] (the command line's --config)")
    get_config = config_file(options["config_file"])
    check_reference_pattern(config.eval.reference, workdir, "task", names[0])
    pre = pretrain_runs(config, workdir)
    sources = {r.labels["method"]: r.workdir for r in pre}
    runs = list(pre)
    for task in names:
        reference = reference_path(config.eval.reference, workdir, task)
        for method in tuple(options.get("methods") or METHODS):
            for seed in range(options.get("seeds", 1)):
                c = kind_task_config(config, get_config, task, method, seed, sources)
                c.eval.reference = ""   # the scorer sets it: the training run does not depend on it
                need = sources[METHODS[method].source]
                runs.append(Run(dict(task=task, method=method, seed=seed),
                                str(epath.Path(workdir) / task / method / f"seed_{seed}"), c, (need,),
                                dict(reference=reference)))
    return runs


def kind_score(run: Run, metrics: dict) -> Scores:
    """The evaluation pipeline's metrics of the run against its task's reference
    (:func:`kindjax.sweep.common.pipeline_report`), its trainable parameters and KIND Table 2's FLOPs
    (forward GFLOP per image of the linear layers, :func:`kindjax.papers.kind.accounting.table2_flops`)."""
    del metrics   # the training stage of kind_tables reports nothing to tabulate
    report = pipeline_report(run)
    return {**report["metrics"], "trainable": float(parameter_counts(run.config)[0]),
            "gflops": table2_flops(run.config) / 1e9,
            "features": report["features"], "reference_features": report["reference_features"]}


#: Table 2's columns before the metrics'.
TABLE2 = [("method", "method", ""), ("para_m", "Para. (M)", ".1f"), ("gflops", "FLOPs (G)", ".1f")]


def pooled_rows(runs: list[Run], scores: dict[str, Scores], names: tuple[str, ...]) -> list[dict]:
    """Per method: the metrics ``names`` (of Inception features) of its samples pooled over the tasks
    (per seed; mean ± std over seeds), its mean trainable parameters and Table 2 GFLOPs over the tasks."""
    from kindjax.evaluation.pooled import load_features, pooled_metrics

    rows = []
    for (method,), members in tables.group(runs, scores, ("method",)).items():
        by_seed: dict[int, list[Scores]] = {}
        for r, s in members:
            by_seed.setdefault(r.labels["seed"], []).append(s)
        per_seed = [pooled_metrics([load_features(s["features"]) for s in ss],
                                   [load_features(s["reference_features"]) for s in ss], names)
                    for ss in by_seed.values()]
        row = dict(method=method, seeds=len(by_seed), tasks=len({r.labels["task"] for r, _ in members}),
                   para_m=float(np.mean([s["trainable"] for _, s in members])) / 1e6,
                   gflops=float(np.mean([s["gflops"] for _, s in members])))
        for key in names:
            row[key], row[key + "_std"] = tables.mean_std([m[key] for m in per_seed])
        rows.append(row)
    return rows


def kind_tables_write(runs: list[Run], scores: dict[str, Scores], workdir: str) -> dict[str, list[dict]]:
    from kindjax.evaluation.pooled import poolable

    names = tables.scored_metrics(scores)
    pooled_names = poolable(names)
    numeric = {w: {k: v for k, v in s.items() if isinstance(v, float)} for w, s in scores.items()}
    pooled = pooled_rows(runs, scores, pooled_names)
    mean = tables.task_mean(runs, numeric, names + ("trainable", "gflops"))
    for r in mean:
        r["para_m"] = r["trainable"] / 1e6
    per_task = tables.per_task(runs, numeric, names)
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        text = tables.write(root / "table2", pooled, TABLE2 + tables.metric_columns(pooled_names))
        tables.write(root / "table2_task_mean", mean, TABLE2 + tables.metric_columns(names))
        tables.write(root / "table8", per_task, [("task", "task", ""), ("method", "method", ""),
                                                 *tables.metric_columns(names)])
        tables.plot_against_parameters(pooled, "para_m", [(k, h) for k, h, _ in tables.metric_columns(pooled_names[:3])],
                                       root / "table2.png", "KIND Table 2 layout: samples pooled over the tasks")
        print(text, flush=True)
        print(f"Wrote {workdir}/table2.md/.csv/.png (pooled over the tasks), table2_task_mean.md/.csv (mean "
              f"over the tasks) and table8.md/.csv (per task)", flush=True)
    return dict(table2=pooled, table2_task_mean=mean, table8=per_task)


KIND_TABLES = Experiment("kind_tables", kind_tables_runs, None, kind_score, kind_tables_write,
                         methods=tuple(METHODS), selects=lambda c: c.data.grouping == "kind")
