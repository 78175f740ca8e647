"""The trainer: sharded equals single-device, resume after SIGKILL, SIGTERM, refusals, logs."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, tiny_config, tiny_overrides
from kindjax.config import ConfigError
from kindjax.train.stages import check
from kindjax.train.trainer import Trainer


def max_rel(a, b):
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))
    scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(b))
    return max(diffs) / scale


def test_sharded_step_equals_single_device(tmp_path):
    assert jax.device_count() == 8
    config = tiny_config()
    single = Trainer(config, str(tmp_path / "a"), devices=jax.devices()[:1])
    config.mesh.update(data=4, fsdp=2)
    sharded = Trainer(config, str(tmp_path / "b"))
    assert dict(sharded.mesh.shape) == {"data": 4, "fsdp": 2}
    # The rule really shards something over fsdp (a 64×256 MLP kernel).
    specs = {str(s.spec) for s in jax.tree.leaves(sharded.state_sharding["params"])}
    assert any("fsdp" in s for s in specs)
    s1, s8 = single.fresh_state(), sharded.fresh_state()
    assert max_rel(s8["params"], s1["params"]) == 0.0
    for step in range(2):
        s1, m1 = single.step_fn(s1, single.global_batch(step))
        s8, m8 = sharded.step_fn(s8, sharded.global_batch(step))
    assert abs(float(m1["loss"]) - float(m8["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    assert max_rel(s8["params"], s1["params"]) <= 1e-5
    assert max_rel(s8["opt_state"], s1["opt_state"]) <= 1e-5
    # The step moved the parameters (the comparison is not between two initial states).
    assert max_rel(s1["params"], single.fresh_state()["params"]) > 1e-4


def cli(workdir, env, *extra):
    return [sys.executable, "-m", "kindjax.main", "--config", os.path.join(ROOT, "configs/dit_digits.py"),
            "--workdir", str(workdir), *tiny_overrides(), *extra]


def tb_scalars(workdir, tag="loss"):
    """step → value of ``tag`` over all event files (later files win, as TensorBoard shows them)."""
    values = {}
    for f in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.*"))):
        acc = EventAccumulator(f, size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.slow  # 63 s (-n 2, 2 cores)
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, single_device_env):
    env, steps = single_device_env, "--config.train.num_steps=40"
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cli(full, env, steps), env=env, check=True, capture_output=True, cwd=ROOT)
    ref = tb_scalars(full)
    assert sorted(ref) == list(range(1, 41))
    proc = subprocess.Popen(cli(killed, env, "--config.train.num_steps=100000"), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: os.path.isdir(killed / "checkpoints" / "4"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cli(killed, env, steps), env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    resumed_at = int(out.stdout.split("Resumed from")[1].split("at step ")[1].split(".")[0])
    assert 4 <= resumed_at < 40, resumed_at
    resumed = tb_scalars(killed)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(1, 41):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6), step
    metrics = json.load(open(killed / "metrics.json"))
    assert set(metrics) >= {"sample_accuracy", "frechet_distance", "step"} and metrics["step"] == 40


def test_sigterm_saves_and_exits_cleanly(tmp_path, single_device_env):
    env = single_device_env
    workdir = tmp_path / "run"
    proc = subprocess.Popen(cli(workdir, env, "--config.train.num_steps=100000",
                                "--config.train.checkpoint_every=100000"),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(tb_scalars(workdir)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saving step" in out
    steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert len(steps) == 1 and steps[0] >= 3


@pytest.mark.slow  # 20 s (-n 2, 2 cores)
def test_workdir_of_another_model_is_refused(tmp_path, single_device_env):
    env = single_device_env
    subprocess.run(cli(tmp_path, env, "--config.train.num_steps=4"), env=env, check=True,
                   capture_output=True, cwd=ROOT)
    out = subprocess.run(cli(tmp_path, env, "--config.model.hidden_size=64"), env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "holds a checkpoint of a different model" in out.stderr
    assert "model.hidden_size: checkpoint 32 vs config 64" in out.stderr


def test_logs_grid_and_metrics(tmp_path, single_device_env):
    env = single_device_env
    subprocess.run(cli(tmp_path, env, "--config.train.num_steps=4", "--config.train.sample_every=2"),
                   env=env, check=True, capture_output=True, cwd=ROOT)
    assert sorted(os.listdir(tmp_path / "samples")) == ["step_0000002.png", "step_0000004.png"]
    for tag in ("loss", "grad_norm", "steps_per_sec", "images_per_sec", "eval/sample_accuracy"):
        assert tb_scalars(tmp_path, tag), tag
    acc = EventAccumulator(glob.glob(str(tmp_path / "tensorboard" / "events.*"))[0], size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("samples")
    # One row per class (10) and the null-class row, one sample per row, each upscaled to 64 pixels
    # with a 4-pixel border.
    assert [e.step for e in images] == [2, 4] and (images[0].height, images[0].width) == (11 * 68 + 4, 68 + 4)


@pytest.mark.parametrize("override, message", [
    (dict(train=dict(batch_size=12)), "not divisible by the 8 devices"),
    (dict(model=dict(patch_size=3)), "not divisible by model.patch_size"),
    (dict(model=dict(adaln_init="ones")), "model.adaln_init"),
    (dict(train=dict(ema_decay=1.0)), "train.ema_decay"),
    (dict(mesh=dict(data=3, fsdp=1)), "devices are visible"),
    (dict(model=dict(linear=dict(kind="nope"))), "not a known linear-layer variant"),
])
def test_bad_configs_fail_before_compiling(override, message):
    config = tiny_config()
    config.update_from_flattened_dict({f"{a}.{b}": v for a, d in override.items() for b, v in d.items()})
    with pytest.raises((ConfigError, ValueError), match=message):
        check(config)


def test_unknown_config_key_is_refused():
    config = tiny_config()
    config.train.num_stpes = 3
    with pytest.raises(ConfigError, match=r"unknown config keys \['train.num_stpes'\]"):
        check(config)
