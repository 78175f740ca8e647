"""JAX's persistent compilation cache, on by default (``train.compilation_cache="auto"``): a run
writes its compiled programs under its workdir, and a restarted process loads the train step from
there instead of compiling it (JAX's own log of the cache, ``JAX_LOG_COMPILES=1``, says which)."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_overrides
from kindjax.train.stages import compilation_cache_dir

HIT = "Persistent compilation cache hit for 'jit_train_step'"


def train(workdir, env, *extra):
    command = [sys.executable, "-m", "kindjax.main", "--config", os.path.join(ROOT, "configs/dit_digits.py"),
               "--workdir", str(workdir), *tiny_overrides(), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # 55 s (-n 2, 2 cores)
def test_a_restarted_run_loads_its_train_step_from_the_workdir_cache(tmp_path, single_device_env):
    env = {k: v for k, v in single_device_env.items() if k != "JAX_COMPILATION_CACHE_DIR"}   # no session cache
    env["JAX_LOG_COMPILES"] = "1"
    workdir = tmp_path / "run"
    first = train(workdir, env, "--config.train.num_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    cache = workdir / "compilation_cache"
    assert f"Compilation cache: {cache}" in first.stdout and HIT not in first.stderr
    written = [p.name for p in cache.iterdir() if p.name.startswith("jit_train_step-")]
    assert len(written) == 1, sorted(p.name for p in cache.iterdir())
    second = train(workdir, env, "--config.train.num_steps=8")   # resumes at step 4: a new process
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resumed from" in second.stdout
    hits = re.findall(HIT + r" with key '([^']+)'", second.stderr)
    assert hits == [written[0].removesuffix("-cache")]   # the step the first process wrote, loaded


def test_the_setting_names_the_directory_or_turns_it_off(tmp_path):
    assert compilation_cache_dir("auto", str(tmp_path), None) == str(tmp_path / "compilation_cache")
    assert compilation_cache_dir("auto", "gs://bucket/run", None) == "gs://bucket/run/compilation_cache"
    assert compilation_cache_dir("/shared/cache", str(tmp_path), None) == "/shared/cache"
    assert compilation_cache_dir("", str(tmp_path), None) is None
    assert compilation_cache_dir("auto", str(tmp_path), "/from/env") == "/from/env"
