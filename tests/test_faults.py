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
from kindjax.train.stages import finished, stage
from kindjax.train.trainer import TEACHER, NonFiniteLoss, Trainer, origin, train
from kindjax.papers.kind.transfer import transfer_config
from test_trainer import tb_scalars, wait_for

# The module fixtures are built once, the module running on one worker (README: -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group("faults")


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


def flip_bit(workdir, item="params"):
    """Flips one bit of the largest ``item`` file of step 8 where it still reads but changes a weight
    (the files are zstd frames; a flip in a stored literal decodes silently, as on the issue's disk)."""
    flip_bit_in(os.path.join(step_dir(workdir, 8), item))


def flip_bit_in(item, wanted=lambda path: True):
    """Flips one bit of an array file of the Orbax item directory ``item`` so that exactly one weight
    changes, in a leaf whose key path satisfies ``wanted``, and the item still reads; returns that path."""
    before = jax.tree_util.tree_flatten_with_path(checkpoints.restore_leaves(item))[0]
    d = os.path.join(item, "ocdbt.process_0", "d")
    for path in sorted((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize, reverse=True):
        original = open(path, "rb").read()
        for at in range(len(original) // 2, len(original), 101):
            data = bytearray(original)
            data[at] ^= 0x40
            open(path, "wb").write(bytes(data))
            try:
                after = jax.tree.leaves(checkpoints.restore_leaves(item))
            except Exception:  # noqa: BLE001 — this flip broke the frame; try another byte
                continue
            changed = [(jax.tree_util.keystr(k), int((a != b).sum())) for (k, b), a in zip(before, after)]
            changed = [(k, n) for k, n in changed if n]
            if len(changed) == 1 and changed[0][1] == 1 and wanted(changed[0][0]):
                return changed[0][0]
        open(path, "wb").write(original)
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


def flip_sign_in(item, wanted):
    """Rewrites the Orbax item directory ``item`` with the sign bit of one weight flipped, in the first
    leaf whose key path satisfies ``wanted``, its checkpoint's metadata (and checksums) unchanged: the
    damage the issue found in a sliced learngene; returns that leaf's path."""
    tree = checkpoints.restore_leaves(item)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    at = next(i for i, (path, _) in enumerate(leaves) if wanted(jax.tree_util.keystr(path)))
    values = [np.array(leaf) for _, leaf in leaves]
    values[at].view(np.uint32).flat[0] ^= np.uint32(1 << 31)
    ocp.PyTreeCheckpointer().save(item, jax.tree_util.tree_unflatten(treedef, values), force=True)
    return jax.tree_util.keystr(leaves[at][0])


@pytest.fixture(scope="module")
def trained_kind(tmp_path_factory):
    """A tiny KIND DiT, 2 steps (checkpoint 2): a workdir with a learngene and tailors."""
    config = tiny_kind_job()
    config.job = "train"
    workdir = str(tmp_path_factory.mktemp("kind") / "run")
    train(config, workdir)
    return config, workdir


def damaged_read(reader, says):
    """``reader()`` refuses in one line naming the damaged leaf and the fix."""
    with pytest.raises(checkpoints.CheckpointError) as raised:
        reader()
    message = str(raised.value)
    assert "\n" not in message and f"is damaged: {says}" in message, message
    assert "differs from its checksum (a flipped bit or a bad copy); nothing was loaded. Copy it again" in message
    return message


def test_every_read_outside_training_verifies_its_checksums(trained, trained_kind, tmp_path):
    """One flipped bit in the EMA weights a reader reads: init.pretrained, a distillation teacher, the
    evaluation, load_learngene, init.learngene, kindjax.tools.slice and a sliced learngene each refuse
    in one line (before, a weight changed sign silently, rc 0), and write nothing."""
    from kindjax.checkpoints.learngene import load_learngene, load_params
    from kindjax.evaluation.pipeline import restore_ema_params
    from kindjax import params as param_rules
    from kindjax import sharding

    config, _, _ = trained
    dense = copy_of(trained, tmp_path)
    flipped = flip_bit_in(os.path.join(step_dir(dense, 8), "ema_params"))
    damaged_read(lambda: load_params(dense), f"ema_params{flipped}")
    assert load_params(dense, step=4)   # another step reads
    start = config.copy_and_resolve_references()
    start.init.pretrained = dense
    damaged_read(lambda: train(start, str(tmp_path / "started")), "ema_params")
    teacher = config.copy_and_resolve_references()
    teacher.train.distill.update(teacher=dense, weight=0.5)
    damaged_read(lambda: train(teacher, str(tmp_path / "student")), "ema_params")
    assert not (tmp_path / "started").exists() and not (tmp_path / "student").exists()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    damaged_read(lambda: restore_ema_params(config, dense, mesh), f"ema_params{flipped}")

    kind_config, kind = trained_kind
    sliced = str(tmp_path / "sliced")
    slice_checkpoint(kind, sliced, "learngene")   # from the undamaged workdir
    kind_copy = str(tmp_path / "kind")
    shutil.copytree(kind, kind_copy)
    in_learngene = flip_sign_in(os.path.join(step_dir(kind_copy, 2), "ema_params"),
                                lambda path: "['learngene']" in path)
    damaged_read(lambda: load_learngene(kind_copy), f"ema_params{in_learngene}")
    damaged_read(lambda: slice_checkpoint(kind_copy, str(tmp_path / "lg"), "learngene"), "ema_params")
    assert not (tmp_path / "lg").exists()
    good = load_learngene(sliced)
    flipped = flip_sign_in(os.path.join(sliced, "learngene"), lambda path: "['learngene']" in path)
    damaged_read(lambda: load_learngene(sliced), f"learngene{flipped}")
    transfer = transfer_config(kind_config, sliced)
    damaged_read(lambda: train(transfer, str(tmp_path / "transfer")), "learngene")
    assert not (tmp_path / "transfer").exists()
    assert param_rules.count(good.params) > 0


def test_a_pretrained_dit_of_another_depth_is_refused_and_nothing_is_written(trained, tmp_path):
    """init.pretrained from a 2-block DiT into a 1-block one: refused in one line naming the fix
    (missing blocks stayed random, extra ones were dropped, silently); the new workdir is not made
    (a failed start once left empty checkpoints/ and tensorboard/ behind)."""
    config, source, _ = trained
    c = config.copy_and_resolve_references()
    c.model.depth = 1
    c.init.pretrained = source
    with pytest.raises(ConfigError) as raised:
        train(c, str(tmp_path / "run"))
    message = str(raised.value)
    assert "\n" not in message and message == (
        f"init.pretrained={source!r} is a DiT of 2 blocks, this model has 1: blocks would be left random or "
        f"dropped. Set model.depth=2, or start a DiT of another depth with a growth rule (init.grow)")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def read_only(tmp_path):
    """A function making a read-only view of a directory: a read-only bind mount (as root, whom file
    modes do not stop), else a directory without write permission."""
    mounts = []

    def view(source: str) -> str:
        target = str(tmp_path / f"ro{len(mounts)}")
        os.makedirs(target)
        if os.geteuid() == 0:
            subprocess.run(["mount", "--bind", "-o", "ro", source, target], check=True)
            mounts.append(target)
            return target
        os.rmdir(target)
        shutil.copytree(source, target)
        for d, _, _ in os.walk(target):
            os.chmod(d, 0o555)
        return target

    yield view
    for target in mounts:
        subprocess.run(["umount", target], check=True)


def test_a_read_only_workdir_is_one_line_naming_the_fix(trained, tmp_path, read_only):
    """A finished run resumed for more steps in a read-only workdir, and a new run under a read-only
    directory: one line that names the workdir and the fix (it was "OSError … (a bug?)"); nothing changes."""
    config, _, _ = trained
    view = read_only(copy_of(trained, tmp_path))
    c = config.copy_and_resolve_references()
    c.train.num_steps = 12
    before = files_of(view)
    for workdir in (view, os.path.join(view, "new")):
        with pytest.raises(ConfigError) as raised:
            train(c, workdir)
        message = str(raised.value)
        assert "\n" not in message and message.startswith(f"--workdir {workdir} is not writable (")
        assert "give a workdir you can write to, or fix its permissions" in message
    assert files_of(view) == before


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


@pytest.mark.parametrize("skips", [0, 1000])
def test_an_exploding_update_stops_and_keeps_the_last_good_checkpoint(trained, tmp_path, skips):
    """optim.lr=1e6: the first update would move the weights by ~10⁷× their norm.  It is not applied,
    and the run stops in one line naming the last good checkpoint, even where non-finite steps may
    be skipped (train.max_nonfinite_steps=1000: the steps after such an update are NaN, and skipping
    them once saved finite but exploded weights, 586 for 0.41)."""
    config, workdir, _ = trained
    workdir = copy_of(trained, tmp_path)
    good = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(
        checkpoints.restore_leaves(os.path.join(step_dir(workdir, 8), "params"))))
    c = config.copy_and_resolve_references()
    c.optim.lr = 1e6
    c.train.update(num_steps=400, checkpoint_every=2, keep_checkpoints=1, max_nonfinite_steps=skips)
    with pytest.raises(NonFiniteLoss) as raised:
        train(c, workdir)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("step 9: the update would move the parameters by "), message
    assert "× their norm (train.max_update_ratio=1.0" in message and "optim.lr=1000000.0" in message
    assert "the last finite checkpoint is step 8" in message and "lower optim.lr" in message
    saved = checkpoints.manager(os.path.join(workdir, "checkpoints"), read_only=True)
    assert saved.all_steps() == [4, 8]   # nothing saved after the explosion
    params = checkpoints.restore_leaves(os.path.join(step_dir(workdir, 8), "params"))
    assert max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(params)) == good
    saved.close()


