"""notebooks/learngene.ipynb runs: its code cells, in order, on a tiny pre-trained KIND checkpoint (the last
section exports the fine-tuned model to diffusers and samples it with PyTorch)."""
import json
import os

import numpy as np
import pytest

from conftest import ROOT
from test_kind_training import kind_tiny
from kindjax.train.trainer import train


@pytest.mark.slow  # 60 s (-n 2, 2 cores)
def test_learngene_notebook_runs(tmp_path, monkeypatch):
    config = kind_tiny()
    config.train.num_steps = 2
    train(config, str(tmp_path / "pretrain"))
    monkeypatch.setenv("KINDJAX_LEARNGENE", str(tmp_path / "pretrain"))
    monkeypatch.setenv("KINDJAX_NOTEBOOK_WORKDIR", str(tmp_path / "notebook"))
    monkeypatch.setenv("KINDJAX_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("KINDJAX_NOTEBOOK_SAMPLE_STEPS", "3")
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
    # The last section: one diffusers directory per new class, sampled with DiTPipeline (PyTorch).
    for label, digit in enumerate((7, 8, 9)):
        exported = json.load(open(tmp_path / "notebook" / f"diffusers_digit_{digit}" / "config.json"))["_kindjax"]
        assert exported["classes"] == [{"label": 0, "run_label": label, "name": str(digit)}]
    pixels = np.asarray(namespace["pixels"])
    assert pixels.shape == (3 * 8, 8 * 8) and pixels.std() > 0


def test_colab_install_cell(monkeypatch):
    """The first code cell installs only in Colab: from a git URL or a local copy, with the extra of
    the runtime's accelerator; without REPO it stops with the fix."""
    import glob
    import subprocess
    import sys
    import types

    notebook = json.load(open(os.path.join(ROOT, "notebooks", "learngene.ipynb")))
    source = "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, check: calls.append(args))
    exec(compile(source, "learngene.ipynb", "exec"), {})
    assert calls == []                                   # not in Colab: nothing happens
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    with pytest.raises(ValueError, match="set REPO"):
        exec(compile(source, "learngene.ipynb", "exec"), {})
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/nvidia0"] if pattern.startswith("/dev/nvidia") else [])
    for repo, want in (("git+https://example.org/kindjax", "kindjax[cuda] @ git+https://example.org/kindjax"),
                       ("/content/drive/MyDrive/kindjax", "/content/drive/MyDrive/kindjax[cuda]")):
        exec(compile(source.replace('REPO = ""', f"REPO = {repo!r}"), "learngene.ipynb", "exec"), {})
        assert calls[-1][-1] == want and calls[-1][1:4] == ["-m", "pip", "install"]
