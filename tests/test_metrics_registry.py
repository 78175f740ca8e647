"""The metric registry (``kindjax.evaluation.metric``): a metric is one module and a name. A metric
registered here on the fly, as a module would register it, is computed at the end of training and by
``python -m kindjax.evaluation``'s pipeline, and is a column of the sweep's tables, with no other edit;
``eval.metrics`` chooses; the defaults are the digits classifier's at the end of training on the digits
and ADM's in the pipeline; an unknown name is a one-line ConfigError; old runs still count."""
import glob
import json
import os
import re
import shutil

import numpy as np
import pytest

from conftest import tiny_config
from kindjax import checkpoints
from kindjax.config import ConfigError
from kindjax.evaluation.digits_evaluator import DigitsEvaluator
from kindjax.evaluation.end_of_training import balanced_labels, evaluation, training_metrics
from kindjax.evaluation.metrics import METRICS, Metric, Samples, register_metric
from kindjax.evaluation.pipeline import check_eval_config, evaluate, pipeline_metrics
from kindjax.io.paths import read_json, write_json
from kindjax.train import stages

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("metrics_registry")

ADM = ("fid", "sfid", "inception_score", "precision", "recall")


@pytest.fixture(scope="module")
def mean_intensity():
    """``mean_intensity``: the mean of the samples in [-1, 1] (float64), registered as a metric module
    would; it keeps the images it was given, so a test can check them independently."""
    seen = []

    def compute(inputs):
        images = inputs["samples"].images
        seen.append(np.array(images))
        return float(np.mean(images, dtype=np.float64))

    register_metric(Metric("mean_intensity", ("samples",), compute, "mean intensity", higher_is_better=False,
                           fmt=".4f"))
    yield seen
    del METRICS._parts["mean_intensity"]   # the registry has no unregister: a test's metric leaves no trace


@pytest.fixture(scope="module")
def trained(mean_intensity, tmp_path_factory):
    """The ``train`` job (``kindjax.train.stages.run``) on a tiny digits DiT with the digits metrics and
    ``mean_intensity`` chosen."""
    config = tiny_config()
    config.train.update(num_steps=2, checkpoint_every=2)
    config.eval.update(num_samples=12, batch_size=12, metrics=("sample_accuracy", "mean_intensity", "frechet_distance"))
    workdir = str(tmp_path_factory.mktemp("metrics") / "run")
    mean_intensity.clear()
    stages.run(config, workdir)
    return config, workdir, mean_intensity[0]


def test_a_new_metric_is_computed_at_the_end_of_training(trained):
    config, workdir, images = trained
    metrics = read_json(os.path.join(workdir, "metrics.json"))
    assert list(metrics)[:4] == ["step", "sample_accuracy", "mean_intensity", "frechet_distance"]
    assert images.shape == (12, 8, 8, 1) and images.std() > 0        # the EMA samples, not a placeholder
    assert metrics["mean_intensity"] == pytest.approx(float(np.mean(images.astype(np.float64))), rel=1e-12)
    # The digits metrics of the same samples, from the registry, equal a freshly trained evaluator's.
    labels = balanced_labels(12, 10)
    fresh = DigitsEvaluator.train(seed=0).evaluate(images, labels)
    assert metrics["sample_accuracy"] == pytest.approx(fresh["sample_accuracy"], abs=1e-12)
    assert metrics["frechet_distance"] == pytest.approx(fresh["frechet_distance"], rel=1e-9)


