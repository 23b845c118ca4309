"""meta-llama/Llama-4-Scout-17B-16E-Instruct."""

from __future__ import annotations

from trainer.tiny.common import TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# Llama-4-Scout-17B-16E-Instruct (the template transformers ships in processing_llama4.py; LLaMA-Factory's
# "llama4" template writes the same): "<|begin_of_text|><|header_start|>system<|header_end|>\n\nS<|eot|>
# <|header_start|>user<|header_end|>\n\n<|image|>Q<|eot|><|header_start|>assistant<|header_end|>\n\nA<|eot|>".
# The system prompt is trimmed (its first part when given as parts), other contents are not; an image is
# <|image|> in place (the processor expands it into its tiles). Kept out: the tool branches (custom_tools,
# tool_calls, ipython turns) and the date_string the published template sets but never prints. Added:
# `{% generation %}` around each answer and its <|eot|>, so return_assistant_tokens_mask works. The
# published template is prefix-consistent as it is.
LLAMA4_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'image' %}{{ '<|image|>' }}",
    "      {% elif part['type'] == 'text' %}{{ part['text'] }}",
    "      {% elif part['type'] == 'video' %}",
    "        {{ raise_exception('Llama 4 takes no videos; send frames as images') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{{ bos_token }}",
    "{% set turns = messages %}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "  {% set system = messages[0]['content'] %}",
    "  {{ '<|header_start|>system<|header_end|>\\n\\n' }}",
    "  {{ (system if system is string else system[0]['text']) | trim }}",
    "  {{ '<|eot|>' }}",
    "  {% set turns = messages[1:] %}",
    "{% endif %}",
    "{% for message in turns %}",
    "  {{ '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content']) + '<|eot|>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content']) + '<|eot|>' }}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|header_start|>assistant<|header_end|>\\n\\n' }}{% endif %}",
)

# meta-llama/llama-models models/llama4/tokenizer.py: tiktoken's o200k split pattern.
O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The named special tokens in their order after the 200000 text tokens (llama-models' tokenizer.py:
# <|begin_of_text|> 200000 ... <|eot|> 200008, <|python_start|> 200016, <|finetune_right_pad|> 200018,
# <|image_start|> 200080, <|image_end|> 200081, <|tile_x_separator|> 200084, <|tile_y_separator|> 200085,
# <|image|> 200090, <|patch|> 200092, the reasoning pair 201142-3); the ~1900 reserved ones are left out.
LLAMA4_TOKENS = TokenizerSpec(
    pattern=O200K_PATTERN,
    tail=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|header_start|>",
        "<|header_end|>",
        "<|eom|>",
        "<|eot|>",
        "<|step|>",
        "<|python_start|>",
        "<|python_end|>",
        "<|finetune_right_pad|>",
        "<|image_start|>",
        "<|image_end|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        "<|image|>",
        "<|patch|>",
        "<|reasoning_thinking_start|>",
        "<|reasoning_thinking_end|>",
    ),
    bos="<|begin_of_text|>",
    eos="<|eot|>",
    pad="<|finetune_right_pad|>",
    add_bos=True,
)


def build():
    """meta-llama/Llama-4-Scout-17B-16E-Instruct: up to 16 336-px tiles + a global view, 144 tokens each."""
    from transformers import Llama4Config, Llama4ImageProcessor, Llama4Processor

    tokenizer = build_tokenizer(LLAMA4_TOKENS)
    # preprocessor_config.json: 336-px tiles, at most 16 of them in the best-fitting grid (plus a 336-px
    # global view when there are several), bilinear, mean = std = 0.5, never resized to the largest canvas.
    image_processor = Llama4ImageProcessor(
        size={"height": 336, "width": 336},
        max_patches=16,
        resize_to_max_canvas=False,
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    # processor_config.json: patch_size 14, pixel_shuffle_ratio 0.5 -> (336 / 14)^2 / 4 = 144 tokens a tile.
    processor = Llama4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        pixel_shuffle_ratio=0.5,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = {k: v for k, v in TEXT_WIDTH.items() if k != "intermediate_size"}
    config = Llama4Config(
        # The real tower: 34 layers of width 1408 (16 heads) over 336-px tiles of 14-px patches; the MLP
        # width is 4x (5632), which the pixel shuffle relies on (4 patches become one token of 4x width);
        # projector_input_dim = projector_output_dim = vision_output_dim (4096).
        vision_config=dict(
            image_size=336,
            patch_size=14,
            hidden_size=32,
            intermediate_size=4 * 32,
            num_hidden_layers=2,
            num_attention_heads=2,
            pixel_shuffle_ratio=0.5,
            projector_input_dim=32,
            projector_output_dim=32,
            vision_output_dim=32,
            multi_modal_projector_bias=False,
            norm_eps=1e-5,
            hidden_act="gelu",
            vision_feature_select_strategy="default",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        text_config=dict(
            vocab_size=padded_vocab(tokenizer),
            # Scout: 48 layers, every 4th without rope (NoPE, full attention, temperature-tuned queries),
            # the others rope + chunked attention (8192-token chunks) + qk norm. Two layers keep one of each.
            no_rope_layers=[1, 0],
            attention_chunk_size=8192,
            attn_temperature_tuning=True,
            floor_scale=8192,
            attn_scale=0.1,
            use_qk_norm=True,
            # Every layer a mixture of experts (interleave_moe_layer_step 1): 16 routed experts (4 here),
            # top-1 with a sigmoid gate, plus a shared expert; expert width 8192, dense width 16384 (2x).
            interleave_moe_layer_step=1,
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size=TEXT_WIDTH["intermediate_size"],
            intermediate_size_mlp=2 * TEXT_WIDTH["intermediate_size"],
            hidden_act="silu",
            router_aux_loss_coef=0.001,
            # The Instruct model's 10M-token rope: llama3 scaling by 16 with both band factors 1 (the base
            # model has factor 8, bands 1 and 4, 262144 positions).
            max_position_embeddings=10485760,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 16.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
            },
            rms_norm_eps=1e-5,
            attention_bias=False,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=[ids("<|end_of_text|>"), ids("<|eom|>"), ids("<|eot|>")],
            pad_token_id=tokenizer.pad_token_id,
            **text,
        ),
        boi_token_index=ids("<|image_start|>"),
        eoi_token_index=ids("<|image_end|>"),
        image_token_index=ids("<|patch|>"),  # what the tile features replace (200092 in the real model)
        tie_word_embeddings=False,
    )
    return config, processor
