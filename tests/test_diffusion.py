"""kindjax.diffusion against float64 NumPy oracles written from the textbook equations."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.special

from kindjax.diffusion import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    classifier_free_guidance,
    ddpm_step,
    discretized_gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    q_posterior,
    q_sample,
    respace,
    sample,
    training_losses,
)

T = 1000
SHAPE = (6, 4, 4, 3)  # NHWC


# ----------------------------------------------------------------------------- oracles


def oracle_abar(betas):
    """ᾱ_t = ∏_{s ≤ t} (1 − β_s), as an explicit running product."""
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return np.array(out)


def oracle_kept(num_timesteps, n):
    return np.round(np.arange(n) * (num_timesteps - 1) / (n - 1)).astype(int)


def oracle_bayes_posterior(abar_prev, alpha, x0, xt):
    """q(x_{t−1}|x_t,x_0) by Bayes: prior N(√ᾱ_{t−1} x0, 1 − ᾱ_{t−1}) times likelihood
    N(x_t; √α_t x_{t−1}, 1 − α_t). Returns (mean, variance); at ᾱ_{t−1} = 1 the prior is a point."""
    if abar_prev == 1.0:
        return x0, 0.0
    prior_var = 1.0 - abar_prev
    beta = 1.0 - alpha
    var = 1.0 / (1.0 / prior_var + alpha / beta)
    mean = var * (math.sqrt(abar_prev) * x0 / prior_var + math.sqrt(alpha) * xt / beta)
    return mean, var


def oracle_posterior(betas, x0, xt, t):
    """Per-sample Bayes posterior; log variance with β̃_0 replaced by β̃_1."""
    abar = oracle_abar(betas)
    _, var1 = oracle_bayes_posterior(abar[0], 1.0 - betas[1], 0.0, 0.0)
    means, variances, logvars = [], [], []
    for b, tt in enumerate(t):
        abar_prev = abar[tt - 1] if tt > 0 else 1.0
        mean, var = oracle_bayes_posterior(abar_prev, 1.0 - betas[tt], x0[b], xt[b])
        means.append(mean)
        variances.append(np.full(x0.shape[1:], var))
        logvars.append(np.full(x0.shape[1:], math.log(var if tt > 0 else var1)))
    return np.stack(means), np.stack(variances), np.stack(logvars)


def oracle_pred_x0(betas, xt, eps, t):
    abar = oracle_abar(betas)[t].reshape(-1, 1, 1, 1)
    return (xt - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)


def oracle_learned_variance(betas, v, t):
    """σ² = β_t^f · β̃_t^(1−f), f = (v + 1)/2 (geometric interpolation), β̃_0 := β̃_1."""
    _, _, logvar = oracle_posterior(betas, np.zeros(v.shape), np.zeros(v.shape), t)
    frac = (v + 1.0) / 2.0
    return betas[t].reshape(-1, 1, 1, 1) ** frac * np.exp(logvar) ** (1.0 - frac)


def oracle_normal_kl(m1, v1, m2, v2):
    """KL(N(m1, v1) ‖ N(m2, v2)) = ½ (log(v2/v1) + (v1 + (m1 − m2)²)/v2 − 1)."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def oracle_cdf(z):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))


def oracle_discretized_ll(x, mean, log_scale):
    """log P(bin of x) with bins [x ± 1/255], the end bins open to ±∞."""
    scale = np.exp(log_scale)
    upper = np.where(x > 0.999, np.inf, x + 1.0 / 255.0)
    lower = np.where(x < -0.999, -np.inf, x - 1.0 / 255.0)
    with np.errstate(over="ignore", invalid="ignore"):
        prob = oracle_cdf((upper - mean) / scale) - oracle_cdf((lower - mean) / scale)
    return np.log(np.maximum(prob, 1e-12))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.linear(T)


