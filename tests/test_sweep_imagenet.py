"""The sweep's ``kind_tables`` experiment on its real path, tiny: a fake ImageNet (the ILSVRC 2012 tars)
prepared by TFDS's ``imagenet2012`` builder, encoded to latents by ``kindjax.tools.encode`` with a tiny random
diffusers VAE, KIND's class grouping, ``configs/kind_dit_b.py`` shrunk by command-line-style overrides,
pre-training, two tasks × {kind, lora}, reference batches from the validation images, ADM evaluation
with a random-weight Inception, and the pooled tables."""
import io
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from fake_imagenet import fake_manual_dir, validation_labels
from kindjax.data import center_crop_arr
from kindjax.papers.kind.classes import kind_merged_class, kind_pretrain_classes, kind_superclasses, kind_tasks
from kindjax.train.stages import check
from kindjax.sweep import common, grid
from kindjax.papers.kind.experiments import tables as experiments
from kindjax.papers.kind.experiments.tables import KIND_TABLES

pytest.importorskip("tensorflow", reason="preparing TFDS imagenet2012 needs tensorflow-cpu")

KIND_B = os.path.join(ROOT, "configs", "kind_dit_b.py")
TASKS, METHODS = ("task_1", "task_2"), ("kind", "lora")
NUM_VAL = 200          # validation files 1..200: 7 images of task_1, 6 of task_2, the rest of other classes
IMAGE_SIZE = 32        # a 4-block VAE (factor 8, as the SD-VAE): 4×4×4 latents


def member(merged: str) -> str:
    """An ImageNet synset of KIND merged class ``merged`` (a superclass's first member, or itself)."""
    return kind_superclasses().get(merged, (merged,))[0]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """The fake ImageNet prepared by TFDS and encoded: one training image per pre-training class, two
    per class of the two tasks, one of a class of task_3 (in no run); ``NUM_VAL`` validation images."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from configs.kind_dit_b import get_config
    from kindjax.tools.encode import encode

    root = tmp_path_factory.mktemp("imagenet")
    train = {member(c): 1 for c in kind_pretrain_classes()}
    train |= {member(c): 2 for t in TASKS for c in kind_tasks()[t]}
    train[member(kind_tasks()["task_3"][0])] = 1
    originals = fake_manual_dir(root / "manual", np.random.default_rng(0), train, NUM_VAL)
    torch.manual_seed(0)
    vae = str(root / "vae")
    diffusers.AutoencoderKL(block_out_channels=(4, 4, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
                            norm_num_groups=4).save_pretrained(vae, safe_serialization=True)
    config = get_config()
    config.data.update(root=str(root / "tfds"), manual_dir=str(root / "manual"), image_size=IMAGE_SIZE)
    config.vae.update(encode_batch_size=16, shard_size=64)
    index = encode(config, vae, str(root / "latents"), log=lambda s: None)
    return types.SimpleNamespace(root=root, train=train, originals=originals, vae=vae, index=index)


def sweep_config(imagenet, inception: str = ""):
    """``configs/kind_dit_b.py`` with the overrides a user gives ``python -m kindjax.sweep`` for a tiny
    run (``--config.model.arch= --config.model.hidden_size=160 …``): 157·N_T + N_G = 160 fills the rank."""
    from configs.kind_dit_b import get_config

    c = get_config()
    c.data.update(root=str(imagenet.root / "tfds"), latents=str(imagenet.root / "latents"), image_size=IMAGE_SIZE)
    c.model.update(arch="", hidden_size=160, depth=1, num_heads=2, image_size=4, dtype="float32",
                   adaln_init="gaussian")
    c.model.linear.update(n_learngene=3, n_tailor=1)
    c.vae.weights = imagenet.vae
    c.optim.update(warmup_steps=0, lr=0.05)   # the pre-trainings' (tasks keep their methods'): the two models differ
    c.train.update(batch_size=8, num_steps=2, ema_decay=0.0, log_every=1, checkpoint_every=2, sample_every=2)
    c.transfer.num_steps = 2
    c.sample.update(num_steps=2)
    c.eval.update(num_samples=8, batch_size=8, inception_weights=inception, inception_batch_size=8)
    return c


OPTIONS = dict(config_file=KIND_B, tasks=TASKS, methods=METHODS)


def validation_images(imagenet, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: the fake validation JPEGs whose synset's merged class is in ``task``, centre-cropped,
    and their labels (the class's position in Table 9's row), in file order."""
    classes, merged, names = kind_tasks()[task], kind_merged_class(), validation_labels()
    keep = [i for i in range(1, NUM_VAL + 1) if merged[names[i - 1]] in classes]
    images = [center_crop_arr(Image.open(io.BytesIO(imagenet.originals[f"ILSVRC2012_val_{i:08d}.JPEG"])), IMAGE_SIZE)
              for i in keep]
    return np.stack(images), np.array([classes.index(merged[names[i - 1]]) for i in keep])


