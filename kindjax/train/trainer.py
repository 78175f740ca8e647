"""The trainer: one jitted, sharded train step and the resumable loop around it.

The train state is a plain dict ``{step, params, ema_params, opt_state}``.  A
step's batch and PRNG keys are pure functions of ``(seed, step)``, so a restored
step resumes the data and noise streams exactly where the killed run left them.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.data import Batches, TrainingSource, make_dataset
from kindjax.diffusion import GaussianDiffusion, denoising_loss, noisy_inputs
from kindjax.models.dit import DiT, build_model, drop_labels, init_params
from kindjax.sample import generate
from kindjax.transfer import initial_params, starts_from_checkpoint
from kindjax import sharding
from kindjax.logs import RunLogger, image_grid, png_bytes, to_uint8
from kindjax.train.optimizer import learning_rate, make_optimizer

State = dict[str, Any]


def state_from_params(params: Any, optimizer: optax.GradientTransformation) -> State:
    """Step 0: the parameters, their EMA (a copy) and fresh optimizer state."""
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "ema_params": jax.tree.map(jnp.copy, params), "opt_state": optimizer.init(params)}


def init_state(key: jax.Array, model: DiT, optimizer: optax.GradientTransformation) -> State:
    """Fresh parameters (EMA = a copy) and optimizer state at step 0."""
    return state_from_params(init_params(key, model), optimizer)


def ema_decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
    """EMA decay at ``step``: ``ema_decay``, or ``min(ema_decay, (1+t)/(10+t))`` with ``ema_warmup``."""
    decay = jnp.asarray(config.train.ema_decay, jnp.float32)
    if config.train.ema_warmup:
        t = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return decay


def train_step(state: State, batch: dict[str, jax.Array], *, model: DiT, diffusion: GaussianDiffusion,
               optimizer: optax.GradientTransformation, config: ml_collections.ConfigDict,
               base_key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One AdamW step on the hybrid diffusion loss, restricted by the config's update rule
    (:func:`kindjax.params.update_rule`: frozen leaves, per-class rows); EMA update."""
    key = jax.random.fold_in(base_key, state["step"])
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    x0 = batch["image"]
    y = drop_labels(k_drop, batch["label"], config.model.class_dropout, model.num_classes)
    xt, t, noise = noisy_inputs(k_t, k_noise, x0, diffusion)
    loss_fn = functools.partial(denoising_loss, model, diffusion=diffusion, x0=x0, xt=xt, t=t, noise=noise, y=y)
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    rule = param_rules.update_rule(config)
    params = rule.restrict(optax.apply_updates(state["params"], updates), state["params"], y, model.num_classes)
    opt_state = rule.restrict(opt_state, state["opt_state"], y, model.num_classes)
    ema = optax.incremental_update(params, state["ema_params"], 1.0 - ema_decay(config, state["step"]))
    grad_norm = optax.tree.norm([g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                                 if rule.trainable(path)])
    metrics = {"loss": loss, "mse": losses["mse"].mean(), "vb": losses["vb"].mean(), "grad_norm": grad_norm,
               "lr": learning_rate(config)(state["step"])}
    return {"step": state["step"] + 1, "params": params, "ema_params": ema, "opt_state": opt_state}, metrics


