"""Qwen/Qwen3-VL-8B-Instruct (tests/families/qwen3_vl_facts.py)."""

from __future__ import annotations

from tests.families.qwen3_vl_facts import Qwen3VLFacts


class TestQwen3VL(Qwen3VLFacts):
    FAMILY = "qwen3_vl"

    def check_geometry(self, config, processor) -> None:
        super().check_geometry(config, processor)
        assert not config.tie_word_embeddings  # the 8B's (the 2B and 4B tie them)
