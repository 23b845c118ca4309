"""HuggingFaceTB/SmolVLM2-2.2B-Instruct."""

from __future__ import annotations

from trainer.tiny.common import QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, padded_vocab
from trainer.tiny.idefics3 import IDEFICS3_CHAT_TEMPLATE

# SmolVLM2's published template is Idefics3's with "<|im_start|>" (its BOS) in place of
# "<|begin_of_text|>": "<|im_start|>User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n".
# A string content renders as one text part (the published template would drop it). Videos never
# reach this template: SmolVLMProcessor swaps in its own when a message holds one.
SMOLVLM_CHAT_TEMPLATE = IDEFICS3_CHAT_TEMPLATE.replace("{{ '<|begin_of_text|>' }}", "{{ '<|im_start|>' }}")
assert SMOLVLM_CHAT_TEMPLATE.count("<|im_start|>") == 1 and "<|begin_of_text|>" not in SMOLVLM_CHAT_TEMPLATE

# SmolLM2's vocabulary starts with its special tokens (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2, then
# code-corpus markers left out here); SmolVLM appends <global-img> 49152, <row_1_col_1>..<row_6_col_6>,
# <fake_token_around_image> 49189, <image> 49190, 88 reserved tokens (left out) and <end_of_utterance> 49279.
# SmolLM2 splits digits one by one, as the Qwen2 pattern does.
SMOLVLM_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    head=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    tail=(
        "<global-img>",
        *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
    ),
    bos="<|im_start|>",
    eos="<end_of_utterance>",
    pad="<|im_end|>",
    unk="<|endoftext|>",
    add_bos=False,
    named={
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    },
)


def build():
    """HuggingFaceTB/SmolVLM2-2.2B-Instruct: <= 4x4 384-px tiles + global, pixel shuffle 3: 81 tokens each."""
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tokenizer = build_tokenizer(SMOLVLM_TOKENS)
    geometry = dict(
        size={"longest_edge": 4 * 384},
        max_image_size={"longest_edge": 384},
        resample=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    image_processor = SmolVLMImageProcessor(do_image_splitting=True, **geometry)
    # Frames: one 384-px tile each, 1 frame/s, at most 64 (the checkpoint's video_sampling).
    video_processor = SmolVLMVideoProcessor(
        video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 384}},
        **{**geometry, "size": {"longest_edge": 384}},
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=81,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    config = SmolVLMConfig(
        vision_config=dict(
            image_size=384,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 273768.0},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_WIDTH,
        ),
        scale_factor=3,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return config, processor