def sorted_pairs(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, bytes]]:
    return sorted(zip(labels.tolist(), (image.tobytes() for image in images)))


@pytest.mark.slow  # 44 s (-n 2, 2 cores)
def test_kind_tables_grid_reads_the_fake_imagenet_and_writes_the_references(imagenet, tmp_path):
    """Every run of the grid passes the sweep's start-up check (model fits, data opens) and trains on
    exactly its classes' latents; each task's reference batch is its validation images, no other; a
    pre-training run finishes (the sweep can go on to the runs that need it)."""
    assert imagenet.index["num_examples"] == sum(imagenet.train.values())
    runs = KIND_TABLES.runs(sweep_config(imagenet), str(tmp_path), OPTIONS)
    grid.check_grid(runs)
    assert [(r.labels.get("task"), r.labels["method"]) for r in runs] == \
        [(None, "dense"), (None, "kind")] + [(t, m) for t in TASKS for m in METHODS]
    merged = kind_merged_class()
    for r in runs:
        data = check(r.config, starts=False)
        task = r.labels.get("task", "pretrain")
        classes = kind_pretrain_classes() if task == "pretrain" else kind_tasks()[task]
        assert data.class_names == classes and r.config.model.num_classes == len(classes)
        want = sorted(classes.index(merged[s]) for s, n in imagenet.train.items() for _ in range(n)
                      if merged[s] in classes)
        assert sorted(data.labels.tolist()) == want
    by = {(r.labels.get("task"), r.labels["method"]): r.config for r in runs}
    assert by["task_2", "lora"].model.linear.rank == len(kind_tasks()["task_2"])   # N_T·c with the override's N_T
    assert by["task_1", "kind"].model.linear.n_learngene == 3 and by["task_1", "kind"].model.hidden_size == 160
    for task in TASKS:
        run = next(r for r in runs if r.labels.get("task") == task)
        path = common.task_reference(run, log=lambda s: None)
        assert path == str(tmp_path / "references" / f"{task}.npz")
        images, labels = validation_images(imagenet, task)
        assert 0 < len(images) < NUM_VAL
        with np.load(path) as f:
            assert sorted_pairs(f["arr_0"], f["arr_1"]) == sorted_pairs(images, labels)   # TFDS's record order
    # The dense pre-training (the cheapest run) trains and is then finished for the sweep.
    metrics = grid.timed_stage(runs[0], KIND_TABLES.train_evaluate)
    assert metrics is not None and metrics["wall_seconds"] > 0
    assert grid.finished_runs(runs[:1])[runs[0].workdir] == {"step": 2}


