"""llava-hf/llava-1.5-7b-hf."""

from __future__ import annotations

from trainer.tiny.common import (
    CLIP_MEAN,
    CLIP_STD,
    LLAMA3_PATTERN,
    TEXT_WIDTH,
    TokenizerSpec,
    build_tokenizer,
    clip_336_tower,
    join,
    padded_vocab,
    vicuna_turns,
)

# llava-1.5 (vicuna_v1 conversation): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:".
# Images of a message come first, one "<image>\n" each, then its text parts joined by a space.
LLAVA_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% if content | selectattr('type', 'equalto', 'video') | list %}",
    "      {{ raise_exception('llava-1.5 takes no videos; send frames as images') }}",
    "    {% endif %}",
    "    {{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}",
    "    {{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}",
    "  {% endif %}",
    "{% endmacro %}",
) + vicuna_turns("llava-1.5")


LLAVA_TOKENS = TokenizerSpec(
    pattern=LLAMA3_PATTERN,
    head=("<unk>", "<s>", "</s>"),
    tail=("<image>", "<pad>"),
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    unk="<unk>",
    add_bos=True,
    named={"image_token": "<image>"},
)


def build():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (24x24 = 576 tokens per image), Llama text model."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer = build_tokenizer(LLAVA_TOKENS)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        resample=3,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped by "default"
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=clip_336_tower(),
        text_config=LlamaConfig(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_WIDTH,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return config, processor
