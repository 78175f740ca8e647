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
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from kindjax import checkpoints
from kindjax.config import ConfigError, start_keys
from kindjax import params as param_rules
from kindjax.data import Batches, TrainingSource, make_dataset
from kindjax.data.pipeline import DeviceBatches, note_process_count
from kindjax.distributed import watch_gce_events
from kindjax.diffusion import GaussianDiffusion, denoising_loss, noisy_inputs
from kindjax.models.dit import DiT, build_model, drop_labels, init_params
from kindjax.io.paths import as_path, unwritable, write_bytes, write_json
from kindjax.diffusion.generate import SamplingProgress, SamplingStopped, generate
from kindjax.transfer import initial_params, load_teacher, starts_from_checkpoint
from kindjax import sharding
from kindjax.io.logs import RunLogger, image_grid, png_bytes, to_uint8
from kindjax.train.optimizer import learning_rate, make_optimizer

State = dict[str, Any]
#: The batch entry (one int32 per row) through which a process asks every process to stop: 0 no,
#: 1 SIGTERM, 2 SIGINT, 3 SIGHUP (:class:`Preemption`); the step returns its maximum (``metrics[STOP]``).
STOP = "stop"
#: The environment variable naming a file where a run stopped by a request (signal, preemption,
#: maintenance) notes that it saved and exited early: a launcher then starts it again.
STOP_FILE = "KINDJAX_STOP_FILE"
#: The workdir's directory of an interrupted evaluation's samples (removed once it finishes).
EVALUATION_PROGRESS = "evaluation_progress"


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


