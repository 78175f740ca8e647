"""``gs://`` workdirs and data paths, run on a fake bucket that the real code reaches only as ``gs://``.

The fake bucket is one store (a directory outside the working directory) reached the two ways a
real bucket is: ``etils.epath`` reads and writes ``gs://`` through its fsspec backend, to which the
fake is registered as fsspec's ``gs``/``gcs`` filesystem (what ``gcsfs`` registers); TensorStore,
which writes Orbax's arrays itself, gets a ``file`` kvstore on the same store in place of its ``gcs``
driver.  Orbax's own ``gs://`` logic (commit-file atomicity, GCS deletes) runs as on GCS; only the
two network calls (the kvstore spec, the bucket's hierarchical-namespace query) are redirected.
Any ``os.path``/``open()`` left on a workdir would write ``<cwd>/gs:/bucket/...``: the tests run
in an empty working directory and check that it stays empty.
"""
import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry as fsspec_registry
from orbax.checkpoint._src.path import gcs_utils
from tensorboard.compat.proto import event_pb2

from conftest import ROOT, tiny_config, write_png
from kindjax import checkpoints
from kindjax.checkpoints.slicing import slice_checkpoint
from kindjax.data.folder import open_folder
from kindjax.data.latents import LatentDataset, read_index
from kindjax.evaluation import adm
from kindjax.papers.kind.layer import kind_config
from kindjax.checkpoints.learngene import load_learngene
from kindjax.io.paths import as_path
from kindjax.config import ConfigError
from kindjax.train.stages import check_workdir, run

RUN = "gs://bucket/run"


class FakeBucketFS(DirFileSystem):
    """fsspec's ``gs``/``gcs`` protocol on a local directory (``gs://b/k`` is ``<store>/b/k``)."""

    protocol = ("gs", "gcs")
    cachable = False
    store = ""

    def __init__(self, *args, **kwargs):   # etils passes gcsfs's options (finalize_on_close)
        super().__init__(path=self.store, fs=LocalFileSystem(auto_mkdir=True))


def read_events(path):
    """The ``Event`` protos of a TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
        at += 12 + length + 4
    return events


def _fake_kvstore(store):
    def kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(store, bucket, key)}
    return kvstore


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """The fake bucket's store (``gs://bucket/x`` is ``<store>/bucket/x``); the tests run in an empty cwd."""
    root = tmp_path_factory.mktemp("gcs")
    store, cwd = root / "store", root / "cwd"
    store.mkdir()
    cwd.mkdir()
    fs = type("Bucket", (FakeBucketFS,), {"store": str(store)})
    with pytest.MonkeyPatch.context() as mp:
        for name in ("gs", "gcs"):
            mp.setitem(fsspec_registry, name, fs)
        mp.setattr(gpath, "_is_tf_installed", lambda: False)   # epath's fsspec backend, not tf.io.gfile
        mp.setattr(gcs_utils, "get_kvstore_for_gcs", _fake_kvstore(str(store)))
        mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
        mp.chdir(cwd)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
        yield store
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert not os.listdir(cwd), f"written under the working directory: {os.listdir(cwd)}"


def test_the_fake_bucket_is_reached_as_gs(bucket):
    path = as_path("gs://bucket/probe/x.txt")
    assert str(path) == "gs://bucket/probe/x.txt" and not isinstance(path._backend, type(epath_backend.os_backend))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("hello")
    assert (bucket / "bucket" / "probe" / "x.txt").read_text() == "hello"
    assert [p.name for p in as_path("gs://bucket/probe").iterdir()] == ["x.txt"]
    assert os.path.abspath("gs://bucket/probe") != str(as_path("gs://bucket/probe"))   # what os.path did
    assert as_path("rel/dir") == as_path(os.path.join(os.getcwd(), "rel", "dir"))


def run_config(num_steps):
    config = tiny_config()
    config.train.update(num_steps=num_steps, checkpoint_every=2, sample_every=2, keep_checkpoints=1)
    config.eval.update(num_samples=16, batch_size=16)   # the grid's sampler shape: one compile
    return config


