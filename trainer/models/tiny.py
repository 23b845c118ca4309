"""Tiny random-weight checkpoints with the real token geometry of each supported model family.

Tests, the dry run and demos need a model directory that loads through exactly the same path as a
real checkpoint (`AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`) without any
download. Only widths, depths and the text vocabulary are shrunk: image size, patch size, merge
size, image tokens per image, image splitting, pixel limits, special tokens and the chat format are
those of the real model, so sequence lengths and packing behave as they will on the cluster.

    python -m trainer.models.tiny --list
    python -m trainer.models.tiny --family qwen2_vl --out /tmp/tiny-qwen2-vl

Building is deterministic (fixed seed, a BPE vocabulary learned by a deterministic procedure from
text generated here), so two builds give byte-identical files.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

SEED = 0

# ------------------------------------------------------------------------------------------------
# Chat templates. Written for this project; each renders exactly the real checkpoint's format.
# The environment transformers renders them in uses trim_blocks/lstrip_blocks, so every newline that
# belongs to the output is written as an expression ({{ '\n' }}) and the template source itself
# carries none. `{% generation %}` marks what the model produces (answer plus end-of-turn token), so
# `return_assistant_tokens_mask=True` works. Every template is prefix-consistent: rendering the first
# k messages (with the generation prompt when the next one is the assistant's) is a string prefix of
# rendering all of them.
# ------------------------------------------------------------------------------------------------


def _join(*lines: str) -> str:
    """One-line template source; the indentation of the lines below is for the reader only."""
    return "".join(line.strip() for line in lines)


# llava-1.5 (vicuna_v1 conversation): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:".
# Images of a message come first, one "<image>\n" each, then its text parts joined by a space.
LLAVA_CHAT_TEMPLATE = _join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% if content | selectattr('type', 'equalto', 'video') | list %}",
    "      {{ raise_exception('llava-1.5 takes no videos; send frames as images') }}",
    "    {% endif %}",
    "    {{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}",
    "    {{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% for message in messages %}",
    "  {% if message['role'] == 'system' %}{{ body(message['content']) + ' ' }}",
    "  {% elif message['role'] == 'user' %}{{ 'USER: ' + body(message['content']) + ' ' }}",
    "  {% elif message['role'] == 'assistant' %}",
    "    {{ 'ASSISTANT:' }}{% generation %}{{ ' ' + body(message['content']) + '</s>' }}{% endgeneration %}",
    "  {% else %}{{ raise_exception('llava-1.5 has no role ' + message['role']) }}",
    "  {% endif %}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
)

# Qwen2-VL-Instruct ChatML: a default system prompt unless the conversation starts with one; media
# in place, as <|vision_start|><|image_pad|><|vision_end|> (videos with <|video_pad|>), optionally
# numbered ("Picture 1: ") with add_vision_id=True.
QWEN2_VL_CHAT_TEMPLATE = _join(
    "{% macro body(content, counts) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'image' %}",
    "        {% set counts.images = counts.images + 1 %}",
    "        {% if add_vision_id %}{{ 'Picture ' + counts.images | string + ': ' }}{% endif %}",
    "        {{ '<|vision_start|><|image_pad|><|vision_end|>' }}",
    "      {% elif part['type'] == 'video' %}",
    "        {% set counts.videos = counts.videos + 1 %}",
    "        {% if add_vision_id %}{{ 'Video ' + counts.videos | string + ': ' }}{% endif %}",
    "        {{ '<|vision_start|><|video_pad|><|vision_end|>' }}",
    "      {% elif part['type'] == 'text' %}{{ part['text'] }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% set counts = namespace(images=0, videos=0) %}",
    "{% for message in messages %}",
    "  {% if loop.first and message['role'] != 'system' %}",
    "    {{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}",
    "  {% endif %}",
    "  {{ '<|im_start|>' + message['role'] + '\\n' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content'], counts) + '<|im_end|>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content'], counts) + '<|im_end|>' }}",
    "  {% endif %}",
    "  {{ '\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
)

# Idefics3-8B-Llama3: "<|begin_of_text|>User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n".
# The role is capitalised ("System", "User", "Assistant"), parts are rendered in place, and a message
# that starts with an image has no space after the colon.
IDEFICS3_CHAT_TEMPLATE = _join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ ' ' + content }}{% else %}",
    "    {% if not content or content[0]['type'] != 'image' %}{{ ' ' }}{% endif %}",
    "    {% for part in content %}",
    "      {% if part['type'] == 'text' %}{{ part['text'] }}",
    "      {% elif part['type'] == 'image' %}{{ '<image>' }}",
    "      {% elif part['type'] == 'video' %}",
    "        {{ raise_exception('Idefics3 takes no videos; send frames as images') }}",
    "      {% endif %}",
    "    {% endfor %}",
    "  {% endif %}",
    "{% endmacro %}",
    "{{ '<|begin_of_text|>' }}",
    "{% for message in messages %}",
    "  {{ message['role'] | capitalize + ':' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content']) + '<end_of_utterance>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content']) + '<end_of_utterance>' }}",
    "  {% endif %}",
    "  {{ '\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
)

# llava-v1.6-mistral-7b-hf (Mistral instruct): "<s>[INST] <image>\nQ [/INST] A</s>[INST] Q2 [/INST]".
# A system prompt goes before the first [INST] as "<<SYS>>\n...\n<</SYS>>\n\n", images of a message
# come first ("<image>\n" each), then its text parts joined by a space. llava-hf's published template
# writes the end of an answer as the text "<\s> " (a typo for </s>); this one writes the EOS token, as
# the model was trained.
LLAVA_NEXT_CHAT_TEMPLATE = _join(
    "{% macro body(content) %}",
    "  {% if content is string %}{{ content }}{% else %}",
    "    {% if content | selectattr('type', 'equalto', 'video') | list %}",
    "      {{ raise_exception('llava-v1.6 takes no videos; send frames as images') }}",
    "    {% endif %}",
    "    {{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}",
    "    {{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}",
    "  {% endif %}",
    "{% endmacro %}",
    "{% for message in messages %}",
    "  {% if message['role'] == 'system' %}",
    "    {{ '<<SYS>>\\n' + body(message['content']) + '\\n<</SYS>>\\n\\n' }}",
    "  {% elif message['role'] == 'user' %}{{ '[INST] ' + body(message['content']) + ' [/INST]' }}",
    "  {% elif message['role'] == 'assistant' %}",
    "    {% generation %}{{ ' ' + body(message['content']) + '</s>' }}{% endgeneration %}",
    "  {% else %}{{ raise_exception('llava-v1.6 has no role ' + message['role']) }}",
    "  {% endif %}",
    "{% endfor %}",
)

# ------------------------------------------------------------------------------------------------
# Tokenizers: a small byte-level BPE learned from text generated here, with each family's special
# tokens registered as single special tokens at the same relative places as in the real vocabulary.
# ------------------------------------------------------------------------------------------------

# Pre-tokenizer split patterns (public regexes of the real tokenizers). Qwen2 splits digits one by
# one; Llama 3 keeps runs of up to three digits together.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NUM_MERGES = 400


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    pattern: str
    head: tuple[str, ...] = ()  # special tokens that take the first ids (SentencePiece-style vocabularies)
    tail: tuple[str, ...] = ()  # special tokens appended after the learned vocabulary, in the real order
    bos: str | None
    eos: str
    pad: str
    unk: str | None = None
    add_bos: bool
    named: dict[str, str] = field(default_factory=dict)  # e.g. image_token -> "<image>", read by processors


_SUBJECTS = ("cat", "dog", "man", "woman", "child", "bird", "car", "train", "boat", "horse", "chart", "table")
_VERBS = ("sits on", "looks at", "stands near", "runs past", "shows", "holds", "is behind", "is next to")
_OBJECTS = ("the table", "a red box", "the green field", "two people", "the old house", "a blue sky",
            "the screen", "a small cup", "the open window", "three apples")
_QUESTIONS = ("What is shown in this image?", "Describe the picture in detail.", "How many people are there?",
              "What color is the car?", "Where was this photo taken?", "What happens in the video?",
              "Read the text in the image.", "Is there a dog in the picture?",
              "Yes. No. It is 3 o'clock, isn't it? I'm sure they're here.")
_CHAT_WORDS = ("USER: ", "ASSISTANT: ", "system\n", "user\n", "assistant\n", "System: ", "User: ",
               "Assistant: ", "You are a helpful assistant.", "Picture 1: ", "Video 1: ", "\n\n", "\n")


def _corpus() -> str:
    """Text the BPE is learned from: generated, so the tokenizer needs no download and never changes."""
    lines = [f"The {s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS]
    lines += [q for q in _QUESTIONS for _ in range(4)]
    lines += [w for w in _CHAT_WORDS for _ in range(8)]
    lines += [" ".join(str(n) for n in range(0, 1000, 7))]
    return "\n".join(lines)


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols in byte order (the GPT-2 byte -> printable character map)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted, chars = 0, {}
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _learn_merges(words: collections.Counter[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE with ties broken by the pair itself, so the result never depends on hashing or threads."""
    pieces = {word: list(word) for word in sorted(words)}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in pieces.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        for word, symbols in pieces.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            pieces[word] = merged
    return merges


