"""One-shot GPU check of mmloom on one H100, under 9 minutes: one JSON line per stage, then a summary.

On the device machine, from the repository root (the working tree travels; carry `.gpu-deps`,
written here beforehand by `--pack-deps`, for the pure-Python packages that machine lacks:
webdataset, braceexpand, torchdata, num2words, docopt):

    python3 benchmarks/gpu/validate.py --timeout-s 480 --out $OUT/validate.jsonl

(as the device tool's command: a limit of 560 s or more; nothing else needs carrying or building).

Here:
    python benchmarks/gpu/validate.py --pack-deps          # .gpu-deps/ (git-ignored): zips of those
    python benchmarks/gpu/validate.py --smoke              # every stage on CPU, tiny sizes (2-3 min)
    python benchmarks/gpu/validate.py --stages env oracle  # some stages only

Each stage runs in a subprocess of its own under its own time limit (its share of --timeout-s, plus
what earlier stages left unused), so a hung CUDA call cannot stall the rest: at the limit its process
group is killed and whatever it had printed is its result. A stage that fails, errs or runs out of
time is a result ("status"), never a crash; the summary line always follows. The machine's own
torch and transformers are used (older ones have been seen there: torch 2.11, transformers 5.17),
with the zips in .gpu-deps ahead of them on the path.

Stages:
1. env: versions (torch, transformers, peft, flash-attn, ...), which modules import, the GPU, its
   memory and bf16 peak, whether flash-attn is installed and torch's varlen_attn runs (checked
   against per-sample SDPA on a 3-sample row).
2. oracle: packed loss == sum of per-sample losses in bf16 (relative difference <= ORACLE_TOL) with
   the trainer's own micro_batch_loss, for llava, qwen2_5_vl, mllama, gemma3, qwen3_vl_moe (how its
   experts run: grouped_mm where torch has it) and qwen3_5 (Gated DeltaNet) (tiny random-weight
   builds), on every attention backend that can run here (mmloom_varlen and flash_attention_2 on
   CUDA, mmloom_packed, sdpa; gemma3's block masks: flex_attention on CUDA, sdpa), on three real
   samples of the bundled demo data (one image and two turns, two images, text only) rendered by
   the trainer; the backend the trainer picks is named.
3. attention: benchmarks/attention.py, its JSON lines (skipped, "missing", while it does not exist);
   the trainer's path must read nothing back to the host.
4. mfu: benchmarks/gpu/mfu.py (Qwen2-VL-2B-shaped, random bf16 weights written once, built by
   trainer.model.build_model, 8192-token packs), activation checkpointing none and full, compile
   off and on, with Dynamo's graphs, graph breaks and recompiles.
5. memory: peak CUDA memory of the trainer's step with grad_accum 1 and 4, full finetuning and
   LoRA, for a small Qwen2.5-VL (8 + 8 layers, 1536 / 1280 wide, 1.0B), next to
   benchmarks/memory.py's accounting: parameters + gradients + AdamW state, and activations under
   full checkpointing.
6. run: `python -m trainer.train --config configs/tiny-llava.yaml` for 4 steps (checkpoints at 2
   and 4) on the demo data, relaunched to 6 steps (it must resume), then `python -m trainer.export`.

Line: {"stage": NAME, "status": "ok" | "failed" | "error" | "timeout" | "skipped", "seconds": S,
"limit_s": L, ...}; last line: {"summary": true, "status": "ok" | "failed", "stages": {NAME: status}}.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEPS = REPO / ".gpu-deps"
# Pure-Python distributions the trainer imports that the lent GPU machines' image lacks.
MISSING_THERE = ("webdataset", "braceexpand", "torchdata", "num2words", "docopt")
STAGES = ("env", "oracle", "attention", "mfu", "memory", "run")
SHARE = {"env": 0.04, "oracle": 0.12, "attention": 0.08, "mfu": 0.46, "memory": 0.13, "run": 0.17}
# gemma3: block masks; qwen3_vl_moe: experts as a grouped GEMM; qwen3_5: linear attention packed per sample
ORACLE_FAMILIES = ("llava", "qwen2_5_vl", "mllama", "gemma3", "qwen3_vl_moe", "qwen3_5")
# Relative, on the summed losses in bf16. Measured on CPU: packed and per-sample agree to 3e-5 (the
# roundings differ in order), and attention across the samples' boundaries moves the sum by 0.3 %
# on these tiny random models: the tolerance sits between the two.
ORACLE_TOL = 1e-3
DEMO_SOURCES = (
    "llava_images.json 0.012",
    "minicpm_chat.jsonl 0.004",
    "openai_messages.jsonl 0.003",
    "text_only.json 0.004",
)  # the demo without its video source (no decoder needed)
DEMO_IDS = ("astro-1", "compare-1", "t-1")  # one image and two turns, two images, text only


# --- the parent: stages as subprocesses ----------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--timeout-s", type=float, default=480.0, help="all stages together (default 480)")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--smoke", action="store_true", help="on CPU with tiny sizes: every stage's code")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument(
        "--pack-deps",
        nargs="*",
        metavar="DIST",
        help=f"write .gpu-deps/ from this Python's packages (default: {' '.join(MISSING_THERE)})",
    )
    p.add_argument("--run-stage", choices=STAGES, help=argparse.SUPPRESS)  # the child
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pack_deps is not None:
        return pack_deps(args.pack_deps or list(MISSING_THERE))
    if args.run_stage:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="mmloom-validate-"))
    start, carry, statuses = time.monotonic(), 0.0, {}
    try:
        for name in args.stages:
            remaining = args.timeout_s - (time.monotonic() - start)
            limit = min(SHARE[name] * args.timeout_s + carry, remaining)
            if limit < 5:
                line = {
                    "stage": name,
                    "status": "skipped",
                    "reason": "out of time (--timeout-s)",
                    "seconds": 0.0,
                }
            else:
                line = run_stage(name, limit, work, args.smoke)
                carry = max(0.0, limit - line["seconds"])
            statuses[name] = line["status"]
            emit(line, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bad = [n for n, s in statuses.items() if s not in ("ok", "skipped")]
    emit(
        {
            "summary": True,
            "status": "failed" if bad else "ok",
            "stages": statuses,
            "failed": bad,
            "seconds": round(time.monotonic() - start, 1),
            "timeout_s": args.timeout_s,
            "smoke": args.smoke,
        },
        args.out,
    )
    return 1 if bad else 0


def emit(line: dict, out: Path | None) -> None:
    text = json.dumps(line, default=str)
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text + "\n")


def child_env() -> dict[str, str]:
    """The stages' environment: the repository and the carried zips ahead of the machine's packages."""
    paths = [str(REPO), *sorted(str(z) for z in DEPS.glob("*.zip")), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def run_stage(name: str, limit: float, work: Path, smoke: bool) -> dict[str, Any]:
    """Run one stage in its own process group; kill the group at `limit` seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-stage", name, "--work", str(work)]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd + (["--smoke"] if smoke else []),
        cwd=REPO,
        env=child_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the stage and everything it started
        out, err = proc.communicate()
    lines = [x for x in json_lines(out) if x.get("stage") == name]
    line = dict(lines[-1]) if lines else {"stage": name}
    line.pop("partial", None)
    if timed_out:
        line["status"] = "timeout"
        line["error"] = f"killed after {limit:.0f} s; the fields above are what it had printed by then"
    elif line.get("status") is None or proc.returncode != 0 and line["status"] == "ok":
        line["status"] = "error"
        line["error"] = f"exit status {proc.returncode}, no result line"
    if line["status"] not in ("ok", "skipped"):
        line["stderr_tail"] = err[-1500:]
    line.update(seconds=round(time.monotonic() - start, 1), limit_s=round(limit))
    return line


def json_lines(text: str) -> Iterator[dict]:
    for raw in text.splitlines():
        raw = raw.strip()
        if raw.startswith("{"):
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if isinstance(value, dict):
                yield value


def pack_deps(names: list[str]) -> int:
    """Zip each distribution's files (package and .dist-info) from this Python into .gpu-deps/."""
    DEPS.mkdir(exist_ok=True)
    for name in names:
        dist = importlib.metadata.distribution(name)
        files = [
            f
            for f in dist.files or ()
            if "__pycache__" not in f.parts
            and not f.parts[0].startswith("..")
            and Path(dist.locate_file(f)).is_file()
        ]
        target = DEPS / f"{dist.metadata['Name'].lower()}-{dist.version}.zip"
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
            for f in files:
                z.write(dist.locate_file(f), str(f))
        print(f"{target.relative_to(REPO)}: {len(files)} files, {target.stat().st_size / 2**20:.1f} MiB")
    return 0


# --- the child: one stage ------------------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    name, start = args.run_stage, time.monotonic()
    try:
        result = STAGE_FUNCTIONS[name](args)
    except Exception as e:  # the stage's own failure is its result
        result = {
            "status": "error",
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-2000:],
        }
    print(
        json.dumps({"stage": name, **result, "seconds": round(time.monotonic() - start, 1)}, default=str),
        flush=True,
    )
    return 0


