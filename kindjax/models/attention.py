"""Scaled dot-product attention ``softmax(q·kᵀ/√h)·v`` with a choice of implementation.

``config.model.attention`` (checked by :func:`kindjax.config.validate`):

- ``xla``: :func:`xla_attention`, two einsums around an f32 softmax (the computation of
  ``jax.nn.dot_product_attention(implementation="xla")``, with ``q`` scaled before the product);
  in bf16 the two matmuls take bf16 operands and accumulate the scores in f32.  Writes out the
  full ``(B, heads, N, N)`` score matrix.
- ``cudnn``: cuDNN's fused flash attention (``implementation="cudnn"``), GPU only, bf16/fp16
  inputs, head dim ≤ 128 and a multiple of 8.
- ``pallas``: the Pallas TPU splash-attention kernel (``jax.experimental.pallas.ops.tpu``), with
  the head dim and the token count zero-padded to multiples of 128 (the padded keys masked out).
  Off a TPU the kernel runs in Pallas's interpret mode: correct but slow, for tests.  The kernel
  runs on one device's data: on a mesh (under ``jit`` with batch-sharded inputs, or inside
  ``jax.set_mesh``) it is wrapped in a ``jax.shard_map`` manual over every mesh axis (a Mosaic
  kernel cannot be partitioned automatically, size-1 axes included), the batch split over
  ``data`` and ``fsdp``, each device attending over its own rows, with nothing communicated.
- ``auto``: :func:`resolve` — cuDNN on a GPU when the dtype and head dim allow it, splash on a
  TPU, otherwise ``xla``.

"On a TPU" means the inputs' mesh is made of TPU devices (:func:`platform_of`), not that JAX's
default backend is one: a step lowered for compile-only TPU devices on a CPU host
(``python -m kindjax.tools.preflight``) takes the TPU paths.

:func:`check_against_xla` compares one implementation with the XLA path on random inputs
(outputs and gradients); the GPU device check calls it for ``cudnn``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kindjax.config import ATTENTION_IMPLEMENTATIONS
from kindjax.sharding import BATCH_AXES

#: TPU lane width: splash attention tiles the head dim and the tokens in multiples of it.
LANES = 128


def cudnn_supports(dtype: jnp.dtype, head_dim: int) -> bool:
    """cuDNN flash attention's limits: fp16/bf16 inputs, head dim ≤ 128 and a multiple of 8."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 128 \
        and head_dim % 8 == 0


def resolve(implementation: str, dtype: jnp.dtype, head_dim: int, platform: str | None = None) -> str:
    """The implementation ``auto`` stands for on ``platform`` (default: JAX's backend; the model passes
    its inputs' :func:`platform_of`), else
    ``implementation`` itself after checking it can run there."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r}: use one of {list(ATTENTION_IMPLEMENTATIONS)}")
    platform = platform or jax.default_backend()
    if implementation == "auto":
        if platform == "gpu" and cudnn_supports(dtype, head_dim):
            return "cudnn"
        return "pallas" if platform == "tpu" else "xla"
    if implementation == "cudnn":
        if platform != "gpu":
            raise ValueError(f"model.attention='cudnn' needs a GPU, but JAX runs on {platform!r}; "
                             f"use 'auto' or 'xla'")
        if not cudnn_supports(dtype, head_dim):
            raise ValueError(f"model.attention='cudnn' needs bfloat16/float16 inputs and a head dim ≤ 128 "
                             f"divisible by 8, got {jnp.dtype(dtype).name} and head dim {head_dim}; "
                             f"set model.dtype='bfloat16' or use 'auto'")
    if implementation == "pallas" and platform == "gpu":
        raise ValueError("model.attention='pallas' is the TPU splash kernel; on a GPU use 'cudnn' or 'auto'")
    return implementation


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=32)
def _splash_kernel(tokens: int, padded: int, heads: int, interpret: bool):
    """A splash-attention kernel over ``(heads, padded, h)``: every query sees the first ``tokens`` keys.
    Built eagerly (``ensure_compile_time_eval``) so that its mask arrays are constants, never tracers of
    the trace that first asked for it: the kernel is cached and reused by later traces."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    visible = np.zeros((padded, padded), bool)
    visible[:, :tokens] = True
    mask = splash.MultiHeadMask([splash.NumpyMask(visible) for _ in range(heads)])
    block = min(padded, 512)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)


