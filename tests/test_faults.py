"""Faults a user can cause, each with its exact outcome: nothing lost, nothing silent.

NaN (a high learning rate, NaN in a batch), damaged checkpoints (truncated, a flipped bit, no
metadata, none left), a full disk, stale stages, SIGINT (once, twice), kill -9 at random moments,
and every bad-config case as one line.  Training runs are tiny and in-process on the 8 CPU
devices where no signal is involved; one trained workdir is shared (copied per case).
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, tiny_config, tiny_overrides
from kindjax import checkpoints
from kindjax.checkpoints.slicing import slice_checkpoint
from kindjax.config import ConfigError
from kindjax.data import make_dataset
from kindjax.data.pipeline import StepBatches
from kindjax.papers.kind.jobs import run_kind_transfer
from kindjax.train.stages import finished, set_aside_stale, stage
from kindjax.train.trainer import TEACHER, NonFiniteLoss, Trainer, origin, train
from kindjax.papers.kind.transfer import transfer_config
from test_trainer import tb_scalars, wait_for


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny dense DiT, 8 steps, checkpoints at 4 and 8; its final state on the host."""
    workdir = str(tmp_path_factory.mktemp("faults") / "run")
    config = tiny_config()
    state = host(train(config, workdir))
    return config, workdir, state


def copy_of(trained, tmp_path) -> str:
    target = str(tmp_path / "run")
    shutil.copytree(trained[1], target)
    return target


def step_dir(workdir, step):
    return os.path.join(workdir, "checkpoints", str(step))


def largest_array_file(workdir, step, item="params"):
    d = os.path.join(step_dir(workdir, step), item, "ocdbt.process_0", "d")
    return max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def truncate(workdir):
    path = largest_array_file(workdir, 8)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


def flip_bit(workdir):
    """Flips one bit of the largest params file where it still reads but changes a weight (the files
    are zstd frames; a flip in a stored literal decodes silently, as on the issue's disk)."""
    item = os.path.join(step_dir(workdir, 8), "params")
    before = jax.tree.leaves(checkpoints.restore_leaves(item))
    path = largest_array_file(workdir, 8)
    original = open(path, "rb").read()
    for at in range(len(original) // 2, len(original), 101):
        data = bytearray(original)
        data[at] ^= 0x40
        open(path, "wb").write(bytes(data))
        try:
            after = jax.tree.leaves(checkpoints.restore_leaves(item))
        except Exception:  # noqa: BLE001 — this flip broke the frame; try another byte
            continue
        if sum(int((a != b).sum()) for a, b in zip(after, before)) == 1:
            return
    raise AssertionError("no flip that reads and changes one weight")


def drop_meta(workdir):
    os.remove(os.path.join(step_dir(workdir, 8), "meta", "metadata"))


@pytest.mark.parametrize("damage, says", [
    (truncate, "its arrays do not read"),
    (flip_bit, "its arrays differ from their checksums (params["),
    (drop_meta, "its metadata does not read"),
])
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_before_it(trained, tmp_path, damage, says, capsys):
    config, _, reference = trained
    workdir = copy_of(trained, tmp_path)
    damage(workdir)
    state = host(train(config, workdir))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and lines[0].startswith("Checkpoint step 8 is damaged: ") and says in lines[0], out
    assert "Resumed from" in out and "at step 4." in out
    # Set aside, not deleted: the damaged step is kept with the reason.
    kept = os.path.join(workdir, checkpoints.SET_ASIDE, "8")
    assert says in open(os.path.join(kept, "SET_ASIDE.txt")).read()
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    # Steps 5-8 were trained again: the same weights as the undamaged run.
    assert_trees_close(state["params"], reference["params"])
    assert_trees_close(state["opt_state"], reference["opt_state"])


def test_no_checkpoint_left_stops_saying_so(trained, tmp_path):
    config, _, _ = trained
    workdir = copy_of(trained, tmp_path)
    drop_meta(workdir)
    os.remove(os.path.join(step_dir(workdir, 4), "meta", "metadata"))
    with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint in .* reads and verifies: steps \[8, 4\] "
                                                          r"were moved to .*set_aside"):
        train(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, checkpoints.SET_ASIDE))) == ["4", "8"]


