"""Show how one sample of any accepted input format is rendered for a model, and which tokens
are trained on.

    python -m trainer.preview --model runs/tiny-llava --sample data.json --index 3
    python -m trainer.preview --model DIR --sample data.jsonl --json  # {"input_ids": [...], "labels": [...]}

The sample goes through the converter's own validation (a rejected sample prints its reason)
and the trainer's own rendering. In a terminal, trained tokens are green and runs of media
tokens are folded into one `<image>x576` marker.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_tools.conversion import ConvertOptions, convert_record
from data_tools.sample import Sample
from data_tools.sources import DataError, RecordReader
from trainer.data.render import IGNORE, RenderError, render_sample
from trainer.models.registry import get_adapter

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def load_record(path: Path, index: int) -> tuple[int, object]:
    for i, line, record in RecordReader(path):
        if i == index:
            return line, record
    raise IndexError(f"{path} has no record {index} (records count from 0)")


def show(tokens: list[str], labels: list[int], media_tokens: set[str], color: bool) -> str:
    out, i = [], 0
    while i < len(tokens):
        tok, trained = tokens[i], labels[i] != IGNORE
        if tok in media_tokens:
            j = i
            while j < len(tokens) and tokens[j] == tok:
                j += 1
            piece = f"{tok}x{j - i}" if j - i > 1 else tok
            i = j
        else:
            piece, i = tok, i + 1
        out.append(
            (GREEN if trained else DIM) + piece + RESET if color else (f"[{piece}]" if trained else piece)
        )
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.preview", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local checkpoint directory")
    p.add_argument(
        "--sample", required=True, type=Path, help="a JSON array or JSONL file in any accepted format"
    )
    p.add_argument("--index", type=int, default=0, help="which record of the file (from 0)")
    p.add_argument(
        "--media-root",
        dest="media_roots",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder relative media paths resolve against (repeatable: the first that has it)",
    )
    p.add_argument("--family", help="adapter name, if not the checkpoint's model_type")
    p.add_argument("--json", action="store_true", help='print {"input_ids": [...], "labels": [...]}')
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args = p.parse_args(argv)
    try:
        line, record = load_record(args.sample, args.index)
    except (DataError, IndexError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    converted = convert_record(
        args.index,
        line,
        record,
        "preview",
        args.sample.resolve().parent,
        ConvertOptions(media_roots=tuple(root.resolve() for root in args.media_roots)),
    )
    if converted.members is None:
        print(f"rejected ({converted.code}): {converted.reason}", file=sys.stderr)
        return 1
    members = dict(converted.members)
    adapter = get_adapter(args.model, args.family)
    try:
        rendered = render_sample(adapter, Sample.from_json(members["json"]), members)
    except RenderError as e:
        print(f"cannot render ({e.reason}): {e.detail}", file=sys.stderr)
        return 1
    ids, labels = rendered.input_ids.tolist(), rendered.labels.tolist()
    if args.json:
        print(json.dumps({"input_ids": ids, "labels": labels}))
        return 0
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    tokens = adapter.tokenizer.convert_ids_to_tokens(ids)
    tokens = [adapter.tokenizer.convert_tokens_to_string([t]) for t in tokens]
    # The tokenizer's image token too: Gemma 3's processor names <start_of_image>, the run is of soft tokens.
    media = {
        t
        for t in (adapter.image_token, adapter.video_token, getattr(adapter.tokenizer, "image_token", None))
        if t
    }
    print(show(tokens, labels, media, color))
    trained = sum(label != IGNORE for label in labels)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in rendered.media.items()) or "no media"
    print(f"\n{len(ids)} tokens, {trained} trained{'' if color else ' (in [brackets])'}; {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
