"""zai-org/GLM-4.5V."""

from __future__ import annotations

from trainer.tiny.common import LLAMA3_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join
from trainer.tiny.glm4v import GLM_SPECIAL, glm_processor, media_ids, text_config, vision_config

# GLM-4.5V's chat format: GLM-4.5's (the switchable thinking mode) with media in user messages. Its
# chat_template.jinja could not be read here; this renders what the same team's published GLM-OCR
# template renders (verbatim in a public copy, and the same GLM-4.5 vocabulary and processor family),
# whose generation prompt "<|assistant|>\n" is also what ms-swift's glm4_5v template renders for
# GLM-4.5V (strip_newline False). "[gMASK]<sop>", then "<|system|>\n" + the system text,
# "<|user|>\n" + the user's content (media as <|begin_of_image|><|image|><|end_of_image|>), and
# "<|assistant|>\n" + "<think>reasoning</think>" + "\n" + the answer stripped. An answer's reasoning
# is the message's reasoning_content, else what its content holds before </think>; it is kept only for
# answers after the last user message, earlier ones show "<think></think>" (trainer/models/glm4v.py
# keeps it everywhere, by rewriting the condition quoted here verbatim). enable_thinking=False appends
# "/nothink" to user messages and an empty reasoning block to the generation prompt. No end-of-turn
# token: the model stops by generating <|user|>. Tools are left out.
GLM4V_MOE_CHAT_TEMPLATE = join(
    "{% macro visible_text(content) %}",
    "  {% if content is string %}{{ content }}",
    "  {% elif content is iterable and content is not mapping %}",
    "    {% for item in content %}",
    "      {% if item is mapping and item['type'] == 'text' %}{{ item['text'] }}",
    "      {% elif item is mapping and (item['type'] == 'image' or 'image' in item) %}",
    "        {{ '<|begin_of_image|><|image|><|end_of_image|>' }}",
    "      {% elif item is mapping and (item['type'] == 'video' or 'video' in item) %}",
    "        {{ '<|begin_of_video|><|video|><|end_of_video|>' }}",
    "      {% elif item is string %}{{ item }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% else %}{{ content }}",
    "  {% endif %}",
    "{% endmacro %}",
    "{{ '[gMASK]<sop>' }}",
    "{% set ns = namespace(last_user_index=-1) %}",
    "{% for m in messages %}",
    "  {% if m['role'] == 'user' %}{% set ns.last_user_index = loop.index0 %}{% endif %}",
    "{% endfor %}",
    "{% for m in messages %}",
    "  {% if m['role'] == 'user' %}{{ '<|user|>\\n' + visible_text(m['content']) }}",
    "    {% set nothink = enable_thinking is defined and not enable_thinking %}",
    "    {% if nothink and not visible_text(m['content']).endswith('/nothink') %}{{ '/nothink' }}{% endif %}",
    "  {% elif m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}",
    "    {% set reasoning_content = '' %}",
    "    {% set content = visible_text(m['content']) %}",
    "    {% if m['reasoning_content'] is string %}{% set reasoning_content = m['reasoning_content'] %}",
    "    {% elif '</think>' in content %}",
    "      {% set reasoning_content = content.split('</think>')[0].rstrip('\\n') %}",
    "      {% set reasoning_content = reasoning_content.split('<think>')[-1].lstrip('\\n') %}",
    "      {% set content = content.split('</think>')[-1].lstrip('\\n') %}",
    "    {% endif %}",
    "    {% generation %}",
    "      {% if loop.index0 > ns.last_user_index and reasoning_content %}",
    "        {{ '<think>' + reasoning_content.strip() + '</think>' }}",
    "      {% else %}{{ '<think></think>' }}",
    "      {% endif %}",
    "      {% if content.strip() %}{{ '\\n' + content.strip() }}{% endif %}",
    "    {% endgeneration %}",
    "  {% elif m['role'] == 'system' %}{{ '<|system|>\\n' + visible_text(m['content']) }}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}",
    "  {% if enable_thinking is defined and not enable_thinking %}{{ '<think></think>\\n' }}{% endif %}",
    "{% endif %}",
)

# GLM-4.5's added tokens from 151329 on (the GLM-4.5V config's <|image|> 151363 and <|video|> 151364
# are the last two): GLM-4's first fourteen, audio and code markers, reasoning, tool-call and argument
# markers, /nothink and the grounding box markers, in the order of GLM-OCR's published
# tokenizer_config.json (same vocabulary). The reasoning and tool markers are special tokens here;
# in the published tokenizer decode(skip_special_tokens=True) keeps <think> (not verified which of
# them are special there).
GLM4V_MOE_TOKENS = TokenizerSpec(
    pattern=LLAMA3_PATTERN,
    tail=(
        *GLM_SPECIAL,
        "<|begin_of_audio|>",
        "<|end_of_audio|>",
        "<|begin_of_transcription|>",
        "<|end_of_transcription|>",
        "<|code_prefix|>",
        "<|code_middle|>",
        "<|code_suffix|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
        "/nothink",
        "<|begin_of_box|>",
        "<|end_of_box|>",
        "<|image|>",
        "<|video|>",
    ),
    bos=None,
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    add_bos=False,
)

# GLM-4.5V's text_config: 46 layers of width 4096, 96 heads of 128 (head_dim given: the attention is
# 12288 wide, three times the model) over 8 key-value heads, rope on half of each head with
# mrope_section [8, 12, 12], attention_bias true. Layer 0 is dense (first_k_dense_replace 1, MLP
# 10944); the other 45 route each token to 8 of 128 experts of width 1408 (n_group 1, topk_group 1,
# norm_topk_prob true, routed_scaling_factor 1.0) beside 1 shared expert; router_aux_loss_coef 0.0001.
# Tiny: 4 heads of 32 over 2 (attention twice the model's width; [2, 3, 3] is [8, 12, 12] for 32-wide
# heads), one dense and one MoE layer of 8 experts, 2 routed per token (8 of 8 would route every
# token everywhere), expert width 24 (1408 / 4096 of 64 is 22; torch's grouped_mm, which runs the
# experts, needs weight rows of a multiple of 16 bytes).
MOE = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    attention_bias=True,
    first_k_dense_replace=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=24,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
    router_aux_loss_coef=0.0001,
)


def init_weights(model) -> None:
    """A released GLM-4.5V's routers carry a learned correction of the expert scores
    (e_score_correction_bias: added to the sigmoid scores when choosing experts, not when weighting
    them), a fresh one zeros; the tiny routers get -0.1..0.1 over their experts, so the choice uses it."""
    import torch

    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.linspace(-0.1, 0.1, bias.numel()))


def build():
    """zai-org/GLM-4.5V: GLM-4.1V's vision and format on a mixture-of-experts GLM-4.5-Air."""
    from transformers import Glm4vMoeConfig

    tokenizer = build_tokenizer(GLM4V_MOE_TOKENS)
    processor = glm_processor(tokenizer, GLM4V_MOE_CHAT_TEMPLATE)
    config = Glm4vMoeConfig(
        text_config=text_config(tokenizer, **MOE),
        # The projector's width is the language model's dense MLP width, as 10944 is in the published config.
        vision_config=vision_config(intermediate_size=TEXT_WIDTH["intermediate_size"]),
        **media_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return config, processor
