"""Every decision of ``kindjax.distributed`` (environment in, the arguments of
``jax.distributed.initialize`` out, checked through JAX's own cluster detection where JAX fills in
the rest), the accelerator probe and the CPU-fallback warning, the topology-aware mesh, and a real
two-process job started through ``JAX_COORDINATOR_ADDRESS`` on a two-slice (DCN) mesh."""
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax._src import clusters   # what jax.distributed.initialize calls to fill unset arguments

from conftest import ROOT, tiny_config
from kindjax import distributed, sharding
from kindjax.config import ConfigError
from kindjax.distributed import Accelerators, init_arguments

GPU_NODE = Accelerators(gpus=8)
TPU_VM = Accelerators(tpus=4)
EIGHT = ",".join(map(str, range(8)))


def slurm(procid: int, ntasks: int, tasks_per_node: str, nodeid: int, localid: int, **extra: str) -> dict[str, str]:
    """The variables ``srun`` sets in one task (those JAX and kindjax read)."""
    return dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[001-002]", SLURM_NTASKS=str(ntasks),
                SLURM_PROCID=str(procid), SLURM_LOCALID=str(localid), SLURM_NODEID=str(nodeid),
                SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE=tasks_per_node, **extra)


def jax_fills_in(monkeypatch, env: dict[str, str], args: dict | None) -> tuple:
    """(coordinator, num_processes, process_id, local_device_ids) that jax.distributed.initialize(**args)
    would use in ``env``: our arguments, the rest from JAX's cluster detection."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR", "TPU_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = dict(args or {})
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        args.get("coordinator_address"), args.get("num_processes"), args.get("process_id"),
        args.get("local_device_ids"), args.get("cluster_detection_method"), 300)


def test_one_host_does_not_initialize():
    assert init_arguments({}, Accelerators()) is None
    assert init_arguments({}, GPU_NODE) is None                       # 8 GPUs, one process: no job to join
    assert init_arguments({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1",
                           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, GPU_NODE) is None
    assert init_arguments({"OMPI_COMM_WORLD_SIZE": "1"}, GPU_NODE) is None


def test_gce_tpu_vm_finds_the_pod_from_metadata():
    """No TPU_WORKER_HOSTNAMES on GCE: JAX must be asked to initialize (it reads the metadata server)."""
    assert init_arguments({}, TPU_VM) == {"cluster_detection_method": "gcetpu"}
    assert init_arguments({"TPU_SKIP_MDS_QUERY": "1"}, TPU_VM) is None   # no metadata server: one process


def test_gke_finds_the_pod_from_worker_hostnames():
    env = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "2"}
    assert init_arguments(env, TPU_VM) == {"cluster_detection_method": "gketpu"}
    assert init_arguments({"TPU_WORKER_HOSTNAMES": "w-0"}, TPU_VM) == {"cluster_detection_method": "gketpu"}
    assert init_arguments(env, Accelerators()) is None                # hostnames but no TPU: not a TPU VM


def test_slurm_one_task_per_node_uses_all_eight_gpus(monkeypatch):
    """The fault of JAX alone: one task per node would see only GPU SLURM_LOCALID = 0."""
    env = slurm(procid=1, ntasks=2, tasks_per_node="1(x2)", nodeid=1, localid=0, CUDA_VISIBLE_DEVICES=EIGHT)
    args = init_arguments(env, GPU_NODE)
    assert args == {"cluster_detection_method": "slurm", "local_device_ids": list(range(8))}
    port = 4242 % 4096 + 65535 - 4095
    assert jax_fills_in(monkeypatch, env, args) == (f"gpu001:{port}", 2, 1, list(range(8)))
    assert jax_fills_in(monkeypatch, env, None)[3] == [0]             # what JAX alone would have done


@pytest.mark.parametrize("localid", [0, 3, 7])
def test_slurm_one_task_per_gpu(monkeypatch, localid):
    """launch/gpu_slurm.sh: 8 tasks per node, each sees the node's 8 GPUs and takes GPU SLURM_LOCALID."""
    env = slurm(procid=8 + localid, ntasks=16, tasks_per_node="8(x2)", nodeid=1, localid=localid,
                CUDA_VISIBLE_DEVICES=EIGHT)
    args = init_arguments(env, GPU_NODE)
    assert args == {"cluster_detection_method": "slurm", "local_device_ids": [localid]}
    assert jax_fills_in(monkeypatch, env, args)[1:] == (16, 8 + localid, [localid])
    # No CUDA_VISIBLE_DEVICES: the node's /dev/nvidia* count.
    del env["CUDA_VISIBLE_DEVICES"]
    assert init_arguments(env, GPU_NODE)["local_device_ids"] == [localid]


