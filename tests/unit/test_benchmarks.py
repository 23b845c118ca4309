"""The benchmarks run and measure what they say: `run_all.py --quick` prints one valid JSON line per
benchmark with its keys (correctness only: no speed is asserted); both loader baselines render
token-for-token what mmloom renders, so all do the same work; the GPU benchmark (its model-FLOP
count is trainer/flops.py's, checked against torch's FLOP counter in test_flops.py) says so without a
GPU and exits 0, and `--smoke` runs its code on CPU; the one-shot GPU check (benchmarks/gpu/validate.py)
runs every stage on CPU with `--smoke` and reports a stage that overruns its limit as a result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import ENV, REPO

KEYS = {
    "machine": {"cpus", "load_avg_1_5_15", "date", "torch"},
    "packing": {
        "packing_efficiency_4096",
        "packing_efficiency_8192",
        "padded_bs8_random",
        "padded_bs8_length_grouped",
        "packer_s_per_1m_samples_8192",
    },
    "loader": {
        "loader_speedup_vs_baseline",
        "loader_speedup_vs_baseline_wall",
        "loader_speedup_vs_tuned_baseline",
        "mmloom_samples_per_s",
        "baseline_samples_per_s",
        "baseline_tuned_samples_per_s",
        "decode_only_samples_per_s",
        "mmloom_startup_s",
        "baseline_startup_s",
    },
    "train": {
        "useful_tokens_speedup_vs_padded",
        "useful_tokens_speedup_vs_padded_grouped",
        "useful_tokens_speedup_vs_padded_masked_row",
        "packed_useful_tokens_per_s",
        "padded_useful_tokens_per_s",
        "packed_masked_row_useful_tokens_per_s",
        "packed_token_efficiency",
        "padded_token_efficiency",
        "framework_overhead_ms_per_step",
        "step_ms",
        "fwd_bwd_ms",
    },
    "shard": {"media_mb_per_s_1w", "media_samples_per_s_1w", "text_samples_per_s_1w", "text_peak_rss_mb"},
    "resume": {
        "resume_to_first_step_s",
        "resume_load_checkpoint_s",
        "resume_first_batch_wait_s",
        "resumed_at_occurrences",
        "epoch_samples",
    },
    "video_decode": {
        "decord_all_frames_per_s",
        "pyav_all_frames_per_s",
        "decord_sampled_frames_per_s",
        "pyav_sampled_frames_per_s",
        "bikes",
        "carphone_distorted",
    },
    "mixing": {"worst_ratio_to_iid", "mix_bar_1_25", "plan_10m", "plan_bar_5s_1gib"},
    "memory": {"all_fit_80gb", "host_bar_1_15", "configs", "tokens"},
    "machine_after": {"load_avg_1_5_15"},
}


@pytest.mark.slow
def test_run_all_quick_prints_every_benchmark_as_json() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [x["benchmark"] for x in lines] == list(KEYS)
    for line in lines:
        missing = KEYS[line["benchmark"]] - line.keys()
        assert not missing, (line["benchmark"], missing)
        assert "error" not in line
    by = {x["benchmark"]: x for x in lines}
    assert 0.9 < by["packing"]["packing_efficiency_8192"] <= 1 and by["packing"]["padded_bs8_random"] < 0.8
    train = by["train"]
    assert train["packed_token_efficiency"] > train["padded_token_efficiency"]
    assert all(
        train[k] > 0 for k in ("packed_useful_tokens_per_s", "padded_useful_tokens_per_s", "fwd_bwd_ms")
    )
    assert train["packed_attention_pairs_per_token"] < train["packed_masked_row_attention_pairs_per_token"]
    assert all(by["loader"][k] > 0 for k in KEYS["loader"] if k.endswith("_per_s"))
    resume = by["resume"]
    assert resume["epoch_samples"] == 1_000_000 and 400_000 < resume["resumed_at_occurrences"] < 600_000
    assert 0 < resume["resume_load_checkpoint_s"] < resume["resume_to_first_step_s"]
    video = by["video_decode"]
    assert video["bikes"]["frames"] == 250 and all(
        video[k] > 0 for k in KEYS["video_decode"] if k.endswith("_per_s")
    )
    check_memory_summary(by["memory"])


def check_memory_summary(memory: dict) -> None:
    """benchmarks/memory.py's summary: its bars, and figures a wrong count or dtype plan would miss."""
    assert memory["all_fit_80gb"] and memory["host_bar_1_15"] and memory["tokens"] == 8192
    rows = {(c["model"].split("/")[1], c["method"], c["shard_group"]): c for c in memory["configs"]}
    gib = 2**30
    # QLoRA 72B: every decoder layer's q, k, v, o, gate, up, down weight (80 layers) in NF4 on every rank.
    qlora = rows["Qwen2.5-VL-72B-Instruct", "qlora", 8]
    layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 29568
    assert qlora["quantized_params"] == 80 * layer
    assert qlora["per_rank_gib"]["params_4bit"] * gib == pytest.approx(80 * layer * 4.127 / 8, rel=0.01)
    # 7B full: LLM + merger trained (~7.66B; the 0.63B vision tower frozen); DCP saves fp32 weights + Adam.
    full = rows["Qwen2.5-VL-7B-Instruct", "full", 8]
    assert 7.6e9 < full["trainable_params"] < 7.7e9
    assert full["checkpoint_gib"] == pytest.approx(full["trainable_params"] * 12 / gib, abs=0.01)
    # AdamW: two fp32 states a trained weight, over 8 ranks.
    assert full["per_rank_gib"]["optimizer"] == pytest.approx(full["trainable_params"] / gib, rel=0.01)
    assert full["bf16_checkpoint_gib"] < full["host_gib_per_node"] <= 1.15 * full["bf16_checkpoint_gib"]
    # 32B on 16 GPUs: HSDP in groups of 8 holds twice the sharded state of full sharding.
    fsdp, hsdp = rows["Qwen2.5-VL-32B-Instruct", "full", 16], rows["Qwen2.5-VL-32B-Instruct", "full", 8]
    assert fsdp["fits_80gb"] and hsdp["per_rank_gib"]["optimizer"] == pytest.approx(
        2 * fsdp["per_rank_gib"]["optimizer"], abs=0.02
    )
    # LoRA 72B: the frozen bf16 base sharded over 8 ranks.
    lora = rows["Qwen2.5-VL-72B-Instruct", "lora", 8]
    assert lora["per_rank_gib"]["params_bf16"] == pytest.approx(lora["bf16_checkpoint_gib"] / 8, rel=0.02)


