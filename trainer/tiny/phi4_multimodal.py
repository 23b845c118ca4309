"""microsoft/Phi-4-multimodal-instruct (the transformers-native port)."""

from __future__ import annotations

from trainer.tiny.common import TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# "<|system|>S<|end|><|user|>Q<|image|><|end|><|assistant|>A<|end|>", media in place. Changes from the
# published template: it ends a conversation rendered without the generation prompt with the EOS token
# (<|endoftext|> after the last <|end|>), so no conversation is a prefix of a longer one; that EOS is left
# out here (the adapter drops it from the published template too). Tool lists on the system message are
# not rendered (samples carry none), and videos raise instead of vanishing from the text.
PHI4_MULTIMODAL_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'image' %}{{ '<|image|>' }}",
    "      {% elif part['type'] == 'audio' %}{{ '<|audio|>' }}",
    "      {% elif part['type'] == 'text' %}{{ part['text'] }}",
    "      {% else %}"
    "{{ raise_exception('Phi-4-multimodal takes no ' + part['type'] + '; send frames as images') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% for message in messages %}",
    "  {{ '<|' + message['role'] + '|>' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content']) + '<|end|>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content']) + '<|end|>' }}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
)

# o200k's pre-tokenizer split (GPT-4o; Phi-4 uses its vocabulary).
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# After the learned vocabulary, in the real order: <|endoftext|> 199999, <|image|> 200010, <|audio|> 200011,
# then 200018 onwards.
PHI4_MULTIMODAL_TOKENS = TokenizerSpec(
    pattern=O200K_PATTERN,
    tail=(
        "<|endoftext|>",
        "<|image|>",
        "<|audio|>",
        "<|endofprompt|>",
        "<|assistant|>",
        "<|end|>",
        "<|user|>",
        "<|system|>",
        "<|tool|>",
        "<|/tool|>",
        "<|tool_call|>",
        "<|/tool_call|>",
        "<|tool_response|>",
        "<|tag|>",
    ),
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    add_bos=False,
    named={"image_token": "<|image|>", "audio_token": "<|audio|>"},
)


def build():
    """microsoft/Phi-4-multimodal-instruct: dynamic HD, up to 36 crops of 448 px plus a global view, SigLIP-448/14, 2x2 pooling."""  # noqa: E501 (one line: python -m trainer.tiny --list)
    # Each 448-px crop gives 16x16 tokens after 2x2 pooling; an image is the padding-free part of its crops,
    # a newline token per row, a separator, then the global view (256 tokens and 16 newlines).
    from transformers import (
        Phi4MultimodalAudioConfig,
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
        Phi4MultimodalVisionConfig,
    )

    tokenizer = build_tokenizer(PHI4_MULTIMODAL_TOKENS)
    image_processor = Phi4MultimodalImageProcessor(
        size={"height": 448, "width": 448}, patch_size=14, dynamic_hd=36
    )
    processor = Phi4MultimodalProcessor(
        image_processor=image_processor,
        audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer,
        chat_template=PHI4_MULTIMODAL_CHAT_TEMPLATE,
    )
    image_id, audio_id = tokenizer.convert_tokens_to_ids(["<|image|>", "<|audio|>"])
    rotary_half = int(TEXT_WIDTH["head_dim"] * 0.75) // 2
    config = Phi4MultimodalConfig(
        vision_config=Phi4MultimodalVisionConfig(
            image_size=448,
            patch_size=14,
            crop_size=448,
            feature_layer=-2,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_token_id=image_id,
        ),
        # The audio tower is never fed (mmloom sends no audio): as small as it can be.
        audio_config=Phi4MultimodalAudioConfig(
            hidden_size=32,
            intermediate_size=64,
            num_blocks=1,
            num_attention_heads=2,
            ext_pw_out_channel=32,
            depthwise_separable_out_channel=32,
            nemo_conv_channels=32,
            audio_token_id=audio_id,
        ),
        vocab_size=padded_vocab(tokenizer),
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0] * rotary_half,
            "long_factor": [1.0 + i for i in range(rotary_half)],
        },
        sliding_window=262144,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        **{k: v for k, v in TEXT_WIDTH.items() if k != "head_dim"},  # head_dim = hidden_size / heads here
    )
    return config, processor