def test_slurm_gpus_bound_per_task():
    """--gpus-per-task=1: SLURM gives each task its own GPU, which the task sees as its only one."""
    env = slurm(procid=5, ntasks=16, tasks_per_node="8(x2)", nodeid=0, localid=5,
                SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES="5")
    assert init_arguments(env, GPU_NODE)["local_device_ids"] == [0]


def test_slurm_shares_and_mismatches():
    env = slurm(procid=3, ntasks=4, tasks_per_node="2(x2)", nodeid=1, localid=1, CUDA_VISIBLE_DEVICES=EIGHT)
    assert init_arguments(env, GPU_NODE)["local_device_ids"] == [4, 5, 6, 7]
    env = slurm(procid=2, ntasks=4, tasks_per_node="3,1", nodeid=0, localid=2, CUDA_VISIBLE_DEVICES=EIGHT)
    with pytest.raises(ValueError, match="cannot share its 8 GPUs"):
        init_arguments(env, GPU_NODE)
    env = slurm(procid=3, ntasks=4, tasks_per_node="3,1", nodeid=1, localid=0, CUDA_VISIBLE_DEVICES=EIGHT)
    assert init_arguments(env, GPU_NODE)["local_device_ids"] == list(range(8))   # alone on the second node
    # A CPU SLURM job (tests/test_multiprocess.py): no GPU to choose, JAX's defaults.
    env = slurm(procid=1, ntasks=2, tasks_per_node="2", nodeid=0, localid=1)
    assert init_arguments(env, Accelerators()) == {"cluster_detection_method": "slurm", "local_device_ids": None}


