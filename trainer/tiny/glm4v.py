"""zai-org/GLM-4.1V-9B-Thinking."""

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

# GLM-4.1V-9B-Thinking's chat_template.jinja, rendering exactly what the published one renders (its
# source, as the Hub snapshot 3c1471e5 holds it, is quoted in tests/families/test_glm4v.py, which
# compares the two): "[gMASK]<sop>", then "<|system|>\n", "<|user|>\n" and "<|assistant|>\n" before
# each message, media written as <|begin_of_image|><|image|><|end_of_image|> (videos:
# <|begin_of_video|><|video|><|end_of_video|>), and no end-of-turn token: a turn ends where the next
# role tag starts, and the model stops by generating <|user|> (the published config's eos_token_id:
# 151329 <|endoftext|>, 151336 <|user|>, 151338 <|observation|>). Only user messages may be lists of typed
# parts: the published template writes a system or assistant message's content as it is, so a list
# becomes its Python repr, and so does it here (trainer/models/glm4v.py renders them as text).
# Messages of other roles are left out, as there.
GLM4V_CHAT_TEMPLATE = join(
    "{{ '[gMASK]<sop>' }}",
    "{% for message in messages %}",
    "  {% if message['role'] == 'system' %}{{ '<|system|>\\n' }}{{ message['content'] }}",
    "  {% elif message['role'] == 'user' %}{{ '<|user|>\\n' }}",
    "    {% if message['content'] is string %}{{ message['content'] }}{% else %}",
    "      {% for part in message['content'] %}",
    "        {% if part['type'] == 'video' or 'video' in part %}",
    "          {{ '<|begin_of_video|><|video|><|end_of_video|>' }}",
    "        {% elif part['type'] == 'image' or 'image' in part %}",
    "          {{ '<|begin_of_image|><|image|><|end_of_image|>' }}",
    "        {% elif part['type'] == 'text' %}{{ part['text'] }}",
    "        {% endif %}",
    "      {% endfor %}",
    "    {% endif %}",
    "  {% elif message['role'] == 'assistant' %}",
    "    {{ '<|assistant|>' }}{% if message['metadata'] %}{{ message['metadata'] }}{% endif %}{{ '\\n' }}",
    "    {% generation %}{{ message['content'] }}{% endgeneration %}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
)

# The added tokens of the GLM-4 vocabulary, from 151329 on, as config.json's token ids place them
# (image_start 151339 ... video_end 151342, image 151343, video 151344); eos and pad <|endoftext|>, no
# BOS token (the chat template writes [gMASK]<sop> itself). Added tokens after 151344 are not
# verified here and not included. GLM-4's pre-tokenizer keeps runs of up to three digits together,
# like Llama 3's (not verified against the published tokenizer.json).
GLM_SPECIAL = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
GLM4V_TOKENS = TokenizerSpec(
    pattern=LLAMA3_PATTERN,
    tail=(*GLM_SPECIAL, "<|image|>", "<|video|>"),
    bos=None,
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    add_bos=False,
)

# GLM-4.1V-9B-Thinking: 40 layers of width 4096, 32 heads of 128 (2 key-value heads), rope on half of
# each head (partial_rotary_factor 0.5) with mrope_section [8, 12, 12] (temporal, height, width
# frequency pairs: 32 = 128 x 0.5 / 2), rope_theta 10000. The attention's head width is
# hidden_size / heads (Glm4vTextAttention reads no head_dim): 2 heads of 32 scale the sections
# exactly, to [2, 3, 3]; TEXT_WIDTH's 4 heads of 16 cannot.
HEADS = 2
MROPE_SECTION = [2, 3, 3]


def text_config(tokenizer, **extra) -> dict:
    """The GLM language model of GLM-4.1V and GLM-4.5V: GLM ids, half-rotary 3-D rope, 65536 positions."""
    ids = tokenizer.convert_tokens_to_ids
    width = {k: v for k, v in TEXT_WIDTH.items() if k != "head_dim"}
    config = dict(
        width,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        vocab_size=-(-len(tokenizer) // 64) * 64,
        max_position_embeddings=65536,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": MROPE_SECTION,
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|endoftext|>"), ids("<|user|>"), ids("<|observation|>")],
    )
    return {**config, **extra}


def vision_config(intermediate_size: int) -> dict:
    """The GLM-4.1V / GLM-4.5V tower (AIMv2-Huge: 24 blocks of width 1536, 12 heads, 336-px position
    grid of 14-px patches, 2-frame temporal patches, 2x2 merge by a strided convolution), 2 blocks of
    width 32. out_hidden_size is the language model's width; intermediate_size is the projector's
    (the language model's MLP width in both published configs)."""
    return dict(
        depth=2,
        hidden_size=32,
        num_heads=2,
        intermediate_size=intermediate_size,
        out_hidden_size=TEXT_WIDTH["hidden_size"],
        image_size=336,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        rms_norm_eps=1e-5,
        hidden_act="silu",
    )


def media_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
    )


def glm_processor(tokenizer, chat_template: str):
    """Glm4vProcessor with the published pixel limits of GLM-4.1V and GLM-4.5V."""
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    geometry = dict(
        patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    # preprocessor_config.json: 112x112 to 9633792 pixels for the temporal pair of an image (the
    # GLM-V family's published value; not read from the checkpoint here). video_preprocessor_config.json,
    # as GLM-4.1V's loaded processor prints it: 112x112 to 47040000 pixels for the whole clip, 2 frames
    # a second when the processor samples (mmloom passes the frames data_tools.video sampled).
    image_processor = Glm4vImageProcessor(size={"shortest_edge": 12544, "longest_edge": 9633792}, **geometry)
    video_processor = Glm4vVideoProcessor(
        size={"shortest_edge": 12544, "longest_edge": 47040000}, fps=2, **geometry
    )
    return Glm4vProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def build():
    """zai-org/GLM-4.1V-9B-Thinking: 14-px patches merged 2x2, 2-frame temporal patches, half-rotary 3-D rope."""  # noqa: E501
    from transformers import Glm4vConfig

    tokenizer = build_tokenizer(GLM4V_TOKENS)
    processor = glm_processor(tokenizer, GLM4V_CHAT_TEMPLATE)
    config = Glm4vConfig(
        text_config=text_config(tokenizer),
        # The projector's width is the language model's MLP width, as 13696 is in the published config.
        vision_config=vision_config(intermediate_size=TEXT_WIDTH["intermediate_size"]),
        **media_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return config, processor