def train_step(state: State, batch: dict[str, jax.Array], teacher_params: Any = None, *, model: DiT,
               diffusion: GaussianDiffusion, optimizer: optax.GradientTransformation,
               config: ml_collections.ConfigDict, base_key: jax.Array,
               teacher_model: DiT | None = None,
               mesh: jax.sharding.Mesh | None = None) -> tuple[State, dict[str, jax.Array]]:
    """One AdamW step on the hybrid diffusion loss, restricted by the config's update rule
    (:func:`kindjax.params.update_rule`: frozen leaves, per-class rows); EMA update.

    ``teacher_params`` (of ``teacher_model``; ``train.distill``): the loss adds the output distillation
    term (:func:`kindjax.diffusion.denoising_loss`, ``metrics['distill']``); the teacher is only read.

    ``mesh``: the gradient is computed data parallel over it
    (:func:`kindjax.sharding.data_parallel_value_and_grad`), reduced in ``train.grad_reduce_dtype``, the
    leaves of :meth:`~kindjax.params.UpdateRule.labelled_rows` as ``train.class_row_reduce`` says; None: on one device.

    The update is applied only when the loss and the gradient norm are finite and it does not explode
    (``state' = where(finite ∧ ‖Δθ‖ ≤ r·‖θ‖, update(state), state)`` with ``r = train.max_update_ratio``,
    0: no limit; the step counter advances either way); ``metrics['finite']`` and
    ``metrics['update_ratio']`` (``‖Δθ‖/‖θ‖``, over all parameters) say which.  ``batch[STOP]`` (optional, one value per row): a process's
    stop request; ``metrics[STOP]`` is its maximum over the global batch, so every process learns
    of a request made on any of them in the same step.
    """
    key = jax.random.fold_in(base_key, state["step"])
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    x0 = batch["image"]
    y = drop_labels(k_drop, batch["label"], config.model.class_dropout, model.num_classes)
    xt, t, noise = noisy_inputs(k_t, k_noise, x0, diffusion)
    distill_weight = 0.0 if teacher_params is None else config.train.distill.weight

    def loss_fn(params, rows, teacher, drop_key):
        return denoising_loss(model, params, diffusion, **rows, teacher=None if teacher is None else
                              (teacher_model, teacher), distill_weight=distill_weight,
                              rngs=None if drop_key is None else {"dropout": drop_key})

    # The model's own randomness (drop path) only when it has some: the other streams stay as they were.
    drop_key = jax.random.fold_in(key, 3) if config.model.get("drop_path", 0.0) > 0 else None
    rows = {"x0": x0, "xt": xt, "t": t, "noise": noise, "y": y}
    rule = param_rules.update_rule(config)
    if mesh is None:
        value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    else:
        reduce_dtype = jnp.dtype(config.train.get("grad_reduce_dtype", "float32"))
        value_and_grad = sharding.data_parallel_value_and_grad(
            loss_fn, mesh, reduce_dtype, rule.labelled_rows(state["params"]), labels="y",
            class_row_reduce=config.train.get("class_row_reduce", "all_reduce"))
    (loss, losses), grads = value_and_grad(state["params"], rows, teacher_params, drop_key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = rule.restrict(optax.apply_updates(state["params"], updates), state["params"], y, model.num_classes)
    opt_state = rule.restrict(opt_state, state["opt_state"], y, model.num_classes)
    ema = optax.incremental_update(params, state["ema_params"], 1.0 - ema_decay(config, state["step"]))
    grad_norm = optax.tree.norm([g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                                 if rule.trainable(path)])
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    update_ratio = (optax.tree.norm(jax.tree.map(jnp.subtract, params, state["params"]))
                    / optax.tree.norm(state["params"]))
    applied = finite & (update_ratio <= config.train.max_update_ratio) if config.train.max_update_ratio > 0 else finite
    updated = jax.tree.map(lambda new, old: jnp.where(applied, new, old),
                           {"params": params, "ema_params": ema, "opt_state": opt_state},
                           {k: state[k] for k in ("params", "ema_params", "opt_state")})
    metrics = {"loss": loss, "mse": losses["mse"].mean(), "vb": losses["vb"].mean(), "grad_norm": grad_norm,
               "lr": learning_rate(config)(state["step"]), "finite": finite.astype(jnp.float32),
               "update_ratio": update_ratio}
    if teacher_params is not None:
        metrics["distill"] = losses["distill"].mean()
    if STOP in batch:
        metrics[STOP] = jnp.max(batch[STOP])
    return {"step": state["step"] + 1, **updated}, metrics


class Trainer:
    """Builds the model, mesh, optimizer, state (fresh or restored) and the jitted step."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 devices: Any = None, dataset: TrainingSource | None = None):
        self.config = config
        self.workdir = workdir
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices, config.mesh.dcn_data)
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
        distill = config.train.get("distill")   # absent from configs saved before train.distill existed
        teacher_model, teacher_params = load_teacher(config) if distill and distill.teacher else (None, None)
        teacher_sharding = sharding.state_shardings(self.mesh, teacher_params)   # None without a teacher
        #: The frozen teacher's params on the mesh (``train.distill``), or None: the step's third argument.
        self.teacher_params = jax.device_put(teacher_params, teacher_sharding)
        step = functools.partial(train_step, model=self.model, diffusion=self.diffusion,
                                 optimizer=self.optimizer, config=config, base_key=self.base_key,
                                 teacher_model=teacher_model, mesh=self.mesh)
        #: ``(state, batch, teacher_params) -> (state, metrics)``: :func:`train_step`, jitted and sharded.
        self.step = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding, teacher_sharding),
                            out_shardings=(self.state_sharding, sharding.replicated(self.mesh)), donate_argnums=0)
        #: Where an evaluation's sampling keeps what it drew, so a stop request interrupts it and a rerun
        #: resumes it (:class:`kindjax.diffusion.generate.SamplingProgress`); None outside the evaluation.
        self.progress: SamplingProgress | None = None

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The step's global batch as shapes on the mesh, as the loop gives it (:meth:`place` of the
        data, and :class:`Preemption`'s :data:`STOP` column): ``image`` ``(B, H, W, C)`` float32,
        ``label`` and :data:`STOP` ``(B,)`` int32."""
        m, b = self.model, self.config.train.batch_size
        rows = functools.partial(jax.ShapeDtypeStruct, sharding=self.batch_sharding)
        return {"image": rows((b, m.image_size, m.image_size, m.in_channels), jnp.float32),
                "label": rows((b,), jnp.int32), STOP: rows((b,), jnp.int32)}

    def step_fn(self, state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        """One train step (:attr:`step`) with this run's teacher, if any; ``state`` is donated."""
        return self.step(state, batch, self.teacher_params)

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
        """``(step, global batch on the mesh)`` from ``start_step`` on: this process's rows
        (:meth:`TrainingSource.batches`; the latents prepare them in threads) placed and finished
        ``data.device_prefetch`` steps ahead; prints a line when a resumed run has another process count.
        Close it when done."""
        note = note_process_count(self.workdir, jax.process_count(), write=jax.process_index() == 0)
        if note and jax.process_index() == 0:
            print(note, flush=True)
        host = self.dataset.batches(start_step, self.config.train.batch_size, self.config.data.seed,
                                    jax.process_index(), jax.process_count())
        return DeviceBatches(host, self.place, self.config.data.device_prefetch)

    def place(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows placed on the mesh as one global batch."""
        b = self.config.train.batch_size
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (b,) + v.shape[1:])
                for k, v in local.items()}

    def global_batch(self, step: int) -> dict[str, jax.Array]:
        """The step's batch, each process loading only its own rows, placed on the mesh."""
        return self.place(self.local_batch(step))

    def sample(self, params: Any, key: jax.Array, labels: np.ndarray) -> np.ndarray:
        """Images for ``labels`` from ``params`` with the config's sampler and guidance (resumable while
        :attr:`progress` is set: during the evaluation, :func:`train`)."""
        return generate(self.model, params, self.diffusion, key, labels, self.config.sample,
                        batch_size=self.config.eval.batch_size, mesh=self.mesh, progress=self.progress)


class Preemption:
    """Turns SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal or ssh session that started the run
    closed) into a request the loop sends through the step to every process (:data:`STOP`): all save
    the same step and exit cleanly.  A second Ctrl-C exits at once.  On a GCE VM a maintenance event
    that stops the VM, or a preemption notice, arrives as SIGTERM (:func:`kindjax.distributed.watch_gce_events`).

    In a job of several processes with JAX's preemption service (``jax.distributed``), SIGTERM is left
    to JAX's handler instead: :meth:`synced` asks ``reached_preemption_sync_point`` at every step,
    which answers True on every process at the same step, the one after the newest any had reached."""

    SIGNALS = {signal.SIGTERM: 1, signal.SIGINT: 2, signal.SIGHUP: 3}
    NAMES = {1: "SIGTERM", 2: "SIGINT (Ctrl-C)", 3: "SIGHUP (terminal or ssh session closed)",
             4: "a preemption notice (SIGTERM, through JAX's preemption sync)"}

    def __init__(self):
        self.requested = 0
        self._placed: dict[str, jax.Array] | None = None
        self._placed_for = -1
        self.jax_sync = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        handled = [s for s in self.SIGNALS if not (self.jax_sync and s == signal.SIGTERM)]
        self._previous = {s: signal.signal(s, self._handle) for s in handled}
        self._gce = watch_gce_events()

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.requested == 2:
            print("Second Ctrl-C: exiting now, without saving.", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = max(self.requested, self.SIGNALS[signum])

    def synced(self, step: int) -> int:
        """4 when JAX's preemption sync says every process saves at ``step`` (a SIGTERM reached one of
        them), else 0; call it at every step."""
        if self.jax_sync and multihost_utils.reached_preemption_sync_point(step):
            return 4
        return 0

    def placed(self, place: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
               local_rows: int) -> dict[str, jax.Array]:
        """``{STOP: this process's request}`` on the mesh, one value per row of its local batch;
        placed again only when the request changes, not at every step."""
        if self._placed is None or self._placed_for != self.requested:
            self._placed = place({STOP: np.full((local_rows,), self.requested, np.int32)})
            self._placed_for = self.requested
        return self._placed

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        if self._gce is not None:
            self._gce.set()


def note_stop(what: str) -> None:
    """Notes in :data:`STOP_FILE` (when set) that the run stopped early on a request, for a launcher
    that then starts it again (``launch/tpu_pod.sh``)."""
    if os.environ.get(STOP_FILE):
        with open(os.environ[STOP_FILE], "w") as f:
            f.write(what + "\n")


class NonFiniteLoss(ValueError):
    """Training produced a non-finite loss or gradient norm more often than ``train.max_nonfinite_steps``,
    or an update that explodes (``train.max_update_ratio``)."""


class Guard:
    """Reads each step's ``finite``, ``update_ratio`` and :data:`STOP` flags once (a scalar each, one
    step late so the devices stay busy), counts skipped non-finite steps against
    ``train.max_nonfinite_steps`` and stops at an exploding update (neither is applied to the state)."""

    def __init__(self, config: ml_collections.ConfigDict, mngr: Any, logger: RunLogger):
        self.config, self.mngr, self.logger = config, mngr, logger
        self.skipped = 0
        self.checked = 0
        self.stop = 0

    def check(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Reads the flags of step ``step`` (once); raises :class:`NonFiniteLoss` past the limit or at
        an exploding update."""
        if step <= self.checked:
            return
        self.checked = step
        finite, ratio, stop = jax.device_get((metrics["finite"], metrics["update_ratio"], metrics.get(STOP, 0)))
        self.stop = max(self.stop, int(stop))
        limit, most = self.config.train.max_nonfinite_steps, self.config.train.max_update_ratio
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if finite and not 0 < most < ratio:
            return
        if finite:
            what = (f"the update would move the parameters by {float(ratio):.3g}× their norm "
                    f"(train.max_update_ratio={most}; loss {loss:.4g}, gradient norm {grad_norm:.4g}); stopped "
                    f"without applying or saving it")
            fix = "lower optim.lr, or raise train.max_update_ratio if such steps are meant"
        else:
            self.skipped += 1
            if self.skipped <= limit:
                self.logger.text(f"Step {step}: loss {loss}, grad norm {grad_norm}: update skipped "
                                 f"({self.skipped} of train.max_nonfinite_steps={limit}).")
                return
            what = (f"the loss is {loss} and the gradient norm {grad_norm}; stopped without saving "
                    f"(non-finite steps: {self.skipped}, train.max_nonfinite_steps={limit})")
            fix = "lower optim.lr, check the data, or set train.max_nonfinite_steps to skip such steps"
        latest = self.mngr.latest_step()
        last = (f"the last finite checkpoint is step {latest} ({self.mngr.directory}/{latest}); rerunning resumes "
                f"from it" if latest is not None else "no checkpoint was saved yet")
        raise NonFiniteLoss(
            f"step {step}: {what}; {last}. Likely causes: a learning rate too high (optim.lr={self.config.optim.lr}) "
            f"or NaN/Inf in the data; {fix}.")


#: The :func:`origin` key of the distillation teacher: its config path (the other keys are ``init``'s).
TEACHER = "train.distill.teacher"


def origin(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, dict]:
    """What the run is made from: for each ``init`` path that is set (:func:`kindjax.config.start_keys`)
    and for the teacher ``train.distill.teacher`` when one is set (key :data:`TEACHER`; no key without
    one), the checkpoint, the step it resolves to now and a digest of its weights
    (:func:`kindjax.checkpoints.weights_digest`); refuses a path that holds no checkpoint.  With the run's ``workdir``, paths beside it are recorded relative (:func:`kindjax.checkpoints.portable`)."""
    distill = config.train.get("distill")   # absent from configs saved before train.distill existed
    paths = {**{key: config.init.get(key, "") for key in start_keys()}, TEACHER: distill.teacher if distill else ""}
    found = {}
    for key, path in paths.items():
        if path:
            try:
                located = checkpoints.locate(path)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"{key if key == TEACHER else 'init.' + key}={path!r}: {e}") from None
            found[key] = {"path": str(as_path(path)), "step": int(located.meta["step"])}
            digest = checkpoints.weights_digest(located.meta)
            if digest is not None:
                found[key]["weights"] = digest
    return found if workdir is None else checkpoints.portable(found, workdir)


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
    path = str(as_path(trainer.workdir) / "samples" / f"step_{step:07d}.png")
    png = png_bytes(grid)
    if jax.process_index() == 0:
        write_bytes(path, png)
    logger.image(step, "samples", grid, png)
    return path


def train(config: ml_collections.ConfigDict, workdir: str,
          evaluate: Callable[[Trainer, State], dict[str, float]] | None = None,
          dataset: TrainingSource | None = None) -> State:
    """Trains to ``config.train.num_steps`` (resuming from ``workdir`` if it holds a checkpoint).

    Saves every ``checkpoint_every`` steps, on SIGTERM, SIGINT or SIGHUP on any process
    (:class:`Preemption`), and at the end (never non-finite or exploded state: see :class:`Guard`; a damaged checkpoint is set aside and the newest
    good one resumed, :func:`kindjax.checkpoints.restore_verified`); logs every
    ``log_every`` steps; writes a sample grid every ``sample_every`` steps and at the
    end; then runs ``evaluate`` (if given; a stop request during it saves the samples drawn so far,
    :data:`EVALUATION_PROGRESS`, and the rerun resumes them) and writes the last step and its figures
    to ``metrics.json``.
    ``dataset``: the data source if the caller already opened it (else it is opened here).
    """
    tc = config.train
    start = origin(config, workdir)
    trainer = Trainer(config, workdir, dataset=dataset)
    directory = as_path(workdir) / checkpoints.CHECKPOINTS

    def say(message: str) -> None:
        if jax.process_index() == 0:
            print(message, flush=True)

    def check(meta: dict) -> None:
        checkpoints.check_same_model(meta["config"], config, workdir)
        checkpoints.check_same_origin(meta.get("origin"), start, workdir)

    def writable() -> None:
        problem = unwritable(workdir)
        if problem is not None:
            raise ConfigError(f"--workdir {workdir} is not writable ({problem}): give a workdir you can write to, "
                              f"or fix its permissions (or remount it read-write)")

    # The state first: a start that does not fit this model is refused before anything is written (a
    # new workdir is made only then; one that exists is checked first, as a damaged step may be moved).
    exists = as_path(workdir).exists()
    if exists:
        writable()
    mngr = checkpoints.manager(directory) if directory.is_dir() else None
    try:
        restored = None if mngr is None else checkpoints.restore_verified(mngr, trainer.abstract_state, check, say)
        if restored is not None:
            state = restored[0]
            say(f"Resumed from {workdir} at step {int(state['step'])}.")
        else:
            state = trainer.fresh_state()
            say(f"Fresh run in {workdir}: {param_rules.count(state['params'])/1e6:.3f}M parameters "
                f"({param_rules.count(state['params'], param_rules.update_rule(config).trainable)/1e6:.3f}M "
                f"trainable), mesh {dict(trainer.mesh.shape)}.")
        if not exists:
            writable()
    except BaseException:
        if mngr is not None:
            mngr.close()
        raise
    mngr = mngr or checkpoints.manager(directory)
    logger = RunLogger(workdir, tc.num_steps)
    step = int(state["step"])
    saving = step   # the step of the newest save started (saves are asynchronous)

    def write(action: Callable[[], None], written: int) -> None:
        """Runs a checkpoint write of step ``written``; a failure (full disk, lost mount) ends the run
        in one line naming that step, what failed and the newest complete checkpoint."""
        try:
            action()
        except checkpoints.CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            text = str(e)
            cause = text.split(" [os_error_code")[0].rsplit(": ", 1)[-1] if "[os_error_code" in text else \
                (text.splitlines() or [""])[0][:200]
            done = [s for s in mngr.all_steps() if s != written]
            left = f"the newest complete checkpoint is step {max(done)}" if done else "no checkpoint is complete yet"
            raise checkpoints.CheckpointError(
                f"writing step {written} to {mngr.directory} failed ({type(e).__name__}: {cause}); {left}. Free "
                f"disk space (or fix the directory) and rerun the same command to resume.") from e

    def save() -> None:
        nonlocal saving
        write(mngr.wait_until_finished, saving)   # the save in flight, whose failure surfaces here
        saving = step
        write(lambda: checkpoints.save(mngr, state, config, start, keep=tc.keep_checkpoints), step)

    preemption = Preemption()
    guard = Guard(config, mngr, logger)
    history: list[dict[str, jax.Array]] = []
    t_last, step_last = time.time(), step
    previous = None
    batches = trainer.local_batches(step)
    try:
        for _, batch in batches:
            if step >= tc.num_steps:
                break
            stop = preemption.placed(trainer.place, tc.batch_size // jax.process_count())
            state, metrics = trainer.step_fn(state, {**batch, **stop})
            step += 1
            guard.stop = max(guard.stop, preemption.synced(step))
            if previous is not None:
                guard.check(step - 1, previous)
            previous = metrics
            history.append(metrics)
            boundary = step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or step == tc.num_steps
            if boundary or guard.stop:
                guard.check(step, metrics)
            if step % tc.log_every == 0 or step == tc.num_steps:
                mean = {k: float(np.mean([float(m[k]) for m in history])) for k in history[0] if k != STOP}
                now = time.time()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                mean.update({"steps_per_sec": rate, "images_per_sec": rate * tc.batch_size})
                logger.scalars(step, mean)
                history, t_last, step_last = [], now, step
            if guard.stop:
                who = Preemption.NAMES[guard.stop] if preemption.requested or guard.stop == 4 else \
                    "a stop request from another process"
                logger.text(f"{who}: saving step {step} and exiting.")
                note_stop(f"{who}: saved step {step}")
                break
            if step % tc.checkpoint_every == 0:
                save()
            if step % tc.sample_every == 0 and step < tc.num_steps:
                sample_grid(trainer, state, step, logger)
        if mngr.latest_step() != step:
            save()
        write(lambda: checkpoints.rotate(mngr, tc.keep_checkpoints), saving)
        if guard.stop:
            return state
        path = sample_grid(trainer, state, step, logger)
        logger.text(f"Sample grid: {path}")
        results = {}
        progress = as_path(workdir) / EVALUATION_PROGRESS
        if evaluate is not None:
            ticks = iter(range(step + 1, 1 << 62))

            def stop_requested() -> bool:
                """A stop request on any process (one small collective), or JAX's preemption sync."""
                asked = preemption.requested
                if jax.process_count() > 1:
                    asked = int(np.max(multihost_utils.process_allgather(np.int32(asked))))
                return bool(asked or preemption.synced(next(ticks)))

            trainer.progress = SamplingProgress(str(progress / str(step)), "evaluation", stop_requested)
            try:
                results = evaluate(trainer, state)
            except SamplingStopped as e:
                logger.text(f"A stop request: the evaluation saved its samples so far in {progress} ({e}); "
                            f"rerun the same command to resume it.")
                note_stop(f"the evaluation of step {step}")
                return state
            finally:
                trainer.progress = None
            logger.scalars(step, {f"eval/{k}": v for k, v in results.items()}, console=False)
            logger.text("Evaluation: " + json.dumps(results))
        if jax.process_index() == 0:   # the run is complete (what kindjax.train.stages.finished reads)
            write_json(as_path(workdir) / "metrics.json", {"step": step, **results})
            if progress.exists():
                progress.rmtree()
    finally:
        batches.close()
        preemption.restore()
        logger.close()
        mngr.close()
    return state
