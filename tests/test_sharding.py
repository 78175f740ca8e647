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


def class_row_loss(params, rows, frozen, key):
    """A loss whose gradient in ``params["tailors"]`` lives in the rows of the batch's labels only."""
    del frozen, key
    tailor = jnp.where((rows["y"] < params["tailors"].shape[0])[:, None],
                       params["tailors"][jnp.clip(rows["y"], 0, params["tailors"].shape[0] - 1)], 0.0)
    per_row = jnp.sum((tailor * rows["x"] + params["w"] * rows["x"]) ** 2, axis=1)
    return jnp.mean(per_row), per_row


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_gathered_class_rows_equal_the_all_reduce_and_the_whole_batch_gradient(data, fsdp):
    """Each device sends only its labels' rows (repeated labels once, the null class none): the summed
    gradient equals the all-reduced one and the gradient of the whole batch on one device."""
    rng = np.random.default_rng(3)
    classes, width = 40, 128                # 40 rows of 128 (split over fsdp along the 128); 2 samples per device
    params = {"tailors": jnp.asarray(rng.normal(size=(classes, width)), jnp.float32),
              "w": jnp.asarray(rng.normal(size=(width,)), jnp.float32)}
    labels = np.array([5, 5, 7, classes, 7, 0, 39, 5, 12, 12, classes, 3, 0, 0, 21, 7], np.int32)
    rows = {"x": jnp.asarray(rng.normal(size=(16, width)), jnp.float32), "y": jnp.asarray(labels)}
    mesh = sharding.make_mesh(data, fsdp, jax.devices()[:8])
    class_rows = {"tailors": True, "w": False}
    assert sharding.leaf_spec((classes, width), fsdp) == (sharding.P() if fsdp == 1 else sharding.P(None, "fsdp"))
    (loss, _), want = jax.value_and_grad(class_row_loss, has_aux=True)(params, rows, None, None)
    got = {}
    for how in ("gather", "all_reduce"):
        fn = sharding.data_parallel_value_and_grad(class_row_loss, mesh, class_rows=class_rows, labels="y",
                                                   class_row_reduce=how)
        placed = jax.device_put(rows, sharding.batch_sharding(mesh))
        placed_params = jax.device_put(params, sharding.state_shardings(mesh, params))
        (sharded_loss, _), got[how] = jax.jit(fn)(placed_params, placed, None, None)
        np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
        for name in want:
            np.testing.assert_allclose(np.asarray(got[how][name]), np.asarray(want[name]), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{how} {name}")
    absent = np.setdiff1d(np.arange(classes), labels)
    assert np.all(np.asarray(got["gather"]["tailors"])[absent] == 0)
    assert np.all(np.abs(np.asarray(got["gather"]["tailors"])[np.unique(labels[labels < classes])]) > 0)


def test_class_row_reduction_moves_the_fewer_rows():
    # all-reduce: 2(S-1)/S·R rows per device; gather: (S-1)·B_s rows.
    assert sharding.class_row_reduction("auto", rows=157, local_batch=64, devices=4) == "gather"      # 192 < 235.5
    assert sharding.class_row_reduction("auto", rows=100, local_batch=64, devices=4) == "all_reduce"  # 192 > 150
    assert sharding.class_row_reduction("all_reduce", rows=157, local_batch=1, devices=4) == "all_reduce"
