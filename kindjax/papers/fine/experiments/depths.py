"""The sweep's ``fine_depths`` experiment: FINE's Table 1 in miniature, on the digits.

From a FINE config on the digits (``configs/fine_miniature.py``) at depth ``L`` (``model.depth``):

1. prerequisites, ``train.num_steps`` steps each on the config's data: the FINE DiT (its ``fine_bases``
   are the learngene), a dense DiT (the source of Share, LiGO and prune), and a TLEG DiT
   (``kind="tleg"``: ``θ_l = θ_A + (l/L)·θ_B``, the source of the TLEG expansion);
2. for each target depth ``L'`` (``--depths``, default 1, 2, 3, 6, 8), each initialiser and each seed,
   a dense DiT of depth ``L'`` trained ``transfer.num_steps`` steps (the same budget for every
   initialiser) after its initialisation:

   - ``fine``: ``job="fine_init"`` (:func:`kindjax.papers.fine.jobs.fine_init_configs`): ``U``, ``V`` copied and
     frozen, fresh Σ per layer, the Σ-only stage (``init.sigma_steps``), then the dense DiT
     ``U·Σ·Vᵀ`` trains;
   - ``scratch`` (He), ``mimetic``, ``share``, ``tleg``, ``ligo`` (its coefficient run of
     :data:`LIGO_OPERATOR_STEPS` steps first), ``prune`` (``L' < L`` only; distilled from the dense source):
     :mod:`kindjax.papers.fine.growth`.

   The Σ-only stage and LiGO's coefficient run are steps the methods add before the common budget
   (as in their papers); their workdirs are prerequisites (``role="prerequisite"``), not table rows.

Scores: the chosen metrics of each run's EMA samples at the end of training (``eval.metrics``; by default
the digits evaluator's sample accuracy and Fréchet distance).
Tables: ``depths_<metric>.md`` (method × depth, mean ± std over seeds; by default ``depths_accuracy.md``
and ``depths_frechet.md``), ``depths.csv`` (every (depth, method) row) and ``depths.png`` (each metric
against depth).
"""
from __future__ import annotations

import jax
import ml_collections
from etils import epath

from kindjax.archs import with_depth
from kindjax.evaluation.end_of_training import evaluate_samples
from kindjax.evaluation.metrics import METRICS, metric_values
from kindjax.papers.fine.jobs import fine_init_configs
from kindjax.sweep import tables
from kindjax.sweep.grid import Experiment, Run, Scores
from kindjax.papers.fine.facts import GROWTH
from kindjax.papers.fine.growth import grow_config, prune_distill_config

#: The initialisers of a depth-``L'`` DiT the experiment compares.
INITIALISERS = ("fine", *GROWTH)
#: ``--depths`` when none are given: the issue's miniature.
DEFAULT_DEPTHS = (1, 2, 3, 6, 8)
#: Steps of LiGO's coefficient run (the LiGO paper's 100).
LIGO_OPERATOR_STEPS = 100


def _variant(config: ml_collections.ConfigDict, linear: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = config.copy_and_resolve_references()
    c.job = "train"
    c.model.linear = linear
    return c


def source_runs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Run]:
    """The FINE, dense and TLEG pre-trainings at the config's depth (same data, steps and optimiser)."""
    root = epath.Path(workdir) / "pretrain"
    configs = {"fine": _variant(config, config.model.linear),
               "dense": _variant(config, ml_collections.ConfigDict(dict(kind="dense"))),
               "tleg": _variant(config, ml_collections.ConfigDict(dict(kind="tleg")))}
    return {name: Run(dict(role="prerequisite", method=name), str(root / name), c) for name, c in configs.items()}


def target_runs(config: ml_collections.ConfigDict, sources: dict[str, Run], method: str, depth: int, seed: int,
                base: epath.Path) -> list[Run]:
    """The runs of one (method, depth, seed): the table's run last, after any run it needs."""
    c = config.copy_and_resolve_references()
    c.train.num_steps = c.transfer.num_steps
    c.train.seed = c.data.seed = seed
    c.train.checkpoint_every = min(c.train.checkpoint_every, c.train.num_steps)
    c.train.sample_every = c.train.num_steps
    labels = dict(task=f"L{depth}", method=method, seed=seed)
    if method == "fine":
        c.job = "fine_init"
        c.model.update(with_depth(c.model, depth))
        c.init.update(fine_learngene=sources["fine"].workdir, fine_sigma="trained")
        sigma, main = fine_init_configs(c, str(base))
        sigma_run = Run(dict(role="prerequisite", method="fine_sigma", depth=depth, seed=seed), str(base / "sigma"),
                        sigma, (sources["fine"].workdir,))
        return [sigma_run, Run(labels, str(base / "train"), main, (sigma_run.workdir,))]
    dense = sources["dense"]
    if method in ("scratch", "mimetic"):
        return [Run(labels, str(base), grow_config(c, method, "", depth))]
    if method == "prune":
        return [Run(labels, str(base), prune_distill_config(c, dense.workdir, depth, source_model=dense.config.model),
                    (dense.workdir,))]
    source = sources["tleg"] if method == "tleg" else dense
    if method != "ligo":
        return [Run(labels, str(base), grow_config(c, method, source.workdir, depth, source_model=source.config.model),
                    (source.workdir,))]
    operator = grow_config(c, "ligo", dense.workdir, depth, LIGO_OPERATOR_STEPS, source_model=dense.config.model)
    operator_run = Run(dict(role="prerequisite", method="ligo_operator", depth=depth, seed=seed),
                       str(base / "operator"), operator, (dense.workdir,))
    main = grow_config(c, "ligo", operator_run.workdir, depth, source_model=operator.model)
    return [operator_run, Run(labels, str(base / "train"), main, (operator_run.workdir,))]


