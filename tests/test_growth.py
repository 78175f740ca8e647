"""FINE's baselines as initialisers of a variable-depth dense DiT (kindjax.papers.fine.growth), the TLEG
and LiGO layer variants, and the trainer's output distillation."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from conftest import tiny_config
from kindjax import checkpoints
from kindjax import params as param_rules
from kindjax.config import ConfigError, validate
from kindjax.diffusion import GaussianDiffusion, denoising_loss, noisy_inputs, training_losses
from kindjax.papers.fine.ligo import SOURCE, ligo_config, stretch_blocks
from kindjax.checkpoints.learngene import load_params
from kindjax.models.dit import build_model, drop_labels, init_params
from kindjax.train.trainer import Trainer, train
from kindjax.papers.fine.growth import (MIMETIC, copy_from, grow_config, grow_init, he_init, layer_paths, ligo_materialize,
                                     ligo_stacks, mimetic_init, prune_blocks, prune_distill_config, remap_blocks,
                                     tleg_expand)

ROLE_PATHS = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "attn_out": ("attn", "attn_out"),
              "mlp_in": ("mlp_in",), "mlp_out": ("mlp_out",)}


def small_config(depth=2, linear=None, hidden=32, heads=2):
    c = tiny_config()
    c.model.update(hidden_size=hidden, num_heads=heads, depth=depth, adaln_init="gaussian")
    c.train.update(num_steps=2, checkpoint_every=2, log_every=2)
    if linear is not None:
        c.model.linear = ml_collections.ConfigDict(linear)
    return c


def fresh(config, seed=1):
    init = jax.jit(functools.partial(init_params, model=build_model(config)))
    return param_rules.as_dict(init(jax.random.key(seed)))


def randomize(tree, seed):
    """Every leaf replaced by N(0, 1) draws (random, never zeros)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape).astype(np.float32), tree)


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(param_rules.as_dict(tree)).items()}


