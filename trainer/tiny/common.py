"""What every tiny family shares: a deterministic byte-level BPE tokenizer with the family's special
tokens, the one-line template helper, and the shrunken widths."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------------------
# Chat templates. Written for this project; each renders exactly the real checkpoint's format.
# The environment transformers renders them in uses trim_blocks/lstrip_blocks, so every newline that
# belongs to the output is written as an expression ({{ '\n' }}) and the template source itself
# carries none. `{% generation %}` marks what the model produces (answer plus end-of-turn token), so
# `return_assistant_tokens_mask=True` works. Every template is prefix-consistent: rendering the first
# k messages (with the generation prompt when the next one is the assistant's) is a string prefix of
# rendering all of them.
# ------------------------------------------------------------------------------------------------


def join(*lines: str) -> str:
    """One-line template source; the indentation of the lines below is for the reader only."""
    return "".join(line.strip() for line in lines)


# The turn loops of two chat formats, after a family's own `body(content)` macro.
# ChatML with no default system prompt (LLaVA-OneVision, InternVL3): every turn
# "<|im_start|>role\n" + body + "<|im_end|>\n", the answer and its <|im_end|> trained.
CHATML_TURNS = join(
    "{% for message in messages %}",
    "  {{ '<|im_start|>' + message['role'] + '\\n' }}",
    "  {% if message['role'] == 'assistant' %}",
    "    {% generation %}{{ body(message['content']) + '<|im_end|>' }}{% endgeneration %}",
    "  {% else %}{{ body(message['content']) + '<|im_end|>' }}",
    "  {% endif %}",
    "  {{ '\\n' }}",
    "{% endfor %}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
)


def vicuna_turns(model: str) -> str:
    """vicuna_v1 (LLaVA-1.5, LLaVA-NeXT-Video): "SYSTEM USER: Q ASSISTANT: A</s>USER: ..."."""
    return join(
        "{% for message in messages %}",
        "  {% if message['role'] == 'system' %}{{ body(message['content']) + ' ' }}",
        "  {% elif message['role'] == 'user' %}{{ 'USER: ' + body(message['content']) + ' ' }}",
        "  {% elif message['role'] == 'assistant' %}",
        "    {{ 'ASSISTANT:' }}{% generation %}{{ ' ' + body(message['content']) + '</s>' }}"
        "{% endgeneration %}",
        "  {% else %}{{ raise_exception('" + model + " has no role ' + message['role']) }}",
        "  {% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
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
_OBJECTS = (
    "the table",
    "a red box",
    "the green field",
    "two people",
    "the old house",
    "a blue sky",
    "the screen",
    "a small cup",
    "the open window",
    "three apples",
)
_QUESTIONS = (
    "What is shown in this image?",
    "Describe the picture in detail.",
    "How many people are there?",
    "What color is the car?",
    "Where was this photo taken?",
    "What happens in the video?",
    "Read the text in the image.",
    "Is there a dog in the picture?",
    "Yes. No. It is 3 o'clock, isn't it? I'm sure they're here.",
)
_CHAT_WORDS = (
    "USER: ",
    "ASSISTANT: ",
    "system\n",
    "user\n",
    "assistant\n",
    "System: ",
    "User: ",
    "Assistant: ",
    "You are a helpful assistant.",
    "Picture 1: ",
    "Video 1: ",
    "\n\n",
    "\n",
)


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


# initializer_range: with the usual 0.02 a random 64-wide output head cannot produce a logit much
# above 1 (norm ~8 times rows of norm ~0.16), so a model whose head is frozen (LoRA, QLoRA) could
# never fit anything; 0.2 gives logits the range a trained head has.
TEXT_WIDTH = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    initializer_range=0.2,
)


def padded_vocab(tokenizer) -> int:
    # Real checkpoints pad the embedding table (llava: 32064); a multiple of 64 keeps that habit.
    return -(-len(tokenizer) // 64) * 64


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_336_tower():
    """CLIP ViT-L/14 at 336 px (LLaVA-1.5 and LLaVA-NeXT), 2 layers of width 32."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
