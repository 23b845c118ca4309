"""The deterministic tar writer: fixed metadata, contiguous keys, rollover by size and count."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from data_tools.writer import ShardWriter, tar_size


def write_samples(out: Path, n: int, **limits) -> list:
    out.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, "src", **{"max_bytes": 1 << 30, "max_samples": 1000, **limits})
    for i in range(n):
        w.write(f"{i:09d}", [("json", b'{"i": %d}' % i), ("img0.jpg", bytes([i]) * (700 * i + 1))])
    return w.close()


def test_same_samples_give_identical_bytes(tmp_path: Path) -> None:
    a = write_samples(tmp_path / "a", 7)
    b = write_samples(tmp_path / "b", 7)
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    data = (tmp_path / "a" / "src-000000.tar").read_bytes()
    assert hashlib.sha256(data).hexdigest() == a[0].sha256 and len(data) == a[0].bytes


def test_member_metadata_is_fixed_and_keys_contiguous(tmp_path: Path) -> None:
    write_samples(tmp_path, 5)
    with tarfile.open(tmp_path / "src-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == [
        "000000000.json",
        "000000000.img0.jpg",
        "000000001.json",
        "000000001.img0.jpg",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    }


def test_rollover_by_count_and_size(tmp_path: Path) -> None:
    by_count = write_samples(tmp_path / "count", 7, max_samples=3)
    assert [s.samples for s in by_count] == [3, 3, 1]
    assert [s.path for s in by_count] == ["src/src-000000.tar", "src/src-000001.tar", "src/src-000002.tar"]
    by_size = write_samples(tmp_path / "size", 12, max_bytes=20480)
    assert sum(s.samples for s in by_size) == 12
    for shard in by_size:
        real = (tmp_path / "size" / Path(shard.path).name).stat().st_size
        assert real == shard.bytes
        assert real <= 20480 or shard.samples == 1, shard  # a sample bigger than the limit stands alone
    assert [s.samples for s in by_size] == [5, 3, 2, 2]
    members = [("json", b"x" * 10), ("img0.jpg", b"y" * 513)]
    assert tar_size(members) == 512 + 512 + 512 + 1024


@pytest.mark.parametrize(
    "key, suffix", [("a.b", "json"), ("../x", "json"), ("/abs", "json"), ("k", "img 0.jpg")]
)
def test_unsafe_names_are_refused(tmp_path: Path, key: str, suffix: str) -> None:
    w = ShardWriter(tmp_path, "src", max_bytes=1 << 20, max_samples=10)
    with pytest.raises(AssertionError):
        w.write(key, [(suffix, b"{}")])
