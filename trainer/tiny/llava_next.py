"""llava-hf/llava-v1.6-mistral-7b-hf."""

from __future__ import annotations

from trainer.tiny.common import (
    CLIP_MEAN,
    CLIP_STD,
    TEXT_WIDTH,
    build_tokenizer,
    clip_336_tower,
    join,
    padded_vocab,
)
from trainer.tiny.llava import LLAVA_TOKENS

# llava-v1.6-mistral-7b-hf (Mistral instruct): "<s>[INST] <image>\nQ [/INST] A</s>[INST] Q2 [/INST]".
# A system prompt goes before the first [INST] as "<<SYS>>\n...\n<</SYS>>\n\n", images of a message
# come first ("<image>\n" each), then its text parts joined by a space. llava-hf's published template
# writes the end of an answer as the text "<\s> " (a typo for </s>); this one writes the EOS token, as
# the model was trained.
LLAVA_NEXT_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% if content | selectattr('type', 'equalto', 'video') | list %}",
    "      {{ raise_exception('llava-v1.6 takes no videos; send frames as images') }}",
    "    {% endif %}",
    "    {{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}",
    "    {{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% for message in messages %}",
    "  {% if message['role'] == 'system' %}",
    "    {{ '<<SYS>>\\n' + body(message['content']) + '\\n<</SYS>>\\n\\n' }}",
    "  {% elif message['role'] == 'user' %}{{ '[INST] ' + body(message['content']) + ' [/INST]' }}",
    "  {% elif message['role'] == 'assistant' %}",
    "    {% generation %}{{ ' ' + body(message['content']) + '</s>' }}{% endgeneration %}",
    "  {% else %}{{ raise_exception('llava-v1.6 has no role ' + message['role']) }}",
    "  {% endif %}",
    "{% endfor %}",
)

# Mistral-7B-Instruct-v0.2's SentencePiece vocabulary with llava-hf's <image> (32000) and <pad> (32001).
LLAVA_NEXT_TOKENS = LLAVA_TOKENS
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build():
    """llava-hf/llava-v1.6-mistral-7b-hf: AnyRes 336-px views (base + tiles), CLIP ViT-L/14-336, Mistral."""
    # AnyRes: a 336-px base view plus the 336-px tiles of the best of five grid pinpoints (up to 672x672
    # or 1008x336); tile features lose rows or columns of pure padding and get a newline token per row.
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor, MistralConfig

    tokenizer = build_tokenizer(LLAVA_NEXT_TOKENS)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        resample=3,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        do_pad=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=clip_336_tower(),
        text_config=MistralConfig(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            sliding_window=None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_WIDTH,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        use_image_newline_parameter=True,
    )
    return config, processor
