"""The sweep's ``table1`` experiment (KIND Table 1): its grid for DiT-B, Trad. PT's cut model, and a tiny
sweep on the digits end to end (every entry built, trained, scored by the ADM pipeline, tabulated, resumed)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from kindjax.papers.kind import sizes as vs
from kindjax.config import ConfigError, validate
from kindjax.data.digits import DigitImages, load_digits
from kindjax.papers.kind.layer import kind_config
from kindjax.models.dit import build_model
from kindjax.train.stages import finished, stage
from kindjax.sweep import grid
from kindjax.papers.kind.experiments.table1 import TABLE1, steps_text

KIND_B = os.path.join(ROOT, "configs", "kind_dit_b.py")


@pytest.mark.slow  # 11 s (-n 2, 2 cores)
def test_dit_b_grid_entries_sizes_steps_and_needs(tmp_path):
    from configs.kind_dit_b import get_config

    config = get_config()
    config.eval.reference = "/refs/{task}.npz"
    runs = TABLE1.runs(config, str(tmp_path), dict(sizes=("94.5M", "120M")))
    grid.check_grid(runs)
    dense, kind = runs[0].workdir, runs[1].workdir
    assert [r.labels["method"] for r in runs[:2]] == ["dense", "kind"] and not runs[0].in_table
    table = runs[2:]
    assert [(r.labels["size"], r.labels["method"]) for r in table] == \
        [(s, m) for s in ("94.5M", "120M") for m in ("trad_pt", "heur_lg", "laptop_diff", "auto_lg", "kind")]
    learngene, tailor = vs.kind_size(runs[1].config)
    _, block = vs.dense_size(runs[0].config)
    for size, text, k in ((94_500_000, "94.5M", (94_500_000 - learngene) // tailor),
                          (120_000_000, "120M", (120_000_000 - learngene) // tailor)):
        by = {r.labels["method"]: r for r in table if r.labels["size"] == text}
        target = by["kind"].extra["params"]
        assert target == learngene + k * tailor <= size and k >= 1
        for name, r in by.items():
            c = r.config
            validate(c, 1)
            assert c.model.num_classes == k and tuple(c.data.classes) == tuple(range(k)) and c.data.task == "pretrain"
            assert r.extra["reference"] == f"/refs/size_{text}.npz" and c.eval.reference == ""
            assert r.workdir == str(tmp_path / f"size_{text}" / "seed_0" / name)
            assert c.train.num_steps == (0 if name in ("kind", "trad_pt") else 100_000)
            assert r.extra["params"] == vs._count(c)
            if name in ("heur_lg", "laptop_diff", "auto_lg"):
                assert 2 * abs(r.extra["params"] - target) <= block and c.model.depth < 12
        assert by["kind"].needs == (kind,) and by["trad_pt"].needs == by["heur_lg"].needs == (dense,)
        assert by["laptop_diff"].needs == (dense, by["trad_pt"].workdir)
        assert by["heur_lg"].config.init.pretrained == by["heur_lg"].workdir + "_source"
    # The default size is the smallest KIND model; --methods keeps Laptop-Diff's source as a prerequisite.
    one = TABLE1.runs(config, str(tmp_path), dict(methods=("laptop_diff",), seeds=2))
    assert [(r.labels["method"], r.in_table, r.labels["seed"]) for r in one[2:]] == \
        [("trad_pt", False, 0), ("laptop_diff", True, 0), ("trad_pt", False, 1), ("laptop_diff", True, 1)]
    assert one[2].labels["size"] == str(learngene + tailor) and one[2].config.model.num_classes == 1
    assert one[5].config.train.seed == 1 and one[5].config.eval.seed == config.eval.seed + 1
    with pytest.raises(ValueError, match="--sizes 1M: size 1,000,000 is below the smallest KIND model"):
        TABLE1.runs(config, str(tmp_path), dict(sizes=("1M",)))
    config.eval.reference = "/refs/one.npz"
    with pytest.raises(ConfigError, match=r"give a pattern with \{task\}"):
        TABLE1.runs(config, str(tmp_path), {})
    assert steps_text(100_000) == "100K" and steps_text(0) == "0" and steps_text(2) == "2"


@pytest.mark.slow  # 14 s (-n 2, 2 cores)
def test_trad_pt_cut_model_is_the_dense_model_on_its_classes(tmp_path):
    from kindjax.checkpoints.learngene import load_params
    from test_variable_size import pretrain_config, saved_run

    dense = pretrain_config(kind_config(1, 1))
    dense.model.linear = dense.model.linear.__class__(dict(kind="dense"))
    dense_dir = saved_run(dense, tmp_path / "dense", 3)
    entry = vs.Entry("trad_pt", vs.trad_pt_config(dense, (5, 1, 3)), str(tmp_path / "trad_pt"), 0, 0)
    entry = vs.Entry(entry.name, entry.config, entry.workdir, 0, vs._count(entry.config))
    assert vs.build_trad_pt(entry, dense_dir) == {"classes": [5, 1, 3], "params": entry.params}
    cut, _ = load_params(entry.workdir)
    full, _ = load_params(dense_dir)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([1, 250, 600, 999], jnp.int32)
    got = jax.jit(build_model(entry.config).apply)({"params": cut}, x, t, jnp.asarray([0, 1, 2, 3]))   # 3: null
    want = jax.jit(build_model(dense).apply)({"params": full}, x, t, jnp.asarray([5, 1, 3, 7]))        # 7: null
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    other = jax.jit(build_model(dense).apply)({"params": full}, x, t, jnp.asarray([0, 0, 0, 0]))
    assert np.abs(np.asarray(other) - np.asarray(want))[:3].max() > 1e-3          # the labels matter
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        vs.build_trad_pt(entry, dense_dir)
    # A 0-step stage trains nothing: its written model is recorded finished (a rerun skips it) ...
    assert finished(entry.workdir, entry.config) is None
    assert stage(entry.config, entry.workdir, None) == {"step": 0} == finished(entry.workdir, entry.config)
    # ... and without a model there is nothing to record.
    with pytest.raises(ConfigError, match="train.num_steps=0 trains nothing, but .* holds no checkpoint"):
        stage(entry.config, str(tmp_path / "empty"), None)


def test_digits_reference_batch_of_a_class_subset(tmp_path):
    """The sweep writes a size's reference from the digits of its classes (relabelled, as the model's)."""
    from kindjax.sweep.common import task_reference

    c = tiny_config()
    c.data.classes, c.model.num_classes = (5, 1), 2
    run = grid.Run(dict(size="s", method="kind", seed=0), str(tmp_path / "run"), c,
                   extra=dict(reference=str(tmp_path / "refs" / "size_s.npz")))
    assert task_reference(run, log=lambda _: None) == run.extra["reference"]
    batch = np.load(run.extra["reference"])
    digits = load_digits((5, 1))
    np.testing.assert_array_equal(batch["arr_1"], digits.labels)
    assert batch["arr_0"].shape == (len(digits.labels), 8, 8, 3) and batch["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(batch["arr_0"][..., 0], np.round((digits.images[..., 0] + 1) * 127.5))
    assert sorted(np.unique(batch["arr_0"]).tolist()) == sorted({round(v * 127.5 / 8) for v in range(17)})
    np.testing.assert_array_equal(batch["arr_0"][..., 0], batch["arr_0"][..., 2])


def digits_table1_config(inception_npz):
    """A tiny KIND digits pre-training (7 classes, hidden 32, depth 4), 2 steps, 8 evaluation samples."""
    c = tiny_config()
    c.model.update(hidden_size=32, num_heads=2, depth=4, num_classes=7, adaln_init="gaussian")
    c.data.classes = (0, 1, 2, 3, 4, 5, 6)
    c.model.linear = kind_config(n_learngene=11, n_tailor=3)
    c.train.update(num_steps=2, checkpoint_every=2, log_every=2)
    c.eval.update(num_samples=8, batch_size=8, inception_weights=inception_npz, inception_batch_size=16)
    return c


@pytest.mark.slow   # two pre-trainings, three 2-step baselines, Heur-LG's scores, Auto-LG's probe, 5 evaluations
def test_digits_sweep_builds_trains_scores_and_tabulates_every_entry(tmp_path):
    import torch

    from kindjax.evaluation import inception
    from test_inception import random_fid_inception

    torch.save(random_fid_inception(1).state_dict(), tmp_path / "inception.pth")
    npz = str(tmp_path / "inception.npz")
    inception.convert_torch_weights(str(tmp_path / "inception.pth"), npz)
    config, workdir, options = digits_table1_config(npz), str(tmp_path / "w"), dict(steps=2, probe_steps=1)
    config.eval.reference = str(tmp_path / "refs" / "{task}.npz")     # 12 real zeros: the 1-class model's digit
    learngene, tailor = vs.kind_size(config)
    os.makedirs(tmp_path / "refs")
    zeros = DigitImages((0,))
    np.savez(tmp_path / "refs" / f"size_{learngene + tailor}.npz", arr_0=np.stack([zeros.image(i) for i in range(12)]))
    rows = grid.sweep(TABLE1, config, workdir, options)
    runs = TABLE1.runs(config, workdir, options)
    assert [r["method"] for r in rows] == list(vs.ENTRIES)
    by = {r["method"]: r for r in rows}
    for r in runs[2:]:
        assert finished(r.workdir, r.config) is not None
    assert by["kind"]["time"] == by["trad_pt"]["time"] == "0" and by["heur_lg"]["time"] == "2"
    assert all(np.isfinite(r[m]) for r in rows for m in ("fid", "sfid", "inception_score", "precision", "recall"))
    assert by["kind"]["para_m"] * 1e6 == runs[-1].extra["params"]
    text = (tmp_path / "w" / "table1.md").read_text()
    assert "| Trad. PT |" in text and "| Laptop-diff |" in text and (tmp_path / "w" / "table1.png").stat().st_size
    assert runs[2].extra["reference"] == str(tmp_path / "refs" / f"size_{learngene + tailor}.npz")
    # A rerun trains and builds nothing again, and --tables_only writes the same table.
    stamps = {p: os.path.getmtime(p) for p in map(str, (tmp_path / "w").rglob("*")) if os.path.isfile(p)}
    assert grid.sweep(TABLE1, config, workdir, options) == rows
    assert {p: os.path.getmtime(p) for p in stamps if "table1" not in os.path.basename(p)} == \
        {p: t for p, t in stamps.items() if "table1" not in os.path.basename(p)}
    os.remove(tmp_path / "w" / "table1.md")
    assert grid.sweep(TABLE1, config, workdir, options, tables_only=True) == rows
    assert (tmp_path / "w" / "table1.md").read_text() == text
