"""What ``python -m kindjax.main`` runs: validate the config, then train (and evaluate)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from kindjax.config import ConfigError, validate
from kindjax.models.dit import build_model
from kindjax.train.sharding import mesh_shape
from kindjax.train.trainer import train

#: Data sets with an evaluator that runs at the end of training.
EVALUATORS = {"digits": "kindjax.evaluation.digits_report:evaluate_digits"}


def check(config: ml_collections.ConfigDict) -> None:
    """Every check that needs no compilation: the schema, the mesh, and a shape-only
    trace of the model (which surfaces a linear variant's own errors, e.g. a rank that does not fit)."""
    num_devices = jax.device_count()
    try:
        mesh_shape(num_devices, config.mesh.data, config.mesh.fsdp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    validate(config, num_devices)
    model = build_model(config)
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.in_channels), jnp.float32)
    i = jax.ShapeDtypeStruct((1,), jnp.int32)
    jax.eval_shape(model.init, jax.random.key(0), x, i, i)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    check(config)
    target = EVALUATORS.get(config.data.name)
    evaluate = None
    if target:
        import importlib

        module, name = target.split(":")
        evaluate = getattr(importlib.import_module(module), name)
    train(config, workdir, evaluate=evaluate)
