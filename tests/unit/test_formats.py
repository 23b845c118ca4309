"""Every input format becomes the exact canonical draft; every structural problem its reason."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from data_tools.formats import Draft, MediaRef, parse_record
from data_tools.sample import Rejected

ROOT = Path("/data/json_dir")


def simple(draft: Draft) -> tuple:
    """(system, [(role, [text | (kind, resolved path, num_frames)])])"""

    def part(p):
        if isinstance(p, MediaRef):
            return (p.kind, str(p.path) if p.path else p.data, p.num_frames)
        return p

    return draft.system, [(role, [part(p) for p in parts]) for role, parts in draft.turns]


def parse(record: dict, root: Path = ROOT) -> tuple:
    return simple(parse_record(record, media_roots=[root]))


def reject(record) -> tuple[str, str]:
    with pytest.raises(Rejected) as e:
        parse_record(record, media_roots=[ROOT])
    return e.value.code, e.value.reason


IMG = ("image", "/data/json_dir/a.jpg", None)
IMG_B = ("image", "/data/json_dir/b.jpg", None)


def test_llava_single_image_multi_turn() -> None:
    record = {
        "id": "000000033471",
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
            {"from": "gpt", "value": "White and red."},
            {"from": "human", "value": "Is it moving?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    assert parse(record) == (
        None,
        [
            ("user", [IMG, "What are the colors of the bus?"]),
            ("assistant", ["White and red."]),
            ("user", ["Is it moving?"]),
            ("assistant", ["Yes."]),
        ],
    )
    assert parse_record(record, media_roots=[ROOT]).id == "000000033471"


def test_llava_multi_image_list_and_trailing_placeholder() -> None:
    record = {
        "image": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "human", "value": "Compare\n<image>\n<image>"},
            {"from": "gpt", "value": "Same."},
        ],
    }
    assert parse(record) == (None, [("user", ["Compare", IMG, IMG_B]), ("assistant", ["Same."])])


def test_xcomposer_imagehere_and_absolute_paths() -> None:
    record = {
        "id": 0,
        "image": ["/abs/image_0.jpg", "rel/image_1.jpg"],
        "conversations": [
            {"from": "user", "value": "<ImageHere> <ImageHere>Please describe these two images in detail."},
            {"from": "assistant", "value": "The first image......"},
        ],
    }
    assert parse(record) == (
        None,
        [
            (
                "user",
                [
                    ("image", "/abs/image_0.jpg", None),
                    ("image", "/data/json_dir/rel/image_1.jpg", None),
                    "Please describe these two images in detail.",
                ],
            ),
            ("assistant", ["The first image......"]),
        ],
    )
    assert parse_record(record, media_roots=[ROOT]).id == "0"


def test_minicpm_role_content_image_in_front_without_placeholder() -> None:
    record = {
        "id": "0",
        "image": "a.jpg",
        "conversations": [
            {"role": "user", "content": "How many desserts are on the white plate?"},
            {"role": "assistant", "content": "There are three desserts."},
        ],
    }
    assert parse(record) == (
        None,
        [
            ("user", [IMG, "How many desserts are on the white plate?"]),
            ("assistant", ["There are three desserts."]),
        ],
    )


def test_minicpm_dict_placeholders_in_any_order() -> None:
    record = {
        "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
        "conversations": [
            {"role": "user", "content": "First <image_01>, then <image_00>."},
            {"role": "assistant", "content": "ok"},
        ],
    }
    assert parse(record) == (None, [("user", ["First ", IMG_B, ", then ", IMG, "."]), ("assistant", ["ok"])])


def test_minicpm_dict_without_placeholders_goes_in_front() -> None:
    record = {
        "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
        "conversations": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "ok"}],
    }
    assert parse(record) == (None, [("user", [IMG, IMG_B, "Describe."]), ("assistant", ["ok"])])


def test_lmms_finetune_video_system_prompt_num_frames() -> None:
    record = {
        "system_prompt": "You are a helpful assistant.",
        "video": "path/to/video1.mp4",
        "num_frames": 10,
        "conversations": [
            {"from": "human", "value": "<video>\nWhat is this video about?"},
            {"from": "gpt", "value": "This video shows a baby crying."},
        ],
    }
    assert parse(record) == (
        "You are a helpful assistant.",
        [
            ("user", [("video", "/data/json_dir/path/to/video1.mp4", 10), "What is this video about?"]),
            ("assistant", ["This video shows a baby crying."]),
        ],
    )


def test_images_and_videos_together_with_per_video_frames() -> None:
    record = {
        "image": "a.jpg",
        "video": ["v1.mp4", "v2.mp4"],
        "num_frames": [4, 8],
        "conversations": [
            {"from": "human", "value": "<video><image>\n<video>Same scene?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    assert parse(record)[1][0] == (
        "user",
        [("video", "/data/json_dir/v1.mp4", 4), IMG, ("video", "/data/json_dir/v2.mp4", 8), "Same scene?"],
    )


def test_openai_typed_parts_with_data_uri_and_system_turn() -> None:
    png = b"\x89PNG fake"
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in "},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
                    },
                    {"type": "text", "text": " and "},
                    {"type": "image", "image": "a.jpg"},
                    {"type": "video", "video": "v.mp4", "num_frames": 6},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A cat and a dog."}]},
        ]
    }
    assert parse(record) == (
        "Be brief.",
        [
            (
                "user",
                ["What is in ", ("image", png, None), " and ", IMG, ("video", "/data/json_dir/v.mp4", 6)],
            ),
            ("assistant", ["A cat and a dog."]),
        ],
    )


def test_hf_messages_with_pathless_parts_take_top_level_images() -> None:
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
            },
            {"role": "assistant", "content": "Two."},
        ],
        "images": ["a.jpg", "b.jpg"],
    }
    assert parse(record) == (None, [("user", [IMG, "and", IMG_B]), ("assistant", ["Two."])])


def test_string_messages_with_placeholders_llama_factory_style() -> None:
    record = {
        "messages": [{"role": "user", "content": "<image>Who?"}, {"role": "assistant", "content": "Me."}],
        "images": ["a.jpg"],
    }
    assert parse(record) == (None, [("user", [IMG, "Who?"]), ("assistant", ["Me."])])


def test_text_only_non_ascii_and_media_root() -> None:
    record = {
        "conversations": [
            {"from": "user", "value": "你好"},
            {"from": "assistant", "value": "你好，我是浦语·灵笔。"},
        ]
    }
    assert parse(record) == (None, [("user", ["你好"]), ("assistant", ["你好，我是浦语·灵笔。"])])
    assert parse({"image": "x.jpg", **record}, root=Path("/media"))[1][0][1][0] == (
        "image",
        "/media/x.jpg",
        None,
    )


def test_leading_system_turn_becomes_the_system_prompt() -> None:
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert parse(record) == ("S", [("user", ["q"]), ("assistant", ["a"])])


@pytest.mark.parametrize(
    "record, code, words",
    [
        ([1, 2], "bad_record", "JSON list"),
        ({"text": "hi"}, "unknown_format", "no `conversations` or `messages`"),
        ({"conversations": []}, "empty_conversation", "is empty"),
        (
            {"conversations": [{"from": "system", "value": "only a system prompt"}]},
            "empty_conversation",
            "no turns",
        ),
        ({"conversations": "hi"}, "bad_record", "expected a list"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            "unknown_role",
            "'bot'",
        ),
        ({"conversations": [{"value": "q"}, {"from": "gpt", "value": "a"}]}, "unknown_role", "None"),
        (
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
            "bad_text",
            "JSON int",
        ),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "bad_text", "missing"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "no_assistant_turn", "add the answer"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  \n"}]},
            "empty_answer",
            "assistant turn 1",
        ),
        (
            {
                "image": ["a.jpg"],
                "conversations": [
                    {"from": "human", "value": "<image><image>"},
                    {"from": "gpt", "value": "a"},
                ],
            },
            "media_count_mismatch",
            "2 <image>",
        ),
        (
            {
                "image": ["a.jpg", "b.jpg"],
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
            },
            "media_count_mismatch",
            "but 2 image(s)",
        ),
        (
            {"conversations": [{"from": "human", "value": "<video> what?"}, {"from": "gpt", "value": "a"}]},
            "media_count_mismatch",
            "0 video(s)",
        ),
        (
            {
                "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
                "conversations": [
                    {"role": "user", "content": "<image_00> only"},
                    {"role": "assistant", "content": "a"},
                ],
            },
            "media_count_mismatch",
            "<image_01>",
        ),
        (
            {"image": 5, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "bad_media_field",
            "not a file path",
        ),
        (
            {
                "image": "https://x.org/a.jpg",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "remote_media",
            "URL",
        ),
        (
            {
                "video": "v.mp4",
                "num_frames": 0,
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "bad_num_frames",
            "0",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "media_count_mismatch",
            "no entry left",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "bad_record",
            "unknown type 'audio'",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
            "bad_text",
            "missing",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "a.jpg"},
                            {"type": "text", "text": "<image> what?"},
                        ],
                    },
                    {"role": "assistant", "content": "a"},
                ]
            },
            "media_count_mismatch",
            "placeholder <image>",
        ),
        (
            {
                "image": {"<image_00>": "a.jpg"},
                "conversations": [
                    {"role": "user", "content": "<image_00> and <video>"},
                    {"role": "assistant", "content": "a"},
                ],
            },
            "media_count_mismatch",
            "0 video(s)",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": ["a.jpg", "b.jpg"]}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "bad_media_field",
            "list of files",
        ),
        (
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "images": ["a.jpg"],
                "videos": [],
            },
            None,
            None,
        ),
    ],
)
def test_rejections(record, code: str | None, words: str | None) -> None:
    if code is None:  # media with no placeholder in a string conversation: valid, goes in front
        assert parse(record)[1][0] == ("user", [IMG, "q"])
        return
    got_code, reason = reject(record)
    assert got_code == code
    assert words in reason
