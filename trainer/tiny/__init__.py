"""Tiny random-weight checkpoints with the real token geometry of each supported model family.

Tests, the dry run and demos need a model directory that loads through exactly the same path as a
real checkpoint (`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`) without any
download. Only widths, depths and the text vocabulary are shrunk: image size, patch size, merge
size, image tokens per image, image splitting, pixel limits, special tokens and the chat format are
those of the real model, so sequence lengths and packing behave as they will on the cluster.

    python -m trainer.tiny --list
    python -m trainer.tiny --family qwen2_vl --out /tmp/tiny-qwen2-vl

Each family is one module here (named after the family) with a `build()` that returns the model
config and the processor. Building is deterministic (fixed seed, a BPE vocabulary learned by a
deterministic procedure from text generated here), so two builds give byte-identical files.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SEED = 0
FAMILIES: dict[str, Callable[[], tuple[object, object]]] = {
    name: importlib.import_module(f"{__name__}.{name}").build
    for _, name, _ in sorted(pkgutil.iter_modules(__path__))
    if name not in ("common", "__main__")
}


def build_tiny(family: str, out: str | Path, dtype: str = "float32") -> Path:
    """Write a tiny random-weight model plus its processor for `family` to `out`, its weights stored
    in `dtype` ("bfloat16" like most published checkpoints); return `out`."""
    import torch

    from trainer.models.registry import load_families

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    out = Path(out)
    config, processor = FAMILIES[family]()
    # fork_rng: a fixed seed for the weights without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = load_families()[family].auto_class().from_config(config, dtype=torch.float32)
    # A family whose fresh init switches a path off (zero tanh gates) turns it on in its init_weights(model).
    init_weights = getattr(importlib.import_module(f"{__name__}.{family}"), "init_weights", None)
    if init_weights is not None:
        init_weights(model)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("wrote tiny %s (%d parameters) to %s", family, model.num_parameters(), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), help="model family to build")
    parser.add_argument("--out", type=Path, help="directory to write the checkpoint to")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the dtype the weights are stored in",
    )
    parser.add_argument("--list", action="store_true", help="print the families and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, builder in FAMILIES.items():
            print(f"{name}\t{(builder.__doc__ or '').splitlines()[0]}")
        return 0
    if args.family is None or args.out is None:
        parser.error("--family and --out are required (or --list)")
    start = time.perf_counter()
    build_tiny(args.family, args.out, args.dtype)
    print(f"wrote tiny {args.family} to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0
