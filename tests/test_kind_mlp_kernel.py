"""KIND's block MLP half as Pallas kernels (``formulation="fused_mlp"``, interpret mode on the CPU) against a
float64 oracle built from per-sample full-rank weights, and inside the DiT against the grouped formulation."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from kindjax.models.dit import build_model
from kindjax.papers.kind.layer import KINDLinear, kind_config, kind_mlp
# The layer's sizes and labels (classes 1 and 3 absent, the null class twice), and its float64 oracle: each
# sample's full-rank weight over all components.
from test_kind_layer import N_CLS, N_G, N_T, Y, rel_err
from test_kind_layer import oracle as per_sample_layer

D, F, TOKENS, EPS = 24, 40, 16, 1e-6


class MLPHalf(nn.Module):
    """The two KIND matrices of a block's MLP (``mlp_in`` ``D → F``, ``mlp_out`` ``F → D``) through :func:`kind_mlp`."""

    group_size: int

    @nn.compact
    def __call__(self, x, y, shift, scale, gate):
        def layer(features, name):
            return KINDLinear(features=features, n_classes=N_CLS, n_tailor=N_T, n_learngene=N_G, role=name,
                              formulation="grouped", group_size=self.group_size, name=name)
        return kind_mlp(layer(F, "mlp_in"), layer(D, "mlp_out"), x, y, shift, scale, gate, EPS)


def oracle(params: dict, x, y, shift, scale, gate) -> jax.Array:
    """``x + gate ⊙ mlp_out(gelu(mlp_in(LN(x)·(1 + scale) + shift)))``, LayerNorm and GELU written out."""
    centred = x - x.mean(-1, keepdims=True)
    ln = centred / jnp.sqrt((centred ** 2).mean(-1, keepdims=True) + EPS)
    z = per_sample_layer(params["mlp_in"], ln * (1 + scale[:, None]) + shift[:, None], y)
    return x + gate[:, None] * per_sample_layer(params["mlp_out"], jax.nn.gelu(z, approximate=True), y)


@pytest.mark.parametrize("group_size", [1, 3])
def test_the_mlp_kernels_equal_a_float64_oracle_values_and_gradients(group_size):
    with jax.enable_x64(True):
        keys = iter(jax.random.split(jax.random.key(0), 16))
        x = jax.random.normal(next(keys), (len(Y), TOKENS, D), jnp.float64)
        rows = [0.5 * jax.random.normal(next(keys), (len(Y), D), jnp.float64) for _ in range(3)]
        y = jnp.asarray(Y)
        module = MLPHalf(group_size)
        shapes = module.init(next(keys), x, y, *rows)["params"]
        # Random (never zero) factors and biases in float64, not the orthonormal init.
        leaves, treedef = jax.tree.flatten(shapes)
        params = jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape, jnp.float64)
                                              for k, leaf in zip(jax.random.split(next(keys), len(leaves)), leaves)])
        cot = jax.random.normal(next(keys), x.shape, jnp.float64)

        def fused(p, x, *rows):
            return module.apply({"params": p}, x, y, *rows)

        # The kernels run: two forward kernels, and two backward kernels beside them in the gradient.
        assert str(jax.make_jaxpr(fused)(params, x, *rows)).count("pallas_call") == 2
        grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fused(*a) * cot), argnums=(0, 1, 2, 3, 4)))(
            params, x, *rows))
        assert grad_jaxpr.count("pallas_call") == 4
        out, want = jax.jit(fused)(params, x, *rows), jax.jit(oracle)(params, x, y, *rows)
        assert out.dtype == jnp.float64
        assert rel_err(out - x, want - x) <= 1e-5                       # the branch, not only the residual
        null = Y == N_CLS
        assert rel_err(out[null] - x[null], want[null] - x[null]) <= 1e-5

        def grads(fn):
            return jax.jit(jax.grad(lambda p, x, *rows: jnp.sum(fn(p, x, *rows) * cot), argnums=(0, 1, 2, 3, 4)))

        got = grads(fused)(params, x, *rows)
        expected = grads(lambda p, x, *rows: oracle(p, x, y, *rows))(params, x, *rows)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
            assert g.dtype == jnp.float64
            assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)
        # The class gate: the tailors of the absent classes 1 and 3 get exactly zero gradient.
        for layer in ("mlp_in", "mlp_out"):
            for name, g in got[0][layer]["tailors"].items():
                g = np.asarray(g)
                assert np.all(g[[1, 3]] == 0) and np.abs(g[[0, 2]]).min() > 0, (layer, name)


def test_a_dit_with_the_mlp_kernels_equals_the_grouped_dit():
    """The same parameter tree and init, the same loss and gradients (float32) as ``grouped``."""
    def model(formulation):
        c = tiny_config()
        c.model.update(hidden_size=64, depth=1, num_heads=2, num_classes=10)
        c.model.linear = kind_config(24, 2, formulation, group_size=4)
        return build_model(c.model)

    grouped, fused = model("grouped"), model("fused_mlp")
    b = 8
    x = jax.random.normal(jax.random.key(0), (b, grouped.image_size, grouped.image_size, grouped.in_channels))
    t = jax.random.uniform(jax.random.key(1), (b,)) * 100
    y = jnp.array([0, 3, 10, 3, 5, 9, 1, 10])
    params = grouped.init(jax.random.key(2), x, t, y)
    assert jax.tree.all(jax.tree.map(lambda a, c: bool((a == c).all()), params, fused.init(jax.random.key(2), x, t, y)))
    # adaLN-Zero starts every residual gate at 0: move all parameters so that the MLP branch counts.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)

    def loss(m):
        return lambda p: jnp.sum(jnp.sin(m.apply(p, x, t, y)))

    assert str(jax.make_jaxpr(loss(fused))(params)).count("pallas_call") == 2   # two per block
    (want, want_grads), (got, got_grads) = (jax.jit(jax.value_and_grad(loss(m)))(params) for m in (grouped, fused))
    assert got == pytest.approx(want, rel=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        if "/k/bias" in jax.tree_util.keystr(path, simple=True, separator="/"):
            continue   # softmax ignores a bias added to every key: its gradient is rounding noise around 0
        assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)
