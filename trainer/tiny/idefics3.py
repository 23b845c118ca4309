"""HuggingFaceM4/Idefics3-8B-Llama3."""

from __future__ import annotations

from trainer.tiny.common import LLAMA3_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# Idefics3-8B-Llama3: "<|begin_of_text|>User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n".
# The role is capitalised ("System", "User", "Assistant"), parts are rendered in place, and a message
# that starts with an image has no space after the colon.
IDEFICS3_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ ' ' + content }}{% else %}",
    "    {% if not content or content[0]['type'] != 'image' %}{{ ' ' }}{% endif %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'text' %}{{ part['text'] }}",
    "      {% elif part['type'] == 'image' %}{{ '<image>' }}",
    "      {% elif part['type'] == 'video' %}",
    "        {{ raise_exception('Idefics3 takes no videos; send frames as images') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{{ '<|begin_of_text|>' }}",
    "{% for message in messages %}",
    "  {{ message['role'] | capitalize + ':' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content']) + '<end_of_utterance>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content']) + '<end_of_utterance>' }}",
    "  {% endif %}",
    "  {{ '\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
)


IDEFICS3_TOKENS = TokenizerSpec(
    pattern=LLAMA3_PATTERN,
    tail=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
        *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
    ),
    bos="<|begin_of_text|>",
    eos="<end_of_utterance>",
    pad="<|reserved_special_token_0|>",
    add_bos=True,
)


def build():
    """HuggingFaceM4/Idefics3-8B-Llama3: 364-px tiles of 14-px patches, pixel shuffle 2 -> 169 tokens each."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, LlamaConfig

    tokenizer = build_tokenizer(IDEFICS3_TOKENS)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True,
        size={"longest_edge": 4 * 364},
        max_image_size={"longest_edge": 364},
        resample=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=169,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(
            image_size=364,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=10240,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_WIDTH,
        ),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor
