"""What KIND adds to the core's registries (loaded through the ``kindjax.papers`` entry point):
the class-gated ``kind`` linear variant, its config keys, the ``init.learngene`` start, the
``kind_transfer`` job, the ``kind`` grouping of ImageNet's classes and the sweep's experiments
(``digits``, ``kind_tables``: Tables 2 and 8, ``table1``, ``domain_shift``: Table 3)."""
from __future__ import annotations

from kindjax.config import EXTENSIONS
from kindjax.data.class_groups import GROUPINGS
from kindjax.layers import register_variant
from kindjax.papers.kind import classes, config, jobs, layer, transfer
from kindjax.papers.kind.experiments.domain_shift import DOMAIN_SHIFT
from kindjax.papers.kind.experiments.table1 import TABLE1
from kindjax.papers.kind.experiments.tables import DIGITS, KIND_TABLES
from kindjax.sweep.registry import register_experiment
from kindjax.train.stages import JOBS
from kindjax.transfer import register_start

EXTENSIONS.register("kind", config.EXTENSION)
register_variant("kind", layer.kind_factory, class_gated=layer.is_class_gated, tailored=True)
register_start("learngene", lambda c: bool(c.init.learngene), transfer.learngene_init)
JOBS.register("kind_transfer", jobs.run_kind_transfer)
GROUPINGS.register("kind", classes.GROUPING)
for experiment in (DIGITS, KIND_TABLES, TABLE1, DOMAIN_SHIFT):
    register_experiment(experiment)