def partial(stage: str, **fields: Any) -> None:
    """What a stage has so far: the parent keeps the last such line if the stage runs out of time."""
    print(json.dumps({"stage": stage, "partial": True, **fields}, default=str), flush=True)


def device() -> Any:
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def tiny_checkpoint(work: Path, family: str) -> Path:
    from trainer.tiny import build_tiny

    out = work / f"tiny-{family}"
    return out if (out / "config.json").exists() else build_tiny(family, out)


def demo_shards(work: Path) -> Path:
    """The bundled demo data (images and text; not its video) converted by data_tools/shard.py."""
    from data_tools.shard import main as shard_main

    out = work / "demo-shards"
    if not (out / "manifest.json").exists():
        demo = REPO / "data_tools" / "demo"
        (work / "demo-data.txt").write_text("".join(f"{demo / line}\n" for line in DEMO_SOURCES))
        if shard_main([str(work / "demo-data.txt"), "--out", str(out), "-q", "--workers", "1"]) != 0:
            raise RuntimeError("data_tools/shard.py failed on the demo data")
    return out


def demo_samples(adapter: Any, shards: Path) -> list[Any]:
    """DEMO_IDS from the demo shards, rendered by the trainer for this adapter, in that order."""
    from data_tools.manifest import load_manifest
    from data_tools.plan import plan_epoch
    from data_tools.sample import Sample
    from trainer.data.reader import read_occurrences
    from trainer.data.render import render_sample

    plan = plan_epoch(load_manifest(shards), 0, 0)
    found = {}
    for raw in read_occurrences(shards, plan, range(len(plan))):
        if not hasattr(raw, "members"):
            continue
        sample = Sample.from_json(raw.members["json"])
        if sample.id in DEMO_IDS and sample.id not in found:
            found[sample.id] = render_sample(adapter, sample, raw.members)
    missing = set(DEMO_IDS) - set(found)
    if missing:
        raise RuntimeError(f"the demo shards lack samples {sorted(missing)}")
    return [found[i] for i in DEMO_IDS]


