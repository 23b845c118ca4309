"""openbmb/MiniCPM-V-4.6."""

from __future__ import annotations

from trainer.tiny.common import QWEN2_PATTERN, TEXT_WIDTH, TokenizerSpec, build_tokenizer, join, padded_vocab
from trainer.tiny.qwen2_5_vl import QWEN2_5_VL_TOKENS
from trainer.tiny.qwen3_5 import init_weights  # noqa: F401 - build_tiny calls it: slow Gated DeltaNet decays

# The published chat template (tokenizer_config.json / chat_template.jinja of openbmb/MiniCPM-V-4.6,
# Qwen3.5's format): parts of a message joined by "\n", each image a bare <|image_pad|> (each video a
# <|video_pad|>) that the processor expands into <image_id>k</image_id><image>...</image><slice>...
# blocks; an assistant turn after the last user query gets a think block ("<think>\n" reasoning
# "\n</think>\n\n", reasoning taken from `reasoning_content` or a "<think>...</think>" prefix of its
# text), earlier ones only their answer. The generation prompt opens an empty think block unless
# enable_thinking=true (default false). Written here as one line (common.py), with `{% generation %}`
# around what the model writes; the published template's tool definitions, tool calls and tool turns
# are left out (mmloom's samples have none). Not prefix-consistent: an answer loses its think block
# once a later user turn follows (trainer/models/minicpmv4_6.py makes mmloom's copy consistent).
MINICPMV4_6_CHAT_TEMPLATE = join(
    "{% if enable_thinking is not defined %}{% set enable_thinking = false %}{% endif %}",
    "{% macro render_content(content, is_system_content=false) %}",
    "  {% if content is string %}{{ content }}",
    "  {% elif content is iterable and content is not mapping %}",
    "    {% set ns = namespace(parts=[]) %}",
    "    {% for item in content %}",
    "      {% if 'image' in item or 'image_url' in item or item.type == 'image' %}",
    "        {% if is_system_content %}",
    "          {{ raise_exception('System message cannot contain images.') }}",
    "        {% endif %}",
    "        {% set ns.parts = ns.parts + ['<|image_pad|>'] %}",
    "      {% elif 'video' in item or item.type == 'video' %}",
    "        {% if is_system_content %}",
    "          {{ raise_exception('System message cannot contain videos.') }}",
    "        {% endif %}",
    "        {% set ns.parts = ns.parts + ['<|video_pad|>'] %}",
    "      {% elif 'text' in item %}{% set ns.parts = ns.parts + [item.text] %}",
    "      {% else %}{{ raise_exception('Unexpected item type in content.') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "    {{ ns.parts | join('\\n') }}",
    "  {% elif content is none or content is undefined %}{{ '' }}",
    "  {% else %}{{ raise_exception('Unexpected content type.') }}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% if not messages %}{{ raise_exception('No messages provided.') }}{% endif %}",
    "{% if messages[0].role == 'system' %}",
    "  {{ '<|im_start|>system\\n' + render_content(messages[0].content, true) | trim + '<|im_end|>\\n' }}",
    "{% endif %}",
    # The last user query: assistant turns after it keep their think block.
    "{% set ns = namespace(multi_step_tool=true, last_query_index=messages | length - 1) %}",
    "{% for message in messages[::-1] %}",
    "  {% set index = (messages | length - 1) - loop.index0 %}",
    "  {% if ns.multi_step_tool and message.role == 'user' %}",
    "    {% set content = render_content(message.content) | trim %}",
    "    {% if not (content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}",
    "      {% set ns.multi_step_tool = false %}{% set ns.last_query_index = index %}",
    "    {% endif %}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if ns.multi_step_tool %}{{ raise_exception('No user query found in messages.') }}{% endif %}",
    "{% for message in messages %}",
    "  {% set content = render_content(message.content) | trim %}",
    "  {% if message.role == 'system' %}",
    "    {% if not loop.first %}{{ raise_exception('System message must be at the beginning.') }}{% endif %}",
    "  {% elif message.role == 'user' %}",
    "    {{ '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}",
    "  {% elif message.role == 'assistant' %}",
    "    {% set reasoning_content = '' %}",
    "    {% if message.reasoning_content is string %}{% set reasoning_content = message.reasoning_content %}",
    "    {% elif '</think>' in content %}",
    "      {% set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
    ".lstrip('\\n') %}",
    "      {% set content = content.split('</think>')[-1].lstrip('\\n') %}",
    "    {% endif %}",
    "    {% set reasoning_content = reasoning_content | trim %}",
    "    {% if loop.index0 > ns.last_query_index %}",
    "      {{ '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' }}",
    "    {% else %}{{ '<|im_start|>' + message.role + '\\n' }}",
    "    {% endif %}",
    "    {% generation %}{{ content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}",
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

# The Qwen3.5 vocabulary MiniCPM-V 4.6 keeps (<|endoftext|> 248044 .. <|video_pad|> 248057, the ids of
# the published config's eos_token_id, image_token_id and video_token_id; then tools, fill-in-the-middle,
# thinking and Qwen3.5's audio/speech tokens up to 248076), then MiniCPM-V's own markers: <video> 248077,
# <image> 248078, </image> 248079, <slice> 248088, </slice> 248089 (ids a public deployment of the
# checkpoint quotes), the MiniCPM-o grounding tokens between them and <image_id>, </image_id>, <unit>,
# </unit> after them (vocab_size 248094). The names and order of the speech, grounding and last four
# tokens are the MiniCPM-o 2.6 / Qwen3-Omni ones, not read from the published tokenizer.json; <unk>, the
# published tokenizer_config.json's unk_token, goes last (its real id is not known here).
MINICPMV4_6_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    tail=(
        *QWEN2_5_VL_TOKENS.tail,
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
        "<|audio_start|>",
        "<|audio_end|>",
        "<tts_pad>",
        "<tts_text_bos>",
        "<tts_text_eod>",
        "<tts_text_bos_single>",
        "<|audio_pad|>",
        "<video>",
        "<image>",
        "</image>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<quad>",
        "</quad>",
        "<point>",
        "</point>",
        "<slice>",
        "</slice>",
        "<image_id>",
        "</image_id>",
        "<unit>",
        "</unit>",
        "<unk>",
    ),
    # tokenizer_config.json names <|im_start|> the BOS token, but Qwen2Tokenizer never adds one.
    bos="<|im_start|>",
    eos="<|im_end|>",
    pad="<|endoftext|>",
    unk="<unk>",
    add_bos=False,
    # The processor reads these from the tokenizer (extra_special_tokens of tokenizer_config.json).
    named=dict(
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        image_start_token="<image>",
        image_end_token="</image>",
        slice_start_token="<slice>",
        slice_end_token="</slice>",
        image_id_start_token="<image_id>",
        image_id_end_token="</image_id>",
    ),
)

