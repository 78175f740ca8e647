"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL, loaded from safetensors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from kindjax.models.vae import (SD_VAE_CONFIG, AutoencoderKL, autoencoder_from_diffusers_config, load_vae,
                                params_from_diffusers)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8, latent_channels=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny diffusers VAE with every weight moved off its init, saved as safetensors."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.add_(0.05 * torch.randn_like(p))
            else:   # GroupNorm γ around 1, every β and bias random
                p.copy_(0.3 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    directory = str(tmp_path_factory.mktemp("vae") / "tiny")
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def to_nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def test_encode_decode_match_diffusers(saved):
    torch_model, directory = saved
    vae = load_vae(directory)
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = torch_model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        decoded = torch_model.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
    mean, logvar = vae.model.apply({"params": vae.params}, x, method=AutoencoderKL.encode)
    image = vae.model.apply({"params": vae.params}, z, method=AutoencoderKL.decode)
    assert mean.shape == (2, 4, 4, 4) and image.shape == (2, 16, 16, 3)
    assert np.std(to_nhwc(posterior.mean)) > 0.1 and np.std(to_nhwc(decoded)) > 0.1
    np.testing.assert_allclose(mean, to_nhwc(posterior.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, to_nhwc(posterior.logvar), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.exp(0.5 * np.asarray(logvar)), to_nhwc(posterior.std), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(image, to_nhwc(decoded), atol=1e-4, rtol=0)
    assert vae.scaling_factor == pytest.approx(0.18215)


def test_load_file_snapshot_and_legacy_names(saved, tmp_path):
    """The safetensors file itself, a pipeline snapshot (vae/ sub-directory) and pre-0.14 attention
    names (query/key/value/proj_attn) give the same parameters."""
    from flax import traverse_util
    from safetensors.numpy import load_file, save_file

    _, directory = saved
    reference = traverse_util.flatten_dict(load_vae(directory).params)
    snapshot = tmp_path / "pipeline"
    shutil.copytree(directory, snapshot / "vae")
    state = load_file(os.path.join(directory, "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value[..., None, None] if "proj_attn.weight" in key else value   # 1×1-conv layout
    assert any("proj_attn" in k for k in legacy)
    legacy_file = tmp_path / "legacy" / "diffusion_pytorch_model.safetensors"
    legacy_file.parent.mkdir()
    save_file(legacy, str(legacy_file))
    shutil.copy(os.path.join(directory, "config.json"), legacy_file.parent / "config.json")
    for path in (str(snapshot), os.path.join(directory, "diffusion_pytorch_model.safetensors"), str(legacy_file)):
        flat = traverse_util.flatten_dict(load_vae(path).params)
        assert flat.keys() == reference.keys()
        for k in flat:
            np.testing.assert_array_equal(flat[k], reference[k])


def test_sd_vae_architecture_matches_diffusers():
    """The sd-vae-ft-ema architecture: every diffusers weight has its place and shape, nothing missing."""
    from flax import traverse_util

    torch_model = diffusers.AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items()})
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    model = autoencoder_from_diffusers_config(SD_VAE_CONFIG)
    params = traverse_util.flatten_dict(params_from_diffusers(state, model))
    assert len(params) == len(state) == 248
    assert sum(v.size for v in params.values()) == sum(p.numel() for p in torch_model.parameters())
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32))
    latent = jax.eval_shape(lambda p, x: model.apply(p, x, method=AutoencoderKL.encode), shapes,
                            jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32))
    assert latent[0].shape == (1, 32, 32, 4)


def test_clear_errors(saved, tmp_path):
    _, directory = saved
    with pytest.raises(FileNotFoundError, match="config.json and diffusion_pytorch_model.safetensors"):
        load_vae(str(tmp_path / "nowhere"))
    wrong = tmp_path / "wrong"
    shutil.copytree(directory, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["block_out_channels"] = [16, 32, 64]
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_vae(str(wrong))
    config.update(block_out_channels=[16, 32, 32], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D",
                                                                      "DownEncoderBlock2D"])
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        load_vae(str(wrong))
