"""Qwen/Qwen2-VL-2B-Instruct."""

from __future__ import annotations

from trainer.tiny.common import QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# The message body of Qwen-VL ChatML templates: media in place, as
# <|vision_start|><|image_pad|><|vision_end|> (videos with <|video_pad|>), optionally numbered
# ("Picture 1: ", "Video 1: ") with add_vision_id=True.
QWEN_VL_BODY = join(
    "{% macro body(content, counts) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'image' %}",
    "        {% set counts.images = counts.images + 1 %}",
    "        {% if add_vision_id %}{{ 'Picture ' + counts.images | string + ': ' }}{% endif %}",
    "        {{ '<|vision_start|><|image_pad|><|vision_end|>' }}",
    "      {% elif part['type'] == 'video' %}",
    "        {% set counts.videos = counts.videos + 1 %}",
    "        {% if add_vision_id %}{{ 'Video ' + counts.videos | string + ': ' }}{% endif %}",
    "        {{ '<|vision_start|><|video_pad|><|vision_end|>' }}",
    "      {% elif part['type'] == 'text' %}{{ part['text'] }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
)

# Qwen2-VL-Instruct ChatML: a default system prompt unless the conversation starts with one.
QWEN2_VL_CHAT_TEMPLATE = QWEN_VL_BODY + join(
    "{% set counts = namespace(images=0, videos=0) %}",
    "{% for message in messages %}",
    "  {% if loop.first and message['role'] != 'system' %}",
    "    {{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}",
    "  {% endif %}",
    "  {{ '<|im_start|>' + message['role'] + '\\n' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content'], counts) + '<|im_end|>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content'], counts) + '<|im_end|>' }}",
    "  {% endif %}",
    "  {{ '\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
)


def qwen_text_config(tokenizer, max_positions: int) -> dict:
    """The Qwen2 language model of Qwen2-VL and Qwen2.5-VL: ChatML ids, 3-D rope sections."""
    width = dict(TEXT_WIDTH)
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=padded_vocab(tokenizer),
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": _scaled_mrope(width.pop("head_dim")),
        },
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        use_sliding_window=False,
        **width,
    )


def qwen_media_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


QWEN2_VL_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    tail=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    add_bos=False,
)
# Qwen2-VL-2B-Instruct: head_dim 128 with mrope_section [16, 24, 24] (sum 64 = head_dim / 2).
QWEN2_VL_REAL_MROPE = (16, 24, 24)


def _scaled_mrope(head_dim: int) -> list[int]:
    half, total = head_dim // 2, sum(QWEN2_VL_REAL_MROPE)
    sections = [s * half // total for s in QWEN2_VL_REAL_MROPE]
    sections[0] += half - sum(sections)
    return sections


def build():
    """Qwen/Qwen2-VL-2B-Instruct: 14-px patches, 2x2 merge, 2-frame temporal patches, 3-D mrope."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = build_tokenizer(QWEN2_VL_TOKENS)
    geometry = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, **geometry)
    # Frame pixel limits: transformers' Qwen2-VL video defaults; the per-frame cap as qwen-vl-utils does it.
    video_processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True, **geometry)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config=qwen_text_config(tokenizer, max_positions=32768),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=TEXT_WIDTH["hidden_size"],
            mlp_ratio=4,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **qwen_media_ids(tokenizer),
        tie_word_embeddings=True,  # as the 2B checkpoint
    )
    return config, processor
