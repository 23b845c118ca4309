"""Deterministic WebDataset tar writing: same samples in, byte-identical shards out.

Every member gets fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644) and the members
of a sample are written together, `<key>.json` first, so WebDataset groups them by key. A new
shard starts when the next sample would push the current one past `max_bytes` or `max_samples`.
The sha256 of each shard is computed while it is written.

Headers come from the standard library's tarfile; we do not use webdataset's TarWriter because
it stamps the current time and user into every member.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

_BLOCK = tarfile.BLOCKSIZE
_SAFE_MEMBER = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the shards directory, e.g. "coco/coco-000000.tar"
    samples: int
    bytes: int
    sha256: str


class _HashingFile:
    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb", buffering=1 << 20)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        self._f.write(data)

    def close(self) -> None:
        self._f.close()


def tar_size(members: list[tuple[str, bytes]]) -> int:
    """Bytes these members take in a tar: one header block each plus data padded to blocks."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for _, data in members)


def file_size(payload: int) -> int:
    """Size of a tar file holding `payload` bytes of members: end blocks, padded to a record."""
    return -(-(payload + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes samples into `<out_dir>/<prefix>-NNNNNN.tar`, rolling over by size and count.

    Shard paths are reported as `<prefix>/<file>`: relative to the directory that will hold
    `<prefix>/` once the source is complete (out_dir itself may be a temporary name)."""

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int, max_samples: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.shards: list[ShardInfo] = []
        self._file: _HashingFile | None = None
        self._path: Path | None = None
        self._samples = 0
        self._bytes = 0

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Write one sample: `members` are (suffix, bytes), the member name is `key.suffix`."""
        for suffix, _ in members:
            name = f"{key}.{suffix}"
            # Keys carry no dots (WebDataset splits the key at the first one) and names no paths.
            assert _SAFE_MEMBER.match(name) and "." not in key, name
        size = tar_size(members)
        if self._file is not None and (
            self._samples >= self.max_samples or file_size(self._bytes + size) > self.max_bytes
        ):
            self._finish()
        if self._file is None:
            self._start()
        assert self._file is not None
        for suffix, data in members:
            # tarfile's own header encoding; the data is written in one piece rather than
            # through TarFile.addfile's 16 KiB copy loop.
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._file.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            self._file.write(data)
            self._file.write(bytes(-len(data) % _BLOCK))
        self._samples += 1
        self._bytes += size

    def close(self) -> list[ShardInfo]:
        if self._file is not None:
            self._finish()
        return self.shards

    def _start(self) -> None:
        self._path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = _HashingFile(self._path)
        self._samples = self._bytes = 0

    def _finish(self) -> None:
        assert self._file is not None and self._path is not None
        # End of archive as tarfile writes it: two zero blocks, then zeros to a whole record.
        self._file.write(bytes(2 * _BLOCK))
        self._file.write(bytes(-self._file.size % tarfile.RECORDSIZE))
        self._file.close()
        self.shards.append(
            ShardInfo(
                path=f"{self.prefix}/{self._path.name}",
                samples=self._samples,
                bytes=self._file.size,
                sha256=self._file.sha256.hexdigest(),
            )
        )
        self._file = self._path = None