def stream(cmd: list[str], on_line: Callable[[dict], None]) -> tuple[int, list[str]]:
    """Run `cmd` with stderr into stdout; hand each JSON line to `on_line`; return (status, other lines)."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    other = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        parsed = list(json_lines(raw))
        if parsed:
            on_line(parsed[0])
        else:
            other = (other + [raw.rstrip()])[-40:]
    return proc.wait(), other


# --- 1. environment ------------------------------------------------------------------------------


def stage_env(args: argparse.Namespace) -> dict[str, Any]:
    versions = {}
    for dist in (
        "torch",
        "transformers",
        "peft",
        "flash-attn",
        "accelerate",
        "tokenizers",
        "triton",
        "webdataset",
        "torchdata",
        "tensorboard",
        "bitsandbytes",
        "av",
        "decord",
        "num2words",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    imports = {}
    for module in (
        "torch",
        "transformers",
        "peft",
        "webdataset",
        "torchdata.stateful_dataloader",
        "tensorboard",
        "trainer.loop",
        "trainer.attention",
        "trainer.flops",
    ):
        try:
            mod = importlib.import_module(module)
            imports[module] = "carried" if str(DEPS) in str(getattr(mod, "__file__", "")) else "ok"
        except Exception as e:
            imports[module] = f"{type(e).__name__}: {e}"[:300]
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "versions": versions,
        "imports": imports,
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
    }
    import torch

    out["cuda"] = torch.cuda.is_available()
    out["torch_cuda"] = torch.version.cuda
    if out["cuda"]:
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
        try:
            from trainer.flops import peak_tflops

            out["peak_bf16_tflops"] = peak_tflops(device())
        except Exception as e:
            out["peak_bf16_tflops"] = f"{type(e).__name__}: {e}"
    out["varlen_attn"] = check_varlen()
    imported = all(v in ("ok", "carried") for v in imports.values())
    out["status"] = "ok" if imported and (out["cuda"] or args.smoke) else "failed"
    return out


def check_varlen() -> dict[str, Any]:
    """Whether torch's varlen_attn imports, and on CUDA whether it equals per-sample causal SDPA."""
    import torch
    import torch.nn.functional as F

    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as e:
        return {"importable": False, "error": f"{type(e).__name__}: {e}"[:300]}
    params = inspect.signature(varlen_attn).parameters
    found = {"importable": True, "window_size": "window_size" in params, "is_causal": "is_causal" in params}
    if not torch.cuda.is_available():
        return {**found, "runs": None}
    # torch 2.14 spells causal as window_size=(-1, 0); older releases took is_causal.
    causal = {"window_size": (-1, 0)} if found["window_size"] else {"is_causal": True}
    try:
        torch.manual_seed(0)
        lengths = [5, 17, 42]
        q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, 5, 22, 64], device="cuda", dtype=torch.int32)
        out = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **causal)
        ref = torch.cat(
            [
                F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (a, b, c)), is_causal=True)[
                    0
                ].transpose(0, 1)
                for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths))
            ]
        )
        return {**found, "runs": True, "max_abs_diff": float((out - ref).abs().max())}
    except Exception as e:
        return {**found, "runs": False, "error": f"{type(e).__name__}: {e}"[:300]}


# --- 2. packed-loss oracle -----------------------------------------------------------------------


def backends_here(model_class: Any, masked: bool) -> list[str]:
    """The backends to check here; `masked`: a family with block masks (flex_attention on CUDA)."""
    import torch

    out = []
    if masked:
        return (["flex_attention"] if torch.cuda.is_available() else []) + ["sdpa"]
    if torch.cuda.is_available():
        if check_varlen().get("runs"):
            out.append("mmloom_varlen")
        flash = importlib.util.find_spec("flash_attn") is not None
        if flash and getattr(model_class, "_supports_flash_attn", False):
            out.append("flash_attention_2")
    return out + ["mmloom_packed", "sdpa"]


