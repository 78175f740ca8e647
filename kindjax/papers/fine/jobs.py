"""FINE's job ``fine_init`` (``python -m kindjax.main`` with ``job="fine_init"``): a model of another
depth initialised from ``init.fine_learngene`` — the Σ-only stage ``WORKDIR/sigma`` when
``init.fine_sigma="trained"``, then normal training ``WORKDIR/train``, dense or factorized by
``init.materialize``.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from kindjax.config import ConfigError
from kindjax.evaluation.end_of_training import evaluation
from kindjax.io.paths import as_path, write_json
from kindjax.papers.fine.transfer import LimitedData
from kindjax.train.stages import check, check_workdir, stage


#: ``train.trainable`` of FINE's Σ-only stage: every layer's Σ, nothing else.
SIGMA_ONLY = ("/sigma$",)


def fine_init_configs(config: ml_collections.ConfigDict, workdir: str
                      ) -> tuple[ml_collections.ConfigDict | None, ml_collections.ConfigDict]:
    """The stages of ``job="fine_init"``: the Σ-only stage (``init.fine_sigma="trained"`` only; ``None``
    otherwise) and the normal training.  The Σ-only stage starts from ``init.sigma_start`` (random Σ,
    or the source's own per-layer Σ at the source's depth: ``"copy"``), trains only
    ``Σ`` (:data:`SIGMA_ONLY`) for ``init.sigma_steps`` at ``init.sigma_lr`` with no EMA lag (its
    last parameters are the next stage's start); the training stage starts from it with every
    leaf copied (``fine_sigma="copy"``), as a dense DiT when ``init.materialize``."""
    if config.model.linear.kind != "fine":
        raise ConfigError(f"job='fine_init' initialises a FINE model of another depth: set model.linear to the "
                          f"learngene's FINE settings (kind='fine'), got kind={config.model.linear.kind!r}")
    init = config.init
    sigma = None
    main = config.copy_and_resolve_references()
    main.job = "train"
    if init.fine_sigma == "trained":
        sigma = config.copy_and_resolve_references()
        sigma.job = "train"
        sigma.init.update(fine_sigma=init.sigma_start, materialize=False)   # factorized, whatever the next stage is
        sigma.train.update(num_steps=init.sigma_steps, trainable=SIGMA_ONLY, ema_decay=0.0,
                           checkpoint_every=min(config.train.checkpoint_every, init.sigma_steps),
                           sample_every=max(config.train.sample_every, init.sigma_steps))
        sigma.optim.update(lr=init.sigma_lr, warmup_steps=0)
        main.init.update(fine_learngene=os.path.join(workdir, "sigma"), fine_sigma="copy")
    if init.materialize:
        main.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    return sigma, main


def run_fine_init(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    sigma_dir, main_dir = os.path.join(workdir, "sigma"), os.path.join(workdir, "train")
    sigma_config, main_config = fine_init_configs(config, workdir)
    if sigma_config is not None:
        data = check(sigma_config)
        check_workdir(sigma_config, sigma_dir)
        limited = LimitedData(data, config.init.sigma_batches) if config.init.sigma_batches else data
        main_data = check(main_config, starts=False)
        check_workdir(main_config, main_dir)
        if stage(sigma_config, sigma_dir, lambda trainer, state: {}, limited) is None:
            print("Stopped before the end; rerun the same command to resume.", flush=True)
            return None
    else:
        main_data = check(main_config)
        check_workdir(main_config, main_dir)
    metrics = stage(main_config, main_dir, evaluation(main_config), main_data)
    if metrics is None:
        print("Stopped before the end; rerun the same command to resume.", flush=True)
        return None
    if jax.process_index() == 0:
        write_json(as_path(workdir) / "metrics.json", metrics)
    print(f"FINE initialisation ({config.init.fine_sigma} Σ) then training, {main_dir}:\n" +
          "\n".join(f"  {k:30s} {v}" for k, v in metrics.items()), flush=True)
    return metrics
