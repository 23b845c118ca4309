"""What the LLaVA family tests share: llava-1.5's vicuna_v1 turns (LLaVA-NeXT-Video keeps them) and
LLaVA-NeXT's AnyRes geometry (LLaVA-NeXT-Video keeps it, LLaVA-OneVision picks its grid the same way)."""

from __future__ import annotations


class VicunaTurns:
    """The rendering facts of vicuna_v1 turns (FamilyOracles' FULL_RENDER and the rest)."""

    FULL_RENDER = (
        "You are terse. USER: <image>\nWhat is this? ASSISTANT: An astronaut.</s>"
        "USER: <image>\nAnd this? ASSISTANT: A palace.</s>"
    )
    GENERATION_PROMPT = "ASSISTANT:"
    ASSISTANT_TEXT = " An astronaut.</s> A palace.</s>"
    TEXT_ONLY_RENDER = "USER: Hi ASSISTANT: Hello.</s>USER: a b ASSISTANT:"


PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def anyres_grid(
    height: int, width: int, pinpoints: list[tuple[int, int]], tile: int, per_tile: int
) -> tuple[int, int]:
    """Feature rows and columns of an image's tiles, as the original LLaVA-NeXT code picks them: the
    pinpoint that keeps the most pixels (then wastes the least), `per_tile` x `per_tile` features per
    `tile`-px tile, rows (or columns) of pure padding removed."""

    def score(pin: tuple[int, int]) -> tuple[int, int]:
        scale = min(pin[0] / height, pin[1] / width)
        kept = min(int(height * scale) * int(width * scale), height * width)
        return kept, -(pin[0] * pin[1] - kept)

    best = max(pinpoints, key=score)  # max keeps the first of equals, as the original does
    rows, cols = best[0] // tile * per_tile, best[1] // tile * per_tile
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(height * cols / width)) // 2)
    elif width / height < cols / rows:
        cols -= 2 * ((cols - int(width * rows / height)) // 2)
    return rows, cols


def anyres_tokens(height: int, width: int) -> int:
    """LLaVA-NeXT's AnyRes: 24x24 features per 336-px tile, one newline token per row, plus the 576
    tokens of the 336-px base view."""
    rows, cols = anyres_grid(height, width, PINPOINTS, 336, 24)
    return 576 + rows * (cols + 1)


def check_anyres_views(out) -> None:
    """The processor's output for the astronaut (512x512) and china (640x427) photographs."""
    # Both pick the 672x672 pinpoint: a base view and 4 tiles. The square astronaut keeps all 48x48
    # features; china (640x427) keeps 32 of 48 rows.
    assert anyres_tokens(512, 512) == 576 + 48 * 49 and anyres_tokens(427, 640) == 576 + 32 * 49
    assert out["pixel_values"].shape == (2, 5, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[512, 512], [427, 640]]
