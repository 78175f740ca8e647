"""Test setup: 8 fake CPU devices and a compilation cache (set before JAX is imported), small shared configs."""
import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, inherited by the CLI subprocesses: the many
# runs of the same tiny models compile each program once (the suite's time is mostly XLA compiles).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kindjax-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# PyTorch (the reference implementations) probes for Triton at import; Triton's own LLVM, loaded
# into a process that already holds jaxlib's, can crash the interpreter (seen as a segfault in
# libtriton's import, depending on test order). The tests run PyTorch on the CPU only and need
# no Triton: make it unimportable, which torch treats as "not installed".
sys.modules.setdefault("triton", None)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def tiny_overrides() -> list[str]:
    """Command-line overrides that shrink configs/dit_digits.py to a seconds-long run."""
    return ["--config.model.hidden_size=32", "--config.model.depth=2", "--config.model.num_heads=2",
            "--config.train.batch_size=16", "--config.optim.warmup_steps=0", "--config.train.num_steps=8", "--config.train.log_every=1",
            "--config.train.checkpoint_every=4", "--config.train.sample_every=1000",
            "--config.sample.num_steps=4", "--config.sample.grid_per_class=1",
            "--config.eval.num_samples=20", "--config.eval.batch_size=20"]


def tiny_config():
    from configs.dit_digits import get_config

    c = get_config()
    c.model.update(hidden_size=64, depth=2, num_heads=2)
    c.optim.warmup_steps = 0
    c.train.update(batch_size=16, num_steps=8, log_every=1, checkpoint_every=4, sample_every=1000)
    c.sample.update(num_steps=4, grid_per_class=1)
    c.eval.update(num_samples=20, batch_size=20)
    return c


def single_device_environ() -> dict[str, str]:
    """Environment for a subprocess run of the CLI on one CPU device."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def single_device_env():
    """:func:`single_device_environ` as a fixture."""
    return single_device_environ()


def read_names(monkeypatch):
    """Names of the arrays Orbax deserializes (as numpy) from now on."""
    import orbax.checkpoint as ocp

    names = []
    deserialize = ocp.type_handlers.NumpyHandler.deserialize

    async def spy(self, infos, args=None):
        names.extend(info.name for info in infos)
        return await deserialize(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.NumpyHandler, "deserialize", spy)
    return names


def write_png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """root/{beta,alpha,gamma}/ with PNGs of odd sizes (one upper-case .PNG), a text file, and one
    corrupt JPEG in gamma."""
    rng = np.random.default_rng(7)
    root = tmp_path / "images"
    originals = {}
    for name, count in (("beta", 2), ("alpha", 3), ("gamma", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (int(rng.integers(9, 40)), int(rng.integers(9, 40)), 3), dtype=np.uint8)
            filename = f"img{i}.PNG" if i == 1 else f"img{i}.png"
            write_png(root / name / filename, pixels)
            originals[(name, filename)] = pixels
    (root / "alpha" / "notes.txt").write_text("not an image")
    (root / "gamma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root, originals
