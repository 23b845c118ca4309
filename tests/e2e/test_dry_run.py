"""`python -m trainer.train --dry-run`, alone and under torchrun with 2 ranks x 2 workers: the
per-source counts of an epoch equal the manifest's epoch_samples exactly, and runs repeat."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.manifest import load_manifest
from tests.support import REPO
from tests.support.runs import dry_run


def test_dry_run_counts_on_one_and_two_ranks(tiny, stream_shards: Path) -> None:
    manifest = load_manifest(stream_shards)
    expected = {s.path: s.epoch_samples for s in manifest.sources}
    one = dry_run(tiny, stream_shards, "data.workers=0")
    assert one["per_source"] == expected and one["skipped"] == {}
    assert one["samples"] == sum(expected.values()) == 58
    assert one["tokens"] <= one["packs"] * 2048
    assert 0 < one["packing_efficiency"] == round(one["tokens"] / (one["packs"] * 2048), 6) <= 1
    assert one == dry_run(tiny, stream_shards, "data.workers=0")  # the same JSON again
    two = dry_run(tiny, stream_shards, "data.workers=2", ranks=2)
    assert two["per_source"] == expected and two["samples"] == 58 and two["ranks"] == 2
    assert len(set(two["steps_per_rank"])) == 1


def test_dry_run_reports_skips_by_reason(tiny, tmp_path: Path) -> None:
    # The bundled demo's two videos reach llava as 6 (the sample's num_frames) and 8 frames of 576
    # tokens each: over 2048 tokens, counted per source; with 2 frames by default both fit.
    from data_tools.shard import main as shard_main

    shard_main(
        [str(REPO / "data_tools" / "demo" / "data.txt"), "--out", str(tmp_path / "s"), "-q", "--workers", "1"]
    )
    out = dry_run(tiny, tmp_path / "s", "data.workers=0", "data.max_skip_fraction=0.2")
    assert out["skipped"] == {"too_long": 2} and out["skipped_per_source"] == {"video_qa.json": 2}
    assert out["per_source"]["video_qa.json"] == 0 and out["samples"] == 21
    out = dry_run(
        tiny, tmp_path / "s", "data.workers=0", "data.packing.max_tokens=4096", "data.video.num_frames=2"
    )
    assert out["skipped"] == {} and out["per_source"]["video_qa.json"] == 2 and out["samples"] == 23


def test_a_video_broken_after_conversion_is_a_counted_skip_on_two_ranks(tiny, tmp_path: Path) -> None:
    """One sample's video is damaged inside its shard after conversion: on 2 ranks the dry run counts
    it as a bad_video skip on the rank that reads it, both ranks take the same number of steps, and
    every other sample gets through."""
    import tarfile

    from data_tools.shard import main as shard_main

    shards = tmp_path / "s"
    shard_main([str(REPO / "data_tools" / "demo" / "data.txt"), "--out", str(shards), "-q", "--workers", "1"])
    damaged = 0
    for shard in sorted(shards.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            videos = [m for m in tar.getmembers() if m.name.endswith(".mp4")]
        if videos and not damaged:
            with open(shard, "r+b") as f:  # same size: the shard still reads as a tar
                f.seek(videos[0].offset_data)
                f.write(b"\0" * 64)  # the container header: no decoder opens it
            damaged = 1
    assert damaged
    out = dry_run(
        tiny,
        shards,
        "data.workers=1",
        "data.packing.max_tokens=4096",
        "data.video.num_frames=2",
        "data.max_skip_fraction=0.2",
        ranks=2,
    )
    assert out["skipped"] == {"bad_video": 1} and out["per_source"]["video_qa.json"] == 1
    assert out["samples"] == 22 and len(set(out["steps_per_rank"])) == 1


def test_order_out_is_the_training_order_and_carries_the_mix(tiny, mix_shards: Path, tmp_path: Path) -> None:
    """--order-out on 1 rank and under torchrun on 2 ranks x 2 workers: every sample of the epoch once,
    in step order, and 1 %-of-epoch windows as close to the target mix as an i.i.d. order."""
    for ranks, workers in ((1, 0), (2, 2)):
        out = tmp_path / f"order-{ranks}.jsonl"
        summary = dry_run(
            tiny,
            mix_shards,
            f"data.workers={workers}",
            "train.grad_accum=2",
            "--order-out",
            str(out),
            ranks=ranks,
        )
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == summary["samples"] == 1200
        assert {r["source"] for r in rows} == {"long.jsonl", "mid.jsonl", "short.jsonl"}
        for source, n in (("long", 600), ("mid", 300), ("short", 300)):
            ids = [r["id"] for r in rows if r["source"] == f"{source}.jsonl"]
            assert sorted(ids) == sorted(f"{source}{i}" for i in range(n))
        where = [(r["micro_batch"], r["rank"]) for r in rows]
        assert where == sorted(where)
        assert all(r["step"] == r["micro_batch"] // 2 and r["epoch"] == 0 for r in rows)
        assert {r["rank"] for r in rows} == set(range(ranks))
        mix = summary["mix"]
        assert mix["window"] == 12 and mix["windows"] == 100
        assert mix["median"] <= 1.5 * mix["iid_median"] and mix["worst"] <= 1.5 * mix["iid_worst"], mix
