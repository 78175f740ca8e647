"""The accounting command (parameters and FLOPs from shapes) and the comparison-table command."""
import json
import os

import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from kindjax.accounting import account, accounts, markdown
from kindjax.compare import compare, run_configs
from kindjax.config import validate
from kindjax.layers.kind import kind_config
from kindjax.methods import METHODS, Sizes


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


def digits_kind_config():
    c = tiny_config()
    c.model.update(hidden_size=32, num_heads=2, num_classes=7, adaln_init="gaussian")
    c.data.classes = (0, 1, 2, 3, 4, 5, 6)
    c.model.linear = kind_config(n_learngene=16, n_tailor=2)
    c.train.update(num_steps=2, checkpoint_every=2, log_every=2)
    c.transfer.update(classes=(7, 8, 9), num_steps=2)
    return c


def test_every_run_of_the_comparison_is_a_valid_config(tmp_path):
    runs = run_configs(digits_kind_config(), str(tmp_path), 3, tuple(METHODS))
    assert set(runs) == set(METHODS) | {"scratch_adaln_zero", "scratch_adaln_gaussian"}
    for name, per_seed in runs.items():
        assert [c.train.seed for _, c in per_seed] == [0, 1, 2]
        assert len({d for d, _ in per_seed}) == 3
        for _, c in per_seed:
            validate(c, 1)
            assert c.data.classes == (7, 8, 9) and c.train.num_steps == 2
    assert runs["scratch_adaln_gaussian"][0][1].model.adaln_init == "gaussian"
    assert runs["scratch_adaln_zero"][0][1].model.adaln_init == "zero"


def test_compare_writes_table_and_plot_and_resumes(tmp_path):
    config = digits_kind_config()
    rows = compare(config, str(tmp_path), seeds=1, methods=("lora", "kind"))
    names = [r["method"] for r in rows]
    assert names == ["lora", "kind", "scratch_adaln_zero", "scratch_adaln_gaussian"]
    for r in rows:
        assert r["seeds"] == 1 and 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["frechet"]) and r["wall"] > 0
    by_name = {r["method"]: r for r in rows}
    assert by_name["lora"]["trainable"] < by_name["scratch_adaln_zero"]["trainable"]
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| kind |" in table
    assert (tmp_path / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "table.json").read_text()) == json.loads(json.dumps(rows))
    # A rerun trains nothing again: every run is finished, the same table comes back.
    stamp = os.path.getmtime(tmp_path / "adapt" / "lora" / "seed_0" / "metrics.json")
    again = compare(config, str(tmp_path), seeds=1, methods=("lora", "kind"))
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(rows))
    assert os.path.getmtime(tmp_path / "adapt" / "lora" / "seed_0" / "metrics.json") == stamp


@pytest.mark.slow
def test_compare_runs_every_method(tmp_path):
    rows = compare(digits_kind_config(), str(tmp_path), seeds=1)
    assert {r["method"] for r in rows} == set(METHODS) | {"scratch_adaln_zero", "scratch_adaln_gaussian"}


def test_unknown_or_incomplete_configs_are_refused(tmp_path):
    dense = tiny_config()
    with pytest.raises(ValueError, match="needs a KIND config with transfer.classes"):
        compare(dense, str(tmp_path))
    c = digits_kind_config()
    c.model.linear = ml_collections.ConfigDict(dict(kind="dense"))
    with pytest.raises(ValueError, match="needs a KIND config"):
        compare(c, str(tmp_path))
