"""The sweep's ``domain_shift`` experiment: KIND's Table 3 (transfer to image folders with a large
domain shift), from a KIND and a dense pre-training that are given, not trained here.

``python -m kindjax.sweep --config configs/kind_domain_shift.py[:,B|L][,classes=N] --workdir W
--config.data.root=/data/{task} --config.data.latents=/latents/{task} --config.init.learngene=KIND_RUN
--config.init.pretrained=DENSE_RUN [--tasks mri,pokemon] [--methods kind,lora] [--seeds N]``

- Grid: data set (``--tasks``, default :data:`TABLE3_DATASETS`) × method (``--methods``, default
  :data:`TABLE3_METHODS`, Table 3's rows; any of :data:`kindjax.papers.kind.methods.METHODS` runs) × seed, in
  ``W/<dataset>/<method>/seed_<s>``. Each config is the config file's
  ``get_config("<dataset>,<method>,<spec's B|L, classes=N>")`` with the command line's overrides applied
  (:func:`kindjax.papers.kind.experiments.tables.overrides`), ``{task}`` in ``data.root``, ``data.latents`` and
  ``eval.reference`` replaced by the data set, the command line's ``train.num_steps`` (default 50K), and the
  method refitted to the command line's model (:func:`kindjax.papers.kind.methods.method_config` at
  :func:`kindjax.papers.kind.methods.config_sizes`: KIND's ``N_G``, ``N_T`` and the baselines' matched ranks follow
  ``model.linear`` and the model's width, so a model shrunk on the command line stays consistent).
- Classes: one ``classes=N`` for every data set (the spec's; default 1, a folder without classes: one
  sub-folder holding every image). A data set with its own classes is a sweep of its own.
- Sources: ``init.learngene`` (a KIND run, e.g. a ``kind_tables`` sweep's ``W/pretrain/kind``) for
  ``kind`` and the other KIND-sourced methods, ``init.pretrained`` (a dense run, ``W/pretrain/dense``) for
  the baselines; a missing, empty or wrong one is refused before anything runs.
- Scores: :func:`kindjax.papers.kind.experiments.tables.kind_score` (the evaluation pipeline; reused when done against
  the same reference with as many samples): FDD (``eval.dinov2_weights``, required), FID, sFID, IS,
  precision, recall against the data set's real images, ``W/references/<dataset>.npz`` (written from the
  folder when missing) or ``eval.reference`` with ``{task}``.
- Tables: ``W/table3.md/.csv/.png`` (Table 3's layout for one architecture: a row per method in Table 3's
  order, a column per data set, FDD, mean ± std over seeds) and ``W/table3_<metric>.md/.csv`` for each
  other scored metric (by default ``table3_fid``, ``table3_sfid``, ``table3_inception_score``,
  ``table3_precision``, ``table3_recall``).
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
from etils import epath

from kindjax import checkpoints
from kindjax.config import ConfigError, differences
from kindjax.evaluation.metrics import METRICS
from kindjax.papers.kind.methods import METHODS, config_sizes, method_config
from kindjax.sweep import tables
from kindjax.sweep.common import reference_path
from kindjax.papers.kind.experiments.tables import config_file, kind_score, overrides, set_key
from kindjax.sweep.grid import Experiment, Run, Scores
from kindjax.train.trainer import origin
from kindjax.papers.kind.facts import TABLE3_DATASETS, TABLE3_METHODS, TABLE3_METRIC
from kindjax.papers.kind.transfer import SHAPE_KEYS, check_compatible

#: Every method ``--methods`` may give: Table 3's rows first (the tables' row order), then the others.
ROWS = TABLE3_METHODS + tuple(m for m in METHODS if m not in TABLE3_METHODS)
#: Settings in which ``{task}`` stands for the data set.
TASK_PATTERNS = ("data.root", "data.latents", "eval.reference")
#: ``init`` key of each source kind.
SOURCE_KEYS = {"kind": "learngene", "dense": "pretrained"}
#: The method whose config checks each source (:func:`check_source`).
PROBES = {"kind": "kind", "dense": "full_ft"}


def spec_tail(config_path: str) -> tuple[str, ...]:
    """The tokens of ``--config``'s spec after the data set (``B|L``, ``classes=N``); refuses a data set
    or a method in it (``--tasks`` and ``--methods`` name them)."""
    path, _, spec = config_path.partition(":")
    dataset, *tail = spec.split(",") if spec else [""]
    named = [t for t in tail if t.strip() in METHODS]
    if dataset.strip() or named:
        raise ValueError(f"--config={config_path}: the domain_shift sweep runs every data set of --tasks and "
                         f"method of --methods; keep only the architecture and classes in the spec, e.g. "
                         f"--config={path}:,L or {path}:,B,classes=4"
                         + (f" (and --tasks={dataset.strip()})" if dataset.strip() else "")
                         + (f" (and --methods={','.join(t.strip() for t in named)})" if named else ""))
    return tuple(t.strip() for t in tail)


def with_task(config: ml_collections.ConfigDict, dataset: str) -> None:
    """``{task}`` in :data:`TASK_PATTERNS` replaced by ``dataset`` (in place)."""
    for key in TASK_PATTERNS:
        section, leaf = key.split(".")
        config[section][leaf] = config[section][leaf].replace("{task}", dataset)


def check_patterns(config: ml_collections.ConfigDict, datasets: tuple[str, ...]) -> None:
    """Refuses an unset ``data.root`` and, for several data sets, a root, latents or reference without
    ``{task}`` (one folder or file would serve every data set)."""
    if not config.data.root:
        raise ConfigError("data.root is not set: give the data sets' image folders as a pattern, e.g. "
                          "--config.data.root=/data/{task} (each data set's real images are also its reference)")
    if len(datasets) < 2:
        return
    for key in TASK_PATTERNS:
        section, leaf = key.split(".")
        value = config[section][leaf]
        if value and "{task}" not in value:
            raise ConfigError(f"{key}={value!r} holds no {{task}} but the sweep runs {len(datasets)} data sets "
                              f"({', '.join(datasets)}): write it with {{task}} for the data set, e.g. "
                              f"--config.{key}={value.rstrip('/')}/{{task}}, or run one data set (--tasks)")


def check_source(config: ml_collections.ConfigDict, source: str) -> None:
    """Refuses, before anything runs, a missing start of ``config`` (:func:`kindjax.train.trainer.origin`),
    a learngene that is not a KIND run fitting the model (:func:`kindjax.papers.kind.transfer.check_compatible`),
    or an ``init.pretrained`` that is not a dense DiT of the model's shapes."""
    key = SOURCE_KEYS[source]
    path = config.init[key]
    origin(config)
    saved = checkpoints.config_of(checkpoints.locate(path)).model
    if source == "kind":
        try:
            check_compatible(saved, config.model)
        except ConfigError as e:
            raise ConfigError(f"init.learngene={path!r} (a KIND run, e.g. a kind_tables sweep's W/pretrain/kind): "
                              f"{e}") from None
        return
    if saved.linear.kind != "dense":
        raise ConfigError(f"init.pretrained={path!r} holds a {saved.linear.kind!r} DiT; the baselines start from a "
                          f"dense one (model.linear.kind='dense', e.g. a kind_tables sweep's W/pretrain/dense)")
    diffs = differences({k: saved[k] for k in SHAPE_KEYS}, {k: config.model[k] for k in SHAPE_KEYS},
                        ("pre-trained ", "config "), "model.")
    if diffs:
        raise ConfigError(f"init.pretrained={path!r} does not fit this model: " + "; ".join(diffs))


