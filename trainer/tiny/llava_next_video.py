"""llava-hf/LLaVA-NeXT-Video-7B-hf."""

from __future__ import annotations

import dataclasses

from trainer.tiny.common import (
    CLIP_MEAN,
    CLIP_STD,
    TEXT_WIDTH,
    build_tokenizer,
    clip_336_tower,
    join,
    padded_vocab,
    vicuna_turns,
)
from trainer.tiny.llava import LLAVA_TOKENS
from trainer.tiny.llava_next import LLAVA_NEXT_PINPOINTS

# LLaVA-NeXT-Video-7B (vicuna_v1 conversation, as lmms-lab trained it): "SYSTEM USER: <image>\nQ ASSISTANT:
# A</s>USER: Q2 ASSISTANT:". A message's images come first ("<image>\n" each), then its videos ("<video>\n"
# each), then its text parts joined by a space. llava-hf's published template ends an answer with a space
# instead of </s>, so a model trained on it would never learn to stop; this one writes the EOS token.
LLAVA_NEXT_VIDEO_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}",
    "    {{ '<video>\\n' * (content | selectattr('type', 'equalto', 'video') | list | length) }}",
    "    {{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}",
    "  {% endif %}",
    "{% endmacro %}",
) + vicuna_turns("LLaVA-NeXT-Video")

# vicuna-7b-v1.5's SentencePiece vocabulary with llava-hf's <video> (32000) and <image> (32001); the
# padding token is <unk> (id 0).
LLAVA_NEXT_VIDEO_TOKENS = dataclasses.replace(
    LLAVA_TOKENS,
    tail=("<video>", "<image>"),
    pad="<unk>",
    named={"image_token": "<image>", "video_token": "<video>"},
)
FRAMES = 32  # frames per video the model was trained on; sampling is left to the caller


def build():
    """llava-hf/LLaVA-NeXT-Video-7B-hf: LLaVA-NeXT AnyRes 336-px images, 12x12 pooled frames, Vicuna."""
    # Images as in LLaVA-NeXT: a 336-px base view plus the tiles of the best of five grid pinpoints.
    # Video: 336-px frames (center crop), CLIP features average-pooled 2x2 to 12x12 = 144 tokens each.
    from transformers import (
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    tokenizer = build_tokenizer(LLAVA_NEXT_VIDEO_TOKENS)
    clip_336 = {
        "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }
    image_processor = LlavaNextImageProcessor(
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, do_pad=True, **clip_336
    )
    # The checkpoint's video processor was made from CLIP-336's preprocessor config (not the class's 224 px).
    video_processor = LlavaNextVideoVideoProcessor(num_frames=FRAMES, **clip_336)
    processor = LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by "default"
        chat_template=LLAVA_NEXT_VIDEO_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaNextVideoConfig(
        vision_config=clip_336_tower(),
        # The published config scales rope linearly by 2.5 (the conversion script meant 2.0); kept as
        # published.
        text_config=LlamaConfig(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_WIDTH,
        ),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=576,
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        use_image_newline_parameter=True,
        tie_word_embeddings=False,
    )
    return config, processor