def build_tokenizer(spec: TokenizerSpec):
    """A transformers fast tokenizer whose special tokens are each one token id."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = collections.Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(_corpus()))
    merges = _learn_merges(words, NUM_MERGES)
    alphabet = _byte_alphabet()
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in [*spec.head, *alphabet, *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = (*spec.head, *spec.tail)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    extra = [t for t in specials if t not in named.values()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: v for k, v in named.items() if v is not None},
        extra_special_tokens=extra,
        add_bos_token=spec.add_bos,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **spec.named,
    )
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Families
# ------------------------------------------------------------------------------------------------

# initializer_range: with the usual 0.02 a random 64-wide output head cannot produce a logit much
# above 1 (norm ~8 times rows of norm ~0.16), so a model whose head is frozen (LoRA, QLoRA) could
# never fit anything; 0.2 gives logits the range a trained head has.
TEXT_WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, initializer_range=0.2)


def _qwen_text_config(tokenizer, max_positions: int) -> dict:
    """The Qwen2 language model of Qwen2-VL and Qwen2.5-VL: ChatML ids, 3-D rope sections."""
    width = dict(TEXT_WIDTH)
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=_padded_vocab(tokenizer), max_position_embeddings=max_positions, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": _scaled_mrope(width.pop("head_dim"))},
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"), use_sliding_window=False, **width,
    )


def _qwen_media_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _clip_336_tower():
    """CLIP ViT-L/14 at 336 px (LLaVA-1.5 and LLaVA-NeXT), 2 layers of width 32."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=32, hidden_act="quick_gelu")


