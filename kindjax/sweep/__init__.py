"""One orchestrator for grids of training runs: ``python -m kindjax.sweep`` (:mod:`kindjax.sweep.grid`:
runs, shards, resume; :mod:`kindjax.sweep.registry`: the experiments by name, which the packages that
define them register; :mod:`kindjax.sweep.common`: a task's reference batch and ADM report;
:mod:`kindjax.sweep.tables`: aggregation and the table files)."""
