"""Which DiT blocks a layer-transfer learngene inherits: Heur-LG and Auto-LG.

Both are learngene baselines that transfer whole layers of a model pre-trained the
usual way, re-initialise the others, and train everything (``init.pretrained`` with
``init.select``).  They differ in how the ``k = init.num_blocks`` blocks are chosen:

- **Heur-LG** (Wang et al., 2022) inherits the layers whose gradients change least
  during training.  Measured here at the end of pre-training, on batches of the
  pre-training data: ``score_l = mean_batches ‖∇θ_l L‖ / ‖θ_l‖`` (the relative size of
  the step the loss still asks of block ``l``); the ``k`` smallest are inherited.
- **Auto-LG** (Wang et al., 2023) inherits the layers whose representations are
  closest to those the downstream task needs.  Its meta-learned selector is replaced
  here by a direct probe: the pre-trained DiT is fine-tuned on the downstream data for
  ``probe_steps`` steps, and ``score_l = CKA(h_l, h'_l)`` (linear CKA, Kornblith et
  al. 2019) compares block ``l``'s output tokens before (``h_l``) and after (``h'_l``)
  on the same noisy downstream inputs; the ``k`` most similar are inherited.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kindjax.config import ConfigError
from kindjax.data import make_dataset
from kindjax.diffusion import GaussianDiffusion, denoising_loss, noisy_inputs
from kindjax.models.dit import DiT, DiTBlock, build_model

SELECTIONS = ("heur_lg", "auto_lg")


def _noisy_batch(key: jax.Array, batch: dict, diffusion: GaussianDiffusion) -> tuple:
    x0 = jnp.asarray(batch["image"])
    return (x0,) + noisy_inputs(*jax.random.split(key), x0, diffusion)


def _loss(params: Any, model: DiT, diffusion: GaussianDiffusion, x0, xt, t, noise, y) -> jax.Array:
    return denoising_loss(model, params, diffusion, x0, xt, t, noise, y)[0]


def _norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def heur_lg_scores(params: Any, config: ml_collections.ConfigDict, key: jax.Array,
                   num_batches: int = 4, batch_size: int = 64) -> np.ndarray:
    """``score_l = mean ‖∇θ_l L‖ / ‖θ_l‖`` over ``num_batches`` pre-training batches, one per block."""
    model, diffusion = build_model(config), GaussianDiffusion.from_config(config.diffusion)
    data = make_dataset(config)
    grad = jax.jit(jax.grad(functools.partial(_loss, model=model, diffusion=diffusion)))
    grad_norms = np.zeros(model.depth)
    for i in range(num_batches):
        batch = data.batch(i, batch_size, config.data.seed)
        x0, xt, t, noise = _noisy_batch(jax.random.fold_in(key, i), batch, diffusion)
        g = grad(params, x0=x0, xt=xt, t=t, noise=noise, y=jnp.asarray(batch["label"]))
        grad_norms += [float(_norm(g[f"block_{l}"])) for l in range(model.depth)]
    param_norms = np.asarray([float(_norm(params[f"block_{l}"])) for l in range(model.depth)])
    return grad_norms / num_batches / param_norms


def linear_cka(a: jax.Array, b: jax.Array) -> jax.Array:
    """Linear CKA of two feature matrices (rows = examples): ``‖AᵀB‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F)``,
    columns centred first."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    return jnp.sum(jnp.square(a.T @ b)) / (jnp.linalg.norm(a.T @ a) * jnp.linalg.norm(b.T @ b))


def block_outputs(model: DiT, params: Any, xt: jax.Array, t: jax.Array, y: jax.Array) -> list[jax.Array]:
    """Each block's output tokens, flattened to ``(B·N, hidden)``."""
    _, state = model.apply({"params": params}, xt, t, y,
                           capture_intermediates=lambda mdl, _: isinstance(mdl, DiTBlock))
    found = state["intermediates"]
    return [found[f"block_{l}"]["__call__"][0].reshape(-1, model.hidden_size) for l in range(model.depth)]


def auto_lg_scores(params: Any, config: ml_collections.ConfigDict, key: jax.Array,
                   probe_steps: int = 50, batch_size: int = 64, lr: float = 1e-4) -> np.ndarray:
    """``score_l = CKA(h_l, h'_l)``: block outputs of ``params`` before and after ``probe_steps``
    Adam steps of fine-tuning on the downstream data of ``config`` (same inputs, null class)."""
    import optax

    model, diffusion = build_model(config), GaussianDiffusion.from_config(config.diffusion)
    data = make_dataset(config)
    optimizer = optax.adam(lr)
    loss_grad = jax.value_and_grad(functools.partial(_loss, model=model, diffusion=diffusion))

    @jax.jit
    def step(p, opt_state, k, image, label):
        x0, xt, t, noise = _noisy_batch(k, {"image": image}, diffusion)
        _, g = loss_grad(p, x0=x0, xt=xt, t=t, noise=noise, y=label)
        updates, opt_state = optimizer.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    tuned, opt_state = params, optimizer.init(params)
    for i in range(probe_steps):
        batch = data.batch(i, batch_size, config.data.seed)
        tuned, opt_state = step(tuned, opt_state, jax.random.fold_in(key, i), batch["image"], batch["label"])
    probe = data.batch(probe_steps, batch_size, config.data.seed + 1)
    _, xt, t, _ = _noisy_batch(jax.random.fold_in(key, probe_steps), probe, diffusion)
    null = jnp.full((xt.shape[0],), model.num_classes, jnp.int32)
    before, after = block_outputs(model, params, xt, t, null), block_outputs(model, tuned, xt, t, null)
    return np.asarray([float(linear_cka(a, b)) for a, b in zip(before, after)])


def select_blocks(config: ml_collections.ConfigDict, pretrained: Any, source_config: ml_collections.ConfigDict,
                  transferred: Any, key: jax.Array) -> tuple[int, ...]:
    """The blocks ``init.select`` inherits: ``init.num_blocks`` of them, in increasing order.

    ``pretrained``: the full pre-trained parameters (its own classes; Heur-LG scores on its
    own data, ``source_config``); ``transferred``: the new model initialised from all of it
    (Auto-LG fine-tunes that one on the new data, ``config``).
    """
    init, depth = config.init, build_model(config).depth
    if init.select not in SELECTIONS:
        raise ConfigError(f"init.select={init.select!r}: use one of {list(SELECTIONS)} (or '' with init.blocks)")
    if not 0 < init.num_blocks <= depth:
        raise ConfigError(f"init.num_blocks={init.num_blocks} must be in [1, {depth}] (the model's depth) "
                          f"for init.select={init.select!r}")
    if init.select == "heur_lg":
        scores = heur_lg_scores(pretrained, source_config, key)
        chosen = np.argsort(scores, kind="stable")[:init.num_blocks]
    else:
        scores = auto_lg_scores(transferred, config, key)
        chosen = np.argsort(-scores, kind="stable")[:init.num_blocks]
    blocks = tuple(sorted(int(b) for b in chosen))
    print(f"{init.select}: block scores {np.round(scores, 4).tolist()} → inheriting blocks {list(blocks)}",
          flush=True)
    return blocks