def fid_float64(samples: np.ndarray, reference: np.ndarray) -> float:
    """The FID of two feature sets in float64, from their centred rows ``A`` (n1×d) and ``B`` (n2×d):
    ``Tr (Σ1 Σ2)^{1/2}`` is the nuclear norm of ``A Bᵀ`` over ``√((n1−1)(n2−1))`` (Σ1Σ2 shares its
    non-zero eigenvalues with ``(A Bᵀ)(A Bᵀ)ᵀ`` up to that factor), exact for rank-deficient covariances."""
    a, b = samples.astype(np.float64), reference.astype(np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    n1, n2 = len(a) - 1, len(b) - 1
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (ca ** 2).sum() / n1 + (cb ** 2).sum() / n2 - 2 * trace_sqrt)


@pytest.mark.slow   # ~8 min on 2 shared CPU cores: 6 trainings (the 157-class KIND compiles ~1.5 min), 4 evaluations
def test_kind_tables_sweep_end_to_end_on_fake_imagenet(imagenet, tmp_path, monkeypatch):
    """Pre-training, 2 tasks × {kind, lora}, references, ADM evaluation (random Inception), Table 2
    pooled over the tasks (= a float64 FID of the runs' concatenated features), its task mean and
    Table 8; a rerun trains, evaluates and writes nothing again."""
    torch = pytest.importorskip("torch")
    from kindjax.evaluation import inception
    from kindjax.evaluation.pooled import load_features
    from test_inception import random_fid_inception

    torch.save(random_fid_inception(1).state_dict(), tmp_path / "inception.pth")
    inception.convert_torch_weights(str(tmp_path / "inception.pth"), str(tmp_path / "inception.npz"))
    config, workdir = sweep_config(imagenet, str(tmp_path / "inception.npz")), str(tmp_path / "sweep")
    out = grid.sweep(KIND_TABLES, config, workdir, OPTIONS, log=print)
    runs = KIND_TABLES.runs(config, workdir, OPTIONS)
    done = grid.finished_runs(runs)
    assert [r.workdir for r in runs if done[r.workdir] is None] == []
    reports, samples = {}, {}
    for r in runs[2:]:
        reports[r.workdir] = report = json.loads(open(os.path.join(r.workdir, "eval_2.json")).read())
        assert report["config"]["eval"]["reference"] == r.extra["reference"] == \
            str(tmp_path / "sweep" / "references" / f"{r.labels['task']}.npz")
        features = load_features(report["features"])
        assert features["pool_3"].shape == (8, 2048) and np.isfinite(features["pool_3"]).all()
        assert load_features(report["reference_features"])["pool_3"].shape[0] == \
            len(validation_images(imagenet, r.labels["task"])[1])
        with np.load(report["samples"]) as f:
            samples[r.labels["task"], r.labels["method"]] = f["arr_0"]
    for task in TASKS:   # the methods' models differ: so do their samples
        assert not np.array_equal(samples[task, "kind"], samples[task, "lora"])
    for name in ("table2", "table2_task_mean", "table8"):
        assert (tmp_path / "sweep" / f"{name}.md").read_text().count("\n") >= 3
        for row in out[name]:
            assert all(np.isfinite(row[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall"))
    assert [(r["task"], r["method"]) for r in out["table8"]] == [(t, m) for t in TASKS for m in METHODS]
    for row in out["table2"]:
        members = [reports[r.workdir] for r in runs[2:] if r.labels["method"] == row["method"]]
        assert row["tasks"] == 2 and len(members) == 2
        pooled = [np.concatenate([load_features(m[k])["pool_3"] for m in members])
                  for k in ("features", "reference_features")]
        assert row["fid"] == pytest.approx(fid_float64(*pooled), rel=1e-5)
    # A rerun: nothing trains, samples, evaluates or writes a reference; the same tables come back.
    def refuse(*args, **kwargs):
        raise AssertionError("the rerun did work again")

    monkeypatch.setattr(grid, "stage", refuse)
    monkeypatch.setattr("kindjax.evaluation.pipeline.evaluate", refuse)
    monkeypatch.setattr("kindjax.evaluation.reference.write_reference_batch", refuse)
    again = grid.sweep(KIND_TABLES, config, workdir, OPTIONS, log=print)
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(out))
