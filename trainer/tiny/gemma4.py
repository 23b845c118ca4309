"""google/gemma-4-E2B-it.

Published values come from transformers' convert_gemma4_weights.py (the script that wrote the Hub
checkpoints: its `gemma-4-e2b` variant, tokenizer and processor settings), the installed
configuration_gemma4.py defaults it leaves in place, and the E2B/31B chat templates as ollama checks
them in byte for byte (model/renderers/testdata/gemma4_{e2b,31b}_chat_template.jinja2, July 2026).
"""

from __future__ import annotations

from typing import Any

from trainer.tiny.common import QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab

# gemma-4-E2B-it, for the conversations mmloom renders (no tools, no reasoning fields, no
# enable_thinking from mmloom): "<bos>", then a system turn only for a system (or developer) message
# or enable_thinking, "<|turn>system\n" + text + "<turn|>\n" ("<|think|>\n" first with enable_thinking);
# a system message given as parts renders each text part trimmed and followed by a space. Turns are
# "<|turn>user\n" + body + "<turn|>\n" and "<|turn>model\n" + answer + "<turn|>\n", answers with any
# "<|channel>...<channel|>" thinking stripped; adjacent assistant messages continue one model turn.
# Media are single placeholders in place: "<|image|>", "<|video|>", "<|audio|>" (the processor expands
# them). The generation prompt is "<|turn>model\n". The tool declarations, tool calls and responses,
# and the replay of `reasoning` fields are left out: mmloom's samples have none of them.
_BODY = join(
    "{% macro strip_thinking(text) %}",
    "  {% set ns = namespace(result='') %}",
    "  {% for part in text.split('<channel|>') %}",
    "    {% if '<|channel>' in part %}{% set ns.result = ns.result + part.split('<|channel>')[0] %}",
    "    {% else %}{% set ns.result = ns.result + part %}{% endif %}",
    "  {% endfor %}",
    "  {{ ns.result | trim }}",
    "{% endmacro %}",
    "{% macro text(piece, model) %}",
    "  {% if model %}{{ strip_thinking(piece) }}{% else %}{{ piece | trim }}{% endif %}",
    "{% endmacro %}",
    "{% macro body(content, model) %}",
    "  {% if content is string %}{{ text(content, model) }}",
    "  {% elif content is sequence %}",
    "    {% for item in content %}",
    "      {% if item['type'] == 'text' %}{{ text(item['text'], model) }}",
    "      {% elif item['type'] in ['image', 'image_url'] %}{{ '<|image|>' }}",
    "      {% elif item['type'] in ['audio', 'input_audio'] %}{{ '<|audio|>' }}",
    "      {% elif item['type'] == 'video' %}{{ '<|video|>' }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% set enable_thinking = enable_thinking | default(false) %}",
    "{% set loop_messages = messages %}",
    "{{ bos_token }}",
    "{% set opens_with_system = messages and messages[0]['role'] in ['system', 'developer'] %}",
    "{% if enable_thinking or opens_with_system %}",
    "  {{ '<|turn>system\\n' }}",
    "  {% if enable_thinking %}{{ '<|think|>\\n' }}{% endif %}",
    "  {% if opens_with_system %}",
    "    {% if messages[0]['content'] is string %}{{ messages[0]['content'] | trim }}",
    "    {% else %}{% for item in messages[0]['content'] %}{{ item['text'] | trim + ' ' }}{% endfor %}",
    "    {% endif %}",
    "    {% set loop_messages = messages[1:] %}",
    "  {% endif %}",
    "  {{ '<turn|>\\n' }}",
    "{% endif %}",
    "{% set ns = namespace(previous=None) %}",
    "{% for message in loop_messages %}",
    "  {% set role = 'model' if message['role'] == 'assistant' else message['role'] %}",
    "  {% set after = loop_messages[loop.index0 + 1]['role'] if not loop.last else None %}",
    "  {% if not (role == 'model' and ns.previous == 'assistant') %}",
    "    {{ '<|turn>' + role + '\\n' }}",
    "  {% endif %}",
    "  {% if role == 'model' %}",
    "    {% generation %}{{ body(message['content'], true) }}",
    "    {% if after != 'assistant' %}{{ '<turn|>' }}{% endif %}{% endgeneration %}",
    "    {% if after != 'assistant' %}{{ '\\n' }}{% endif %}",
    "  {% else %}{{ body(message['content'], false) + '<turn|>\\n' }}",
    "  {% endif %}",
    "  {% set ns.previous = message['role'] %}",
    "{% endfor %}",
)
GEMMA4_CHAT_TEMPLATE = _BODY + "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
# gemma-4-26B-A4B-it / gemma-4-31B-it: the same, but with thinking off the generation prompt goes on with
# an empty, closed thought channel, which the rendered history never shows (trainer/models/gemma4.py).
GEMMA4_LARGE_CHAT_TEMPLATE = _BODY + join(
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}",
    "  {% if not enable_thinking %}{{ '<|channel>thought\\n<channel|>' }}{% endif %}",
    "{% endif %}",
)

