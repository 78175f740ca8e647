"""``python -m kindjax.tools.bench --suite loader``: the figures, and the simulated processes' checks."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from kindjax.tools import bench_loader


@pytest.mark.slow  # 12 s (-n 2, 2 cores)
def test_loader_benchmark_checks_the_processes_rows(tmp_path):
    options = bench_loader.LoaderOptions(dir=str(tmp_path / "synthetic"), images=600, batch=32, steps=3, rounds=1,
                                         processes=2)
    lines = []
    result = bench_loader.run(options, lines.append)
    assert json.loads(lines[-1]) == result
    assert set(result["images_per_s"]) == {"placed_1_worker", "placed_2_workers", "drawn_1_worker",
                                           "drawn_2_workers"} and min(result["images_per_s"].values()) > 0
    simulated = result["simulated"]
    assert simulated["steps"] == 19 and len(simulated["per_process_images_per_s"]) == 2   # 32 streams of 18–19
    assert all(simulated[k] for k in ("rows_disjoint", "rows_make_the_global_batch", "epoch_covered",
                                      "no_repeat_within_epoch"))
    assert simulated["shards"] == 1 and simulated["shards_opened"] == [1, 1]
    # the directory is written once and reused; another size there is refused
    assert bench_loader.synthetic_latents(options.dir, 600, "float16")["num_examples"] == 600
    try:
        bench_loader.synthetic_latents(options.dir, 700, "float16")
    except ValueError as e:
        assert "holds another synthetic set" in str(e)
    else:
        raise AssertionError("a directory of another size was reused")


def test_suite_flag_runs_the_loader_benchmark(tmp_path, single_device_env):
    done = subprocess.run([sys.executable, "-m", "kindjax.tools.bench", "--suite", "loader", "--loader_images", "300",
                           "--loader_batch", "16", "--loader_steps", "2", "--loader_rounds", "1",
                           "--loader_processes", "1", "--loader_dir", str(tmp_path / "d")],
                          cwd=ROOT, env=single_device_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["suite"] == "loader"
