"""What FINE adds to the core's registries (loaded through the ``kindjax.papers`` entry point): the
``fine`` linear variant (shared ``U``, ``V``, a ``Σ`` per layer) and its growth baselines' variants
(``tleg``, ``ligo``), its config keys, the starts ``init.fine_learngene``, ``init.grow`` and
``init.svd_rank`` ("w/o Factorize"), the ``fine_init`` job and the sweep's ``fine_depths`` experiment."""
from __future__ import annotations

from kindjax.config import EXTENSIONS
from kindjax.layers import register_variant
from kindjax.papers.fine import config, growth, jobs, layer, ligo, tleg, transfer
from kindjax.papers.fine.experiments.depths import FINE_DEPTHS
from kindjax.sweep.registry import register_experiment
from kindjax.train.stages import JOBS
from kindjax.transfer import register_start

EXTENSIONS.register("fine", config.EXTENSION)
register_variant("fine", layer.fine_factory)
register_variant("tleg", tleg.tleg_factory)
register_variant("ligo", ligo.ligo_factory)
register_start("fine_learngene", lambda c: bool(c.init.fine_learngene), transfer.init_from_config)
register_start("grow", lambda c: bool(c.init.grow), growth.grow_init, priority=1)
register_start("svd_rank", lambda c: bool(c.init.pretrained and c.init.svd_rank),
               lambda c, fresh, key: transfer.per_layer_svd_init(c, fresh), priority=1)
JOBS.register("fine_init", jobs.run_fine_init)
register_experiment(FINE_DEPTHS)
