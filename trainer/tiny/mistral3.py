"""mistralai/Mistral-Small-3.1-24B-Instruct-2503."""

from __future__ import annotations

from trainer.tiny.common import TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# Mistral V7-tekken: "<s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][INST]Q[IMG][/INST]A</s>[INST]Q2[/INST]", no spaces,
# media in place as [IMG]; add_generation_prompt adds nothing (the answer follows [/INST] directly).
# Without a system message the real template writes its default one, dated with strftime_now, so a
# render depends on the day it is made; kept, as inference sees it. Two changes from the published
# template, which reads `content[0]['text']` only: every part of an assistant message is rendered (an
# image in an answer would otherwise vanish from the text while its pixels stay), and a system message
# given as a string works (the published one tests `messages[0] is string`, never true).
MISTRAL3_DEFAULT_SYSTEM = (
    "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup "
    "headquartered in Paris.\\nYour knowledge base was last updated on 2023-10-01. The current date is "
    "' + strftime_now('%Y-%m-%d') + '.\\n\\nWhen you\\'re not sure about some information, you say that you "
    "don\\'t have the information and don\\'t make up anything.\\nIf the user\\'s question is not clear, "
    "ambiguous, or does not provide enough context for you to accurately answer the question, you do not try "
    'to answer it right away and you rather ask the user to clarify their request (e.g. "What are some good '
    'restaurants around me?" => "Where are you?" or "When is the next flight to Tokyo" => "Where do you '
    'travel from?")'
)
MISTRAL3_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'text' %}{{ part['text'] }}",
    "      {% elif part['type'] in ('image', 'image_url') %}{{ '[IMG]' }}",
    "      {% else %}{{ raise_exception('Mistral Small 3.1 takes text and images only') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{{ '<s>' }}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "  {% set system = body(messages[0]['content']) %}{% set loop_messages = messages[1:] %}",
    f"{{% else %}}{{% set system = '{MISTRAL3_DEFAULT_SYSTEM}' %}}{{% set loop_messages = messages %}}",
    "{% endif %}",
    "{{ '[SYSTEM_PROMPT]' + system + '[/SYSTEM_PROMPT]' }}",
    "{% for message in loop_messages %}",
    "  {% if message['role'] == 'user' %}{{ '[INST]' + body(message['content']) + '[/INST]' }}",
    "  {% elif message['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + body(message['content']) + '[/SYSTEM_PROMPT]' }}",
    "  {% elif message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content']) + '</s>' }}{% endgeneration %}",
    "  {% else %}{{ raise_exception('Only user, system and assistant roles are supported!') }}",
    "  {% endif %}",
    "{% endfor %}",
)

# Tekken's pre-tokenizer split (tiktoken style: cased words, single digits).
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The first 20 of tekken's 1000 control tokens, at their real ids ([IMG] = 10, [IMG_BREAK] = 12,
# [IMG_END] = 13); the other 980 are unused <SPECIAL_n> placeholders.
MISTRAL3_TOKENS = TokenizerSpec(
    pattern=TEKKEN_PATTERN,
    head=(
        "<unk>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[AVAILABLE_TOOLS]",
        "[/AVAILABLE_TOOLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
        "[TOOL_CALLS]",
        "[IMG]",
        "<pad>",
        "[IMG_BREAK]",
        "[IMG_END]",
        "[PREFIX]",
        "[MIDDLE]",
        "[SUFFIX]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[TOOL_CONTENT]",
    ),
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    unk="<unk>",
    add_bos=True,
)


def build():
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: Pixtral ViT, 14-px patches merged 2x2 at native size up to 1540 px."""  # noqa: E501 (one line: python -m trainer.tiny --list)
    # Native resolution: the longest edge is scaled down to 1540 px if larger, each edge rounded up to
    # 28 px (patch 14 x merge 2); one [IMG] per 28x28 px, [IMG_BREAK] after each row, [IMG_END] last.
    from transformers import (
        Mistral3Config,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    tokenizer = build_tokenizer(MISTRAL3_TOKENS)
    image_processor = PixtralImageProcessor(
        size={"longest_edge": 1540},
        patch_size={"height": 14, "width": 14},
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        spatial_merge_size=2,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            image_size=1540,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_act="silu",
            rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
        ),
        text_config=MistralConfig(
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
            sliding_window=None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_WIDTH,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        # The real checkpoint has its own output head (transformers 5 defaults mistral3 to tied).
        tie_word_embeddings=False,
    )
    return config, processor
