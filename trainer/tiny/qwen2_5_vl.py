"""Qwen/Qwen2.5-VL-7B-Instruct."""

from __future__ import annotations

from trainer.tiny.common import CLIP_MEAN, CLIP_STD, QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer
from trainer.tiny.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_TOKENS, qwen_media_ids, qwen_text_config

# Qwen2.5-VL adds tool-call and fill-in-the-middle tokens after Qwen2-VL's, in this order.
QWEN2_5_VL_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    tail=(
        *QWEN2_VL_TOKENS.tail,
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    add_bos=False,
)


def build():
    """Qwen/Qwen2.5-VL-7B-Instruct: 14-px patches, 2x2 merge, 2-frame temporal patches, windowed ViT."""
    # 112-px attention windows in the vision tower; 3-D mrope with absolute time (2 rope steps per
    # second of video).
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer(QWEN2_5_VL_TOKENS)
    geometry = dict(
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    # Pixel limits of the published preprocessor_config.json (3B and 7B alike).
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 16384, **geometry)
    video_processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True, **geometry)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,  # Qwen2.5-VL-Instruct ships Qwen2-VL's template unchanged
    )
    config = Qwen2_5_VLConfig(
        text_config=qwen_text_config(tokenizer, max_positions=128000),
        # The real tower has 32 blocks with full attention in every 8th (7, 15, 23, 31) and windowed
        # attention elsewhere; two blocks keep one of each.
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_WIDTH["hidden_size"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            hidden_act="silu",
        ),
        **qwen_media_ids(tokenizer),
        tie_word_embeddings=False,  # as the 7B checkpoint (the 3B ties them)
    )
    return config, processor
