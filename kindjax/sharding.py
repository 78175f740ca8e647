"""Device mesh and parameter sharding rules (``jax.jit`` + ``NamedSharding``).

Mesh axes: ``data`` (pure data parallelism) and ``fsdp`` (data parallel, with
parameters and optimizer state sharded), laid out by ``jax.experimental.mesh_utils``; with
``mesh.dcn_data`` > 1 the ``data`` axis is split into that many outer blocks (TPU slices, or
GPU nodes) joined by the data-centre network, and ``fsdp`` stays inside one.  The batch is split over both axes.
Rule for every array of the train state (parameters, EMA, optimizer moments):
a leaf with at least ``min_size`` elements is split over ``fsdp`` along its
largest axis that the ``fsdp`` size divides; every other leaf is replicated.
The rule depends on the shape only, so an optimizer moment gets the sharding of
its parameter.

The gradient of the train step is data parallel by hand (:func:`data_parallel_value_and_grad`):
each device differentiates the loss of its own batch rows inside a ``jax.shard_map`` manual over
the whole mesh (the FSDP-sharded leaves all-gathered first), and the gradients are reduced
explicitly, in a chosen dtype (``train.grad_reduce_dtype``, f32 by default, as PyTorch DDP does):
no activation is ever resharded, and no bf16 partial sum is reduced.  Under a class gate the gradient
of a class-row leaf (tailors, label table) is non-zero only in the rows of the device's own labels:
those rows alone can be gathered instead of the whole leaf reduced (:func:`class_row_reduction`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def mesh_shape(num_devices: int, data: int, fsdp: int) -> tuple[int, int]:
    """Resolves ``-1`` (all remaining devices) and checks ``data·fsdp`` equals the device count."""
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh: only one of data and fsdp may be -1")
    if data == -1:
        data, rem = divmod(num_devices, fsdp)
        if rem:
            raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices")
    elif fsdp == -1:
        fsdp, rem = divmod(num_devices, data)
        if rem:
            raise ValueError(f"config.mesh.data={data} does not divide the {num_devices} devices")
    if data * fsdp != num_devices:
        raise ValueError(f"config.mesh data×fsdp = {data}×{fsdp} = {data * fsdp}, but {num_devices} "
                         f"devices are visible; set config.mesh.data=-1 to use them all")
    return data, fsdp


def dcn_granules(devices: list[Any], dcn_data: int) -> list[list[Any]]:
    """``devices`` split into the ``dcn_data`` groups joined by the slow network (DCN): TPU slices
    (``slice_index``) where the devices span several, else equal blocks of consecutive processes
    (the nodes of a SLURM job: ``srun`` numbers the tasks of a node consecutively)."""
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    processes = sorted({d.process_index for d in devices})

    def granule(device: Any) -> int:
        if len(slices) > 1:
            return slices.index(getattr(device, "slice_index", 0))
        return processes.index(device.process_index) * dcn_data // len(processes)

    granules: dict[int, list[Any]] = {}
    for device in devices:
        granules.setdefault(granule(device), []).append(device)
    sizes = {len(g) for g in granules.values()}
    if len(granules) != dcn_data or len(sizes) != 1:
        raise ValueError(f"config.mesh.dcn_data={dcn_data}, but the devices form {len(granules)} group(s) of "
                         f"sizes {sorted(len(g) for g in granules.values())} (TPU slices, or nodes of processes); "
                         f"set config.mesh.dcn_data to the number of slices or nodes (1: one)")
    return [granules[k] for k in sorted(granules)]


def device_grid(devices: list[Any], data: int, fsdp: int, dcn_data: int = 1) -> np.ndarray:
    """The ``(data, fsdp)`` array of devices, laid out by ``jax.experimental.mesh_utils`` for the
    interconnect: ``fsdp`` (and the inner part of ``data``) inside one slice or node, the
    ``data`` axis split into ``dcn_data`` outer blocks, one per slice or node."""
    if data % dcn_data:
        raise ValueError(f"config.mesh.dcn_data={dcn_data} does not divide the data axis of {data} devices")
    blocks = [mesh_utils.create_device_mesh((data // dcn_data, fsdp), granule, allow_split_physical_axes=True)
              for granule in (dcn_granules(devices, dcn_data) if dcn_data > 1 else [devices])]
    return np.concatenate(blocks, axis=0)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Any = None, dcn_data: int = 1) -> Mesh:
    """The ``("data", "fsdp")`` mesh over ``devices`` (all of the job's by default) with the
    topology-aware layout of :func:`device_grid`; ``-1`` as in :func:`mesh_shape`."""
    devices = list(np.ravel(jax.devices() if devices is None else devices))
    data, fsdp = mesh_shape(len(devices), data, fsdp)
    return Mesh(device_grid(devices, data, fsdp, dcn_data), ("data", "fsdp"))


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2 ** 12) -> P:
    """PartitionSpec of one state leaf under the rule in the module docstring."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def fsdp_axis(spec: P) -> int | None:
    """The axis a :func:`leaf_spec` splits over ``fsdp``, or None for a replicated leaf."""
    return next((axis for axis, name in enumerate(spec) if name == "fsdp"), None)


#: ``train.class_row_reduce``: how the gradient of a class-row leaf is summed over the devices:
#: ``all_reduce`` the whole leaf (``2(S−1)/S·R`` rows move per device for ``R`` rows and ``S`` devices),
#: ``gather`` only each device's labelled rows (``(S−1)·B_s`` rows for ``B_s`` samples per device), or
#: ``auto``: whichever moves fewer, per leaf.  Gathering trades interconnect bytes for HBM work (two one-hot
#: products per leaf): docs/benchmarks.md has both on v5p-8; the default is ``all_reduce``.
CLASS_ROW_REDUCTIONS = ("auto", "all_reduce", "gather")


def class_row_reduction(setting: str, rows: int, local_batch: int, devices: int) -> str:
    """``"gather"`` or ``"all_reduce"`` for a class-row leaf of ``rows`` rows (see :data:`CLASS_ROW_REDUCTIONS`)."""
    if setting != "auto":
        return setting
    return "gather" if local_batch * devices < 2 * rows else "all_reduce"


def gather_class_rows(grad: jax.Array, labels: jax.Array, axes: Any) -> jax.Array:
    """``Σ_s grad_s`` over the devices of ``axes`` for a gradient whose rows other than ``labels``
    (the device's class ids; ids ≥ ``grad.shape[0]`` touch no row) are zero: each device sends the
    rows of its labels, the first occurrence of each (later ones and the out-of-range ones as zeros),
    with the labels; every device adds all of them into zeros.  Inside a ``shard_map`` over ``axes``.

    Rows are picked and added by one-hot products (exact at ``HIGHEST`` precision: each output is a
    sum of whole rows) rather than gather and scatter, which XLA:TPU costs at the whole leaf per row.
    """
    first = jnp.argmax(labels[:, None] == labels[None, :], axis=1) == jnp.arange(labels.shape[0])
    sent_labels = jnp.where(first, labels, grad.shape[0])          # a repeat sends nothing (no row)

    def one_hot(ids: jax.Array) -> jax.Array:
        return (ids[:, None] == jnp.arange(grad.shape[0])).astype(grad.dtype)

    flat = grad.reshape(grad.shape[0], -1)
    sent = jnp.dot(one_hot(sent_labels), flat, precision=jax.lax.Precision.HIGHEST)
    all_rows = jax.lax.all_gather(sent, axes, tiled=True)
    all_labels = jax.lax.all_gather(sent_labels, axes, tiled=True)
    return jnp.dot(one_hot(all_labels).T, all_rows, precision=jax.lax.Precision.HIGHEST).reshape(grad.shape)


def data_parallel_value_and_grad(fn: Callable[..., tuple[jax.Array, Any]], mesh: Mesh,
                                 reduce_dtype: Any = jnp.float32, class_rows: Any = None,
                                 labels: str = "y", class_row_reduce: str = "all_reduce",
                                 ) -> Callable[..., tuple[tuple[jax.Array, Any], Any]]:
    """``jax.value_and_grad(fn, has_aux=True)`` computed data parallel over ``mesh``'s batch axes.

    ``fn(params, rows, frozen, key) -> (loss, per_row)``: ``loss`` the mean over ``rows`` (a dict of
    arrays whose leading axis is the batch), ``per_row`` arrays with that leading axis; ``frozen``
    (or None) is only read; ``key`` (or None) is folded with the device's index on the batch axes, so
    each device draws its own randomness.  Each device runs ``fn`` on its ``S``-th of the rows with the
    whole ``params`` and ``frozen`` (the leaves :func:`leaf_spec` splits over ``fsdp`` all-gathered,
    in their own dtype), then the local gradients ``g_s`` are cast to ``reduce_dtype`` and reduced:
    ``∇L = (1/S) Σ_s g_s`` (psum over ``data``; over ``fsdp`` a reduce-scatter for the split leaves, a
    psum for the others), returned in each parameter's dtype with its sharding; ``L = (1/S) Σ_s L_s``.

    ``class_rows`` (a tree of bools like ``params``, or None): the leaves whose gradient on a device is
    non-zero only in the rows ``rows[labels]`` of that device (a class gate); each is summed as
    ``class_row_reduce`` says (:func:`class_row_reduction`, :func:`gather_class_rows`).
    """
    fsdp = mesh.shape["fsdp"]
    shards = mesh.shape["data"] * fsdp
    rows_spec = P(BATCH_AXES)

    def specs(tree: Any) -> Any:
        return jax.tree.map(lambda leaf: leaf_spec(tuple(leaf.shape), fsdp), tree)

    def gather(tree: Any, tree_specs: Any) -> Any:
        def one(leaf: jax.Array, spec: P) -> jax.Array:
            axis = fsdp_axis(spec)
            return leaf if axis is None else jax.lax.all_gather(leaf, "fsdp", axis=axis, tiled=True)
        return jax.tree.map(one, tree, tree_specs)

    def reduce(grad: jax.Array, spec: P, like: jax.Array, gathered: bool, row_labels: jax.Array) -> jax.Array:
        grad = grad.astype(reduce_dtype)
        axis = fsdp_axis(spec)
        if gathered:
            grad = gather_class_rows(grad, row_labels, BATCH_AXES)
            if axis is not None:   # this device's part of the fsdp split
                size = grad.shape[axis] // fsdp
                grad = jax.lax.dynamic_slice_in_dim(grad, jax.lax.axis_index("fsdp") * size, size, axis)
        elif axis is None:
            grad = jax.lax.psum(grad, BATCH_AXES)
        else:
            grad = jax.lax.psum(jax.lax.psum_scatter(grad, "fsdp", scatter_dimension=axis, tiled=True), "data")
        return (grad.astype(jnp.float32) / shards).astype(like.dtype)

    def wrapped(params: Any, rows: Any, frozen: Any, key: jax.Array | None):
        param_specs, frozen_specs = specs(params), specs(frozen)
        local_batch = jax.tree.leaves(rows)[0].shape[0] // shards
        flags = jax.tree.map(lambda _: False, params) if class_rows is None else class_rows
        gathered = jax.tree.map(lambda leaf, is_rows: bool(is_rows) and class_row_reduction(
            class_row_reduce, leaf.shape[0], local_batch, shards) == "gather", params, flags)

        def local(params, rows, frozen, key):
            whole = gather(params, param_specs)
            if key is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXES))
            (loss, per_row), grads = jax.value_and_grad(fn, has_aux=True)(whole, rows, gather(frozen, frozen_specs),
                                                                         key)
            grads = jax.tree.map(lambda g, spec, like, by_rows: reduce(g, spec, like, by_rows, rows.get(labels)),
                                 grads, param_specs, params, gathered)
            return (jax.lax.psum(loss, BATCH_AXES) / shards, per_row), grads

        row_specs = jax.tree.map(lambda _: rows_spec, rows)
        return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, row_specs, frozen_specs, P()),
                             out_specs=((P(), rows_spec), param_specs), check_vma=False)(params, rows, frozen, key)

    return wrapped


