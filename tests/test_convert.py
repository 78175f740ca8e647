"""kindjax's DiT with converted weights reproduces diffusers' DiTTransformer2DModel."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import kindjax  # noqa: E402
from kindjax.config import validate  # noqa: E402
from kindjax.tools.convert import dit_config_from_diffusers, dit_params_from_diffusers  # noqa: E402

#: Two small DiTs with learned sigma; the second has a large norm_eps so that the
#: MLP LayerNorm's eps (norm_eps, unlike the 1e-6 of the other norms) is visible.
CONFIGS = {
    "w32-d2-p2": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10),
    "w24-d3-p4": dict(num_attention_heads=3, attention_head_dim=8, in_channels=3, out_channels=6,
                      num_layers=3, sample_size=12, patch_size=4, num_embeds_ada_norm=7, norm_eps=1e-3),
}


def random_dit(seed: int, **kwargs) -> "diffusers.DiTTransformer2DModel":
    """A diffusers DiT with every parameter random (N(0, 1/fan_in), biases N(0, 0.1²)) and tied embedders."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            fan_in = math.prod(param.shape[1:]) if param.ndim > 1 else 100
            param.normal_(0.0, fan_in ** -0.5)
        first = model.transformer_blocks[0].norm1.emb
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first.state_dict())
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name):
    reference = random_dit(0, **CONFIGS[name])
    config = dit_config_from_diffusers(reference.config)
    params = dit_params_from_diffusers(reference.state_dict(), config)
    m = config.model
    gen = torch.Generator().manual_seed(1)
    batch = 5
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    y = torch.randint(0, m.num_classes + 1, (batch,), generator=gen)
    y[0] = m.num_classes  # the null class of classifier-free guidance
    with torch.no_grad():
        expected = reference(x, timestep=t, class_labels=y).sample.numpy()
    out = kindjax.build_model(config).apply(params, x.permute(0, 2, 3, 1).numpy(), t.numpy(), y.numpy())
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == expected.shape == (batch, 2 * m.in_channels, m.image_size, m.image_size)
    rel = np.abs(out - expected).max() / np.abs(expected).max()
    print(f"{name}: max relative error {rel:.2e}")
    assert rel <= 1e-5


def test_config_of_public_dit_xl():
    public = {  # facebook/DiT-XL-2-256 transformer/config.json (legacy Transformer2DModel keys)
        "_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
        "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4,
        "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero",
        "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
        "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 32,
        "upcast_attention": False, "use_linear_projection": False,
    }
    config = dit_config_from_diffusers(public)
    validate(config, num_devices=1)
    m = config.model
    assert (m.hidden_size, m.depth, m.num_heads, m.image_size, m.patch_size) == (1152, 28, 16, 32, 2)
    assert (m.num_classes, m.learn_sigma, m.norm_eps, m.mlp_norm_eps) == (1000, True, 1e-6, 1e-5)
    with pytest.raises(ValueError, match="activation_fn='geglu'"):
        dit_config_from_diffusers({**public, "activation_fn": "geglu"})


def test_other_size_names_key_and_shapes():
    narrow = random_dit(0, **{**CONFIGS["w32-d2-p2"], "attention_head_dim": 8})
    config = dit_config_from_diffusers(CONFIGS["w32-d2-p2"])
    with pytest.raises(ValueError, match=r"pos_embed\.proj\.weight: checkpoint \(16, 4, 2, 2\), "
                                         r"config expects \(32, 4, 2, 2\)"):
        dit_params_from_diffusers(narrow.state_dict(), config)


def test_other_depth_lists_keys():
    deeper = random_dit(0, **CONFIGS["w24-d3-p4"]).state_dict()
    config = dit_config_from_diffusers({**CONFIGS["w24-d3-p4"], "num_layers": 2})
    with pytest.raises(ValueError, match=r"missing keys \[\]; unexpected keys \[transformer_blocks\.2\."):
        dit_params_from_diffusers(deeper, config)
    del deeper["proj_out_2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \[proj_out_2\.bias\]"):
        dit_params_from_diffusers(deeper, dit_config_from_diffusers(CONFIGS["w24-d3-p4"]))


def test_untied_embedders_rejected():
    state = random_dit(0, **CONFIGS["w24-d3-p4"]).state_dict()
    state["transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight"] += 1e-3
    with pytest.raises(ValueError, match=r"transformer_blocks\.2\.norm1\.emb\.class_embedder"):
        dit_params_from_diffusers(state, dit_config_from_diffusers(CONFIGS["w24-d3-p4"]))