def test_nan_stops_and_keeps_the_finite_checkpoint(trained, tmp_path):
    """A NaN loss (the update limit off, so a learning rate of 10 explodes to NaN): the run stops in
    one line naming the last finite checkpoint; everything saved is finite."""
    config, _, _ = trained
    workdir = copy_of(trained, tmp_path)
    c = config.copy_and_resolve_references()
    c.optim.lr = 1e6
    c.train.update(num_steps=400, checkpoint_every=2, keep_checkpoints=1, max_update_ratio=0.0)
    with pytest.raises(NonFiniteLoss) as raised:
        train(c, workdir)
    message = str(raised.value)
    assert "\n" not in message
    bad = int(message.split("step ")[1].split(":")[0])
    assert "the loss is" in message
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


@pytest.mark.slow  # 15 s (-n 2, 2 cores)
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


@pytest.mark.slow  # 25 s (-n 2, 2 cores)
def test_a_full_disk_on_the_command_line_is_one_line(trained, small_disk, single_device_env):
    """The command line on a disk that holds one checkpoint: one line naming the step whose write
    failed, the cause and the newest complete checkpoint; none of the 4 tracebacks Orbax's write
    threads log, nor the ~230 lines after them (they are held back, and dropped once the run fails)."""
    if small_disk is None:
        pytest.skip("mounting a small tmpfs needs root; the in-process test above checks the message")
    workdir = os.path.join(small_disk, "run")
    out = subprocess.run(main_cli(workdir, "--config.model.hidden_size=64", "--config.train.keep_checkpoints=2"),
                         cwd=ROOT, env=single_device_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kindjax.main: writing step 8 to {workdir}/checkpoints failed ("), \
        out.stderr
    assert "No space left on device" in lines[0] and "the newest complete checkpoint is step 4" in lines[0]
    assert "Traceback" not in out.stdout and "Error" not in out.stdout


@pytest.mark.slow  # 19 s (-n 2, 2 cores)
def test_a_stopped_sampling_resumes_to_the_same_images(tmp_path):
    """Sampling with progress, stopped in its second batch and called again: the finished batch is
    read back, the stopped one resumes from its saved state, and the images are those of a sampling
    never stopped (bit for bit); the same as one without segments, up to float rounding."""
    from kindjax.diffusion import GaussianDiffusion
    from kindjax.diffusion.generate import SamplingProgress, SamplingStopped, generate
    from kindjax.models.dit import build_model, init_params

    config = tiny_config()
    model = build_model(config)
    params = init_params(jax.random.key(0), model)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    labels, key = np.arange(20) % 11, jax.random.key(3)

    def draw(directory, asks):
        asks = iter(asks)
        progress = SamplingProgress(str(directory), "test", lambda: next(asks, False), segment=1)
        return generate(model, params, diffusion, key, labels, config.sample, 8, progress=progress)

    with pytest.raises(SamplingStopped, match="stopped at reverse step 2/4 of batch 1"):
        draw(tmp_path / "stopped", [False, False, False, False, True])
    saved = sorted(p.name for p in (tmp_path / "stopped").rglob("*.npz"))
    assert saved == ["batch_000000.npz", "batch_000001.npz"]
    resumed = draw(tmp_path / "stopped", [])
    whole = draw(tmp_path / "whole", [])
    np.testing.assert_array_equal(resumed, whole)
    unsplit = generate(model, params, diffusion, key, labels, config.sample, 8)
    np.testing.assert_allclose(whole, unsplit, rtol=1e-5, atol=1e-5)


def evaluate_nothing(trainer, state):
    return {"sample_accuracy": 0.0, "frechet_distance": 0.0}


def tiny_kind_job():
    """configs/kind_digits.py shrunk to 2 + 2 steps of a 1-block KIND DiT."""
    from configs.kind_digits import get_config

    config = get_config()
    config.model.update(hidden_size=32, depth=1, num_heads=2)
    config.model.linear.update(n_learngene=4, n_tailor=2)
    config.train.update(batch_size=16, num_steps=2, log_every=1, checkpoint_every=2, sample_every=1000)
    config.transfer.num_steps = 2
    config.sample.update(num_steps=2, grid_per_class=1)
    return config


def run_stages(config, root):
    """The two stages of the KIND transfer job (kindjax.papers.kind.jobs) in ``root``, scored by nothing."""
    pre_dir = os.path.join(root, "pretrain")
    pre_config = config.copy_and_resolve_references()
    pre_config.job = "train"
    pre = stage(pre_config, pre_dir, evaluate_nothing)
    return pre, stage(transfer_config(config, pre_dir), os.path.join(root, "transfer"), evaluate_nothing)


def saved_params(workdir, step):
    return checkpoints.restore_leaves(os.path.join(step_dir(workdir, step), "params"))


@pytest.mark.slow  # 68 s (-n 2, 2 cores)
def test_stale_stages_train_on_rerun_or_are_refused(tmp_path, capsys):
    """The two stages of a KIND transfer job: a finished stage is reused only with the same
    fingerprint; more pre-training steps train it on and rerun the transfer from the new learngene
    (the old one is moved aside); a job moved as a whole is reused; another model is refused before
    anything runs."""
    config = tiny_kind_job()
    root = str(tmp_path / "job")
    pre_dir, tr_dir = os.path.join(root, "pretrain"), os.path.join(root, "transfer")
    run_stages(config, root)
    first = json.load(open(os.path.join(tr_dir, "metrics.json")))
    digest = checkpoints.weights_digest(checkpoints.locate(pre_dir).meta)
    assert first["fingerprint"]["origin"] == {"learngene": {"path": "pretrain", "step": 2, "weights": digest}}
    capsys.readouterr()
    run_stages(config, root)   # reused: nothing trained
    out = capsys.readouterr().out
    assert "Resumed" not in out and "Fresh run" not in out and out.count("reusing it") == 2, out

    config.train.num_steps = 3
    run_stages(config, root)
    out = capsys.readouterr().out
    assert f"{pre_dir} finished at step 2 with other settings (train.num_steps: 2 vs 3); training it on to step 3." \
        in out and f"Resumed from {pre_dir} at step 2." in out, out
    assert f"moved it to {tr_dir}.from_step_2 and training it afresh" in out
    assert json.load(open(os.path.join(tr_dir, "metrics.json")))["fingerprint"]["origin"]["learngene"]["step"] == 3
    assert json.load(open(os.path.join(tr_dir + ".from_step_2", "metrics.json"))) == first
    assert "origin.learngene.step: 2 vs 3" in open(os.path.join(tr_dir + ".from_step_2", "SET_ASIDE.txt")).read()

    moved = str(tmp_path / "moved")   # the finished job moved as a whole: its origin is recorded relative to it
    os.rename(root, moved)
    run_stages(config, moved)
    out = capsys.readouterr().out
    assert "Resumed" not in out and "Fresh run" not in out and out.count("reusing it") == 2, out

    before = sorted(os.listdir(moved))
    config.model.hidden_size = 64
    with pytest.raises(ConfigError, match=r"pretrain holds a checkpoint of a different model "
                                          r"\(model.hidden_size: checkpoint 32 vs config 64\)"):
        run_kind_transfer(config, moved)
    assert sorted(os.listdir(moved)) == before


@pytest.fixture(scope="module")
def kind_job(tmp_path_factory):
    """The tiny KIND job, finished (copied per test: its origins are relative, so a copy is reused)."""
    root = str(tmp_path_factory.mktemp("kind_job") / "job")
    run_stages(tiny_kind_job(), root)
    return root


@pytest.mark.parametrize("key, value, transfer_aside", [("optim.lr", 0.01, "from_step_2"),
                                                        pytest.param("train.seed", 1, "stale", marks=pytest.mark.slow),
                                                        pytest.param("transfer.lr", 0.01, "stale", marks=pytest.mark.slow)])
def test_a_changed_setting_trains_afresh_and_keeps_the_old_stage(kind_job, tmp_path, capsys, key, value,
                                                                 transfer_aside):
    """The issue's repro: the KIND job, then the same with another learning rate (or seed, or transfer
    learning rate).  The stage that setting changes is moved aside whole (nothing lost) and trained
    afresh: its weights are those of a fresh run with the new setting, and its metrics.json records
    the new setting only then.  A pre-training trained afresh also retrains the transfer made from it
    (moved to ``.from_step_2`` when only its start changed)."""
    config = tiny_kind_job()
    root = str(tmp_path / "job")
    shutil.copytree(kind_job, root)
    pre_dir, tr_dir = os.path.join(root, "pretrain"), os.path.join(root, "transfer")
    old = {d: files_of(d) for d in (pre_dir, tr_dir)}
    section, name = key.split(".")
    changed = config.copy_and_resolve_references()
    changed[section][name] = value
    capsys.readouterr()
    run_stages(changed, root)
    out = capsys.readouterr().out
    again = section != "transfer"    # transfer.lr is the transfer stage's optim.lr
    first_dir = pre_dir if again else tr_dir
    assert f"{first_dir} was trained with other settings ({key if again else 'optim.lr'}: " in out, out
    assert f"moved it to {first_dir}.stale and training it afresh." in out
    assert f"Fresh run in {first_dir}" in out and f"Resumed from {first_dir}" not in out
    assert f"moved it to {tr_dir}.{transfer_aside} and training it afresh." in out and f"Fresh run in {tr_dir}" in out
    if not again:   # the pre-training is reused untouched
        assert f"{pre_dir} finished with these settings: reusing it" in out and files_of(pre_dir) == old[pre_dir]
    for d, aside in ((pre_dir, pre_dir + ".stale"), (tr_dir, f"{tr_dir}.{transfer_aside}")):
        if d == tr_dir or again:
            assert {k: v for k, v in files_of(aside).items() if k != "SET_ASIDE.txt"} == old[d]   # nothing lost
    metrics = json.load(open(os.path.join(first_dir, "metrics.json")))
    assert metrics["fingerprint"][section if again else "optim"][name if again else "lr"] == value
    # Trained afresh: the weights of a fresh run with the new setting.
    if again:
        fresh = changed.copy_and_resolve_references()
        fresh.job = "train"
    else:
        fresh = transfer_config(changed, pre_dir)
    reference = host(train(fresh, str(tmp_path / "reference")))
    assert_trees_close(saved_params(first_dir, 2), reference["params"])


def test_fewer_steps_train_afresh_and_finish(trained, tmp_path, capsys):
    """A stage finished at 8 steps, rerun with train.num_steps=4: moved aside and trained afresh to 4
    steps (the 8-step run's step-4 weights), recorded finished; the rerun reuses it."""
    config, _, _ = trained
    workdir = copy_of(trained, tmp_path)
    c = config.copy_and_resolve_references()
    c.train.num_steps = 4
    metrics = stage(c, workdir, evaluate_nothing)
    out = capsys.readouterr().out
    assert f"{workdir} was trained with other settings (train.num_steps: trained 8 vs 4); moved it to " \
           f"{workdir}.stale and training it afresh." in out, out
    assert metrics is not None and metrics["step"] == 4 and finished(workdir, c) == metrics
    assert json.load(open(os.path.join(workdir, "metrics.json")))["fingerprint"]["train"]["num_steps"] == 4
    assert_trees_close(saved_params(workdir, 4), saved_params(workdir + ".stale", 4))
    assert sorted(os.listdir(os.path.join(workdir + ".stale", "checkpoints"))) == ["4", "8"]
    assert stage(c, workdir, evaluate_nothing) == metrics
    assert "reusing it" in capsys.readouterr().out


@pytest.mark.slow  # 25 s (-n 2, 2 cores)
def test_a_resume_from_another_start_is_refused(tmp_path):
    config = tiny_config()
    config.train.num_steps = 2
    train(config, str(tmp_path / "a"))
    train(config, str(tmp_path / "a2"))
    config.init.pretrained = str(tmp_path / "a")
    train(config, str(tmp_path / "b"))
    config.init.pretrained = str(tmp_path / "a2")
    with pytest.raises(ConfigError, match=r"holds a run that started from, or distilled from, another checkpoint "
                                          r"\(init.pretrained.path: checkpoint 'a' vs now 'a2'\)"):
        train(config, str(tmp_path / "b"))


def files_of(root: str) -> dict[str, bytes]:
    """Every file under ``root`` (relative path) with its bytes."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


def test_another_teacher_is_refused_and_a_finished_stage_is_not_reused(trained, tmp_path):
    """A distilled run's origin records its teacher (``train.distill.teacher``: path and step).  With the
    same teacher the stage resumes and is then reused; once the teacher holds a later step, or another
    workdir is named, the stage is not reused (the stage engine trains it afresh, as any changed
    setting) and the trainer refuses to resume its checkpoints (as another ``init`` start), its files
    unchanged.  Without a teacher the origin has no teacher key, so the
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
    digest = checkpoints.weights_digest(checkpoints.locate(teacher).meta)
    assert start == {TEACHER: {"path": teacher, "step": 4, "weights": digest}} and origin(config) == {}
    assert origin(distilled, str(tmp_path / "student")) == {TEACHER: {"path": "run", "step": 4, "weights": digest}}

    student = str(tmp_path / "student")   # a distilled run stopped at its last step, saved as train() saves it
    mngr = checkpoints.manager(os.path.join(student, checkpoints.CHECKPOINTS))
    checkpoints.save(mngr, state, distilled, start)
    mngr.wait_until_finished()
    mngr.close()
    metrics = stage(distilled, student, evaluate_nothing)   # resumed at step 8: the same teacher
    assert metrics is not None and finished(student, distilled) == metrics
    assert json.load(open(os.path.join(student, "metrics.json")))["fingerprint"]["origin"] == origin(distilled, student)
    kept = files_of(os.path.join(student, checkpoints.CHECKPOINTS))

    os.rename(later, os.path.join(teacher, checkpoints.CHECKPOINTS, "8"))   # the teacher trained further
    assert finished(student, distilled) is None
    with pytest.raises(ConfigError, match=r"distilled from, another checkpoint \(train.distill.teacher.step: "
                                          r"checkpoint 4 vs now 8; train.distill.teacher.weights: "):
        train(distilled, student)
    distilled.train.distill.teacher = other
    assert finished(student, distilled) is None
    with pytest.raises(ConfigError, match=r"train.distill.teacher.path: checkpoint 'run' vs now 'other'; "
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
    ("dit", ["--config.train.num_stepz=3"], "--config.train.num_stepz: no config key 'train.num_stepz'; did you mean "
                                            "--config.train.num_steps? (the schema is in kindjax/config.py)"),
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
    assert "\\" not in lines[0] and "(a bug?" not in lines[0]   # nothing escaped, nothing unexplained
    assert not workdir.exists()


def test_debug_shows_the_traceback(tmp_path, single_device_env):
    env = {**single_device_env, "KINDJAX_DEBUG": "1"}
    out = subprocess.run(main_cli(tmp_path, "--config.train.nosuch=1"), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1 and "Traceback (most recent call last)" in out.stderr


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "SIGINT (Ctrl-C)"),
                                       (signal.SIGHUP, "SIGHUP (terminal or ssh session closed)")])
@pytest.mark.slow  # 39 s (-n 2, 2 cores)
def test_sigint_and_sighup_save_and_exit_like_sigterm(tmp_path, single_device_env, sig, name):
    """Ctrl-C, and the hang-up of a dropped ssh session (once the end of an unsaved run), save the
    current step and exit 0."""
    env, workdir = single_device_env, tmp_path / "run"
    proc = subprocess.Popen(main_cli(workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000"),
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(tb_scalars(workdir)) >= 3, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"{name}: saving step" in out and "Traceback" not in out
    saved = int(out.split(f"{name}: saving step ")[1].split()[0])
    assert os.listdir(workdir / "checkpoints") == [str(saved)] and saved >= 3


class FakeMetadata:
    """A GCE metadata server on localhost: ``instance/<key>`` with ``wait_for_change`` and ETags (a
    waiting request is answered when the value changes); ``set(key, value)`` changes it."""

    def __init__(self):
        import http.server
        import threading

        self.values = {"maintenance-event": "NONE", "preempted": "FALSE"}
        self.etags = {k: 1 for k in self.values}
        self.changed = threading.Condition()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                from urllib.parse import parse_qs, urlparse

                url = urlparse(self.path)
                key = url.path.rsplit("/", 1)[-1]
                query = parse_qs(url.query)
                if self.headers.get("Metadata-Flavor") != "Google" or key not in server.values:
                    self.send_error(403 if key in server.values else 404)
                    return
                last = query.get("last_etag", ["0"])[0]
                with server.changed:
                    server.changed.wait_for(lambda: str(server.etags[key]) != last,
                                            timeout=float(query.get("timeout_sec", ["60"])[0]))
                    value, etag = server.values[key], server.etags[key]
                body = value.encode()
                self.send_response(200)
                self.send_header("ETag", str(etag))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def set(self, key, value):
        with self.changed:
            self.values[key], self.etags[key] = value, self.etags[key] + 1
            self.changed.notify_all()

    def close(self):
        self.set("preempted", "FALSE")   # wakes the waiting requests
        self.httpd.shutdown()


def test_a_gce_maintenance_event_saves_and_exits_like_sigterm(tmp_path, single_device_env):
    """On a GCE VM the metadata server announces host maintenance that stops the VM: the run saves
    its current step and exits 0, as on SIGTERM (which, on several processes, JAX's preemption sync
    turns into the same step everywhere); live migration alone changes nothing."""
    metadata = FakeMetadata()
    env, workdir = {**single_device_env, "GCE_METADATA_HOST": metadata.host}, tmp_path / "run"
    try:
        proc = subprocess.Popen(main_cli(workdir, "--config.train.num_steps=100000",
                                         "--config.train.checkpoint_every=100000"),
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: len(tb_scalars(workdir)) >= 3, proc)
        metadata.set("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
        seen = len(tb_scalars(workdir))
        wait_for(lambda: len(tb_scalars(workdir)) >= seen + 3, proc)   # still training
        metadata.set("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
        out, _ = proc.communicate(timeout=120)
    finally:
        metadata.close()
    assert proc.returncode == 0, out
    assert "GCE maintenance-event: TERMINATE_ON_HOST_MAINTENANCE: this VM stops soon; stopping as on SIGTERM." in out
    saved = int(out.split("SIGTERM: saving step ")[1].split()[0])
    assert os.listdir(workdir / "checkpoints") == [str(saved)] and saved >= seen + 3


@pytest.mark.slow  # 44 s (-n 2, 2 cores)
def test_sigterm_during_the_evaluation_saves_its_samples_and_the_rerun_resumes(tmp_path, single_device_env):
    """SIGTERM once the final evaluation samples: the samples drawn so far are saved and the run exits 0
    within seconds (it ignored SIGTERM for the whole evaluation, 36 s); the rerun trains nothing,
    resumes the evaluation from them and records the run finished."""
    env, workdir = single_device_env, tmp_path / "run"
    evaluation = ["--config.eval.num_samples=160", "--config.eval.batch_size=16", "--config.sample.num_steps=400"]
    proc = subprocess.Popen(main_cli(workdir, *evaluation), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    progress = workdir / "evaluation_progress" / "8"
    wait_for(lambda: progress.exists() and any(progress.rglob("batch_*.npz")), proc)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    waited = time.time() - sent
    assert proc.returncode == 0, out
    assert "A stop request: the evaluation saved its samples so far in" in out and "rerun the same command" in out
    assert waited < 30, waited   # a segment of 10 reverse steps of one batch, not the whole evaluation
    assert not (workdir / "metrics.json").exists()
    kept = sorted(p.name for p in progress.rglob("batch_*.npz"))
    assert kept
    out = subprocess.run(main_cli(workdir, *evaluation), env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600).stdout
    assert "Resumed from" in out and "at step 8." in out and "Evaluation: " in out, out
    metrics = json.load(open(workdir / "metrics.json"))
    assert metrics["step"] == 8 and "frechet_distance" in metrics
    assert not (workdir / "evaluation_progress").exists()


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