def _padded_vocab(tokenizer) -> int:
    # Real checkpoints pad the embedding table (llava: 32064); a multiple of 64 keeps that habit.
    return -(-len(tokenizer) // 64) * 64


LLAVA_TOKENS = TokenizerSpec(
    pattern=LLAMA3_PATTERN, head=("<unk>", "<s>", "</s>"), tail=("<image>", "<pad>"),
    bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True, named={"image_token": "<image>"},
)


def _llava():
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 (24x24 = 576 tokens per image), Llama text model."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer = build_tokenizer(LLAVA_TOKENS)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True, resample=3,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLS, dropped by "default"
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=_clip_336_tower(),
        text_config=LlamaConfig(
            vocab_size=_padded_vocab(tokenizer), max_position_embeddings=4096, rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TEXT_WIDTH,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    return config, processor


QWEN2_VL_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    tail=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
          "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
          "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
)
# Qwen2-VL-2B-Instruct: head_dim 128 with mrope_section [16, 24, 24] (sum 64 = head_dim / 2).
QWEN2_VL_REAL_MROPE = (16, 24, 24)


def _scaled_mrope(head_dim: int) -> list[int]:
    half, total = head_dim // 2, sum(QWEN2_VL_REAL_MROPE)
    sections = [s * half // total for s in QWEN2_VL_REAL_MROPE]
    sections[0] += half - sum(sections)
    return sections


def _qwen2_vl():
    """Qwen/Qwen2-VL-2B-Instruct: 14-px patches, 2x2 merge, 2-frame temporal patches, 3-D mrope."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = build_tokenizer(QWEN2_VL_TOKENS)
    geometry = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, **geometry)
    # Frame pixel limits: transformers' Qwen2-VL video defaults; the per-frame cap as qwen-vl-utils does it.
    video_processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True, **geometry)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, max_positions=32768),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=TEXT_WIDTH["hidden_size"], mlp_ratio=4, num_heads=2,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        **_qwen_media_ids(tokenizer),
        tie_word_embeddings=True,  # as the 2B checkpoint
    )
    return config, processor


IDEFICS3_TOKENS = TokenizerSpec(
    pattern=LLAMA3_PATTERN,
    tail=("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
          "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
          *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))),
    bos="<|begin_of_text|>", eos="<end_of_utterance>", pad="<|reserved_special_token_0|>", add_bos=True,
)


def _idefics3():
    """HuggingFaceM4/Idefics3-8B-Llama3: 364-px tiles of 14-px patches, pixel shuffle 2 -> 169 tokens each."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, LlamaConfig

    tokenizer = build_tokenizer(IDEFICS3_TOKENS)
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True, size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364},
        resample=1, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pad=True,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=169,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(
            image_size=364, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=_padded_vocab(tokenizer), max_position_embeddings=10240, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TEXT_WIDTH,
        ),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor


# Qwen2.5-VL adds tool-call and fill-in-the-middle tokens after Qwen2-VL's, in this order.
QWEN2_5_VL_TOKENS = TokenizerSpec(
    pattern=QWEN2_PATTERN,
    tail=(*QWEN2_VL_TOKENS.tail, "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
          "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _qwen2_5_vl():
    """Qwen/Qwen2.5-VL-7B-Instruct: 14-px patches, 2x2 merge, 2-frame temporal patches, windowed ViT."""
    # 112-px attention windows in the vision tower; 3-D mrope with absolute time (2 rope steps per
    # second of video).
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor)

    tokenizer = build_tokenizer(QWEN2_5_VL_TOKENS)
    geometry = dict(patch_size=14, temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN,
                    image_std=CLIP_STD)
    # Pixel limits of the published preprocessor_config.json (3B and 7B alike).
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 16384, **geometry)
    video_processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True, **geometry)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,  # Qwen2.5-VL-Instruct ships Qwen2-VL's template unchanged
    )
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, max_positions=128000),
        # The real tower has 32 blocks with full attention in every 8th (7, 15, 23, 31) and windowed
        # attention elsewhere; two blocks keep one of each.
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_WIDTH["hidden_size"],
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu",
        ),
        **_qwen_media_ids(tokenizer),
        tie_word_embeddings=False,  # as the 7B checkpoint (the 3B ties them)
    )
    return config, processor


