"""InceptionV3 as the FID graph defines it (TF ``inception-2015-12-05``), in Flax Linen.

The architecture is torchvision's Inception3 with the changes that pytorch-fid's
``FIDInceptionA/C/E_1/E_2`` make to re-create the TensorFlow FID graph:

- the 3×3 average pools inside the A, C and first E blocks exclude the zero padding
  from the mean (``count_include_pad=False``);
- the pool branch of the last E block (``Mixed_7c``) is a 3×3 *max* pool;
- the classifier has 1008 logits (``fc``: 2048 → 1008).

Every convolution is ``relu(BN(conv(x)))`` with BN ``ε = 1e-3`` on running statistics.
Outputs (names as in ADM's evaluator):

- ``pool_3``: the 2048 global-average-pooled features of ``Mixed_7c`` (FID, precision/recall);
- ``spatial``: TF's ``mixed_6/conv`` = ``Mixed_6d.branch1x1`` after its ReLU, a 17×17×192
  map of which ADM keeps the first 7 channels, flattened in (H, W, C) order: 2023 values (sFID);
- ``logits_unbiased``: ``pool_3 · W`` (no bias; the softmax input of ADM's Inception Score);
- ``logits``: ``pool_3 · W + b``.

Inputs are uint8 NHWC RGB images of any size, resized to 299×299 by one of two rules:

- ``"pytorch_fid"``: ``x/255`` resized bilinearly with half-pixel centres
  (``F.interpolate(..., align_corners=False)``, no antialiasing), then ``2x − 1``;
- ``"tf1"``: TensorFlow 1's ``ResizeBilinear`` (source coordinate ``i·in/out``, no half-pixel
  offset), then ``(x − 128)/128`` — the preprocessing inside the graph ADM's evaluator runs.

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` state dict (read with
torch), or the ``.npz`` that :func:`convert_torch_weights` writes from it (no torch needed)::

    python -m kindjax.evaluation.inception --src pt_inception-2015-12-05-6726825d.pth --out inception.npz
"""
from __future__ import annotations

import functools
import io
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh

from kindjax import cli, sharding
from kindjax.io.paths import as_path

