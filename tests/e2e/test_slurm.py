"""The launchers on a real SLURM cluster started on this machine (slurm/local_cluster.sh: one
slurmctld, two slurmd "nodes"): a 2-node sbatch job trains and exports, and the preemption drill
(USR2 after the first checkpoint -> checkpoint, requeue, resume) ends with the weights of an
uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support import REPO

STATE = Path("/tmp/mmloom-slurm-tests")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("needs slurm-wlm and munge, or root to install them")
    env = {
        **os.environ,
        "MMLOOM_SLURM_DIR": str(STATE),
        "MMLOOM_SLURMCTLD_PORT": "6917",
        "MMLOOM_SLURMD_PORT1": "6918",
        "MMLOOM_SLURMD_PORT2": "6919",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "local_cluster.sh"), "start", "--clean"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield {
        **env,
        "SLURM_CONF": str(STATE / "slurm.conf"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop"], env=env, timeout=60)


def sbatch(env: dict, cwd: Path, tiny, shards: Path, run_dir: Path, *extra: str, wait: bool = True) -> str:
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes",
        "2",
        *(["--wait"] if wait else []),
        str(REPO / "slurm" / "train.sbatch"),
        str(REPO / "configs" / "tiny-llava.yaml"),
        f"model.path={tiny('llava')}",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "data.workers=0",
        "train.steps=8",
        "checkpoint.every=2",
        "checkpoint.keep=4",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr + log(cwd)[-4000:]
    return proc.stdout.strip().split(";")[0]


def log(cwd: Path) -> str:
    return "\n".join(p.read_text() for p in cwd.glob("slurm-mmloom-*.out"))


def squeue_state(env: dict, job: str) -> tuple[str, str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True)
    return tuple((out.stdout.split() + ["", ""])[:2])  # type: ignore[return-value]


def preempt_and_wait(env: dict, job: str) -> None:
    """The preemption signal, then wait until the requeued job has finished."""
    subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        state, reason = squeue_state(env, job)
        if not state:
            return
        if state == "PENDING" and reason == "BeginTime":
            # A requeued job waits a while before it may start again; a test need not wait that long,
            # but some: slurmd revoked the job's old credential, to the second, and refuses a new one
            # issued within that second ("Job credential revoked", and the job ends).
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env)
        time.sleep(1)


def test_two_node_job_trains_and_exports(slurm, tiny, stream_shards: Path, tmp_path: Path) -> None:
    sbatch(slurm, tmp_path, tiny, stream_shards, tmp_path / "run")
    text = log(tmp_path)
    assert "2 nodes x 1 ranks" in text and '"steps": 8' in text
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


def test_preemption_drill_resumes_to_the_same_weights(
    slurm, tiny, stream_shards: Path, tmp_path: Path
) -> None:
    straight, drill = tmp_path / "straight", tmp_path / "drill"
    straight.mkdir()
    drill.mkdir()
    sbatch(slurm, straight, tiny, stream_shards, straight / "run")
    job = sbatch(slurm, drill, tiny, stream_shards, drill / "run", wait=False)
    first = drill / "run" / "checkpoints" / "step-2"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert first.exists(), log(drill)[-4000:]
    preempt_and_wait(slurm, job)
    text = log(drill)
    assert "requeueing" in text and "restart 1" in text and "resumed from" in text, text[-4000:]
    a = load_file(straight / "run" / "hf" / "model.safetensors")
    b = load_file(drill / "run" / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_launch_py_submits_with_submitit_and_waits(slurm, tiny, stream_shards: Path, tmp_path: Path) -> None:
    args = [
        sys.executable,
        str(REPO / "launch.py"),
        "--config",
        str(REPO / "configs" / "tiny-llava.yaml"),
        f"model.path={tiny('llava')}",
        f"data.shards={stream_shards}",
        f"run.dir={tmp_path / 'run'}",
        "data.workers=0",
        "train.steps=4",
        "checkpoint.every=0",
    ]
    dry = subprocess.run(
        [*args[:2], "--nodes", "2", "--dry-run", *args[2:]],
        env=slurm,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0 and "'nodes': 2" in dry.stdout and "torch.distributed.run" in dry.stdout
    bad = subprocess.run(
        [*args, "train.grad_accum=0"], env=slurm, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "train.grad_accum must be >= 1" in bad.stderr
    proc = subprocess.run(
        [*args[:2], "--nodes", "2", "--wait", "--time", "20", *args[2:]],
        env=slurm,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.split()[0]
    assert f"job {job} completed" in proc.stdout
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "submitit").glob("*_log.out"))
    assert "node 0/2" in logs and "node 1/2" in logs


def test_launch_py_local_runs_torchrun_here(tiny, stream_shards: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "--local",
            "--nproc-per-node",
            "2",
            "--config",
            str(REPO / "configs" / "tiny-llava.yaml"),
            f"model.path={tiny('llava')}",
            f"data.shards={stream_shards}",
            f"run.dir={tmp_path / 'run'}",
            "data.workers=0",
            "train.steps=2",
            "checkpoint.every=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"steps": 2' in proc.stdout and (tmp_path / "run" / "hf" / "model.safetensors").is_file()


def rank_process(rank: int) -> int | None:
    """PID of the training process of this global rank (a torchrun worker on this machine)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"trainer.train" in cmdline
            and f"RANK={rank}".encode() in environ
            and b"torch.distributed.run" not in cmdline
        ):
            return int(proc.name)
    return None