def test_tasks_per_node_spec():
    assert distributed.slurm_tasks_on_node({"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}) == 1
    assert distributed.slurm_tasks_on_node({"SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}) == 2
    assert distributed.slurm_tasks_on_node({"SLURM_NTASKS_PER_NODE": "4"}) == 4
    with pytest.raises(ValueError, match="tasks per node"):
        distributed.slurm_tasks_on_node({"SLURM_STEP_TASKS_PER_NODE": "eight"})


def test_coordinator_address(monkeypatch):
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    args = init_arguments(env, GPU_NODE)
    assert args == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        init_arguments({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, GPU_NODE)
    with pytest.raises(ValueError, match="both"):
        init_arguments({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, GPU_NODE)
    # Under SLURM, the address is ours and the rest SLURM's.
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
           **slurm(procid=9, ntasks=16, tasks_per_node="8(x2)", nodeid=1, localid=1, CUDA_VISIBLE_DEVICES=EIGHT)}
    args = init_arguments(env, GPU_NODE)
    assert args["coordinator_address"] == "10.0.0.1:1234" and args["local_device_ids"] == [1]
    assert jax_fills_in(monkeypatch, env, args) == ("10.0.0.1:1234", 16, 9, [1])


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "6"}
    assert init_arguments(env, GPU_NODE) == {"cluster_detection_method": "ompi", "local_device_ids": [6]}


def fake_machine(root, nvidia: int = 0, accel: int = 0, google_pci: int = 0):
    dev = root / "dev"
    dev.mkdir(parents=True)
    for name in [f"nvidia{i}" for i in range(nvidia)] + [f"accel{i}" for i in range(accel)]:
        (dev / name).touch()
    if nvidia:
        for name in ("nvidiactl", "nvidia-uvm", "nvidia-modeset"):   # not GPUs
            (dev / name).touch()
    for i, vendor in enumerate(["0x1ae0"] * google_pci + ["0x10de", "0x8086"]):
        pci = root / "sys" / "bus" / "pci" / "devices" / f"0000:00:{i:02x}.0"
        pci.mkdir(parents=True)
        (pci / "vendor").write_text(vendor + "\n")
    return str(root)


def test_visible_accelerators(tmp_path):
    assert distributed.visible_accelerators(fake_machine(tmp_path / "a", nvidia=4)) == Accelerators(gpus=4)
    assert distributed.visible_accelerators(fake_machine(tmp_path / "b", accel=4)) == Accelerators(tpus=4)
    assert distributed.visible_accelerators(fake_machine(tmp_path / "c", google_pci=8)) == Accelerators(tpus=8)
    assert distributed.visible_accelerators(fake_machine(tmp_path / "d")) == Accelerators()


def test_cpu_fallback_warning_names_the_install():
    gpu = distributed.cpu_fallback_warning("cpu", GPU_NODE, {})
    assert "8 NVIDIA GPU(s)" in gpu and "pip install -e '.[cuda]'" in gpu and "\n" not in gpu
    assert "pip install -e '.[tpu]'" in distributed.cpu_fallback_warning("cpu", TPU_VM, {"JAX_PLATFORMS": ""})
    assert distributed.cpu_fallback_warning("gpu", GPU_NODE, {}) is None          # JAX uses it
    assert distributed.cpu_fallback_warning("tpu", TPU_VM, {}) is None
    assert distributed.cpu_fallback_warning("cpu", Accelerators(), {}) is None    # nothing to use
    assert distributed.cpu_fallback_warning("cpu", GPU_NODE, {"JAX_PLATFORMS": "cpu"}) is None   # asked for
    assert "'.[cuda]'" in distributed.cpu_fallback_warning("cpu", GPU_NODE, {"JAX_PLATFORMS": "cuda,cpu"})


def test_training_start_warns_when_a_gpu_sits_idle(monkeypatch, capsys, tmp_path):
    """kindjax.train.stages.run (what python -m kindjax.main runs) prints the warning first."""
    from kindjax.train import stages as run

    monkeypatch.setattr(distributed, "visible_accelerators", lambda root="/": GPU_NODE)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    config = tiny_config()
    config.job = "no_such_job"                      # stops at validation, right after the warning
    with pytest.raises(ConfigError):
        run.run(config, str(tmp_path))
    assert "pip install -e '.[cuda]'" in capsys.readouterr().err


def fake_devices(processes: int, per_process: int, slices: int | None = None) -> list:
    """Device-like records as mesh_utils reads them (CPU platform: laid out in the order given)."""
    per_slice = processes * per_process // (slices or 1)
    out = []
    for i in range(processes * per_process):
        extra = {} if slices is None else {"slice_index": i // per_slice}
        out.append(SimpleNamespace(id=i, process_index=i // per_process, platform="cpu", device_kind="cpu", **extra))
    return out


def test_mesh_blocks_follow_nodes_and_slices():
    # 4 processes of 2 GPUs on 2 nodes (dcn 2): each half of the data axis is one node's processes.
    grid = sharding.device_grid(fake_devices(4, 2), data=8, fsdp=1, dcn_data=2)
    assert [d.process_index for d in grid[:, 0]] == [0, 0, 1, 1, 2, 2, 3, 3]
    grid = sharding.device_grid(fake_devices(4, 2), data=4, fsdp=2, dcn_data=2)
    assert [{d.process_index for d in row} for row in grid] == [{0}, {1}, {2}, {3}]   # fsdp inside a process
    # Two TPU slices whose devices come interleaved: grouped by slice, not by position.
    devices = fake_devices(8, 1, slices=2)
    devices = devices[::2] + devices[1::2]
    grid = sharding.device_grid(devices, data=4, fsdp=2, dcn_data=2)
    assert [{d.slice_index for d in row} for row in grid] == [{0}, {0}, {1}, {1}]
    with pytest.raises(ValueError, match="dcn_data=3"):
        sharding.device_grid(fake_devices(4, 2), data=8, fsdp=1, dcn_data=3)
    with pytest.raises(ValueError, match="form 1 group"):
        sharding.device_grid(fake_devices(1, 8), data=8, fsdp=1, dcn_data=2)


def test_make_mesh_on_the_eight_cpu_devices():
    mesh = sharding.make_mesh(4, 2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2} and mesh.devices.size == 8
    assert sorted(d.id for d in mesh.devices.flat) == [d.id for d in jax.devices()]
    assert sharding.make_mesh(devices=jax.devices()[:1]).devices.shape == (1, 1)
    config = tiny_config()
    config.mesh.update(data=4, dcn_data=3)
    with pytest.raises(ConfigError, match="mesh.dcn_data=3"):
        from kindjax.config import validate

        validate(config, 8)


TWO_PROCESS_JOB = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from kindjax import distributed, sharding
    distributed.initialize()
    mesh = sharding.make_mesh(data=-1, fsdp=1, dcn_data=2)
    rows = [sorted({d.process_index for d in row}) for row in mesh.devices]
    x = sharding.put_global(np.arange(8.0), sharding.batch_sharding(mesh))
    total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(x)
    print("RESULT", jax.process_index(), jax.process_count(), rows, float(total), flush=True)
""")


def test_two_processes_through_the_coordinator_address_on_a_two_node_mesh():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-c", TWO_PROCESS_JOB], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for pid, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, out[-3000:]
        result = [line for line in out.splitlines() if line.startswith("RESULT")]
        assert result == [f"RESULT {pid} 2 [[0], [0], [0], [0], [1], [1], [1], [1]] {float(np.arange(8.0).sum())}"]