def test_gpu_benchmark_without_a_gpu_exits_cleanly() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "mfu.py")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"benchmark": "gpu_mfu", "skipped": "no GPU"}
    assert "no GPU" in proc.stderr


@pytest.mark.slow
@pytest.mark.slow
def test_gpu_validation_runs_every_stage_on_cpu_with_smoke(tmp_path: Path) -> None:
    """benchmarks/gpu/validate.py --smoke: one JSON line per stage in order, each stage's checks
    passing on CPU with tiny sizes, then the summary; --out gets the same lines."""
    out = tmp_path / "validate.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "validate.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [x.get("stage") for x in lines[:-1]] == ["env", "oracle", "attention", "mfu", "memory", "run"]
    summary = lines[-1]
    assert summary["summary"] and summary["status"] == "ok" and proc.returncode == 0, proc.stdout[-4000:]
    assert out.read_text().splitlines() == proc.stdout.splitlines()
    by = {x["stage"]: x for x in lines[:-1]}
    assert summary["stages"] == {name: x["status"] for name, x in by.items()}
    env = by["env"]
    assert env["cuda"] is False and env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert env["imports"]["trainer.loop"] in ("ok", "carried")
    oracle = by["oracle"]
    assert oracle["dtype"] == "bfloat16" and oracle["tolerance"] <= 1e-3
    for family in ("llava", "qwen2_5_vl", "mllama"):
        entry = oracle["families"][family]
        assert len(entry["samples"]) == 3 and entry["trainer_backend"] in entry
        for backend in ("mmloom_packed", "sdpa"):  # what runs on CPU
            assert entry[backend]["ok"] and entry[backend]["rel_diff"] <= oracle["tolerance"], (family, entry)
    gemma3 = oracle["families"]["gemma3"]  # block masks: dense for SDPA on CPU
    assert gemma3["trainer_backend"] == "sdpa" and gemma3["sdpa"]["ok"] and "mmloom_packed" not in gemma3
    attention = by["attention"]
    assert (
        attention["status"] == "skipped"
        and "missing" in attention["reason"]
        or attention["trainer_path_host_reads"] == [0]
    )
    # The GPU suite's mfu.py on the tiny Qwen2-VL: its own build, data, step and FLOP count.
    assert [r["ac"] for r in by["mfu"]["runs"]] == ["none"]
    mfu = by["mfu"]["runs"][0]
    assert mfu["steps"] > 0 and mfu["tokens_per_s"] > 0 and mfu["model_tflops_per_s_per_gpu"] is not None
    assert 0 <= mfu["data_wait_fraction"] < 1
    rows = {(r["method"], r["grad_accum"]): r for r in by["memory"]["rows"]}
    assert set(rows) == {("full", 1), ("full", 4), ("lora", 1), ("lora", 4)}
    assert 0 < rows["lora", 1]["trainable_params"] < rows["full", 1]["trainable_params"]
    assert rows["full", 4]["predicted"] == rows["full", 1]["predicted"]  # accumulation adds no state
    run = by["run"]
    assert all(run["checks"].values()) and len(run["checks"]) == 5
    first, resumed = run["first"], run["resumed"]
    assert (first["steps"], first["resumed"], resumed["steps"], resumed["resumed"]) == (4, False, 6, True)
    assert {"config.json", "model.safetensors"} <= set(run["export_files"])