def test_a_dead_rank_ends_the_job_quickly(slurm, tiny, stream_shards: Path, tmp_path: Path) -> None:
    job = sbatch(slurm, tmp_path, tiny, stream_shards, tmp_path / "run", "train.steps=200", wait=False)
    first = tmp_path / "run" / "checkpoints" / "step-2"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline:
        time.sleep(0.2)
    pid = rank_process(1)
    assert first.exists() and pid, log(tmp_path)[-3000:]
    os.kill(pid, 9)
    killed = time.time()
    while squeue_state(slurm, job)[0] and time.time() - killed < 300:
        time.sleep(1)
    assert time.time() - killed < 120, "the job outlived its dead rank"
    text = log(tmp_path)
    assert "rank      : 1 (local_rank: 0)" in text and "SIGKILL" in text, text[-3000:]
    assert not (tmp_path / "run" / "hf").exists()


def test_sharding_as_array_tasks_is_byte_identical(slurm, media, tmp_path: Path) -> None:
    from tests.support.shards import build_dataset

    data_txt = build_dataset(tmp_path / "data", media)
    single, spread = tmp_path / "single", tmp_path / "spread"
    script = str(REPO / "data_tools" / "shard.py")
    common = ["--workers", "1", "--shard-samples", "4", "-q"]
    subprocess.run(
        [sys.executable, script, str(data_txt), "--out", str(single), *common],
        env=slurm,
        check=True,
        capture_output=True,
        timeout=600,
    )
    proc = subprocess.run(
        [
            sys.executable,
            script,
            str(data_txt),
            "--out",
            str(spread),
            *common,
            "--slurm-tasks",
            "3",
            "--wait",
        ],
        env=slurm,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(3 tasks)" in proc.stdout

    def tree(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".shard.lock"
        }

    a, b = tree(single), tree(spread)
    assert sorted(a) == sorted(b) and len([k for k in a if k.endswith(".tar")]) == 12
    assert all(a[k] == b[k] for k in a)
    assert not (spread / ".tasks").exists()


def test_launch_py_preemption_requeues_and_resumes(slurm, tiny, stream_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch.py"),
            "--nodes",
            "2",
            "--time",
            "30",
            "--config",
            str(REPO / "configs" / "tiny-llava.yaml"),
            f"model.path={tiny('llava')}",
            f"data.shards={stream_shards}",
            f"run.dir={run}",
            "data.workers=0",
            "train.steps=8",
            "checkpoint.every=2",
        ],
        env=slurm,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[-1]
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-2").exists() and time.time() < deadline:
        time.sleep(0.2)
    preempt_and_wait(slurm, job)
    logs = "".join(p.read_text() for p in (run / "submitit").glob("*_log.*"))
    assert "preemption signal received" in logs and "resumed from" in logs and '"steps": 8' in logs, logs[
        -3000:
    ]
    assert (run / "hf" / "model.safetensors").is_file()
