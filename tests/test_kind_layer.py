"""KIND layer: efficient class gate vs a naive per-sample full-rank oracle, init, config checks."""
from __future__ import annotations

import math

import flax
import jax
import jax.extend.core
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import kindjax
from kindjax.config import model_config
from kindjax.layers.dense import DenseLinear
from kindjax.layers.svd import svd_product
from kindjax.papers.kind.layer import (KINDLinear, check_rank, grouped_kind_linear, kind_config, kind_linear,
                                       naive_kind_linear)

N_CLS, N_T, N_G = 4, 3, 5
D_IN, D_OUT = 24, 40
# Classes 0 and 2 twice, the null class twice; 1 and 3 are absent (3 = the null's clamped index).
Y = np.array([0, 2, N_CLS, 2, 0, N_CLS], np.int32)


def random_params(key: jax.Array, dtype) -> dict:
    """Random (never zero) learngene, tailors and bias of a (D_IN → D_OUT) layer."""
    shapes = {"learngene": {"U": (D_OUT, N_G), "sigma": (N_G,), "V": (D_IN, N_G)},
              "tailors": {"U": (N_CLS, D_OUT, N_T), "sigma": (N_CLS, N_T), "V": (N_CLS, D_IN, N_T)},
              "bias": (D_OUT,)}
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])


def oracle(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """``out_b = x_b·W_{y_b}ᵀ + b`` with ``W_c = U diag(σ ⊙ m_c) Vᵀ`` over all r components."""
    lg, tl = params["learngene"], params["tailors"]
    u = jnp.concatenate([lg["U"]] + [tl["U"][c] for c in range(N_CLS)], axis=1)
    v = jnp.concatenate([lg["V"]] + [tl["V"][c] for c in range(N_CLS)], axis=1)
    sigma = jnp.concatenate([lg["sigma"]] + [tl["sigma"][c] for c in range(N_CLS)])
    owner = np.concatenate([np.full(N_G, -1)] + [np.full(N_T, c) for c in range(N_CLS)])
    masks = jnp.asarray([(owner == -1) | (owner == c) for c in range(N_CLS + 1)], sigma.dtype)
    weights = jnp.einsum("or,br,ir->boi", u, sigma * masks[y], v)   # (B, d_out, d_in)
    return jnp.einsum("bni,boi->bno", x, weights) + params["bias"]


def efficient(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return kind_linear(x, y, params["learngene"], params["tailors"], params["bias"])


def grouped(group_size: int):
    def apply(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return grouped_kind_linear(x, y, params["learngene"], params["tailors"], params["bias"], None, group_size)
    return apply


def fused(group_size: int):
    def apply(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return grouped_kind_linear(x, y, params["learngene"], params["tailors"], params["bias"], None, group_size,
                                   kernel=True)
    return apply


# The efficient forms: gated, and grouped with groups of 1, 2 (gcd(6, 16) too), 3 and the whole batch, and
# grouped in the Pallas kernel (interpret mode here).
FORMS = {"gated": efficient, **{f"grouped_{g}": grouped(g) for g in (1, 3, 6, 16)},
         **{f"fused_{g}": fused(g) for g in (1, 3, 6)}}


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_efficient_gate_matches_oracle_values_and_gradients(form):
    efficient = FORMS[form]
    with jax.enable_x64(True):
        kp, kx, kg = jax.random.split(jax.random.key(0), 3)
        params = random_params(kp, jnp.float64)
        x = jax.random.normal(kx, (len(Y), 7, D_IN), jnp.float64)
        cot = jax.random.normal(kg, (len(Y), 7, D_OUT), jnp.float64)
        y = jnp.asarray(Y)
        out, want_out = jax.jit(efficient)(params, x, y), jax.jit(oracle)(params, x, y)
        assert out.dtype == jnp.float64
        out, want_out = np.asarray(out), np.asarray(want_out)
        assert rel_err(out, want_out) <= 1e-5
        null = Y == N_CLS                                   # the null-class rows: learngene only
        assert rel_err(out[null], want_out[null]) <= 1e-5

        def grads(fn):
            return jax.jit(jax.grad(lambda p, xx: jnp.sum(fn(p, xx, y) * cot), argnums=(0, 1)))

        got, want = grads(efficient)(params, x), grads(oracle)(params, x)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert g.dtype == jnp.float64
            assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)


@pytest.mark.parametrize("form", ["gated", "grouped_3", "fused_3"])
def test_absent_classes_get_exactly_zero_gradient(form):
    efficient = FORMS[form]
    params = random_params(jax.random.key(1), jnp.float32)
    x = jax.random.normal(jax.random.key(2), (len(Y), 5, D_IN))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(efficient(p, x, jnp.asarray(Y)) ** 2)))(params)
    for name, g in grads["tailors"].items():
        g = np.asarray(g)
        for c in range(N_CLS):
            if c in Y:
                assert np.abs(g[c]).max() > 0, (name, c)
            else:
                assert np.all(g[c] == 0), (name, c)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["learngene"]))