def test_checksums_see_one_flipped_bit_anywhere():
    """The checksum of a random array changes for a flipped bit at any of 20 random places."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 7, 5)).astype(np.float32)
    base, _ = checkpoints.checksums({"params": {"w": x}, "ema_params": {}, "opt_state": {}})
    for _ in range(20):
        bits = x.view(np.uint32).copy()
        bits.flat[rng.integers(bits.size)] ^= np.uint32(1) << np.uint32(rng.integers(32))
        flipped, _ = checkpoints.checksums({"params": {"w": bits.view(np.float32)}, "ema_params": {}, "opt_state": {}})
        assert flipped["params"]["['w']"] != base["params"]["['w']"]
        assert flipped["params"]["['w']"][0] != base["params"]["['w']"][0]


def test_nan_from_a_high_learning_rate_stops_and_keeps_the_finite_checkpoint(trained, tmp_path):
    config, _, _ = trained
    workdir = copy_of(trained, tmp_path)
    c = config.copy_and_resolve_references()
    c.optim.lr = 1e6
    c.train.update(num_steps=400, checkpoint_every=2, keep_checkpoints=1)
    with pytest.raises(NonFiniteLoss) as raised:
        train(c, workdir)
    message = str(raised.value)
    assert "\n" not in message
    bad = int(message.split("step ")[1].split(":")[0])
    saved = checkpoints.manager(os.path.join(workdir, "checkpoints"), read_only=True)
    last = saved.latest_step()
    steps = saved.all_steps()
    assert last >= 8 and all(s < bad for s in steps) and len(steps) <= 2   # keep_checkpoints=1 (+ the resumed one)
    assert f"the last finite checkpoint is step {last}" in message
    assert "optim.lr=1000000.0" in message and "train.max_nonfinite_steps" in message
    for step in steps:
        assert checkpoints.read_meta(saved, step)["finite"] is True
        params = checkpoints.restore_leaves(os.path.join(step_dir(workdir, step), "params"))
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    saved.close()


class NanAt:
    """A training source whose batches of ``steps`` hold a NaN pixel."""

    def __init__(self, source, steps):
        self.source, self.steps, self.num_classes = source, set(steps), source.num_classes

    def local_batch(self, step, batch_size, seed, process_index=0, process_count=1):
        batch = dict(self.source.local_batch(step, batch_size, seed, process_index, process_count))
        if step in self.steps:
            batch["image"] = batch["image"].copy()
            batch["image"][0, 0, 0, 0] = np.nan
        return batch

    def batches(self, start_step, batch_size, seed, process_index=0, process_count=1):
        return StepBatches(lambda s: self.local_batch(s, batch_size, seed, process_index, process_count), start_step)


def test_a_non_finite_step_changes_nothing(tmp_path):
    """The guard in the step: a NaN batch leaves parameters, EMA and optimizer state bit-identical."""
    config = tiny_config()
    trainer = Trainer(config, str(tmp_path), dataset=NanAt(make_dataset(config), {1}))
    state = trainer.step_fn(trainer.fresh_state(), trainer.global_batch(0))[0]
    before = host(state)
    after, metrics = trainer.step_fn(state, trainer.global_batch(1))
    assert float(metrics["finite"]) == 0.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after["step"]) == 2
    for a, b in zip(jax.tree.leaves(host({k: after[k] for k in before if k != "step"})),
                    jax.tree.leaves({k: before[k] for k in before if k != "step"})):
        np.testing.assert_array_equal(a, b)


def test_max_nonfinite_steps_skips_up_to_the_limit(tmp_path, capsys):
    config = tiny_config()
    config.train.update(max_nonfinite_steps=1, num_steps=6, checkpoint_every=3)
    source = make_dataset(config)
    train(config, str(tmp_path / "skip"), dataset=NanAt(source, {2}))
    assert "Step 3: loss nan, grad norm nan: update skipped (1 of train.max_nonfinite_steps=1)." in \
        capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "skip" / "checkpoints")) == ["3", "6"]
    config.train.max_nonfinite_steps = 0
    with pytest.raises(NonFiniteLoss, match=r"^step 3: the loss is nan .* no checkpoint was saved yet"):
        train(config, str(tmp_path / "stop"), dataset=NanAt(source, {2}))
    assert not os.listdir(tmp_path / "stop" / "checkpoints")


@pytest.fixture
def small_disk(trained, tmp_path):
    """A tmpfs where one checkpoint of the shared run fits and two do not, or None where mounting
    is not allowed (then the test makes the second save fail as a full disk does)."""
    one = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(step_dir(trained[1], 4)) for f in files)
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.5 * one) + (256 << 10)}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        yield None
        return
    yield str(mount)
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(trained, tmp_path, small_disk, monkeypatch):
    config, _, reference = trained
    c = config.copy_and_resolve_references()
    c.train.keep_checkpoints = 1
    workdir = os.path.join(small_disk or str(tmp_path), "run")
    if small_disk is None:
        save = ocp.CheckpointManager.save

        def failing(self, step, *args, **kwargs):
            if step == 8:
                raise OSError(errno.ENOSPC, "No space left on device")
            return save(self, step, *args, **kwargs)

        monkeypatch.setattr(ocp.CheckpointManager, "save", failing)
    with pytest.raises(checkpoints.CheckpointError) as raised:
        train(c, workdir)
    message = str(raised.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert "the newest complete checkpoint is step 4" in message and "rerun the same command" in message
    monkeypatch.undo()
    # Space freed (the workdir copied to a roomy disk): the rerun resumes at 4 and ends as the reference.
    roomy = str(tmp_path / "roomy")
    shutil.copytree(workdir, roomy, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    state = host(train(c, roomy))
    assert_trees_close(state["params"], reference["params"])


def evaluate_nothing(trainer, state):
    return {"sample_accuracy": 0.0, "frechet_distance": 0.0}


def test_stale_stages_rerun_or_are_refused(tmp_path, capsys):
    """The two stages of a KIND transfer job: a finished stage is reused only with the same
    fingerprint; more pre-training steps rerun the transfer from the new learngene (the old one is
    moved aside); another model is refused before anything runs."""
    from configs.kind_digits import get_config

    config = get_config()
    config.model.update(hidden_size=32, depth=1, num_heads=2)
    config.model.linear.update(n_learngene=4, n_tailor=2)
    config.train.update(batch_size=16, num_steps=2, log_every=1, checkpoint_every=2, sample_every=1000)
    config.transfer.num_steps = 2
    config.sample.update(num_steps=2, grid_per_class=1)
    pre_dir, tr_dir = str(tmp_path / "pretrain"), str(tmp_path / "transfer")

    def stages(c):
        pre_config = c.copy_and_resolve_references()
        pre_config.job = "train"
        pre = stage(pre_config, pre_dir, evaluate_nothing)
        tr_config = transfer_config(c, pre_dir)
        set_aside_stale(tr_config, tr_dir)
        return pre, stage(tr_config, tr_dir, evaluate_nothing)

    stages(config)
    first = json.load(open(os.path.join(tr_dir, "metrics.json")))
    assert first["fingerprint"]["origin"] == {"learngene": {"path": pre_dir, "step": 2}}
    capsys.readouterr()
    stages(config)   # reused: nothing trained
    assert "Resumed" not in capsys.readouterr().out

    config.train.num_steps = 3
    stages(config)
    out = capsys.readouterr().out
    assert f"{pre_dir} finished with other settings (train.num_steps: 2 vs 3)" in out
    assert f"{tr_dir} was trained from another step of its start" in out
    assert f"moved it to {tr_dir}.from_step_2 and training it again" in out
    assert json.load(open(os.path.join(tr_dir, "metrics.json")))["fingerprint"]["origin"]["learngene"]["step"] == 3
    assert json.load(open(os.path.join(tr_dir + ".from_step_2", "metrics.json"))) == first

    before = sorted(os.listdir(tmp_path))
    config.model.hidden_size = 64
    with pytest.raises(ConfigError, match=r"pretrain holds a checkpoint of a different model "
                                          r"\(model.hidden_size: checkpoint 32 vs config 64\)"):
        run_kind_transfer(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


def test_a_resume_from_another_start_is_refused(tmp_path):
    config = tiny_config()
    config.train.num_steps = 2
    train(config, str(tmp_path / "a"))
    train(config, str(tmp_path / "a2"))
    config.init.pretrained = str(tmp_path / "a")
    train(config, str(tmp_path / "b"))
    config.init.pretrained = str(tmp_path / "a2")
    with pytest.raises(ConfigError, match=r"holds a run that started from, or distilled from, another checkpoint "
                                          r"\(init.pretrained.path: "
                                          rf"checkpoint '{tmp_path / 'a'}' vs now '{tmp_path / 'a2'}'\)"):
        train(config, str(tmp_path / "b"))


def files_of(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path) with its bytes."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


def test_another_teacher_is_refused_and_a_finished_stage_is_not_reused(trained, tmp_path):
    """A distilled run's origin records its teacher (``train.distill.teacher``: path and step).  With the
    same teacher the stage resumes and is then reused; once the teacher holds a later step, or another
    workdir is named, the stage is not reused and resuming its checkpoints is refused (as another
    ``init`` start is), its files unchanged.  Without a teacher the origin has no teacher key, so the
    checkpoints and fingerprints written before the key existed compare equal."""
    config, _, state = trained
    teacher = copy_of(trained, tmp_path)
    other = str(tmp_path / "other")
    shutil.copytree(teacher, other)
    later = str(tmp_path / "teacher_step_8")
    os.rename(os.path.join(teacher, checkpoints.CHECKPOINTS, "8"), later)   # the teacher holds step 4 only
    distilled = config.copy_and_resolve_references()
    distilled.train.distill.update(teacher=teacher, weight=0.5)
    start = origin(distilled)
    assert start == {TEACHER: {"path": teacher, "step": 4}} and origin(config) == {}

    student = str(tmp_path / "student")   # a distilled run stopped at its last step, saved as train() saves it
    mngr = checkpoints.manager(os.path.join(student, checkpoints.CHECKPOINTS))
    checkpoints.save(mngr, state, distilled, start)
    mngr.wait_until_finished()
    mngr.close()
    metrics = stage(distilled, student, evaluate_nothing)   # resumed at step 8: the same teacher
    assert metrics is not None and finished(student, distilled) == metrics
    assert json.load(open(os.path.join(student, "metrics.json")))["fingerprint"]["origin"] == start
    kept = files_of(os.path.join(student, checkpoints.CHECKPOINTS))

    os.rename(later, os.path.join(teacher, checkpoints.CHECKPOINTS, "8"))   # the teacher trained further
    assert finished(student, distilled) is None
    with pytest.raises(ConfigError, match=r"distilled from, another checkpoint \(train.distill.teacher.step: "
                                          r"checkpoint 4 vs now 8\)"):
        stage(distilled, student, evaluate_nothing)
    distilled.train.distill.teacher = other
    assert finished(student, distilled) is None
    with pytest.raises(ConfigError, match=rf"train.distill.teacher.path: checkpoint '{teacher}' vs now '{other}'; "
                                          r"train.distill.teacher.step: checkpoint 4 vs now 8"):
        train(distilled, student)
    assert files_of(os.path.join(student, checkpoints.CHECKPOINTS)) == kept
    assert "set_aside" not in os.listdir(student)

    os.rename(os.path.join(teacher, checkpoints.CHECKPOINTS, "8"), later)   # the teacher back at step 4
    distilled.train.distill.teacher = teacher
    assert finished(student, distilled) == metrics


def test_class_with_no_readable_image_is_refused(tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "dog" / "b.png").write_bytes(b"not an image")
    config = tiny_config()
    config.data.update(name="folder", root=str(tmp_path))
    config.model.update(in_channels=3, num_classes=2)
    with pytest.warns(RuntimeWarning), pytest.raises(ConfigError, match=r"1 class\(es\) in .* have no readable "
                                                                        r"image: \['dog'\]"):
        make_dataset(config)


def test_slicing_a_learngene_from_a_dense_workdir_is_refused(trained, tmp_path):
    with pytest.raises(ValueError, match=r"holds a 'dense' DiT \(model.linear.kind='dense'\), whose layers have no "
                                         r"tailors: it has no learngene"):
        slice_checkpoint(trained[1], str(tmp_path / "lg"), "learngene")
    assert not (tmp_path / "lg").exists()


# --- The command line: one line per error, checked before anything is written; signals. ---

def main_cli(workdir, *extra, config="configs/dit_digits.py"):
    return [sys.executable, "-m", "kindjax.main", "--config", os.path.join(ROOT, config), "--workdir", str(workdir),
            *tiny_overrides(), *extra]


BAD_CONFIGS = [
    ("dit", ["--config.train.nosuch=1"], "--config.train.nosuch: no config key 'train.nosuch'; train has ['batch_size',"),
    ("dit", ["--config.train.trainable=3"], "train.trainable=(3,) must hold str values"),
    ("dit", ["--config.train.num_steps=1.5"], "flag --config.train.num_steps=1.5: invalid literal for int()"),
    ("kind", ["--config.model.linear.n_learngene=500"], "KIND rank does not fit matrix"),
    ("dit", ["--config.init.pretrained={tmp}/nowhere"], "init.pretrained='{tmp}/nowhere': "),
    ("nope", [], "--config: no config file"),
]
CONFIGS = {"dit": "configs/dit_digits.py", "kind": "configs/kind_digits.py", "nope": "configs/nope.py"}


@pytest.mark.parametrize("config, extra, says", BAD_CONFIGS, ids=[s[:24] for _, _, s in BAD_CONFIGS])
def test_bad_config_is_one_line_and_writes_nothing(config, extra, says, tmp_path, single_device_env):
    workdir = tmp_path / "run"
    out = subprocess.run(main_cli(workdir, *[e.format(tmp=tmp_path) for e in extra], config=CONFIGS[config]),
                         cwd=ROOT, env=single_device_env, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("kindjax.main: ") and says.format(tmp=tmp_path) in lines[0], lines[0]
    assert not workdir.exists()


def test_debug_shows_the_traceback(tmp_path, single_device_env):
    env = {**single_device_env, "KINDJAX_DEBUG": "1"}
    out = subprocess.run(main_cli(tmp_path, "--config.train.nosuch=1"), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr


def test_sigint_saves_and_exits_like_sigterm(tmp_path, single_device_env):
    env, workdir = single_device_env, tmp_path / "run"
    proc = subprocess.Popen(main_cli(workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000"),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(tb_scalars(workdir)) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGINT (Ctrl-C): saving step" in out and "Traceback" not in out
    saved = int(out.split("SIGINT (Ctrl-C): saving step ")[1].split()[0])
    assert os.listdir(workdir / "checkpoints") == [str(saved)] and saved >= 3


SECOND_CTRL_C = """
import os, signal, time
from kindjax.train.trainer import Preemption
p = Preemption()
os.kill(os.getpid(), signal.SIGINT)
assert p.requested == 2
print("first Ctrl-C: stop requested", flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running")
"""


def test_a_second_ctrl_c_exits_at_once(single_device_env):
    out = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], cwd=ROOT, env=single_device_env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 130, out.stderr
    assert out.stdout == "first Ctrl-C: stop requested\n"
    assert "Second Ctrl-C: exiting now, without saving." in out.stderr


@pytest.mark.slow  # six CLI runs, ~2-3 min on 2 cores
def test_kill_9_at_five_random_moments_loses_nothing(tmp_path, single_device_env):
    """SIGKILL at 5 seeded random moments (during training steps and during saves: a checkpoint every
    2 steps); each rerun resumes from its newest complete checkpoint, and the final losses are
    those of an uninterrupted run."""
    env, steps = single_device_env, ["--config.train.num_steps=60", "--config.train.checkpoint_every=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(main_cli(full, *steps), env=env, check=True, capture_output=True, cwd=ROOT)
    reference = tb_scalars(full)
    rng = random.Random(16)
    resumed = []
    for _ in range(5):
        proc = subprocess.Popen(main_cli(killed, *steps), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        done_before = len(tb_scalars(killed))
        while len(tb_scalars(killed)) <= done_before and proc.poll() is None:   # until training has started
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.kill()
        out = proc.communicate()[0]
        if "Resumed from" in out:
            resumed.append(int(out.split("at step ")[1].split(".")[0]))
    out = subprocess.run(main_cli(killed, *steps), env=env, check=True, capture_output=True, text=True, cwd=ROOT)
    assert "is damaged" not in out.stdout
    final = tb_scalars(killed)
    assert sorted(final) == list(range(1, 61))
    for step in range(1, 61):
        assert final[step] == pytest.approx(reference[step], rel=1e-6), step
    assert resumed == sorted(resumed) and len(resumed) >= 3
