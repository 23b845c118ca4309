"""google/paligemma-3b-pt-224."""

from __future__ import annotations

from trainer.tiny.common import QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# PaliGemma has no chat template: the model reads "<image>" x 256 per image, "<bos>", the prompt (the
# prefix, attended bidirectionally), "\n", then the answer and "<eos>" (the suffix, causal). Its
# processor writes part of that itself: given images, it puts <bos> after the last "<image>" of the
# text and appends "\n" to it. So this template, written for that processor, leaves both out, and
# `processor.apply_chat_template(..., add_generation_prompt=True, tokenize=True)` gives exactly the
# real prompt "<image>*256<bos>prompt\n". The rest extends the format to what a chat sample has:
# - the images of a message come first (before the <bos> the processor adds), then its text parts;
# - a system prompt is the first line of the first user message ("system\nprompt");
# - an answer is "\n" + answer + "<eos>" (the "\n" ends the prefix in the full text, where the
#   processor's "\n" lands at the very end instead), and each later user turn starts with "\n", so
#   the processed text of every prefix of the conversation is a prefix of the processed whole:
#   "<image>*256<bos>Q1\nA1<eos>\nQ2\nA2<eos>\n";
# - the generation prompt is empty (the processor's "\n" is the model's cue to answer).
# mmloom's PaliGemma adapter applies the same two processor steps when it renders a sample (with
# <bos> after the images that open the conversation, see trainer/models/paligemma.py).
PALIGEMMA_CHAT_TEMPLATE = join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ caller() + content }}{% else %}",
    "    {% if content | selectattr('type', 'equalto', 'video') | list %}",
    "      {{ raise_exception('PaliGemma takes no videos; send frames as images') }}",
    "    {% endif %}",
    "    {{ '<image>' * (content | selectattr('type', 'equalto', 'image') | list | length) }}",
    "    {{ caller() }}",
    "    {{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% if messages and messages[0]['role'] == 'system' %}",
    "  {% set content = messages[0]['content'] %}",
    "  {% set system = (content if content is string else content | map(attribute='text') | join(''))"
    " + '\\n' %}",
    "  {% set loop_messages = messages[1:] %}",
    "{% else %}",
    "  {% set system = '' %}",
    "  {% set loop_messages = messages %}",
    "{% endif %}",
    "{% for message in loop_messages %}",
    "  {% if message['role'] == 'assistant' %}",
    "    {{ '\\n' }}",
    "    {% generation %}{% call body(message['content']) %}{% endcall %}{{ '<eos>' }}{% endgeneration %}",
    "  {% else %}",
    "    {% if not loop.first %}{{ '\\n' }}{% endif %}",
    "    {% call body(message['content']) %}{{ system if loop.first else '' }}{% endcall %}",
    "  {% endif %}",
    "{% endfor %}",
)

# Gemma's SentencePiece vocabulary starts with <pad> 0, <eos> 1, <bos> 2, <unk> 3 (the unused control
# tokens after them are left out); PaliGemma appends 1024 <locXXXX> and 128 <segXXX> tokens (plain,
# not special) and then <image> (257152).
PALIGEMMA_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    head=("<pad>", "<eos>", "<bos>", "<unk>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    add_bos=True,
)


def build():
    """google/paligemma-3b-pt-224: SigLIP at 224 px, 14-px patches -> 256 tokens per image, bidirectional prefix."""  # noqa: E501 (one line: python -m trainer.tiny --list)
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    tokenizer = build_tokenizer(PALIGEMMA_TOKENS)
    tokenizer.add_tokens(EXTRA_TOKENS)  # before <image>, which the processor adds, as in the real vocab
    image_processor = SiglipImageProcessor(
        size={"height": 224, "width": 224}, resample=3, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    image_processor.image_seq_length = 256
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=PALIGEMMA_CHAT_TEMPLATE
    )
    # The processor turns <bos> off for its own calls (it places <bos> itself, and does so again when
    # it is loaded); the checkpoint's tokenizer, used alone, adds it.
    tokenizer.add_bos_token = True
    text = GemmaConfig(
        vocab_size=padded_vocab(tokenizer),
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_WIDTH,
    )
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            image_size=224,
            patch_size=14,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vision_use_head=False,
            projector_hidden_act="gelu_fast",
        ),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=text.vocab_size,
        projection_dim=text.hidden_size,
        hidden_size=text.hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor
