"""Flax DINOv2 and FDD against transformers' Dinov2Model, PyTorch's interpolate, PIL and torchvision."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import Dinov2Config, Dinov2Model

from kindjax.config import ConfigError
from kindjax.evaluation.dinov2 import (
    IMAGENET_MEAN, IMAGENET_STD, TORCH_HUB_INTERPOLATE_OFFSET, dinov2_features, fdd, fdd_preprocess,
    load_dinov2, pil_bicubic_resize, torch_bicubic_matrix,
)
from kindjax.sharding import make_mesh

TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, patch_size=14, image_size=56,
            layer_norm_eps=1e-6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Dinov2Model with every weight moved off its init, saved as safetensors."""
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1") or (("norm" in name) and name.endswith("weight")):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))        # layer scale and norm gains
            elif "position_embeddings" in name or "cls_token" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.add_(0.05 * torch.randn_like(p))               # weights and (zero-init) biases
    path = str(tmp_path_factory.mktemp("dinov2"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def _torch_forward(model, pixels_nhwc: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(np.array(pixels_nhwc)).permute(0, 3, 1, 2).contiguous())
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("height,width", [(56, 56), (70, 84), (42, 42)])
def test_matches_transformers(checkpoint, height, width):
    model, path = checkpoint
    module, params = load_dinov2(path, interpolate_offset=0.0)
    pixels = np.random.default_rng(height + width).normal(size=(2, height, width, 3)).astype(np.float32)
    want_tokens, want_pooled = _torch_forward(model, pixels)
    assert np.abs(want_tokens).max() > 0.5 and np.abs(want_tokens[:, 0] - want_tokens[:, 1]).max() > 0.1
    tokens = np.asarray(module.apply({"params": params}, jnp.asarray(pixels)))
    assert tokens.shape == want_tokens.shape == (2, 1 + (height // 14) * (width // 14), 48)
    np.testing.assert_allclose(tokens, want_tokens, atol=1e-4, rtol=0)
    np.testing.assert_allclose(tokens[:, 0], want_pooled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("in_size,out_size", [(4, 7), (37, 16), (5, 3), (6, 6)])
@pytest.mark.parametrize("offset", [0.0, TORCH_HUB_INTERPOLATE_OFFSET])
def test_position_interpolation_matches_torch(in_size, out_size, offset):
    grid = torch.randn(1, 5, in_size, in_size, dtype=torch.float64)
    if offset:   # the torch-hub DINOv2 call: scale_factor (g + 0.1)/M
        factor = (out_size + offset) / in_size
        want = torch.nn.functional.interpolate(grid, scale_factor=(factor, factor), mode="bicubic",
                                               align_corners=False)
    else:        # transformers' call: size=(g, g)
        want = torch.nn.functional.interpolate(grid, size=(out_size, out_size), mode="bicubic", align_corners=False)
    matrix = torch_bicubic_matrix(in_size, out_size, offset)
    got = np.einsum("ym,xn,cmn->cyx", matrix, matrix, grid[0].numpy())
    np.testing.assert_allclose(got, want[0].numpy(), atol=1e-12)


@pytest.mark.parametrize("height,width", [(32, 32), (300, 300), (300, 260), (224, 224), (9, 500), (1000, 224), (700, 400)])
def test_pil_resize_bit_exact(height, width):
    images = np.random.default_rng(height * width).integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
    got = np.asarray(pil_bicubic_resize(jnp.asarray(images), (224, 224)))
    want = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.BICUBIC)) for im in images])
    np.testing.assert_array_equal(got, want)


def test_preprocessing_matches_dgm_eval_transform():
    """dgm-eval's DINOv2 transform on a PIL image: Resize((224,224), BICUBIC), ToTensor, Normalize."""
    images = np.random.default_rng(1).integers(0, 256, size=(3, 64, 48, 3), dtype=np.uint8)
    transform = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(np.array(IMAGENET_MEAN), np.array(IMAGENET_STD))])
    want = np.stack([transform(Image.fromarray(im)).permute(1, 2, 0).numpy() for im in images])
    got = np.asarray(fdd_preprocess(jnp.asarray(images)))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_features_and_fdd(checkpoint):
    model, path = checkpoint
    module, params = load_dinov2(path, interpolate_offset=0.0)
    images = np.random.default_rng(2).integers(0, 256, size=(5, 40, 40, 3), dtype=np.uint8)
    features = dinov2_features(module, params, images, batch_size=2)      # 2 + 2 + 1 (padded)
    pixels = np.asarray(fdd_preprocess(jnp.asarray(images)))
    _, want = _torch_forward(model, pixels)
    assert features.shape == (5, 48) and features.dtype == np.float32
    np.testing.assert_allclose(features, want, atol=1e-4, rtol=0)
    done = []
    on_mesh = dinov2_features(module, params, images, batch_size=3, mesh=make_mesh(),   # 8 devices, 1 batch
                              progress=lambda n, total: done.append((n, total)))
    np.testing.assert_allclose(on_mesh, features, atol=1e-5, rtol=0)
    assert done == [(5, 5)]

    hub_module, hub_params = load_dinov2(path)       # torch-hub resampling of E_pos: close, not equal
    hub = dinov2_features(hub_module, hub_params, images)
    assert 1e-4 < np.abs(hub - features).max() < 0.5 * np.abs(features).max()

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 6)), rng.normal(loc=0.3, size=(50, 6)) @ rng.normal(size=(6, 6))
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    naive = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert fdd(a, b, normalize="none") == pytest.approx(naive, rel=1e-8)   # raw features (the default: unit ones)


