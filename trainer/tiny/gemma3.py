"""google/gemma-3-4b-it."""

from __future__ import annotations

from trainer.tiny.common import QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# gemma-3-4b-it: "<bos><start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n". A system
# prompt has no turn of its own: its (first) text part opens the first user turn, followed by "\n\n". Text
# parts are trimmed, an image is "<start_of_image>" in place (the processor expands it to
# "\n\n<start_of_image>" + 256 x "<image_soft_token>" + "<end_of_image>\n\n"). The published template also
# raises when roles do not alternate; that check is left out here (it changes no rendering, and a
# dataset's odd sample must be a counted skip, not an exception from inside the template).
GEMMA3_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content | trim }}{% else %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'image' %}{{ '<start_of_image>' }}",
    "      {% elif part['type'] == 'text' %}{{ part['text'] | trim }}",
    "      {% elif part['type'] == 'video' %}",
    "        {{ raise_exception('Gemma 3 takes no videos; send frames as images') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{{ bos_token }}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "  {% set content = messages[0]['content'] %}",
    "  {% set prefix = (content if content is string else content[0]['text']) + '\\n\\n' %}",
    "  {% set loop_messages = messages[1:] %}",
    "{% else %}",
    "  {% set prefix = '' %}",
    "  {% set loop_messages = messages %}",
    "{% endif %}",
    "{% for message in loop_messages %}",
    "  {% if message['role'] == 'assistant' %}",
    "    {{ '<start_of_turn>model\\n' }}",
    "    {% generation %}{{ body(message['content']) + '<end_of_turn>' }}{% endgeneration %}",
    "  {% else %}",
    "    {{ '<start_of_turn>' + message['role'] + '\\n' + (prefix if loop.first else '') }}",
    "    {{ body(message['content']) + '<end_of_turn>' }}",
    "  {% endif %}",
    "  {{ '\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
)

# Gemma's SentencePiece vocabulary starts with its control tokens (<pad> 0, <eos> 1, <bos> 2, <unk> 3,
# <mask> 4, [multimodal] 5, then <unused0..98>, <start_of_turn> 105, <end_of_turn> 106); the image tokens
# sit at the end (<start_of_image> 255999, <end_of_image> 256000, <image_soft_token> 262144). The unused
# tokens are left out. Gemma splits digits one by one, as the Qwen2 pattern does, and adds no prefix space.
GEMMA3_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    head=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "<start_of_turn>", "<end_of_turn>"),
    tail=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    add_bos=True,
    named={
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    },
)


def build():
    """google/gemma-3-4b-it: SigLIP at 896 px, 14-px patches average-pooled 4x4 -> 256 tokens per image, no pan & scan."""  # noqa: E501 (one line: python -m trainer.tiny --list)
    from transformers import (
        Gemma3Config,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer(GEMMA3_TOKENS)
    image_processor = Gemma3ImageProcessor(
        size={"height": 896, "width": 896},
        resample=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
        pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4,
        pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=256,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(
            image_size=896,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vision_use_head=False,
            layer_norm_eps=1e-6,
        ),
        text_config=Gemma3TextConfig(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            # The real model: 5 sliding-window layers (1024 tokens, local rope) to 1 global layer (linear rope
            # scaling 8); two layers keep one of each.
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=1024,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            query_pre_attn_scalar=TEXT_WIDTH["head_dim"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_WIDTH,
        ),
        mm_tokens_per_image=256,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    return config, processor
