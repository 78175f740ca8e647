"""``model.attention``: every implementation equals the XLA path; ``auto`` picks by platform, dtype
and head dim.  Pallas (the TPU splash kernel) runs here in Pallas's interpret mode on the CPU;
cuDNN needs a GPU (``kindjax.models.attention.check_against_xla("cudnn")`` in the device check)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import tiny_config
from kindjax import build_model
from kindjax.config import ConfigError, validate
from kindjax.models import attention


def test_pallas_splash_equals_xla_in_interpret_mode():
    """DiT-like shape with an odd token count and head dim (both padded to 128): f32 and bf16,
    outputs and gradients w.r.t. q, k, v."""
    f32 = attention.check_against_xla("pallas", shape=(1, 20, 2, 24), dtype=jnp.float32, interpret=True)
    assert max(f32.values()) > 0      # a different kernel, not the same code path
    attention.check_against_xla("pallas", shape=(1, 20, 2, 24), dtype=jnp.bfloat16, interpret=True)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_xla_attention_equals_a_float64_oracle_and_jax_nn(dtype, atol):
    """kindjax's XLA path (two einsums, ``q`` pre-scaled) against softmax(q·kᵀ/√h)·v in float64
    NumPy, and against ``jax.nn.dot_product_attention``: outputs and gradients, random inputs."""
    keys = jax.random.split(jax.random.key(3), 4)
    shape = (2, 24, 3, 40)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
    w = jax.random.normal(keys[3], shape, jnp.float32)
    qd, kd, vd = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
    scores = np.einsum("bqnh,bknh->bnqk", qd, kd) / np.sqrt(shape[-1])
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    oracle = np.einsum("bnqk,bknh->bqnh", probs, vd)
    out = attention.xla_attention(q, k, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), oracle, atol=atol)

    def grads(f):
        return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)

    for ours, theirs in zip(grads(attention.xla_attention),
                            grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))):
        np.testing.assert_allclose(np.asarray(ours.astype(jnp.float32)), np.asarray(theirs.astype(jnp.float32)),
                                   atol=atol * 4)


def test_pallas_splash_on_a_mesh_runs_per_device_and_equals_xla():
    """On the 8 fake devices ((data, fsdp) = (4, 2)) with q, k, v sharded over the batch, the jitted
    splash path is one ``shard_map`` over both batch axes, each device's kernel seeing its 1 row, and
    its output and gradients equal the XLA path's."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    keys = jax.random.split(jax.random.key(4), 4)
    q, k, v, w = (jax.device_put(jax.random.normal(key, (8, 20, 2, 24)), rows) for key in keys)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, impl, interpret=True) * w)

    def run(impl):
        return jax.jit(lambda q, k, v: (attention.dot_product_attention(q, k, v, impl, interpret=True),
                                        jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v)))

    jaxpr = str(jax.make_jaxpr(run("pallas"))(q, k, v))
    assert "shard_map" in jaxpr and "f32[1,20,2,24]" in jaxpr   # the kernel sees one device's row
    out, grads = run("pallas")(q, k, v)
    ref_out, ref_grads = run("xla")(q, k, v)
    assert out.sharding.is_equivalent_to(rows, out.ndim)
    for a, b in zip((out, *grads), (ref_out, *ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    with pytest.raises(ValueError, match="batch divisible by 8"):
        jax.jit(lambda q: attention.splash_attention(q, q, q, interpret=True))(
            jax.device_put(q[:4], NamedSharding(mesh, P("data"))))


def test_check_against_xla_fails_on_a_wrong_kernel(monkeypatch):
    """The check can fail: a kernel that forgets the 1/√h scale is caught."""
    real = attention.splash_attention
    monkeypatch.setattr(attention, "splash_attention", lambda q, k, v, interpret: real(q * 8 ** 0.5, k, v, interpret))
    with pytest.raises(AssertionError, match="differs from XLA"):
        attention.check_against_xla("pallas", shape=(1, 16, 1, 8), dtype=jnp.float32, interpret=True)


@pytest.mark.parametrize("platform,dtype,head_dim,expected", [
    ("gpu", jnp.bfloat16, 72, "cudnn"), ("gpu", jnp.float32, 72, "xla"), ("gpu", jnp.bfloat16, 256, "xla"),
    ("gpu", jnp.bfloat16, 36, "xla"), ("tpu", jnp.bfloat16, 72, "pallas"), ("tpu", jnp.float32, 64, "pallas"),
    ("cpu", jnp.bfloat16, 64, "xla")])
def test_auto_picks_by_platform_dtype_and_head_dim(platform, dtype, head_dim, expected):
    assert attention.resolve("auto", dtype, head_dim, platform) == expected


@pytest.mark.parametrize("implementation,platform,dtype,message", [
    ("cudnn", "cpu", jnp.bfloat16, "needs a GPU"), ("cudnn", "gpu", jnp.float32, "bfloat16"),
    ("pallas", "gpu", jnp.bfloat16, "TPU splash"), ("flash", "cpu", jnp.float32, "use one of")])
def test_impossible_choices_are_refused(implementation, platform, dtype, message):
    with pytest.raises(ValueError, match=message):
        attention.resolve(implementation, dtype, 64, platform)


def test_config_checks_attention_and_remat():
    for key, value, message in [("attention", "flash", "model.attention"), ("remat", "full", "model.remat"),
                                ("attention", "cudnn", "bfloat16")]:
        config = tiny_config()
        config.model[key] = value
        with pytest.raises(ConfigError, match=message):
            validate(config, 1)


@pytest.mark.slow   # ~10 s of Pallas interpret mode on an idle 2-core machine
def test_dit_with_pallas_attention_equals_xla():
    """The model's attention setting reaches the blocks: splash (interpret) and XLA give one output."""
    config = tiny_config()
    model = build_model(config)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32),
                                          jnp.zeros((2,), jnp.int32)))(jax.random.key(0))["params"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), params)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t, y = jnp.array([10, 900]), jnp.array([1, 10])
    config.model.attention = "pallas"
    pallas = build_model(config)
    np.testing.assert_allclose(jax.jit(pallas.apply)({"params": params}, x, t, y),
                               jax.jit(model.apply)({"params": params}, x, t, y), atol=1e-5)
