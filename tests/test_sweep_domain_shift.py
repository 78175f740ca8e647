"""The sweep's ``domain_shift`` experiment (KIND Table 3): the grid of the real config, its refusals,
the table layout, and a tiny run end to end from the command line's flags."""
import os

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import ROOT, tiny_config, write_png
from kindjax.config import ConfigError, validate
from kindjax.papers.kind.methods import METHODS
from kindjax.sweep import grid
from kindjax.papers.kind.experiments import domain_shift
from kindjax.papers.kind.experiments.domain_shift import DOMAIN_SHIFT, ROWS
from kindjax.papers.kind.facts import TABLE3_DATASETS, TABLE3_METHODS
from kindjax.sweep.registry import experiment_for

SHIFT = os.path.join(ROOT, "configs", "kind_domain_shift.py")


def parse(spec: str, *overrides: str) -> tuple[ml_collections.ConfigDict, dict]:
    """``--config SHIFT[:spec] overrides…`` parsed as ``python -m kindjax.sweep`` parses them:
    the config and the options' ``config_file``."""
    argv = ["sweep", f"--config={SHIFT}{':' + spec if spec else ''}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config, dict(config_file=config_flags.get_config_filename(values["config"]))


def real_overrides(tmp_path) -> list[str]:
    inception = tmp_path / "inception.pth"
    inception.write_bytes(b"weights")
    return ["--config.data.root=/data/{task}", "--config.data.latents=/latents/{task}",
            "--config.init.learngene=/runs/pretrain/kind", "--config.init.pretrained=/runs/pretrain/dense",
            f"--config.eval.inception_weights={inception}", "--config.eval.dinov2_weights=/weights/dinov2",
            "--config.vae.weights=/weights/sd-vae", "--config.eval.num_samples=10000"]


def test_grid_of_the_real_config(tmp_path, monkeypatch):
    """DiT-L, 4 classes: methods × data sets × seeds, each config the config file's with the overrides,
    {task} substituted; the sources are checked once per kind (recorded here: no checkpoints)."""
    from configs.kind_domain_shift import get_config

    checked = []
    monkeypatch.setattr(domain_shift, "check_source", lambda c, source: checked.append((source, c.init.learngene,
                                                                                         c.init.pretrained)))
    config, options = parse(",L,classes=4", *real_overrides(tmp_path))
    assert experiment_for(config) is DOMAIN_SHIFT
    runs = DOMAIN_SHIFT.runs(config, str(tmp_path / "W"), dict(options, seeds=2))
    grid.check_grid(runs)
    assert len(runs) == len(TABLE3_DATASETS) * len(TABLE3_METHODS) * 2 and all(r.in_table and not r.needs
                                                                                for r in runs)
    assert sorted(checked) == [("dense", "", "/runs/pretrain/dense"), ("kind", "/runs/pretrain/kind", "")]
    for r in runs:
        c, dataset, method = r.config, r.labels["task"], r.labels["method"]
        validate(c, 1)
        want = get_config(f"{dataset},{method},L,classes=4")
        assert c.model.linear == want.model.linear and c.optim.lr == want.optim.lr
        assert c.train.batch_size == want.train.batch_size and c.train.num_steps == 50_000
        assert c.model.num_classes == 4 and c.model.arch == "L"
        assert c.data.root == f"/data/{dataset}" and c.data.latents == f"/latents/{dataset}"
        assert c.eval.num_samples == 10000 and c.vae.weights == "/weights/sd-vae" and c.eval.reference == ""
        assert c.train.seed == c.data.seed == r.labels["seed"]
        assert r.workdir == str(tmp_path / "W" / dataset / method / f"seed_{r.labels['seed']}")
        assert r.extra["reference"] == str(tmp_path / "W" / "references" / f"{dataset}.npz")
        if method == "kind":
            assert c.init.learngene == "/runs/pretrain/kind" and c.train.freeze_learngene and not c.init.pretrained
        else:
            assert c.init.pretrained == "/runs/pretrain/dense" and not c.init.learngene
    by = {(r.labels["task"], r.labels["method"]): r.config for r in runs}
    assert by["mri", "lora"].model.linear.rank == 4 * 4 and by["mri", "lora"].train.batch_size == 512
    assert by["hubble", "svdiff"].optim.lr == 3e-3 and by["hubble", "kind"].model.linear.n_tailor == 4
    # --tasks, --methods, an eval.reference pattern.
    config.eval.reference = "/refs/{task}.npz"
    two = DOMAIN_SHIFT.runs(config, str(tmp_path / "W"), dict(options, tasks=("pokemon", "mri"), methods=("kind",)))
    assert [(r.labels["task"], r.extra["reference"]) for r in two] == [("pokemon", "/refs/pokemon.npz"),
                                                                       ("mri", "/refs/mri.npz")]


def test_refusals_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(domain_shift, "check_source", lambda c, source: None)
    config, options = parse("", *real_overrides(tmp_path))
    assert DOMAIN_SHIFT.runs(config, str(tmp_path), dict(options, methods=("kind",)))   # the default spec: DiT-B
    for key in ("data.root", "data.latents", "eval.reference"):
        bad = config.copy_and_resolve_references()
        bad[key.split(".")[0]][key.split(".")[1]] = "/one/folder"
        with pytest.raises(ConfigError, match=f"{key}='/one/folder' holds no {{task}}.*--config.{key}=/one/folder/"):
            DOMAIN_SHIFT.runs(bad, str(tmp_path), options)
        assert DOMAIN_SHIFT.runs(bad, str(tmp_path), dict(options, tasks=("mri",), methods=("kind",)))  # one: fine
    for key, match in (("data.root", "data.root is not set"), ("eval.dinov2_weights", "metric is FDD"),
                       ("eval.inception_weights", "is not a file"), ("init.pretrained", "init.pretrained is not set"),
                       ("init.learngene", "init.learngene is not set: kind")):
        bad = config.copy_and_resolve_references()
        bad[key.split(".")[0]][key.split(".")[1]] = ""
        with pytest.raises(ConfigError, match=match):
            DOMAIN_SHIFT.runs(bad, str(tmp_path), options)
    assert DOMAIN_SHIFT.runs(bad, str(tmp_path), dict(options, methods=("lora",)))   # no KIND run needed
    for spec, match in (("mri,L", "--tasks=mri"), (",lora", "--methods=lora")):
        with pytest.raises(ValueError, match=match):
            DOMAIN_SHIFT.runs(config, str(tmp_path), dict(config_file=f"{SHIFT}:{spec}"))
    with pytest.raises(ValueError, match="needs configs/kind_domain_shift.py"):
        DOMAIN_SHIFT.runs(tiny_config(), str(tmp_path), options)
    with pytest.raises(ConfigError, match="config spec"):
        DOMAIN_SHIFT.runs(config, str(tmp_path), dict(options, tasks=("imagenet",)))


def test_table3_layout_from_fake_scores(tmp_path):
    """Rows in Table 3's order whatever the grid's order, a column per data set, mean ± std over seeds
    (checked against a naive recomputation)."""
    rng = np.random.default_rng(0)
    runs, scores = [], {}
    for dataset in ("pokemon", "mri"):
        for method in ("kind", "lora", "svdiff"):
            for seed in (0, 1):
                workdir = str(tmp_path / dataset / method / str(seed))
                runs.append(grid.Run(dict(task=dataset, method=method, seed=seed), workdir, None))
                scores[workdir] = dict(fdd=float(rng.uniform(0.05, 0.6)), fid=float(rng.uniform(5, 50)),
                                       features="f.npz", trainable=1.0)
    out = DOMAIN_SHIFT.write_tables(runs, scores, str(tmp_path))
    assert [r["method"] for r in out["table3"]] == ["svdiff", "lora", "kind"] == [m for m in ROWS if m in
                                                                                  ("kind", "lora", "svdiff")]
    for key, metric in (("table3", "fdd"), ("table3_fid", "fid")):
        for row in out[key]:
            for dataset in ("pokemon", "mri"):
                values = [scores[r.workdir][metric] for r in runs
                          if r.labels["task"] == dataset and r.labels["method"] == row["method"]]
                assert row[dataset] == pytest.approx(np.mean(values)) and row[dataset + "_std"] == pytest.approx(
                    np.std(values)) and row["seeds"] == 2
    lines = (tmp_path / "table3.md").read_text().splitlines()
    assert lines[0] == "| method | Pokémon FDD ↓ | MRI FDD ↓ |"
    svdiff = out["table3"][0]
    assert lines[2] == f"| svdiff | {svdiff['pokemon']:.3f} ± {svdiff['pokemon_std']:.3f} | " \
                       f"{svdiff['mri']:.3f} ± {svdiff['mri_std']:.3f} |"
    assert "MRI FID ↓" in (tmp_path / "table3_fid.md").read_text()
    assert (tmp_path / "table3.csv").read_text().splitlines()[0] == "method,seeds,pokemon,pokemon_std,mri,mri_std"
    assert (tmp_path / "table3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(METHODS) == set(ROWS)


# ------------------------------------------------------------------------------ a tiny run, end to end

#: The command line's overrides that shrink configs/kind_domain_shift.py to the tiny pre-trainings' model
#: (8×8 RGB pixels: no VAE, trained from the folders directly).
TINY = ["--config.model.arch=", "--config.model.hidden_size=32", "--config.model.depth=2",
        "--config.model.num_heads=2", "--config.model.image_size=8", "--config.model.in_channels=3",
        "--config.model.dtype=float32", "--config.data.image_size=8", "--config.data.latents=",
        "--config.model.linear.n_learngene=16", "--config.model.linear.n_tailor=2",
        "--config.train.batch_size=8", "--config.train.num_steps=2", "--config.train.checkpoint_every=2",
        "--config.train.log_every=1", "--config.train.sample_every=1000", "--config.optim.warmup_steps=0",
        "--config.sample.num_steps=8", "--config.eval.num_samples=8", "--config.eval.batch_size=8",
        "--config.eval.inception_batch_size=8"]


def write_folder(root, images: np.ndarray, folders) -> str:
    """``root/<folder>/<i>.png``: image ``i`` in the sub-folder ``folders[i]`` (its class)."""
    for i, (image, folder) in enumerate(zip(images, folders)):
        (root / str(folder)).mkdir(parents=True, exist_ok=True)
        write_png(root / str(folder) / f"{i}.png", image)
    return str(root)


def pretrain(folder: str, linear: ml_collections.ConfigDict, workdir: str) -> None:
    """A 40-step pre-training on the digits folder (7 classes), RGB 8×8: enough for samples that are not
    saturated noise, so the methods' samples (and scores) differ."""
    from kindjax.train.trainer import train

    c = tiny_config()
    c.model.update(hidden_size=32, num_heads=2, num_classes=7, in_channels=3, linear=linear)
    c.data.update(name="folder", root=folder, image_size=8)
    c.train.update(num_steps=40, checkpoint_every=40, batch_size=8)
    train(c, workdir)


@pytest.mark.slow   # 2 pre-trainings, 4 runs, 4 evaluations with 2048-dim Fréchet distances (~2–3 min of CPU)
def test_tiny_table3_end_to_end(tmp_path, monkeypatch, capsys):
    import torch

    from kindjax.data.digits import load_digits
    from kindjax.evaluation import inception
    from kindjax.papers.kind.layer import kind_config
    from kindjax.sweep.grid import sweep
    from test_evaluate import tiny_dinov2
    from test_inception import random_fid_inception

    rng = np.random.default_rng(0)
    digits = load_digits(tuple(range(7)))
    pixels = np.repeat(np.round((digits.images[:70] + 1) * 127.5).astype(np.uint8), 3, axis=-1)
    folder = write_folder(tmp_path / "digits", pixels, digits.labels[:70])
    for dataset, tint in (("mri", (1.0, 1.0, 1.0)), ("pokemon", (1.0, 0.6, 0.2))):   # no classes: root/all/
        images = (rng.uniform(0, 255, (12, 8, 8, 1)) * np.asarray(tint)).astype(np.uint8)
        write_folder(tmp_path / "data" / dataset, images, ["all"] * 12)
    kind_run, dense_run = str(tmp_path / "pretrain" / "kind"), str(tmp_path / "pretrain" / "dense")
    pretrain(folder, kind_config(n_learngene=16, n_tailor=2), kind_run)
    pretrain(folder, ml_collections.ConfigDict(dict(kind="dense")), dense_run)
    pth, npz = str(tmp_path / "inception.pth"), str(tmp_path / "inception.npz")
    torch.save(random_fid_inception(1).state_dict(), pth)
    inception.convert_torch_weights(pth, npz)
    line = [*TINY, f"--config.data.root={tmp_path}/data/{{task}}", f"--config.init.learngene={kind_run}",
            f"--config.init.pretrained={dense_run}", f"--config.eval.inception_weights={npz}",
            f"--config.eval.dinov2_weights={tiny_dinov2(tmp_path / 'dinov2')}", "--config.eval.dinov2_model=any"]
    config, options = parse(",B", *line)
    options.update(tasks=("mri", "pokemon"), methods=("kind", "lora"))
    workdir = str(tmp_path / "W")

    out = sweep(experiment_for(config), config, workdir, options)
    text = (tmp_path / "W" / "table3.md").read_text()
    assert text.splitlines()[0] == "| method | MRI FDD ↓ | Pokémon FDD ↓ |"
    assert [r["method"] for r in out["table3"]] == ["lora", "kind"]
    for row in out["table3"] + out["table3_fid"]:
        assert all(np.isfinite(row[d]) and row[d] > 0 for d in ("mri", "pokemon"))
    for dataset in ("mri", "pokemon"):
        with np.load(tmp_path / "W" / "references" / f"{dataset}.npz") as f:
            assert f["arr_0"].shape == (12, 8, 8, 3)
    samples = {m: np.load(tmp_path / "W" / "mri" / m / "seed_0" / "samples_2_8x8x8x3.npz")["arr_0"]
               for m in ("kind", "lora")}
    assert not np.array_equal(samples["kind"], samples["lora"])
    assert out["table3"][0]["mri"] != out["table3"][1]["mri"] and (tmp_path / "W" / "table3_fid.md").exists()
    capsys.readouterr()

    # A rerun trains and evaluates nothing again.
    monkeypatch.setattr("kindjax.train.stages.train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr("kindjax.evaluation.pipeline.evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    again = sweep(experiment_for(config), config, workdir, options)
    assert again == out and (tmp_path / "W" / "table3.md").read_text() == text

    # A wrong source is refused before anything runs: the dense run as the learngene, and the reverse.
    for key, run, match in (("learngene", dense_run, "model.linear.kind: learngene 'dense'"),
                            ("pretrained", kind_run, "holds a 'kind' DiT")):
        bad, _ = parse(",B", *line, f"--config.init.{key}={run}")
        with pytest.raises(ConfigError, match=match):
            sweep(DOMAIN_SHIFT, bad, str(tmp_path / "other"), options)
    small, _ = parse(",B", *line, "--config.model.linear.n_learngene=12")
    with pytest.raises(ConfigError, match="n_learngene: learngene 16 vs config 12"):
        sweep(DOMAIN_SHIFT, small, str(tmp_path / "other"), options)
    assert not (tmp_path / "other").exists()
