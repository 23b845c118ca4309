"""Qwen/Qwen3.5-27B (the small dense ones, Qwen3.5-0.8B to 9B, share its format and layout)."""

from __future__ import annotations

from trainer.tiny.common import TokenizerSpec, build_tokenizer, join, padded_vocab
from trainer.tiny.qwen2_5_vl import QWEN2_5_VL_TOKENS
from trainer.tiny.qwen2_vl import qwen_media_ids

# Qwen3.5's pre-tokenizer (transformers' tokenization_qwen3_5.py): Qwen2's, with combining marks
# (\p{M}) kept inside words.
QWEN3_5_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen3 special tokens in their order (Qwen3.5's ids keep Qwen3's offsets from <|endoftext|>:
# 248044 + 9 = <|vision_start|> 248053, + 12 = <|image_pad|> 248056, + 13 = <|video_pad|> 248057).
# Tokens Qwen3.5 may add after </think> are not verified and left out.
QWEN3_5_TOKENS = TokenizerSpec(
    pattern=QWEN3_5_PATTERN,
    tail=(*QWEN2_5_VL_TOKENS.tail, "<tool_response>", "</tool_response>", "<think>", "</think>"),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    add_bos=False,
)

# The published chat_template.jinja of Qwen3.5 (the same in the 27B, 9B and 35B-A3B), rendering what it
# renders for system, user and assistant turns with text, images and videos:
# - media in place as <|vision_start|><|image_pad|><|vision_end|> (<|video_pad|> for videos), numbered
#   ("Picture 1: ", "Video 1: ") with add_vision_id; images or videos in the system message raise;
# - no default system prompt; only a leading system message is rendered (text trimmed), a later one
#   raises; every message's text is trimmed;
# - an assistant turn after the last user query opens with a think block, "<think>\n" + its reasoning
#   (`reasoning_content`, or the text before "</think>" in its content) + "\n</think>\n\n"; earlier
#   assistant turns are rendered without it (so a conversation with later turns renders an answer
#   differently from the conversation that ends with it: trainer/models/qwen3_5.py);
# - the generation prompt is "<|im_start|>assistant\n<think>\n" (thinking, the default), or with an
#   empty think block "<think>\n\n</think>\n\n" when enable_thinking=false.
# Left out: tool definitions, tool calls and tool responses (mmloom's conversations have no tool turns;
# the scan for the last user query keeps the published test for a message of tool responses).
# `{% generation %}` marks the answer and its <|im_end|>.
QWEN3_5_CHAT_TEMPLATE = join(
    "{% set image_count = namespace(value=0) %}",
    "{% set video_count = namespace(value=0) %}",
    "{% macro render_content(content, do_vision_count, is_system_content=false) %}",
    "  {% if content is string %}{{ content }}",
    "  {% elif content is iterable and content is not mapping %}",
    "    {% for item in content %}",
    "      {% if 'image' in item or 'image_url' in item or item.type == 'image' %}",
    "        {% if is_system_content %}",
    "          {{ raise_exception('System message cannot contain images.') }}",
    "        {% endif %}",
    "        {% if do_vision_count %}{% set image_count.value = image_count.value + 1 %}{% endif %}",
    "        {% if add_vision_id %}{{ 'Picture ' ~ image_count.value ~ ': ' }}{% endif %}",
    "        {{ '<|vision_start|><|image_pad|><|vision_end|>' }}",
    "      {% elif 'video' in item or item.type == 'video' %}",
    "        {% if is_system_content %}",
    "          {{ raise_exception('System message cannot contain videos.') }}",
    "        {% endif %}",
    "        {% if do_vision_count %}{% set video_count.value = video_count.value + 1 %}{% endif %}",
    "        {% if add_vision_id %}{{ 'Video ' ~ video_count.value ~ ': ' }}{% endif %}",
    "        {{ '<|vision_start|><|video_pad|><|vision_end|>' }}",
    "      {% elif 'text' in item %}{{ item.text }}",
    "      {% else %}{{ raise_exception('Unexpected item type in content.') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% elif content is none or content is undefined %}{{ '' }}",
    "  {% else %}{{ raise_exception('Unexpected content type.') }}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% if not messages %}{{ raise_exception('No messages provided.') }}{% endif %}",
    "{% if messages[0].role == 'system' %}",
    "  {% set content = render_content(messages[0].content, false, true)|trim %}",
    "  {{ '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}",
    "{% endif %}",
    "{% set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}",
    "{% for message in messages[::-1] %}",
    "  {% set index = (messages|length - 1) - loop.index0 %}",
    "  {% if ns.multi_step_tool and message.role == 'user' %}",
    "    {% set content = render_content(message.content, false)|trim %}",
    "    {% if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}",
    "      {% set ns.multi_step_tool = false %}",
    "      {% set ns.last_query_index = index %}",
    "    {% endif %}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if ns.multi_step_tool %}{{ raise_exception('No user query found in messages.') }}{% endif %}",
    "{% for message in messages %}",
    "  {% set content = render_content(message.content, true)|trim %}",
    "  {% if message.role == 'system' %}",
    "    {% if not loop.first %}{{ raise_exception('System message must be at the beginning.') }}{% endif %}",
    "  {% elif message.role == 'user' %}",
    "    {{ '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}",
    "  {% elif message.role == 'assistant' %}",
    "    {% set reasoning_content = '' %}",
    "    {% if message.reasoning_content is string %}",
    "      {% set reasoning_content = message.reasoning_content %}",
    "    {% elif '</think>' in content %}",
    "      {% set reasoning_content = content.split('</think>')[0].rstrip('\\n')",
    "        .split('<think>')[-1].lstrip('\\n') %}",
    "      {% set content = content.split('</think>')[-1].lstrip('\\n') %}",
    "    {% endif %}",
    "    {% set reasoning_content = reasoning_content|trim %}",
    "    {% if loop.index0 > ns.last_query_index %}",
    "      {{ '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' }}",
    "    {% else %}",
    "      {{ '<|im_start|>' + message.role + '\\n' }}",
    "    {% endif %}",
    "    {% generation %}{{ content + '<|im_end|>' }}{% endgeneration %}",
    "    {{ '\\n' }}",
    "  {% else %}{{ raise_exception('Unexpected message role.') }}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}",
    "  {{ '<|im_start|>assistant\\n' }}",
    "  {% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}",
    "  {% else %}{{ '<think>\\n' }}",
    "  {% endif %}",
    "{% endif %}",
)

# Qwen3.5-27B's full-attention layers: 24 query heads and 4 key-value heads of 256, rope over the first
# quarter of each head (partial_rotary_factor 0.25: 64 dims, mrope_section [11, 11, 10] interleaved,
# rope_theta 1e7). The tiny keeps that head, so the rope is the real one, with 6 query heads for 1
# key-value head (the 27B's 6:1).
HEAD_DIM = 256
ROPE = {
    "rope_type": "default",
    "rope_theta": 10000000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [11, 11, 10],
    "mrope_interleaved": True,
}
# The 27B's Gated DeltaNet layers: 16 key heads and 48 value heads of 128, causal conv kernel 4; the
# tiny keeps the 1:3 and the kernel, with heads of 16.
LINEAR_ATTENTION = dict(
    linear_conv_kernel_dim=4,
    linear_num_key_heads=2,
    linear_num_value_heads=6,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
)
# The published layout is 3 Gated DeltaNet layers then 1 full-attention layer, repeated
# (full_attention_interval 4: 16 x 4 = 64 layers in the 27B). The tiny has 2 layers, one of each, in
# that order.
LAYER_TYPES = ["linear_attention", "full_attention"]


def processor(tokenizer):
    """Qwen3-VL's processor with the published Qwen3.5 preprocessor_config.json and
    video_preprocessor_config.json (both as Qwen3-VL's)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    geometry = dict(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096}, **geometry
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 64 * 64, "longest_edge": 24 * 1024 * 1024},
        cap_pixels_per_frame=True,  # the per-frame cap of qwen-vl-utils, as for Qwen3-VL
        **geometry,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_5_CHAT_TEMPLATE,
    )


def build_qwen3_5(config_class, hidden_size: int, attention_heads: tuple[int, int], **text):
    """(config, processor) of a tiny Qwen3.5 of `config_class` (dense or MoE): text width
    `hidden_size`, (query, key-value) heads of 256, the text config's other fields `text`."""
    tokenizer = build_tokenizer(QWEN3_5_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        text_config=dict(
            vocab_size=padded_vocab(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=len(LAYER_TYPES),
            layer_types=LAYER_TYPES,
            num_attention_heads=attention_heads[0],
            num_key_value_heads=attention_heads[1],
            head_dim=HEAD_DIM,
            rope_parameters=dict(ROPE),
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            eos_token_id=ids("<|endoftext|>"),  # the published text config's (248044)
            initializer_range=0.2,  # see trainer/tiny/common.py's TEXT_WIDTH
            **text,
        ),
        # The real tower: 27 blocks of width 1152 (16 heads, MLP 4304), 16-px patches merged 2x2 into the
        # text width, no DeepStack (unlike Qwen3-VL's); the learned 48x48 position grid is kept, resampled to
        # every image's patch grid.
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            hidden_act="gelu_pytorch_tanh",
        ),
        **qwen_media_ids(tokenizer),
        tie_word_embeddings=False,  # as the 27B and 9B (the 0.8B to 4B tie them)
    )
    return config, processor(tokenizer)


def init_weights(model) -> None:
    """Slow decays for the Gated DeltaNet recurrences: A (the state's decay rate, exp(A_log)) spread over
    0.05..1 per value head instead of the fresh init's 0.01..16, with which the state forgets nearly
    everything from one token to the next (a decay of exp(-16 x softplus(...)) per token). A state that
    lasts is what a leak across packed samples must be seen through (tests/families/test_qwen3_5.py),
    beyond the convolution's 3 earlier tokens; it also keeps the chunked delta rule's fp32 gradients
    as exact as the other families' (tests/unit/test_packed_loss.py compares them to 1e-6)."""
    import torch

    for module in model.modules():
        if type(module).__name__.endswith("GatedDeltaNet"):
            with torch.no_grad():
                module.A_log.copy_(torch.linspace(0.05, 1.0, module.A_log.numel()).log())


def build():
    """Qwen/Qwen3.5-27B: hybrid Gated DeltaNet / gated attention layers, 16-px patches, 2x2 merge,
    interleaved 3-D mrope over a quarter of each head."""
    from transformers import Qwen3_5Config

    return build_qwen3_5(
        Qwen3_5Config, hidden_size=64, attention_heads=(6, 1), intermediate_size=128, **LINEAR_ATTENTION
    )
