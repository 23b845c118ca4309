"""OpenGVLab/InternVL3-1B-hf."""

from __future__ import annotations

import dataclasses

from trainer.tiny.common import CHATML_TURNS, TEXT_WIDTH, build_tokenizer, join, padded_vocab
from trainer.tiny.qwen2_vl import QWEN2_VL_TOKENS

# InternVL3-hf (transformers' conversion): ChatML with no default system prompt, media in place as
# "<IMG_CONTEXT>\n" (videos "<video>\n"); the processor expands each <IMG_CONTEXT> to
# <img><IMG_CONTEXT>*256*tiles</img>.
INTERNVL_CHAT_TEMPLATE = (
    join(
        "{% macro body(content) %}",
        "  {% if content is string %}{{ content }}{% else %}",
        "    {% for part in content %}",
        "      {% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}",
        "      {% elif part['type'] == 'video' %}{{ '<video>\\n' }}",
        "      {% elif part['type'] == 'text' %}{{ part['text'] }}",
        "      {% endif %}",
        "    {% endfor %}",
        "  {% endif %}",
        "{% endmacro %}",
    )
    + CHATML_TURNS
)

# Qwen2-VL's ChatML and vision tokens (Qwen2.5's tool and fim tokens left out), then InternVL's at
# 151665-151673 in the real vocabulary. Naming "<video>" (video_token) makes transformers append it
# as a token too; it is never embedded: the processor replaces it by image blocks first.
INTERNVL_TOKENS = dataclasses.replace(
    QWEN2_VL_TOKENS,
    tail=(
        *QWEN2_VL_TOKENS.tail,
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<quad>",
        "</quad>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
    ),
    named={
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build():
    """OpenGVLab/InternVL3-1B-hf: 1-12 448-px tiles by aspect ratio + a thumbnail, 256 tokens each."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVideoProcessor,
        Qwen2Config,
    )

    tokenizer = build_tokenizer(INTERNVL_TOKENS)
    geometry = dict(
        size={"height": 448, "width": 448}, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    )
    # As published: the image processor itself does not tile, the processor turns crop_to_patches on.
    image_processor = GotOcr2ImageProcessor(crop_to_patches=False, min_patches=1, max_patches=12, **geometry)
    video_processor = InternVLVideoProcessor(**geometry)
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=256,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    # The Qwen2.5 text model keeps its dynamic NTK rope (factor 2): it only rescales past 32768
    # positions, so packed positions restarting at 0 see the same frequencies as single samples.
    config = InternVLConfig(
        vision_config=dict(
            image_size=448,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            attention_bias=True,
            use_qk_norm=False,
            norm_type="layer_norm",
            layer_scale_init_value=0.1,
            use_absolute_position_embeddings=True,
            use_mean_pooling=True,
        ),
        text_config=Qwen2Config(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            use_sliding_window=False,
            tie_word_embeddings=False,
            **TEXT_WIDTH,
        ),
        image_token_id=ids("<IMG_CONTEXT>"),
        image_seq_length=256,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return config, processor
