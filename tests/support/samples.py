"""Samples the tests share: two real photographs, conversations to render, samples to pack, and
the loss of a pack computed the way transformers computes it."""

from __future__ import annotations

import io
import re

import torch
import torch.nn.functional as F

from data_tools.sample import ImagePart, Sample, TextPart, Turn
from data_tools.samples import SKIMAGE, SKLEARN
from trainer.data.packing import collate
from trainer.data.render import decode_image

PHOTOS = {"img0.jpg": (SKLEARN / "china.jpg").read_bytes(), "img1.png": (SKIMAGE / "coffee.png").read_bytes()}


def image(member: str) -> ImagePart:
    return ImagePart(member=member, width=0, height=0, format="", bytes=0)


def text(t: str) -> TextPart:
    return TextPart(text=t)


# Rendering cases by name (tests/unit/test_render.py and the family tests).
CONVERSATIONS = {
    "single": Sample(
        key="000000001",
        source="s",
        index=1,
        turns=[
            Turn(role="user", parts=[image("img0.jpg"), text("What is this?")]),
            Turn(role="assistant", parts=[text("A temple roof.")]),
        ],
    ),
    "multi_turn_multi_image_system": Sample(
        key="000000002",
        source="s",
        index=2,
        system="Answer briefly.",
        turns=[
            Turn(role="user", parts=[image("img0.jpg"), text("Where?")]),
            Turn(role="assistant", parts=[text("China.")]),
            Turn(role="user", parts=[text("And this one?"), image("img1.png")]),
            Turn(role="assistant", parts=[text("A cup of coffee on a saucer.")]),
        ],
    ),
    "text_only": Sample(
        key="000000003",
        source="s",
        index=3,
        turns=[
            Turn(role="user", parts=[text("你好")]),
            Turn(role="assistant", parts=[text("你好！")]),
            Turn(role="user", parts=[text("2+2?")]),
            Turn(role="assistant", parts=[text("4")]),
        ],
    ),
}


def images_of(sample: Sample) -> list:
    return [decode_image(PHOTOS[p.member]) for p in sample.media]


def sample(key: str, turns: list[tuple[str, list]], system: str | None = None) -> Sample:
    """A sample from (role, [parts]) turns: a part naming a photo (or "crop.png") is that image."""

    def part(p: str) -> ImagePart | TextPart:
        return image(p) if p in PHOTOS or p == "crop.png" else text(p)

    return Sample(
        key=key,
        source="s",
        index=0,
        system=system,
        turns=[Turn(role=r, parts=[part(p) for p in ps]) for r, ps in turns],
    )


# Three samples to pack: a photo and a question, text only over two turns, two images and a system prompt.
SAMPLES = [
    sample("1", [("user", ["img0.jpg", "What is it?"]), ("assistant", ["A roof."])]),
    sample(
        "2", [("user", ["Hello"]), ("assistant", ["Hi there."]), ("user", ["Bye"]), ("assistant", ["Bye."])]
    ),
    sample(
        "3",
        [("user", ["img1.png", "And this?", "img0.jpg"]), ("assistant", ["Coffee, then a roof."])],
        system="Be brief.",
    ),
]


def answer_text(decoded: str) -> str:
    """An answer as the sample wrote it, from its decoded tokens: stripped, without the empty reasoning
    block a thinking model's template writes before an answer that has none (GLM-4.5V: <think></think>)."""
    return re.sub(r"^<think>\s*</think>", "", decoded.strip()).strip()


def summed_loss(model, inputs: dict) -> torch.Tensor:
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")


def cropped_photo(box: tuple[int, int, int, int], answer: str) -> tuple[Sample, dict[str, bytes]]:
    """A one-turn sample about a crop of img0.jpg, and the photos with that crop among them."""
    crop = io.BytesIO()
    decode_image(PHOTOS["img0.jpg"]).crop(box).save(crop, format="PNG")
    return sample("4", [("user", ["crop.png", "What is it?"]), ("assistant", [answer])]), {
        **PHOTOS,
        "crop.png": crop.getvalue(),
    }


def assert_packed_equals_alone(path, adapter, rendered: list, pack: dict) -> None:
    """The summed loss of `pack` equals its samples' losses one by one (fp32, relative 1e-6)."""
    model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        alone = sum(summed_loss(model, dict(collate(adapter, [r]).inputs)) for r in rendered)
        packed = summed_loss(model, dict(pack))
    assert abs(packed.item() - alone.item()) <= 1e-6 * abs(alone.item()), (packed.item(), alone.item())
