"""llava-hf/llava-onevision-qwen2-7b-ov-hf."""

from __future__ import annotations

import dataclasses

from trainer.tiny.common import CHATML_TURNS, build_tokenizer, join
from trainer.tiny.qwen2_vl import QWEN2_VL_TOKENS, qwen_text_config

# llava-onevision-qwen2-7b-ov-hf (ChatML, no default system prompt): "<|im_start|>user\n<image>\nQ<|im_end|>\n
# <|im_start|>assistant\nA<|im_end|>\n". A message's images come first ("<image>\n" each), then its
# videos ("<video>\n" each), then its text parts joined with nothing. The published template keeps
# <|im_end|> outside {% generation %}; here it is inside, so the model learns to stop.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    join(
        "{% macro body(content) %}",
        "  {% if content is string %}{{ content }}{% else %}",
        "    {{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}",
        "    {{ '<video>\\n' * (content | selectattr('type', 'equalto', 'video') | list | length) }}",
        "    {{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}",
        "  {% endif %}",
        "{% endmacro %}",
    )
    + CHATML_TURNS
)

# Qwen2's own three special tokens (151643-151645), then llava-hf's <image> (151646) and <video> (151647).
LLAVA_ONEVISION_TOKENS = dataclasses.replace(
    QWEN2_VL_TOKENS, tail=(*QWEN2_VL_TOKENS.tail[:3], "<image>", "<video>")
)

# AnyRes grids of 1x1 to 6x6 tiles of 384 px (the checkpoint's image_grid_pinpoints).
LLAVA_ONEVISION_PINPOINTS = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
FRAMES = 32  # frames per video the model was trained on (frames_upbound); sampling is left to the caller


def siglip_384_tower():
    """SigLIP so400m/14 at 384 px (27x27 = 729 patches, no CLS token, no pooling head), 2 layers of
    width 32."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        image_size=384,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vision_use_head=False,
    )


def build():
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-384 AnyRes-max-9 (729 tokens per view), Qwen2, ChatML."""  # noqa: E501 (one line: python -m trainer.tiny --list)
    # One image alone: a 384-px base view plus the tiles of the best of 36 grids up to 6x6, tile
    # features unpadded and, past 9 tiles' worth, shrunk back to about 9 tiles; a newline per row.
    # Several images in one sample: the base view of each, padded square, plus one newline.
    # Video: 384-px frames pooled 2x2 to 14x14 = 196 tokens each, one newline per video.
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
    )

    tokenizer = build_tokenizer(LLAVA_ONEVISION_TOKENS)
    size = {"height": 384, "width": 384}
    image_processor = LlavaOnevisionImageProcessor(
        size=size,
        resample=3,
        image_grid_pinpoints=LLAVA_ONEVISION_PINPOINTS,
        do_pad=True,
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    )
    video_processor = LlavaOnevisionVideoProcessor(
        size=size, resample=3, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, num_frames=FRAMES
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    # The Qwen2-7B language model: plain 1-D rope (no multimodal sections).
    text = {
        **qwen_text_config(tokenizer, max_positions=32768),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }
    config = LlavaOnevisionConfig(
        vision_config=siglip_384_tower(),
        text_config=Qwen2Config(**text),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=LLAVA_ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    return config, processor
