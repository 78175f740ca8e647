"""PEFT baseline layers (LoRA, DoRA, PiSSA, OFT, LoHa, SVDiff) against HF peft and float64 oracles."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import peft
import pytest
import torch

from conftest import tiny_config
from kindjax import params as param_rules
from kindjax.config import ConfigError
from kindjax.layers import VARIANTS
from kindjax.layers.adapters import (FROM_DENSE, DoRALinear, LoHaLinear, LoRALinear, OFTLinear,
                                     PiSSALinear, SVDiffLinear, adapter_settings)
from kindjax.models.dit import build_model
from kindjax.train.optimizer import make_optimizer

D_IN, D_OUT, RANK, ALPHA = 16, 24, 4, 6.0
KINDS = ("lora", "dora", "pissa", "oft", "loha", "svdiff")


class Net(torch.nn.Module):
    def __init__(self, d_in: int = D_IN, d_out: int = D_OUT):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


def wrapped(config: peft.PeftConfig, seed: int = 0, d_in: int = D_IN,
            d_out: int = D_OUT) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(peft model, its tuner layer)`` around a random ``Linear(d_in, d_out)``."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(Net(d_in, d_out), config)
    return model, model.base_model.model.lin


def randomise(*tensors: torch.Tensor, std: float = 0.3) -> None:
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t) * std)


def dense_node(layer: torch.nn.Module) -> dict:
    base = layer.get_base_layer()
    return {"kernel": jnp.asarray(base.weight.detach().numpy().T, jnp.float32),
            "bias": jnp.asarray(base.bias.detach().numpy(), jnp.float32)}


def np32(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().numpy(), jnp.float32)


def inputs(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 5, D_IN))


def torch_out64(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    model = model.double()
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def assert_close(got, want, atol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------ forward values vs peft

def test_lora_matches_peft():
    model, layer = wrapped(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"]))
    randomise(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    params = {**dense_node(layer), "adapter": {"lora_A": np32(layer.lora_A["default"].weight).T,
                                               "lora_B": np32(layer.lora_B["default"].weight).T}}
    x = inputs()
    out = LoRALinear(D_OUT, rank=RANK, alpha=ALPHA).apply({"params": params}, jnp.asarray(x, jnp.float32))
    want = torch_out64(model, x)
    assert_close(out, want)
    dense = x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
    assert np.abs(want - dense).max() > 0.1


def test_dora_matches_peft():
    model, layer = wrapped(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=True, target_modules=["lin"]))
    magnitude = layer.lora_magnitude_vector["default"].weight
    # peft's magnitude at init: ‖W‖ per output feature; from_dense must give the same.
    node = {**dense_node(layer), "adapter": {"lora_A": np32(layer.lora_A["default"].weight).T,
                                             "lora_B": jnp.zeros((RANK, D_OUT)),
                                             "magnitude": jnp.ones((D_OUT,))}}
    config = ml_collections.ConfigDict(dict(kind="dora", rank=RANK, alpha=ALPHA))
    got = FROM_DENSE["dora"](node, jax.random.key(0), config)["adapter"]["magnitude"]
    assert_close(got, magnitude.detach().double().numpy())

    randomise(layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    with torch.no_grad():
        magnitude.copy_(torch.rand_like(magnitude) + 0.5)
    params = {**dense_node(layer), "adapter": {"lora_A": np32(layer.lora_A["default"].weight).T,
                                               "lora_B": np32(layer.lora_B["default"].weight).T,
                                               "magnitude": np32(magnitude)}}
    x = inputs()
    out = DoRALinear(D_OUT, rank=RANK, alpha=ALPHA).apply({"params": params}, jnp.asarray(x, jnp.float32))
    assert_close(out, torch_out64(model, x))


def test_dora_norm_is_constant_for_the_gradient():
    """∂out/∂B through the numerator only (peft's detached norm): equals the LoRA gradient scaled by m/‖·‖."""
    key_a, key_b, key_m, key_x, key_k = jax.random.split(jax.random.key(3), 5)
    kernel = jax.random.normal(key_k, (D_IN, D_OUT))
    adapter = {"lora_A": jax.random.normal(key_a, (D_IN, RANK)), "lora_B": jax.random.normal(key_b, (RANK, D_OUT)),
               "magnitude": jax.random.uniform(key_m, (D_OUT,), minval=0.5, maxval=1.5)}
    params = {"kernel": kernel, "bias": jnp.ones((D_OUT,)), "adapter": adapter}
    x = jax.random.normal(key_x, (4, D_IN))
    s = ALPHA / RANK

    def loss(b):
        p = {**params, "adapter": {**adapter, "lora_B": b}}
        return jnp.sum(DoRALinear(D_OUT, rank=RANK, alpha=ALPHA).apply({"params": p}, x) ** 2)

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        a, b, m, w = (p64["adapter"]["lora_A"], p64["adapter"]["lora_B"], p64["adapter"]["magnitude"],
                      p64["kernel"])
        x64 = np.asarray(x, np.float64)
        ratio = m / np.linalg.norm(w + s * a @ b, axis=0)
        out = (x64 @ w + s * x64 @ a @ b) * ratio + 1.0
        want = s * (x64 @ a).T @ (2 * out * ratio)          # norm held constant
    assert_close(jax.jit(jax.grad(loss))(adapter["lora_B"]), want, atol=1e-4)


@pytest.mark.parametrize("terms", [5, 3, 2, None])     # Cayley–Neumann terms; None: exact Cayley
@pytest.mark.parametrize("sizes", [dict(oft_block_size=4), dict(r=2),
                                   # not dividing D_IN = 16: peft takes the nearest divisor
                                   dict(r=3), dict(r=5), dict(oft_block_size=3), dict(oft_block_size=6)])
def test_oft_matches_peft(terms, sizes):
    peft_sizes = {"r": 0, **sizes} if "oft_block_size" in sizes else {"oft_block_size": 0, **sizes}
    cayley = dict(use_cayley_neumann=terms is not None, num_cayley_neumann_terms=terms or 5)
    model, layer = wrapped(peft.OFTConfig(target_modules=["lin"], **cayley, **peft_sizes))
    weight = layer.oft_R["default"].weight
    randomise(weight, std=0.2)
    params = {**dense_node(layer), "adapter": {"Q": np32(weight)}}
    module = OFTLinear(D_OUT, **adapter_settings({"kind": "oft", **cayley, **sizes}))
    x = inputs()
    out = module.apply({"params": params}, jnp.asarray(x, jnp.float32))
    want = torch_out64(model, x)
    assert_close(out, want)
    dense = x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
    assert np.abs(want - dense).max() > 0.05


def test_oft_nearest_divisor_is_peft_s_adjustment():
    from kindjax.layers.adapters import nearest_divisor, oft_blocks
    from peft.tuners.oft.layer import OFTLayer

    for d_in in (16, 64, 768, 1024, 3072):
        for size in range(1, d_in + 8):
            if d_in % size:
                assert nearest_divisor(d_in, size) == OFTLayer.adjust_oft_parameters(None, d_in, size), (d_in, size)
    assert oft_blocks(768, 21, 0) == (24, 32)            # KIND task 1's r = 21 on DiT-B: 24 blocks of 32
    assert oft_blocks(768, 21, 0, "pad") == (21, 37)     # kept: 21 blocks of ⌈768/21⌉, input padded to 777
    assert oft_blocks(3072, 0, 100, "pad") == (31, 100)


@pytest.mark.parametrize("sizes", [dict(r=3), dict(r=5), dict(oft_block_size=6)])
def test_oft_padded_blocks_match_peft_on_the_zero_padded_layer(sizes):
    """``block_fit="pad"``: ``n`` blocks of ``b`` with ``n·b > d_in`` equal peft's OFT (whose blocks
    then tile exactly) on the layer widened to ``n·b`` inputs by zero inputs and zero kernel rows."""
    from kindjax.layers.adapters import oft_blocks

    n, b = oft_blocks(D_IN, sizes.get("r", 0), sizes.get("oft_block_size", 0), "pad")
    assert n * b > D_IN
    model, layer = wrapped(peft.OFTConfig(target_modules=["lin"], r=n, oft_block_size=0), d_in=n * b)
    weight = layer.oft_R["default"].weight
    randomise(weight, std=0.2)
    with torch.no_grad():
        layer.get_base_layer().weight[:, D_IN:] = 0.0
    wide = dense_node(layer)
    params = {"kernel": wide["kernel"][:D_IN], "bias": wide["bias"], "adapter": {"Q": np32(weight)}}
    settings = adapter_settings({"kind": "oft", "block_fit": "pad", **sizes})
    x = inputs()
    out = OFTLinear(D_OUT, **settings).apply({"params": params}, jnp.asarray(x, jnp.float32))
    want = torch_out64(model, np.concatenate([x, np.zeros(x.shape[:-1] + (n * b - D_IN,))], axis=-1))
    assert_close(out, want)
    dense = x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
    assert np.abs(want - dense).max() > 0.05


def test_oft_exact_cayley_is_orthogonal_and_neumann_approximates_its_transpose():
    from kindjax.layers.adapters import cayley, skew_symmetric

    q = skew_symmetric(0.05 * jax.random.normal(jax.random.key(4), (3, 10)), 5)
    exact = np.asarray(cayley(q, False, 5), np.float64)
    assert np.abs(exact @ np.swapaxes(exact, -1, -2) - np.eye(5)).max() < 1e-5
    neumann = np.asarray(cayley(q, True, 12), np.float64)
    assert np.abs(neumann - np.swapaxes(exact, -1, -2)).max() < 1e-5


def test_loha_matches_peft():
    model, layer = wrapped(peft.LoHaConfig(r=RANK, alpha=ALPHA, target_modules=["lin"]))
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    randomise(*(getattr(layer, n)["default"] for n in names))
    params = {**dense_node(layer), "adapter": {n: np32(getattr(layer, n)["default"]).T for n in names}}
    x = inputs()
    out = LoHaLinear(D_OUT, rank=RANK, alpha=ALPHA).apply({"params": params}, jnp.asarray(x, jnp.float32))
    want = torch_out64(model, x)
    assert_close(out, want)
    dense = x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)
    assert np.abs(want - dense).max() > 0.1