def _mesh_of(x: jax.Array) -> jax.sharding.AbstractMesh | None:
    """The mesh ``x`` is laid out on: ``jax.set_mesh``'s, else the one its type carries under ``jit``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return None if mesh is None or mesh.empty else mesh


def platform_of(x: jax.Array) -> str:
    """The platform (``tpu``, ``gpu``, ``cpu``) that computes on ``x``: its mesh's devices when it has one
    (so a step lowered for compile-only TPU devices on a CPU host says ``tpu``), else the devices of a
    concrete array, else JAX's default backend."""
    device = getattr(_mesh_of(x), "abstract_device", None)
    if device is not None:
        return device.platform
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return next(iter(x.devices())).platform
    return jax.default_backend()


def splash_mesh(x: jax.Array) -> tuple[jax.sharding.AbstractMesh, tuple[str, ...], tuple[str, ...]] | None:
    """``(mesh, free, batch)`` for ``x``'s mesh (:func:`_mesh_of`): ``free`` its axes not already manual
    (inside a ``shard_map``), size-1 axes included — a Mosaic kernel cannot be partitioned automatically,
    so its ``shard_map`` must be manual over all of them —, ``batch`` those of ``free`` that split the
    batch (:data:`kindjax.sharding.BATCH_AXES`); None without a mesh or with every axis already manual."""
    mesh = _mesh_of(x)
    if mesh is None:
        return None
    free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if not free:
        return None
    return mesh, free, tuple(a for a in BATCH_AXES if a in free)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool | None = None) -> jax.Array:
    """Splash attention for ``(B, N, heads, h)`` inputs: ``q`` pre-scaled by ``1/√h``, ``h`` and ``N``
    zero-padded to multiples of :data:`LANES` (zero head-dim columns change no score; padded keys are
    masked out, padded queries sliced off).  ``interpret``: by default when ``q`` is not computed on a
    TPU (:func:`platform_of`).  On a mesh (:func:`splash_mesh`) each device runs the kernel on its rows
    of the batch, in a ``jax.shard_map`` manual over every mesh axis."""
    interpret = platform_of(q) != "tpu" if interpret is None else interpret
    return on_each_device(
        functools.partial(_splash_local, interpret=interpret), (q, k, v),
        lambda batch, devices: f"splash attention splits the batch over the mesh axes {batch} ({devices} devices), "
                               f"but the batch has {q.shape[0]} rows; use a batch divisible by {devices}")


