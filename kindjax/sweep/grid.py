"""The sweep's grid: runs, experiments, shards, and the loop that trains, scores and tabulates.

An *experiment* (:class:`Experiment`) is data: a function from ``(config, workdir, options)`` to a
list of :class:`Run` (labels such as task/method/seed, a workdir, a config, the workdirs it needs
finished first), the evaluator that scores a finished run, and the tables it writes.  The loop
(:func:`sweep`) is the same for every experiment.

Shards: run ``i`` of the experiment's list belongs to shard ``i mod n`` (a deterministic partition).
Experiments list every prerequisite before the runs that need it (the pre-trainings first), so a shard
runs its prerequisites first and a shard whose next run needs another shard's unfinished run waits for
it, polling, with a message naming the run and its shard.  Each shard scores its runs as it finishes
them; the shard that finds every run of the grid finished and scored writes the tables
(``--tables_only`` rebuilds them from finished runs).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import ml_collections
from etils import epath

from kindjax.train.stages import check, finished, stage

Scores = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a grid.  ``labels``: what it is (e.g. task, method, seed; a
    prerequisite has ``role="prerequisite"`` and no table row); ``needs``: workdirs of runs that
    must be finished before it starts (its ``init`` checkpoints); ``extra``: what the experiment's
    scorer needs beyond the training config (e.g. the task's reference batch)."""

    labels: dict[str, Any]
    workdir: str
    config: ml_collections.ConfigDict
    needs: tuple[str, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def in_table(self) -> bool:
        return self.labels.get("role") != "prerequisite"

    def name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.labels.items())


@dataclasses.dataclass(frozen=True)
class Experiment:
    """``runs(config, workdir, options)``: the grid, prerequisites first; ``train_evaluate``: the
    evaluate hook of training (:func:`kindjax.train.stages.stage`), or None; ``score(run, metrics)``: the
    table metrics of a finished run (``metrics``: what its training stage reported), cached by the
    experiment; ``write_tables(runs, scores, workdir)``: the table layouts; ``prepare(run)``, or None:
    writes what an unfinished run starts from once the runs it needs are finished (e.g. a model
    assembled from a pre-training), called before each attempt, so it must skip what it already wrote;
    ``methods``: the names ``--methods`` may give; ``selects(config)``, or None: this is the experiment
    of a config when ``--experiment`` is not given."""

    name: str
    runs: Callable[[ml_collections.ConfigDict, str, dict], list[Run]]
    train_evaluate: Callable | None
    score: Callable[[Run, dict], Scores]
    write_tables: Callable[[list[Run], dict[str, Scores], str], Any]
    prepare: Callable[[Run], None] | None = None
    methods: tuple[str, ...] = ()
    selects: Callable[[ml_collections.ConfigDict], bool] | None = None


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 ≤ i < n``."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard={text!r}: write i/n, e.g. --shard=0/4 (shard i of n, 0 ≤ i < n)") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard={text!r}: need 0 ≤ i < n, e.g. --shard=0/{max(n, 1)}")
    return i, n


def shard_of(index: int, num_shards: int) -> int:
    """The shard that runs the ``index``-th run of a grid."""
    return index % num_shards


def shard_runs(runs: list[Run], shard: int, num_shards: int) -> list[Run]:
    """The runs of shard ``shard`` of ``num_shards`` (run ``i`` → shard ``i mod n``), in grid order."""
    return [r for i, r in enumerate(runs) if shard_of(i, num_shards) == shard]


def check_grid(runs: list[Run]) -> None:
    """Refuses a grid with two runs in one workdir, or a run that needs a workdir not listed before it."""
    seen: set[str] = set()
    for r in runs:
        if r.workdir in seen:
            raise ValueError(f"two runs of the grid share the workdir {r.workdir}")
        missing = [n for n in r.needs if n not in seen]
        if missing:
            raise ValueError(f"run {r.name()} needs {missing}, which the grid does not list before it")
        seen.add(r.workdir)


def is_finished(run: Run, by_workdir: dict[str, Run]) -> dict | None:
    """The training metrics of ``run`` if it finished (:func:`kindjax.train.stages.finished`), else None."""
    if any(is_finished(by_workdir[n], by_workdir) is None for n in run.needs):
        return None
    return finished(run.workdir, run.config)