def domain_shift_runs(config: ml_collections.ConfigDict, workdir: str, options: dict) -> list[Run]:
    """Data set × method × seed (module doc); no prerequisite runs: the sources are given."""
    if config.data.name != "folder" or config.model.linear.kind != "kind":
        raise ValueError("the domain_shift experiment needs configs/kind_domain_shift.py (KIND layers on an image "
                         "folder), e.g. --config configs/kind_domain_shift.py:,B")
    if not options.get("config_file"):
        raise ValueError("the domain_shift experiment builds each run's config from the config file: give "
                         "options['config_file'] (the command line's --config)")
    datasets = tuple(options.get("tasks") or TABLE3_DATASETS)
    methods = tuple(options.get("methods") or TABLE3_METHODS)
    tail = spec_tail(options["config_file"])
    get_config = config_file(options["config_file"])
    check_patterns(config, datasets)
    if not config.eval.dinov2_weights:
        raise ConfigError("eval.dinov2_weights is not set: Table 3's metric is FDD (DINOv2 features); give "
                          "--config.eval.dinov2_weights=DINOV2_DIR (a Hugging Face DINOv2 ViT-L/14 directory)")
    if not config.eval.inception_weights or not epath.Path(config.eval.inception_weights).is_file():
        raise ConfigError(f"eval.inception_weights={config.eval.inception_weights!r} is not a file: the scores "
                          f"also give FID; give pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    sources = {"kind": config.init.learngene, "dense": config.init.pretrained}
    sizes = config_sizes(config, config.model.num_classes)
    changed = overrides(config, get_config(",".join(("", *tail))))

    def run_config(dataset: str, method: str, seed: int) -> ml_collections.ConfigDict:
        c = get_config(",".join((dataset, method, *tail)))
        for key, value in changed.items():
            set_key(c, key, value)
        with_task(c, dataset)
        lr = c.optim.lr   # the config file's (e.g. SVDiff's 3e-3 on DiT-L)
        c = method_config(c, method, sizes, pretrained=sources["dense"], learngene=sources["kind"])
        c.optim.lr = lr
        c.train.num_steps = config.train.num_steps
        c.train.seed = c.data.seed = seed
        c.eval.reference = ""   # the scorer sets it: the training run does not depend on it
        return c

    for source in dict.fromkeys(METHODS[m].source for m in methods):
        if not sources[source]:
            users = [m for m in methods if METHODS[m].source == source]
            raise ConfigError(f"init.{SOURCE_KEYS[source]} is not set: {', '.join(users)} start(s) from the {source} "
                              f"pre-training; give --config.init.{SOURCE_KEYS[source]}=RUN (e.g. a kind_tables "
                              f"sweep's W/pretrain/{source})")
        check_source(run_config(datasets[0], PROBES[source], 0), source)
    runs = []
    for dataset in datasets:
        reference = reference_path(config.eval.reference, workdir, dataset)
        for method in methods:
            for seed in range(options.get("seeds", 1)):
                runs.append(Run(dict(task=dataset, method=method, seed=seed),
                                str(epath.Path(workdir) / dataset / method / f"seed_{seed}"),
                                run_config(dataset, method, seed), extra=dict(reference=reference)))
    return runs


def table3_rows(runs: list[Run], scores: dict[str, Scores], metric: str) -> list[dict]:
    """One row per method (in :data:`ROWS` order): per data set ``metric``'s mean and std over seeds."""
    numeric = {w: {metric: s[metric]} for w, s in scores.items()}
    per_task = tables.per_task(runs, numeric, (metric,))
    rows = {}
    for r in per_task:
        row = rows.setdefault(r["method"], dict(method=r["method"], seeds=r["seeds"]))
        row[r["task"]], row[r["task"] + "_std"] = r[metric], r[metric + "_std"]
        row["seeds"] = min(row["seeds"], r["seeds"])
    return [rows[m] for m in ROWS if m in rows]


def plot_table3(rows: list[dict], datasets: list[str], metric: str, path: epath.Path) -> None:
    """``metric`` (Table 3's: FDD) per data set, a bar per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(datasets), 4.2))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(datasets))
    for i, r in enumerate(rows):
        ax.bar(x + i * width, [r.get(d, np.nan) for d in datasets], width,
               yerr=[r.get(d + "_std", 0.0) for d in datasets], capsize=2, label=r["method"])
    ax.set_xticks(x + 0.4 - width / 2, [TABLE3_DATASETS.get(d, d) for d in datasets])
    ax.set(ylabel=METRICS[metric].label, title="KIND Table 3 layout: large domain shift")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def table3_write(runs: list[Run], scores: dict[str, Scores], workdir: str) -> dict[str, list[dict]]:
    datasets = list(dict.fromkeys(r.labels["task"] for r in runs))
    names = tables.scored_metrics(scores)
    first = TABLE3_METRIC if TABLE3_METRIC in names else names[0]
    files = {"table3": first, **{f"table3_{n}": n for n in names if n != first}}
    out = {stem: table3_rows(runs, scores, n) for stem, n in files.items()}
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        texts = {stem: tables.write(root / stem, out[stem], [("method", "method", "")] + [
                     (d, f"{TABLE3_DATASETS.get(d, d)} {METRICS[n].label}", METRICS[n].fmt) for d in datasets])
                 for stem, n in files.items()}
        print(texts["table3"], flush=True)
        plot_table3(out["table3"], datasets, first, root / "table3.png")
        print(f"Wrote in {workdir}: table3.png and " + ", ".join(f"{stem}.md/.csv ({METRICS[n].header})"
                                                            for stem, n in files.items()), flush=True)
    return out


DOMAIN_SHIFT = Experiment("domain_shift", domain_shift_runs, None, kind_score, table3_write,
                          methods=ROWS,
                          selects=lambda c: c.data.name == "folder" and c.model.linear.kind == "kind")
