"""Image sources: ADM centre crop, folders of class sub-folders, ImageNet through TFDS, flips."""
import importlib.resources
import importlib.util
import io
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import write_png
from fake_imagenet import fake_manual_dir, jpeg, validation_labels
from kindjax.config import ConfigError, base_config
from kindjax.data import ArrayDataset, make_dataset, open_image_source, subset
from kindjax.data.class_groups import imagenet_synsets, select_classes
from kindjax.data import ImageSource, center_crop_arr
from kindjax.data.imagenet import ImageNetSource


# --- a float64 NumPy re-derivation of PIL's separable resampling (the oracle) -------------------

def _box(x):
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bicubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _weights(n_in, n_out, kernel, support):
    """Row i: the normalised filter taps of output pixel i (centre (i + ½)·scale, taps at x + ½)."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support * stretch + 0.5), 0)
        hi = min(int(centre + support * stretch + 0.5), n_in)
        taps = kernel((np.arange(lo, hi) - centre + 0.5) / stretch)
        w[i, lo:hi] = taps / taps.sum()
    return w


def _resize(pixels, width, height, kernel, support):
    """Horizontal pass, then vertical, each rounded to uint8 as PIL's 8-bit path does."""
    x = pixels.astype(np.float64)
    if width != x.shape[1]:
        x = np.clip(np.floor(np.einsum("ox,hxc->hoc", _weights(x.shape[1], width, kernel, support), x) + 0.5), 0, 255)
    if height != x.shape[0]:
        x = np.clip(np.floor(np.einsum("oy,ywc->owc", _weights(x.shape[0], height, kernel, support), x) + 0.5), 0, 255)
    return x


def _adm_reference(pixels, s):
    h, w = pixels.shape[:2]
    x = pixels
    while min(h, w) >= 2 * s:
        h, w = h // 2, w // 2
        x = _resize(x, w, h, _box, 0.5)
    r = s / min(h, w)
    h, w = int(np.floor(h * r + 0.5)), int(np.floor(w * r + 0.5))
    x = _resize(x, w, h, _bicubic, 2.0)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top:top + s, left:left + s]


@pytest.mark.parametrize("height,width,size", [(101, 77, 16), (33, 50, 16), (17, 23, 16), (9, 13, 16),
                                               (131, 263, 24), (64, 64, 16)])
def test_center_crop_arr_matches_numpy_rederivation(height, width, size):
    rng = np.random.default_rng(height * width)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = center_crop_arr(Image.fromarray(pixels), size)
    ref = _adm_reference(pixels, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.float64) - ref)
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_center_crop_arr_converts_grey_and_rgba_to_rgb():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    out = center_crop_arr(Image.fromarray(grey), 8)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8), "RGBA")
    assert center_crop_arr(rgba, 8).shape == (8, 8, 3)


# --- random horizontal flip -------------------------------------------------------------------

def _toy_dataset(flip):
    rng = np.random.default_rng(0)
    return ArrayDataset(images=rng.uniform(-1, 1, (10, 4, 5, 3)).astype(np.float32),
                        labels=np.arange(10, dtype=np.int32) % 2, num_classes=2, class_names=("a", "b"),
                        random_flip=flip)


def test_random_flip_is_deterministic_per_step_and_mirrors_rows():
    flipped, plain = _toy_dataset(True), _toy_dataset(False)
    counts = []
    for step in range(6):
        a, b = flipped.batch(step, 8, seed=3), plain.batch(step, 8, seed=3)
        np.testing.assert_array_equal(a["image"], flipped.batch(step, 8, seed=3)["image"])   # resumable
        np.testing.assert_array_equal(a["label"], b["label"])
        mirrored = np.all(a["image"] == b["image"][:, :, ::-1], axis=(1, 2, 3))
        same = np.all(a["image"] == b["image"], axis=(1, 2, 3))
        assert np.all(mirrored ^ same)
        counts.append(int(mirrored.sum()))
    assert 0 < sum(counts) < 48 and len(set(counts)) > 1
    assert not np.array_equal(flipped.batch(0, 8, seed=3)["image"], flipped.batch(0, 8, seed=4)["image"])
    np.testing.assert_array_equal(plain.images, _toy_dataset(False).images)   # the stored images are untouched
    assert subset(flipped, [1]).random_flip


# --- folders of class sub-folders -------------------------------------------------------------

def _folder_config(root, **data):
    c = base_config()
    c.data.update(name="folder", root=str(root), image_size=12, **data)
    c.model.update(image_size=8, in_channels=3, num_classes=3)
    return c