# Mistral-7B-Instruct-v0.2's SentencePiece vocabulary with llava-hf's <image> (32000) and <pad> (32001).
LLAVA_NEXT_TOKENS = LLAVA_TOKENS
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava_next():
    """llava-hf/llava-v1.6-mistral-7b-hf: AnyRes 336-px views (base + tiles), CLIP ViT-L/14-336, Mistral."""
    # AnyRes: a 336-px base view plus the 336-px tiles of the best of five grid pinpoints (up to 672x672
    # or 1008x336); tile features lose rows or columns of pure padding and get a newline token per row.
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor, MistralConfig

    tokenizer = build_tokenizer(LLAVA_NEXT_TOKENS)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True, resample=3,
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, do_pad=True, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=_clip_336_tower(),
        text_config=MistralConfig(
            vocab_size=_padded_vocab(tokenizer), max_position_embeddings=32768, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, sliding_window=None,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **TEXT_WIDTH,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        use_image_newline_parameter=True,
    )
    return config, processor


FAMILIES: dict[str, Callable[[], tuple[object, object]]] = {
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
    "idefics3": _idefics3,
    "qwen2_5_vl": _qwen2_5_vl,
    "llava_next": _llava_next,
}


def build_tiny(family: str, out: str | Path) -> Path:
    """Write a tiny random-weight model plus its processor for `family` to `out`; return `out`."""
    import torch
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    out = Path(out)
    config, processor = FAMILIES[family]()
    # fork_rng: a fixed seed for the weights without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("wrote tiny %s (%d parameters) to %s", family, model.num_parameters(), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.models.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), help="model family to build")
    parser.add_argument("--out", type=Path, help="directory to write the checkpoint to")
    parser.add_argument("--list", action="store_true", help="print the families and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, builder in FAMILIES.items():
            print(f"{name}\t{builder.__doc__}")
        return 0
    if args.family is None or args.out is None:
        parser.error("--family and --out are required (or --list)")
    start = time.perf_counter()
    build_tiny(args.family, args.out)
    print(f"wrote tiny {args.family} to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