def test_module_float32_and_bfloat16_against_oracle():
    layer = KINDLinear(features=D_OUT, n_classes=N_CLS, n_tailor=N_T, n_learngene=N_G)
    x = jax.random.normal(jax.random.key(3), (len(Y), 5, D_IN))
    y = jnp.asarray(Y)
    apply = jax.jit(layer.apply)
    variables = jax.jit(layer.init)(jax.random.key(4), x, y)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape),
                          variables["params"])
    want = jax.jit(oracle)(params, x, y)
    assert rel_err(apply({"params": params}, x, y), want) <= 1e-5
    out16 = apply({"params": params}, x.astype(jnp.bfloat16), y)
    assert out16.dtype == jnp.bfloat16
    assert rel_err(out16.astype(jnp.float32), want) <= 3e-2
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


@pytest.mark.parametrize("d_in,d_out,n_cls,n_t,n_g", [
    (64, 64, 10, 2, 20), (64, 256, 8, 3, 30), (256, 64, 8, 3, 30), (96, 384, 20, 4, 12)])
@pytest.mark.slow  # 22 s (-n 2, 2 cores)
def test_init_matches_dense_output_scale(d_in, d_out, n_cls, n_t, n_g):
    tokens = 64
    y = jnp.arange(n_cls + 1, dtype=jnp.int32)            # every class and the null class
    x = jax.random.normal(jax.random.key(6), (n_cls + 1, tokens, d_in))
    layer = KINDLinear(features=d_out, n_classes=n_cls, n_tailor=n_t, n_learngene=n_g)
    params = jax.jit(layer.init)(jax.random.key(7), x, y)["params"]
    out = np.asarray(jax.jit(layer.apply)({"params": params}, x, y))
    params = jax.tree.map(np.asarray, params)
    dense = DenseLinear(features=d_out)
    dense_out = np.asarray(jax.jit(lambda k: dense.apply(dense.init(k, x), x))(jax.random.key(8)))
    dense_std, cond_std, null_std = dense_out.std(), out[:n_cls].std(), out[n_cls].std()
    assert abs(cond_std / dense_std - 1) < 0.1, (cond_std, dense_std)
    assert abs(null_std / cond_std - np.sqrt(n_g / (n_g + n_t))) < 0.1, (null_std, cond_std)
    # One joint orthonormal basis over learngene and all tailors, equal singular values.
    for name, dim in (("U", d_out), ("V", d_in)):
        basis = np.concatenate([params["learngene"][name]] + list(params["tailors"][name]), axis=1)
        assert basis.shape == (dim, n_cls * n_t + n_g)
        np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)
    sigma = np.sqrt(2 * d_in * d_out / ((d_in + d_out) * (n_g + n_t)))
    np.testing.assert_allclose(params["learngene"]["sigma"], sigma, rtol=1e-6)
    np.testing.assert_allclose(params["tailors"]["sigma"], sigma, rtol=1e-6)


