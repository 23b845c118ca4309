"""Launch training on SLURM with submitit, or on this machine.

    python launch.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
        --config C.yaml [key=value ...]
    python launch.py --nodes 2 --wait --config configs/tiny-llava.yaml        # CPU nodes, 1 rank each
    python launch.py --local --nproc-per-node 2 --config configs/tiny-llava.yaml
    python launch.py --nodes 2 --dry-run --config C.yaml                      # print what would run

One task per node runs `torchrun` for that node; the nodes meet at a c10d rendezvous on the first
node. Before the time limit (`--signal-margin` seconds before, or on `scancel --signal=USR2`) every
rank checkpoints at the next step and submitit requeues the job, which resumes from that checkpoint.
A preemption by SIGTERM is handled the same way within `--grace` seconds. Logs: run.dir/submitit/.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent


def parse_time(text: str) -> int:
    """'90' (minutes), '1:30:00' or '2-00:00:00' -> minutes."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    else:
        h, m, s = ([0] * (3 - len(parts)) + parts)[-3:]
        minutes = h * 60 + m + (s > 0)
    return (int(days) if days else 0) * 24 * 60 + minutes


def head_address() -> str:
    """The first node of the allocation, as an address other nodes can reach (its NodeAddr)."""
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    info = subprocess.run(["scontrol", "show", "node", nodes[0], "-o"], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
    return fields.get("NodeAddr", nodes[0])


def torchrun_command(
    config: str, overrides: list[str], nnodes: int, nproc: int, node_rank: int, endpoint: str, run_id: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(nproc),
        "--node-rank",
        str(node_rank),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        run_id,
        "-m",
        "trainer.train",
        "--config",
        config,
        *overrides,
    ]


def _ignore_usr2() -> None:
    # torchrun's agent ignores the preemption signal; the training ranks install their own handler.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainJob:
    """What submitit runs on each node: this node's torchrun, checkpointable."""

    def __init__(self, config: str, overrides: list[str], gpus_per_node: int, grace: int = 120) -> None:
        self.config, self.overrides, self.gpus_per_node, self.grace = config, overrides, gpus_per_node, grace
        self.proc: subprocess.Popen | None = None
        self.marker: Path | None = None

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        port = 20000 + int(env.job_id.split("_")[0]) % 20000
        cmd = torchrun_command(
            self.config,
            self.overrides,
            env.num_nodes,
            max(1, self.gpus_per_node),
            env.node,
            f"{head_address()}:{port}",
            env.job_id,
        )
        print(f"node {env.node}/{env.num_nodes}: {' '.join(cmd)}", flush=True)
        # The trainer leaves this file when it checkpointed because of the signal; only then is
        # the job requeued (a signal arriving after training finished must not restart it).
        self.marker = Path(os.environ.get("SLURM_SUBMIT_DIR", ".")) / f".mmloom-requeue-{env.job_id}"
        self.marker.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            preexec_fn=_ignore_usr2,
            env={
                **os.environ,
                "MMLOOM_REQUEUE_FILE": str(self.marker),
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(self.grace),
            },
        )
        # poll, not wait(): submitit's signal handler calls checkpoint(), which polls too, and
        # Popen.wait holds a lock that a handler running on top of it could never take.
        while self.proc.poll() is None:
            time.sleep(1)
        if self.proc.returncode:
            raise RuntimeError(
                f"torchrun on node {env.node} exited with {self.proc.returncode}; see the log above"
            )
        return 0

    def checkpoint(self, *args, **kwargs):
        import submitit

        # The training ranks got the same signal: let them write their checkpoint and exit first.
        deadline = time.time() + 600
        while self.proc is not None and self.proc.poll() is None and time.time() < deadline:
            time.sleep(1)
        if self.marker is None or not self.marker.exists():
            return None  # finished (or failed) anyway: do not requeue
        self.marker.unlink()
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config, self.overrides, self.gpus_per_node, self.grace)
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python launch.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU nodes, one gloo rank each")
    p.add_argument("--nproc-per-node", type=int, default=None, help="with --local: ranks on this machine")
    p.add_argument("--partition", default=None, help="default: the cluster's default partition")
    p.add_argument("--time", default="4:00:00", help="time limit, e.g. 90 (minutes) or 24:00:00")
    p.add_argument(
        "--signal-margin",
        type=int,
        default=120,
        metavar="S",
        help="SIGUSR2 S seconds before the time limit: enough for a step and a checkpoint",
    )
    p.add_argument(
        "--grace",
        type=int,
        default=120,
        metavar="S",
        help="after a SIGTERM (preemption), S seconds for the ranks to checkpoint before torchrun "
        "kills them: the cluster's GraceTime",
    )
    p.add_argument("--cpus-per-node", type=int, default=None)
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    p.add_argument("--local", action="store_true", help="run torchrun on this machine instead of SLURM")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from trainer.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)  # bad configs fail here, before any job
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    config = str(Path(args.config).resolve())

    if args.local:
        nproc = args.nproc_per_node or max(1, args.gpus_per_node)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "trainer.train",
            "--config",
            config,
            *args.overrides,
        ]
        if args.dry_run:
            print(" ".join(cmd))
            return 0
        return subprocess.call(cmd, cwd=REPO)

    import submitit

    folder = Path(cfg.run.dir).resolve() / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # --kill-on-bad-exit: a node whose torchrun fails ends the whole job at once, instead of the
    # other nodes waiting in a collective until its timeout.
    params = dict(
        nodes=args.nodes,
        tasks_per_node=1,
        timeout_min=parse_time(args.time),
        name="mmloom",
        slurm_signal_delay_s=args.signal_margin,
        slurm_additional_parameters={"requeue": True},
        slurm_srun_args=["--kill-on-bad-exit=1"],
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_node:
        params["cpus_per_task"] = args.cpus_per_node
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    job_fn = TrainJob(config, args.overrides, args.gpus_per_node, args.grace)
    if args.dry_run:
        print(f"submitit folder {folder}: {params}")
        print(
            " ".join(
                torchrun_command(
                    config,
                    args.overrides,
                    args.nodes,
                    max(1, args.gpus_per_node),
                    0,
                    "<head node>:<port>",
                    "<job id>",
                )
            )
        )
        return 0
    job = executor.submit(job_fn)
    print(job.job_id, flush=True)
    if not args.wait:
        return 0
    import logging

    # Clusters without accounting (sacct) make submitit warn at every poll; the results still come.
    logging.getLogger("submitit").setLevel(logging.ERROR)
    try:
        job.results()
    except Exception as e:  # noqa: BLE001 - report, and exit non-zero like the job did
        print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