def test_a_new_metric_is_computed_by_the_pipeline(trained, mean_intensity):
    """Chosen alone, it needs no reference batch nor Inception: the pipeline samples and scores."""
    config, workdir, _ = trained
    c = config.copy_and_resolve_references()
    c.eval.update(metrics=("mean_intensity", "sample_accuracy"), num_samples=10, batch_size=10)
    assert pipeline_metrics(c) == ("mean_intensity",)     # the digits classifier is the end of training's
    metrics = evaluate(c, workdir)
    report = read_json(os.path.join(workdir, "eval_2.json"))
    with np.load(os.path.join(workdir, "samples_2_10x8x8x3.npz")) as f:
        pixels = f["arr_0"]
    assert metrics == report["metrics"] == {"mean_intensity": pytest.approx(np.mean(pixels / 127.5 - 1.0), rel=1e-6)}
    assert report["features"] is None and report["reference"] is None
    # By default the pipeline computes ADM's metrics, which need a reference batch.
    c.eval.metrics = ()
    assert pipeline_metrics(c) == ADM
    with pytest.raises(ConfigError, match="eval.reference is not set"):
        check_eval_config(c)


def test_a_new_metric_is_a_column_of_the_sweep_tables(mean_intensity, tmp_path):
    """The digits sweep scores what its runs' training reported: the new metric becomes a column of
    ``table.md`` and ``table_per_task.md``, and of FINE's depth tables, averaged as the others."""
    from test_sweep import digits_kind_config, tiny_fine_config
    from kindjax.papers.fine.experiments.depths import FINE_DEPTHS
    from kindjax.papers.kind.experiments.tables import DIGITS

    rng = np.random.default_rng(0)
    runs = [r for r in DIGITS.runs(digits_kind_config(), str(tmp_path / "digits"), dict(seeds=2, methods=("lora",)))
            if r.in_table]
    reported = {r.workdir: dict(step=2, sample_accuracy=rng.uniform(), mean_intensity=rng.uniform(-1, 1),
                                frechet_distance=rng.uniform(5, 50), wall_seconds=rng.uniform(1, 9)) for r in runs}
    scores = {r.workdir: DIGITS.score(r, reported[r.workdir]) for r in runs}
    os.makedirs(tmp_path / "digits")
    rows = DIGITS.write_tables(runs, scores, str(tmp_path / "digits"))
    header = (tmp_path / "digits" / "table.md").read_text().splitlines()[0]
    assert header == "| method | accuracy ↑ | mean intensity ↓ | Fréchet distance ↓ | trainable params | wall time (s) |"
    for row in rows:
        mine = [reported[r.workdir]["mean_intensity"] for r in runs if r.labels["method"] == row["method"]]
        assert row["mean_intensity"] == pytest.approx(np.mean(mine)) and row["seeds"] == 2
        assert f"{np.mean(mine):.4f} ± {np.std(mine):.4f}" in (tmp_path / "digits" / "table.md").read_text()
    assert "mean intensity ↓" in (tmp_path / "digits" / "table_per_task.md").read_text()
    # FINE's depth tables: one file per metric.
    runs = [r for r in FINE_DEPTHS.runs(tiny_fine_config(), str(tmp_path / "fine"), dict(depths=(1,), seeds=1))
            if r.in_table]
    scores = {r.workdir: FINE_DEPTHS.score(r, reported[next(iter(reported))]) for r in runs}
    os.makedirs(tmp_path / "fine")
    FINE_DEPTHS.write_tables(runs, scores, str(tmp_path / "fine"))
    text = (tmp_path / "fine" / "depths_mean_intensity.md").read_text()
    assert text.startswith("| initialiser | L1 |") and "| scratch |" in text
    assert (tmp_path / "fine" / "depths_frechet.md").exists() and (tmp_path / "fine" / "depths_accuracy.md").exists()


