"""The real `python data_tools/shard.py` and `inspect.py` on a dataset of every format, every
accepted oddity and every rejection reason: exact counts, exact reasons, byte-identical output
for 1 and 2 workers, reuse on re-run, fatal errors that leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.conversion import record_order
from data_tools.samples import write_video
from tests.support import REPO
from tests.support.media import ACCEPTED_IMAGES, ACCEPTED_VIDEOS
from tests.support.shards import EXPECTED_REJECTIONS, TURNS, build_dataset, dump, read_samples, run, shard


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]) -> Path:
    return build_dataset(tmp_path_factory.mktemp("dataset"), media)


@pytest.fixture(scope="module")
def converted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("out") / "shards"
    proc = shard(dataset, out, "--workers", "2", "--shard-samples", "4")
    return out, proc.stdout


def test_manifest_counts_and_sampling(converted: tuple[Path, str]) -> None:
    out, stdout = converted
    manifest = json.loads((out / "manifest.json").read_text())
    got = {
        s["path"]: (s["samples"], s["rejected"], s["epoch_samples"], s["images"], s["videos"])
        for s in manifest["sources"]
    }
    assert got == {
        "oddities.json": (16, 0, 30, 16, 0),
        "broken.jsonl": (1, 15, 1, 0, 0),
        "formats.jsonl": (5, 0, 5, 6, 0),
        "videos.json": (5, 4, 3, 0, 5),
        "text.json": (9, 0, 4, 0, 0),
    }
    for source in manifest["sources"]:
        assert sum(s["samples"] for s in source["shards"]) == source["samples"]
        assert all(s["samples"] <= 4 for s in source["shards"])
        assert [s["path"] for s in source["shards"]] == [
            f"{source['name']}/{source['name']}-{i:06d}.tar" for i in range(len(source["shards"]))
        ]
        for s in source["shards"]:
            assert hashlib.sha256((out / s["path"]).read_bytes()).hexdigest() == s["sha256"]
    assert manifest["sources"][1]["rejected_by_reason"]["media_count_mismatch"] == 2
    assert manifest["totals"]["samples"] == 36 and manifest["totals"]["rejected"] == 19
    assert "up x1.88" in stdout and "down x0.44" in stdout and "down x0.60" in stdout
    assert re.search(r"converted 55 records, [\d.]+ MB of media in [\d.]+ s: [\d.]+ MB/s", stdout)


def test_every_rejection_has_its_reason(converted: tuple[Path, str]) -> None:
    out, _ = converted
    lines = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["id"]: r["code"] for r in lines} == EXPECTED_REJECTIONS
    by_id = {r["id"]: r for r in lines}
    assert by_id["missing"]["source"] == "broken.jsonl" and by_id["missing"]["index"] == 0
    assert by_id["missing"]["line"] == 1
    assert "media/nope.jpg" in by_id["missing"]["reason"] and "--media-root" in by_id["missing"]["reason"]
    assert by_id["truncated-video"]["index"] == 5 and by_id["truncated-video"]["source"] == "videos.json"


def test_accepted_oddities_keep_their_bytes_and_geometry(
    converted: tuple[Path, str], media: dict[str, Path]
) -> None:
    out, _ = converted
    manifest = json.loads((out / "manifest.json").read_text())
    samples = read_samples(out, manifest["sources"][0])
    ids = [json.loads(s["json"])["id"] for s in samples]
    assert sorted(ids) == sorted(ACCEPTED_IMAGES) and ids != sorted(ACCEPTED_IMAGES)  # shuffled: see below
    for s in samples:
        meta = json.loads(s["json"])
        part = meta["turns"][0]["parts"][0]
        width, height, fmt, ext = ACCEPTED_IMAGES[meta["id"]]
        assert (part["width"], part["height"], part["format"], part["member"]) == (
            width,
            height,
            fmt,
            f"img0.{ext}",
        )
        assert s[f"img0.{ext}"] == media[meta["id"]].read_bytes()  # original bytes, untouched
        assert meta["source"] == "oddities" and meta["key"] == s["__key__"]
        assert part["origin"] == f"media/{meta['id']}"


def test_videos_record_frames_and_num_frames(converted: tuple[Path, str], media: dict[str, Path]) -> None:
    out, _ = converted
    manifest = json.loads((out / "manifest.json").read_text())
    for s in read_samples(out, manifest["sources"][3]):
        meta = json.loads(s["json"])
        part = meta["turns"][0]["parts"][0]
        w, h, frames, fps, duration = ACCEPTED_VIDEOS[meta["id"]]
        assert (
            part["type"],
            part["width"],
            part["height"],
            part["frames"],
            part["fps"],
            part["duration"],
            part["num_frames"],
        ) == ("video", w, h, frames, fps, duration, 4)
        assert s["vid0.mp4"] == media[meta["id"]].read_bytes()


def test_formats_become_canonical_samples(converted: tuple[Path, str]) -> None:
    out, _ = converted
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {
        json.loads(s["json"])["id"]: (json.loads(s["json"]), s)
        for s in read_samples(out, manifest["sources"][2])
    }

    def shape(meta: dict) -> list:
        return [
            (t["role"], [p["text"] if p["type"] == "text" else p["member"] for p in t["parts"]])
            for t in meta["turns"]
        ]

    assert shape(samples["llava"][0]) == [("user", ["img0.jpg", "img1.png", "Same?"]), ("assistant", ["No."])]
    assert shape(samples["xcomposer"][0]) == [("user", ["img0.webp", "Describe."]), ("assistant", ["Roof."])]
    assert shape(samples["minicpm"][0]) == [
        ("user", ["img0.png", " vs ", "img1.png"]),
        ("assistant", ["Différent."]),
    ]
    assert samples["minicpm"][0]["turns"][0]["parts"][0]["origin"] == "media/rgba.png"
    assert shape(samples["openai"][0]) == [("user", ["img0.gif", "Hi"]), ("assistant", ["Hello"])]
    assert samples["openai"][0]["system"] == "Short answers."
    assert shape(samples["text-only"][0]) == [("user", ["你好"]), ("assistant", ["你好！"])]
    assert sorted(k for k in samples["text-only"][1] if not k.startswith("__")) == ["json"]


def test_tar_members_are_safe_and_contiguous(converted: tuple[Path, str]) -> None:
    out, _ = converted
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        keys = [m.name.split(".", 1)[0] for m in members]
        for m in members:
            assert re.fullmatch(r"\d{9}\.(json|img\d+\.[a-z]+|vid\d+\.[a-z0-9]+)", m.name), m.name
            assert m.isreg() and (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        # all members of a key are contiguous, and the json comes first
        runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
        assert len(runs) == len(set(runs)), tar_path
        assert all(
            members[i].name.endswith(".json") for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k
        )


def test_output_is_byte_identical_for_1_and_2_workers(
    converted: tuple[Path, str], dataset: Path, tmp_path: Path
) -> None:
    out2, _ = converted
    out1 = tmp_path / "one"
    shard(dataset, out1, "--workers", "1", "--shard-samples", "4")

    def tree(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    t1, t2 = tree(out1), tree(out2)
    assert sorted(t1) == sorted(t2)
    assert len([k for k in t1 if k.endswith(".tar")]) == 4 + 1 + 2 + 2 + 3
    for name in t1:
        assert t1[name] == t2[name], name


def shard_keys(out: Path, name: str) -> list[int]:
    """The input index of every sample in a source's shards, in the order they were written."""
    keys = []
    for tar_path in sorted((out / name).glob(f"{name}-*.tar")):
        with tarfile.open(tar_path) as tar:
            keys += [int(m.name.split(".")[0]) for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


def test_samples_are_written_in_a_seeded_shuffle_of_the_input(tmp_path: Path) -> None:
    # A JSON array (BOM, records over many lines) and a JSONL file (blank lines), both with
    # non-ASCII text; every 7th record is rejected (empty answer).
    def record(i: int) -> dict:
        return {
            "id": f"r{i}",
            "conversations": [
                {"from": "human", "value": f"问题 {i} 😀"},
                {"from": "gpt", "value": "" if i % 7 == 3 else f"答 {i}"},
            ],
        }

    n = 60
    text = json.dumps([record(i) for i in range(n)], indent=2, ensure_ascii=False)
    (tmp_path / "sorted.json").write_bytes(("\ufeff" + text).encode())
    blank_then = ["\n" * (i % 5 == 0) + json.dumps(record(i), ensure_ascii=False) for i in range(n)]
    (tmp_path / "sorted_too.jsonl").write_text("\n".join(blank_then) + "\n")
    (tmp_path / "data.txt").write_text("sorted.json 1\nsorted_too.jsonl 1\n")
    runs = {}
    for name, extra in [("one", ["--workers", "1"]), ("two", ["--workers", "2"]), ("seed", ["--seed", "1"])]:
        shard(tmp_path / "data.txt", tmp_path / name, "--shard-samples", "8", *extra)
        runs[name] = {s: shard_keys(tmp_path / name, s) for s in ("sorted", "sorted_too")}

    valid = [i for i in range(n) if i % 7 != 3]
    for source, keys in runs["one"].items():
        assert sorted(keys) == valid and keys != valid, source  # every valid record, shuffled
        assert keys == [k for k in record_order(0, source, n) if k in valid]  # by (seed, name) alone
        assert runs["seed"][source] != keys and sorted(runs["seed"][source]) == valid
    assert runs["one"]["sorted"] != runs["one"]["sorted_too"]  # each source its own order
    assert runs["one"] == runs["two"]
    for tar_path in sorted((tmp_path / "one").glob("*/*.tar")):  # whatever --workers is
        twin = tmp_path / "two" / tar_path.relative_to(tmp_path / "one")
        assert tar_path.read_bytes() == twin.read_bytes()
    for raw in wds.WebDataset(sorted(map(str, (tmp_path / "one").glob("*/*.tar"))), shardshuffle=False):
        sample = json.loads(raw["json"])  # the record read at its span
        assert sample["id"] == f"r{sample['index']}" and raw["__key__"] == f"{sample['index']:09d}"
        assert sample["turns"][0]["parts"][0]["text"] == f"问题 {sample['index']} 😀"

    # Rejections name their record's input index and line, listed in input order.
    listed = (tmp_path / "one" / "rejected.jsonl").read_text()
    assert (tmp_path / "seed" / "rejected.jsonl").read_text() == listed  # whatever the seed
    rejected = [json.loads(line) for line in listed.splitlines()]
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "  {"]
    bad = [i for i in range(n) if i % 7 == 3]
    assert [(r["source"], r["index"], r["id"], r["line"], r["code"]) for r in rejected] == [
        ("sorted.json", i, f"r{i}", starts[i], "empty_answer") for i in bad
    ] + [("sorted_too.jsonl", i, f"r{i}", i + 2 + i // 5, "empty_answer") for i in bad]  # + blank lines


def test_rerun_reuses_unchanged_sources_and_redoes_changed_ones(dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "data"
    shutil.copytree(dataset.parent, work)
    data_txt, out = work / "data.txt", tmp_path / "shards"
    first = shard(data_txt, out, "--workers", "1")
    assert "(reused)" not in first.stdout
    inodes = {p.name: p.stat().st_ino for p in out.glob("*/*.tar")}
    rejected = (out / "rejected.jsonl").read_text()

    again = shard(data_txt, out, "--workers", "1")
    assert again.stdout.count("(reused)") == 5
    assert {p.name: p.stat().st_ino for p in out.glob("*/*.tar")} == inodes
    assert (out / "rejected.jsonl").read_text() == rejected

    # A media file changes (only videos.json uses short.mp4); the JSON of another source changes;
    # the per-epoch count of a third changes (no re-conversion needed); one source is dropped.
    write_video(work / "media" / "short.mp4", frames=5)
    text = json.loads((work / "text.json").read_text())
    (work / "text.json").write_text(json.dumps(text[:5]))
    data_txt.write_text(
        data_txt.read_text()
        .replace("oddities.json 0.03", "oddities.json 0.06")
        .replace("broken.jsonl 0.001\n", "")
    )
    third = shard(data_txt, out, "--workers", "1")
    reused = {line.split()[0] for line in third.stdout.splitlines() if "(reused)" in line}
    assert reused == {"oddities", "formats"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["oddities", "formats", "videos", "text"]
    assert manifest["sources"][0]["epoch_samples"] == 60 and manifest["sources"][3]["samples"] == 5
    assert not (out / "broken").exists()
    assert {json.loads(r)["source"] for r in (out / "rejected.jsonl").read_text().splitlines()} == {
        "videos.json"
    }
    assert not list(out.glob("*.partial"))
    assert run("data_tools/inspect.py", out, "--verify").returncode == 0


@pytest.mark.parametrize("case", ["bad line", "missing json", "bad json", "bad jsonl"])
def test_fatal_errors_stop_before_writing(tmp_path: Path, case: str) -> None:
    (tmp_path / "ok.json").write_text(json.dumps([{"conversations": TURNS[1:]}]))
    lines = ["ok.json 1"]
    if case == "bad line":
        lines.append("broken.json")
        expect = f"{tmp_path / 'data.txt'}:2: expected `<json path> <samples per epoch in thousands>`"
    elif case == "missing json":
        lines.append("gone.json 2")
        expect = f"{tmp_path / 'data.txt'}:2: gone.json does not exist"
    elif case == "bad json":
        (tmp_path / "bad.json").write_text('[\n {"conversations": []},\n {"conversations": [}\n]')
        lines.append("bad.json 2")
        expect = f"{tmp_path / 'bad.json'}:3:21: invalid JSON: Expecting value"
    else:
        (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n\n{"conversations": ]}\n')
        lines.append("bad.jsonl 2")
        expect = f"{tmp_path / 'bad.jsonl'}:3:19: invalid JSON: Expecting value"
    (tmp_path / "data.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    proc = shard(tmp_path / "data.txt", out, check=False)
    assert proc.returncode == 2
    assert expect in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_media_root_and_inspect(tmp_path: Path, media: dict[str, Path]) -> None:
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(media["flower.jpg"], root / "f.jpg")
    dump(tmp_path / "a.json", [{"id": "with root", "image": "f.jpg", "conversations": TURNS}])
    (tmp_path / "data.txt").write_text("a.json 1\n")
    out = tmp_path / "shards"
    shard(tmp_path / "data.txt", out, "--media-root", root)
    shown = run("data_tools/inspect.py", out, "--sample", "with root")
    sample = json.loads(shown.stdout)
    assert sample["_members"] == ["json", "img0.jpg"] and sample["turns"][0]["parts"][0]["width"] == 640

    summary = run("data_tools/inspect.py", out, "--verify")
    assert "verified 1 shards: 1 ok, 0 bad" in summary.stdout and "a  " in summary.stdout
    tar = next(out.glob("a/*.tar"))
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    bad = run("data_tools/inspect.py", out, "--verify", check=False)
    assert bad.returncode == 1 and f"BAD  a/{tar.name}: sha256" in bad.stdout
    assert run("data_tools/inspect.py", out, "--sample", "nope", check=False).returncode == 1


def test_shard_py_runs_from_any_directory(tmp_path: Path) -> None:
    # Invoked by path from elsewhere, with no install: the script finds its package itself.
    (tmp_path / "a.json").write_text(
        json.dumps(
            [
                {
                    "conversations": TURNS[1:] * 0
                    + [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
                }
            ]
        )
    )
    (tmp_path / "data.txt").write_text("a.json 1\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "data_tools" / "shard.py"), "data.txt", "--out", "s", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["sources"][0]["samples"] == 1


def peak_rss_of_shard(data_txt: Path, out: Path) -> int:
    """Peak RSS (bytes) of a converter process, measured from a fresh parent."""
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    cmd = [sys.executable, "data_tools/shard.py", str(data_txt), "--out", str(out), "-q", "--workers", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", probe, *cmd], cwd=REPO, capture_output=True, text=True, check=True
    )
    return int(proc.stdout.split()[-1]) * 1024


@pytest.mark.slow
def test_memory_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    line = (
        json.dumps(
            {
                "id": "x",
                "conversations": [
                    {"from": "human", "value": "What is the capital of France?"},
                    {"from": "gpt", "value": "Paris."},
                ],
            }
        )
        + "\n"
    )
    rss = {}
    for n in (5_000, 80_000):
        src = tmp_path / f"text{n}.jsonl"
        src.write_text(line * n)
        (tmp_path / f"data{n}.txt").write_text(f"{src.name} 1\n")
        rss[n] = peak_rss_of_shard(tmp_path / f"data{n}.txt", tmp_path / f"out{n}")
        assert json.loads((tmp_path / f"out{n}" / "manifest.json").read_text())["sources"][0]["samples"] == n
    # 16x the records (15 MB of JSONL) may not cost more than a few MB of extra memory.
    assert rss[80_000] - rss[5_000] < 12 << 20, rss


def test_never_deletes_what_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    )
    (tmp_path / "data.txt").write_text("a.json 1\n")
    keep = tmp_path / "shards" / "a" / "precious.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    proc = shard(tmp_path / "data.txt", tmp_path / "shards", check=False)
    assert proc.returncode == 2 and "was not written by shard.py" in proc.stderr
    assert keep.read_text() == "mine"


def test_bundled_demo_data_converts(tmp_path: Path) -> None:
    # What `make demo` runs first: every demo sample is valid but the one that shows a rejection.
    shard(REPO / "data_tools" / "demo" / "data.txt", tmp_path / "shards", "--workers", "2")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert {s["name"]: (s["samples"], s["rejected"], s["videos"]) for s in manifest["sources"]} == {
        "llava_images": (6, 1, 0),
        "minicpm_chat": (3, 0, 0),
        "openai_messages": (3, 0, 0),
        "video_qa": (2, 0, 2),
        "text_only": (4, 0, 0),
    }
    [line] = (tmp_path / "shards" / "rejected.jsonl").read_text().splitlines()
    assert json.loads(line)["id"] == "missing-1"


def test_a_media_file_swapped_with_its_old_mtime_is_noticed(tmp_path: Path, media: dict[str, Path]) -> None:
    shutil.copy(media["flower.jpg"], tmp_path / "a.jpg")
    dump(tmp_path / "a.json", [{"image": "a.jpg", "conversations": TURNS}])
    (tmp_path / "data.txt").write_text("a.json 1\n")
    shard(tmp_path / "data.txt", tmp_path / "out")
    before = (tmp_path / "a.jpg").stat()
    shutil.copy(media["PHOTO.JPG"], tmp_path / "b.jpg")  # same size? no matter: same mtime
    os.replace(tmp_path / "b.jpg", tmp_path / "a.jpg")
    os.utime(tmp_path / "a.jpg", ns=(before.st_atime_ns, before.st_mtime_ns))
    again = shard(tmp_path / "data.txt", tmp_path / "out")
    assert "(reused)" not in again.stdout


def test_an_unreadable_manifest_does_not_block_a_rerun(tmp_path: Path) -> None:
    dump(
        tmp_path / "a.json",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    (tmp_path / "data.txt").write_text("a.json 1\n")
    out = tmp_path / "out"
    shard(tmp_path / "data.txt", out)
    (out / "manifest.json").write_text("{truncated")
    proc = shard(tmp_path / "data.txt", out)
    assert json.loads((out / "manifest.json").read_text())["sources"][0]["samples"] == 1
    assert "(reused)" not in proc.stdout