def test_rank_that_does_not_fit_is_refused_with_the_numbers():
    ten = lambda n_learngene, n_tailor: dict(num_classes=10, linear=kind_config(n_learngene, n_tailor))
    assert check_rank(64, 256, ten(34, 3), "mlp_in") == 64
    with pytest.raises(ValueError) as err:
        check_rank(64, 256, ten(20, 5), "mlp_in")
    for text in ("'mlp_in'", "d_in=64", "d_out=256", "10·5 + 20 = 70", "min(d_in, d_out) = 64"):
        assert text in str(err.value)
    # In a DiT whose MLP is narrower than its width, only the MLP matrices fail.
    config = small_dit_config(hidden=32, n_learngene=13, n_tailor=1)
    config.mlp_ratio = 0.5
    with pytest.raises(ValueError, match="'mlp_in'.*d_in=32, d_out=16.*= 17 > min"):
        kindjax.build_model(config)
    with pytest.raises(ValueError, match="'attn_out'.*d_in=24"):
        KINDLinear(features=48, n_classes=4, n_tailor=4, n_learngene=10, role="attn_out").init(
            jax.random.key(0), jnp.ones((1, 2, 24)), jnp.zeros((1,), jnp.int32))


def test_bad_linear_config_is_refused():
    config = small_dit_config(hidden=32, n_learngene=8, n_tailor=2)
    config.linear.n_classes = 4  # one source per fact: the tailor count is model.num_classes
    with pytest.raises(ValueError, match="linear.n_classes is not a key.*model.num_classes"):
        kindjax.build_model(config)
    config = small_dit_config(hidden=32, n_learngene=0, n_tailor=2)
    with pytest.raises(ValueError, match="n_learngene must be a positive int"):
        kindjax.build_model(config)
    config = small_dit_config(hidden=32, n_learngene=8, n_tailor=2)
    config.linear.n_tailors = 2
    with pytest.raises(ValueError, match=r"unknown keys \['n_tailors'\]"):
        kindjax.build_model(config)


def small_dit_config(hidden: int, n_learngene: int, n_tailor: int) -> ml_collections.ConfigDict:
    config = model_config()
    config.update(dict(hidden_size=hidden, depth=2, num_heads=2, image_size=8, in_channels=1,
                       patch_size=2, num_classes=4, adaln_init="gaussian"))
    config.linear = ml_collections.ConfigDict(dict(
        kind="kind", n_learngene=n_learngene, n_tailor=n_tailor))
    return config


def test_dit_builds_with_kind_layers_and_has_the_expected_paths():
    d, n_g, n_t, n_cls = 32, 8, 2, 4
    model = kindjax.build_model(small_dit_config(d, n_g, n_t))
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    t = jnp.array([1, 500, 999])
    y = jnp.array([0, 3, n_cls])
    params = jax.jit(model.init)(jax.random.key(1), x, t, y)["params"]
    flat = {"/".join(path): leaf.shape
            for path, leaf in flax.traverse_util.flatten_dict(params).items()}
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "attn_out": (d, d),
              "mlp_in": (d, 4 * d), "mlp_out": (4 * d, d)}
    for i in range(2):
        for role, (d_in, d_out) in shapes.items():
            prefix = f"block_{i}/attn/{role}" if role in ("q", "k", "v", "attn_out") else f"block_{i}/{role}"
            layer = {k[len(prefix) + 1:]: s for k, s in flat.items() if k.startswith(prefix + "/")}
            assert layer == {
                "learngene/U": (d_out, n_g), "learngene/sigma": (n_g,), "learngene/V": (d_in, n_g),
                "tailors/U": (n_cls, d_out, n_t), "tailors/sigma": (n_cls, n_t),
                "tailors/V": (n_cls, d_in, n_t), "bias": (d_out,)}, prefix
    tailor_paths = [k for k in flat if "tailors" in k.split("/")]
    assert len(tailor_paths) == 2 * 6 * 3 and all(flat[k][0] == n_cls for k in tailor_paths)
    out = jax.jit(model.apply)({"params": params}, x, t, y)
    assert out.shape == (3, 8, 8, 2) and np.all(np.isfinite(np.asarray(out)))