def test_pissa_from_dense_matches_peft():
    _, original = wrapped(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"]), seed=5)
    model, layer = wrapped(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"],
                                           init_lora_weights="pissa"), seed=5)
    node = {**dense_node(original), "adapter": {"lora_A": jnp.ones((D_IN, RANK)),
                                                "lora_B": jnp.ones((RANK, D_OUT))}}
    config = ml_collections.ConfigDict(dict(kind="pissa", rank=RANK, alpha=ALPHA))
    got = FROM_DENSE["pissa"](node, jax.random.key(0), config)
    b_a = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double().numpy()
    # s·B·A is the rank-r principal part (sign-free); the residual is peft's new base weight.
    assert_close(got["adapter"]["lora_A"] @ got["adapter"]["lora_B"], b_a.T)
    assert_close(got["kernel"], layer.get_base_layer().weight.detach().double().numpy().T)
    w = np.asarray(node["kernel"], np.float64)
    u, sigma, vt = np.linalg.svd(w, full_matrices=False)
    principal = (u[:, :RANK] * sigma[:RANK]) @ vt[:RANK]
    assert_close(np.asarray(got["adapter"]["lora_A"] @ got["adapter"]["lora_B"]) * ALPHA / RANK, principal)
    x = inputs()
    out = PiSSALinear(D_OUT, rank=RANK, alpha=ALPHA).apply({"params": got}, jnp.asarray(x, jnp.float32))
    assert_close(out, torch_out64(model, x))
    assert_close(out, x @ w + np.asarray(node["bias"], np.float64))     # W' = W at init


# ------------------------------------------------------------------ SVDiff vs float64 oracle

def test_svdiff_matches_float64_oracle():
    key_w, key_d, key_x = jax.random.split(jax.random.key(6), 3)
    module = SVDiffLinear(D_OUT)
    x = jax.random.normal(key_x, (3, 5, D_IN))
    fresh = module.init(key_w, x)["params"]
    pretrained = {"kernel": jax.random.normal(key_w, (D_IN, D_OUT)), "bias": jax.random.normal(key_d, (D_OUT,))}
    params = FROM_DENSE["svdiff"]({**fresh, **pretrained}, key_d, ml_collections.ConfigDict(dict(kind="svdiff")))
    assert sorted(params) == ["adapter", "bias", "kernel", "svd"]
    assert sorted(params["svd"]) == ["U", "V", "sigma"] and sorted(params["adapter"]) == ["delta"]
    # δ = 0 reproduces W·x + b bit for bit.
    dense = jnp.dot(x, pretrained["kernel"]) + pretrained["bias"]
    assert np.array_equal(np.asarray(module.apply({"params": params}, x)), np.asarray(dense))
    # A random δ, large enough to clip some σ + δ at 0.
    delta = params["svd"]["sigma"] * jax.random.uniform(key_d, params["svd"]["sigma"].shape, minval=-2.0, maxval=1.0)
    params = {**params, "adapter": {"delta": delta}}
    svd = {k: np.asarray(v, np.float64) for k, v in params["svd"].items()}
    w64 = np.asarray(pretrained["kernel"], np.float64)
    assert np.abs(svd["V"] * svd["sigma"] @ svd["U"].T - w64).max() < 1e-5       # the stored SVD is W's
    clipped = np.maximum(svd["sigma"] + np.asarray(delta, np.float64), 0.0)
    assert (clipped == 0).any() and (clipped > 0).any()
    want = np.asarray(x, np.float64) @ (svd["V"] * clipped @ svd["U"].T) + np.asarray(pretrained["bias"], np.float64)
    assert_close(module.apply({"params": params}, x), want, atol=2e-5)


# ------------------------------------------------------------------ init: W' = W, peft's distributions

@pytest.mark.parametrize("kind, oft", [(kind, dict(oft_block_size=4)) for kind in KINDS]
                         + [("oft", dict(r=3)), ("oft", dict(r=3, block_fit="pad"))])   # 3 ∤ 16
def test_fresh_layer_equals_dense(kind, oft):
    """At init (after from_dense for the data-dependent kinds) the output is the dense x·W + b."""
    model_config = ml_collections.ConfigDict(dict(arch="", hidden_size=16, depth=1, num_heads=2, mlp_ratio=1.5,
                                                  linear=adapter_config(kind, **oft)))
    layer = VARIANTS[kind].build(model_config)("q", D_OUT, "q")
    x = jax.random.normal(jax.random.key(7), (2, 3, D_IN))
    fresh = layer.init(jax.random.key(8), x)["params"]
    key_w, key_b = jax.random.split(jax.random.key(9))
    pretrained = {"kernel": jax.random.normal(key_w, (D_IN, D_OUT)), "bias": jax.random.normal(key_b, (D_OUT,))}
    node = FROM_DENSE[kind]({**fresh, **pretrained}, jax.random.key(10), model_config.linear)
    dense = np.asarray(x, np.float64) @ np.asarray(pretrained["kernel"], np.float64) + np.asarray(pretrained["bias"])
    out = np.asarray(layer.apply({"params": node}, x))
    assert_close(out, dense, atol=2e-5)
    if kind in ("lora", "oft", "loha", "svdiff"):   # ΔW = 0 exactly: bit-identical to the dense layer
        assert np.array_equal(out, np.asarray(jnp.dot(x, pretrained["kernel"]) + pretrained["bias"]))
    for key in ("kernel", "bias"):
        assert node[key].shape == pretrained[key].shape


def test_init_distributions_match_peft():
    """LoRA's A and LoHa's factors: U(±1/sqrt(fan_in)) as peft's kaiming_uniform(a=√5); zeros where peft has zeros."""
    big_in, big_out, r = 64, 48, 32
    fresh = LoRALinear(big_out, rank=r, alpha=r).init(jax.random.key(0), jnp.ones((1, big_in)))["params"]
    torch.manual_seed(0)
    _, ref = wrapped(peft.LoraConfig(r=r, lora_alpha=r, target_modules=["lin"]), d_in=big_in, d_out=big_out)
    pairs = [(fresh["adapter"]["lora_A"], ref.lora_A["default"].weight, big_in)]
    assert not np.asarray(fresh["adapter"]["lora_B"]).any() and not ref.lora_B["default"].weight.any()
    fresh = LoHaLinear(big_out, rank=r, alpha=r).init(jax.random.key(1), jnp.ones((1, big_in)))["params"]
    _, ref = wrapped(peft.LoHaConfig(r=r, alpha=r, target_modules=["lin"]), d_in=big_in, d_out=big_out)
    for name, fan_in in (("hada_w1_a", r), ("hada_w1_b", big_in), ("hada_w2_a", r)):
        pairs.append((fresh["adapter"][name], getattr(ref, name)["default"], fan_in))
    assert not np.asarray(fresh["adapter"]["hada_w2_b"]).any() and not ref.hada_w2_b["default"].any()
    for ours, theirs, fan_in in pairs:
        ours, theirs = np.asarray(ours), theirs.detach().numpy()
        assert ours.shape == theirs.T.shape
        bound = 1.0 / np.sqrt(fan_in)
        for sample in (ours, theirs):
            assert np.abs(sample).max() <= bound and np.abs(sample).max() > 0.9 * bound
            assert abs(sample.std() / (bound / np.sqrt(3)) - 1) < 0.1


# ------------------------------------------------------------------ DiT: frozen parts bit-identical

def adapter_config(kind: str, **oft) -> ml_collections.ConfigDict:
    if kind == "oft":
        return ml_collections.ConfigDict(dict(kind="oft", **oft))
    if kind == "svdiff":
        return ml_collections.ConfigDict(dict(kind="svdiff"))
    return ml_collections.ConfigDict(dict(kind=kind, rank=RANK, alpha=ALPHA))


@pytest.mark.parametrize("kind", [k if k == "lora" else pytest.param(k, marks=pytest.mark.slow) for k in KINDS])
def test_dit_step_changes_only_adapter_leaves(kind):
    config = tiny_config()
    config.model.update(hidden_size=32, depth=1)
    config.model.linear = adapter_config(kind, oft_block_size=16)
    config.train.trainable = ("/adapter/",)
    config.optim.lr = 1e-2
    model = build_model(config)
    c, s = config.model.in_channels, config.model.image_size
    kx, kt, ktarget = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(kx, (4, s, s, c))
    t = jax.random.randint(kt, (4,), 0, 1000)
    y = jnp.array([0, 3, config.model.num_classes, 1])
    params = jax.jit(model.init)(jax.random.key(12), x, t, y)["params"]
    # Perturb every leaf (adaLN-Zero and the zero final layer would block every gradient).
    rng = np.random.default_rng(13)
    params = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), params)
    target = jax.random.normal(ktarget, (4, s, s, model.out_channels))
    optimizer = make_optimizer(config)

    @jax.jit
    def step(params):
        grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x, t, y) - target) ** 2))(params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    new = step(params)
    n_adapter = 0
    for (path, old), fresh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new)):
        name = param_rules.path_string(path)
        if "/adapter/" in name:
            n_adapter += 1
            assert not np.array_equal(np.asarray(old), np.asarray(fresh)), f"{name} did not train"
        else:
            assert np.array_equal(np.asarray(old), np.asarray(fresh)), f"{name} is frozen but changed"
    assert n_adapter == config.model.depth * 6 * len(model_leaf_names(kind))
    block = params["block_0"]["attn"]["q"]
    assert sorted(block) == sorted(["kernel", "bias", "adapter"] + (["svd"] if kind == "svdiff" else []))
    assert sorted(block["adapter"]) == sorted(model_leaf_names(kind))


def model_leaf_names(kind: str) -> tuple[str, ...]:
    return {"lora": ("lora_A", "lora_B"), "pissa": ("lora_A", "lora_B"),
            "dora": ("lora_A", "lora_B", "magnitude"), "oft": ("Q",),
            "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "svdiff": ("delta",)}[kind]


# ------------------------------------------------------------------ config validation

@pytest.mark.parametrize("linear, match", [
    (dict(kind="lora", rank=4, alpha=4.0, dropout=0.1), r"unknown keys \['dropout'\].*allowed keys: \['kind', 'rank', 'alpha'\]"),
    (dict(kind="loha", rank=0), r"linear.rank must be a positive int"),
    (dict(kind="dora", rank=True), r"linear.rank must be a positive int"),
    (dict(kind="lora", alpha=-1.0), r"linear.alpha must be a positive number"),
    (dict(kind="oft", r=4, oft_block_size=8), r"exactly one of r .* and oft_block_size"),
    (dict(kind="oft", r=0, oft_block_size=0), r"exactly one of r .* and oft_block_size"),
    (dict(kind="oft", oft_block_size=65, block_fit="pad"), r"oft_block_size=65 exceeds d_in=64 of matrix 'q'"),
    (dict(kind="oft", r=3, block_fit="round"), r"linear.block_fit='round': use one of \['peft', 'pad'\]"),
    (dict(kind="oft", num_cayley_neumann_terms=0), r"num_cayley_neumann_terms must be a positive int"),
    (dict(kind="pissa", rank=65), r"rank=65 exceeds min\(d_in, d_out\) = 64 of matrix 'q'"),
    (dict(kind="svdiff", rank=4), r"unknown keys \['rank'\] for kind='svdiff'"),
])
def test_config_errors_name_the_key(linear, match):
    config = tiny_config()
    config.model.linear = ml_collections.ConfigDict(linear)
    with pytest.raises(ConfigError, match=match):
        build_model(config)


def test_oft_settings_follow_peft_naming():
    assert adapter_settings({"kind": "oft"})["oft_block_size"] == 32       # peft's default
    settings = adapter_settings({"kind": "oft", "r": 4})                   # r alone: blocks per layer
    assert (settings["r"], settings["oft_block_size"]) == (4, 0)
    assert adapter_settings({"kind": "lora"}) == {"rank": 8, "alpha": 8.0}
