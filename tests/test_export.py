"""python -m kindjax.tools.export: runs to diffusers (checked against diffusers' DiTTransformer2DModel on random
inputs, and read back by kindjax.tools.convert) and KIND learngenes to safetensors with a hashed card (read back by
load_learngene / load_tailors / init.learngene); the one-line refusals."""
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import ROOT, tiny_config  # noqa: E402
from kindjax import assemble, build_model, checkpoints, load_learngene, load_tailors  # noqa: E402
from kindjax import params as param_rules  # noqa: E402
from kindjax.models.dit import abstract_params  # noqa: E402
from kindjax.papers.fine.layer import fine_config  # noqa: E402
from kindjax.papers.kind.layer import kind_config  # noqa: E402
from kindjax.tools.convert import dit_config_to_diffusers, read_checkpoint  # noqa: E402
from kindjax.tools.export import MODEL_CARD, export  # noqa: E402

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("export")

CLASS = 3


def random_params(config, seed):
    """Random parameters of ``config``'s model, no zero left (gates, tailors, final layer): every leaf
    N(0, s²) with ``s = 1/√rows`` for a matrix (its fan-in as a kernel), 0.1 for a vector."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: (rng.standard_normal(leaf.shape) * (leaf.shape[-2] ** -0.5 if leaf.ndim > 1
                                                                         else 0.1)).astype(np.float32),
                        abstract_params(build_model(config)))


def write_run(workdir, config, seed, metrics=None):
    """A workdir holding step 2 of ``config``'s model: random raw and EMA weights (they differ)."""
    raw, ema = random_params(config, seed), random_params(config, seed + 100)
    mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"))
    checkpoints.save(mngr, {"step": 2, "params": raw, "ema_params": ema, "opt_state": {"count": jnp.zeros(())}},
                     config)
    mngr.wait_until_finished()
    mngr.close()
    if metrics is not None:
        with open(os.path.join(workdir, "metrics.json"), "w") as f:
            json.dump({"step": 2, **metrics}, f)
    return types.SimpleNamespace(workdir=str(workdir), config=config, raw=raw, ema=ema)


def kind_digits(formulation="gated"):
    config = tiny_config()
    config.model.update(depth=2, linear=kind_config(16, 4, formulation), num_classes=7)
    config.data.classes = (0, 1, 2, 3, 4, 5, 6)
    return config


@pytest.fixture(scope="module")
def kind_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("kind"), kind_digits(), 0,
                     metrics={"sample_accuracy": 0.8125, "frechet_distance": 3.25})


def inputs(config, labels, seed=1):
    """Random NCHW torch inputs (noise, float timesteps over [0, 1000), ``labels``)."""
    m = config.model
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), m.in_channels, m.image_size, m.image_size, generator=gen)
    t = torch.rand(len(labels), generator=gen) * 999
    return x, t, torch.tensor(labels)


def diffusers_out(directory, x, t, y):
    model, info = diffusers.DiTTransformer2DModel.from_pretrained(str(directory), output_loading_info=True)
    assert not any(info.values()), info                       # every key loaded, nothing left over
    with torch.no_grad():
        return model.eval()(x, timestep=t, class_labels=y).sample.numpy()


def kindjax_out(config, params, x, t, y):
    """kindjax's model on the same inputs, NCHW."""
    out = build_model(config).apply({"params": params}, x.permute(0, 2, 3, 1).numpy(), t.numpy(), y.numpy())
    return np.asarray(out).transpose(0, 3, 1, 2)


def relative(a, b, name=""):
    """``max|a − b| / max|b|`` (printed with ``name``: ``pytest -s`` shows the figures)."""
    error = float(np.abs(a - b).max() / np.abs(b).max())
    if name:
        print(f"{name}: max relative error {error:.2e}")
    return error


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def kind_kernel(node, classes):
    """Float64 oracle: ``V_G diag(σ_G) U_Gᵀ + Σ_c V_T[c] diag(σ_T[c]) U_T[c]ᵀ`` (``d_in × d_out``)."""
    g, tl = ({k: np.asarray(v, np.float64) for k, v in node[part].items()} for part in ("learngene", "tailors"))
    kernel = (g["V"] * g["sigma"]) @ g["U"].T
    for c in classes:
        kernel += (tl["V"][c] * tl["sigma"][c]) @ tl["U"][c].T
    return kernel