def test_naive_formulation_matches_gated_values_and_gradients():
    kp, kx, kg = jax.random.split(jax.random.key(9), 3)
    params = random_params(kp, jnp.float32)
    x = jax.random.normal(kx, (len(Y), 7, D_IN))
    cot = jax.random.normal(kg, (len(Y), 7, D_OUT))
    y = jnp.asarray(Y)

    def naive(p, xx, yy):
        return naive_kind_linear(xx, yy, p["learngene"], p["tailors"], p["bias"])

    assert rel_err(jax.jit(naive)(params, x, y), jax.jit(efficient)(params, x, y)) <= 1e-5

    def grads(fn):
        return jax.jit(jax.grad(lambda p, xx: jnp.sum(fn(p, xx, y) * cot), argnums=(0, 1)))

    got, want = grads(naive)(params, x), grads(efficient)(params, x)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)


@pytest.mark.parametrize("tokens", [7, 1])
def test_grouped_formulation_matches_gated_values_and_gradients_in_float32(tokens):
    """The grouped form against today's gated form, f32, on random inputs (and one token per sample)."""
    kp, kx, kg = jax.random.split(jax.random.key(11), 3)
    params = random_params(kp, jnp.float32)
    x = jax.random.normal(kx, (len(Y), tokens, D_IN))
    cot = jax.random.normal(kg, (len(Y), tokens, D_OUT))
    y = jnp.asarray(Y)
    for group_size in (2, 3, 16):
        assert rel_err(jax.jit(grouped(group_size))(params, x, y), jax.jit(efficient)(params, x, y)) <= 1e-5

        def grads(fn):
            return jax.jit(jax.grad(lambda p, xx: jnp.sum(fn(p, xx, y) * cot), argnums=(0, 1)))

        got, want = grads(grouped(group_size))(params, x), grads(efficient)(params, x)
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert rel_err(g, w) <= 1e-5, (group_size, jax.tree_util.keystr(path))


@pytest.mark.parametrize("form", ["gated", "grouped_3", "fused_3"])
def test_the_layer_adds_the_gated_residual_itself_with_the_same_values_and_gradients(form):
    """``KINDLinear(x, y, residual=r, gate=g) = r + g ⊙ KINDLinear(x, y)`` (float32, random inputs), gradients
    to every parameter, ``x``, ``r`` and ``g`` too; the grouped forms sum it in their grouped layout."""
    formulation, _, group_size = form.partition("_")
    layer = KINDLinear(features=D_OUT, n_classes=N_CLS, n_tailor=N_T, n_learngene=N_G, formulation=formulation,
                       group_size=int(group_size or 16))
    keys = jax.random.split(jax.random.key(21), 5)
    x, y = jax.random.normal(keys[0], (len(Y), 7, D_IN)), jnp.asarray(Y)
    residual, gate = jax.random.normal(keys[1], (len(Y), 7, D_OUT)), jax.random.normal(keys[2], (len(Y), D_OUT))
    cot = jax.random.normal(keys[3], (len(Y), 7, D_OUT))
    params = {"params": random_params(keys[4], jnp.float32)}
    assert KINDLinear.applies_residual

    def inside(p, xx, r, g):
        return jnp.sum(layer.apply(p, xx, y, residual=r, gate=g) * cot)

    def outside(p, xx, r, g):
        return jnp.sum((r + g[:, None] * layer.apply(p, xx, y)) * cot)

    (got, got_grads), (want, want_grads) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(
        params, x, residual, gate) for f in (inside, outside))
    assert rel_err(got, want) <= 1e-6
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        assert rel_err(g, w) <= 1e-6, jax.tree_util.keystr(path)