def on_each_device(local: Callable[..., jax.Array], arrays: Sequence[jax.Array],
                   refuse: Callable[[tuple[str, ...], int], str]) -> jax.Array:
    """``local(*arrays)`` for a Mosaic kernel, which XLA does not partition: on a mesh with axes not yet
    manual (:func:`splash_mesh`), in a ``jax.shard_map`` manual over all of them, the leading axis of
    every array (and of the result) split over the batch axes; ValueError ``refuse(batch axes, devices)``
    when that axis does not divide.  Off a mesh, ``local(*arrays)``."""
    found = splash_mesh(arrays[0])
    if found is None:
        return local(*arrays)
    mesh, free, batch = found
    devices = math.prod(mesh.shape[a] for a in batch)
    if arrays[0].shape[0] % devices:
        raise ValueError(refuse(batch, devices))
    rows = jax.sharding.PartitionSpec(batch or None)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows,) * len(arrays), out_specs=rows,
                         axis_names=set(free), check_vma=False)(*arrays)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool) -> jax.Array:
    """:func:`splash_attention` on the rows this device holds."""
    b, n, heads, h = q.shape
    padded_n, padded_h = _round_up(n, LANES), _round_up(h, LANES)
    q = q * jnp.asarray(h ** -0.5, q.dtype)

    def layout(x):   # (B, N, heads, h) → (B, heads, N', h')
        return jnp.pad(x, ((0, 0), (0, padded_n - n), (0, 0), (0, padded_h - h))).transpose(0, 2, 1, 3)

    kernel = _splash_kernel(n, padded_n, heads, interpret)
    out = jax.vmap(kernel)(layout(q), layout(k), layout(v))
    return out.transpose(0, 2, 1, 3)[:, :n, :, :h].astype(q.dtype)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q·kᵀ/√h)·v`` for ``(B, N, heads, h)`` inputs as two einsums: ``q`` is scaled by
    ``1/√h`` before the product (``N·h`` multiplies per head rather than ``N²`` on the scores),
    the scores accumulate and go through the softmax in f32, and the probabilities are cast to
    ``v``'s dtype for the second product.  In bf16 (fp16) the scores' product names the
    ``BF16_BF16_F32`` (``F16_F16_F32``) dot algorithm, so its gradients also take bf16 (fp16)
    operands, as in ``jax.nn.dot_product_attention``.  Equal to that function's XLA path within
    rounding, and faster on the CPU (docs/benchmarks.md, "Where the CPU step's time goes")."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    algorithm = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q.dtype))
    scores = jnp.einsum("bqnh,bknh->bnqk", q * scale, k, precision=algorithm,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla",
                          interpret: bool | None = None) -> jax.Array:
    """``softmax(q·kᵀ/√h)·v`` per head for ``(B, N, heads, h)`` inputs, by ``implementation``
    (``auto`` resolved by :func:`resolve`); the output has ``q``'s shape and dtype."""
    chosen = resolve(implementation, q.dtype, q.shape[-1], platform_of(q))
    if chosen == "pallas":
        return splash_attention(q, k, v, interpret)
    if chosen == "cudnn" and implementation == "auto":
        try:   # an old cuDNN (or none) refuses at trace time: fall back to XLA
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (RuntimeError, NotImplementedError, ValueError):
            chosen = "xla"
    if chosen == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return xla_attention(q, k, v)


def check_against_xla(implementation: str, shape: tuple[int, int, int, int] = (2, 256, 16, 72),
                      dtype: jnp.dtype = jnp.bfloat16, seed: int = 0, atol: float | None = None,
                      interpret: bool | None = None) -> dict[str, float]:
    """Max abs differences of ``implementation``'s output and gradients (w.r.t. q, k, v of
    ``sum(out · w)`` for a random ``w``) from the XLA path's, on N(0, 1) inputs of ``shape``
    ``(B, N, heads, h)`` (DiT-XL/2's by default).  Raises ``AssertionError`` beyond ``atol``
    (default 2e-2 for bf16/fp16 — a few bf16 ulps of O(1) values —, 2e-5 for f32)."""
    atol = atol if atol is not None else (2e-5 if jnp.dtype(dtype) == jnp.float32 else 2e-2)
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
    w = jax.random.normal(keys[3], shape, jnp.float32)

    def run(impl):
        def loss(q, k, v):
            return jnp.sum(dot_product_attention(q, k, v, impl, interpret).astype(jnp.float32) * w)
        out = dot_product_attention(q, k, v, impl, interpret)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        return [np.asarray(a.astype(jnp.float32)) for a in (out, *grads)]

    errors = {name: float(np.max(np.abs(a - b)))
              for name, a, b in zip(("out", "dq", "dk", "dv"), run(implementation), run("xla"))}
    bad = {name: e for name, e in errors.items() if not e <= atol}
    if bad:
        raise AssertionError(f"attention {implementation!r} differs from XLA beyond {atol}: {bad}")
    return errors