def test_gpu_validation_kills_a_stage_at_its_limit(tmp_path: Path) -> None:
    """A stage past its time limit is killed with everything it started, and reported as a result."""
    from benchmarks.gpu.validate import run_stage

    line = run_stage("env", 0.5, tmp_path, smoke=True)  # importing torch alone takes longer
    assert line["stage"] == "env" and line["status"] == "timeout" and "killed after" in line["error"]
    assert line["seconds"] < 30


def test_seed_style_baseline_renders_what_mmloom_renders(tiny, tmp_path: Path) -> None:
    from benchmarks.corpus import llava_like_records
    from benchmarks.loader import SeedStyleDataset
    from data_tools.manifest import load_manifest
    from data_tools.plan import plan_epoch
    from data_tools.sample import Sample
    from data_tools.samples import SKIMAGE, SKLEARN
    from data_tools.shard import main as shard_main
    from trainer.data.reader import read_occurrences
    from trainer.data.render import render_sample
    from trainer.models.registry import get_adapter

    media = tmp_path / "media"
    media.mkdir()
    images = []
    for src in (SKLEARN / "china.jpg", SKIMAGE / "coffee.png"):
        images.append(media / src.name)
        images[-1].write_bytes(src.read_bytes())
    (media / "mix.json").write_text(json.dumps(llava_like_records(12, images, seed=3)))
    (tmp_path / "data.txt").write_text(f"{media / 'mix.json'} 0.012\n")
    assert (
        shard_main([str(tmp_path / "data.txt"), "--out", str(tmp_path / "shards"), "-q", "--workers", "1"])
        == 0
    )
    adapter = get_adapter(tiny("llava"))
    baseline = SeedStyleDataset(media / "mix.json", tiny("llava"))
    tuned = SeedStyleDataset(media / "mix.json", tiny("llava"), labels="tuned")
    plan = plan_epoch(load_manifest(tmp_path / "shards"), 0, 0)
    kinds = set()
    for raw in read_occurrences(tmp_path / "shards", plan, range(len(plan))):
        sample = Sample.from_json(raw.members["json"])
        ours = render_sample(adapter, sample, raw.members, 8192)
        for item in (baseline[sample.index], tuned[sample.index]):
            assert torch.equal(ours.input_ids, item["input_ids"]) and torch.equal(ours.labels, item["labels"])
            assert ("pixel_values" in item) == bool(ours.media)
            if ours.media:
                assert torch.equal(ours.media["pixel_values"], item["pixel_values"])
        kinds.add((bool(ours.media), sum(t.role == "assistant" for t in sample.turns) > 1))
    assert kinds == {
        (True, True),
        (True, False),
        (False, True),
        (False, False),
    }  # images, text-only, multi-turn


def test_mixing_benchmark_meets_its_bars_at_a_small_scale() -> None:
    """benchmarks/mixing.py on a 100k-sample version of its mix, 1 and 8 ranks x 2 workers: the real
    plan's order within 1.25x of i.i.d. for per-step and 1 %-of-epoch windows; the 10M plan's cost."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "mixing.py"),
            "--ranks",
            "1",
            "8",
            "--scale",
            "0.1",
            "--seeds",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line.get("ranks") for line in lines] == [1, 8, None]
    for line in lines[:2]:
        assert line["samples"] == 100_000
        for window in ("step", "epoch_1pct"):
            assert line[window]["median_vs_iid"] <= 1.25 and line[window]["worst_vs_iid"] <= 1.25, line
    assert lines[2]["mix_bar_1_25"] and lines[2]["plan_10m"]["occurrences"] == 10_000_000
    assert lines[2]["plan_10m"]["peak_gib"] < 1