def original_state_dict(model: "diffusers.DiTTransformer2DModel") -> dict:
    """The weights of a diffusers DiT in the original DiT code's key layout (fused ``attn.qkv``, one
    timestep/label embedder, the fixed ``pos_embed``): the inverse of diffusers' conversion script."""
    sd, out = model.state_dict(), {}
    emb = "transformer_blocks.0.norm1.emb."
    out["pos_embed"] = model.pos_embed.pos_embed.detach().clone()
    for kind in ("weight", "bias"):
        out[f"x_embedder.proj.{kind}"] = sd[f"pos_embed.proj.{kind}"]
        out[f"t_embedder.mlp.0.{kind}"] = sd[f"{emb}timestep_embedder.linear_1.{kind}"]
        out[f"t_embedder.mlp.2.{kind}"] = sd[f"{emb}timestep_embedder.linear_2.{kind}"]
        out[f"final_layer.adaLN_modulation.1.{kind}"] = sd[f"proj_out_1.{kind}"]
        out[f"final_layer.linear.{kind}"] = sd[f"proj_out_2.{kind}"]
        for i in range(len(model.transformer_blocks)):
            b = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{b}attn1.to_{n}.{kind}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[f"{b}attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[f"{b}ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[f"{b}ff.net.2.{kind}"]
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = sd[f"{b}norm1.linear.{kind}"]
    out["y_embedder.embedding_table.weight"] = sd[f"{emb}class_embedder.embedding_table.weight"]
    return out


#: A DiT in the original code's settings: every LayerNorm eps 1e-6 (diffusers' FF norm takes norm_eps).
ORIGINAL = {**CONFIGS["w32-d2-p2"], "norm_eps": 1e-6}


def original_reference(seed: int = 3) -> "diffusers.DiTTransformer2DModel":
    """diffusers' DiT with the original timestep embedding (frequencies ``10000^(-k/half)``, shift 0)."""
    model = random_dit(seed, **ORIGINAL)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def test_original_checkpoint_matches_diffusers_with_the_original_timestep_embedding():
    from kindjax.tools.convert import dit_config_from_original, dit_params_from_original

    reference = original_reference()
    state = original_state_dict(reference)
    config = dit_config_from_original(state, num_heads=2)
    assert config.model.timestep_freq_shift == 0.0 and config.model.depth == 2
    params = dit_params_from_original(state, config)
    m = config.model
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, m.in_channels, m.image_size, m.image_size, generator=gen)
    t = torch.tensor([0.0, 17.0, 500.0, 999.0])
    y = torch.tensor([0, 3, 9, m.num_classes])
    with torch.no_grad():
        expected = reference(x, timestep=t, class_labels=y).sample.numpy()
    out = kindjax.build_model(config).apply(params, x.permute(0, 2, 3, 1).numpy(), t.numpy(), y.numpy())
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert np.abs(out - expected).max() / np.abs(expected).max() <= 1e-5
    with pytest.raises(ValueError, match="not a DiT size"):
        dit_config_from_original(state)
    state["pos_embed"] = state["pos_embed"] + 0.1
    with pytest.raises(ValueError, match="pos_embed"):
        dit_params_from_original(state, config)


@pytest.mark.slow  # 30 s (-n 2, 2 cores)
def test_convert_command_writes_a_checkpoint_that_loads_as_pretrained(tmp_path):
    """``python -m kindjax.tools.convert`` on a ``.pt`` file: the checkpoint reads back (EMA and raw weights)
    with the original settings in its config, and its model reproduces the reference."""
    import subprocess
    import sys

    from conftest import ROOT
    from kindjax.checkpoints.learngene import load_params

    reference = original_reference()
    torch.save(original_state_dict(reference), tmp_path / "dit.pt")
    workdir = tmp_path / "converted"
    command = [sys.executable, "-m", "kindjax.tools.convert", "--src", str(tmp_path / "dit.pt"),
               "--config", "configs/dit_digits.py", "--workdir", str(workdir)]
    failed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.strip().count("\n") == 0
    assert "not a DiT size" in failed.stderr and "--num_heads" in failed.stderr
    done = subprocess.run(command + ["--num_heads", "2"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--config.model.timestep_freq_shift=0.0" in done.stdout and f"--run {workdir} " in done.stdout
    assert "python -m kindjax.evaluation --config configs/dit_digits.py" in done.stdout
    params, config = load_params(workdir)
    raw, _ = load_params(workdir, ema=False)
    assert config.model.timestep_freq_shift == 0.0 and config.model.in_channels == 4
    assert config.sample.num_steps == 100          # every other section from configs/dit_digits.py
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([5.0, 700.0]), np.array([1, 10])
    out = kindjax.build_model(config).apply({"params": params}, x, t, y)
    np.testing.assert_array_equal(out, kindjax.build_model(config).apply({"params": raw}, x, t, y))
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2), timestep=torch.from_numpy(t),
                             class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(np.asarray(out) - expected).max() / np.abs(expected).max() <= 1e-5
    again = subprocess.run(command + ["--num_heads", "2"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr
