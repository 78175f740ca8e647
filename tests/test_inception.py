"""Flax FID Inception against pytorch-fid's and torch-fidelity's PyTorch InceptionV3 (random weights)."""
import jax
import numpy as np
import pytest
import torch

import pytorch_fid.inception as pfi
from kindjax.evaluation import inception as inc


def random_fid_inception(seed: int) -> torch.nn.Module:
    """pytorch-fid's FID Inception (``fid_inception_v3`` without its download) with random
    convolution/fc weights and randomly perturbed BatchNorm statistics and affine terms."""
    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
        net.fc.weight.normal_(0.0, 0.05)
        net.fc.bias.normal_(0.0, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def torch_net():
    return random_fid_inception(0)


@pytest.fixture(scope="module")
def weights_file(torch_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
    torch.save(torch_net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def flax_net(weights_file):
    return inc.load_inception(weights_file)


def images(seed, n=2, size=(21, 34)):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_matches_pytorch_fid(torch_net, flax_net, monkeypatch):
    monkeypatch.setattr(pfi, "fid_inception_v3", lambda: torch_net)  # no download: our random net
    ref_model = pfi.InceptionV3(output_blocks=[3]).eval()            # pytorch-fid's own resize + normalise
    captured = {}
    hook = torch_net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))
    x = images(1)
    with torch.no_grad():
        pool = ref_model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0)[0].flatten(1)
        logits = torch_net.fc(pool)
        logits_unbiased = pool @ torch_net.fc.weight.T
    hook.remove()
    # ADM: spatial[..., :7] of the NHWC map, flattened (H, W, C).
    spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)

    module, variables = flax_net
    out = inc.inception_features(module, variables, x, batch_size=2)
    assert out["pool_3"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
    assert rel_err(out["pool_3"], pool) <= 1e-4
    assert rel_err(out["spatial"], spatial) <= 1e-4
    assert rel_err(out["logits_unbiased"], logits_unbiased) <= 1e-4
    assert rel_err(out["logits_unbiased"] + variables["params"]["fc_bias"], logits) <= 1e-4
    # The features are not degenerate (random BN statistics keep the activations alive).
    assert np.std(out["pool_3"]) > 1e-3 and np.std(out["spatial"]) > 1e-3


def test_matches_torch_fidelity_tf1_preprocessing(torch_net, flax_net, weights_file):
    """torch-fidelity's extractor reads the same state dict and re-creates the TF graph's own
    preprocessing (TF1 bilinear resize, (x − 128)/128): our "tf1" rule must match it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=weights_file)
    x = images(2, n=1, size=(40, 40))
    with torch.no_grad():
        pool, logits = fe(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    module, variables = flax_net
    out = inc.inception_features(module, variables, x, preprocessing="tf1")
    assert rel_err(out["pool_3"], pool) <= 1e-4
    assert rel_err(out["logits_unbiased"], logits) <= 1e-4


@pytest.mark.parametrize("rule", ["pytorch_fid", "tf1"])
@pytest.mark.parametrize("in_size", [8, 256, 400])
def test_resize_matrix_matches_torch(rule, in_size):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.from_numpy(np.random.default_rng(in_size).uniform(0, 255, (1, 1, in_size, 5)))
    if rule == "pytorch_fid":
        ref = torch.nn.functional.interpolate(x, size=(299, 5), mode="bilinear", align_corners=False)
    else:
        ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 5), align_corners=False)
    ours = inc.resize_matrix(in_size, 299, rule).astype(np.float64) @ x[0, 0].numpy()
    assert np.max(np.abs(ours - ref[0, 0].numpy())) <= 1e-3  # float32 weights, values up to 255


def test_npz_conversion_round_trip(flax_net, weights_file, tmp_path):
    npz = str(tmp_path / "inception.npz")
    inc.convert_torch_weights(weights_file, npz)
    _, from_npz = inc.load_inception(npz)
    _, from_pth = flax_net
    jax.tree.map(np.testing.assert_array_equal, from_npz, from_pth)


def test_refuses_other_state_dicts(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    state["AuxLogits.fc.weight"] = torch.zeros(3)
    del state["Mixed_6d.branch1x1.bn.running_var"]
    state["fc.weight"] = state["fc.weight"][:1000]
    with pytest.raises(ValueError) as e:
        inc.variables_from_state_dict({k: v.numpy() for k, v in state.items()})
    message = str(e.value)
    assert "missing Mixed_6d.branch1x1.bn.running_var" in message
    assert "unexpected AuxLogits.fc.weight" in message and "fc.weight: shape (1000, 2048)" in message
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        inc.load_inception(str(tmp_path / "nope.pth"))
