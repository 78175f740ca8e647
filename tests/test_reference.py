"""Reference batches of a class subset: the real images of the selected classes, ADM-cropped."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from kindjax.evaluation import adm
from kindjax.evaluation.reference import reference_images, write_reference_batch
from test_images import _adm_reference, _folder_config


def test_reference_batch_of_a_class_subset_is_the_adm_crop_of_its_images(image_folder, tmp_path):
    root, originals = image_folder
    config = _folder_config(root, classes=(0, 2))          # alpha → 0, gamma → 1 (beta left out)
    out = str(tmp_path / "ref.npz")
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        summary = write_reference_batch(config, out, log=lambda _: None)
    ref = adm.read_reference(out)
    with np.load(out) as f:
        labels = f["arr_1"]
    expected = [(0, originals[("alpha", n)]) for n in ("img0.png", "img1.PNG", "img2.png")] + \
               [(1, originals[("gamma", n)]) for n in ("img0.png", "img1.PNG")]
    assert summary == {"images": 5, "classes": 2, "size": 12}
    assert labels.tolist() == [c for c, _ in expected]
    for got, (_, pixels) in zip(ref.images, expected):
        assert np.abs(got.astype(int) - _adm_reference(pixels, 12).astype(int)).max() <= 1
    images, labels = reference_images(config, max_images=3, seed=1, log=lambda _: None)
    assert images.shape[0] <= 3 and set(labels) <= {0, 1}


def test_reference_command_writes_a_reference_batch(image_folder, tmp_path):
    root, _ = image_folder
    out = tmp_path / "task.npz"
    done = subprocess.run([sys.executable, "-m", "kindjax.evaluation.reference", "--config", "configs/dit_digits.py",
                           "--config.data.name=folder", f"--config.data.root={root}", "--config.data.image_size=16",
                           "--config.data.classes=(1,)", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "2 images of 1 classes at 16×16" in done.stdout
    assert adm.read_reference(str(out)).images.shape == (2, 16, 16, 3)
