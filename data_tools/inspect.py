"""Look inside a shard directory: manifest summary, integrity check, one sample.

    python data_tools/inspect.py shards/                  # per-source summary
    python data_tools/inspect.py shards/ --verify         # re-hash every shard against the manifest
    python data_tools/inspect.py shards/ --sample astro-1 # print a sample by its id (or key)
    python data_tools/inspect.py shards/ --sample 000000003 --source coco

Exit code 1 when --verify finds a bad shard or --sample finds nothing.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # As a script, this very file would shadow the standard library's `inspect` module for every
    # import below: put the repository root first on sys.path instead of data_tools/.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

from data_tools.manifest import Manifest, ShardEntry, load_manifest, summary_table  # noqa: E402


def verify_shard(root: Path, shard: ShardEntry) -> str | None:
    """None if the shard matches the manifest, else what is wrong with it."""
    path = root / shard.path
    if not path.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != shard.sha256:
        return f"sha256 {h.hexdigest()[:12]}… != manifest {shard.sha256[:12]}…"
    return None


def find_sample(root: Path, manifest: Manifest, wanted: str, source: str | None) -> dict | None:
    """The canonical sample whose id or key is `wanted`, with its media member names listed."""
    for entry in manifest.sources:
        if source and entry.name != source and entry.path != source:
            continue
        for shard in entry.shards:
            with tarfile.open(root / shard.path) as tar:
                members: dict[str, list[str]] = {}
                found = None
                for m in tar:
                    key, _, suffix = m.name.partition(".")
                    members.setdefault(key, []).append(suffix)
                    if suffix == "json" and found is None:
                        sample = json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
                        if wanted in (sample.get("id"), sample.get("key")):
                            found = sample
                    elif found is not None and key != found["key"]:
                        break
                if found is not None:
                    found["_members"] = members[found["key"]]
                    found["_shard"] = shard.path
                    return found
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inspect.py", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=Path, help="directory holding manifest.json")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 against the manifest")
    p.add_argument("--sample", metavar="ID", help="print the sample with this id or key")
    p.add_argument("--source", help="with --sample: only look in this source (name or data.txt path)")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.shards)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.sample:
        try:
            sample = find_sample(args.shards, manifest, args.sample, args.source)
        except (OSError, tarfile.TarError) as e:
            print(f"error: {e}; run with --verify to check every shard", file=sys.stderr)
            return 1
        if sample is None:
            print(f"error: no sample with id or key {args.sample!r}", file=sys.stderr)
            return 1
        print(json.dumps(sample, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.shards}: converter {manifest.converter}, seed {manifest.seed}")
    print(summary_table(manifest))
    if args.verify:
        bad = 0
        shards = [s for entry in manifest.sources for s in entry.shards]
        for shard in shards:
            problem = verify_shard(args.shards, shard)
            if problem:
                bad += 1
                print(f"BAD  {shard.path}: {problem}")
        print(f"verified {len(shards)} shards: {len(shards) - bad} ok, {bad} bad")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
