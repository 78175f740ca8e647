"""``python -m kindjax.sweep --config CONFIG --workdir DIR [--shard i/n] [--methods a,b] [--tasks ...]
[--seeds N] [--experiment NAME] [--sizes 94.4M,120M] [--steps N] [--tables_only]``: a grid of runs, each
in its own workdir under ``DIR`` (:mod:`kindjax.sweep.grid`).  A rerun skips finished runs and resumes an interrupted one.

- ``--experiment``: one of :data:`kindjax.sweep.registry.EXPERIMENTS` (the packages' experiments, each
  documented in its module); default: the one the config selects (:func:`kindjax.sweep.registry.experiment_for`).
  ``--tasks``, ``--depths``, ``--sizes`` and ``--steps`` are options of the experiments that take them.
- ``--shard i/n``: run ``k`` of the grid belongs to shard ``k mod n``; the pre-trainings come first
  (shards 0 and 1 run them) and a shard waits, polling every ``--poll_seconds``, for the runs it needs.
  The shard that finds every run finished writes the tables; ``--tables_only`` rebuilds them.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from kindjax import cli
from kindjax.distributed import initialize
from kindjax.sweep.registry import EXPERIMENTS, experiment_for
from kindjax.train.stages import use_compilation_cache
from kindjax.sweep.grid import parse_shard, sweep


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    methods = tuple(f.methods)
    shard = parse_shard(f.shard)
    experiment = experiment_for(f.config, f.experiment)
    allowed = experiment.methods
    unknown = sorted(set(methods) - set(allowed))
    if unknown:
        raise ValueError(f"unknown methods {unknown} for the {experiment.name} experiment; choose from {sorted(allowed)}")
    options = dict(methods=methods, tasks=tuple(f.tasks), depths=tuple(int(d) for d in f.depths),
                   sizes=tuple(f.sizes), config_file=config_flags.get_config_filename(f["config"]))
    if f.seeds:
        options["seeds"] = f.seeds
    if f.steps:
        options["steps"] = f.steps
    initialize()
    use_compilation_cache(f.config, f.workdir)   # one cache for every run of the sweep
    sweep(experiment, f.config, f.workdir, options, shard, f.tables_only, f.poll_seconds)


if __name__ == "__main__":
    cli.define_config("The experiment's config file (configs/*.py).")
    flags.DEFINE_string("workdir", None, "The sweep's folder (written): one run per sub-folder, and the tables.")
    flags.DEFINE_string("experiment", "", f"One of {sorted(EXPERIMENTS)} (default: the one the config selects).")
    flags.DEFINE_string("shard", "0/1", "i/n: run shard i of n (run k of the grid is in shard k mod n).")
    flags.DEFINE_list("methods", [], "Methods to run (default: all of the experiment's).")
    flags.DEFINE_list("tasks", [], "Tasks to run, in the experiment's names (default: all of them).")
    flags.DEFINE_list("depths", [], "Target depths, for an experiment over depths.")
    flags.DEFINE_list("sizes", [], "Model sizes such as 94.4M,120M, for an experiment over sizes.")
    flags.DEFINE_integer("steps", 0, "Training steps of the runs, for an experiment that takes them.")
    flags.DEFINE_integer("seeds", 0, "Seeds per run (default: the experiment's).")
    flags.DEFINE_boolean("tables_only", False, "Train nothing: score the finished runs and write the tables.")
    flags.DEFINE_float("poll_seconds", 60.0, "How often a shard checks whether the runs it needs are finished.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