def test_refuses_what_it_cannot_run(checkpoint, tmp_path):
    _, path = checkpoint
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(path, "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_swiglu_ffn": True}))
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="use_swiglu_ffn"):
        load_dinov2(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in weights.items() if "layer_scale2" not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="layer_scale2"):
        load_dinov2(str(tmp_path))
    with pytest.raises(ValueError, match="uint8"):
        dinov2_features(*load_dinov2(path), np.zeros((1, 8, 8, 3), np.float32))


def test_dinov2_size_is_selectable_and_defaults_to_dgm_evals_vitl14(checkpoint, tmp_path):
    """``eval.dinov2_model``: dgm-eval's default ViT-L/14 unless set; weights of another size are refused
    (from config.json alone, before any sampling) with both fixes named."""
    from kindjax.config import DINOV2_MODELS, base_config, validate
    from kindjax.evaluation.dinov2 import DINOV2_SIZES, read_dinov2_config

    assert set(DINOV2_SIZES) | {"any"} == set(DINOV2_MODELS)
    assert base_config().eval.dinov2_model == "vitl14"

    def directory(name, **sizes):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(Dinov2Config(**sizes).to_json_string())
        return str(path)

    large = directory("large", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    base = directory("base")             # transformers' default Dinov2Config is facebook/dinov2-base
    module = read_dinov2_config(large, model="vitl14")
    assert (module.hidden_size, module.num_layers, module.num_heads) == DINOV2_SIZES["vitl14"]
    assert read_dinov2_config(base, model="vitb14").hidden_size == 768
    with pytest.raises(ConfigError, match="needs facebook/dinov2-large .* holds a ViT with hidden 768, 12 layers, "
                                          "12 heads \\(vitb14\\).* or set eval.dinov2_model='vitb14'"):
        read_dinov2_config(base, model="vitl14")
    _, path = checkpoint                  # the tiny random test network: only "any" takes it
    with pytest.raises(ConfigError, match="hidden 48.*set eval.dinov2_model='any'"):
        load_dinov2(path, model="vits14")
    assert load_dinov2(path, model="any")[0].hidden_size == 48

    config = base_config()
    for name in ("vitg14", "dinov2-large"):
        config.eval.dinov2_model = name
        with pytest.raises(ConfigError, match="eval.dinov2_model=.*'vitl14', ViT-L/14, is the FDD reference"):
            validate(config, 1)
