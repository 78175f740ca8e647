"""Several JAX processes (as on a TPU pod or a SLURM cluster) train, resume and evaluate as one
process with the same devices does: two processes of two CPU devices each, started through the
SLURM environment that ``launch/gpu_slurm.sh`` relies on, against one process of four devices."""
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_overrides
from kindjax.data.digits import load_digits
from kindjax.evaluation import inception
from test_inception import random_fid_inception
from test_trainer import tb_scalars

PROCESSES, DEVICES_PER_PROCESS = 2, 2


def env_for(process: int | None, job_id: int) -> dict[str, str]:
    """One process of a 2-process SLURM job (``process`` given) or a lone 4-device process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    devices = DEVICES_PER_PROCESS if process is not None else PROCESSES * DEVICES_PER_PROCESS
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    if process is not None:
        env.update(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(PROCESSES),
                   SLURM_PROCID=str(process), SLURM_LOCALID=str(process))
    return env


def run_job(args: list[str], multiprocess: bool) -> list[str]:
    """Runs ``python -m args`` as a 2-process job or as one process; returns each process's output."""
    job_id = random.randrange(1 << 20)   # jax derives the coordinator port from it
    processes = [subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env_for(p, job_id), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for p in (range(PROCESSES) if multiprocess else [None])]
    outputs = []
    for proc in processes:
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            for other in processes:
                if other.poll() is None and proc.returncode != 0:
                    other.kill()
        assert proc.returncode == 0, out[-4000:]
        outputs.append(out)
    return outputs


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_eval")
    pth, npz = str(root / "inception.pth"), str(root / "inception.npz")
    torch.save(random_fid_inception(2).state_dict(), pth)
    inception.convert_torch_weights(pth, npz)
    pixels = np.repeat(np.round((load_digits().images[:12] + 1) * 127.5).astype(np.uint8), 3, axis=-1)
    np.savez(root / "ref.npz", arr_0=pixels)
    return ["--config.eval.num_samples=12", "--config.eval.batch_size=8", f"--config.eval.reference={root}/ref.npz",
            f"--config.eval.inception_weights={npz}", "--config.eval.inception_batch_size=8"]


@pytest.mark.slow  # five JAX jobs, ~3-4 min on 2 cores: run with -m slow
def test_two_processes_train_resume_and_evaluate_as_one(tmp_path, eval_files):
    config = ["--config", os.path.join(ROOT, "configs/dit_digits.py"), *tiny_overrides()]
    pod, single = str(tmp_path / "pod"), str(tmp_path / "single")

    # Trained 8 steps, stopped, resumed to 12 on the 2-process "pod"; 12 straight in one process.
    run_job(["kindjax.main", *config, "--workdir", pod], multiprocess=True)
    outputs = run_job(["kindjax.main", *config, "--workdir", pod, "--config.train.num_steps=12"], multiprocess=True)
    assert "Resumed from" in outputs[0] and "step 12/12" in outputs[0]
    assert "step 12/12" not in outputs[1], "only process 0 reports progress"
    run_job(["kindjax.main", *config, "--workdir", single, "--config.train.num_steps=12"], multiprocess=False)

    pod_loss, single_loss = tb_scalars(pod), tb_scalars(single)
    assert sorted(pod_loss) == sorted(single_loss) == list(range(1, 13))
    np.testing.assert_allclose([pod_loss[s] for s in range(1, 13)], [single_loss[s] for s in range(1, 13)],
                               rtol=1e-5)
    assert sorted(os.listdir(os.path.join(pod, "checkpoints"))) == ["12", "4", "8"]

    # Evaluation: sampling and Inception features split over both processes' devices.
    run_job(["kindjax.evaluation", *config, "--run", pod, *eval_files], multiprocess=True)
    run_job(["kindjax.evaluation", *config, "--run", single, *eval_files], multiprocess=False)
    with np.load(os.path.join(pod, "samples_12_12x8x8x3.npz")) as a, \
            np.load(os.path.join(single, "samples_12_12x8x8x3.npz")) as b:
        assert a["arr_0"].std() > 0
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() <= 1
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    pod_metrics = json.load(open(os.path.join(pod, "eval_12.json")))["metrics"]
    single_metrics = json.load(open(os.path.join(single, "eval_12.json")))["metrics"]
    assert set(pod_metrics) == {"inception_score", "fid", "sfid", "precision", "recall"}
    for name, value in single_metrics.items():
        assert pod_metrics[name] == pytest.approx(value, rel=1e-3, abs=1e-3), name


@pytest.mark.slow  # three JAX jobs, ~2 min on 2 cores: run with -m slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Pod-wide preemption: SIGTERM reaches only process 1; JAX's preemption sync makes both save the
    same step and exit 0, and the rerun resumes with the losses of an uninterrupted run."""
    import signal
    import threading

    config = ["--config", os.path.join(ROOT, "configs/dit_digits.py"), *tiny_overrides(),
              "--config.train.num_steps=5000", "--config.train.checkpoint_every=100000",
              "--config.train.sample_every=100000"]
    pod, single = str(tmp_path / "pod"), str(tmp_path / "single")
    job_id = random.randrange(1 << 20)
    procs = [subprocess.Popen([sys.executable, "-m", "kindjax.main", *config, "--workdir", pod], cwd=ROOT,
                              env=env_for(p, job_id), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for p in range(PROCESSES)]
    lines: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda i=i: lines[i].extend(procs[i].stdout), daemon=True)
               for i in range(PROCESSES)]
    for r in readers:
        r.start()
    try:
        deadline = time.time() + 300
        while not any("step 5/" in line for line in list(lines[0])):
            assert time.time() < deadline and procs[0].poll() is None, "".join(lines[0])[-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in readers:
        r.join(timeout=10)
    out0 = "".join(lines[0])
    assert codes == [0, 0], (out0[-3000:], "".join(lines[1])[-3000:])
    saved = sorted(int(s) for s in os.listdir(os.path.join(pod, "checkpoints")) if s.isdigit())
    assert len(saved) == 1 and 5 <= saved[0] < 5000, saved
    stop = saved[0]
    # SIGTERM goes to JAX's preemption service, whose sync point is the same step on every process
    assert f"a preemption notice (SIGTERM, through JAX's preemption sync): saving step {stop}" in out0

    total = stop + 4
    outputs = run_job(["kindjax.main", *config, "--workdir", pod, f"--config.train.num_steps={total}"],
                      multiprocess=True)
    assert f"Resumed from {pod} at step {stop}" in outputs[0]
    run_job(["kindjax.main", *config, "--workdir", single, f"--config.train.num_steps={total}"], multiprocess=False)
    pod_loss, single_loss = tb_scalars(pod), tb_scalars(single)
    steps = list(range(1, total + 1))
    np.testing.assert_allclose([pod_loss[s] for s in steps], [single_loss[s] for s in steps], rtol=1e-5)
