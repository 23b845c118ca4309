"""Qwen/Qwen3-VL-8B-Instruct."""

from __future__ import annotations

from trainer.tiny.common import QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab
from trainer.tiny.qwen2_5_vl import QWEN2_5_VL_TOKENS
from trainer.tiny.qwen2_vl import QWEN_VL_BODY, qwen_media_ids

# Qwen3-VL-8B-Instruct's ChatML differs from Qwen2-VL's: no default system prompt, and the system
# message is rendered from its text parts only. Media are written in place as in Qwen2-VL, numbered
# ("Picture 1: ") with add_vision_id=True. One change from the published template: it renders only
# the text of assistant messages, so an image inside an answer would vanish from the text while
# the processor still receives it; here assistant media are rendered like the user's. Conversations
# without media in answers render exactly as the published template renders them.
QWEN3_VL_CHAT_TEMPLATE = QWEN_VL_BODY + join(
    "{% macro text_of(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% for part in content %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    # Only a leading system message counts, as in the published template.
    "{% if messages[0]['role'] == 'system' %}",
    "  {{ '<|im_start|>system\\n' + text_of(messages[0]['content']) + '<|im_end|>\\n' }}",
    "{% endif %}",
    "{% set counts = namespace(images=0, videos=0) %}",
    "{% for message in messages %}",
    "  {% if message['role'] == 'user' %}",
    "    {{ '<|im_start|>user\\n' + body(message['content'], counts) + '<|im_end|>\\n' }}",
    "  {% elif message['role'] == 'assistant' %}",
    "    {{ '<|im_start|>assistant\\n' }}",
    "    {% generation %}{{ body(message['content'], counts) + '<|im_end|>' }}{% endgeneration %}",
    "    {{ '\\n' }}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
)

# The Qwen3 vocabulary: Qwen2.5-VL's added tokens, then tool responses and thinking markers.
QWEN3_VL_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    tail=(*QWEN2_5_VL_TOKENS.tail, "<tool_response>", "</tool_response>", "<think>", "</think>"),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    add_bos=False,
)

# Qwen3-VL-8B: head_dim 128 with interleaved mrope_section [24, 20, 20] (THWTHW..., the leftover
# frequencies temporal). A head_dim of 32 scales that exactly, to [6, 5, 5]; TEXT_WIDTH's 16 cannot.
HEAD_DIM = 32
MROPE_SECTION = [6, 5, 5]


def build():
    """Qwen/Qwen3-VL-8B-Instruct: 16-px patches, 2x2 merge, interleaved 3-D mrope, DeepStack features."""
    from transformers import Qwen3VLConfig

    return build_qwen3_vl(Qwen3VLConfig, tie_word_embeddings=False)  # as the 8B (the 2B and 4B tie them)


def build_qwen3_vl(config_class, text_extra=None, **extra):
    """Qwen3-VL's processor and a tiny `config_class` (Qwen3-VL or its MoE) of the 8B's geometry, the
    text config given `text_extra`, the top-level config `extra`."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = build_tokenizer(QWEN3_VL_TOKENS)
    geometry = dict(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    # Pixel limits of the published preprocessor_config.json / video_preprocessor_config.json.
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096}, **geometry
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 64 * 64, "longest_edge": 24 * 1024 * 1024},
        cap_pixels_per_frame=True,
        **geometry,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = dict(TEXT_WIDTH, head_dim=HEAD_DIM)
    config = config_class(
        text_config=dict(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": MROPE_SECTION,
                "mrope_interleaved": True,
            },
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            hidden_act="silu",
            **text,
            **(text_extra or {}),
        ),
        # The real tower: 27 blocks of width 1152 whose blocks 8, 16 and 24 feed DeepStack mergers,
        # added to the first three decoder layers. Two blocks keep one intermediate DeepStack level
        # (reaching decoder layer 0 of 2). The learned 48x48 position grid is kept: it is resampled
        # to every image's patch grid.
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT_WIDTH["hidden_size"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[0],
            hidden_act="gelu_pytorch_tanh",
        ),
        **qwen_media_ids(tokenizer),
        **extra,
    )
    return config, processor