def finished_runs(runs: list[Run]) -> dict[str, dict | None]:
    """``workdir → training metrics`` of every run of a grid (None: not finished, or a run it needs is
    not), each run's ``metrics.json`` read once (in grid order, so its needs are known before it)."""
    done: dict[str, dict | None] = {}
    for r in runs:
        done[r.workdir] = None if any(done[n] is None for n in r.needs) else finished(r.workdir, r.config)
    return done


def wall_time(run: Run) -> dict:
    """``{"wall_seconds": …}`` of a run the sweep trained (``wall.json``), or ``{}``."""
    path = epath.Path(run.workdir) / "wall.json"
    return json.loads(path.read_text()) if path.exists() else {}


def timed_stage(run: Run, train_evaluate: Callable | None,
                prepare: Callable[[Run], None] | None = None) -> dict | None:
    """:func:`kindjax.train.stages.stage` plus its wall time, kept in ``wall.json`` so reruns report it;
    ``prepare(run)`` (:attr:`Experiment.prepare`) first when the run is not finished."""
    path = epath.Path(run.workdir) / "wall.json"
    done = finished(run.workdir, run.config)
    if done is not None and path.exists():
        return {**done, **wall_time(run)}
    if done is None and prepare is not None:
        prepare(run)
    start = time.time()
    metrics = stage(run.config, run.workdir, train_evaluate)
    if metrics is None:
        return None
    wall = {"wall_seconds": time.time() - start}
    if jax.process_index() == 0:
        path.write_text(json.dumps(wall))
    return {**metrics, **wall}


def wait_for(run: Run, runs: list[Run], num_shards: int, poll_seconds: float,
             log: Callable[[str], None]) -> None:
    """Returns once every run that ``run`` needs is finished; polls every ``poll_seconds``."""
    by_workdir = {r.workdir: r for r in runs}
    index = {r.workdir: i for i, r in enumerate(runs)}
    while True:
        waiting = [n for n in run.needs if is_finished(by_workdir[n], by_workdir) is None]
        if not waiting:
            return
        log("waiting for " + "; ".join(f"{n} (shard {shard_of(index[n], num_shards)}/{num_shards} runs it)"
                                       for n in waiting) + f" before {run.name()}; checking every {poll_seconds:g} s")
        time.sleep(poll_seconds)


def sweep(experiment: Experiment, config: ml_collections.ConfigDict, workdir: str, options: dict | None = None,
          shard: tuple[int, int] = (0, 1), tables_only: bool = False, poll_seconds: float = 60.0,
          log: Callable[[str], None] = print) -> Any:
    """Trains and scores this shard's runs (skipping finished ones, resuming interrupted ones), then
    writes the tables if every run of the grid is finished.  Returns what ``write_tables`` returns, or
    None when a run was stopped (rerun to resume) or other shards' runs are not finished yet."""
    runs = experiment.runs(config, workdir, options or {})
    check_grid(runs)
    i, n = shard
    if not tables_only:
        mine = shard_runs(runs, i, n)
        done = finished_runs(runs)
        for r in mine:   # every config error before the first step (the data sources are opened again per run)
            if done[r.workdir] is None:
                check(r.config, starts=False)
        log(f"{experiment.name}: {len(runs)} runs in the grid, {len(mine)} on shard {i}/{n}")
        for k, run in enumerate(mine, 1):
            wait_for(run, runs, n, poll_seconds, log)
            log(f"[{k}/{len(mine)}] {run.name()}: {run.config.train.num_steps} steps → {run.workdir}")
            metrics = timed_stage(run, experiment.train_evaluate, experiment.prepare)
            if metrics is None:
                log("Stopped before the end; rerun the same command to resume.")
                return None
            if run.in_table:
                experiment.score(run, metrics)
    done = finished_runs(runs)
    pending = [r for r in runs if done[r.workdir] is None]
    if pending:
        log(f"{len(pending)} of {len(runs)} runs are not finished (e.g. {pending[0].workdir}); the shard that "
            f"finishes last writes the tables, or rerun with --tables_only once they are.")
        return None
    scores = {r.workdir: experiment.score(r, {**done[r.workdir], **wall_time(r)}) for r in runs if r.in_table}
    return experiment.write_tables([r for r in runs if r.in_table], scores, workdir)