def test_a_new_metric_is_a_column_of_the_imagenet_tables_not_of_the_pooled_one(mean_intensity, tmp_path):
    """KIND Tables 8 and 2 (task mean) take every scored metric; the pooled Table 2 only those of
    Inception features, which the kept features can give."""
    from test_sweep import fake_features
    from kindjax.evaluation.pooled import save_features
    from kindjax.papers.kind.experiments import tables as experiments
    from kindjax.sweep import grid

    rng = np.random.default_rng(1)
    runs, scores = [], {}
    for task in ("task_1", "task_2"):
        ref_path = str(tmp_path / f"ref_{task}.npz")
        save_features(ref_path, fake_features(rng, 30, 0.0), "tf1")
        for method in ("kind", "lora"):
            workdir = str(tmp_path / task / method)
            os.makedirs(workdir)
            save_features(os.path.join(workdir, "features.npz"), fake_features(rng, 25, 0.2), "tf1")
            runs.append(grid.Run(dict(task=task, method=method, seed=0), workdir, None))
            scores[workdir] = dict(fid=rng.uniform(10, 50), mean_intensity=rng.uniform(-1, 1), trainable=1e6,
                                   gflops=10.0, features=os.path.join(workdir, "features.npz"),
                                   reference_features=ref_path)
    out = experiments.kind_tables_write(runs, scores, str(tmp_path))
    assert "mean intensity ↓" in (tmp_path / "table8.md").read_text().splitlines()[0]
    assert "mean intensity ↓" in (tmp_path / "table2_task_mean.md").read_text().splitlines()[0]
    assert (tmp_path / "table2.md").read_text().splitlines()[0] == "| method | Para. (M) | FLOPs (G) | FID ↓ |"
    kind = [scores[r.workdir]["mean_intensity"] for r in runs if r.labels["method"] == "kind"]
    assert next(r for r in out["table2_task_mean"] if r["method"] == "kind")["mean_intensity"] == \
        pytest.approx(np.mean(kind))


def test_unknown_metric_names_are_one_line_config_errors(mean_intensity):
    config = tiny_config()
    config.eval.metrics = ("fid", "frechet")
    for refuse in (stages.check, check_eval_config, training_metrics):
        with pytest.raises(ConfigError) as e:
            refuse(config)
        message = str(e.value)
        assert "\n" not in message and message.startswith("eval.metrics='frechet' is not a known metric; use one of")
        assert all(repr(n) in message for n in ADM + ("fdd", "sample_accuracy", "frechet_distance", "mean_intensity"))
    config.eval.metrics = ("fid,sfid",)          # a comma-joined string from the command line
    with pytest.raises(ConfigError, match=re.escape("a tuple: --config.eval.metrics=\"('fid', 'sfid')\"")):
        training_metrics(config)
    config.eval.metrics = ("sample_accuracy",)   # known, but none the pipeline computes
    with pytest.raises(ConfigError, match="none is computed by python -m kindjax.evaluation"):
        pipeline_metrics(config)


