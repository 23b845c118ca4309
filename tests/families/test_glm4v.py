"""zai-org/GLM-4.1V-9B-Thinking (tests/families/glm4v_facts.py): GLM-4's chat format, 14-px patches merged
2x2, timestamped video frames, half-rotary 3-D rope on a dense GLM-4 language model."""

from __future__ import annotations

from tests.families.glm4v_facts import GLM_SPECIAL_TOKENS, GlmVFacts
from tests.families.oracles import TEXT_ONLY, conversation

# GLM-4.1V-9B-Thinking's chat_template.jinja as published (Hub snapshot 3c1471e5, quoted from a public
# copy of it): the tiny checkpoint's template must render exactly what this renders.
PUBLISHED_TEMPLATE = (
    "[gMASK]<sop>\n{%- for msg in messages %}\n    {%- if msg.role == 'system' %}\n<|system|>\n"
    "{{ msg.content }}\n    {%- elif msg.role == 'user' %}\n<|user|>{{ '\\n' }}\n\n"
    "        {%- if msg.content is string %}\n{{ msg.content }}\n        {%- else %}\n"
    "            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n"
    "<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n{{ item.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n<|assistant|>{{ msg.metadata }}\n{{ msg.content }}\n"
    "        {%- else %}\n<|assistant|>\n{{ msg.content }}\n        {%- endif %}\n    {%- endif %}\n"
    "{%- endfor %}\n{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A system or assistant message's content is written as it is: mmloom's typed parts become their repr.
REPR = "[{'type': 'text', 'text': '%s'}]"


class TestGlm4v(GlmVFacts):
    FAMILY = "glm4v"
    SPECIAL_TOKENS = GLM_SPECIAL_TOKENS
    FULL_RENDER = (
        f"[gMASK]<sop><|system|>\n{REPR % 'You are terse.'}"
        "<|user|>\nWhat is this?<|begin_of_image|><|image|><|end_of_image|>"
        f"<|assistant|>\n{REPR % 'An astronaut.'}"
        "<|user|>\n<|begin_of_image|><|image|><|end_of_image|>And this?"
        f"<|assistant|>\n{REPR % 'A palace.'}"
    )
    ASSISTANT_TEXT = REPR % "An astronaut." + REPR % "A palace."
    TEXT_ONLY_RENDER = "[gMASK]<sop><|user|>\nHi<|assistant|>\nHello.<|user|>\nab<|assistant|>\n"
    TRAINING_RENDER = (
        "[gMASK]<sop><|system|>\nYou are terse.<|user|>\nWhat is this?"
        "<|begin_of_image|><|image|><|end_of_image|><|assistant|>\nAn astronaut."
        "<|user|>\n<|begin_of_image|><|image|><|end_of_image|>And this?<|assistant|>\nA palace.<|user|>"
    )

    def test_the_tiny_template_renders_as_the_published_one(self, path) -> None:
        """Every prefix of several conversations (typed and plain content, system prompts, media, think
        blocks, metadata), with and without the generation prompt."""
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        conversations = [
            conversation(),
            TEXT_ONLY,
            [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "?"}],
                },
                {"role": "assistant", "content": "<think>Look.</think><answer>A cat.</answer>"},
                {"role": "user", "content": "More?"},
                {"role": "assistant", "content": "No.", "metadata": "meta"},
            ],
        ]
        for messages in conversations:
            for k in range(1, len(messages) + 1):
                for prompt in (False, True):
                    published = proc.apply_chat_template(
                        messages[:k], chat_template=PUBLISHED_TEMPLATE, add_generation_prompt=prompt
                    )
                    assert proc.apply_chat_template(messages[:k], add_generation_prompt=prompt) == published