def test_gated_kind_class_exports_to_diffusers_and_back(kind_run, tmp_path):
    out = tmp_path / "digit3"
    export(kind_run.workdir, str(out), "diffusers", [CLASS])
    assembled = assemble(load_learngene(kind_run.workdir), load_tailors(kind_run.workdir, [CLASS]), verbose=False)
    # Labels: the class, DiTPipeline's null (1000) and an unused label (5), which acts as the null class.
    x, t, y = inputs(kind_run.config, [0, 0, 0, 1000, 5])
    x[4], t[4] = x[3], t[3]
    got = diffusers_out(out, x, t, y)
    ours = kindjax_out(assembled.config, assembled.params, x, t, torch.tensor([0, 0, 0, 1, 1]))
    assert np.abs(ours).max() > 0.1
    assert relative(got[:3], ours[:3], "gated KIND, class 3, conditional") <= 1e-5   # kindjax's outputs
    ungated = assembled.config.copy_and_resolve_references()
    ungated.model.linear.formulation = "ungated"               # the tailor on every label, the null one too
    assert relative(got, kindjax_out(ungated, assembled.params, x, t, torch.tensor([0, 0, 0, 1, 1])),
                    "gated KIND, class 3, every label vs the ungated product") <= 1e-5
    assert relative(got[3:], ours[3:], "gated KIND, class 3, null label vs kindjax's (the caveat)") > 1e-3
    np.testing.assert_allclose(got[4], got[3], rtol=0, atol=1e-6)  # an unused label is the null class

    config, params, fmt = read_checkpoint(str(out))            # kindjax.tools.convert reads it back
    assert fmt == "diffusers" and config.model.num_classes == 1 and config.model.depth == 2
    back, ema = flat(params["params"]), flat(kind_run.ema)
    assert back.keys() == {k for k in ema if "/tailors/" not in k and "/learngene/" not in k} | {
        k.split("/learngene/")[0] + "/kernel" for k in ema if k.endswith("/learngene/U")}
    np.testing.assert_array_equal(back["y_embedder/embedding"], ema["y_embedder/embedding"][[CLASS, 7]])
    for key, value in back.items():
        module = key.rsplit("/", 1)[0]
        if key.endswith("/kernel") and f"{module}/learngene/U" in ema:   # a KIND matrix: the float64 oracle
            node = functools.reduce(lambda tree, name: tree[name], module.split("/"), kind_run.ema)
            np.testing.assert_allclose(value, kind_kernel(node, [CLASS]), rtol=0, atol=2e-6)
        elif key != "y_embedder/embedding":
            np.testing.assert_array_equal(value, ema[key])

    # The card: the class and its name, the figures of metrics.json, the caveat, and a snippet that runs.
    card = (out / MODEL_CARD).read_text()
    assert "| 0 | 3 | 3 |" in card and "| sample_accuracy | 0.8125 |" in card and "null label carries" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet.replace("num_inference_steps=25", "num_inference_steps=4"), "README.md", "exec"), namespace)
    assert namespace["images"].shape == (1, 8, 8, 1) and np.isfinite(namespace["images"]).all()


def test_ungated_kind_exports_several_classes_exactly(kind_run, tmp_path):
    config = kind_digits("ungated")
    run = write_run(tmp_path / "run", config, 0)
    export(run.workdir, str(tmp_path / "out"), "diffusers", [5, 0], step=2, ema=False)
    x, t, y = inputs(config, [0, 1, 1000])
    assembled = assemble(load_learngene(run.workdir, ema=False), load_tailors(run.workdir, [5, 0], ema=False),
                         verbose=False)
    want = kindjax_out(assembled.config, assembled.params, x, t, torch.tensor([0, 1, 2]))
    assert relative(diffusers_out(tmp_path / "out", x, t, y), want, "ungated KIND, classes 5, 0") <= 1e-5
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["_kindjax"]
    assert meta["num_classes"] == 2 and [c["run_label"] for c in meta["classes"]] == [5, 0]
    assert meta["source"]["item"] == "params"


@pytest.mark.slow  # 12 s (-n 2, 2 cores)
def test_fine_model_materializes_to_diffusers_and_back(tmp_path):
    config = tiny_config()
    config.model.update(hidden_size=32, depth=2, num_heads=2, linear=fine_config(8, "paper"))
    run = write_run(tmp_path / "fine", config, 3)
    export(run.workdir, str(tmp_path / "out"), "diffusers")
    x, t, y = inputs(config, [0, 4, 9, 1000])
    want = kindjax_out(config, run.ema, x, t, torch.tensor([0, 4, 9, 10]))
    assert relative(diffusers_out(tmp_path / "out", x, t, y), want, "FINE materialized") <= 1e-5
    _, params, _ = read_checkpoint(str(tmp_path / "out"))
    back, bases = flat(params["params"]), run.ema["fine_bases"]
    qkv = (np.asarray(bases["qkv"]["V"], np.float64) * run.ema["block_1"]["attn"]["qkv"]["sigma"]) \
        @ np.asarray(bases["qkv"]["U"], np.float64).T
    np.testing.assert_allclose(back["block_1/attn/k/kernel"], qkv[:, 32:64], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back["y_embedder/embedding"], run.ema["y_embedder"]["embedding"])