def state_shardings(mesh: Mesh, state_shapes: Any) -> Any:
    """NamedSharding for every leaf of a (shape-only) train state."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda s: NamedSharding(mesh, leaf_spec(tuple(s.shape), fsdp)), state_shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data`` and ``fsdp``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from ``host``, which every process holds whole; each process places only
    the slices of its own devices (so it also works when the mesh spans several processes)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The whole value of a global array on every process: read directly when this process holds
    all of it, all-gathered across processes when the mesh spans several (a TPU pod, SLURM)."""
    if array.is_fully_addressable or array.is_fully_replicated:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def map_batches(fn: Callable[[jax.Array, int], Any], inputs: np.ndarray, batch_size: int,
                mesh: Mesh | None = None, progress: Callable[[int, int], None] | None = None) -> Any:
    """``fn(batch, i)`` over ``inputs`` (N >= 1 rows) in batches of ``batch_size`` rounded up to a
    multiple of ``mesh``'s devices, each placed split over the batch axes (on one device without a
    mesh). The last batch is padded by repeating its last row and the padding is dropped; the results
    (a pytree of arrays) are read back with :func:`to_host` and concatenated. ``progress(done, total)``
    is called after each batch."""
    inputs = np.asarray(inputs)
    if len(inputs) == 0:
        raise ValueError("map_batches needs at least one input row")
    devices = 1 if mesh is None else mesh.devices.size
    size = -(-min(batch_size, len(inputs)) // devices) * devices
    rows = None if mesh is None else batch_sharding(mesh)
    outputs = []
    for i, start in enumerate(range(0, len(inputs), size)):
        chunk = inputs[start:start + size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        result = fn(jnp.asarray(padded) if mesh is None else put_global(padded, rows), i)
        outputs.append(jax.tree.map(lambda a: to_host(a)[:len(chunk)], result))
        if progress is not None:
            progress(start + len(chunk), len(inputs))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