def test_a_dit_block_lets_the_layer_add_its_residual_and_computes_the_same():
    """The DiT hands each block's two residual branches to a layer that applies them (:func:`gated_residual`):
    the model's output and gradients are those of the block adding them itself (float32, bit for bit)."""
    from kindjax.models import dit

    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    t, y = jnp.array([1, 500, 999, 30]), jnp.array([0, 3, 4, 1])
    config = small_dit_config(32, 8, 2)
    config.linear.update(formulation="grouped", group_size=2)
    model = kindjax.build_model(config)
    params = jax.jit(model.init)(jax.random.key(1), x, t, y)   # zero final layer: perturb all
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    calls = []
    real = dit.gated_residual

    def counted(layer, *args):
        calls.append(type(layer).__name__)
        return real(layer, *args)

    def value_and_grads():
        return jax.value_and_grad(lambda p: jnp.sum(model.apply(p, x, t, y) ** 2))(params)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit, "gated_residual", counted)
        got = value_and_grads()
        assert calls == ["KINDLinear"] * 4   # attn_out and mlp_out of both blocks
        patch.setattr(KINDLinear, "applies_residual", False)
        want = value_and_grads()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_grouped_formulation_reads_the_activations_once():
    """Each layer's activations enter one product (learngene and tailors together), where the gated form
    has two: the property that makes the grouped form cheap in memory traffic."""
    params = random_params(jax.random.key(12), jnp.float32)
    x, y = jax.random.normal(jax.random.key(13), (len(Y), 7, D_IN)), jnp.asarray(Y)

    def products_reading_x(fn):
        jaxpr = jax.make_jaxpr(fn)(params, x, y).jaxpr
        derived = {jaxpr.invars[-2]}             # x and the reshapes and casts of it
        count = 0
        for eqn in jaxpr.eqns:
            if any(v in derived for v in eqn.invars if not isinstance(v, jax.extend.core.Literal)):
                if eqn.primitive.name == "dot_general":
                    count += 1
                elif eqn.primitive.name in ("reshape", "convert_element_type", "broadcast_in_dim"):
                    derived.update(eqn.outvars)
        return count

    assert products_reading_x(grouped(3)) == 1
    assert products_reading_x(efficient) == 2