def node(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def cosine(a, b):
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_he_init_draws_fan_in_normal_and_keeps_dit_zero_layers():
    config = small_config(depth=2, hidden=64, heads=2)
    start = fresh(config)
    out, before = flat(he_init(start, jax.random.key(3))), flat(start)
    checked = 0
    for name, value in out.items():
        if "adaln_modulation" in name or name.startswith("final_layer") or not name.endswith("kernel"):
            np.testing.assert_array_equal(value, before[name], err_msg=name)
            continue
        if value.size >= 16384:
            assert abs(value.std() / np.sqrt(2.0 / value.shape[0]) - 1) < 0.03, name
            assert abs(value.mean()) < 0.05 * value.std(), name
            checked += 1
        assert not np.array_equal(value, before[name]), name
    assert checked == 2 * 2 + 1   # the MLP matrices of both blocks, the timestep MLP's first


@pytest.mark.parametrize("heads", [1, 4])
def test_mimetic_attention_products(heads):
    config = small_config(depth=2, hidden=64, heads=heads)
    start = fresh(config)
    out = mimetic_init(start, jax.random.key(5), heads)
    alpha1, beta1, alpha2, beta2 = MIMETIC
    d, hd = 64, 64 // heads
    eye = np.eye(d)
    for b in range(2):
        attn = {k: np.asarray(v["kernel"], np.float64) for k, v in out[f"block_{b}"]["attn"].items()}
        vo = attn["v"] @ attn["attn_out"]
        # W_v W_o = α₂Z − β₂I exactly: its off-diagonal part is the N(0, α₂²/d) noise, its diagonal ≈ −β₂.
        assert abs(np.mean(np.diag(vo)) + beta2) < 4 * alpha2 / d   # mean of d N(0, α₂²/d) draws
        off = vo[~np.eye(d, dtype=bool)]
        assert abs(off.std() * np.sqrt(d) / alpha2 - 1) < 0.05
        assert abs(cosine(vo, -eye) - beta2 / np.hypot(alpha2, beta2)) < 0.05
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            qk = attn["q"][:, cols] @ attn["k"][:, cols].T
            # the best rank-d_h approximation of α₁Z + β₁I: ⟨P, I⟩ > 0 clearly, and = I + noise at d_h = d.
            assert np.linalg.matrix_rank(qk, tol=1e-4) == hd
            assert cosine(qk, eye) > (0.6 if hd == d else 0.3)
            if hd == d:
                assert abs(cosine(qk, eye) - beta1 / np.hypot(alpha1, beta1)) < 0.05
        assert not np.allclose(attn["q"], attn["k"])
    for name, value in flat(out).items():   # every other leaf keeps DiT's init
        if "/attn/" not in name or name.endswith("bias"):
            np.testing.assert_array_equal(value, flat(start)[name], err_msg=name)


def test_block_maps():
    assert stretch_blocks(2, 3) == (0, 0, 1) and stretch_blocks(4, 8) == (0, 0, 1, 1, 2, 2, 3, 3)
    assert stretch_blocks(4, 2) == (0, 2)
    assert prune_blocks(4, 2) == (0, 3) and prune_blocks(8, 3) == (0, 4, 7) and prune_blocks(2, 1) == (0,)


@pytest.mark.slow  # 14 s (-n 2, 2 cores)
@pytest.mark.parametrize("mapping", [(0, 0, 1), (1, 0, 1)])
def test_share_copies_mapped_blocks(mapping):
    source = randomize(fresh(small_config(depth=2)), 11)
    config = small_config(depth=3)
    start = fresh(config)
    out = flat(copy_from(config, start, remap_blocks(source, mapping), jax.random.key(0)))
    src = flat(source)
    assert set(out) == set(flat(start))
    for name, value in out.items():
        if name.startswith("block_"):
            i, rest = name.split("/", 1)
            np.testing.assert_array_equal(value, src[f"block_{mapping[int(i[6:])]}/{rest}"], err_msg=name)
        else:   # embedders, final layer, the whole label table (same classes)
            np.testing.assert_array_equal(value, src[name], err_msg=name)


def test_tleg_expansion_equals_theta_a_plus_l_over_depth_theta_b():
    source = randomize(fresh(small_config(depth=2, linear=dict(kind="tleg"))), 12)
    config = small_config(depth=3)
    start = fresh(config)
    assert layer_paths(start) == ROLE_PATHS
    out = copy_from(config, start, tleg_expand(source, 3, layer_paths(start)), jax.random.key(0))
    for i in range(3):
        for role, path in ROLE_PATHS.items():
            theta = {k: {n: np.asarray(v, np.float64) for n, v in t.items()}
                     for k, t in source["tleg_bases"][role].items()}
            for name in ("kernel", "bias"):
                naive = theta["theta_A"][name] + (i + 1) / 3 * theta["theta_B"][name]
                np.testing.assert_allclose(node(out, (f"block_{i}",) + path)[name], naive, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out[f"block_{i}"]["adaln_modulation"]["kernel"],
                                      source[f"block_{(0, 0, 1)[i]}"]["adaln_modulation"]["kernel"])


def test_tleg_layer_uses_l_over_depth():
    """A TLEG DiT computes as the dense DiT whose block i holds θ_A + ((i+1)/L)·θ_B."""
    config = small_config(depth=2, linear=dict(kind="tleg"))
    source = randomize(fresh(config), 13)
    dense_config = small_config(depth=2)
    dense = copy_from(dense_config, fresh(dense_config), tleg_expand(source, 2, ROLE_PATHS), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    t, y = jnp.asarray([5, 500, 999]), jnp.asarray([0, 3, 10])
    got = jax.jit(build_model(config).apply)({"params": source}, x, t, y)
    want = jax.jit(build_model(dense_config).apply)({"params": dense}, x, t, y)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 10 s (-n 2, 2 cores)
def test_ligo_stacks_materialize_and_match_the_ligo_model():
    source = randomize(fresh(small_config(depth=2)), 14)
    ligo = small_config(depth=3, linear=ligo_config(2))
    start = fresh(ligo)
    grown = copy_from(ligo, start, {**remap_blocks(source, (0, 0, 1)), SOURCE: ligo_stacks(source, ROLE_PATHS)},
                      jax.random.key(0))
    for role, path in ROLE_PATHS.items():
        for j in range(2):
            np.testing.assert_array_equal(grown[SOURCE][role]["kernel"][j], node(source[f"block_{j}"], path)["kernel"])
            np.testing.assert_array_equal(grown[SOURCE][role]["bias"][j], node(source[f"block_{j}"], path)["bias"])
        for i in range(3):   # coefficients start one-hot on the Share map
            np.testing.assert_array_equal(node(grown[f"block_{i}"], path)["coef"], np.eye(2)[(0, 0, 1)[i]])
    # learned coefficients: random; the materialised dense DiT is Σ_j c_j W_j and computes as the LiGO model
    coefs = randomize({f"block_{i}": {r: 0 * node(grown[f"block_{i}"], p)["coef"] for r, p in ROLE_PATHS.items()}
                       for i in range(3)}, 15)
    for i in range(3):
        for role, path in ROLE_PATHS.items():
            node(grown[f"block_{i}"], path)["coef"] = coefs[f"block_{i}"][role]
    dense_config = small_config(depth=3)
    dense = copy_from(dense_config, fresh(dense_config), ligo_materialize(grown, ROLE_PATHS), jax.random.key(0))
    for i in range(3):
        for role, path in ROLE_PATHS.items():
            c = np.asarray(coefs[f"block_{i}"][role], np.float64)
            for name in ("kernel", "bias"):
                naive = sum(c[j] * np.asarray(node(source[f"block_{j}"], path)[name], np.float64) for j in range(2))
                np.testing.assert_allclose(node(dense[f"block_{i}"], path)[name], naive, rtol=1e-5, atol=1e-5)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    t, y = jnp.asarray([5, 500, 999]), jnp.asarray([0, 3, 10])
    np.testing.assert_allclose(jax.jit(build_model(ligo).apply)({"params": grown}, x, t, y),
                               jax.jit(build_model(dense_config).apply)({"params": dense}, x, t, y),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 23 s (-n 2, 2 cores)
def test_distillation_gradient_equals_naive_combined_loss():
    student_config, teacher_config = small_config(depth=1), small_config(depth=1)
    student, teacher = build_model(student_config), build_model(teacher_config)
    ps, pt = randomize(fresh(student_config), 21), randomize(fresh(teacher_config), 22)
    ps = jax.tree.map(lambda a: 0.1 * a, ps)
    pt = jax.tree.map(lambda a: 0.1 * a, pt)
    diffusion = GaussianDiffusion.from_config(student_config.diffusion)
    x0 = jax.random.uniform(jax.random.key(2), (4, 8, 8, 1), minval=-1, maxval=1)
    xt, t, noise = noisy_inputs(jax.random.key(3), jax.random.key(4), x0, diffusion)
    y, weight = jnp.asarray([0, 3, 7, 10]), 0.7

    def combined(p, tp):
        return denoising_loss(student, p, diffusion, x0, xt, t, noise, y, teacher=(teacher, tp), distill_weight=weight)[0]

    target = np.asarray(jax.jit(teacher.apply)({"params": pt}, xt, t, y))[..., :1]

    def naive(p):
        out = student.apply({"params": p}, xt, t, y)
        hybrid = training_losses(diffusion, out, x0, xt, t, noise, learn_sigma=True)["loss"].mean()
        return hybrid + weight * jnp.mean(jnp.square(out[..., :1] - target))

    got, teacher_grad = jax.jit(jax.grad(combined, argnums=(0, 1)))(ps, pt)
    want = jax.jit(jax.grad(naive))(ps)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=param_rules.path_string(path))
    assert all(not np.any(g) for g in jax.tree.leaves(teacher_grad))   # the teacher is only read
    distill = denoising_loss(student, ps, diffusion, x0, xt, t, noise, y, teacher=(teacher, pt))[1]["distill"]
    np.testing.assert_allclose(distill, np.mean(np.square(np.asarray(
        jax.jit(student.apply)({"params": ps}, xt, t, y))[..., :1] - target), axis=(1, 2, 3)), rtol=1e-5)
    assert np.all(distill > 1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(grow="stretch"), "init.grow='stretch'"),
    (dict(grow="share"), "needs init.grow_from"),
    (dict(grow="scratch", grow_from="/x"), "clear init.grow_from"),
    (dict(grow="tleg", grow_from="/x", grow_blocks=(0,)), "init.grow_blocks"),
    (dict(grow="scratch", pretrained="/x"), "different starts"),
    (dict(grow_from="/x"), "init.grow=''"),
])
def test_config_errors(change, message):
    c = small_config()
    c.init.update(**change)
    with pytest.raises(ConfigError, match=message):
        validate(c, 8)


