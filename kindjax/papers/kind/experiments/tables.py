"""The sweep's experiments (:class:`kindjax.sweep.grid.Experiment`): ``digits`` and ``kind_tables``
(others: ``fine_depths``, :mod:`kindjax.papers.fine.experiments.depths`; ``table1``, :mod:`kindjax.papers.kind.experiments.table1`;
``domain_shift``, :mod:`kindjax.papers.kind.experiments.domain_shift`, which reuses ``kind_tables``' task configs and scorer;
all by name: :mod:`kindjax.sweep.registry`).

``digits`` (a KIND digits config with ``transfer.classes``, e.g. ``configs/kind_digits.py``):
pre-train a dense DiT and the config's KIND DiT on ``data.classes`` (``train.num_steps``, same
budget), then on each task (default: the novel digits ``transfer.classes`` as one task ``novel``;
``--tasks=7+8,9``: one task per group) every method of :mod:`kindjax.papers.kind.methods` plus two dense DiTs
from scratch (adaLN-Zero, adaLN-Gaussian), ``transfer.num_steps`` steps, ``--seeds`` seeds.  Scores:
the digits evaluator's accuracy and Fréchet distance of the EMA samples, trainable parameters, wall
time.  Tables: ``table.md/.csv/.json/.png`` (per method: the mean over tasks, mean ± std over seeds)
and ``table_per_task.md/.csv``.

``kind_tables`` (a KIND ImageNet pre-training config, ``configs/kind_dit_b.py`` / ``kind_dit_l.py``):
pre-train the KIND DiT and a dense DiT on the training classes, then the 18 tasks of KIND Table 9 ×
methods × seeds (the config file's task configs, ``get_config("task_K,METHOD")``, with the
overrides given to the sweep's config file applied to each, the methods' sizes from the sweep config's
model, and ``transfer.num_steps`` steps: 50K).  Each
run is scored by ``python -m kindjax.evaluation``'s pipeline against its task's reference batch:
``eval.reference`` with ``{task}`` replaced by the task, or by default ``DIR/references/<task>.npz``,
which the sweep writes from the task's ImageNet **validation** images (every image, ADM centre crop)
when it is missing.  Tables: ``table2.md/.csv/.png`` (the KIND paper's Table 2 layout: Para.,
FLOPs, FID, sFID, IS, precision, recall of each method's samples pooled over the tasks against the
pooled references — the aggregation the paper's numbers imply, see the README), ``table2_task_mean``
(the plain mean over tasks, reported beside it) and ``table8.md/.csv`` (per task × method).
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
from kindjax.evaluation.digits_report import evaluate_digits
from kindjax.papers.kind.methods import METHODS, Sizes, config_sizes, kind_task_sizes, method_config
from kindjax.sweep import tables
from kindjax.papers.kind.experiments.pretraining import dense, pretrain_runs
from kindjax.sweep.common import adm_report, check_reference_pattern, reference_path
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
    """The digits evaluator's figures of the run's training stage, its trainable parameters and wall time."""
    return dict(sample_accuracy=metrics["sample_accuracy"], frechet_distance=metrics["frechet_distance"],
                wall_seconds=metrics.get("wall_seconds", 0.0), trainable=float(parameter_counts(run.config)[0]))


DIGITS_METRICS = ("sample_accuracy", "frechet_distance", "wall_seconds", "trainable")


def digits_rows(runs: list[Run], scores: dict[str, Scores]) -> list[dict]:
    """Per method (mean over tasks; mean ± std over seeds), with the keys of ``table.json``."""
    rows = []
    for r in tables.task_mean(runs, scores, DIGITS_METRICS):
        rows.append(dict(method=r["method"], accuracy=r["sample_accuracy"], accuracy_std=r["sample_accuracy_std"],
                         frechet=r["frechet_distance"], frechet_std=r["frechet_distance_std"],
                         trainable=int(round(r["trainable"])), wall=r["wall_seconds"], wall_std=r["wall_seconds_std"],
                         seeds=r["seeds"], tasks=r["tasks"]))
    return rows


def digits_markdown(rows: list[dict]) -> str:
    lines = ["| method | accuracy ↑ | Fréchet distance ↓ | trainable params | wall time (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['frechet']:.1f} ± {r['frechet_std']:.1f} | {r['trainable']:,} | "
                     f"{r['wall']:.0f} ± {r['wall_std']:.0f} |")
    return "\n".join(lines)


def digits_plot(rows: list[dict], path: epath.Path) -> None:
    """Fréchet distance against trainable parameters (log scale), and accuracy; error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(13, 5))
    for r in rows:
        ax_fd.errorbar(r["trainable"], r["frechet"], yerr=r["frechet_std"], fmt="o", capsize=3)
        ax_fd.annotate(r["method"], (r["trainable"], r["frechet"]), fontsize=8, xytext=(4, 4),
                       textcoords="offset points")
    ax_fd.set(xscale="log", xlabel="trainable parameters", ylabel="Fréchet distance (digits evaluator) ↓",
              title="Novel digits: quality vs. trainable parameters")
    ax_acc.barh([r["method"] for r in rows], [r["accuracy"] for r in rows], xerr=[r["accuracy_std"] for r in rows],
                capsize=3)
    ax_acc.set(xlabel="sample accuracy ↑", xlim=(0, 1), title="Class-conditional accuracy")
    ax_acc.invert_yaxis()
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def digits_tables(runs: list[Run], scores: dict[str, Scores], workdir: str) -> list[dict]:
    rows = digits_rows(runs, scores)
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        table = digits_markdown(rows)
        (root / "table.md").write_text(table + "\n")
        (root / "table.json").write_text(json.dumps(rows, indent=2))
        (root / "table.csv").write_text(tables.csv_text(rows))
        digits_plot(rows, root / "table.png")
        tables.write(root / "table_per_task", tables.per_task(runs, scores, DIGITS_METRICS),
                     [("task", "task", ""), ("method", "method", ""), ("sample_accuracy", "accuracy ↑", ".3f"),
                      ("frechet_distance", "Fréchet distance ↓", ".1f")])
        print(table, flush=True)
        print(f"Wrote {workdir}/table.md, .csv, .png, .json and table_per_task.md, .csv", flush=True)
    return rows


