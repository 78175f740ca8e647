"""``python -m kindjax.sweep --config CONFIG --workdir DIR [--shard i/n] [--methods a,b] [--tasks ...]
[--seeds N] [--experiment NAME] [--sizes 94.4M,120M] [--steps N] [--tables_only]``: a grid of runs, each
in its own workdir under ``DIR`` (:mod:`kindjax.sweep.grid`).  A rerun skips finished runs and resumes an interrupted one.

- ``--experiment``: ``digits``, ``kind_tables`` (:mod:`kindjax.sweep.experiments`), ``fine_depths``
  (:mod:`kindjax.sweep.fine_depths`, ``--depths``), ``table1`` (:mod:`kindjax.sweep.table1`, ``--sizes``,
  ``--steps``: KIND Table 1) or ``domain_shift`` (:mod:`kindjax.sweep.domain_shift`, KIND Table 3); default:
  from the config (:func:`kindjax.sweep.registry.experiment_for`: digits data → ``digits``, or
  ``fine_depths`` for a FINE model; ``data.grouping='kind'`` → ``kind_tables``; KIND on an image folder →
  ``domain_shift``).
- ``--shard i/n``: run ``k`` of the grid belongs to shard ``k mod n``; the pre-trainings come first
  (shards 0 and 1 run them) and a shard waits, polling every ``--poll_seconds``, for the runs it needs.
  The shard that finds every run finished writes the tables; ``--tables_only`` rebuilds them.
"""
from __future__ import annotations

from absl import flags

from kindjax import cli
from kindjax.distributed import initialize
from kindjax.methods import METHODS
from kindjax.sweep.registry import experiment_for
from kindjax.sweep.grid import parse_shard, sweep


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    methods = tuple(f.methods)
    shard = parse_shard(f.shard)
    experiment = experiment_for(f.config, f.experiment)
    allowed = experiment.methods or tuple(METHODS)
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
    sweep(experiment, f.config, f.workdir, options, shard, f.tables_only, f.poll_seconds)


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/kind_digits.py (digits) or configs/kind_dit_b.py / "
                                    "kind_dit_l.py (kind_tables).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output folder: one sub-folder per run, and the tables.")
    flags.DEFINE_string("experiment", "", "digits, kind_tables, fine_depths, table1 or domain_shift (default: "
                        "chosen from the config).")
    flags.DEFINE_string("shard", "0/1", "i/n: run shard i of n (run k of the grid is in shard k mod n).")
    flags.DEFINE_list("methods", [], "Methods (default: all of kindjax.methods; fine_depths: its initialisers).")
    flags.DEFINE_list("tasks", [], "kind_tables: task_1..task_18 (default: all); digits: digit groups such as "
                      "7+8+9 (default: transfer.classes as one task).")
    flags.DEFINE_list("depths", [], "fine_depths: target depths (default 1,2,3,6,8).")
    flags.DEFINE_list("sizes", [], "table1: model sizes such as 94.4M,120M (default: the smallest KIND model, "
                      "the learngene and one class's tailors).")
    flags.DEFINE_integer("steps", 0, "table1: training steps of the baselines (default 100000, Table 1's).")
    flags.DEFINE_integer("seeds", 0, "Seeds per run (default: digits 3, kind_tables and table1 1).")
    flags.DEFINE_boolean("tables_only", False, "Train nothing: score the finished runs and write the tables.")
    flags.DEFINE_float("poll_seconds", 60.0, "How often a shard checks whether the runs it needs are finished.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main, "sweep")
