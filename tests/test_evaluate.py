"""``python -m kindjax.evaluation`` end to end on a tiny digits model with a random-weight Inception."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, tiny_config
from kindjax.config import ConfigError
from kindjax.data.digits import load_digits
from kindjax.evaluation.pipeline import evaluate
from kindjax.evaluation import adm, inception
from kindjax.train.trainer import train
from test_inception import random_fid_inception

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("evaluate")

METRICS = {"inception_score", "fid", "sfid", "precision", "recall"}


def tb_scalars(workdir):
    values = {}
    for f in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def tiny_dinov2(directory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(directory, safe_serialization=True)
    return str(directory)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = tiny_config()
    config.train.update(num_steps=2, checkpoint_every=2)
    workdir = str(root / "run")
    train(config, workdir)
    pth, npz = str(root / "inception.pth"), str(root / "inception.npz")
    torch.save(random_fid_inception(1).state_dict(), pth)
    inception.convert_torch_weights(pth, npz)
    real = load_digits()
    pixels = np.repeat(np.round((real.images[:12] + 1) * 127.5).astype(np.uint8), 3, axis=-1)
    np.savez(root / "ref.npz", arr_0=pixels)
    config.eval.update(num_samples=10, batch_size=10, reference=str(root / "ref.npz"), inception_weights=npz,
                       inception_batch_size=16, dinov2_weights=tiny_dinov2(root / "dinov2"),
                       dinov2_model="any")   # a tiny random DINOv2, none of the released sizes
    return config, workdir, root


@pytest.mark.slow  # 64 s (-n 2, 2 cores)
def test_evaluate_writes_npz_json_and_tensorboard(setup, capsys):
    config, workdir, root = setup
    metrics = evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "sampled 10/10 (100%)" in out and "Inception features of the reference: 12/12" in out
    assert "DINOv2 features of the samples: 10/10" in out

    with np.load(os.path.join(workdir, "samples_2_10x8x8x3.npz")) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 3)
    assert (images[..., 0] == images[..., 2]).all() and images.std() > 0  # grey digits, not blank
    np.testing.assert_array_equal(labels, np.random.default_rng(config.eval.seed).integers(0, 10, 10))  # eval.labels

    report = json.load(open(os.path.join(workdir, "eval_2.json")))
    assert report["step"] == 2 and report["metrics"] == metrics
    assert set(metrics) == METRICS | {"fdd"}
    assert report["config"]["eval"]["num_samples"] == 10 and report["config"]["model"]["hidden_size"] == 64
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["fid"] > 0 and metrics["fdd"] > 0 and 1.0 <= metrics["inception_score"] <= 1008
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0

    scalars = tb_scalars(workdir)
    for k in METRICS | {"fdd"}:
        assert scalars[f"eval/{k}"] == {2: pytest.approx(metrics[k], rel=1e-6)}
    # The kept features (for metrics pooled over runs, kindjax.evaluation.pooled) give the same metrics.
    from kindjax.evaluation.pooled import load_features, pooled_metrics
    kept = [load_features(report[k]) for k in ("features", "reference_features")]
    assert report["inception_preprocess"] == "tf1" and report["labels"] == "uniform"
    assert [k["inception_preprocess"] for k in kept] == ["tf1", "tf1"]
    assert kept[0]["pool_3"].shape == (10, 2048) and kept[1]["pool_3"].shape == (12, 2048)
    again = pooled_metrics([kept[0]], [kept[1]])
    assert again == {k: pytest.approx(metrics[k], rel=1e-5) for k in again}


@pytest.mark.slow  # two more runs: four 2048-dim Fréchet distances (~50 s of CPU)
def test_statistics_only_reference_reuses_samples(setup, capsys):
    config, workdir, root = setup
    config = config.copy_and_resolve_references()
    rng = np.random.default_rng(0)
    stats = adm.statistics({"pool_3": rng.gamma(1.0, size=(30, 2048)), "spatial": rng.gamma(1.0, size=(30, 2023))})
    np.savez(root / "stats.npz", **stats)
    config.eval.update(reference=str(root / "stats.npz"), dinov2_weights="")
    samples = os.path.join(workdir, "samples_2_10x8x8x3.npz")
    first = evaluate(config, workdir)
    mtime = os.path.getmtime(samples)
    capsys.readouterr()
    metrics = evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "Reusing the samples" in out and "sampled" not in out and os.path.getmtime(samples) == mtime
    assert "precision and recall are skipped" in out
    assert metrics == first and set(metrics) == {"inception_score", "fid", "sfid"}
    assert json.load(open(os.path.join(workdir, "eval_2.json")))["metrics"] == metrics
    # Other sampling settings are not served from the file.
    config.sample.cfg_scale = 1.0
    evaluate(config, workdir)
    assert "sampled 10/10" in capsys.readouterr().out and os.path.getmtime(samples) > mtime


def test_refusals_before_sampling(setup, tmp_path):
    config, workdir, root = setup
    bad = config.copy_and_resolve_references()
    bad.eval.inception_preprocess = "tf2"
    with pytest.raises(ConfigError, match="eval.inception_preprocess='tf2'"):
        evaluate(bad, workdir)
    bad = config.copy_and_resolve_references()
    np.savez(tmp_path / "stats.npz", **{k: np.zeros(2) for k in adm.STAT_KEYS})
    bad.eval.reference = str(tmp_path / "stats.npz")
    with pytest.raises(ConfigError, match="holds no images"):
        evaluate(bad, workdir)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        evaluate(config, str(tmp_path))


def test_cli_refuses_missing_reference(setup, single_device_env):
    _, workdir, _ = setup
    out = subprocess.run([sys.executable, "-m", "kindjax.evaluation", "--config",
                          os.path.join(ROOT, "configs/dit_digits.py"), "--run", workdir],
                         env=single_device_env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "kindjax.evaluation: eval.reference is not set" in out.stderr


@pytest.mark.slow  # 20 s (-n 2, 2 cores)
def test_out_keeps_the_run_untouched(setup, tmp_path):
    """With ``out`` the results go there; the evaluated run gains no file."""
    config, workdir, _ = setup
    config = config.copy_and_resolve_references()
    config.eval.dinov2_weights = ""
    before = sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)
    metrics = evaluate(config, workdir, out=str(tmp_path / "elsewhere"))
    after = sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)
    assert after == before
    report = json.load(open(tmp_path / "elsewhere" / "eval_2.json"))
    assert report["metrics"] == metrics and report["samples"] == str(tmp_path / "elsewhere" / "samples_2_10x8x8x3.npz")
    assert os.path.isfile(report["samples"]) and os.path.isfile(report["features"])
    assert tb_scalars(str(tmp_path / "elsewhere"))["eval/fid"] == {2: pytest.approx(metrics["fid"], rel=1e-6)}


def test_latent_samples_are_decoded_by_the_vae(tmp_path):
    """Latent models: samples (``vae.scale · z`` as trained) → diffusers' ``decode(latents / scale)``."""
    from diffusers import AutoencoderKL

    from kindjax.evaluation.pipeline import latent_decoder
    from kindjax.sharding import make_mesh

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=8).eval()
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = tiny_config()
    config.data.name, config.model.in_channels = "latents", 4
    config.vae.weights, config.eval.batch_size = str(tmp_path / "vae"), 3
    latents = np.random.default_rng(0).normal(size=(5, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(latents / config.vae.scale).permute(0, 3, 1, 2)).sample
    ours = latent_decoder(config, make_mesh())(latents)
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert ours.shape == (5, 8, 8, 3)
    assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))
