"""meta-llama/Llama-3.2-11B-Vision-Instruct."""

from __future__ import annotations

from trainer.tiny.common import (
    CLIP_MEAN,
    CLIP_STD,
    LLAMA3_PATTERN,
    TEXT_WIDTH,
    TokenizerSpec,
    build_tokenizer,
    join,
)

# Llama 3.2 Vision Instruct: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Q
# <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>", images in place as <|image|>, no
# trimming. The published template writes a system block ("Cutting Knowledge Date: December 2023\nToday Date:
# <date>\n\n" + the system prompt + "<|eot_id|>") when the user supplied a system message or when no message
# holds an image. Three changes, each needed to train on it:
# - the date is the template's own fallback, "26 Jul 2024": the published one prints today's date through
#   strftime_now, so the same sample would render differently from one day to the next;
# - "holds an image" is decided on the first message after the system prompt, not on all of them: the
#   published rule renders a conversation whose first image comes in a later turn differently once that
#   turn follows (not prefix-consistent). Both rules agree whenever the published one is prefix-consistent;
# - a system prompt given as typed parts is its text parts joined (the published one `trim`s the content
#   as a string, which prints a Python list for typed parts).
MLLAMA_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'text' %}{{ part['text'] }}",
    "      {% elif part['type'] == 'image' %}{{ '<|image|>' }}",
    "      {% elif part['type'] == 'video' %}",
    "        {{ raise_exception('Llama 3.2 Vision takes no videos; send frames as images') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% set ns = namespace(system='', supplied=false, image_first=false) %}",
    "{% set turns = messages %}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "  {% set ns.supplied = true %}",
    "  {% set turns = messages[1:] %}",
    "  {% if messages[0]['content'] is string %}{% set ns.system = messages[0]['content'] %}",
    "  {% else %}",
    "    {% for part in messages[0]['content'] %}",
    "      {% if part['type'] == 'text' %}{% set ns.system = ns.system + part['text'] %}{% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endif %}",
    "{% if turns and turns[0]['content'] is not string %}",
    "  {% for part in turns[0]['content'] %}",
    "    {% if part['type'] == 'image' %}{% set ns.image_first = true %}{% endif %}",
    "  {% endfor %}",
    "{% endif %}",
    "{{ '<|begin_of_text|>' }}",
    "{% if ns.supplied or not ns.image_first %}",
    "  {{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n' }}",
    "  {{ 'Today Date: 26 Jul 2024\\n\\n' + ns.system | trim + '<|eot_id|>' }}",
    "{% endif %}",
    "{% for message in turns %}",
    "  {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content']) + '<|eot_id|>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content']) + '<|eot_id|>' }}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
)

# The Llama 3.1 special tokens in their order (128000...), then <|image|> right after the text vocabulary
# (128256 in the real model, = text_config.vocab_size: the output head cannot produce it).
MLLAMA_TOKENS = TokenizerSpec(
    pattern=LLAMA3_PATTERN,
    tail=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|finetune_right_pad_id|>",
    add_bos=True,
)


def build():
    """meta-llama/Llama-3.2-11B-Vision-Instruct: 1-4 560-px tiles (1601 patches each) per <|image|> token.

    The tiles reach the language model through its cross-attention layers, not as tokens."""
    from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor

    tokenizer = build_tokenizer(MLLAMA_TOKENS)
    image_processor = MllamaImageProcessor(
        do_resize=True,
        size={"height": 560, "width": 560},
        max_image_tiles=4,
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_pad=True,
        do_convert_rgb=True,
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_CHAT_TEMPLATE
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")
    text = {k: v for k, v in TEXT_WIDTH.items() if k != "head_dim"}  # mllama: hidden_size / heads (= 16)
    config = MllamaConfig(
        # Width 16: the tile-position table holds 9 aspect ratios x 4 tiles x 1601 patches x width values.
        vision_config=dict(
            image_size=560,
            patch_size=14,
            max_num_tiles=4,
            hidden_size=16,
            attention_heads=2,
            intermediate_size=32,
            num_hidden_layers=2,
            num_global_layers=1,
            intermediate_layers_indices=[0, 1],
            vision_output_dim=16 * 3,
            norm_eps=1e-5,
            supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        ),
        # Layer 0 self-attention, layer 1 cross-attention (the 11B model: 40 layers, cross at 3, 8, ..., 38).
        text_config=dict(
            vocab_size=image_token_id,
            cross_attention_layers=[1],
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text,
        ),
        image_token_index=image_token_id,
    )
    return config, processor


def init_weights(model) -> None:
    """transformers initialises every tanh gate of the model at 0 (cross-attention and its MLP, the tile
    position embeddings), which switches the images off until training opens them; a released checkpoint
    has them open, so the tiny one does too (tanh(0.5) = 0.46)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gate", "cross_attn_attn_gate", "cross_attn_mlp_gate"):
                param.fill_(0.5)
