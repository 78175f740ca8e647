"""kindjax's DiT with converted weights reproduces diffusers' DiTTransformer2DModel."""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import kindjax  # noqa: E402
from kindjax.config import validate  # noqa: E402
from kindjax.convert import dit_config_from_diffusers, dit_params_from_diffusers  # noqa: E402

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
