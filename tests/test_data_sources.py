"""Every training source is a TrainingSource: local_batch splits the global batch over processes,
and batches() gives the same rows step after step, for in-memory and latent data sets alike."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from kindjax.config import base_config
from kindjax.data import ArrayDataset, Batches, TrainingSource, make_dataset
from kindjax.data.latents import INDEX_FORMAT, INDEX_NAME, LatentDataset

BATCH, SEED, STEPS = 8, 3, (0, 1, 4)   # 20 latent examples: step 4 wraps into a new epoch


def _digits(random_flip=False):
    c = base_config()
    c.data.update(name="digits", classes=(1, 7))
    c.model.num_classes = 2
    return dataclasses.replace(make_dataset(c), random_flip=random_flip)


@pytest.fixture(scope="module")
def latent_root(tmp_path_factory):
    """A hand-written latent directory: 20 examples of 3 classes in shards of 7, 0, 13, two views."""
    root = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    shards = []
    for k, count in enumerate((7, 0, 13)):
        name = f"shard_{k:05d}"
        np.save(root / f"{name}.moments.npy", rng.normal(size=(count, 2, 2, 2, 2, 4)).astype(np.float32))
        np.save(root / f"{name}.labels.npy", rng.integers(0, 3, count).astype(np.int32))
        shards.append({"name": name, "count": count})
    index = dict(format=INDEX_FORMAT, num_examples=20, latent_shape=[2, 2, 4], views=2, num_classes=3,
                 class_names=["ant", "bee", "cat"], shards=shards)
    (root / INDEX_NAME).write_text(json.dumps(index))
    return str(root)


def _latents(root):
    c = base_config()
    c.data.update(name="latents", root=root)
    c.model.update(image_size=2, in_channels=4, num_classes=3)
    return make_dataset(c)


def _folder(tmp_path):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    c = base_config()
    c.data.update(name="folder", root=str(tmp_path))
    c.model.update(image_size=8, in_channels=3, num_classes=2)
    return make_dataset(c)


def _assert_same(got, want):
    assert got.keys() == want.keys() == {"image", "label"}
    for k in want:
        assert got[k].dtype == want[k].dtype
        np.testing.assert_array_equal(got[k], want[k])


def test_every_training_source_is_a_training_source(latent_root, tmp_path):
    sources = [_digits(), _folder(tmp_path), _latents(latent_root)]
    assert [type(s) for s in sources] == [ArrayDataset, ArrayDataset, LatentDataset]
    for source in sources:
        assert isinstance(source, TrainingSource)
    assert not isinstance(object(), TrainingSource)


@pytest.mark.parametrize("which", ["digits", "digits_flipped", "latents"])
def test_batches_give_the_local_batch_rows_for_each_process(which, latent_root):
    source = _latents(latent_root) if which == "latents" else _digits(random_flip=which == "digits_flipped")
    for step in STEPS:
        whole = source.batch(step, BATCH, SEED)
        _assert_same(source.local_batch(step, BATCH, SEED), whole)
        halves = [source.local_batch(step, BATCH, SEED, p, 2) for p in (0, 1)]
        _assert_same({k: np.concatenate([h[k] for h in halves]) for k in whole}, whole)
    for count in (1, 2):
        for index in range(count):
            with source.batches(STEPS[0], BATCH, SEED, index, count) as batches:
                assert isinstance(batches, Batches)
                for want_step in range(STEPS[0], STEPS[-1] + 1):
                    step, batch = next(batches)
                    assert step == want_step
                    got = batches.finish(batch)   # the latents hand on moments; finish draws the noise
                    _assert_same({k: np.asarray(v) for k, v in got.items()},
                                 source.local_batch(step, BATCH, SEED, index, count))
            with pytest.raises(StopIteration):
                next(batches)
    with pytest.raises(ValueError, match="split evenly over 3 processes"):
        source.local_batch(0, BATCH, SEED, 0, 3)
