"""KIND Table 1 (kindjax.papers.kind.sizes): the recombined model has the chosen size and the full model's
outputs on its classes; Heur-/Auto-LG land within half a block of that size and inherit what they chose."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.papers.kind import sizes as vs
from kindjax.papers.kind.layer import kind_config
from kindjax.models.dit import abstract_params, build_model, init_params


def pretrain_config(linear):
    """configs/kind_digits.py's pre-training stage, tiny: 7 classes, hidden 32, depth 4."""
    from configs.kind_digits import get_config

    c = get_config()
    c.job = "train"
    c.transfer.update(classes=(), recombine_classes=())
    c.model.update(hidden_size=32, depth=4, num_heads=2, linear=linear)
    c.train.batch_size = 16
    return c


def saved_run(config, directory, seed):
    """A step directory (items ``params``, ``ema_params``, ``meta``) of ``config`` whose every parameter is
    random (tailors and adaLN included): drawn from the shapes, no compilation."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
                          abstract_params(build_model(config)))
    meta = {"step": 0, "config": checkpoints.config_json(config)}
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(directory, args=ocp.args.Composite(
        params=ocp.args.PyTreeSave(params), ema_params=ocp.args.PyTreeSave(params),
        meta=ocp.args.JsonSave(meta)))
    return str(directory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("table1")
    kind = pretrain_config(kind_config(n_learngene=11, n_tailor=3))      # r = 7·3 + 11 = 32
    dense = pretrain_config(kind_config(1, 1))
    dense.model.linear = dense.model.linear.__class__(dict(kind="dense"))
    return kind, saved_run(kind, root / "kind", 0), dense, saved_run(dense, root / "dense", 10), root


@pytest.mark.slow  # 32 s (-n 2, 2 cores)
def test_recombined_model_has_the_size_and_the_full_models_outputs(runs):
    from kindjax.papers.kind.accounting import parameter_counts
    from kindjax.evaluation.pipeline import restore_ema_params
    from kindjax.checkpoints.learngene import load_params
    from kindjax.sharding import make_mesh

    kind, kind_dir, _, _, root = runs
    learngene, tailor = vs.kind_size(kind)
    full = param_rules.count(abstract_params(build_model(kind)))
    assert learngene + 7 * tailor == full and tailor > 0          # linear in the classes, from the full shapes
    target = learngene + 2 * tailor
    assert vs.classes_for_size(kind, target) == vs.classes_for_size(kind, target + tailor - 1) == 2
    with pytest.raises(ValueError, match="below the smallest KIND model"):
        vs.classes_for_size(kind, learngene + tailor - 1)
    with pytest.raises(ValueError, match="above the full KIND model"):
        vs.classes_for_size(kind, full + tailor)
    assert vs.parse_size("70.2M") == 70_200_000 and vs.parse_size("1234") == 1234

    [entry] = vs.table1_entries(kind_dir, str(root / "out"), size=target + tailor // 2, classes=(5, 1),
                                entries=("kind",))
    assert entry.params == target == parameter_counts(entry.config)[1]          # accounting agrees
    assert tuple(entry.config.data.classes) == (5, 1) and entry.train_steps == 0
    record = vs.build([entry], kind_dir)["kind"]
    assert record == {"classes": [5, 1], "params": target}

    # Read back as `python -m kindjax.evaluation` reads a run, and compare with the full model.
    assembled, step = restore_ema_params(entry.config, entry.workdir, make_mesh(-1, 1))
    assert step == 0 and param_rules.count(assembled) == target
    full_params, _ = load_params(kind_dir)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([3, 500, 999], jnp.int32)
    full_model = jax.jit(build_model(kind).apply)
    got = jax.jit(build_model(entry.config).apply)({"params": assembled}, x, t, jnp.asarray([0, 1, 2]))  # 2: null
    want = full_model({"params": full_params}, x, t, jnp.asarray([5, 1, 7]))                             # 7: null
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    other = full_model({"params": full_params}, x, t, jnp.asarray([3, 3, 3]))
    assert np.abs(np.asarray(other) - np.asarray(want))[:2].max() > 1e-3     # the tailors matter

    with pytest.raises(ValueError, match="classes names 3 classes but size .* fits 2"):
        vs.table1_entries(kind_dir, str(root / "o2"), size=target, classes=(0, 1, 2), entries=("kind",))
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        vs.build([entry], kind_dir)


def layer_transfer_entries(runs, name):
    kind, kind_dir, _, dense_dir, root = runs
    learngene, tailor = vs.kind_size(kind)
    return vs.table1_entries(kind_dir, str(root / name), pretrained=dense_dir, size=learngene + tailor, steps=30,
                             entries=("kind", "heur_lg", "auto_lg"))


def test_layer_transfer_baselines_land_within_half_a_block_of_the_size(runs):
    entries = layer_transfer_entries(runs, "lg_configs")
    target = entries[0].params
    _, block = vs.dense_size(runs[2])
    for entry in entries[1:]:
        depth = entry.config.model.depth
        assert entry.config.model.arch == "" and entry.config.model.num_classes == 1 and entry.train_steps == 30
        assert 1 <= depth < 4 and 2 * abs(entry.params - target) <= block           # the stated tolerance
        sizes = {d: vs._count(vs._explicit_depth(entry.config, d)) for d in range(1, 5)}
        assert min(sizes, key=lambda d: abs(sizes[d] - target)) == depth         # the closest depth
        assert tuple(entry.config.init.blocks) == tuple(range(depth - max(depth // 2, 1), depth))
        assert entry.config.optim.lr == 1e-4 and entry.config.init.pretrained.endswith(f"{entry.name}_source")
    with pytest.raises(ValueError, match="no dense DiT of depth 1..4 is within half a block"):
        vs.depth_for_size(runs[2], 10 * entries[1].params, 4)


@pytest.mark.slow   # Heur-LG's gradients and Auto-LG's probe on the digits (~30 s of compiles)
def test_layer_transfer_baselines_inherit_the_blocks_they_chose(runs):
    from kindjax.checkpoints.learngene import load_params
    from kindjax.train.stages import check
    from kindjax.transfer import initial_params

    _, kind_dir, _, dense_dir, _ = runs
    entries = layer_transfer_entries(runs, "lg_build")
    records = vs.build(entries[1:], kind_dir, dense_dir, probe_steps=2)
    source, _ = load_params(dense_dir)
    for entry in entries[1:]:
        record = records[entry.name]
        scores = np.asarray(record["scores"])
        n = len(entry.config.init.blocks)
        best = np.sort(np.argsort(scores if entry.name == "heur_lg" else -scores, kind="stable")[:n])
        assert record["source_blocks"] == best.tolist() and len(scores) == 4
        check(entry.config)          # the trainer's checks pass: data, shapes, init.pretrained resolves
        fresh = init_params(jax.random.key(3), build_model(entry.config))
        start = initial_params(entry.config, fresh, jax.random.key(4))
        for position, b in zip(entry.config.init.blocks, record["source_blocks"]):
            jax.tree.map(np.testing.assert_array_equal, start[f"block_{position}"], source[f"block_{b}"])
        for position in range(entry.config.model.depth - n):
            jax.tree.map(np.testing.assert_array_equal, start[f"block_{position}"], fresh[f"block_{position}"])
        np.testing.assert_array_equal(start["y_embedder"]["embedding"][-1], source["y_embedder"]["embedding"][-1])


def test_laptop_diff_plugs_into_the_growth_baselines(runs):
    kind, kind_dir, _, dense_dir, root = runs
    learngene, tailor = vs.kind_size(kind)
    trad_pt, entry = vs.table1_entries(kind_dir, str(root / "ld"), pretrained=dense_dir, size=learngene + tailor,
                                       steps=30, entries=("laptop_diff",))
    assert trad_pt.name == "trad_pt" and trad_pt.train_steps == trad_pt.config.train.num_steps == 0
    assert entry.config.model.depth < 4 and entry.train_steps == entry.config.train.num_steps == 30
    # Pruned from and distilled by Trad. PT: the dense DiT on the entry's classes, so the labels agree.
    assert entry.config.init.grow_from == entry.config.train.distill.teacher == trad_pt.workdir
    assert entry.config.model.num_classes == trad_pt.config.model.num_classes == 1


def test_runs_on_different_classes_are_refused_naming_each_difference():
    from conftest import tiny_config

    kind, dense = tiny_config(), tiny_config()
    dense.data.classes, dense.model.num_classes = (0, 1, 2), 3
    with pytest.raises(ValueError, match=r"different classes.*data.classes: KIND \(\) vs dense \(0, 1, 2\); "
                                         r"model.num_classes: KIND 10 vs dense 3"):
        vs._check_same_classes(kind, dense)
