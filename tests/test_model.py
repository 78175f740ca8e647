"""DiT details not covered by the diffusers reference: adaLN initialisation (bf16 compute: test_precision.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from kindjax import build_model


def init(config):
    model = build_model(config)
    x = jnp.zeros((1, 8, 8, 1))
    i = jnp.zeros((1,), jnp.int32)
    return model.init(jax.random.key(0), x, i, i)["params"]


def test_adaln_zero_initialises_modulation_to_zero():
    params = init(tiny_config())
    assert not np.any(np.asarray(params["block_0"]["adaln_modulation"]["kernel"]))


@pytest.mark.parametrize("stds", [(1e-3,), (8e-4, 1.2e-3, 8e-4)])
def test_adaln_gaussian_has_the_std_of_each_chunk(stds):
    config = tiny_config()
    config.model.update(adaln_init="gaussian", adaln_std=stds, hidden_size=256, num_heads=4)
    kernel = np.asarray(init(config)["block_1"]["adaln_modulation"]["kernel"])
    alpha, gamma, beta = stds * 3 if len(stds) == 1 else stds
    # Output chunks: shift (β), scale (γ), gate (α) for attention, then the same for the MLP.
    for chunk, expected in zip(np.split(kernel, 6, axis=1), (beta, gamma, alpha) * 2):
        assert abs(chunk.mean()) < 0.1 * expected
        assert chunk.std() == pytest.approx(expected, rel=0.03)
    # The final layer stays zero-initialised (adaLN-Gaussian changes the blocks only).
    assert not np.any(np.asarray(init(config)["final_layer"]["adaln_modulation"]["kernel"]))
