"""`python -m trainer.models --list`: the supported model families and what each supports, read from
the adapters themselves (docs/families.md's table is this output)."""

from __future__ import annotations

import argparse
import sys

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import load_families

COLUMNS = ("family", "example checkpoint", "video")


def table() -> str:
    rows = [COLUMNS, tuple("---" for _ in COLUMNS)]
    for family, cls in {**load_families(), "generic": ModelAdapter}.items():
        rows.append(
            (
                f"`{family}`",
                cls.example or "any AutoModelForImageTextToText with a chat template",
                cls.video or "no",
            )
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.models", description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the table of supported families")
    args = parser.parse_args(argv)
    if not args.list:
        parser.error("nothing to do: pass --list")
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