def test_config_errors_for_variants_and_distill():
    c = small_config(linear=ligo_config(2))
    with pytest.raises(ConfigError, match="init.grow='ligo'"):
        validate(c, 8)
    c = small_config(linear=dict(kind="tleg"))
    c.model.scan_blocks = True
    with pytest.raises(ConfigError, match="scan_blocks=False"):
        validate(c, 8)
    c = small_config()
    c.init.update(grow="mimetic")
    c.model.linear = ml_collections.ConfigDict(dict(kind="lora", rank=2))
    with pytest.raises(ConfigError, match="kind in \\['dense'\\]"):
        validate(c, 8)
    c = small_config()
    c.train.distill.update(teacher="/x", weight=0.0)
    with pytest.raises(ConfigError, match="train.distill.weight=0"):
        validate(c, 8)


def write_source(path, config, seed):
    """A workdir holding a checkpoint of ``config``'s model with random raw and (other) EMA weights."""
    params = jax.tree.map(lambda a: 0.1 * a, randomize(fresh(config), seed))
    ema = jax.tree.map(lambda a: 0.1 * a, randomize(params, seed + 1))
    mngr = checkpoints.manager(str(path / checkpoints.CHECKPOINTS))
    checkpoints.save(mngr, {"step": 1, "params": params, "ema_params": ema,
                            "opt_state": {"count": np.zeros((), np.int32)}}, config)
    mngr.wait_until_finished()
    mngr.close()
    return str(path), params, ema


