"""Console progress (stage, step, images/s, time left) and the sample grid's null-class row."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, tiny_config
from kindjax.io import logs
from kindjax.io.logs import RunLogger, duration


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (37.4, "37s"), (60, "1m00s"), (245, "4m05s"),
                                           (3725, "1h02m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_console_line_has_stage_rate_and_time_left(tmp_path, monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "time", lambda: clock[0])
    logger = RunLogger(str(tmp_path / "pretrain"), total_steps=1000)
    clock[0] += 30.0                       # compile + first 100 steps
    logger.scalars(100, {"loss": 0.5, "steps_per_sec": 3.3, "images_per_sec": 427.0})
    clock[0] += 10.0                       # 100 steps in 10 s: 10 steps/s from here on
    logger.scalars(200, {"loss": 0.25, "steps_per_sec": 10.0, "images_per_sec": 1280.0})
    clock[0] += 40.0                       # 300 more steps in 40 s: 400 steps in 50 s since step 100
    logger.scalars(500, {"loss": 0.125, "steps_per_sec": 7.5, "images_per_sec": 960.0})
    logger.scalars(500, {"eval/accuracy": 0.9})
    logger.close()
    first, second, third, evaluation = capsys.readouterr().out.splitlines()
    assert first == "[pretrain] step 100/1000   10%  427 img/s  30s elapsed | loss=0.5"
    assert second == "[pretrain] step 200/1000   20%  1280 img/s  40s elapsed  ~1m20s left | loss=0.25"
    # 500 steps left at 400/50 = 8 steps/s: 62.5 s.
    assert third == "[pretrain] step 500/1000   50%  960 img/s  1m20s elapsed  ~1m02s left | loss=0.125"
    assert evaluation == "[pretrain] step 500/1000 | eval/accuracy=0.9"


def test_last_step_has_no_time_left_and_stage_can_be_named(tmp_path, capsys):
    logger = RunLogger(str(tmp_path), total_steps=10, stage="transfer")
    logger.scalars(5, {"loss": 1.0, "images_per_sec": 10.0})
    logger.scalars(10, {"loss": 1.0, "images_per_sec": 10.0})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[transfer] step 5/10") and lines[1].startswith("[transfer] step 10/10  100%")
    assert "left" not in lines[1]


def test_sample_grid_has_a_null_class_row(tmp_path, monkeypatch):
    """One row per class, then a row of null-class samples (label num_classes)."""
    from PIL import Image
    from kindjax.train.trainer import Trainer, sample_grid

    config = tiny_config()
    config.sample.grid_per_class = 3
    trainer = Trainer(config, str(tmp_path), devices=jax.devices()[:1])
    seen = {}

    def fake_sample(params, key, labels):
        seen["labels"] = np.asarray(labels)
        # Each image's grey level is its label, so the grid shows which row holds which label.
        return np.broadcast_to((np.asarray(labels, np.float32) / 10 * 2 - 1)[:, None, None, None],
                               (len(labels), 8, 8, 1))

    monkeypatch.setattr(trainer, "sample", fake_sample)
    logger = RunLogger(str(tmp_path), 1)
    path = sample_grid(trainer, {"ema_params": None}, 7, logger)
    logger.close()
    n = trainer.model.num_classes
    np.testing.assert_array_equal(seen["labels"], np.repeat(np.arange(n + 1), 3))
    grid = np.asarray(Image.open(path))
    cell, pad = 8 * 8, 4                       # 8×8 digits upscaled to 64 pixels, 4-pixel borders
    assert grid.shape[:2] == ((n + 1) * (cell + pad) + pad, 3 * (cell + pad) + pad)
    row_levels = [int(grid[pad + r * (cell + pad) + cell // 2, pad + cell // 2]) for r in range(n + 1)]
    assert row_levels == [int(np.round(((c / 10 * 2 - 1) + 1) * 127.5)) for c in range(n + 1)]


def test_event_files_read_back_without_tensorflow(tmp_path):
    """TensorBoard's own reader sees every scalar and image, and TensorFlow was never imported."""
    code = f"""
import sys
import numpy as np
from kindjax.io.logs import RunLogger
logger = RunLogger({str(tmp_path)!r}, 3)
for step in (1, 2, 3):
    logger.scalars(step, {{"loss": 1.0 / step}}, console=False)
logger.image(3, "samples", np.full((4, 6, 3), 200, np.uint8))
logger.close()
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT})
    (path,) = (tmp_path / "tensorboard").iterdir()
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    (image,) = acc.Images("samples")
    assert (image.step, image.height, image.width) == (3, 4, 6)