def fine_depths_runs(config: ml_collections.ConfigDict, workdir: str, options: dict) -> list[Run]:
    """Sources, then depth × initialiser × seed (module doc)."""
    if config.model.linear.kind != "fine" or config.data.name != "digits":
        raise ValueError("the fine_depths experiment needs a FINE digits config (model.linear.kind='fine', "
                         "e.g. configs/fine_miniature.py)")
    depths = tuple(options.get("depths") or DEFAULT_DEPTHS)
    if any(d < 1 for d in depths):
        raise ValueError(f"--depths={list(depths)}: every depth must be ≥ 1")
    methods = tuple(options.get("methods") or INITIALISERS)
    unknown = sorted(set(methods) - set(INITIALISERS))
    if unknown:
        raise ValueError(f"unknown initialisers {unknown} for fine_depths; choose from {list(INITIALISERS)}")
    sources = source_runs(config, workdir)
    runs = list(sources.values())
    for depth in depths:
        for method in methods:
            if method == "prune" and depth >= config.model.depth:
                continue   # pruning only makes a DiT shallower than its source
            for seed in range(options.get("seeds", 3)):
                base = epath.Path(workdir) / f"depth_{depth}" / method / f"seed_{seed}"
                runs += target_runs(config, sources, method, depth, seed, base)
    return runs


def fine_depths_score(run: Run, metrics: dict) -> Scores:
    """The metrics of the run's training stage (by default the digits evaluator's) and its wall time."""
    return dict(**metric_values(metrics), wall_seconds=metrics.get("wall_seconds", 0.0))


def depth_table(rows: list[dict], metric: str, fmt: str) -> str:
    """Markdown: a row per method, a column per depth, ``mean ± std`` over seeds of ``metric``."""
    depths = sorted({r["task"] for r in rows}, key=lambda t: int(t[1:]))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cells = {(r["method"], r["task"]): tables.cell(r, metric, fmt) for r in rows}
    lines = ["| initialiser | " + " | ".join(depths) + " |", "|---|" + "---:|" * len(depths)]
    lines += [f"| {m} | " + " | ".join(cells.get((m, d), "—") for d in depths) + " |" for m in methods]
    return "\n".join(lines)


def plot_depths(rows: list[dict], names: tuple[str, ...], path: epath.Path) -> None:
    """Each metric of ``names`` against the target depth, a line per initialiser, std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: int(r["task"][1:]))
        x = [int(r["task"][1:]) for r in mine]
        for ax, key in zip(axes[0], names):
            ax.errorbar(x, [r[key] for r in mine], yerr=[r[key + "_std"] for r in mine], marker="o", capsize=3,
                        label=method)
    for ax, key in zip(axes[0], names):
        ax.set(xlabel="target depth L'", ylabel=METRICS[key].label)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Initialising DiTs of other depths from a depth-L pre-training (digits)")
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def fine_depths_tables(runs: list[Run], scores: dict[str, Scores], workdir: str) -> list[dict]:
    names = tables.scored_metrics(scores)
    rows = tables.per_task(runs, scores, names + ("wall_seconds",))
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        texts = {n: depth_table(rows, n, METRICS[n].fmt) for n in names}
        for n, text in texts.items():
            (root / f"depths_{METRICS[n].key}.md").write_text(text + "\n")
        (root / "depths.csv").write_text(tables.csv_text(rows))
        plot_depths(rows, names, root / "depths.png")
        print("\n\n".join(f"{METRICS[n].label}\n{text}" for n, text in texts.items()), flush=True)
        print(f"Wrote {workdir}/" + ", ".join(f"depths_{METRICS[n].key}.md" for n in names)
              + ", depths.csv and depths.png", flush=True)
    return rows


FINE_DEPTHS = Experiment("fine_depths", fine_depths_runs, evaluate_samples, fine_depths_score, fine_depths_tables,
                         methods=INITIALISERS,
                         selects=lambda c: c.data.name == "digits" and c.model.linear.kind == "fine")