DIGITS = Experiment("digits", digits_runs, evaluate_digits, digits_score, digits_tables, methods=tuple(METHODS),
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
    """ADM metrics of the run against its task's reference (:func:`kindjax.sweep.common.adm_report`),
    its trainable parameters and KIND Table 2's FLOPs (forward GFLOP per image of the linear layers,
    :func:`kindjax.papers.kind.accounting.table2_flops`)."""
    del metrics   # the training stage of kind_tables reports nothing to tabulate
    report = adm_report(run)
    return {**report["metrics"], "trainable": float(parameter_counts(run.config)[0]),
            "gflops": table2_flops(run.config) / 1e9,
            "features": report["features"], "reference_features": report["reference_features"]}


ADM = (("fid", "FID ↓", ".2f"), ("sfid", "sFID ↓", ".2f"), ("inception_score", "IS ↑", ".1f"),
       ("precision", "Prec. ↑", ".2f"), ("recall", "Recall ↑", ".2f"))
TABLE2 = [("method", "method", ""), ("para_m", "Para. (M)", ".1f"), ("gflops", "FLOPs (G)", ".1f"),
          *ADM]


def pooled_rows(runs: list[Run], scores: dict[str, Scores]) -> list[dict]:
    """Per method: ADM metrics of its samples pooled over the tasks (per seed; mean ± std over seeds),
    its mean trainable parameters and Table 2 GFLOPs over the tasks."""
    from kindjax.evaluation.pooled import load_features, pooled_metrics

    rows = []
    for (method,), members in tables.group(runs, scores, ("method",)).items():
        by_seed: dict[int, list[Scores]] = {}
        for r, s in members:
            by_seed.setdefault(r.labels["seed"], []).append(s)
        per_seed = [pooled_metrics([load_features(s["features"]) for s in ss],
                                   [load_features(s["reference_features"]) for s in ss]) for ss in by_seed.values()]
        row = dict(method=method, seeds=len(by_seed), tasks=len({r.labels["task"] for r, _ in members}),
                   para_m=float(np.mean([s["trainable"] for _, s in members])) / 1e6,
                   gflops=float(np.mean([s["gflops"] for _, s in members])))
        for key, _, _ in ADM:
            row[key], row[key + "_std"] = tables.mean_std([m[key] for m in per_seed])
        rows.append(row)
    return rows


def kind_tables_write(runs: list[Run], scores: dict[str, Scores], workdir: str) -> dict[str, list[dict]]:
    numeric = {w: {k: v for k, v in s.items() if isinstance(v, float)} for w, s in scores.items()}
    metrics = [k for k, _, _ in ADM] + ["trainable", "gflops"]
    pooled = pooled_rows(runs, scores)
    mean = tables.task_mean(runs, numeric, metrics)
    for r in mean:
        r["para_m"] = r["trainable"] / 1e6
    per_task = tables.per_task(runs, numeric, metrics)
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        text = tables.write(root / "table2", pooled, TABLE2)
        tables.write(root / "table2_task_mean", mean, TABLE2)
        tables.write(root / "table8", per_task, [("task", "task", ""), ("method", "method", ""), *ADM])
        tables.plot_against_parameters(pooled, "para_m", [(k, h) for k, h, _ in ADM[:3]], root / "table2.png",
                                       "KIND Table 2 layout: samples pooled over the tasks")
        print(text, flush=True)
        print(f"Wrote {workdir}/table2.md/.csv/.png (pooled over the tasks), table2_task_mean.md/.csv (mean "
              f"over the tasks) and table8.md/.csv (per task)", flush=True)
    return dict(table2=pooled, table2_task_mean=mean, table8=per_task)


KIND_TABLES = Experiment("kind_tables", kind_tables_runs, None, kind_score, kind_tables_write,
                         methods=tuple(METHODS), selects=lambda c: c.data.grouping == "kind")
