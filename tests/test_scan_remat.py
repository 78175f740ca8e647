"""``model.remat`` and ``model.scan_blocks`` change how the blocks run, not what they compute nor the
parameter layout: outputs and gradients equal the plain loop's (≤1e-5 in f32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from kindjax import build_model
from kindjax.models.dit import abstract_params, init_params

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("scan_remat")

LINEARS = {"dense": dict(kind="dense"), "kind": dict(kind="kind", n_learngene=24, n_tailor=2),
           "fine": dict(kind="fine", rank=16)}
SETTINGS = [dict(remat="block"), dict(remat="dots_saveable"), dict(scan_blocks=True),
            dict(scan_blocks=True, remat="block")]
#: Dense (with DiffFit's γ) and KIND under every setting; FINE (shared U, V) under scan + remat.
CASES = [(name, setting) for name in ("dense", "kind") for setting in SETTINGS] + [("fine", SETTINGS[-1])]


def model_for(linear, **model):
    config = tiny_config()
    config.model.update(depth=3, **model)   # 3 blocks: the scan carries across more than one step
    config.model.linear = dict(linear)
    return build_model(config)


def loss_and_grad(model, params):
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t, y = jnp.array([3, 200, 650, 999]), jnp.array([0, 4, 9, 10])
    w = jax.random.normal(jax.random.key(2), (4, 8, 8, 2))

    def loss(p):
        out = model.apply({"params": p}, x, t, y)
        return jnp.sum(out * w), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return out, grads


@pytest.fixture(scope="module")
def loops():
    """The plain loop's parameters (perturbed: adaLN-Zero would zero every block's branch) and results."""
    found = {}
    for name, linear in LINEARS.items():
        model = model_for(linear, residual_scales=name == "dense")   # DiffFit's γ rides with dense
        params = jax.jit(init_params, static_argnums=1)(jax.random.key(0), model)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
        found[name] = (params, *loss_and_grad(model, params))
    return found


@pytest.mark.parametrize("name,setting", [case if case[0] == "fine" or case == ("kind", SETTINGS[-1]) else
                                          pytest.param(*case, marks=pytest.mark.slow) for case in CASES],
                         ids=[f"{n}-" + "+".join(f"{k}={v}" for k, v in s.items()) for n, s in CASES])
def test_outputs_and_gradients_equal_the_loop(name, setting, loops):
    params, out, grads = loops[name]
    model = model_for(LINEARS[name], residual_scales=name == "dense", **setting)
    # The same parameter tree (block_<i>/…, nothing stacked): the loop's parameters apply as they are.
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params(model)) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), params)
    out2, grads2 = loss_and_grad(model, params)
    np.testing.assert_allclose(out2, out, atol=1e-5, rtol=0)
    for (path, g), g2 in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(g2, g, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3   # gradients are not all 0


def test_scan_and_remat_are_in_the_jaxpr():
    """The settings reach the compiled program: one scan over the blocks, remat around each block."""
    x, i = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)

    def primitives(**setting):
        model = model_for(LINEARS["kind"], **setting)
        params = jax.eval_shape(lambda k: init_params(k, model), jax.random.key(0))
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: model.apply({"params": p}, x, i, i).sum()))(params)
        return str(jaxpr)

    loop, scanned, remat = primitives(), primitives(scan_blocks=True), primitives(remat="block")
    assert "scan[" not in loop and "checkpoint[" not in loop and "remat" not in loop
    assert scanned.count("scan[") == 2       # forward and backward
    assert "checkpoint[" in remat or "remat" in remat


def test_scan_model_captures_each_block_output():
    """Auto-LG reads every block's output (capture_intermediates): the scan model still gives them."""
    from kindjax.models.dit import DiTBlock

    model = model_for(LINEARS["dense"], scan_blocks=True)
    params = jax.jit(init_params, static_argnums=1)(jax.random.key(0), model)
    x, i = jnp.ones((2, 8, 8, 1)), jnp.ones((2,), jnp.int32)
    out, state = jax.jit(lambda p: model.apply({"params": p}, x, i, i, capture_intermediates=lambda mdl, _:
                                               isinstance(mdl, DiTBlock)))(params)
    assert sorted(state["intermediates"]) == ["block_0", "block_1", "block_2"]


@pytest.mark.slow   # two train-step compiles
def test_remat_lowers_the_step_memory_by_xla_analysis():
    """kindjax.tools.footprint on a small step: recomputing each block keeps fewer temporaries than keeping
    every activation, and the parameters (arguments) do not change with the setting."""
    from kindjax.tools.footprint import footprint

    config = tiny_config()
    config.model.update(depth=3, hidden_size=64, num_heads=2)
    sizes = {}
    for remat in ("none", "block"):
        config.model.update(remat=remat, scan_blocks=True)
        sizes[remat] = footprint(config, 64)
    assert sizes["block"]["temp"] < 0.8 * sizes["none"]["temp"], sizes
    assert sizes["block"]["argument"] == sizes["none"]["argument"]
