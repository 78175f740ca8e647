"""A miniature of the papers' comparison tables, on the embedded digits, in one command.

``python -m kindjax.compare --config configs/kind_digits.py --workdir DIR`` runs:

1. pre-training on ``data.classes`` (digits 0–6) for ``train.num_steps`` steps, twice with
   the same budget: a dense DiT and the config's KIND DiT (class gate);
2. adaptation to the novel classes ``transfer.classes`` (7–9) for ``transfer.num_steps``
   steps with every method of :mod:`kindjax.methods` (each starting from the dense or the
   KIND pre-training), and two dense DiTs trained from scratch on the novel classes with
   adaLN-Zero and adaLN-Gaussian initialisation (same budget), each for ``--seeds`` seeds;
3. the digits evaluator's sample accuracy and Fréchet distance of each run, its trainable
   parameters and wall time, as mean ± std over seeds: ``DIR/table.md`` (Markdown),
   ``DIR/table.png`` (plot) and ``DIR/table.json``.

Every run is its own workdir under ``DIR``; a rerun skips finished runs and resumes an
interrupted one, so the command can be stopped and restarted.
"""
from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
from absl import flags

from kindjax import cli
from kindjax.accounting import parameter_counts
from kindjax.evaluation.digits_report import evaluate_digits
from kindjax.methods import METHODS, config_sizes, method_config
from kindjax.run import check, finished, stage
from kindjax.transfer.kind import novel_task

#: Runs that train a dense DiT from scratch on the novel classes (no transfer).
SCRATCH = {"scratch_adaln_zero": "zero", "scratch_adaln_gaussian": "gaussian"}


def pretrain_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The dense and the KIND pre-training configs (same data, steps and optimiser)."""
    kind = config.copy_and_resolve_references()
    kind.job = "train"
    kind.transfer.classes = ()
    dense = kind.copy_and_resolve_references()
    dense.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    return {"dense": dense, "kind": kind}


def novel_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The downstream task (:func:`kindjax.transfer.kind.novel_task`) on a dense DiT, seed ``seed``,
    checkpointed and sampled at its end."""
    c = novel_task(config, seed)
    c.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    c.train.checkpoint_every = min(c.train.checkpoint_every, c.train.num_steps)
    c.train.sample_every = c.train.num_steps
    return c


def run_configs(config: ml_collections.ConfigDict, workdir: str, seeds: int,
                methods: tuple[str, ...]) -> dict[str, list[tuple[str, ml_collections.ConfigDict]]]:
    """``name → [(workdir, config) per seed]`` of every adaptation run."""
    sources = {k: os.path.join(workdir, "pretrain", k) for k in ("dense", "kind")}
    runs: dict[str, list] = {}
    for name in list(methods) + list(SCRATCH):
        for seed in range(seeds):
            base = novel_config(config, seed)
            if name in SCRATCH:
                c = base
                c.model.adaln_init = SCRATCH[name]
            else:
                c = method_config(base, name, config_sizes(config, len(config.transfer.classes)), pretrained=sources["dense"],
                                  learngene=sources["kind"])
            runs.setdefault(name, []).append((os.path.join(workdir, "adapt", name, f"seed_{seed}"), c))
    return runs


def timed_stage(config: ml_collections.ConfigDict, workdir: str, dataset=None) -> dict | None:
    """:func:`kindjax.run.stage` plus its wall time (kept in ``wall.json`` so reruns report it)."""
    path = os.path.join(workdir, "wall.json")
    done = finished(workdir, config)
    if done is not None and os.path.exists(path):
        return {**done, **json.load(open(path))}
    start = time.time()
    metrics = stage(config, workdir, evaluate_digits, dataset)
    if metrics is None:
        return None
    wall = {"wall_seconds": time.time() - start}
    with open(path, "w") as f:
        json.dump(wall, f)
    return {**metrics, **wall}


def summarise(results: dict[str, list[dict]], trainable: dict[str, int]) -> list[dict]:
    rows = []
    for name, runs in results.items():
        acc = np.asarray([r["sample_accuracy"] for r in runs])
        fd = np.asarray([r["frechet_distance"] for r in runs])
        wall = np.asarray([r["wall_seconds"] for r in runs])
        rows.append(dict(method=name, accuracy=acc.mean(), accuracy_std=acc.std(), frechet=fd.mean(),
                         frechet_std=fd.std(), trainable=trainable[name], wall=wall.mean(), wall_std=wall.std(),
                         seeds=len(runs)))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | accuracy ↑ | Fréchet distance ↓ | trainable params | wall time (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | "
                     f"{r['frechet']:.1f} ± {r['frechet_std']:.1f} | {r['trainable']:,} | "
                     f"{r['wall']:.0f} ± {r['wall_std']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Fréchet distance against trainable parameters (log scale), error bars = std over seeds."""
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
    names = [r["method"] for r in rows]
    ax_acc.barh(names, [r["accuracy"] for r in rows], xerr=[r["accuracy_std"] for r in rows], capsize=3)
    ax_acc.set(xlabel="sample accuracy ↑", xlim=(0, 1), title="Class-conditional accuracy")
    ax_acc.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(config: ml_collections.ConfigDict, workdir: str, seeds: int = 3,
            methods: tuple[str, ...] = tuple(METHODS)) -> list[dict] | None:
    """Runs (or resumes) everything and writes the table; None if a run was preempted."""
    if config.model.linear.kind != "kind" or not config.transfer.classes:
        raise ValueError("kindjax.compare needs a KIND config with transfer.classes (e.g. configs/kind_digits.py)")
    pre = pretrain_configs(config)
    runs = run_configs(config, workdir, seeds, methods)
    data = {id(c): check(c, starts=False) for c in list(pre.values()) + [c for per_seed in runs.values() for _, c in per_seed]}
    total = len(pre) + sum(len(v) for v in runs.values())
    done = 0
    for name, c in pre.items():
        done += 1
        print(f"[{done}/{total}] pre-training {name}", flush=True)
        if timed_stage(c, os.path.join(workdir, "pretrain", name), data[id(c)]) is None:
            return None
    results: dict[str, list[dict]] = {}
    for name, per_seed in runs.items():
        for run_dir, c in per_seed:
            done += 1
            print(f"[{done}/{total}] {name} ({os.path.basename(run_dir)}): {c.train.num_steps} steps", flush=True)
            metrics = timed_stage(c, run_dir, data[id(c)])
            if metrics is None:
                return None
            results.setdefault(name, []).append(metrics)
    rows = summarise(results, {name: parameter_counts(per_seed[0][1])[0] for name, per_seed in runs.items()})
    table = markdown(rows)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(workdir, "table.png"))
    print(table, flush=True)
    print(f"Wrote {workdir}/table.md, table.png and table.json", flush=True)
    return rows


def main(argv: list[str]) -> None:
    """Runs the comparison of ``--methods`` (default: all) into ``--workdir``."""
    del argv
    FLAGS = flags.FLAGS
    methods = tuple(FLAGS.methods) or tuple(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    compare(FLAGS.config, FLAGS.workdir, FLAGS.seeds, methods)


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "A KIND config with transfer.classes (configs/kind_digits.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Output folder (one sub-folder per run, table.md/png/json).")
    flags.DEFINE_integer("seeds", 3, "Seeds per adaptation method.")
    flags.DEFINE_list("methods", [], "Methods to run (default: all of kindjax.methods).")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main, "compare")