def test_fused_formulation_runs_both_products_of_each_pass_in_its_kernel():
    """``fused``: the forward is one Pallas call and the backward another; no XLA product touches the
    activations (the weight-sized work of building the group's columns stays in XLA)."""
    params = random_params(jax.random.key(17), jnp.float32)
    x, y = jax.random.normal(jax.random.key(18), (len(Y), 8, D_IN)), jnp.asarray(Y)

    def primitives(jaxpr) -> list[tuple[str, tuple]]:
        found = []
        for eqn in jaxpr.eqns:
            found.append((eqn.primitive.name, tuple(v.aval.shape for v in eqn.invars if hasattr(v, "aval"))))
            if eqn.primitive.name != "pallas_call":       # the kernel's own products are the point
                for sub in jax.core.jaxprs_in_params(eqn.params):
                    found += primitives(sub)
        return found

    def found(form) -> list[tuple[str, tuple]]:
        grad = jax.grad(lambda p, xx: jnp.sum(FORMS[form](p, xx, y) ** 2), argnums=(0, 1))
        return primitives(jax.make_jaxpr(grad)(params, x).jaxpr)

    def products_over_tokens(form) -> int:   # an operand with a row per token of the batch
        return sum(name == "dot_general" and any(math.prod(s[:-1]) == x.size // D_IN for s in shapes)
                   for name, shapes in found(form))

    assert sum(name == "pallas_call" for name, _ in found("fused_3")) == 2
    assert products_over_tokens("fused_3") == 0
    assert products_over_tokens("grouped_3") == 6 and not [n for n, _ in found("grouped_3") if n == "pallas_call"]


def test_grouped_formulation_takes_the_bias_gradient_from_the_product():
    """The grouped form's bias rides on a padding component of its second product, so its backward sums no
    output-sized array: the gated form sums the output gradient over the batch and tokens for the bias
    (a pass over the whole output that XLA may not fuse)."""
    params = random_params(jax.random.key(14), jnp.float32)
    x, y = jax.random.normal(jax.random.key(15), (len(Y), 7, D_IN)), jnp.asarray(Y)
    w = jax.random.normal(jax.random.key(16), (len(Y), 7, D_OUT))

    def output_sums(fn):
        grad = jax.grad(lambda p: jnp.sum(fn(p, x, y) * w))
        eqns = jax.make_jaxpr(grad)(params).jaxpr.eqns
        return sum(eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.shape == w.shape
                   and w.ndim - 1 not in eqn.params["axes"] for eqn in eqns)   # (the loss sums every axis)

    assert output_sums(grouped(3)) == 0
    assert output_sums(efficient) >= 1


def test_dit_naive_formulation_matches_gated_and_bad_formulation_is_refused():
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    t, y = jnp.array([1, 500, 999]), jnp.array([0, 3, 4])
    gated = kindjax.build_model(small_dit_config(32, 8, 2))
    config = small_dit_config(32, 8, 2)
    config.linear.formulation = "naive"
    naive = kindjax.build_model(config)
    params = jax.jit(gated.init)(jax.random.key(1), x, t, y)   # zero final layer: perturb all
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    want = jax.jit(gated.apply)(params, x, t, y)
    assert rel_err(jax.jit(naive.apply)(params, x, t, y), want) <= 1e-5
    config.linear.formulation = "grouped"
    config.linear.group_size = 3
    assert rel_err(jax.jit(kindjax.build_model(config).apply)(params, x, t, y), want) <= 1e-5
    config.linear.formulation = "full"
    with pytest.raises(ValueError, match=r"formulation='full' for kind='kind': use one of "
                                         r"\['auto', 'gated', 'grouped', 'fused', 'fused_mlp', 'naive', 'ungated'\]"):
        kindjax.build_model(config)
    config.linear.update(formulation="grouped", group_size=0)
    with pytest.raises(ValueError, match=r"config.model.linear.group_size must be a positive int"):
        kindjax.build_model(config)


@pytest.mark.parametrize("d_in,d_out,n_g,rows,builds_w_g", [
    (16, 16, 12, 64, True),     # N_G above d_in·d_out/(d_in + d_out) = 8, many rows: build W_G
    (16, 16, 12, 4, False),     # above it, but too few rows to pay for building W_G
    (16, 64, 4, 64, False)])    # N_G below 12.8: the two thin products
def test_svd_product_both_associations(d_in, d_out, n_g, rows, builds_w_g):
    with jax.enable_x64(True):
        kv, ks, ku, kx = jax.random.split(jax.random.key(10), 4)
        learngene = {"V": jax.random.normal(kv, (d_in, n_g), jnp.float64),
                     "sigma": jax.random.normal(ks, (n_g,), jnp.float64),
                     "U": jax.random.normal(ku, (d_out, n_g), jnp.float64)}
        x = jax.random.normal(kx, (2, rows // 2, d_in), jnp.float64)
        want = x @ (learngene["V"] * learngene["sigma"]) @ learngene["U"].T
        assert rel_err(svd_product(x, learngene, jnp.float64), want) <= 1e-10
        jaxpr = jax.make_jaxpr(svd_product, static_argnums=2)(x, learngene, jnp.float64)
        shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"
                  for v in eqn.outvars}
        assert ((d_in, d_out) in shapes) == builds_w_g, shapes