INCEPTION_SIZE = 299
NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
PREPROCESSING = ("pytorch_fid", "tf1")
_HIGHEST = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
    """``relu(BN(conv(x)))``: bias-free convolution, BatchNorm (ε = 1e-3) on running statistics."""

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=_HIGHEST, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3 mean, stride 1, padding 1, padded positions excluded from the mean (TF's pool)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):
    """[1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1] concatenated (35×35 blocks)."""

    pool_features: int

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, dtype=self.dtype, name="branch1x1")(x)
        b5 = BasicConv2d(48, dtype=self.dtype, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), dtype=self.dtype, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, dtype=self.dtype, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, dtype=self.dtype, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 → 17: [3×3/2 | 1×1→3×3→3×3/2 | max-pool/2]."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=2, dtype=self.dtype, name="branch3x3")(x)
        bd = BasicConv2d(64, dtype=self.dtype, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, dtype=self.dtype, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """17×17 blocks with factorised 7×7 convolutions; the 1×1 branch comes first."""

    channels_7x7: int

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns the block output and its ``branch1x1`` map (TF ``mixed_N/conv``)."""
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, dtype=self.dtype, name="branch1x1")(x)
        b7 = BasicConv2d(c7, dtype=self.dtype, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), dtype=self.dtype, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), dtype=self.dtype, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, dtype=self.dtype, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), dtype=self.dtype, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), dtype=self.dtype, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), dtype=self.dtype, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), dtype=self.dtype, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, dtype=self.dtype, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """Grid reduction 17 → 8: [1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool/2]."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, dtype=self.dtype, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, dtype=self.dtype, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, dtype=self.dtype, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), dtype=self.dtype, name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), dtype=self.dtype, name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, dtype=self.dtype, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """8×8 blocks with split 1×3 / 3×1 outputs; ``pool`` is "avg" (Mixed_7b) or "max" (Mixed_7c)."""

    pool: str

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, dtype=self.dtype, name="branch1x1")(x)
        b3 = BasicConv2d(384, dtype=self.dtype, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), dtype=self.dtype, name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), dtype=self.dtype, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, dtype=self.dtype, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), dtype=self.dtype, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), dtype=self.dtype, name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), dtype=self.dtype, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1)
        bp = BasicConv2d(192, dtype=self.dtype, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID InceptionV3 on preprocessed ``(N, 299, 299, 3)`` inputs in [-1, 1] (see module doc);
    ``dtype`` is the compute dtype (f32 by default, as FID is defined; parameters and outputs f32)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(self.dtype)
        x = BasicConv2d(32, (3, 3), strides=2, dtype=self.dtype, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), dtype=self.dtype, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), dtype=self.dtype, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = BasicConv2d(80, dtype=self.dtype, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), dtype=self.dtype, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, 2)
        x = InceptionA(32, dtype=self.dtype, name="Mixed_5b")(x)
        x = InceptionA(64, dtype=self.dtype, name="Mixed_5c")(x)
        x = InceptionA(64, dtype=self.dtype, name="Mixed_5d")(x)
        x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
        x, _ = InceptionC(128, dtype=self.dtype, name="Mixed_6b")(x)
        x, _ = InceptionC(160, dtype=self.dtype, name="Mixed_6c")(x)
        x, mixed_6_conv = InceptionC(160, dtype=self.dtype, name="Mixed_6d")(x)
        x, _ = InceptionC(192, dtype=self.dtype, name="Mixed_6e")(x)
        x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
        x = InceptionE("avg", dtype=self.dtype, name="Mixed_7b")(x)
        x = InceptionE("max", dtype=self.dtype, name="Mixed_7c")(x)
        pool_3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        kernel = self.param("fc_kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_LOGITS))
        bias = self.param("fc_bias", nn.initializers.zeros, (NUM_LOGITS,))
        logits_unbiased = jnp.dot(pool_3.astype(self.dtype), kernel.astype(self.dtype),
                                  precision=_HIGHEST).astype(jnp.float32)
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].astype(jnp.float32)
        return {"pool_3": pool_3, "spatial": spatial.reshape(spatial.shape[0], -1),
                "logits_unbiased": logits_unbiased, "logits": logits_unbiased + bias}


def resize_matrix(in_size: int, out_size: int, rule: str) -> np.ndarray:
    """``(out_size, in_size)`` bilinear interpolation weights along one axis.

    Source coordinate of output ``i``: ``s = max((i + ½)·in/out − ½, 0)`` ("pytorch_fid") or
    ``s = i·in/out`` ("tf1"); output ``i`` = ``(1 − λ)·x[⌊s⌋] + λ·x[min(⌊s⌋ + 1, in − 1)]``, λ = s − ⌊s⌋.
    """
    if rule not in PREPROCESSING:
        raise ValueError(f"unknown Inception preprocessing {rule!r}; use one of {PREPROCESSING}")
    scale = in_size / out_size
    i = np.arange(out_size, dtype=np.float64)
    source = np.maximum((i + 0.5) * scale - 0.5, 0.0) if rule == "pytorch_fid" else i * scale
    lo = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = source - lo
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), hi), frac)
    return weights.astype(np.float32)


def preprocess(images: jax.Array, rule: str = "pytorch_fid") -> jax.Array:
    """uint8 (or 0..255 float) NHWC RGB → float32 ``(N, 299, 299, 3)`` network input.

    ``"pytorch_fid"``: ``2·R(x/255) − 1``; ``"tf1"``: ``(R_tf1(x) − 128)/128``; R is
    :func:`resize_matrix` applied along H and W.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
    x = images.astype(jnp.float32)
    rows = jnp.asarray(resize_matrix(images.shape[1], INCEPTION_SIZE, rule))
    cols = jnp.asarray(resize_matrix(images.shape[2], INCEPTION_SIZE, rule))
    x = jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols, precision=_HIGHEST)
    return 2.0 * (x / 255.0) - 1.0 if rule == "pytorch_fid" else (x - 128.0) / 128.0


