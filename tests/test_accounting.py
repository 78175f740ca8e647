"""The accounting command: parameters and FLOPs from shapes."""
from conftest import tiny_config
from kindjax.papers.kind.accounting import account, accounts, markdown
from kindjax.papers.kind.methods import Sizes


def wide_config():
    """A DiT whose matrix products dominate its cost: hidden 256, 64 tokens."""
    c = tiny_config()
    c.model.update(hidden_size=256, depth=2, num_heads=4, image_size=16, patch_size=2, num_classes=3)
    c.train.batch_size = 4
    return c


def naive_forward_macs(c) -> float:
    """Multiply-accumulates of the matrix products of one image, counted by hand."""
    d, n, p = c.model.hidden_size, (c.model.image_size // c.model.patch_size) ** 2, c.model.patch_size
    per_block = n * (4 * d * d + 2 * 4 * d * d) + 2 * n * n * d + 6 * d * d   # qkvo, MLP, attention, adaLN
    embed = n * p * p * c.model.in_channels * d + 256 * d + d * d              # patches, t-embedder MLP
    final = 2 * d * d + n * d * p * p * 2 * c.model.in_channels
    return c.model.depth * per_block + embed + final


def test_accounting_counts_parameters_and_flops_from_shapes():
    c = wide_config()
    trainable, stored, macs, train_flops = account(c)
    assert trainable == stored
    assert abs(macs - naive_forward_macs(c)) <= 0.05 * naive_forward_macs(c)
    # Full training ≈ forward + backward (activations and weights) ≈ 3 × forward.
    assert 2.6 * 2 * macs <= train_flops <= 3.4 * 2 * macs

    sizes = Sizes(rank=4, n_learngene=64, n_tailor=2, oft_blocks=8, num_blocks=1)
    rows = {r.method: r for r in accounts(c, 3, sizes, ("full_ft", "lora", "bitfit"))}
    d, depth = 256, 2
    adapters = depth * (4 * sizes.rank * (d + d) + 2 * sizes.rank * (d + 4 * d))   # A, B of q k v o, MLP in/out
    assert rows["lora"].trainable == adapters + 4 * d                              # + the label table (3 + null)
    assert rows["lora"].stored == rows["full_ft"].stored + adapters
    # Frozen weights need no weight gradients: LoRA and BitFit train for less than full fine-tuning.
    assert rows["bitfit"].train_flops < rows["lora"].train_flops < rows["full_ft"].train_flops
    assert "| lora |" in markdown(list(rows.values()))