def test_folder_source_reads_sorted_classes_and_counts_unreadable(image_folder):
    root, originals = image_folder
    source = open_image_source(_folder_config(root))
    assert isinstance(source, ImageSource)
    assert source.class_names == ("alpha", "beta", "gamma") and source.num_classes == 3
    assert len(source) == 8 and [source.label(i) for i in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
    for i in range(len(source)):
        class_name, filename = source.paths[i].split(os.sep)[-2:]
        if filename == "broken.jpg":
            with pytest.warns(RuntimeWarning, match=r"broken\.jpg.*1 image\(s\) skipped"):
                assert source.image(i) is None
        else:
            expected = center_crop_arr(Image.fromarray(originals[(class_name, filename)]), 12)
            np.testing.assert_array_equal(source.image(i), expected)
    assert source.num_skipped == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert source.image(5) is None   # the same file again: not counted, not warned twice
    assert source.num_skipped == 1
    with pytest.raises(IndexError, match="out of range 0..7"):
        source.image(8)


def test_make_dataset_folder_is_in_memory_rgb_in_unit_range(image_folder):
    root, originals = image_folder
    config = _folder_config(root, classes=(2, 0))
    config.model.num_classes = 2
    with pytest.warns(RuntimeWarning) as caught:
        dataset = make_dataset(config)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "broken.jpg" in messages[0] and "1 of 6 images" in messages[1]
    assert isinstance(dataset, ArrayDataset) and dataset.random_flip
    assert dataset.images.shape == (5, 8, 8, 3) and dataset.images.dtype == np.float32
    assert dataset.class_names == ("gamma", "alpha")
    np.testing.assert_array_equal(dataset.labels, [1, 1, 1, 0, 0])
    expected = center_crop_arr(Image.fromarray(originals[("alpha", "img1.PNG")]), 8) / 127.5 - 1.0
    np.testing.assert_allclose(dataset.images[1], expected, atol=1e-6)
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0
    batch = dataset.batch(0, 4, seed=0)
    assert batch["image"].shape == (4, 8, 8, 3)


def test_folder_errors_name_the_folder_and_the_fix(image_folder, tmp_path):
    root, _ = image_folder
    with pytest.raises(ConfigError, match="is not a directory"):
        open_image_source(_folder_config(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ConfigError, match="no class sub-folders"):
        open_image_source(_folder_config(tmp_path / "flat"))
    with pytest.raises(ConfigError, match=r"class ids \[3\] out of range 0\.\.2"):
        open_image_source(_folder_config(root, classes=(0, 3)))
    bad = _folder_config(root)
    bad.model.in_channels = 4
    with pytest.raises(ConfigError, match="model.in_channels=3"):
        make_dataset(bad)
    bad = _folder_config(root)
    bad.model.num_classes = 5
    with pytest.warns(RuntimeWarning), pytest.raises(ConfigError, match="set model.num_classes=3"):
        make_dataset(bad)
    (root / "delta").mkdir()
    (root / "delta" / "readme.md").write_text("no images here")
    with pytest.raises(ConfigError, match=r"delta holds no images"):
        open_image_source(_folder_config(root))


def test_folder_kind_grouping_on_synset_folders(tmp_path):
    rng = np.random.default_rng(3)
    synsets = ("n02085620", "n02085782", "n01440764")   # two dog breeds (merged), a tench (fish, merged)
    for s in synsets:
        (tmp_path / s).mkdir()
        write_png(tmp_path / s / "a.png", rng.integers(0, 256, (10, 11, 3), dtype=np.uint8))
    dog = 6   # n02084071 is the 7th class of task 15 in Table 9
    source = open_image_source(_folder_config(tmp_path, grouping="kind", task="task_15", classes=(dog,)))
    assert source.class_names == ("n02084071",) and len(source) == 2   # the fish superclass is not in task 15
    assert [source.label(i) for i in range(2)] == [0, 0]
    with pytest.raises(ConfigError, match=r"no class folder .* holds images of the selected classes .* \(of 30\)"):
        open_image_source(_folder_config(tmp_path, grouping="kind", task="task_15"))


# --- make_dataset wiring ----------------------------------------------------------------------

def test_make_dataset_imagenet_says_encode_first_and_latents_is_delegated(monkeypatch):
    c = base_config()
    c.data.name = "imagenet"
    with pytest.raises(ConfigError, match=r"python -m kindjax\.tools\.encode.*--config\.data\.latents=LATENT_DIR"):
        make_dataset(c)
    import kindjax.data.latents

    sentinel = object()
    monkeypatch.setattr(kindjax.data.latents, "open_latents", lambda config: (sentinel, config))
    c.data.name = "latents"
    assert make_dataset(c) == (sentinel, c)
    c.data.name = "lmdb"
    with pytest.raises(ConfigError, match="not a known data source"):
        make_dataset(c)


# --- ImageNet ---------------------------------------------------------------------------------

def test_imagenet_source_selection_labels_and_corrupt_records(tmp_path):
    rng = np.random.default_rng(5)
    synsets = imagenet_synsets()
    base = [synsets.index(s) for s in ("n02085620", "n01440764", "n02086240", "n15075141", "n01440764")]
    records = [{"image": jpeg(rng, 20 + i, 31), "label": b, "file_name": f"{synsets[b]}_{i}.JPEG".encode()}
               for i, b in enumerate(base)]
    records[3]["image"] = b"not a jpeg"
    cache = str(tmp_path / "labels.npy")
    selection = select_classes(synsets, "kind", "task_15")          # dogs in, fish and toilet tissue out
    source = ImageNetSource(records, 16, selection, where="fake", label_cache=cache)
    dog = selection.class_names.index("n02084071")
    assert len(source) == 2 and [source.label(i) for i in range(2)] == [dog, dog]
    np.testing.assert_array_equal(source.image(1), center_crop_arr(Image.open(io.BytesIO(records[2]["image"])), 16))
    np.testing.assert_array_equal(np.load(cache), base)
    everything = ImageNetSource(records, 16, select_classes(synsets), where="fake")
    assert len(everything) == 5 and everything.label(3) == base[3]
    with pytest.warns(RuntimeWarning, match=r"n15075141_3\.JPEG in fake"):
        assert everything.image(3) is None
    assert everything.num_skipped == 1
    records[0]["label"] = 999    # the cache, not the records, gives the labels now
    assert ImageNetSource(records, 16, selection, where="fake", label_cache=cache).label(0) == dog


def _imagenet_config(root, manual_dir="", **data):
    c = base_config()
    c.data.update(name="imagenet", root=str(root), manual_dir=str(manual_dir), image_size=16, **data)
    return c


def test_imagenet_not_prepared_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.root is empty"):
        open_image_source(_imagenet_config(""))
    with pytest.raises(ConfigError, match="not prepared .* set config.data.manual_dir"):
        open_image_source(_imagenet_config(tmp_path / "tfds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds neither ILSVRC2012_img_train.tar nor"):
        open_image_source(_imagenet_config(tmp_path / "tfds", tmp_path / "empty"))


def test_imagenet_prepare_without_tensorflow_names_the_install(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here")
    fake_manual_dir(tmp_path / "manual", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="pip install tensorflow-cpu"):
        open_image_source(_imagenet_config(tmp_path / "tfds", tmp_path / "manual"))


def test_imagenet_tfds_prepare_then_read(tmp_path):
    """The real TFDS imagenet2012 builder on a tiny fake manual dir (preparing needs TensorFlow)."""
    pytest.importorskip("tensorflow", reason="preparing TFDS imagenet2012 needs tensorflow-cpu")
    originals = fake_manual_dir(tmp_path / "manual", np.random.default_rng(11))
    config = _imagenet_config(tmp_path / "tfds", tmp_path / "manual")
    train = open_image_source(config)
    synsets = imagenet_synsets()
    assert len(train) == 6 and train.num_classes == 1000
    for i in range(len(train)):
        name = train.records[i]["file_name"].decode()
        assert synsets[train.label(i)] == name.split("_")[0]
        expected = center_crop_arr(Image.open(io.BytesIO(originals[name])), 16)
        np.testing.assert_array_equal(train.image(i), expected)
    val = open_image_source(_imagenet_config(tmp_path / "tfds", split="validation"))
    by_name = {val.records[i]["file_name"].decode(): synsets[val.label(i)] for i in range(len(val))}
    assert by_name == {f"ILSVRC2012_val_{i:08d}.JPEG": validation_labels()[i - 1] for i in range(1, 4)}
    # grouping + task + classes: task_15 holds the dog superclass and not the fish one.
    task = open_image_source(_imagenet_config(tmp_path / "tfds", grouping="kind", task="task_15"))
    dog = task.class_names.index("n02084071")
    assert len(task) == 2 and {task.label(i) for i in range(2)} == {dog}
    one = open_image_source(_imagenet_config(tmp_path / "tfds", grouping="kind", task="task_15", classes=(dog,)))
    assert one.class_names == ("n02084071",) and len(one) == 2 and one.label(1) == 0
    # Reading does not import TensorFlow.
    code = (f"import sys, kindjax.config as c, kindjax.data as m; cfg = c.base_config(); "
            f"cfg.data.update(name='imagenet', root={str(tmp_path / 'tfds')!r}, image_size=16); "
            f"s = m.open_image_source(cfg); "
            f"assert len(s) == 6 and s.image(0).shape == (16, 16, 3); "
            f"assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
