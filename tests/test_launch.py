"""The launch scripts, run for real against fake ``sbatch``/``srun`` (a 2-node × 8-GPU allocation)
and a fake ``gcloud`` (a 4-worker TPU VM, each worker a home directory where the ``--command``
really runs in bash), with fake ``python3``/``pip``/``uv`` and venv interpreters that record their
arguments, environment and working directory. Checked: every GPU gets one process that takes that
GPU (``kindjax.distributed`` on the recorded environment), every TPU worker gets the code, the
install and the run, detached, started again after a preemption or a lost VM; the XLA flags the GPU
script sets exist in this jaxlib."""
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest


from conftest import ROOT
from kindjax.distributed import Accelerators, init_arguments

FAKE = textwrap.dedent('''
    """One fake for every tool the launch scripts call; argv[1] names the tool."""
    import json, os, re, shutil, subprocess, sys, time

    tool, args = sys.argv[1], sys.argv[2:]
    HERE = os.environ["FAKE_BIN"]

    def record(**extra):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps(dict(tool=tool, args=args, cwd=os.getcwd(), env=dict(os.environ), **extra)) + "\\n")

    def make_tool(path, name):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\\nexec {sys.executable} {HERE}/fake.py {name} \\"$@\\"\\n")
        os.chmod(path, 0o755)

    def option(name, default=None):
        for i, a in enumerate(args):
            if a == name:
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return default

    record()
    if tool == "sbatch":                                   # the #SBATCH lines, then the command line
        script_at = next(i for i, a in enumerate(args) if not a.startswith("-"))
        script, script_args = args[script_at], args[script_at + 1:]
        opts = {}
        for line in open(script):
            m = re.match(r"#SBATCH\\s+--([\\w-]+)(?:=(\\S+))?", line)
            if m:
                opts[m[1]] = m[2] or ""
        for a in args[:script_at]:
            k, v = a[2:].split("=", 1)
            opts[k] = v
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps(dict(tool="sbatch-options", options=opts)) + "\\n")
        nodes = int(opts.get("nodes", 1))
        env = dict(os.environ, SLURM_JOB_ID="777", SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
                   SLURM_NTASKS_PER_NODE=opts["ntasks-per-node"], SLURM_GPUS_PER_NODE=opts["gpus-per-node"],
                   SLURM_SUBMIT_DIR=os.getcwd(), SLURM_JOB_NODELIST=f"node[001-{nodes:03d}]",
                   SLURM_CPUS_ON_NODE="96")
        tmp = os.path.join(os.environ["FAKE_ROOT"], "slurm_script")   # sbatch runs a copy of the script
        shutil.copy(script, tmp)
        if "array" not in opts:
            sys.exit(subprocess.call(["bash", tmp, *script_args], env=env))
        first, last = map(int, opts["array"].split("-"))             # an array job: its tasks start together
        tasks = [subprocess.Popen(["bash", tmp, *script_args], env=dict(
            env, SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_TASK_MIN=str(first),
            SLURM_ARRAY_TASK_MAX=str(last), SLURM_ARRAY_TASK_COUNT=str(last - first + 1)))
            for index in range(first, last + 1)]
        sys.exit(max(t.wait() for t in tasks))
    if tool == "srun":                                     # every task of the allocation, node by node
        command = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
        nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
        gpus = int(os.environ["SLURM_GPUS_PER_NODE"])
        for node in range(nodes):
            for local in range(per_node):
                env = dict(os.environ, SLURM_NTASKS=str(nodes * per_node), SLURM_PROCID=str(node * per_node + local),
                           SLURM_LOCALID=str(local), SLURM_NODEID=str(node), SLURM_STEP_NUM_NODES=str(nodes),
                           SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURMD_NODENAME=f"node{node + 1:03d}",
                           SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"],
                           CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
                rc = subprocess.call(command, env=env)
                if rc:
                    sys.exit(rc)
        sys.exit(0)
    if tool == "gcloud":                                   # compute tpus tpu-vm scp|ssh ... --worker=all
        assert args[:3] == ["compute", "tpus", "tpu-vm"], args
        workers = range(int(os.environ["FAKE_TPU_WORKERS"])) if option("--worker") == "all" else [int(option("--worker", 0))]
        homes = [os.path.join(os.environ["FAKE_ROOT"], f"worker{w}") for w in workers]
        if args[3] == "scp":
            src, dest = [a for a in args[4:] if not a.startswith("-") and a not in (option("--zone"), option("--project"))]
            for home in homes:
                os.makedirs(home, exist_ok=True)
                shutil.copy(src, os.path.join(home, dest.split(":", 1)[1]))
        elif args[3] == "describe":                       # the slice's accelerator type
            assert args[4] == os.environ["TPU_NAME"] and option("--format") == "value(acceleratorType)", args
            print(os.environ.get("FAKE_ACCELERATOR_TYPE", "v5p-32"))
        elif args[3] == "ssh":
            for w, home in zip(workers, homes):
                env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "WORKDIR", "CONFIG")}
                env.update(HOME=home, FAKE_WORKER=str(w))
                rc = subprocess.call(["bash", "-c", option("--command")], cwd=home, env=env)
                if rc:
                    sys.exit(rc)
        sys.exit(0)
    if tool == "python3" and args[:2] == ["-m", "kindjax.tools.preflight"]:   # the launching host's pre-flight
        rc = int(os.environ.get("FAKE_PREFLIGHT_RC", "0"))
        print(json.dumps({"compiled": True, "fits": rc == 0}))
        sys.exit(rc)
    if tool in ("python3", "pip") and args[:3] == ["-m", "pip", "install"] and "uv" in args:
        make_tool(os.path.join(os.environ["HOME"], ".local", "bin", "uv"), "uv")
        sys.exit(0)
    if tool == "python3" and args[:2] == ["-m", "venv"]:                 # as slow as a real one: a race shows
        time.sleep(1)
        make_tool(os.path.join(args[2], "bin", "python"), "venv-python:" + os.path.abspath(args[2]))
        sys.exit(0)
    if tool == "uv" and args[0] == "venv":
        make_tool(os.path.join(args[-1], "bin", "python"), "venv-python:" + os.path.abspath(args[-1]))
        sys.exit(0)
    if tool == "uv" and args[:2] == ["pip", "install"]:
        open(os.path.join(os.path.dirname(os.path.dirname(option("--python"))), "installed"), "w").close()
        sys.exit(0)
    if tool.startswith("venv-python:"):                    # the interpreter of a venv the script made
        installed = os.path.join(tool.split(":", 1)[1], "installed")
        if args[:1] == ["-c"]:                             # the readiness check
            sys.exit(0 if os.path.exists(installed) else 1)
        if args[:3] == ["-m", "pip", "install"]:
            time.sleep(1)
            open(installed, "w").close()
            sys.exit(0)
        if args[:2] in (["-m", "kindjax.main"], ["-m", "kindjax.sweep"]):
            # FAKE_RUN_PLAN: what attempt i of this worker does (finish, stop, lost, fail, slow)
            counter = os.path.join(os.environ.get("HOME", "."), "fake_attempts")
            attempt = len(open(counter).read()) if os.path.exists(counter) else 0
            open(counter, "a").write("x")
            plan = os.environ.get("FAKE_RUN_PLAN", "finish").split(",")
            what = plan[min(attempt, len(plan) - 1)]
            if what == "slow":                               # runs until the test releases it (FAKE_RELEASE)
                deadline = time.time() + 120
                while not os.path.exists(os.environ["FAKE_RELEASE"]) and time.time() < deadline:
                    time.sleep(0.05)
            if what == "stop":                               # saved on a stop request, as kindjax notes it
                open(os.environ["KINDJAX_STOP_FILE"], "w").write("SIGTERM: saved step 10\\n")
            if what == "lost":                               # the VM went away: the runner dies with it
                os.killpg(os.getpgid(0), 9)
            sys.exit(3 if what == "fail" else 0)
    sys.exit(f"fake {tool}: unexpected call {args}")
''')