@pytest.fixture(scope="module")
def trained(bucket):
    """A digits run in ``gs://bucket/run``: 4 steps, then resumed to 6; its first metrics and the
    resumed run's console."""
    run(run_config(4), RUN)
    first = json.loads((bucket / "bucket" / "run" / "metrics.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()) as resumed:
        run(run_config(6), RUN)
    return first, resumed.getvalue()


@pytest.mark.slow  # 28 s (-n 2, 2 cores)
def test_training_workdir_on_gcs_holds_everything_and_resumes(bucket, trained, capsys):
    first, out = trained
    workdir = bucket / "bucket" / "run"
    assert first["step"] == 4 and "sample_accuracy" in first
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["step"] == 6 and np.isfinite(metrics["frechet_distance"])
    assert f"Resumed from {RUN} at step 4" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]                # rotated on the bucket
    assert (workdir / "checkpoints" / "6" / "params" / "manifest.ocdbt").is_file()   # TensorStore's arrays
    assert {"step_0000002.png", "step_0000004.png", "step_0000006.png"} <= set(os.listdir(workdir / "samples"))
    assert json.loads((workdir / "data_layout.json").read_text()) == {"process_count": 1}
    events = [e for name in os.listdir(workdir / "tensorboard") for e in read_events(workdir / "tensorboard" / name)]
    assert {e.step for e in events for v in e.summary.value if v.tag == "loss"} == set(range(1, 7))
    assert {e.step for e in events for v in e.summary.value if v.tag == "samples"} == {2, 4, 6}
    assert checkpoints.locate(RUN).meta["step"] == 6
    check_workdir(run_config(6), RUN)                # run.py's workdir check reads the bucket
    other = run_config(6)
    other.model.hidden_size = 32
    with pytest.raises(ConfigError, match="hidden_size"):
        check_workdir(other, RUN)



def test_kind_checkpoint_slice_and_learngene_on_gcs(bucket):
    """Orbax saves through the manager, slicing writes, and load_learngene reads, all on ``gs://``."""
    config = tiny_config()
    config.model.linear = kind_config(n_learngene=4, n_tailor=1)
    rng = np.random.default_rng(0)
    params = {"block": {"q": {"kernel": rng.standard_normal((4, 4), np.float32)},
                        "tailors": {"u": rng.standard_normal((3, 4, 2), np.float32)}},
              "y_embedder": {"embedding": rng.standard_normal((4, 4), np.float32)}}
    mngr = checkpoints.manager("gs://bucket/kind/checkpoints")
    checkpoints.save(mngr, {"step": 3, "params": params, "ema_params": params,
                            "opt_state": {"count": np.zeros((), np.int32)}}, config)
    mngr.wait_until_finished()
    mngr.close()
    assert (bucket / "bucket" / "kind" / "checkpoints" / "3" / "params" / "manifest.ocdbt").is_file()
    meta = slice_checkpoint("gs://bucket/kind", "gs://bucket/learngene", "learngene")
    assert meta["step"] == 3 and (bucket / "bucket" / "learngene" / "meta").is_dir()
    sliced, whole = load_learngene("gs://bucket/learngene"), load_learngene("gs://bucket/kind")
    assert sliced.source.path == "gs://bucket/learngene" and whole.source.checkpoint == "gs://bucket/kind/checkpoints/3"
    np.testing.assert_array_equal(sliced.params["block"]["q"]["kernel"], params["block"]["q"]["kernel"])
    assert "tailors" not in sliced.params["block"]
    jax.tree.map(np.testing.assert_array_equal, sliced.params, whole.params)

    mngr = checkpoints.manager("gs://bucket/kind/checkpoints")   # a damaged step is moved aside on the bucket
    moved = checkpoints.set_aside(mngr, 3, "step 3: a test")
    assert moved == "gs://bucket/kind/set_aside/3" and mngr.all_steps() == []
    assert (bucket / "bucket" / "kind" / "set_aside" / "3" / "SET_ASIDE.txt").read_text() == "step 3: a test\n"
    mngr.close()


def test_reference_batch_round_trips_through_gcs(bucket):
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 5)
    adm.write_sample_batch("gs://bucket/eval/ref", images, labels)
    assert (bucket / "bucket" / "eval" / "ref.npz").is_file()
    ref = adm.read_reference("gs://bucket/eval/ref.npz")
    np.testing.assert_array_equal(ref.images, images)
    with pytest.raises(FileNotFoundError, match="not found"):
        adm.read_reference("gs://bucket/eval/missing.npz")


def test_latents_encode_to_and_train_from_gcs(bucket, tmp_path):
    from test_latents import SHARD, BATCH, TinySource, tiny_vae
    from kindjax.tools.encode import encode_shards, write_index

    kw = dict(shard_size=SHARD, batch_size=BATCH, flips=True, source_info={"name": "tiny"}, dtype="float16",
              log=lambda s: None)
    encode_shards(TinySource(), tiny_vae(), "gs://bucket/latents", **kw)
    write_index("gs://bucket/latents")
    local = str(tmp_path / "latents")
    shutil.copytree(bucket / "bucket" / "latents", local)
    remote = LatentDataset("gs://bucket/latents", read_index("gs://bucket/latents"), verify="full")
    here = LatentDataset(local, read_index(local), verify="full")
    assert len(remote.labels) == len(here.labels) > 0
    a, b = remote.local_batch(3, 8, seed=1), here.local_batch(3, 8, seed=1)
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])


def test_image_folder_on_gcs(bucket):
    rng = np.random.default_rng(5)
    for name in ("cat", "ant"):
        for i in range(2):
            path = bucket / "bucket" / "images" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(path, rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    config = tiny_config()
    config.data.update(name="folder", root="gs://bucket/images", image_size=8, grouping="", task="", classes=())
    source = open_folder(config)
    assert source.class_names == ("ant", "cat") and len(source) == 4
    assert source.paths[0] == "gs://bucket/images/ant/0.png"
    config.data.root = str(bucket / "bucket" / "images")
    here = open_folder(config)
    for i in range(4):
        np.testing.assert_array_equal(source.image(i), here.image(i))


def test_gs_resolves_to_the_real_gcsfs_filesystem_without_tensorflow():
    """A TPU VM installed with '.[tpu]' has no TensorFlow, so etils reads and writes ``gs://`` through
    fsspec, which needs gcsfs (a dependency): a fresh process, with no fake registered, resolves a
    ``gs://`` workdir to gcsfs's filesystem class (instantiating it would look up credentials)."""
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "import fsspec, gcsfs\n"
            "from kindjax.io.paths import as_path\n"
            "path = as_path('gs://bucket/run')\n"
            "backend = path._backend\n"
            "from etils.epath import backend as b\n"
            "assert backend is b.fsspec_backend, backend\n"
            "cls = fsspec.get_filesystem_class('gcs')\n"
            "assert issubclass(cls, gcsfs.GCSFileSystem) and fsspec.get_filesystem_class('gs') is cls, cls\n"
            "print(cls.__module__, cls.__name__)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("gcsfs")