def _torch_key(path: tuple[str, ...], collection: str) -> str:
    """Flax variable path → pytorch-fid state-dict key."""
    *module, leaf = path
    if module == [] and leaf.startswith("fc_"):
        return "fc." + {"fc_kernel": "weight", "fc_bias": "bias"}[leaf]
    torch_leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                  ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
    return ".".join(module + [torch_leaf[(collection, leaf)]])


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Conv ``(O, I, kh, kw)`` → ``(kh, kw, I, O)``; fc ``(1008, 2048)`` → ``(2048, 1008)``."""
    if leaf == "kernel":
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "fc_kernel":
        return array.T
    return array


def variables_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid Inception state dict (arrays by torch key) → Flax ``{params, batch_stats}``.

    Every variable of :class:`FIDInceptionV3` must be present with the right shape, and no
    other key (``*.num_batches_tracked`` aside).
    """
    abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32))
    used: set[str] = set()
    problems: list[str] = []

    def convert(path, leaf):
        names = tuple(k.key for k in path)
        key = _torch_key(names[1:], names[0])
        used.add(key)
        if key not in state_dict:
            problems.append(f"missing {key}")
            return None
        array = _to_flax_layout(np.asarray(state_dict[key], np.float32), names[-1])
        if array.shape != leaf.shape:
            problems.append(f"{key}: shape {np.shape(state_dict[key])} does not fit {leaf.shape}")
        return jnp.asarray(array)

    variables = jax.tree_util.tree_map_with_path(convert, abstract)
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
    problems += [f"unexpected {k}" for k in unexpected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ValueError(f"not a pytorch-fid FID Inception state dict: {shown}")
    return variables


def _read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading the PyTorch checkpoint {path} needs torch. Convert it once where torch is installed "
            f"(python -m kindjax.evaluation.inception --src {path} --out OUT.npz) and point eval.inception_weights "
            f"at the .npz") from None
    with as_path(path).open("rb") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_torch_weights(src: str, dst: str) -> None:
    """Writes pytorch-fid's ``.pth`` state dict as an ``.npz`` (same keys and layouts)."""
    state = _read_torch_state_dict(src)
    variables_from_state_dict(state)  # refuse anything that is not the FID Inception
    with as_path(dst).open("wb") as f:
        np.savez(f, **state)


def load_inception(path: str) -> tuple[FIDInceptionV3, dict[str, Any]]:
    """The module and its variables from a pytorch-fid ``.pth`` or a converted ``.npz``."""
    if not path or not as_path(path).is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path!r}: set eval.inception_weights to pytorch-fid's "
            f"pt_inception-2015-12-05-6726825d.pth (or its .npz from convert_torch_weights)")
    if path.endswith(".npz"):
        with as_path(path).open("rb") as file, np.load(file) as f:
            state = {k: f[k] for k in f.files}
    else:
        state = _read_torch_state_dict(path)
    return FIDInceptionV3(), variables_from_state_dict(state)


@functools.lru_cache(maxsize=8)
def _features_fn(module: FIDInceptionV3, rule: str, mesh: Mesh | None) -> Callable:
    def run(variables, images):
        return module.apply(variables, preprocess(images, rule))

    if mesh is None:
        return jax.jit(run)
    return jax.jit(run, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.batch_sharding(mesh))


def inception_features(module: FIDInceptionV3, variables: dict[str, Any], images: np.ndarray,
                       batch_size: int = 200, preprocessing: str = "pytorch_fid", mesh: Mesh | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """``pool_3`` (N, 2048), ``spatial`` (N, 2023) and ``logits_unbiased`` (N, 1008) of uint8
    NHWC RGB ``images``, in batches of ``batch_size`` (split over ``mesh``'s batch axes; the last
    batch is padded). ``progress(done, total)`` is called after each batch."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        dims = {"pool_3": POOL_DIM, "spatial": SPATIAL_DIM, "logits_unbiased": NUM_LOGITS}
        return {k: np.zeros((0, d), np.float32) for k, d in dims.items()}
    fn = _features_fn(module, preprocessing, mesh)
    if mesh is not None:  # placed once, not at every batch
        variables = jax.device_put(variables, sharding.replicated(mesh))
    return sharding.map_batches(lambda batch, _: fn(variables, batch), images, batch_size, mesh, progress)


def main(argv: list[str]) -> None:
    """:func:`convert_torch_weights` of ``--src`` into ``--out``."""
    del argv
    src, out = flags.FLAGS.src, flags.FLAGS.out
    if not as_path(src).is_file():
        raise FileNotFoundError(f"--src={src} is not a file: give pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    convert_torch_weights(src, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    flags.DEFINE_string("src", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (read with torch).")
    flags.DEFINE_string("out", None, "The .npz to write (eval.inception_weights without torch).")
    flags.mark_flags_as_required(["src", "out"])
    cli.run(main)