def install_fakes(tmp_path, **env: str) -> dict[str, str]:
    """Fake tools first on PATH; returns the environment to run a script in."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "fake.py").write_text(FAKE)
    for name in ("sbatch", "srun", "gcloud", "python3", "pip"):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {bin_dir}/fake.py {name} "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    out = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "KINDJAX_"))}
    out.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_BIN=str(bin_dir), FAKE_LOG=str(tmp_path / "calls.jsonl"),
               FAKE_ROOT=str(tmp_path), **env)
    out.pop("XLA_FLAGS", None)
    return out


def calls(tmp_path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


OVERRIDES = ["--config.train.num_steps=10", "--config.data.root=/data/my images"]   # a space survives


def test_gpu_slurm_runs_one_process_on_every_gpu_of_every_node(tmp_path):
    env = install_fakes(tmp_path, KINDJAX_VENV=str(tmp_path / "venv"))
    submit = ["sbatch", "--nodes=2", "launch/gpu_slurm.sh", "configs/dit_xl.py", "/shared/runs/xl", *OVERRIDES]
    result = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    log = calls(tmp_path)
    options = next(c["options"] for c in log if c["tool"] == "sbatch-options")
    assert options["signal"] == "TERM@120" and options["ntasks-per-node"] == "8" and options["gpus-per-node"] == "8"
    assert options["exclusive"] == ""   # whole nodes; each task its share of the cores (96 / 8):
    assert [c["args"][:2] for c in log if c["tool"] == "srun"] == [["--kill-on-bad-exit=1", "--cpus-per-task=12"]]
    # The venv: created, installed with the CUDA extra, checked.
    assert [c["args"] for c in log if c["tool"] == "python3"] == [["-m", "venv", str(tmp_path / "venv")]]
    venv_calls = [c for c in log if c["tool"].startswith("venv-python:")]
    assert [c["args"] for c in venv_calls if "pip" in c["args"]] == [["-m", "pip", "install", "-q", "-e", ".[cuda]"]]
    runs = [c for c in venv_calls if c["args"][:2] == ["-m", "kindjax.main"]]
    assert len(runs) == 16
    gpus = []
    for run in runs:
        assert run["args"][2:] == ["--config", "configs/dit_xl.py", "--workdir", "/shared/runs/xl", *OVERRIDES]
        assert run["cwd"] == ROOT
        e = run["env"]
        assert "--xla_gpu_enable_latency_hiding_scheduler=true" in e["XLA_FLAGS"]
        assert e["NCCL_DEBUG"] == "WARN" and e["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
        args = init_arguments(e, Accelerators(gpus=8))
        assert args["cluster_detection_method"] == "slurm" and len(args["local_device_ids"]) == 1
        gpus.append((e["SLURM_NODEID"], args["local_device_ids"][0]))
    assert sorted(gpus) == sorted((str(n), g) for n in range(2) for g in range(8))   # each GPU once
    # Every XLA flag the script sets exists in this jaxlib (XLA aborts on an unknown one).
    check = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
                           env=dict(os.environ, XLA_FLAGS=runs[0]["env"]["XLA_FLAGS"], JAX_PLATFORMS="cpu"),
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
    # A second submission finds the venv ready: no second install.
    (tmp_path / "calls.jsonl").unlink()
    assert subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, timeout=120).returncode == 0
    again = calls(tmp_path)
    assert not [c for c in again if c["tool"] == "python3" or "pip" in c.get("args", [])]
    assert len([c for c in again if c.get("args", [])[:2] == ["-m", "kindjax.main"]]) == 16


def test_gpu_slurm_array_runs_one_sweep_shard_per_array_task(tmp_path):
    env = install_fakes(tmp_path, KINDJAX_VENV=str(tmp_path / "venv"), KINDJAX_MODULE="kindjax.sweep")
    submit = ["sbatch", "--nodes=1", "--array=0-2", "launch/gpu_slurm.sh", "configs/kind_dit_b.py", "/shared/sweep",
              "--methods=kind,lora"]
    result = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [c for c in calls(tmp_path) if c["tool"].startswith("venv-python:") and c["args"][:2] == ["-m", "kindjax.sweep"]]
    assert len(runs) == 3 * 8                                  # 3 array tasks × 8 GPU processes
    shards = sorted({(c["env"]["SLURM_ARRAY_TASK_ID"], tuple(c["args"][2:])) for c in runs})
    assert shards == [(str(i), ("--config", "configs/kind_dit_b.py", "--workdir", "/shared/sweep", "--shard", f"{i}/3",
                                "--methods=kind,lora")) for i in range(3)]
    assert not [c for c in calls(tmp_path) if c.get("args", [])[:2] == ["-m", "kindjax.main"]]
    # The 3 array tasks start together: one builds the shared venv, the others wait for it (a lock).
    log = calls(tmp_path)
    assert [c["args"] for c in log if c["tool"] == "python3"] == [["-m", "venv", str(tmp_path / "venv")]]
    assert len([c for c in log if c["tool"].startswith("venv-python:") and c["args"][:3] == ["-m", "pip", "install"]]) == 1


def test_gpu_slurm_stops_when_the_install_gives_no_cuda_jaxlib(tmp_path):
    env = install_fakes(tmp_path, KINDJAX_VENV=str(tmp_path / "venv"))
    fake = tmp_path / "fakebin" / "fake.py"   # pip "succeeds" but installs nothing
    fake.write_text(fake.read_text().replace('open(installed, "w").close()', 'pass'))
    result = subprocess.run(["sbatch", "launch/gpu_slurm.sh", "configs/dit_xl.py", "/w"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no CUDA jaxlib" in result.stderr
    assert not [c for c in calls(tmp_path) if c.get("args", [])[:2] == ["-m", "kindjax.main"]]


def tpu_env(tmp_path, **extra: str) -> dict[str, str]:
    settings = dict(TPU_NAME="my-v5p-32", ZONE="us-east5-a", WORKDIR="gs://bucket/run1", PROJECT="proj",
                    FAKE_TPU_WORKERS="4", KINDJAX_POLL_S="0.2")
    return install_fakes(tmp_path, **{**settings, **extra})


def worker_runs(tmp_path, w: int, module: str = "kindjax.main") -> list[dict]:
    return [c for c in calls(tmp_path) if c.get("env", {}).get("FAKE_WORKER") == str(w)
            and c["tool"].startswith("venv-python:") and c["args"][:2] == ["-m", module]]


def test_tpu_pod_puts_code_install_and_run_on_every_worker(tmp_path):
    ship = os.path.join(ROOT, "untracked_ship_test")   # an untracked directory the user names
    os.makedirs(os.path.join(ship, "sub"))
    try:
        with open(os.path.join(ship, "sub", "data.txt"), "w") as f:
            f.write("shipped\n")
        env = tpu_env(tmp_path, LIBTPU_INIT_ARGS="--xla_tpu_user_flag=1", KINDJAX_SHIP="untracked_ship_test")
        result = subprocess.run(["launch/tpu_pod.sh", *OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=300)
    finally:
        import shutil
        shutil.rmtree(ship)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tpu_pod.sh: the run finished on every worker." in result.stdout
    log = calls(tmp_path)
    for c in [c for c in log if c["tool"] == "gcloud" and c["args"][3] != "describe"]:   # describe: the pre-flight's
        assert "--worker=all" in c["args"] and c["args"][c["args"].index("--zone") + 1] == "us-east5-a"
        assert c["args"][c["args"].index("--project") + 1] == "proj"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for w in range(4):
        home = tmp_path / f"worker{w}"
        code = home / "kindjax"
        for path in ("kindjax/distributed.py", "launch/tpu_pod.sh", "pyproject.toml"):   # the code, as checked out
            assert (code / path).read_bytes() == open(os.path.join(ROOT, path), "rb").read(), path
        shipped = [str(p.relative_to(code)) for p in code.rglob("*") if p.is_file() and ".venv" not in p.parts]
        assert sorted(shipped) == sorted(tracked + ["untracked_ship_test/sub/data.txt"])
        mine = [c for c in log if c.get("env", {}).get("FAKE_WORKER") == str(w)]
        installs = [c for c in mine if c["tool"] == "uv" and c["args"][:2] == ["pip", "install"]]
        assert len(installs) == 1 and installs[0]["args"][-2:] == ["-e", ".[tpu]"] and installs[0]["cwd"] == str(code)
        runs = worker_runs(tmp_path, w)
        assert len(runs) == 1
        run = runs[0]
        assert run["args"][2:] == ["--config", "configs/dit_xl.py", "--workdir", "gs://bucket/run1", *OVERRIDES]
        assert run["cwd"] == str(code) and run["tool"] == f"venv-python:{code}/.venv"
        flags = run["env"]["LIBTPU_INIT_ARGS"].split()
        assert "--xla_tpu_enable_async_collective_fusion=true" in flags and flags[-1] == "--xla_tpu_user_flag=1"
        # Detached from the ssh session: its own session, with the worker's log and exit status.
        assert run["env"]["KINDJAX_STOP_FILE"] == str(home / "kindjax-run" / "stopped")
        assert (home / "kindjax-run" / "exit_code").read_text().strip() == "0"
        assert "start" in (home / "kindjax-run" / "worker.log").read_text()
        # On the worker (a GCE TPU VM: no TPU_WORKER_HOSTNAMES) kindjax asks JAX to find the pod.
        assert init_arguments(run["env"], Accelerators(tpus=4)) == {"cluster_detection_method": "gcetpu"}
    status = subprocess.run(["launch/tpu_pod.sh", "status"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.returncode == 0 and status.stdout.count(" finished 0") == 4, status.stdout + status.stderr


def test_tpu_pod_starts_the_run_again_after_a_preemption_or_a_lost_vm(tmp_path):
    """Attempt 1 saves on a stop request (a preemption notice, a maintenance event) on every worker,
    attempt 2 dies with its VM (no exit status), attempt 3 finishes: the launcher starts the same
    command three times and ends 0; with fewer retries allowed it stops, saying so."""
    env = tpu_env(tmp_path, FAKE_RUN_PLAN="stop,lost,finish")
    result = subprocess.run(["launch/tpu_pod.sh", *OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the run was stopped or lost (4 stopped); starting it again (1 of 3)" in result.stdout
    assert "the run was stopped or lost (4 lost); starting it again (2 of 3)" in result.stdout
    assert "the run finished on every worker" in result.stdout
    for w in range(4):
        runs = worker_runs(tmp_path, w)
        assert len(runs) == 3 and all(r["args"] == runs[0]["args"] for r in runs)
        assert (tmp_path / f"worker{w}" / "kindjax-run" / "worker.log").read_text().count("start") == 3


@pytest.mark.parametrize("plan, retries, says", [("fail", "3", "the run failed"),
                                                 ("stop", "1", "stopped or lost 2 times; not starting again")])
def test_tpu_pod_gives_up_on_a_failure_or_after_its_retries(tmp_path, plan, retries, says):
    env = tpu_env(tmp_path, FAKE_RUN_PLAN=plan, KINDJAX_RETRIES=retries)
    result = subprocess.run(["launch/tpu_pod.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and says in result.stderr, result.stdout + result.stderr
    assert len(worker_runs(tmp_path, 0)) == (1 if plan == "fail" else 2)


def test_tpu_pod_run_survives_the_launcher_hanging_up(tmp_path):
    """The launcher's terminal closes (SIGHUP to its process group) while the workers train: the runs,
    detached, go on and finish; `status` then says so, and `watch` ends at once."""
    import signal
    import time

    release = tmp_path / "release"
    env = tpu_env(tmp_path, FAKE_RUN_PLAN="slow", FAKE_TPU_WORKERS="2", FAKE_RELEASE=str(release))
    # As from a terminal: SIGHUP at its default (a suite started under nohup ignores it, and children inherit that).
    launcher = subprocess.Popen(["launch/tpu_pod.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(worker_runs(tmp_path, 1)) < 1:
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGHUP)
    launcher.wait(timeout=30)
    assert launcher.returncode != 0   # the launcher is gone ...
    release.touch()
    for w in range(2):                # ... the runs are not
        exit_code = tmp_path / f"worker{w}" / "kindjax-run" / "exit_code"
        while not exit_code.exists():
            assert time.time() < deadline
            time.sleep(0.1)
        assert exit_code.read_text().strip() == "0"
    status = subprocess.run(["launch/tpu_pod.sh", "status"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert status.stdout.count(" finished 0") == 2, status.stdout + status.stderr
    watch = subprocess.run(["launch/tpu_pod.sh", "watch"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert watch.returncode == 0 and "finished on every worker" in watch.stdout
    assert len(worker_runs(tmp_path, 0)) == 1


def test_tpu_pod_compiles_the_job_on_the_launching_host_first(tmp_path):
    env = install_fakes(tmp_path, TPU_NAME="my-v5p-32", ZONE="z", WORKDIR="gs://b/r", PROJECT="proj",
                        FAKE_TPU_WORKERS="2", FAKE_ACCELERATOR_TYPE="v5p-32", LIBTPU_INIT_ARGS="--xla_tpu_user_flag=1",
                        KINDJAX_POLL_S="0.2")
    result = subprocess.run(["launch/tpu_pod.sh", *OVERRIDES], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    log = calls(tmp_path)
    describe, preflight = log[0], log[1]
    assert describe["tool"] == "gcloud" and describe["args"][3:5] == ["describe", "my-v5p-32"]
    assert "--worker=all" not in describe["args"] and describe["args"][describe["args"].index("--project") + 1] == "proj"
    assert preflight["tool"] == "python3" and preflight["cwd"] == ROOT
    assert preflight["args"] == ["-m", "kindjax.tools.preflight", "--config", "configs/dit_xl.py", "--topology",
                                 "v5p-32", *OVERRIDES]
    worker_flags = next(c for c in log if c["tool"].startswith("venv-python:") and "kindjax.main" in c["args"])
    assert preflight["env"]["LIBTPU_INIT_ARGS"] == worker_flags["env"]["LIBTPU_INIT_ARGS"]   # the workers' XLA flags
    gcloud = [c["args"][3] for c in log if c["tool"] == "gcloud"]
    assert gcloud[:4] == ["describe", "scp", "ssh", "ssh"] and set(gcloud[4:]) == {"ssh"}   # then watching: ssh status


def test_tpu_pod_stops_when_the_job_does_not_compile_or_fit(tmp_path):
    env = install_fakes(tmp_path, TPU_NAME="my-v4-8", ZONE="z", WORKDIR="gs://b/r", FAKE_TPU_WORKERS="1",
                        FAKE_ACCELERATOR_TYPE="v4-8", FAKE_PREFLIGHT_RC="1", KINDJAX_POLL_S="0.2")
    result = subprocess.run(["launch/tpu_pod.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "does not compile or does not fit on my-v4-8 (v4-8)" in result.stderr and '"fits": false' in result.stdout
    assert [c["args"][3] for c in calls(tmp_path) if c["tool"] == "gcloud"] == ["describe"]   # nothing sent, nothing run
    # KINDJAX_PREFLIGHT=0 skips the check (a launching host without libtpu).
    (tmp_path / "calls.jsonl").unlink()
    env["KINDJAX_PREFLIGHT"] = "0"
    assert subprocess.run(["launch/tpu_pod.sh"], cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    log = calls(tmp_path)
    gcloud = [c["args"][3] for c in log if c["tool"] == "gcloud"]
    assert gcloud[:3] == ["scp", "ssh", "ssh"] and set(gcloud[3:]) == {"ssh"}
    assert not [c for c in log if c["args"][:2] == ["-m", "kindjax.tools.preflight"]]


def test_tpu_pod_runs_a_sweep_shard(tmp_path):
    env = install_fakes(tmp_path, TPU_NAME="v5p-8", ZONE="z", WORKDIR="gs://b/sweep", FAKE_TPU_WORKERS="1",
                        CONFIG="configs/kind_dit_l.py", KINDJAX_MODULE="kindjax.sweep", KINDJAX_SHARD="2/4",
                        KINDJAX_POLL_S="0.2")
    result = subprocess.run(["launch/tpu_pod.sh", "--seeds=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [c for c in calls(tmp_path) if c["tool"].startswith("venv-python:") and c["args"][:2] == ["-m", "kindjax.sweep"]]
    assert [c["args"][2:] for c in runs] == [["--config", "configs/kind_dit_l.py", "--workdir", "gs://b/sweep",
                                              "--shard", "2/4", "--seeds=1"]]
    preflights = [c["args"] for c in calls(tmp_path) if c["args"][:2] == ["-m", "kindjax.tools.preflight"]]
    assert preflights == [["-m", "kindjax.tools.preflight", "--config", "configs/kind_dit_l.py", "--topology",
                           "v5p-32"]]   # the sweep config's first run; --seeds is the sweep's flag


def test_tpu_pod_needs_its_settings(tmp_path):
    env = install_fakes(tmp_path, ZONE="z", WORKDIR="gs://b/r")
    result = subprocess.run(["launch/tpu_pod.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "TPU_NAME" in result.stderr and not calls(tmp_path)


def check_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device, as one GPU
    env.update({"JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, **extra})
    return env


@pytest.mark.slow
def test_device_check_writes_the_figures_and_logs(tmp_path):
    """The GPU script, run on the CPU with the tiny sizes: the JSON, the logs, the exit status."""
    out = tmp_path / "out"
    result = subprocess.run(["launch/device_check.sh", str(out), "--accel_size", "tiny", "--accel_steps", "1",
                             "--accel_sample_steps", "1"], cwd=ROOT, env=check_env(KINDJAX_CHECK_PLATFORM="cpu"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr + (out / "bench.log").read_text()[-3000:]
    figures = json.loads((out / "accelerator.json").read_text())
    assert figures["suite"] == "accelerator" and figures["num_devices"] == 1
    assert figures["train"][0]["step_s"] > 0 and figures["sampling"]["steps"] == 1
    assert json.loads((out / "bench.log").read_text().strip().splitlines()[-1]) == figures
    assert "jax 0.10.2" in (out / "environment.txt").read_text()
    assert (out / "attention.log").exists() and "bench exit 0" in (out / "summary.txt").read_text()


@pytest.mark.parametrize("last_line, bench_rc, want_rc", [('{"suite": "accelerator", "num_devices": 1}', 0, 0),
                                                          pytest.param("Traceback: out of time", 124, 124,
                                                                       marks=pytest.mark.slow),
                                                          pytest.param("not the figures", 0, 1, marks=pytest.mark.slow)])
def test_device_check_plumbing(tmp_path, last_line, bench_rc, want_rc):
    """The script around the bench (the bench itself: tests/test_bench.py): flags passed on, the last line
    kept as accelerator.json, the bench's exit status returned, a run without figures an error."""
    fake = tmp_path / "python"
    fake.write_text(f'''#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "kindjax.tools.bench" ]; then
  echo "$@" > {tmp_path}/bench_args; echo "measuring"; echo '{last_line}'; exit {bench_rc}
fi
exec {sys.executable} "$@"
''')
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["launch/device_check.sh", str(out), "--accel_steps", "3"], cwd=ROOT, text=True,
                            env=check_env(KINDJAX_CHECK_PLATFORM="cpu", PYTHON=str(fake)), capture_output=True,
                            timeout=300)
    assert result.returncode == want_rc, result.stdout + result.stderr
    assert (tmp_path / "bench_args").read_text().split() == ["-m", "kindjax.tools.bench", "--suite", "accelerator",
                                                             "--accel_steps", "3"]
    assert (out / "bench.log").read_text().splitlines() == ["measuring", last_line]
    assert f"bench exit {want_rc}" in (out / "summary.txt").read_text()
    if want_rc == 0:
        assert json.loads((out / "accelerator.json").read_text()) == json.loads(last_line)
    else:
        assert not (out / "accelerator.json").exists()


def test_device_check_refuses_a_cpu_only_jax(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["launch/device_check.sh", str(out)], cwd=ROOT, env=check_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "JAX does not run on the gpu" in result.stderr
    assert not (out / "bench.log").exists()