def stage_oracle(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer import attention
    from trainer.data.packing import collate
    from trainer.loop import micro_batch_loss
    from trainer.models.registry import get_adapter
    from trainer.moe import experts_implementation

    dev, shards = device(), demo_shards(args.work)
    families: dict[str, Any] = {}
    for family in ORACLE_FAMILIES:
        entry: dict[str, Any] = {}
        families[family] = entry
        try:
            adapter = get_adapter(tiny_checkpoint(args.work, family))
            rendered = demo_samples(adapter, shards)
            model_class = adapter.auto_class()._model_mapping.get(type(adapter.config), None)
            masked = adapter.block_masks()
            entry["trainer_backend"] = adapter.attention_backend(dev)
            entry["samples"] = [r.length for r in rendered]
            for backend in backends_here(model_class, masked):
                try:
                    attention.register()
                    impl = "sdpa" if backend == "sdpa" else attention.per_module(adapter.config, backend)
                    model = adapter.load_model(dtype=torch.bfloat16, attn_implementation=impl).to(dev).eval()
                    if experts_implementation(model):
                        entry["experts"] = experts_implementation(model)
                    with torch.no_grad():
                        alone = sum(
                            float(micro_batch_loss(model, adapter, collate(adapter, [r]), dev))
                            for r in rendered
                        )
                        packed = float(micro_batch_loss(model, adapter, collate(adapter, rendered), dev))
                    diff = abs(packed - alone) / abs(alone)
                    entry[backend] = {
                        "packed": round(packed, 4),
                        "alone": round(alone, 4),
                        "rel_diff": float(f"{diff:.3g}"),
                        "ok": diff <= ORACLE_TOL,
                    }
                    del model
                except Exception as e:
                    entry[backend] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"[:400]
        partial("oracle", families=families)
    ok = all(
        "error" not in e and all(v["ok"] for v in e.values() if isinstance(v, dict))
        for e in families.values()
    )
    return {
        "status": "ok" if ok else "failed",
        "dtype": "bfloat16",
        "tolerance": ORACLE_TOL,
        "device": str(dev),
        "families": families,
    }


# --- 3. attention microbenchmark -----------------------------------------------------------------


def stage_attention(args: argparse.Namespace) -> dict[str, Any]:
    script = REPO / "benchmarks" / "attention.py"
    if not script.exists():
        return {"status": "skipped", "reason": "missing: benchmarks/attention.py is not in this tree yet"}
    usage = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=REPO,
        env=child_env(),
        text=True,
        capture_output=True,
        timeout=120,
    ).stdout
    # --smoke: the smallest pack the script takes (its flags, where it has them).
    small = {
        "--tokens": ["--tokens", "1024"],
        "--samples": ["--samples", "4"],
        "--repeats": ["--repeats", "1"],
    }
    flags = [x for flag, value in small.items() if flag in usage for x in value] if args.smoke else []
    lines: list[dict] = []

    def seen(line: dict) -> None:
        lines.append(line)
        partial("attention", lines=lines)

    status, other = stream([sys.executable, str(script), *flags], seen)
    trainer_path = [x for x in lines if x.get("trainer_path")]
    ok = status == 0 and bool(lines) and all(x.get("host_reads_per_forward") == 0 for x in trainer_path)
    out = {
        "status": "ok" if ok else "failed",
        "flags": flags,
        "lines": lines,
        "trainer_path_host_reads": [x.get("host_reads_per_forward") for x in trainer_path],
    }
    if not ok:
        out["output_tail"] = other[-15:]
    return out


# --- 4. MFU --------------------------------------------------------------------------------------


def stage_mfu(args: argparse.Namespace) -> dict[str, Any]:
    script = REPO / "benchmarks" / "gpu" / "mfu.py"
    flags = (
        ["--smoke", "--ac", "none"]
        if args.smoke
        else [
            "--ac",
            "none",
            "full",
            "--compile",
            "off",
            "on",
            "--steps",
            "5",
            "--warmup",
            "3",
            "--samples",
            "400",
            "--workers",
            "4",
        ]
    )
    runs: list[dict] = []
    result: dict[str, Any] = {}

    def seen(line: dict) -> None:
        if "ac" in line:  # one configuration done (mfu.py's progress, on stderr)
            runs.append(line)
            partial("mfu", runs=runs)
        elif line.get("benchmark") == "gpu_mfu":
            result.update(line)

    status, other = stream([sys.executable, str(script), *flags], seen)
    result["runs"] = result.get("runs", runs)
    ok = status == 0 and bool(result["runs"]) and not any("error" in r for r in result["runs"])
    mfus = [r["mfu"] for r in result["runs"] if r.get("mfu") is not None]
    out = {
        "status": "ok" if ok else "failed",
        "flags": flags,
        **result,
        "best_mfu": max(mfus, default=None),
        "mfu_bar_0_45": max(mfus) >= 0.45 if mfus else None,
    }
    if not ok:
        out["output_tail"] = other[-15:]
    return out


