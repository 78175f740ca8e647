"""Latent encoding (kindjax.encode) and the sharded, prefetching latent loader (kindjax.data.latents)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from kindjax.config import ConfigError, base_config
from kindjax.data.latents import LatentDataset, open_latents, read_index
from kindjax.data.pipeline import ArrayDataset
from kindjax.encode import encode_shards, write_index
from kindjax.models.vae import AutoencoderKL, PretrainedVAE

UNREADABLE = (4, 11, 12)
SHARD, BATCH, SCALE = 5, 8, 0.5


class TinySource:
    """23 random 8×8 RGB images of 3 classes; three of them unreadable."""

    num_classes = 3
    class_names = ("ant", "bee", "cat")

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
        self.labels = rng.integers(0, 3, 23)

    def __len__(self):
        return 23

    def label(self, index):
        return int(self.labels[index])

    def image(self, index):
        return None if index in UNREADABLE else self.images[index]


def tiny_vae():
    """A tiny AutoencoderKL with random parameters (NumPy: compiling ``model.init`` takes long on CPU)."""
    model = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))["params"]
    rng = np.random.default_rng(3)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return (rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        return ((name == "scale") + 0.1 * rng.normal(size=shape)).astype(np.float32)

    return PretrainedVAE(model=model, params=jax.tree_util.tree_map_with_path(draw, shapes), scaling_factor=0.13,
                         config={"block_out_channels": [8, 16]}, path="tiny")


def encode_into(out, **kw):
    kw = dict(shard_size=SHARD, batch_size=BATCH, flips=True, source_info={"name": "tiny"}, log=lambda s: None) | kw
    return encode_shards(TinySource(), tiny_vae(), str(out), **kw)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    out = tmp_path_factory.mktemp("latents")
    encode_into(out)
    return str(out), write_index(str(out))


def latent_config(root, **data):
    c = base_config()
    c.data.update(name="latents", root=root, **data)
    c.model.update(image_size=4, in_channels=4, num_classes=len(data.get("classes", ())) or 3)
    c.vae.scale = SCALE
    return c


def stored(root):
    """All moments and labels of a latent directory, concatenated (shards in order)."""
    index = read_index(root)
    names = [s["name"] for s in index["shards"]]
    moments = np.concatenate([np.load(os.path.join(root, f"{n}.moments.npy")).reshape((-1, 2, 2, 4, 4, 4))
                              for n in names])
    labels = np.concatenate([np.load(os.path.join(root, f"{n}.labels.npy")) for n in names])
    return moments, labels


def test_encode_matches_the_vae_and_indexes_skips(encoded):
    root, index = encoded
    source, vae = TinySource(), tiny_vae()
    kept = [i for i in range(23) if i not in UNREADABLE]
    assert index["num_examples"] == 20 and index["latent_shape"] == [4, 4, 4] and index["views"] == 2
    assert index["skipped"] == {"count": 3, "indices": list(UNREADABLE)}
    assert [s["count"] for s in index["shards"]] == [4, 5, 3, 5, 3]
    assert index["class_names"] == list(source.class_names) and index["scale"] == 0.13
    assert index["image_shape"] == [8, 8, 3] and index["source"] == {"name": "tiny"}
    moments, labels = stored(root)
    np.testing.assert_array_equal(labels, source.labels[kept])
    x = source.images[kept].astype(np.float32) / 127.5 - 1
    for view, images in enumerate((x, x[:, :, ::-1])):
        mean, logvar = vae.model.apply({"params": vae.params}, images, method=AutoencoderKL.encode)
        np.testing.assert_allclose(moments[:, view, 0], mean, atol=1e-5)
        np.testing.assert_allclose(moments[:, view, 1], np.exp(0.5 * np.asarray(logvar)), rtol=1e-5)
    assert not np.allclose(moments[:, 0], moments[:, 1])


def test_encode_resumes_and_splits_shards_over_processes(encoded, tmp_path):
    root, index = encoded
    out = tmp_path / "split"
    assert encode_into(out, process_index=0, process_count=2) == [0, 2, 4]
    with pytest.raises(RuntimeError, match="shard 1 .* not finished"):
        write_index(str(out))
    assert encode_into(out, process_index=1, process_count=2) == [1, 3]
    # a killed encode: shard 2's marker never written, a temporary file left behind
    os.remove(out / "shard_00002.json")
    (out / "shard_00002.moments.npy.tmp").write_bytes(b"partial")
    assert encode_into(out) == [2]
    assert encode_into(out) == []
    again = write_index(str(out))
    assert again == index | {"vae": again["vae"]}
    for got, want in zip(stored(str(out)), stored(root)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ConfigError, match="shard_size"):
        encode_into(out, shard_size=6)


def test_batch_is_recomputed_from_the_files(encoded):
    root, _ = encoded
    moments, labels = stored(root)
    dataset = open_latents(latent_config(root))
    reference = ArrayDataset(images=np.zeros((20, 1, 1, 1), np.float32), labels=labels, num_classes=3,
                             class_names=("ant", "bee", "cat"))
    assert len(dataset) == 20 and dataset.num_classes == 3
    views = set()
    for step, seed in ((0, 0), (2, 5), (7, 5)):   # step 2 crosses an epoch boundary (20 examples, B = 8)
        batch = dataset.batch(step, BATCH, seed)
        idx = reference.indices(step, BATCH, seed)
        np.testing.assert_array_equal(batch["label"], labels[idx])
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        for r, i in enumerate(idx):
            rng = np.random.default_rng((seed, 1, step, r))
            v = int(rng.integers(2))
            eps = rng.standard_normal((4, 4, 4), dtype=np.float32)
            views.add(v)
            np.testing.assert_allclose(batch["image"][r], SCALE * (moments[i, v, 0] + moments[i, v, 1] * eps),
                                       rtol=1e-6, atol=1e-6)
    assert views == {0, 1}
    c = latent_config(root)
    c.data.random_flip = False
    unflipped = open_latents(c).batch(2, BATCH, 5)
    idx = reference.indices(2, BATCH, 5)
    for r, i in enumerate(idx):
        rng = np.random.default_rng((5, 1, 2, r))
        rng.integers(1)
        eps = rng.standard_normal((4, 4, 4), dtype=np.float32)
        np.testing.assert_allclose(unflipped["image"][r], SCALE * (moments[i, 0, 0] + moments[i, 0, 1] * eps),
                                   rtol=1e-6, atol=1e-6)


def test_resume_processes_and_prefetch_give_the_same_batches(encoded):
    root, _ = encoded
    first = open_latents(latent_config(root))
    run = [first.batch(s, BATCH, 1) for s in range(7)]
    resumed = open_latents(latent_config(root))
    for s in (6, 4, 5):
        for k in ("image", "label"):
            np.testing.assert_array_equal(resumed.batch(s, BATCH, 1)[k], run[s][k])
    for s in (0, 3):
        halves = [first.local_batch(s, BATCH, 1, p, 2) for p in (0, 1)]
        for k in ("image", "label"):
            assert halves[0][k].shape[0] == BATCH // 2
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), run[s][k])
    assert first.prefetch_depth == 2
    with first.batches(2, BATCH, 1) as batches:
        for s in range(2, 7):
            step, batch = next(batches)
            assert step == s
            for k in ("image", "label"):
                np.testing.assert_array_equal(batch[k], run[s][k])
    with first.batches(5, BATCH, 1, process_index=1, process_count=2, depth=3) as batches:
        step, batch = next(batches)
        assert step == 5
        np.testing.assert_array_equal(batch["image"], run[5]["image"][BATCH // 2:])
    with first.batches(0, BATCH, 1, process_index=0, process_count=3) as batches:
        with pytest.raises(ValueError, match="split evenly over 3 processes"):
            next(batches)


def test_class_selection(encoded):
    root, _ = encoded
    _, labels = stored(root)
    dataset = open_latents(latent_config(root, classes=(2, 0)))
    assert dataset.num_classes == 2 and dataset.class_names == ("cat", "ant")
    assert len(dataset) == int(np.sum((labels == 2) | (labels == 0)))
    full = open_latents(latent_config(root))
    batch = dataset.batch(1, BATCH, 0)
    assert set(batch["label"].tolist()) <= {0, 1}
    # the selected examples, in stored order, are the stream's examples
    np.testing.assert_array_equal(dataset.positions, np.flatnonzero((labels == 2) | (labels == 0)))
    np.testing.assert_array_equal(np.where(labels[dataset.positions] == 2, 0, 1), dataset.labels)
    assert len(full) == 20
    with pytest.raises(ConfigError, match=r"class ids \[3\] out of range"):
        open_latents(latent_config(root, classes=(0, 3)))
    c = latent_config(root)
    c.model.num_classes = 5
    with pytest.raises(ConfigError, match="model.num_classes=3"):
        open_latents(c)
    c = latent_config(root)
    c.model.image_size = 8
    with pytest.raises(ConfigError, match="model.image_size=4"):
        open_latents(c)


def test_missing_or_corrupt_latents_are_clear_errors(encoded, tmp_path):
    root, _ = encoded
    with pytest.raises(ConfigError, match="needs data.root"):
        open_latents(latent_config(""))
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    index_path = copy / "index.json"
    index = json.loads(index_path.read_text())
    os.remove(index_path)
    with pytest.raises(ConfigError, match="encode the images first"):
        open_latents(latent_config(str(copy)))
    index_path.write_text('{"format": 1, "shards": [')
    with pytest.raises(ConfigError, match="corrupt"):
        open_latents(latent_config(str(copy)))
    index_path.write_text(json.dumps(index | {"num_examples": 21}))
    with pytest.raises(ConfigError, match="corrupt.*num_examples"):
        open_latents(latent_config(str(copy)))
    index_path.write_text(json.dumps(index))
    assert len(open_latents(latent_config(str(copy)))) == 20
    os.remove(copy / "shard_00003.moments.npy")
    with pytest.raises(ConfigError, match="shard_00003.moments.npy is missing"):
        open_latents(latent_config(str(copy)))
    np.save(copy / "shard_00003.moments.npy", np.zeros((4, 2, 2, 4, 4, 4), np.float32))
    with pytest.raises(ConfigError, match="index says"):
        open_latents(latent_config(str(copy)))
    with pytest.raises(ConfigError, match="data.random_flip=False"):
        LatentDataset(root, read_index(root) | {"views": 1}, random_flip=True)
    with pytest.raises(ValueError, match="batch_size > 0"):
        LatentDataset(root, read_index(root), classes=()).batch(0, 0, 0)


def test_command_encodes_a_folder_with_a_diffusers_vae(tmp_path, single_device_env):
    """``python -m kindjax.encode`` end to end: a folder of PNGs, a tiny diffusers VAE directory."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    torch.manual_seed(0)
    vae_dir = str(tmp_path / "vae")
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4).save_pretrained(
        vae_dir, safe_serialization=True)
    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("dog", 4)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "images" / "dog" / "broken.png").write_bytes(b"not a png")
    out = str(tmp_path / "latents")
    command = [sys.executable, "-m", "kindjax.encode", "--config", "configs/dit_digits.py", "--out", out,
               "--config.data.name=folder", f"--config.data.root={tmp_path / 'images'}",
               "--config.data.image_size=16", "--config.data.classes=(1,)",
               "--config.vae.encode_batch_size=2", "--config.vae.shard_size=3"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    failed = subprocess.run(command, cwd=root, env=single_device_env, capture_output=True, text=True)
    assert failed.returncode != 0 and "no VAE given" in failed.stderr
    done = subprocess.run(command + ["--vae", vae_dir], cwd=root, env=single_device_env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shard 3/3" in done.stdout
    index = read_index(out)
    assert index["num_examples"] == 7 and index["skipped"]["count"] == 1
    assert index["class_names"] == ["cat", "dog"] and index["latent_shape"] == [8, 8, 4]
    c = latent_config(out, classes=(1,))
    c.model.image_size = 8
    dataset = open_latents(c)
    assert len(dataset) == 4 and dataset.class_names == ("dog",)
    assert dataset.batch(0, 4, 0)["image"].shape == (4, 8, 8, 4)
    # The same config that encoded the folder trains on its latents once data.latents names them.
    from kindjax.data import make_dataset

    c.data.update(name="folder", root=str(tmp_path / "images"), latents=out)
    c.model.num_classes = 1
    trained_on = make_dataset(c)
    np.testing.assert_array_equal(trained_on.batch(3, 4, 1)["image"], dataset.batch(3, 4, 1)["image"])