# Gemma 4's SentencePiece vocabulary: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, control tokens in
# the low ids (<|channel> 100, <channel|> 101, <|turn> 105, <turn|> 106 = the config's second eos),
# <|image> 255999, <|audio> 256000, then <|image|> 258880, <|audio|> 258881, <image|> 258882,
# <audio|> 258883, <|video|> 258884 (Gemma4Config's defaults). The ids of the tool and think tokens are
# not published where we could read them: they sit before <|channel> here. The tokenizer adds no BOS
# (the converter's add_bos_token=False; the chat template writes it).
GEMMA4_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    head=(
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<mask>",
        "<|tool>",
        "<tool|>",
        "<|tool_call>",
        "<tool_call|>",
        "<|tool_response>",
        "<tool_response|>",
        '<|"|>',
        "<|think|>",
        "<|channel>",
        "<channel|>",
        "<|turn>",
        "<turn|>",
    ),
    tail=("<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    add_bos=False,
    # The published tokenizer_config.json's named tokens (GemmaTokenizer's extra_special_tokens).
    named={
        "mask_token": "<mask>",
        "image_token": "<|image|>",
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "audio_token": "<|audio|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
        "sot_token": "<|turn>",
        "eot_token": "<turn|>",
        "soc_token": "<|channel>",
        "eoc_token": "<channel|>",
        "think_token": "<|think|>",
        "escape_token": '<|"|>',
        "str_token": "<|tool_response>",
        "etr_token": "<tool_response|>",
        "stc_token": "<|tool_call>",
        "etc_token": "<tool_call|>",
        "std_token": "<|tool>",
        "etd_token": "<tool|>",
    },
)

# Soft tokens per image (the image processor's max_soft_tokens and the processor's image_seq_length)
# and per video frame (Gemma4VideoProcessor's default max_soft_tokens).
IMAGE_SOFT_TOKENS = 280
FRAME_SOFT_TOKENS = 70


def build(chat_template: str = GEMMA4_CHAT_TEMPLATE, **text: Any):
    """google/gemma-4-E2B-it: 16-px patches pooled 3x3, at most 280 tokens an image at its aspect ratio, PLE."""  # noqa: E501 (one line: python -m trainer.tiny --list)
    # `chat_template` and `text` (Gemma4TextConfig values replacing E2B's) give the variants that
    # tests/families/test_gemma4.py builds: 26B/31B masks and template, shared keys and values, MoE.
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4TextConfig,
        Gemma4VideoProcessor,
        Gemma4VisionConfig,
    )

    tokenizer = build_tokenizer(GEMMA4_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    processor = Gemma4Processor(
        # The audio front end is part of every published processor; mmloom never feeds it.
        feature_extractor=Gemma4AudioFeatureExtractor(),
        # Each image is resized at its aspect ratio to the largest multiple of 48 px (16-px patches, 3x3
        # pooling) a side that keeps it within 280 * 9 patches, and may be enlarged to get there; pixels
        # are only rescaled to [0, 1] (the patch embedder maps them to [-1, 1]).
        image_processor=Gemma4ImageProcessor(
            patch_size=16, max_soft_tokens=IMAGE_SOFT_TOKENS, pooling_kernel_size=3, do_normalize=False
        ),
        tokenizer=tokenizer,
        # Videos: 32 frames sampled, 70 soft tokens a frame, each frame "mm:ss <|image>...<image|>".
        video_processor=Gemma4VideoProcessor(
            patch_size=16, max_soft_tokens=FRAME_SOFT_TOKENS, pooling_kernel_size=3, num_frames=32
        ),
        chat_template=chat_template,
        image_seq_length=IMAGE_SOFT_TOKENS,
    )
    vocab = padded_vocab(tokenizer)
    config = Gemma4Config(
        # The on-device vision tower: 16-px patches, 3x3 pooling, learned 2-D position table of
        # 10240 a side, clipped linears (the 26B/31B tower: no clipping, standardized outputs).
        vision_config=Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            patch_size=16,
            pooling_kernel_size=3,
            position_embedding_size=10240,
            use_clipped_linears=True,
            standardize=False,
        ),
        text_config=Gemma4TextConfig(
            **{
                **TEXT_WIDTH,
                "num_key_value_heads": 1,  # E2B: MQA
                "vocab_size": vocab,
                "vocab_size_per_layer_input": vocab,
                # Per-layer embeddings (PLE): each layer adds a gated 256-wide per-token input (16 here).
                "hidden_size_per_layer_input": 16,
                # E2B: 35 layers, 4 sliding-window (512 tokens) to 1 full; full layers have heads twice
                # as wide (512 vs 256) and proportional rope on a quarter of them.
                "layer_types": ["sliding_attention", "full_attention"],
                "sliding_window": 512,
                "global_head_dim": 2 * TEXT_WIDTH["head_dim"],
                "rope_parameters": {
                    "full_attention": {
                        "rope_type": "proportional",
                        "partial_rotary_factor": 0.25,
                        "rope_theta": 1_000_000.0,
                    },
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                },
                # E2B's last 20 layers reuse the keys and values of the last earlier layer of their
                # type (with double-wide MLPs). Sharing needs a layer of each type before the shared
                # ones, so two layers cannot show it: the tests build a 4-layer variant that does.
                "num_kv_shared_layers": 0,
                "use_double_wide_mlp": True,
                "attention_k_eq_v": False,
                "use_bidirectional_attention": None,  # E2B/E4B: causal everywhere; 26B/31B: "vision"
                "final_logit_softcapping": 30.0,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-6,
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": [tokenizer.eos_token_id, ids("<turn|>")],
                "pad_token_id": tokenizer.pad_token_id,
                **text,
            }
        ),
        audio_config=None,  # E2B/E4B have a conformer audio tower; mmloom sends no audio
        boi_token_id=ids("<|image>"),
        eoi_token_id=ids("<image|>"),
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        boa_token_id=ids("<|audio>"),
        eoa_token_index=ids("<audio|>"),
        audio_token_id=ids("<|audio|>"),
    )
    return config, processor
