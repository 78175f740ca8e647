"""The benchmarks (the step suite and ``--suite accelerator``) run end to end on a tiny DiT and print their
figures as the last line (no speed asserted); the peak table and the MFU arithmetic."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import pytest
from absl import flags

from kindjax.tools import bench
from kindjax.tools import bench_accelerator
from kindjax.models.dit import abstract_params

TINY_ARGV = ["--arch", "", "--hidden_size", "32", "--depth", "1", "--num_heads", "2", "--image_size", "8",
             "--batch", "4", "--num_classes", "10", "--kind_num_classes", "4", "--kind_tailor", "2",
             "--repeats", "2", "--pause", "0"]
TINY = bench.Options(arch="", hidden_size=32, depth=1, num_heads=2, image_size=8, batch=4, num_classes=10,
                     kind_num_classes=4, kind_tailor=2, repeats=2, pause=0.0)


def parsed(argv: list[str]) -> bench.Options:
    """The options of the command line ``python -m kindjax.tools.bench *argv``, on flags of its own."""
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


@pytest.mark.slow  # 70 s (-n 2, 2 cores)
def test_tiny_benchmark_prints_the_figures_last(capsys):
    pytest.importorskip("diffusers")
    bench.run(TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("measuring" in line for line in lines[:-1])
    result = json.loads(lines[-1])
    for key in ("kindjax_step_s", "torch_step_s", "ratio", "kind_step_s", "grouped_step_s", "naive_step_s",
                "kind_over_dense", "grouped_over_dense", "naive_over_dense", "images_per_s", "forward_gflops"):
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


# --- python -m kindjax.tools.bench --suite accelerator (kindjax.tools.bench_accelerator) ---

def parsed_accelerator(argv: list[str]) -> tuple[str, bench_accelerator.Options]:
    flag_values = flags.FlagValues()
    bench.define_flags(flag_values)
    bench_accelerator.define_flags(flag_values)
    flag_values(["bench", *argv])
    return flag_values["suite"].value, bench_accelerator.options_from_flags(flag_values)


def test_accelerator_flags():
    assert parsed_accelerator([]) == ("step", bench_accelerator.FULL)
    assert bench_accelerator.FULL.arch == "XL" and bench_accelerator.FULL.batches == (32, 64)
    assert bench_accelerator.FULL.dtype == "bfloat16" and bench_accelerator.FULL.sample_steps == 250
    assert not bench_accelerator.FULL.torch                                  # torch is opt-in
    suite, options = parsed_accelerator(["--suite", "accelerator", "--accel_size", "tiny", "--accel_steps", "5",
                                         "--accel_torch", "--accel_set", "model.mlp_ratio=2.0"])
    assert suite == "accelerator"
    assert options == dataclasses.replace(bench_accelerator.TINY, steps=5, torch=True,
                                          overrides=bench_accelerator.TINY.overrides + ("model.mlp_ratio=2.0",))
    config = bench_accelerator.model_config(options, "", 2, 8, 10)
    assert config.model.mlp_ratio == 2.0 and config.model.hidden_size == 32 and config.train.batch_size == 16
    for bad in ("model.no_such_key=1", "model.hidden_size", "nothing.here=2"):
        with pytest.raises(ValueError, match="--accel_set"):
            bench_accelerator.apply_overrides(config, (bad,))


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA B200", 2250), ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v6 lite", 918),
    ("Tesla T4", None)])
def test_peak_table_knows_the_chips(kind, peak):
    device = SimpleNamespace(platform="tpu" if kind.startswith("TPU") else "gpu", device_kind=kind)
    assert bench_accelerator.peak_flops(device) == (None if peak is None else peak * 1e12)
    assert bench_accelerator.peak_flops(SimpleNamespace(platform="cpu", device_kind="cpu")) is None


def test_mfu_is_model_flops_over_device_peak():
    case = SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(batch_size=64)), model_flops=8e14,
                           xla_step_flops=9e14, compile_s=1.0, memory_gib=None)
    figures = bench_accelerator.train_figures(case, seconds=0.5, peak=1e15, num_devices=2)
    assert figures["mfu"] == pytest.approx(8e14 / (0.5 * 2 * 1e15)) and figures["images_per_s"] == 128
    assert figures["images_per_s_per_device"] == 64


def test_out_of_memory_is_a_result_other_errors_are_not(monkeypatch):
    options = dataclasses.replace(bench_accelerator.TINY, batches=(1,))
    devices = jax.local_devices()

    def fails(message):
        def step_case(config, devices):
            raise jax.errors.JaxRuntimeError(message)
        return step_case

    monkeypatch.setattr(bench_accelerator, "StepCase", fails("RESOURCE_EXHAUSTED: Out of memory allocating 80G"))
    [entry] = bench_accelerator.bench_train(options, devices, None, lambda line: None)
    assert entry["error"].startswith("out of memory") and "step_s" not in entry
    monkeypatch.setattr(bench_accelerator, "StepCase", fails("INTERNAL: a compiler bug"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="compiler bug"):
        bench_accelerator.bench_train(options, devices, None, lambda line: None)


@pytest.mark.slow  # 84 s (-n 2, 2 cores)
def test_tiny_accelerator_suite_on_all_devices(capsys):
    """Every part of the suite runs on the 8 CPU devices and the last line is the JSON figures. The torch
    step (``bench.torch_runner``, run for real by the test above) is a counting stand-in here."""
    options = dataclasses.replace(bench_accelerator.TINY, batches=(1,), rounds=1, torch=True)
    torch_calls, torch_configs = [], []

    def torch_step(config):
        torch_configs.append(config)
        return (lambda: torch_calls.append(1)), 123

    bench_accelerator.run(options, torch_step=torch_step)
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["suite"] == "accelerator" and result["num_devices"] == 8 == len(jax.local_devices())
    assert result["device"] == "cpu:cpu" and result["peak_tflops_per_device"] is None
    [train] = result["train"]
    assert train["global_batch"] == 8 and train["step_s"] > 0 and train["mfu"] is None
    assert train["images_per_s"] == pytest.approx(8 / train["step_s"])
    # 3 × XLA's forward count, against the matmul formula (test_forward_flops_count_every_matmul's).
    d, n = 32, 16
    macs = 8 * (12 * d * d * n + 2 * n * n * d + 6 * d * d + 256 * d + d * d + 2 * d * d + n * 16 * d + n * d * 32)
    assert 3 * 2 * macs <= train["model_tflop_per_step"] * 1e12 <= 1.2 * 3 * 2 * macs
    # XLA's count is of what the 8 devices run: every one also runs the whole (replicated) optimizer update,
    # as large as the tiny model's forward and backward.
    assert train["model_tflop_per_step"] <= train["xla_step_tflop"] <= 3 * train["model_tflop_per_step"]
    kind = result["kind_over_dense"]
    assert kind["kind"]["n_learngene"] == 24 and kind["kind_over_dense"] > 0 and len(kind["times_s"]["kind"]) == 1
    sampling = result["sampling"]
    assert sampling["images"] == 16 and sampling["steps"] == 3 and sampling["cfg_scale"] == 1.5
    assert sampling["images_per_s"] > 0
    assert result["torch"]["params"] == 123 and len(torch_calls) == options.warmup + 1 + options.steps
    assert torch_configs[0].train.batch_size == 1 and torch_configs[0].model.dtype == "bfloat16"
