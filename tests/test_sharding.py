"""Batched, mesh-split application of a function (``sharding.map_batches``) against applying it whole."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kindjax import sharding


def rowwise(x):
    """A row-independent function with a pytree result."""
    return {"sum": jnp.sum(x ** 2, axis=1), "scaled": 3.0 * x - 1.0}


@pytest.mark.parametrize("mesh_devices", [None, 8])
def test_map_batches_equals_the_function_applied_whole(mesh_devices):
    inputs = np.random.default_rng(0).normal(size=(21, 5)).astype(np.float32)
    mesh = None if mesh_devices is None else sharding.make_mesh(devices=jax.devices()[:mesh_devices])
    batches, done = [], []

    def fn(batch, i):
        batches.append((i, batch.shape))
        return jax.jit(rowwise)(batch)

    out = sharding.map_batches(fn, inputs, 6, mesh, lambda n, total: done.append((n, total)))
    want = {"sum": np.sum(inputs.astype(np.float64) ** 2, axis=1), "scaled": 3.0 * inputs.astype(np.float64) - 1.0}
    for key in want:
        np.testing.assert_allclose(out[key], want[key], rtol=1e-6, atol=1e-6)
    size = 6 if mesh is None else 8                     # rounded up to a multiple of the devices
    count = -(-21 // size)
    assert batches == [(i, (size, 5)) for i in range(count)]
    assert done == [(min(21, size * (i + 1)), 21) for i in range(count)]
    with pytest.raises(ValueError, match="at least one"):
        sharding.map_batches(fn, inputs[:0], 6, mesh)
