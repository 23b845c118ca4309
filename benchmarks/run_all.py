"""The CPU benchmark suite: runs each benchmark in its own process and prints every JSON line.

    python benchmarks/run_all.py            # the figures in docs/performance.md (about 8 minutes on 2 cores)
    python benchmarks/run_all.py --quick    # tiny settings, about a minute: checks the suite runs

The first line describes the machine (CPUs, load average, date, versions); then one line per
benchmark, in order: packing, loader, train, shard, resume, video_decode, mixing (its summary line;
run benchmarks/mixing.py itself for one line per world size), memory (its summary line: predicted
per-GPU memory of the real model sizes; benchmarks/memory.py prints one line per configuration). A
benchmark that fails prints {"benchmark": name, "error": ...} and the suite exits 1 after the others
have run. The GPU suite (benchmarks/gpu/mfu.py) is separate: run it on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SUITE: dict[str, tuple[list[str], list[str]]] = {  # name: (full arguments, --quick arguments)
    "packing": ([], ["--samples", "5000"]),
    "loader": ([], ["--samples", "40", "--images", "12", "--workers", "0", "--trials", "1"]),
    "train": ([], ["--samples", "8", "--trials", "1", "--overhead-repeats", "1"]),
    "shard": ([], ["--images", "40", "--text", "2000", "--workers", "1"]),
    "resume": (
        [],
        ["--distinct", "300", "--workers", "0", "--trials", "1", "--max-tokens", "2048", "--no-fresh"],
    ),
    "video_decode": ([], ["--repeats", "1"]),
    "mixing": ([], ["--ranks", "1", "8", "--scale", "0.1", "--seeds", "1"]),
    "memory": ([], []),  # meta-device models: seconds either way
}


def machine() -> dict:
    import torch

    return {
        "benchmark": "machine",
        "cpus": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that every benchmark runs")
    p.add_argument("--only", nargs="+", choices=list(SUITE), help="run only these")
    args = p.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(json.dumps({**machine(), "quick": args.quick}), flush=True)
    failed = False
    for name, (full, quick) in SUITE.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *(quick if args.quick else full)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            line = json.loads(lines[-1])
            line["seconds"] = round(time.perf_counter() - start, 1)
        else:
            failed = True
            line = {"benchmark": name, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        print(json.dumps(line), flush=True)
    print(
        json.dumps({"benchmark": "machine_after", "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
