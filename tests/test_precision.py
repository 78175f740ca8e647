"""Mixed precision that is real: with ``model.dtype="bfloat16"`` every matmul of the train step
(forward and backward, every linear variant) takes bf16 operands, while parameters, optimizer
state and EMA stay f32; bf16 outputs stay close to f32 ones.

The property is checked on the jaxpr of ``kindjax.train.trainer.train_step`` (recursing into
pjit, custom_vjp, scan, remat, … sub-jaxprs), not on output dtypes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from kindjax.layers.adapters import DEFAULTS
from kindjax.train.trainer import Trainer, train_step

#: A dot whose every operand has fewer elements than this is too small to matter (none occur in
#: the step today; the bound only keeps the rule about matrices, as the issue states it).
MIN_OPERAND = 64
#: Dot algorithms that round both operands to bf16 (JAX's attention backward uses one with f32 operands).
BF16_ALGORITHMS = ("BF16_BF16",)
#: bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 2e-3 per operation); a layer, or two DiT
#: blocks of matmuls, norms and adaLN, stay within this relative (Frobenius) error of f32 (~0.7% measured).
BF16_RTOL = 2e-2

LINEARS = {
    "dense": dict(kind="dense"),
    "kind": dict(kind="kind", n_learngene=40, n_tailor=2),
    "kind_naive": dict(kind="kind", n_learngene=40, n_tailor=2, formulation="naive"),
    "kind_ungated": dict(kind="kind", n_learngene=40, n_tailor=2, formulation="ungated"),
    "kind_grouped": dict(kind="kind", n_learngene=40, n_tailor=2, formulation="grouped"),
    "kind_fused": dict(kind="kind", n_learngene=40, n_tailor=2, formulation="fused"),   # the kernel's own products
    "fine": dict(kind="fine", rank=40),
    "fine_per_role": dict(kind="fine", rank=40, layout="per_role"),
    "tleg": dict(kind="tleg"),
    **{kind: dict(kind=kind) for kind in DEFAULTS},
}


def sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr


def matmuls(jaxpr):
    """Every ``dot_general`` / ``conv_general_dilated`` equation of ``jaxpr`` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            yield eqn
        for sub in sub_jaxprs(eqn):
            yield from matmuls(sub)


def computes_in_bf16(eqn) -> bool:
    operands = [v.aval for v in eqn.invars]
    if all(a.dtype == jnp.bfloat16 for a in operands):
        return True
    precision = eqn.params.get("precision")
    return any(str(p).startswith(BF16_ALGORITHMS) for p in (precision if isinstance(precision, tuple)
                                                           else (precision,)))


def not_bf16(closed_jaxpr) -> list[str]:
    found = list(matmuls(closed_jaxpr.jaxpr))
    assert found, "no matmul found: the walk is broken"
    return [f"{e.primitive.name} {[str(v.aval) for v in e.invars]}" for e in found
            if max(v.aval.size for v in e.invars) >= MIN_OPERAND and not computes_in_bf16(e)]


def step_jaxpr(config, tmp_path):
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    step = functools.partial(train_step, model=trainer.model, diffusion=trainer.diffusion,
                             optimizer=trainer.optimizer, config=config, base_key=trainer.base_key)
    b = config.train.batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, 8, 8, 1), jnp.float32),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
    jaxpr, out_shapes = jax.make_jaxpr(step, return_shape=True)(trainer.abstract_state, batch)
    return jaxpr, out_shapes


def bf16_config(linear, **model):
    config = tiny_config()
    config.model.update(dtype="bfloat16", **model)
    config.model.linear = linear
    config.train.batch_size = 16   # 256 token rows: KIND and FINE build W_G once (learngene_product)
    return config


