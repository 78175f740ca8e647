"""The benchmark runs end to end on a tiny DiT and prints its figures as the last line (no speed asserted)."""
from __future__ import annotations

import json

import pytest
from absl import flags

from kindjax import bench
from kindjax.models.dit import abstract_params

TINY_ARGV = ["--arch", "", "--hidden_size", "32", "--depth", "1", "--num_heads", "2", "--image_size", "8",
             "--batch", "4", "--num_classes", "10", "--kind_classes", "4", "--kind_tailor", "2",
             "--repeats", "2", "--pause", "0"]
TINY = bench.Options(arch="", hidden_size=32, depth=1, num_heads=2, image_size=8, batch=4, num_classes=10,
                     kind_classes=4, kind_tailor=2, repeats=2, pause=0.0)


def parsed(argv: list[str]) -> bench.Options:
    """The options of the command line ``python -m kindjax.bench *argv``, on flags of its own."""
    flag_values = flags.FlagValues()
    bench.define_flags(flag_values)
    flag_values(["bench", *argv])
    return bench.options_from_flags(flag_values)


def test_flags_map_to_options():
    assert parsed([]) == bench.Options()
    assert parsed(TINY_ARGV) == TINY
    assert parsed(["--skip_torch", "--dtype", "bfloat16"]) == bench.Options(skip_torch=True, dtype="bfloat16")
    with pytest.raises(flags.IllegalFlagValueError):
        parsed(["--arch", "M"])


def test_tiny_benchmark_prints_the_figures_last(capsys):
    pytest.importorskip("diffusers")
    bench.run(TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("measuring" in line for line in lines[:-1])
    result = json.loads(lines[-1])
    for key in ("kindjax_step_s", "torch_step_s", "ratio", "kind_step_s", "naive_step_s",
                "kind_over_dense", "naive_over_dense", "images_per_s", "forward_gflops"):
        assert result[key] > 0, key
    assert result["device"].startswith("cpu") and result["batch"] == 4 and result["arch"] == "custom"
    assert result["kind"]["n_learngene"] == 32 - 4 * 2
    assert result["dense_params"] == result["torch_params"] < result["kind_params"]
    assert result["mfu"] is None
    assert all(len(ts) == 2 for ts in result["times_s"].values())


def test_forward_flops_count_every_matmul():
    """XLA's count of the forward matches 2·(multiply-adds of the matmuls), within the elementwise work."""
    model = bench.build_model(bench.bench_config(TINY))
    d, n, depth, batch = 32, (8 // 2) ** 2, 1, 4
    macs = batch * (depth * (12 * d * d * n + 2 * n * n * d + 6 * d * d)   # blocks, attention, adaLN
                    + 256 * d + d * d + 2 * d * d                           # t embedder, final adaLN
                    + n * (2 * 2 * 4) * d + n * d * (2 * 2 * 8))            # patches in, patches out
    flops = bench.forward_flops(model, abstract_params(model), batch)
    assert 2 * macs <= flops <= 1.2 * 2 * macs