class Trainer:
    """Builds the model, mesh, optimizer, state (fresh or restored) and the jitted step."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 devices: Any = None, dataset: TrainingSource | None = None):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
        self.model = build_model(config)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        self.optimizer = make_optimizer(config)
        self.dataset: TrainingSource = make_dataset(config) if dataset is None else dataset
        self.base_key = jax.random.key(config.train.seed)
        init = functools.partial(init_state, model=self.model, optimizer=self.optimizer)
        abstract = jax.eval_shape(init, self.base_key)
        self.state_sharding = sharding.state_shardings(self.mesh, abstract)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_sharding)
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self._init = jax.jit(init, out_shardings=self.state_sharding)
        step = functools.partial(train_step, model=self.model, diffusion=self.diffusion,
                                 optimizer=self.optimizer, config=config, base_key=self.base_key)
        self.step_fn = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                               donate_argnums=0)

    def fresh_state(self) -> State:
        """Step 0: a random init, or the start ``config.init`` names (:func:`kindjax.transfer.initial_params`)."""
        key = jax.random.fold_in(self.base_key, 1 << 20)
        if not starts_from_checkpoint(self.config):
            return self._init(key)
        fresh = jax.jit(functools.partial(init_params, model=self.model))(key)
        params = initial_params(self.config, fresh, jax.random.fold_in(key, 1))
        build = functools.partial(state_from_params, optimizer=self.optimizer)
        return jax.jit(build, out_shardings=self.state_sharding)(params)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the step's batch (:meth:`TrainingSource.local_batch`)."""
        return self.dataset.local_batch(step, self.config.train.batch_size, self.config.data.seed,
                                        jax.process_index(), jax.process_count())

    def local_batches(self, start_step: int) -> Batches:
        """``(step, local batch)`` from ``start_step`` on (:meth:`TrainingSource.batches`: the latents
        prefetch them in a thread); close it when done."""
        return self.dataset.batches(start_step, self.config.train.batch_size, self.config.data.seed,
                                    jax.process_index(), jax.process_count())

    def place(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows placed on the mesh as one global batch."""
        b = self.config.train.batch_size
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (b,) + v.shape[1:])
                for k, v in local.items()}

    def global_batch(self, step: int) -> dict[str, jax.Array]:
        """The step's batch, each process loading only its own rows, placed on the mesh."""
        return self.place(self.local_batch(step))

    def sample(self, params: Any, key: jax.Array, labels: np.ndarray) -> np.ndarray:
        """Images for ``labels`` from ``params`` with the config's sampler and guidance."""
        return generate(self.model, params, self.diffusion, key, labels, self.config.sample,
                        batch_size=self.config.eval.batch_size, mesh=self.mesh)


class Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def sample_grid(trainer: Trainer, state: State, step: int, logger: RunLogger) -> str:
    """Writes ``WORKDIR/samples/step_<step>.png`` (EMA weights) and logs it: one row per class, then
    one row of null-class samples (label ``num_classes``, the unconditional model that guidance
    subtracts; no guidance applies to it), so what the model draws without a class is in the picture."""
    cfg = trainer.config
    per_class = cfg.sample.grid_per_class
    rows = trainer.model.num_classes + 1
    labels = np.repeat(np.arange(rows), per_class)
    images = trainer.sample(state["ema_params"], jax.random.fold_in(trainer.base_key, 2 << 20), labels)
    upscale = max(1, 64 // trainer.model.image_size)
    grid = image_grid(to_uint8(images)[..., :3], rows=rows, upscale=upscale, pad=max(1, upscale // 2))
    path = os.path.join(trainer.workdir, "samples", f"step_{step:07d}.png")
    png = png_bytes(grid)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(png)
    logger.image(step, "samples", grid, png)
    return path


def train(config: ml_collections.ConfigDict, workdir: str,
          evaluate: Callable[[Trainer, State], dict[str, float]] | None = None,
          dataset: TrainingSource | None = None) -> State:
    """Trains to ``config.train.num_steps`` (resuming from ``workdir`` if it holds a checkpoint).

    Saves every ``checkpoint_every`` steps, on SIGTERM, and at the end; logs every
    ``log_every`` steps; writes a sample grid every ``sample_every`` steps and at the
    end; then runs ``evaluate`` (if given) and writes its figures to ``metrics.json``.
    ``dataset``: the data source if the caller already opened it (else it is opened here).
    """
    tc = config.train
    trainer = Trainer(config, workdir, dataset=dataset)
    mngr = checkpoints.manager(os.path.join(workdir, checkpoints.CHECKPOINTS), keep=tc.keep_checkpoints)
    logger = RunLogger(workdir, tc.num_steps)
    if mngr.latest_step() is not None:
        checkpoints.check_same_model(checkpoints.read_meta(mngr)["config"], config, workdir)
        state = checkpoints.restore(mngr, trainer.abstract_state)
        logger.text(f"Resumed from {workdir} at step {int(state['step'])}.")
    else:
        state = trainer.fresh_state()
        logger.text(f"Fresh run in {workdir}: {param_rules.count(state['params'])/1e6:.3f}M parameters "
                    f"({param_rules.count(state['params'], param_rules.update_rule(config).trainable)/1e6:.3f}M trainable), "
                    f"mesh {dict(trainer.mesh.shape)}.")
    step = int(state["step"])
    preemption = Preemption()
    history: list[dict[str, jax.Array]] = []
    t_last, step_last = time.time(), step
    batches = trainer.local_batches(step)
    try:
        for _, local in batches:
            if step >= tc.num_steps:
                break
            state, metrics = trainer.step_fn(state, trainer.place(local))
            step += 1
            history.append(metrics)
            if step % tc.log_every == 0 or step == tc.num_steps:
                mean = {k: float(np.mean([float(m[k]) for m in history])) for k in history[0]}
                now = time.time()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                mean.update({"steps_per_sec": rate, "images_per_sec": rate * tc.batch_size})
                logger.scalars(step, mean)
                history, t_last, step_last = [], now, step
            if preemption.requested:
                logger.text(f"SIGTERM: saving step {step} and exiting.")
                break
            if step % tc.checkpoint_every == 0:
                checkpoints.save(mngr, state, config)
            if step % tc.sample_every == 0 and step < tc.num_steps:
                sample_grid(trainer, state, step, logger)
        if mngr.latest_step() != step:
            checkpoints.save(mngr, state, config)
        mngr.wait_until_finished()
        if preemption.requested:
            return state
        path = sample_grid(trainer, state, step, logger)
        logger.text(f"Sample grid: {path}")
        if evaluate is not None:
            results = evaluate(trainer, state)
            logger.scalars(step, {f"eval/{k}": v for k, v in results.items()}, console=False)
            logger.text("Evaluation: " + json.dumps(results))
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "metrics.json"), "w") as f:
                    json.dump({"step": step, **results}, f, indent=2)
    finally:
        batches.close()
        preemption.restore()
        logger.close()
        mngr.close()
    return state