@pytest.fixture(scope="module")
def random_sources(tmp_path_factory):
    """Workdirs of a dense, a TLEG (2 blocks) and a 3-block LiGO model with random weights."""
    root = tmp_path_factory.mktemp("random_sources")
    ligo = small_config(depth=3, linear=ligo_config(2))
    ligo.init.update(grow="ligo", grow_from="/unused")
    return {"dense": write_source(root / "dense", small_config(), 31),
            "tleg": write_source(root / "tleg", small_config(linear=dict(kind="tleg")), 33),
            "ligo": write_source(root / "ligo", ligo, 35), "root": root}


@pytest.mark.slow  # 27 s (-n 2, 2 cores)
def test_grow_from_workdirs(random_sources):
    """``init.grow`` reads the source workdir: EMA weights (raw ones for a LiGO operator), blocks mapped."""
    base = small_config()
    dense_dir, _, dense_ema = random_sources["dense"]
    for grow, source in (("share", dense_dir), ("tleg", random_sources["tleg"][0]), ("ligo", dense_dir),
                         ("ligo", random_sources["ligo"][0])):
        config = grow_config(base, grow, source, 3)
        validate(config, 8)
        out = grow_init(config, fresh(config), jax.random.key(0))
        if grow == "share":
            np.testing.assert_array_equal(out["block_1"]["mlp_out"]["kernel"], dense_ema["block_0"]["mlp_out"]["kernel"])
        elif grow == "tleg":
            theta = random_sources["tleg"][2]["tleg_bases"]["k"]
            want = theta["theta_A"]["kernel"] + theta["theta_B"]["kernel"] / 3
            np.testing.assert_allclose(out["block_0"]["attn"]["k"]["kernel"], want, rtol=1e-6, atol=1e-6)
        elif config.model.linear.kind == "ligo":
            assert config.train.trainable == ("/coef$",)
            np.testing.assert_array_equal(out[SOURCE]["v"]["kernel"][1], dense_ema["block_1"]["attn"]["v"]["kernel"])
        else:
            raw = random_sources["ligo"][1]
            want = ligo_materialize(raw, ROLE_PATHS)["block_2"]["mlp_in"]["kernel"]
            np.testing.assert_allclose(out["block_2"]["mlp_in"]["kernel"], want, rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(out["y_embedder"]["embedding"], raw["y_embedder"]["embedding"])
    with pytest.raises(ConfigError, match="must be below"):
        config = grow_config(base, "prune", dense_dir, 2)
        grow_init(config, fresh(config), jax.random.key(0))
    with pytest.raises(ConfigError, match="kind in \\['tleg'\\]"):
        config = grow_config(base, "tleg", dense_dir, 2)
        grow_init(config, fresh(config), jax.random.key(0))


@pytest.mark.slow  # 29 s (-n 2, 2 cores)
def test_prune_then_distill_step(random_sources):
    """A 1-block DiT pruned from the 2-block source, with the source as teacher: the kept block is the
    source's block 0, and the step's loss is the objective's plain loss + w·mean‖ε_student − ε_teacher‖²,
    recomputed naively (the step's own noise draws, the teacher's EMA weights, plain ``apply``)."""
    dense_dir, _, dense_ema = random_sources["dense"]
    config = prune_distill_config(small_config(), dense_dir, 1, weight=0.5)
    validate(config, 8)
    assert config.init.grow == "prune" and config.train.distill.teacher == dense_dir
    trainer = Trainer(config, str(random_sources["root"] / "pruned"), devices=jax.devices()[:1])
    start = jax.device_get(trainer.fresh_state())
    np.testing.assert_array_equal(start["params"]["block_0"]["attn"]["v"]["kernel"],
                                  dense_ema["block_0"]["attn"]["v"]["kernel"])
    batch = trainer.global_batch(0)
    _, metrics = trainer.step_fn(jax.tree.map(jnp.asarray, start), batch)
    m = {k: float(v) for k, v in metrics.items()}
    assert m["distill"] > 1e-4 and m["finite"] == 1.0

    k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(trainer.base_key, 0), 3)
    x0 = np.asarray(batch["image"])
    y = drop_labels(k_drop, np.asarray(batch["label"]), config.model.class_dropout, trainer.model.num_classes)
    xt, t, noise = noisy_inputs(k_t, k_noise, x0, trainer.diffusion)
    out = trainer.model.apply({"params": start["params"]}, xt, t, y)
    plain = float(training_losses(trainer.diffusion, out, x0, xt, t, noise, learn_sigma=True)["loss"].mean())
    teacher_out = build_model(small_config()).apply({"params": dense_ema}, xt, t, y)
    naive = float(np.mean(np.square(np.asarray(out)[..., :1] - np.asarray(teacher_out)[..., :1])))
    np.testing.assert_allclose(m["distill"], naive, rtol=1e-4)
    np.testing.assert_allclose(m["loss"], plain + 0.5 * naive, rtol=1e-4)
    np.testing.assert_allclose(m["loss"] - plain, 0.5 * naive, rtol=1e-2)   # the small term itself, weighted
    np.testing.assert_allclose(m["loss"], m["mse"] + m["vb"] + 0.5 * m["distill"], rtol=1e-5)


