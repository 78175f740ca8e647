"""Classifier-free guidance on all ε channels or on the first three (``sample.guidance_channels``),
against a NumPy re-derivation of the original DiT's ``forward_with_cfg`` (NCHW, as its code)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import kindjax.diffusion.generate
from conftest import tiny_config
from kindjax.config import ConfigError, validate
from kindjax.diffusion import GaussianDiffusion, classifier_free_guidance, sample
from kindjax.models.dit import build_model
from kindjax.diffusion.generate import generate

B, C, S, NULL = 3, 4, 5, 10


def fake_model_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((C, 2 * C)), "embed": rng.standard_normal((NULL + 1, 2 * C)),
            "t": rng.standard_normal(2 * C)}


def fake_model_nchw(weights, x, t, y):
    """A class- and time-dependent map of NCHW ``x`` to ``2C`` channels ([ε, v]), float64."""
    out = np.einsum("nchw,cd->ndhw", x, weights["w"]) + weights["embed"][y][:, :, None, None]
    return np.tanh(out + 1e-3 * t[:, None, None, None] * weights["t"][None, :, None, None])


def dit_forward_with_cfg(weights, x, t, y, cfg_scale, guided_channels):
    """DiT's ``models.py`` ``forward_with_cfg``, re-derived in NumPy: ``x`` is the doubled batch
    ``[z, z]`` with labels ``[y, ∅]``; ``eps, rest = out[:, :3], out[:, 3:]``; the guided half is
    repeated for both halves.  (``guided_channels`` is the 3 of that slice; 4 guides all of ε.)"""
    half = x[: len(x) // 2]
    combined = np.concatenate([half, half], axis=0)
    model_out = fake_model_nchw(weights, combined, t, y)
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond_eps, uncond_eps = np.split(eps, 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = np.concatenate([half_eps, half_eps], axis=0)
    return np.concatenate([eps, rest], axis=1)


@pytest.mark.parametrize("channels, dit_slice", [(3, 3), (None, C)])
def test_guidance_matches_dit_forward_with_cfg(channels, dit_slice):
    weights = fake_model_weights()
    rng = np.random.default_rng(1)
    z = rng.standard_normal((B, S, S, C))                      # NHWC, kindjax's layout
    t = np.array([999, 500, 3])
    y = np.array([0, 7, 2])
    cfg = 4.0

    def denoise(x, tt, yy):                                    # the same map, in JAX and NHWC
        out = jnp.einsum("nhwc,cd->nhwd", x, jnp.asarray(weights["w"], jnp.float32))
        out = out + jnp.asarray(weights["embed"], jnp.float32)[yy][:, None, None, :]
        return jnp.tanh(out + 1e-3 * tt[:, None, None, None] * jnp.asarray(weights["t"], jnp.float32))

    ours = classifier_free_guidance(denoise, cfg, NULL, channels)(jnp.asarray(z, jnp.float32), jnp.asarray(t),
                                                                  jnp.asarray(y))
    x_nchw = np.concatenate([z, z]).transpose(0, 3, 1, 2)
    want = dit_forward_with_cfg(weights, x_nchw, np.concatenate([t, t]), np.concatenate([y, np.full(B, NULL)]),
                                cfg, dit_slice)[:B].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours, np.float64), want, atol=1e-5, rtol=1e-5)
    # The two rules differ exactly on the fourth ε channel: guided, or the conditional output.
    cond = fake_model_nchw(weights, z.transpose(0, 3, 1, 2), t, y).transpose(0, 2, 3, 1)
    if channels == 3:
        np.testing.assert_allclose(np.asarray(ours)[..., 3], cond[..., 3], atol=1e-5)
    assert np.abs(want[..., 3] - cond[..., 3]).max() > 0.1 or channels == 3


def tiny_latent_config(guidance: str):
    config = tiny_config()
    config.model.update(in_channels=4, hidden_size=32, depth=1)
    config.sample.update(num_steps=3, cfg_scale=4.0, guidance_channels=guidance)
    return config


def test_the_sampler_guides_the_given_channels():
    """A whole reverse loop: guiding 4 of 4 channels is guiding "all" bit for bit; 3 differs."""
    weights = fake_model_weights()

    def denoise(x, t, y):
        out = jnp.einsum("nhwc,cd->nhwd", x, jnp.asarray(weights["w"], jnp.float32))
        return jnp.tanh(out + jnp.asarray(weights["embed"], jnp.float32)[y][:, None, None, :])

    diffusion = GaussianDiffusion.from_config(tiny_config().diffusion)

    def draw(channels):
        return np.asarray(sample(denoise, diffusion, jax.random.key(3), (B, S, S, C), jnp.array([0, 4, 9]),
                                 num_steps=4, cfg_scale=4.0, null_class=NULL, guidance_channels=channels))

    every, four, three = draw(None), draw(4), draw(3)
    np.testing.assert_array_equal(every, four)
    assert np.abs(every - three).max() > 1e-3


@pytest.mark.parametrize("value, want", [("all", None), ("3", 3), ("1", 1)])
def test_generate_passes_sample_guidance_channels_to_the_sampler(monkeypatch, value, want):
    seen = {}

    def recording_sampler(denoise_fn, diffusion, key, shape, y, **kwargs):
        seen.update(kwargs)
        return jnp.zeros(shape)

    monkeypatch.setattr(kindjax.diffusion.generate, "run_sampler", recording_sampler)
    config = tiny_latent_config(value)
    model = build_model(config)
    generate(model, {}, GaussianDiffusion.from_config(config.diffusion), jax.random.key(0), np.array([1, 2]),
             config.sample, batch_size=2)
    assert seen["guidance_channels"] == want and seen["cfg_scale"] == 4.0
    saved_before_the_key = config.sample.to_dict()
    del saved_before_the_key["guidance_channels"]
    assert kindjax.diffusion.generate.guidance_channels(ml_collections.ConfigDict(saved_before_the_key)) is None


@pytest.mark.parametrize("value, match", [("5", r"sample.guidance_channels='5'.*1..model.in_channels=4"),
                                          ("three", r"sample.guidance_channels='three': use 'all'"),
                                          ("0", r"sample.guidance_channels='0'")])
def test_bad_guidance_channels_name_the_key(value, match):
    with pytest.raises(ConfigError, match=match):
        validate(tiny_latent_config(value), num_devices=1)


def test_latent_configs_guide_three_channels_and_pixel_configs_all():
    from configs import dit_digits, dit_xl, kind_dit_b

    assert dit_xl.get_config().sample.guidance_channels == "3"
    assert kind_dit_b.get_config("task_1,lora").sample.guidance_channels == "3"
    assert dit_digits.get_config().sample.guidance_channels == "all"
    validate(tiny_latent_config("3"), num_devices=1)