def test_samples_give_images_and_pixels():
    """``Samples`` given as floats give ADM's uint8 RGB pixels, and the reverse, by the naive formulas."""
    rng = np.random.default_rng(3)
    grey = rng.uniform(-1.1, 1.1, (5, 4, 4, 1)).astype(np.float32)
    pixels = Samples(np.arange(5), images=grey).pixels
    naive = np.clip(np.floor((grey.astype(np.float64) + 1) * 127.5 + 0.5), 0, 255).astype(np.uint8)
    assert pixels.dtype == np.uint8 and pixels.shape == (5, 4, 4, 3)
    assert all(np.array_equal(pixels[..., c], naive[..., 0]) for c in range(3))
    rgb = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.testing.assert_allclose(Samples(np.arange(5), pixels=rgb).images, rgb / 127.5 - 1.0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one of them"):
        Samples(np.arange(5))


def test_defaults_digits_at_the_end_of_training_adm_in_the_pipeline():
    from configs.dit_b import get_config as imagenet_config

    digits = tiny_config()
    assert training_metrics(digits) == ("sample_accuracy", "frechet_distance") and evaluation(digits) is not None
    assert pipeline_metrics(digits) == ADM
    imagenet = imagenet_config()
    assert training_metrics(imagenet) == () and evaluation(imagenet) is None   # nothing is sampled there
    assert pipeline_metrics(imagenet) == ADM
    imagenet.eval.dinov2_weights = "/weights/dinov2-large"
    assert pipeline_metrics(imagenet) == ADM + ("fdd",)
    imagenet.eval.metrics = ("fdd", "fid")                                      # the order chosen
    assert pipeline_metrics(imagenet) == ("fdd", "fid")


def test_a_stage_finished_before_eval_metrics_existed_is_still_finished(tmp_path):
    """``metrics.json`` of a stage written before the key: finished under the default choice, run
    again when the config chooses other metrics."""
    config = tiny_config()
    old = stages.fingerprint(config, {})
    del old["eval"]["metrics"]
    write_json(str(tmp_path / "metrics.json"), {"step": config.train.num_steps, "sample_accuracy": 0.5,
                                                "fingerprint": old})
    assert stages.finished(str(tmp_path), config) == {"step": config.train.num_steps, "sample_accuracy": 0.5}
    config.eval.metrics = ("sample_accuracy",)
    assert stages.finished(str(tmp_path), config) is None


def test_a_checkpoint_written_before_eval_metrics_existed_is_evaluated(trained, mean_intensity, tmp_path):
    """The checkpoint's saved config lacks ``eval.metrics``: the pipeline restores and scores it."""
    config, workdir, _ = trained
    old = str(tmp_path / "old")
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("eval_*", "samples_*", "metrics.json"))
    edited = 0
    for path in glob.glob(os.path.join(old, "checkpoints", "*", "meta", "*")):
        try:
            meta = json.loads(open(path).read())
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(meta, dict) and "config" in meta:
            del meta["config"]["eval"]["metrics"]
            open(path, "w").write(json.dumps(meta))
            edited += 1
    assert edited == 1 and "metrics" not in checkpoints.locate(old).meta["config"]["eval"]
    c = config.copy_and_resolve_references()
    c.eval.update(metrics=("mean_intensity",), num_samples=4, batch_size=4)
    assert set(evaluate(c, old)) == {"mean_intensity"}


def test_fdd_in_the_pipeline_follows_eval_fdd_normalize(monkeypatch, tmp_path):
    """The pipeline's DINOv2 input carries ``eval.fdd_normalize`` and the ``fdd`` metric applies it: on
    random features, the Fréchet distance of the unit-norm features (``"l2"``) or of the raw ones
    (``"none"``), each against a naive float64 formula (scipy's sqrtm)."""
    from scipy import linalg

    from kindjax.evaluation import dinov2
    from kindjax.evaluation.metrics import Inputs, compute_metrics
    from kindjax.evaluation.pipeline import feature_inputs

    rng = np.random.default_rng(4)
    a, b = rng.normal(1.0, 3.0, (40, 6)), rng.normal(0.5, 2.0, (50, 6)) + rng.normal(size=6)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8))

    class Network:   # load_dinov2's module: only clone(dtype=...) is asked of it
        def clone(self, dtype):
            return self

    monkeypatch.setattr(dinov2, "load_dinov2", lambda weights, model: (Network(), {}))
    monkeypatch.setattr(dinov2, "dinov2_features",
                        lambda module, params, pixels, batch_size, mesh, progress: a if pixels is images else b)

    def naive(x, y):
        mx, my, sx, sy = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        return float(np.sum((mx - my) ** 2) + np.trace(sx + sy - 2 * linalg.sqrtm(sx @ sy).real))

    config = tiny_config()
    config.eval.update(reference=str(tmp_path / "ref.npz"), dinov2_weights="dinov2", metrics=("fdd",))
    unit = lambda f: f / np.linalg.norm(f, axis=-1, keepdims=True)   # noqa: E731
    got = {}
    for normalize, want in (("l2", naive(unit(a), unit(b))), ("none", naive(a, b))):
        config.eval.fdd_normalize = normalize
        inputs = feature_inputs(config, {"dinov2"}, images, None, lambda line: None)
        got[normalize] = compute_metrics(("fdd",), Inputs(**inputs))["fdd"]
        assert got[normalize] == pytest.approx(want, rel=1e-6), normalize
    assert got["none"] > 10 * got["l2"]