def test_dense_dit_s_round_trip(tmp_path):
    """DiT-S's width and heads (two of its 12 blocks), random weights: outputs equal diffusers', and
    kindjax.tools.convert gives back every parameter bit for bit."""
    from configs.dit_s import get_config

    config = get_config()
    config.model.update(arch="", hidden_size=384, depth=2, num_heads=6, dtype="float32")
    run = write_run(tmp_path / "dense", config, 5)
    out = tmp_path / "dit_s"
    export(run.workdir, str(out), "diffusers")
    x, t, y = inputs(config, [0, 999, 1000])
    want = kindjax_out(config, run.ema, x, t, y)
    assert relative(diffusers_out(out, x, t, y), want, "dense DiT-S, 2 blocks") <= 1e-5
    found, params, _ = read_checkpoint(str(out))
    assert (found.model.hidden_size, found.model.num_heads, found.model.num_classes) == (384, 6, 1000)
    back, ema = flat(params["params"]), flat(run.ema)
    assert back.keys() == ema.keys()
    for key in ema:
        np.testing.assert_array_equal(back[key], ema[key])
    card = (out / MODEL_CARD).read_text()
    assert "AutoencoderKL.from_pretrained(" in card and "0.18215" in card


def test_learngene_and_tailors_as_safetensors(kind_run, tmp_path):
    out = tmp_path / "lg"
    card = export(kind_run.workdir, str(out), "safetensors", [0, CLASS])
    assert sorted(os.listdir(out)) == ["README.md", "learngene.json", "learngene.safetensors", "tailors.safetensors"]
    m = card["model"]
    assert (m["hidden_size"], m["depth"], m["n_learngene"], m["n_tailor"], m["num_classes"]) == (64, 2, 16, 4, 7)
    assert card["classes"][CLASS] == {"label": CLASS, "name": "3"} and card["tailor_classes"] == [0, CLASS]
    assert card["training"]["steps"] == 2 and card["training"]["data"]["name"] == "digits"
    assert card["training"]["fingerprint"].startswith("sha256:") and card["kindjax_version"]
    assert card["training"]["metrics"]["frechet_distance"] == 3.25
    for name, entry in card["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]

    def same(a, b):
        assert flat(a).keys() == flat(b).keys()
        for key, value in flat(a).items():
            np.testing.assert_array_equal(value, flat(b)[key])

    learngene = load_learngene(out)
    assert learngene.source.kind == "exported" and learngene.source.checkpoint.endswith("checkpoints/2")
    same(learngene.params, load_learngene(kind_run.workdir).params)
    same(load_tailors(out, [CLASS]).params, load_tailors(kind_run.workdir, [CLASS]).params)
    with pytest.raises(ValueError, match=r"classes \[1\] are out of range: the exported tailors at .* hold classes "
                                         r"\(0, 3\)"):
        load_tailors(out, [1])
    # A learngene-only export: load_tailors says what the directory holds.
    export(kind_run.workdir, str(tmp_path / "alone"), "safetensors")
    with pytest.raises(ValueError, match=r"holds \['learngene.safetensors'\], not the tailors"):
        load_tailors(tmp_path / "alone", [0])

    # init.learngene takes the exported directory: the same start as from the workdir.
    from kindjax.train.trainer import origin
    from kindjax.papers.kind.transfer import learngene_init, transfer_config

    new = kind_run.config.copy_and_resolve_references()
    new.transfer.classes = (7, 8, 9)
    starts = []
    for path in (str(out), kind_run.workdir):
        config = transfer_config(new, path)
        assert origin(config)["learngene"]["step"] == 2
        fresh = random_params(config, 9)
        starts.append(learngene_init(config, fresh, jax.random.key(0)))
    same(*starts)

    # Tampered files are refused in one line, before anything is parsed.
    data = bytearray((out / "tailors.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "tailors.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tailors.safetensors has SHA-256 .*, but learngene.json records .*: the "
                                         r"file was changed or damaged after export") as refused:
        load_tailors(out, [CLASS])
    assert "\n" not in str(refused.value)
    load_learngene(out)                                        # the learngene file is intact
    edited = json.loads((out / "learngene.json").read_text())
    edited["files"]["learngene.safetensors"]["sha256"] = "0" * 64
    (out / "learngene.json").write_text(json.dumps(edited))
    with pytest.raises(ValueError, match="learngene.safetensors has SHA-256"):
        load_learngene(out)


def refused(error, match, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` raises ``error`` with a one-line message matching ``match``."""
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_refusals(kind_run, tmp_path, monkeypatch):
    a = str(tmp_path / "a")
    refused(ValueError, r"classes \[9\] are out of range: the model of .* has classes 0\.\.6 \(model.num_classes=7\)",
            export, kind_run.workdir, a, "diffusers", [3, 9])
    refused(ValueError, r"classes \[7\] are out of range", export, kind_run.workdir, a, "safetensors", [7])
    refused(ValueError, r"class-gated KIND model .* cannot express for 2 classes; export one class per directory "
                        r"\(--classes 0\)", export, kind_run.workdir, a, "diffusers", [0, 3])
    assert os.listdir(tmp_path) == []                           # nothing written, no staging left

    fine = tiny_config()
    fine.model.update(hidden_size=32, depth=1, num_heads=2, linear=fine_config(8))
    fine_run = write_run(tmp_path / "fine", fine, 0)
    refused(ValueError, r"holds a 'fine' DiT .* has no tailors: --classes selects KIND tailors, and this model "
                        r"serves all its 10 classes; export it without --classes",
            export, fine_run.workdir, a, "diffusers", [0])
    refused(ValueError, "not a KIND one: it has no learngene to write; export its model with --format diffusers",
            export, fine_run.workdir, a, "safetensors")
    original = tiny_config()
    original.model.timestep_freq_shift = 0.0                    # the original DiT's timestep embedding
    refused(ValueError, r"model.timestep_freq_shift=0.0 has no diffusers DiTTransformer2DModel form \(its timestep "
                        r"embedding is CombinedTimestepLabelEmbeddings'", dit_config_to_diffusers, original)
    original.model.update(timestep_freq_shift=1.0, mlp_ratio=2.0)
    refused(ValueError, r"model.mlp_ratio=2.0 has no diffusers DiTTransformer2DModel form", dit_config_to_diffusers,
            original)

    # An existing --out: refused without --force, nothing in it touched; --force replaces an export only.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    refused(FileExistsError, "exists; pass --force to replace it", export, kind_run.workdir, str(taken), "safetensors")
    refused(FileExistsError, "neither an earlier export nor an empty directory; --force does not replace it",
            export, kind_run.workdir, str(taken), "safetensors", force=True)
    assert os.listdir(taken) == ["notes.txt"] and (taken / "notes.txt").read_text() == "mine"
    # A --force export that fails half-way (the disk fills after the weights) keeps the earlier export.
    done = tmp_path / "done"
    export(kind_run.workdir, str(done), "diffusers", [CLASS])
    before = {name: (done / name).read_bytes() for name in os.listdir(done)}
    import kindjax.tools.export as tool

    def full(path, value, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool, "write_json", full)
    with pytest.raises(OSError, match="No space left"):
        export(kind_run.workdir, str(done), "diffusers", [0], force=True)
    assert {name: (done / name).read_bytes() for name in os.listdir(done)} == before
    monkeypatch.undo()
    export(kind_run.workdir, str(done), "diffusers", [0], force=True)
    assert json.loads((done / "config.json").read_text())["_kindjax"]["classes"][0]["run_label"] == 0
    assert sorted(os.listdir(tmp_path)) == ["done", "fine", "taken"]   # no staging directory left behind


def test_command_line(kind_run, tmp_path, single_device_env):
    """The command writes what the function does; its refusals are one line (the messages: test_refusals)."""
    command = [sys.executable, "-m", "kindjax.tools.export", "--run", kind_run.workdir, "--out",
               str(tmp_path / "lg"), "--format", "safetensors", "--classes", "3"]
    done = subprocess.run(command, cwd=ROOT, env=single_device_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    counts = [param_rules.count(load_learngene(kind_run.workdir).params),
              param_rules.count(load_tailors(kind_run.workdir, [3]).params)]
    assert (f"Wrote learngene.safetensors {counts[0]:,} parameters, tailors.safetensors {counts[1]:,} parameters and "
            f"learngene.json to {tmp_path / 'lg'}") in done.stdout
    assert load_tailors(tmp_path / "lg", [3]).classes == (3,)