@pytest.mark.parametrize("name", sorted(LINEARS))
def test_every_matmul_of_the_train_step_is_bf16(name, tmp_path):
    jaxpr, out = step_jaxpr(bf16_config(dict(LINEARS[name])), tmp_path)
    assert not_bf16(jaxpr) == []
    state, _ = out
    for part in ("params", "ema_params", "opt_state"):
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(state[part]) if jnp.issubdtype(leaf.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, part


@pytest.mark.parametrize("model", [dict(scan_blocks=True, remat="dots_saveable"), dict(residual_scales=True)])
def test_bf16_through_scan_remat_and_difffit(model, tmp_path):
    jaxpr, _ = step_jaxpr(bf16_config(dict(kind="kind", n_learngene=40, n_tailor=2), **model), tmp_path)
    assert not_bf16(jaxpr) == []
    assert any(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns) or not model.get("scan_blocks")


def test_float32_step_has_no_bf16(tmp_path):
    """The walk can fail: the f32 model's dots are all f32."""
    jaxpr, _ = step_jaxpr(tiny_config(), tmp_path)
    assert len(not_bf16(jaxpr)) == len([e for e in matmuls(jaxpr.jaxpr)
                                        if max(v.aval.size for v in e.invars) >= MIN_OPERAND])




def perturb(params, key):
    """``params`` + N(0, 0.05²) on every leaf, so that no branch is zero (adaLN-Zero and
    zero-initialised adapters would otherwise hide whole paths)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow  # 25 s (-n 2, 2 cores)
@pytest.mark.parametrize("name", sorted(set(LINEARS) - {"fine", "fine_per_role", "tleg"}))   # shared factors: DiT below
def test_bf16_layer_matches_float32(name):
    """Each variant's layer alone, bf16 input vs f32 input, same (perturbed, f32) parameters."""
    from kindjax.layers import make_linear_factory

    config = bf16_config(dict(LINEARS[name]))
    layer = make_linear_factory(config.model)("mlp_in", 256, "mlp_in")
    x = jax.random.normal(jax.random.key(1), (4, 16, 64))
    y = jnp.array([0, 4, 9, 10])
    params = perturb(layer.init(jax.random.key(0), x, y), jax.random.key(2))
    apply = jax.jit(layer.apply)
    out16, out32 = apply(params, x.astype(jnp.bfloat16), y), apply(params, x, y)
    assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
    assert 0 < relative_error(out16, out32) < BF16_RTOL


@pytest.mark.slow  # 46 s (-n 2, 2 cores)
@pytest.mark.parametrize("name", ["dense", "kind", "fine", "fine_per_role", "tleg"])
def test_bf16_model_matches_float32(name):
    """The whole DiT (perturbed parameters, so that adaLN-Zero hides no branch) in bf16 vs f32."""
    from kindjax import build_model
    from kindjax.models.dit import init_params

    config = bf16_config(dict(LINEARS[name]))
    model16 = build_model(config)
    config.model.dtype = "float32"
    model32 = build_model(config)
    params = perturb(init_params(jax.random.key(0), model32), jax.random.key(2))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t, y = jnp.array([3, 200, 650, 999]), jnp.array([0, 4, 9, 10])
    out32 = jax.jit(model32.apply)({"params": params}, x, t, y)
    out16 = jax.jit(model16.apply)({"params": params}, x, t, y)
    assert out16.dtype == jnp.float32
    assert 0 < relative_error(out16, out32) < BF16_RTOL


def _feature_models():
    from kindjax.evaluation.dinov2 import Dinov2
    from kindjax.evaluation.inception import FIDInceptionV3
    from kindjax.models.vae import AutoencoderKL

    vae = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    return {"vae": (lambda dtype: AutoencoderKL(**vae, dtype=dtype), (2, 16, 16, 3)),
            "inception": (lambda dtype: FIDInceptionV3(dtype=dtype), (1, 299, 299, 3)),
            "dinov2": (lambda dtype: Dinov2(hidden_size=64, num_layers=2, num_heads=2, patch_size=4, image_size=32,
                                            dtype=dtype), (2, 32, 32, 3))}


@pytest.mark.parametrize("name", ["vae", "inception", "dinov2"])
def test_vae_inception_dinov2_compute_in_bf16(name):
    """Their forward passes with ``dtype=bfloat16``: every conv and matmul bf16, outputs f32; and the
    default (f32) has no bf16 matmul at all."""
    build, shape = _feature_models()[name]
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(build(jnp.float32).init, jax.random.key(0), x)
    for dtype in (jnp.bfloat16, jnp.float32):
        jaxpr, out = jax.make_jaxpr(build(dtype).apply, return_shape=True)(variables, x)
        found = not_bf16(jaxpr)
        assert found == [] if dtype == jnp.bfloat16 else len(found) == len(list(matmuls(jaxpr.jaxpr)))
        assert {leaf.dtype for leaf in jax.tree.leaves(out)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow  # 55 s (-n 2, 2 cores)
def test_vae_bf16_matches_float32():
    build, shape = _feature_models()["vae"]
    x = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
    variables = perturb(jax.jit(build(jnp.float32).init)(jax.random.key(0), x), jax.random.key(2))
    out32 = jax.jit(build(jnp.float32).apply)(variables, x)
    out16 = jax.jit(build(jnp.bfloat16).apply)(variables, x)
    # Random (untrained) weights through ~20 convolutions and GroupNorms: 2.5% measured, bound 5%.
    assert 0 < relative_error(out16, out32) < 5e-2
