"""One orchestrator for grids of training runs: ``python -m kindjax.sweep`` (:mod:`kindjax.sweep.grid`:
runs, shards, resume; :mod:`kindjax.sweep.experiments`: ``digits`` and ``kind_tables``;
:mod:`kindjax.sweep.fine_depths`; :mod:`kindjax.sweep.domain_shift`: KIND Table 3; :mod:`kindjax.sweep.registry`:
the experiments by name; :mod:`kindjax.sweep.tables`: aggregation and the table files)."""