def random_batch(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    x0 = np.round(rng.uniform(-1, 1, shape) * 127.5) / 127.5      # on the 8-bit grid
    x0.reshape(-1)[:4] = [-1.0, 1.0, -1.0, 1.0]                   # end bins present
    t = rng.integers(0, T, shape[0])
    t[:3] = [0, 1, T - 1]
    noise = rng.standard_normal(shape)
    return rng, x0, t, noise


def f32(x):
    return jnp.asarray(x, dtype=jnp.float32)


# ----------------------------------------------------------------------------- schedule


def test_linear_schedule_and_config():
    d = GaussianDiffusion.linear(1000)
    np.testing.assert_allclose(d.betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    assert d.betas.dtype == np.float64 and d.num_timesteps == 1000
    np.testing.assert_array_equal(d.timestep_map, np.arange(1000))
    d100 = GaussianDiffusion.linear(100)  # scale = 1000 / T
    np.testing.assert_allclose(d100.betas, np.linspace(1e-3, 0.2, 100), rtol=1e-12)
    cfg = ml_collections.ConfigDict(dict(num_timesteps=200, beta_start=2e-4, beta_end=0.03))
    dc = GaussianDiffusion.from_config(cfg)
    np.testing.assert_allclose(dc.betas, np.linspace(1e-3, 0.15, 200), rtol=1e-12)
    np.testing.assert_allclose(dc.alphas_cumprod, oracle_abar(dc.betas), rtol=1e-12)


@pytest.mark.parametrize("n", [250, 50, 7, 1000])
def test_respace(diffusion, n):
    r = respace(diffusion, n)
    kept = oracle_kept(T, n)
    assert r.num_timesteps == n
    np.testing.assert_array_equal(r.timestep_map, kept)
    assert kept[0] == 0 and kept[-1] == T - 1
    np.testing.assert_allclose(oracle_abar(r.betas), diffusion.alphas_cumprod[kept], rtol=1e-10)
    np.testing.assert_allclose(r.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-10)


def test_respace_composes(diffusion):
    r = respace(respace(diffusion, 100), 10)
    np.testing.assert_array_equal(r.timestep_map, oracle_kept(T, 100)[oracle_kept(100, 10)])
    np.testing.assert_allclose(r.alphas_cumprod, diffusion.alphas_cumprod[r.timestep_map], rtol=1e-10)


def test_respace_rejects_bad_steps(diffusion):
    with pytest.raises(ValueError):
        respace(diffusion, T + 1)
    with pytest.raises(ValueError):
        respace(diffusion, 0)


# ----------------------------------------------------------------------------- forward / posterior


def test_q_sample(diffusion):
    _, x0, t, noise = random_batch(0)
    abar = oracle_abar(diffusion.betas)[t].reshape(-1, 1, 1, 1)
    want = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * noise
    got = q_sample(diffusion, f32(x0), jnp.asarray(t), f32(noise))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_q_posterior(diffusion):
    rng, x0, t, noise = random_batch(1)
    xt = rng.standard_normal(SHAPE)
    mean, var, logvar = q_posterior(diffusion, f32(x0), f32(xt), jnp.asarray(t))
    want_mean, want_var, want_logvar = oracle_posterior(diffusion.betas, x0, xt, t)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, want_var, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(logvar, want_logvar, rtol=1e-5)
    assert var.shape == logvar.shape == SHAPE


@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_learned_range(diffusion, clip):
    rng, x0, t, noise = random_batch(2)
    xt = np.asarray(q_sample(diffusion, f32(x0), jnp.asarray(t), f32(noise)), np.float64)
    eps = noise + 0.3 * rng.standard_normal(SHAPE)
    v = rng.uniform(-1, 1, SHAPE)
    out = p_mean_variance(diffusion, f32(np.concatenate([eps, v], -1)), f32(xt), jnp.asarray(t),
                          learn_sigma=True, clip_denoised=clip)
    pred_x0 = oracle_pred_x0(diffusion.betas, xt, eps, t)
    if clip:
        pred_x0 = np.clip(pred_x0, -1, 1)
    want_mean, _, _ = oracle_posterior(diffusion.betas, pred_x0, xt, t)
    want_var = oracle_learned_variance(diffusion.betas, v, t)
    np.testing.assert_allclose(out["pred_x0"], pred_x0, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out["mean"], want_mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out["variance"], want_var, rtol=1e-4)
    np.testing.assert_allclose(out["log_variance"], np.log(want_var), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["eps"], eps, rtol=1e-6, atol=1e-6)


def test_p_mean_variance_fixed_small(diffusion):
    rng, x0, t, _ = random_batch(3)
    xt = rng.standard_normal(SHAPE)
    eps = rng.standard_normal(SHAPE)
    out = p_mean_variance(diffusion, f32(eps), f32(xt), jnp.asarray(t), learn_sigma=False, clip_denoised=False)
    want_mean, want_var, want_logvar = oracle_posterior(
        diffusion.betas, oracle_pred_x0(diffusion.betas, xt, eps, t), xt, t)
    np.testing.assert_allclose(out["mean"], want_mean, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out["variance"], want_var, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(out["log_variance"], want_logvar, rtol=1e-5)
    with pytest.raises(ValueError):
        p_mean_variance(diffusion, f32(eps), f32(xt), jnp.asarray(t), learn_sigma=True, clip_denoised=False)


# ----------------------------------------------------------------------------- likelihood terms


def test_normal_kl():
    rng = np.random.default_rng(4)
    m1, m2 = rng.standard_normal((2, 5, 7))
    l1, l2 = rng.uniform(-6, 1, (2, 5, 7))
    got = normal_kl(f32(m1), f32(l1), f32(m2), f32(l2))
    np.testing.assert_allclose(got, oracle_normal_kl(m1, np.exp(l1), m2, np.exp(l2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(normal_kl(f32(m1), f32(l1), f32(m1), f32(l1)), 0.0, atol=1e-6)


def test_approx_cdf_is_close_to_normal_cdf():
    z = np.linspace(-6, 6, 1001)
    np.testing.assert_allclose(approx_standard_normal_cdf(f32(z)), scipy.special.ndtr(z), atol=2e-4)


def test_discretized_gaussian_log_likelihood():
    rng, x0, _, _ = random_batch(5)
    log_scale = rng.uniform(-4, -1, SHAPE)
    mean = x0 + np.exp(log_scale) * rng.uniform(-2, 2, SHAPE)
    got = discretized_gaussian_log_likelihood(f32(x0), f32(mean), f32(log_scale))
    np.testing.assert_allclose(got, oracle_discretized_ll(x0, mean, log_scale), rtol=1e-4, atol=1e-5)


def test_discretized_likelihood_sums_to_one():
    levels = np.arange(256) / 127.5 - 1.0
    for mean, log_scale in [(0.3, math.log(0.2)), (-0.97, math.log(0.05)), (0.0, math.log(1.5))]:
        logp = discretized_gaussian_log_likelihood(f32(levels), f32(np.full(256, mean)),
                                                   f32(np.full(256, log_scale)))
        assert abs(float(jnp.exp(logp).sum()) - 1.0) < 1e-5


# ----------------------------------------------------------------------------- training loss


def oracle_training_losses(betas, eps, v, x0, xt, t, noise):
    mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3))
    pred_x0 = oracle_pred_x0(betas, xt, eps, t)
    model_mean, _, _ = oracle_posterior(betas, pred_x0, xt, t)
    model_var = oracle_learned_variance(betas, v, t)
    true_mean, _, true_logvar = oracle_posterior(betas, x0, xt, t)
    kl = oracle_normal_kl(true_mean, np.exp(true_logvar), model_mean, model_var).mean(axis=(1, 2, 3))
    nll = -oracle_discretized_ll(x0, model_mean, 0.5 * np.log(model_var)).mean(axis=(1, 2, 3))
    vb = np.where(t == 0, nll, kl) / math.log(2.0)
    return mse, vb


def test_training_losses(diffusion):
    rng, x0, t, noise = random_batch(6)
    xt = np.asarray(q_sample(diffusion, f32(x0), jnp.asarray(t), f32(noise)), np.float64)
    eps = noise + 0.05 * rng.standard_normal(SHAPE)
    v = rng.uniform(-1, 1, SHAPE)
    out = training_losses(diffusion, f32(np.concatenate([eps, v], -1)), f32(x0), f32(xt), jnp.asarray(t),
                          f32(noise), learn_sigma=True)
    want_mse, want_vb = oracle_training_losses(diffusion.betas, eps, v, x0, xt, t, noise)
    assert out["loss"].shape == out["mse"].shape == out["vb"].shape == (SHAPE[0],)
    np.testing.assert_allclose(out["mse"], want_mse, rtol=1e-5)
    np.testing.assert_allclose(out["vb"], want_vb, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(out["loss"], out["mse"] + out["vb"], rtol=1e-6)

    fixed = training_losses(diffusion, f32(eps), f32(x0), f32(xt), jnp.asarray(t), f32(noise), learn_sigma=False)
    np.testing.assert_allclose(fixed["loss"], want_mse, rtol=1e-5)
    np.testing.assert_array_equal(fixed["vb"], 0.0)


def test_training_losses_stop_gradient(diffusion):
    rng, x0, t, noise = random_batch(7)
    args = (f32(x0), q_sample(diffusion, f32(x0), jnp.asarray(t), f32(noise)), jnp.asarray(t), f32(noise))
    out = f32(np.concatenate([noise + 0.1 * rng.standard_normal(SHAPE), rng.uniform(-1, 1, SHAPE)], -1))
    c = SHAPE[-1]

    def grad_of(term):
        return jax.grad(lambda o: training_losses(diffusion, o, *args, learn_sigma=True)[term].sum())(out)

    g_loss, g_mse, g_vb = grad_of("loss"), grad_of("mse"), grad_of("vb")
    np.testing.assert_array_equal(g_vb[..., :c], 0.0)
    np.testing.assert_allclose(g_loss[..., :c], g_mse[..., :c], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(g_mse[..., c:], 0.0)
    np.testing.assert_allclose(g_loss[..., c:], g_vb[..., c:], rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(g_vb[..., c:]).max()) > 0

    # without the stop-gradient the bound would pull on ε: the test above is not vacuous.
    def vb_unstopped(o):
        x0_, xt, tt, _ = args
        p = p_mean_variance(diffusion, o, xt, tt, learn_sigma=True, clip_denoised=False)
        m, _, lv = q_posterior(diffusion, x0_, xt, tt)
        return normal_kl(m, lv, p["mean"], p["log_variance"]).sum()

    assert float(jnp.abs(jax.grad(vb_unstopped)(out)[..., :c]).max()) > 0


# ----------------------------------------------------------------------------- samplers


def gaussian_data_denoiser(diffusion, mu, s, v=0.3):
    """Exact E[ε | x_t] for data x_0 ~ N(mu, s²) (mu an image; s = 0: the point x_0 = mu):
    √(1−ᾱ)(x_t − √ᾱ mu)/(ᾱ s² + 1 − ᾱ). Appends constant variance channels v."""
    abar_table = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)
    mu = f32(mu)

    def fn(x, t, y):
        abar = abar_table[t].reshape(-1, 1, 1, 1)
        eps = jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * s ** 2 + 1 - abar)
        return jnp.concatenate([eps, jnp.full_like(eps, v)], -1)

    return fn


def oracle_affine_sampler(abar, kept, s, method):
    """x_0 = A x_T + B mu (+ noise terms independent of mu) for the Gaussian-data denoiser,
    by running the DDIM(η=0) / DDPM-mean recursion on the coefficients in float64."""
    a, b = 1.0, 0.0
    for i in reversed(range(len(kept))):
        ab = abar[kept[i]]
        ab_prev = abar[kept[i - 1]] if i > 0 else 1.0
        k = math.sqrt(1 - ab) / (ab * s ** 2 + 1 - ab)
        ea, eb = k * a, k * (b - math.sqrt(ab))                              # ε̂
        x0a, x0b = (a - math.sqrt(1 - ab) * ea) / math.sqrt(ab), (b - math.sqrt(1 - ab) * eb) / math.sqrt(ab)
        if method == "ddim":
            a = math.sqrt(ab_prev) * x0a + math.sqrt(1 - ab_prev) * ea
            b = math.sqrt(ab_prev) * x0b + math.sqrt(1 - ab_prev) * eb
        else:  # posterior mean of the respaced process, by Bayes, at x̂_0
            a, _ = oracle_bayes_posterior(ab_prev, ab / ab_prev, x0a, a)
            b, _ = oracle_bayes_posterior(ab_prev, ab / ab_prev, x0b, b)
    return a, b


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_sampler_matches_affine_oracle(diffusion, method):
    shape, n, s = (4, 8, 8, 2), 50, 0.5
    rng = np.random.default_rng(8)
    mu1, mu2 = rng.uniform(-1, 1, (2,) + shape)
    y = jnp.zeros(shape[0], jnp.int32)
    key = jax.random.key(0)
    out1, out2 = (np.asarray(sample(gaussian_data_denoiser(diffusion, mu, s), diffusion, key, shape, y,
                                    method=method, num_steps=n), np.float64) for mu in (mu1, mu2))
    a, b = oracle_affine_sampler(diffusion.alphas_cumprod, oracle_kept(T, n), s, method)
    np.testing.assert_allclose(out1 - out2, b * (mu1 - mu2), atol=1e-5)
    if method == "ddim":  # deterministic: x_T recovered from the output must be standard normal
        x_t = (out1 - b * mu1) / a
        assert abs(x_t.mean()) < 0.15 and abs(x_t.std() - 1.0) < 0.1


@pytest.mark.parametrize("method,tol", [("ddim", 1e-5), ("ddpm", 1e-3)])
def test_point_dataset_is_recovered(diffusion, method, tol):
    shape = (3, 4, 4, 3)
    x_star = np.random.default_rng(9).uniform(-1, 1, shape[1:])
    got = sample(gaussian_data_denoiser(diffusion, x_star, 0.0, v=-0.5), diffusion, jax.random.key(1), shape,
                 jnp.zeros(shape[0], jnp.int32), method=method, num_steps=25)
    np.testing.assert_allclose(got, np.broadcast_to(x_star, shape), atol=tol)


def test_model_sees_original_timesteps(diffusion):
    seen = []

    def fn(x, t, y):
        jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t, ordered=True)
        return jnp.concatenate([0.1 * x, jnp.zeros_like(x)], -1)

    shape, n = (2, 2, 2, 1), 10
    jax.block_until_ready(sample(fn, diffusion, jax.random.key(2), shape, jnp.zeros(2, jnp.int32),
                                 method="ddpm", num_steps=n))
    jax.effects_barrier()
    np.testing.assert_array_equal(np.stack(seen), np.repeat(oracle_kept(T, n)[::-1, None], 2, axis=1))


def test_classifier_free_guidance_formula():
    rng = np.random.default_rng(10)
    shape, null, scale = (3, 2, 2, 2), 7, 4.0
    x = f32(rng.standard_normal(shape))
    t = jnp.asarray([5, 400, 999])
    y = jnp.asarray([1, 4, 2])
    calls = []

    def fn(xx, tt, yy):
        calls.append((xx.shape[0], np.asarray(tt), np.asarray(yy)))
        feat = xx * (1.0 + yy[:, None, None, None]) + 1e-3 * tt[:, None, None, None]
        return jnp.concatenate([feat, jnp.sin(feat + yy[:, None, None, None])], -1)

    got = classifier_free_guidance(fn, scale, null)(x, t, y)
    assert len(calls) == 1 and calls[0][0] == 2 * shape[0]
    np.testing.assert_array_equal(calls[0][1], np.concatenate([t, t]))
    np.testing.assert_array_equal(calls[0][2], [1, 4, 2, null, null, null])
    cond, uncond = np.asarray(fn(x, t, y)), np.asarray(fn(x, t, jnp.full(3, null)))
    c = shape[-1]
    np.testing.assert_allclose(got[..., :c], uncond[..., :c] + scale * (cond[..., :c] - uncond[..., :c]), rtol=1e-5)
    np.testing.assert_allclose(got[..., c:], cond[..., c:], rtol=1e-6)


def test_sample_with_guidance_hits_extrapolated_target(diffusion):
    """ε_∅ + s(ε_y − ε_∅) of exact point predictors is the exact predictor for x_∅ + s(x_y − x_∅)."""
    shape, null, scale = (2, 4, 4, 3), 2, 1.5
    rng = np.random.default_rng(11)
    targets = f32(rng.uniform(-1, 1, (3,) + shape[1:]))  # class 0, class 1, null
    abar_table = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)
    batches = []

    def fn(x, t, y):
        batches.append(x.shape[0])
        abar = abar_table[t].reshape(-1, 1, 1, 1)
        eps = (x - jnp.sqrt(abar) * targets[y]) / jnp.sqrt(1 - abar)
        return jnp.concatenate([eps, jnp.zeros_like(eps)], -1)

    y = jnp.asarray([1, 0])
    got = sample(fn, diffusion, jax.random.key(3), shape, y, method="ddim", num_steps=20,
                 cfg_scale=scale, null_class=null)
    want = targets[null] + scale * (targets[y] - targets[null])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert batches and set(batches) == {2 * shape[0]}
    with pytest.raises(ValueError):
        sample(fn, diffusion, jax.random.key(3), shape, y, cfg_scale=scale)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sample_under_jit(diffusion, method):
    shape = (2, 4, 4, 1)
    w = f32(np.random.default_rng(12).standard_normal((1, 2)))

    def fn(x, t, y):  # a tiny "model" with parameters closed over
        h = jnp.tanh(x * w[0, 0] + y[:, None, None, None] * 0.1 + t[:, None, None, None] * 1e-3)
        return jnp.concatenate([h, jnp.tanh(h * w[0, 1])], -1)

    def run(key, y):
        return sample(fn, diffusion, key, shape, y, method=method, num_steps=10, cfg_scale=2.0, null_class=3,
                      eta=0.5)

    key, y = jax.random.key(4), jnp.asarray([0, 2])
    jitted = jax.jit(run)
    got = jitted(key, y)
    assert got.shape == shape and got.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(got, run(key, y), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, jitted(jax.random.key(5), y))


def test_ddpm_step_noise_statistics(diffusion):
    """Many copies of one x_t: the step's mean and std are the learned-range mean and σ; none at t = 0."""
    r = respace(diffusion, 50)
    rng = np.random.default_rng(13)
    batch = 4096
    x = f32(np.broadcast_to(rng.standard_normal((1, 1, 1, 2)), (batch, 1, 1, 2)))
    out = f32(np.broadcast_to(np.concatenate([rng.standard_normal((1, 1, 1, 2)), [[[[0.4, -0.6]]]]], -1),
                              (batch, 1, 1, 4)))
    for step in (30, 0):
        t = jnp.full((batch,), step)
        got = np.asarray(ddpm_step(r, out, x, t, jax.random.key(6), learn_sigma=True, clip_denoised=False))
        pm = p_mean_variance(r, out, x, t, learn_sigma=True, clip_denoised=False)
        want_std = np.sqrt(oracle_learned_variance(r.betas, np.array([[[[0.4, -0.6]]]]), np.array([step])))[0, 0, 0]
        if step == 0:
            np.testing.assert_allclose(got, pm["mean"], rtol=1e-6)
        else:
            np.testing.assert_allclose(got.mean(0)[0, 0], pm["mean"][0, 0, 0], atol=4 * want_std.max() / 64)
            np.testing.assert_allclose(got.std(0)[0, 0], want_std, rtol=0.05)