# --- 5. memory -----------------------------------------------------------------------------------


def qwen2_5_vl_small(config: dict) -> None:
    """The tiny Qwen2.5-VL's config.json -> 8 + 8 layers at Qwen2.5-VL-3B-like widths (1.0B)."""
    config["text_config"].update(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_window_layers=8,
    )
    config["text_config"].pop("layer_types", None)
    config["text_config"]["rope_parameters"]["mrope_section"] = [16, 24, 24]
    config["vision_config"].update(
        depth=8,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=1536,
        fullatt_block_indexes=[3, 7],
    )


def stage_memory(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.gpu.mfu import build_shards, random_checkpoint

    ckpt = random_checkpoint(
        "qwen2_5_vl", args.work / "qwen2.5-vl-small", None if args.smoke else qwen2_5_vl_small
    )
    shards = build_shards(args.work / "memory-data", 40 if args.smoke else 200)
    tokens = 1024 if args.smoke else 8192
    rows: list[dict] = []
    for method, accum in (("full", 1), ("full", 4), ("lora", 1), ("lora", 4)):
        try:
            rows.append(
                measure_memory(
                    ckpt,
                    shards,
                    args.work / f"memory-{method}-{accum}",
                    method,
                    accum,
                    tokens,
                    workers=0 if args.smoke else 2,
                )
            )
        except Exception as e:
            rows.append({"method": method, "grad_accum": accum, "error": f"{type(e).__name__}: {e}"[:400]})
        partial("memory", rows=rows)
    ok = not any("error" in r for r in rows)
    by = {(r["method"], r["grad_accum"]): r for r in rows}
    growth = {
        m: round(by[m, 4]["peak_gib"] / by[m, 1]["peak_gib"], 3)
        for m in ("full", "lora")
        if ok and by[m, 1].get("peak_gib")
    }
    return {
        "status": "ok" if ok else "failed",
        "tokens": tokens,
        "rows": rows,
        "peak_accum4_over_accum1": growth,
    }


def measure_memory(
    ckpt: Path, shards: Path, run_dir: Path, method: str, accum: int, tokens: int, workers: int
) -> dict:
    """Peak CUDA memory of the trainer's second step (the first creates the optimizer state), and
    what benchmarks/memory.py's accounting predicts for it."""
    import gc

    import torch

    from benchmarks.memory import LOSS_CHUNK, activation_bytes, state_bytes
    from trainer import loop
    from trainer.config import load_config
    from trainer.data.pipeline import EpochBatches
    from trainer.metrics import Metrics

    cfg = load_config(
        None,
        [
            f"model.path={ckpt}",
            f"data.shards={shards}",
            f"run.dir={run_dir}",
            f"data.workers={workers}",
            f"data.packing.max_tokens={tokens}",
            f"train.grad_accum={accum}",
            f"finetune.method={method}",
            "train.steps=1000",
            "checkpoint.every=0",
            "run.export=false",
        ],
    )
    cuda = torch.cuda.is_available()
    trainer = loop.Trainer(cfg, 0, 1)
    try:
        trainer.metrics = Metrics(run_dir / "tb", enabled=False)
        trainer.loader.dataset.set_epoch(0)
        trainer.batches = EpochBatches(trainer.loader, trainer.adapter, cfg.data.max_skip_fraction)
        it = iter(trainer.batches)
        trainer.step([next(it) for _ in range(accum)], 0.0)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.step([next(it) for _ in range(accum)], 0.0)
        gib = 2**30
        named = dict(trainer.model.named_parameters())
        trainable = {n for n, p in named.items() if p.requires_grad}
        state = state_bytes(trainer.model, trainable, set(), shard=1)
        groups = {trainer.adapter.param_group(n) for n in trainable}
        act = activation_bytes(trainer.adapter.config, tokens, "vision" in groups, "projector" in groups)
        vocab = trainer.adapter.config.get_text_config().vocab_size
        predicted_peak = (
            sum(state.values())
            + act["llm_kept"]
            + act["vision_kept"]
            + act["model_level"]
            + act["block_peak"]
            + LOSS_CHUNK * vocab * 4 * 3
        )
        kept = sum(state.values()) - state["gradients"]
        row = {
            "method": method,
            "grad_accum": accum,
            "trainable_params": sum(named[n].numel() for n in trainable),
            "predicted": {
                "state_gib": round(sum(state.values()) / gib, 3),
                "params_and_optimizer_gib": round(kept / gib, 3),
                "peak_gib": round(predicted_peak / gib, 3),
            },
            "peak_gib": round(torch.cuda.max_memory_allocated() / gib, 3) if cuda else None,
            "after_step_gib": round(torch.cuda.memory_allocated() / gib, 3) if cuda else None,
        }
        if cuda:  # after the step: parameters and AdamW state (gradients are freed)
            row["after_step_over_predicted"] = round(torch.cuda.memory_allocated() / kept, 3)
        return row
    finally:
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# --- 6. a tiny run, resumed, exported ------------------------------------------------------------


def stage_run(args: argparse.Namespace) -> dict[str, Any]:
    tiny, shards = tiny_checkpoint(args.work, "llava"), demo_shards(args.work)
    run_dir = args.work / "tiny-run"
    train = [
        sys.executable,
        "-m",
        "trainer.train",
        "--config",
        str(REPO / "configs" / "tiny-llava.yaml"),
        f"model.path={tiny}",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "data.packing.max_tokens=2048",
        "checkpoint.every=2",
        "run.export=false",
    ]
    out: dict[str, Any] = {}
    checks: dict[str, bool] = {}
    for name, steps in (("first", 4), ("resumed", 6)):
        proc = subprocess.run(
            train + [f"train.steps={steps}"], cwd=REPO, env=child_env(), text=True, capture_output=True
        )
        last = list(json_lines(proc.stdout))
        out[name] = {k: v for k, v in last[-1].items() if k != "losses"} if last else {"rc": proc.returncode}
        checks[f"{name}_ran"] = proc.returncode == 0 and bool(last)
        if not checks[f"{name}_ran"]:
            out[name]["stderr_tail"] = proc.stderr[-1500:]
            break
        checks[f"{name}_steps"] = out[name]["steps"] == steps and out[name]["resumed"] == (name == "resumed")
        partial("run", checks=checks, **out)
    if all(checks.values()):
        export = args.work / "tiny-export"
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.export", str(run_dir), "--out", str(export)],
            cwd=REPO,
            env=child_env(),
            text=True,
            capture_output=True,
        )
        checks["export"] = (
            proc.returncode == 0 and (export / "config.json").exists() and any(export.glob("*.safetensors"))
        )
        out["export_files"] = sorted(f.name for f in export.iterdir()) if export.exists() else []
        if not checks["export"]:
            out["export_stderr_tail"] = proc.stderr[-1500:]
    return {"status": "ok" if checks and all(checks.values()) else "failed", "checks": checks, **out}


STAGE_FUNCTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": stage_env,
    "oracle": stage_oracle,
    "attention": stage_attention,
    "mfu": stage_mfu,
    "memory": stage_memory,
    "run": stage_run,
}


if __name__ == "__main__":
    sys.exit(main())