# Slicing and pixels of the published processor_config.json, for images and video frames alike: a
# source view of at most 448x448 px plus up to 9 slices of the best grid, 14-px patches, 16x token
# downsampling (a 2x2 window merger inside the tower, a 2x2 merger after it), mean = std = 0.5,
# bicubic, an <image_id>k</image_id> tag before every image; videos up to 128 frames, 1 a second.
PROCESSOR = dict(
    max_slice_nums=9,
    scale_resolution=448,
    patch_size=14,
    slice_mode=True,
    downsample_mode="16x",
    use_image_id=True,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    resample=3,
)


def build():
    """openbmb/MiniCPM-V-4.6: SigLIP2 NaViT slices of 448 px, 16x token merge, Qwen3.5 hybrid text model."""
    from transformers import (
        MiniCPMV4_6Config,
        MiniCPMV4_6ImageProcessor,
        MiniCPMV4_6Processor,
        MiniCPMV4_6VideoProcessor,
    )

    tokenizer = build_tokenizer(MINICPMV4_6_TOKENS)
    processor = MiniCPMV4_6Processor(
        image_processor=MiniCPMV4_6ImageProcessor(**PROCESSOR),
        video_processor=MiniCPMV4_6VideoProcessor(**PROCESSOR, max_num_frames=128, stack_frames=1),
        tokenizer=tokenizer,
        chat_template=MINICPMV4_6_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = MiniCPMV4_6Config(
        # Qwen3.5-0.8B's text model: 24 layers, three Gated DeltaNet (linear attention: 16 key and 16
        # value heads of 128, a causal convolution of width 4) then one full attention layer (8 heads of
        # 256 with an output gate, 2 key-value heads, a quarter of each head rotary, theta 1e7), tied
        # embeddings. Two layers keep one of each kind, in that order; 2 linear heads of 16.
        text_config=dict(
            model_type="qwen3_5_text",
            **TEXT_WIDTH,
            layer_types=["linear_attention", "full_attention"],
            linear_conv_kernel_dim=4,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            vocab_size=padded_vocab(tokenizer),
            max_position_embeddings=262144,
            rope_parameters={"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
            rms_norm_eps=1e-6,
            hidden_act="silu",
            tie_word_embeddings=True,
        ),
        # SigLIP2-400M at 14-px patches: 27 layers of width 1152, the 2x2 window-attention merger after
        # layer 6, learned positions for a 70x70 patch grid (image_size 980) that every slice's grid is
        # mapped onto. Two layers keep the merger between them (after layer 0).
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=14,
            image_size=980,
            window_kernel_size=[2, 2],
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        insert_layer_id=0,
        # image_size 1120 as published (read by no code of the model), one 2x2 merge after the tower.
        image_size=1120,
        downsample_mode="16x",
        merge_kernel_size=[2, 2],
        merger_times=1,
        drop_vision_last_layer=False,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        # The published config.json's eos_token_id is 248044, <|endoftext|> (its generation_config.json
        # stops at <|endoftext|> and <|im_end|>, 248044 and 248046).
        eos_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    return config, processor
