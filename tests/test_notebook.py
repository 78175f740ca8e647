"""notebooks/learngene.ipynb runs: its code cells, in order, on a tiny pre-trained KIND checkpoint."""
import json
import os

import numpy as np

from conftest import ROOT
from test_kind_training import kind_tiny
from kindjax.train.trainer import train


def test_learngene_notebook_runs(tmp_path, monkeypatch):
    config = kind_tiny()
    config.train.num_steps = 2
    train(config, str(tmp_path / "pretrain"))
    monkeypatch.setenv("KINDJAX_LEARNGENE", str(tmp_path / "pretrain"))
    monkeypatch.setenv("KINDJAX_NOTEBOOK_WORKDIR", str(tmp_path / "notebook"))
    monkeypatch.setenv("KINDJAX_NOTEBOOK_STEPS", "3")
    notebook = json.load(open(os.path.join(ROOT, "notebooks", "learngene.ipynb")))
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "learngene.ipynb", "exec"), namespace)
    assert namespace["config"].model.num_classes == 3
    assert namespace["config"].train.freeze_learngene
    assert np.asarray(namespace["grid"]).shape[0] > 3 * 64
    metrics = json.load(open(tmp_path / "notebook" / "metrics.json"))
    assert metrics["step"] == 3 and 0.0 <= metrics["sample_accuracy"] <= 1.0
