"""The packer: budget never exceeded, every sample exactly once, deterministic, well filled."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks.packing import llava_like_lengths, padded_efficiency
from trainer.data.packing import Packer, collate
from trainer.data.render import IGNORE, Rendered
from trainer.models.registry import get_adapter


def fake(n: int, key: str, rope: int = 1) -> Rendered:
    ids = torch.arange(1, n + 1)
    labels = ids.clone()
    labels[: n // 2] = IGNORE
    pos = torch.arange(n) if rope == 1 else torch.arange(n).expand(rope, -1).clone()
    return Rendered(
        input_ids=ids, labels=labels, position_ids=pos, key=key, source=n % 3, occurrence=int(key)
    )


def pack_all(lengths: list[int], max_tokens: int, buffer: int) -> list[list[Rendered]]:
    packer = Packer(max_tokens, buffer)
    packs = []
    for i, n in enumerate(lengths):
        packs.extend(packer.add(fake(n, str(i))))
    packs.extend(packer.flush())
    return packs


def test_budget_multiset_and_determinism() -> None:
    lengths = llava_like_lengths(3000)
    packs = pack_all(lengths, 4096, 64)
    assert all(sum(s.length for s in p) <= 4096 for p in packs)
    assert Counter(s.key for p in packs for s in p) == Counter(str(i) for i in range(len(lengths)))
    again = pack_all(lengths, 4096, 64)
    assert [[s.key for s in p] for p in packs] == [[s.key for s in p] for p in again]


def test_efficiency_on_a_llava_like_mix() -> None:
    # The bar is >= 0.97 at 8192; at 4096 about six ~650-token samples fill a pack and
    # the leftover is often smaller than any remaining sample.
    lengths = llava_like_lengths(4000)
    for max_tokens, bar in ((4096, 0.95), (8192, 0.99)):
        packs = pack_all(lengths, max_tokens, 128)
        eff = sum(lengths) / (len(packs) * max_tokens)
        assert eff >= bar, (max_tokens, eff)
    assert padded_efficiency(lengths, 8, grouped=False) < 0.8  # what packing saves


def test_exact_fit_and_a_sample_of_the_full_budget() -> None:
    packs = pack_all([10, 6, 4, 10], 10, 4)
    assert sorted(sorted(s.length for s in p) for p in packs) == [[4, 6], [10], [10]]


def test_collate_restarts_positions_and_ignores_first_labels(tiny) -> None:
    adapter = get_adapter(tiny("llava"))
    pack = collate(adapter, [fake(4, "1"), fake(3, "2")])
    ids, pos, labels = (pack.inputs[k][0] for k in ("input_ids", "position_ids", "labels"))
    assert ids[:7].tolist() == [1, 2, 3, 4, 1, 2, 3]
    assert pos[:7].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert labels[:7].tolist() == [IGNORE, IGNORE, 3, 4, IGNORE, 2, 3]
    assert (pack.tokens, pack.targets, pack.lengths) == (7, 4, [4, 3])
    assert pack.keys == [(1, "1", 1), (0, "2", 2)]
    # A text-only pack carries one grey image at the end, a block of its own with no labels, so
    # the vision tower runs on every rank every micro-batch.
    image_token = adapter.tokenizer.convert_tokens_to_ids(adapter.image_token)
    assert (ids[7:] == image_token).sum() == 576 and pos[7] == 0 and (labels[7:] == IGNORE).all()
    assert pack.inputs["pixel_values"].shape == (1, 3, 336, 336)


def test_empty_pack_is_the_dummy_alone(tiny) -> None:
    from trainer.data.packing import empty_pack

    adapter = get_adapter(tiny("qwen2_vl"))
    pack = empty_pack(adapter, {"bad_image:0": 1})
    assert pack.empty and pack.tokens == pack.targets == 0 and pack.skips == {"bad_image:0": 1}
    assert pack.inputs["position_ids"].shape[0] == 4 and "image_grid_thw" in pack.inputs


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("Qwen3_5Config", "linear_attention"),
        ("JambaConfig", "linear_attention"),
        ("Lfm2Config", "conv_L_cache"),
    ],
)
def test_a_model_whose_layers_carry_state_packs_one_sample_at_a_time(
    name: str, why: str, tmp_path: Path, caplog
) -> None:
    """Hybrid checkpoints under the generic adapter (Qwen3.5: 3 of 4 layers Gated DeltaNet linear
    attention, which only its family adapter packs per sample; Jamba: Mamba layers; LFM2: short
    convolutions, told by its config's fields): it does not pack them, and says why in the log."""
    import transformers

    getattr(transformers, name)().save_pretrained(tmp_path)
    adapter = get_adapter(tmp_path, family="generic")
    assert adapter.family == "generic"
    with caplog.at_level(logging.WARNING, logger="trainer.attention"):
        assert not adapter.packs_isolated
    assert "packing is off" in caplog.text and why in caplog.text
    packer = Packer(4096, 8, compatible=adapter.packs_with)
    packs = [p for i in range(20) for p in packer.add(fake(50 + i, str(i)))] + list(packer.flush())
    assert sorted(len(p) for p in packs) == [1] * 20


def test_attention_only_models_still_pack(tiny) -> None:
    adapter = get_adapter(tiny("llava"))
    assert adapter.packs_isolated
    packer = Packer(4096, 8, compatible=adapter.packs_with)
    packs = [p for i in range(20) for p in packer.add(fake(50 + i, str(i)))] + list(packer.flush())
    assert max(len(p) for p in packs) > 1 and sum(len(p) for p in packs) == 20


def test_a_pack_of_a_model_that_does_not_pack_carries_no_boundaries(tiny) -> None:
    """Qwen3.5 under the generic adapter: a pack holds one sample and no boundaries, which transformers'
    Gated DeltaNet refuses without its kernel; its family adapter packs and passes them (it runs those
    layers per sample)."""
    from tests.support.samples import PHOTOS, SAMPLES
    from trainer.data.render import render_sample

    for family, packs in (("generic", False), (None, True)):
        adapter = get_adapter(tiny("qwen3_5"), family=family)
        assert adapter.packs_isolated is packs
        pack = collate(adapter, [render_sample(adapter, SAMPLES[0], PHOTOS)])
        assert ({"cu_seq_lens_q", "mmloom_segments"} <= pack.inputs.keys()) is packs
