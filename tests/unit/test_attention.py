"""Packed attention (trainer/attention.py) from boundaries computed once per pack: no host reads
inside the language model's layers on the trainer's path (the old path, which found the boundaries
from position ids in every layer, had some); per-sample SDPA with a sliding window equals SDPA over
the dense block-diagonal banded mask; the flex BlockMask of a pack with bidirectional blocks marks
exactly the tiles its dense mask touches; the backend choice per family and device (mllama falls back
from flash-attn with a log line); compiled blocks under activation checkpointing compile and do not
recompile over packs of different make-up, with the eager loss."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.support.samples import PHOTOS, SAMPLES, sample
from trainer import attention
from trainer.data.packing import collate
from trainer.data.render import render_sample
from trainer.models.registry import get_adapter


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_decoder().layers


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "mistral3", "phi4_multimodal", "gemma3"])
def test_no_host_reads_inside_the_language_models_layers(tiny, family: str) -> None:
    path = tiny(family)
    adapter = get_adapter(path)
    model = adapter.load_model(attn_implementation=adapter.attn_implementation()).eval()
    inputs = dict(collate(adapter, [render_sample(adapter, s, PHOTOS) for s in SAMPLES]).inputs)
    inputs.pop("labels")
    assert len(inputs["mmloom_segments"]) == 3 and inputs["cu_seq_lens_q"][-1] == inputs["input_ids"].shape[1]
    with torch.no_grad(), attention.count_host_reads(decoder_layers(model)) as reads:
        trained = model(**inputs, use_cache=False).logits
    assert reads == []
    # The counter sees a layer that finds the boundaries from the position ids, as the old path did.
    from transformers import AttentionInterface

    def finding(module, query, key, value, mask, **kwargs):
        positions = kwargs["position_ids"].reshape(-1, query.shape[2])[0]
        torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().tolist()
        return attention.packed_attention(module, query, key, value, mask, **kwargs)

    AttentionInterface.register("finding", finding)
    old = adapter.load_model(attn_implementation=attention.per_module(adapter.config, "finding")).eval()
    with torch.no_grad(), attention.count_host_reads(decoder_layers(old)) as reads:
        old(**inputs, use_cache=False)
    assert len(reads) == 2 * old.config.get_text_config().num_hidden_layers
    sdpa = adapter.load_model(attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.allclose(trained, sdpa(**inputs, use_cache=False).logits, atol=1e-5, rtol=1e-5)


class Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("window", [None, 1, 3, 50])
def test_per_sample_attention_with_a_sliding_window_is_the_dense_masked_one(window: int | None) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    sizes = (5, 9, 1, 7)
    length = sum(sizes)
    q = torch.randn(1, 4, length, 8, generator=gen)
    k, v = (torch.randn(1, 2, length, 8, generator=gen) for _ in range(2))
    cu = torch.tensor([0, 5, 14, 15, 22], dtype=torch.int32)
    out, _ = attention.packed_attention(
        Module(),
        q,
        k,
        v,
        None,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=9,
        max_length_k=9,
        mmloom_segments=sizes,
        sliding_window=window,
    )
    sample = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    mask = (sample[:, None] == sample[None, :]) & (j <= i) & ((i - j < window) if window else True)
    expected, _ = sdpa_attention_forward(Module(), q, k, v, mask[None, None], is_causal=False)
    assert torch.allclose(out, expected, atol=1e-6)
    # The same from the tensor of boundaries alone (what a compiled block is given).
    again, _ = attention.packed_attention(
        Module(),
        q,
        k,
        v,
        None,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=9,
        max_length_k=9,
        sliding_window=window,
    )
    assert torch.equal(again, out)


@pytest.mark.parametrize("window", [None, 700])
def test_block_masks_are_the_dense_masks_by_tile(window: int | None) -> None:
    """12 samples in an 8192-token pack, each with a 256-token bidirectional block: the flex BlockMask
    marks a 128 x 128 tile partial or full exactly where the dense mask has some or all of it, the
    dense mask is the rule itself, and the kernel skips what a pack of 12 samples never attends."""
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([1000, 900, 820, 700, 680, 650, 640, 600, 560, 540, 520, 582])
    n = int(sizes.sum())
    sample = torch.repeat_interleave(torch.arange(12), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    block = torch.full((n,), -1)
    for i, start in enumerate(starts.tolist()):
        offset = int(torch.randint(0, 200, (), generator=gen))
        block[start + offset : start + offset + 256] = i
    ids = torch.stack([sample, block]).to(torch.int32)
    dense = attention.block_causal(ids, window, "sdpa")[0, 0]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    rule = (sample[i] == sample[j]) & ((j <= i) | ((block[i] == block[j]) & (block[i] >= 0)))
    assert torch.equal(dense, rule & (i - j < window) if window else rule)
    assert dense.triu(1).any()  # the blocks attend ahead
    flex = attention.block_causal(ids, window, attention.FLEX)
    tiles = dense.view(n // 128, 128, n // 128, 128)
    some, every = tiles.any(3).any(1), tiles.all(3).all(1)
    reference = create_block_mask(lambda b, h, q, kv: dense[q, kv], None, None, n, n, device="cpu")
    assert torch.equal(flex.to_dense()[0, 0].bool(), some) and torch.equal(
        reference.to_dense()[0, 0].bool(), some
    )
    full = torch.zeros_like(some)
    rows = flex.full_kv_num_blocks[0, 0]
    for row in range(n // 128):
        full[row, flex.full_kv_indices[0, 0, row, : rows[row]].long()] = True
    assert torch.equal(full, every)
    assert flex.sparsity() > 85  # % of tiles skipped


def test_backend_per_family_and_device(tiny, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from transformers import LlavaForConditionalGeneration, MllamaForConditionalGeneration

    llava = get_adapter(tiny("llava")).config
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention.choose(llava, LlavaForConditionalGeneration, cpu) == attention.PACKED
    assert get_adapter(tiny("gemma3")).attn_implementation() == "sdpa"  # dense masks: image blocks
    assert attention.choose_masked(cpu) == "sdpa" and attention.choose_masked(cuda) == attention.FLEX
    assert attention.choose(llava, LlavaForConditionalGeneration, cuda) == attention.VARLEN
    real = attention.importlib.util.find_spec
    monkeypatch.setattr(
        attention.importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "flash_attn" else real(name, *a),
    )
    assert attention.choose(llava, LlavaForConditionalGeneration, cuda) == "flash_attention_2"
    mllama = get_adapter(tiny("mllama")).config
    with caplog.at_level(logging.INFO, logger="trainer.attention"):
        assert attention.choose(mllama, MllamaForConditionalGeneration, cuda) == attention.VARLEN
    assert "does not support flash_attention_2" in caplog.text
    implementation = attention.per_module(llava, attention.VARLEN)
    assert implementation == {"vision_config": "sdpa", "text_config": attention.VARLEN, "": "sdpa"}


@pytest.mark.slow
def test_compiled_blocks_under_checkpointing_do_not_recompile(tiny) -> None:
    """train.compile with full activation checkpointing on CPU (inductor): graphs are compiled, packs of
    1 to 4 samples in any order reuse them (no new frame after the first pack), the loss is eager's."""
    from torch._dynamo.utils import counters

    from trainer.config import load_config
    from trainer.loop import micro_batch_loss
    from trainer.model import build_model

    path = tiny("llava")
    adapter = get_adapter(path)
    text = [
        render_sample(
            adapter,
            sample(str(i), [("user", ["Count to " + "ten " * i]), ("assistant", [f"{i} times."])]),
            PHOTOS,
        )
        for i in range(1, 5)
    ]
    make_up = [[0], [1, 2, 3, 0], [2, 3], [3, 1, 0], [1], [0, 2], [3, 2, 1], [2], [1, 3], [0, 1, 2, 3]]
    packs = [collate(adapter, [text[j] for j in indices]) for indices in make_up]
    assert len({p.inputs["mmloom_segments"] for p in packs}) == 10
    losses = {}
    for compiled in (False, True):
        cfg = load_config(
            None,
            [
                f"model.path={path}",
                "data.shards=unused",
                f"train.compile={compiled}",
                "train.activation_checkpointing=full",
                "finetune.freeze_vision=false",
            ],
        )
        model = build_model(adapter, cfg, rank=0, world=1).model
        torch._dynamo.reset()
        counters.clear()
        frames = []
        for pack in packs:
            loss = micro_batch_loss(model, adapter, pack, torch.device("cpu"), chunk=8)
            loss.backward()
            losses.setdefault(compiled, []).append(loss.item())
            frames.append(counters["frames"]["total"])
    assert counters["stats"]["unique_graphs"] >= 1 and frames[0] > 0
    assert frames[1:] == [frames[0]] * 9, frames  # nothing compiled after the first pack
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
def test_attention_benchmark_counts_host_reads_per_backend() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            str(repo / "benchmarks" / "attention.py"),
            "--tokens",
            "512",
            "--samples",
            "4",
            "9",
            "--repeats",
            "1",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(x["samples_per_pack"], x["backend"]) for x in lines] == [
        (n, b) for n in (4, 9) for b in (attention.PACKED, "per_layer_boundaries", "sdpa")
    ]
    for x in lines:
        assert "error" not in x and x["fwd_ms_per_layer"] > 0 and x["bwd_ms_per_layer"] > 0
        assert x["trainer_path"] == (x["backend"] == attention.PACKED)
        assert (
            x["host_reads_per_forward"]
            == {attention.PACKED: 0, "per_layer_boundaries": 4, "sdpa": 0}[x["backend"]]
        )