@pytest.mark.slow
def test_grow_each_method_from_trained_sources_and_train(tmp_path):
    """Train a dense and a TLEG 2-block source on the digits, grow each to 3 blocks by every method
    (LiGO: learn c, then materialise; prune: to 1 block with distillation) and train a few steps."""
    root, base = tmp_path, small_config()
    for name, linear in (("dense", None), ("tleg", dict(kind="tleg"))):
        c = small_config(depth=2, linear=linear)
        c.train.update(num_steps=3, checkpoint_every=3, log_every=3)
        train(c, str(root / name))
    dense_source, _ = load_params(str(root / "dense"))
    runs = {"scratch": "", "mimetic": "", "share": str(root / "dense"), "tleg": str(root / "tleg"),
            "ligo": str(root / "dense")}
    for grow, source in runs.items():
        config = grow_config(base, grow, source, 3, operator_steps=2)
        validate(config, 8)
        workdir = str(root / f"grown_{grow}")
        state = train(config, workdir)
        assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state["params"]))
        if grow == "ligo":   # stage A trained the coefficients only; then the dense DiT is materialised
            params, _ = load_params(workdir, ema=False)
            np.testing.assert_array_equal(params[SOURCE]["q"]["kernel"][1],
                                          dense_source["block_1"]["attn"]["q"]["kernel"])
            assert not np.array_equal(params["block_0"]["attn"]["q"]["coef"], [1.0, 0.0])
            config = grow_config(base, "ligo", workdir, 3)
            assert config.model.linear.kind == "dense"
            state = train(config, str(root / "grown_ligo_dense"))
            assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state["params"]))
    pruned = prune_distill_config(base, str(root / "dense"), 1, weight=0.5)
    state = train(pruned, str(root / "pruned"))
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(state["params"]))
