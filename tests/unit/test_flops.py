"""trainer/flops.py counts what the model computes: on a real pack of three samples (photographs,
text-only, several images), its step FLOPs equal torch's FlopCounterMode count of the trainer's own
forward and backward (micro_batch_loss with the chunked loss and the trainer's attention), exactly,
for full finetuning with a frozen and with a trained vision tower, with a frozen projector, and for
LoRA; a text-only pack counts no vision work; the peak table and the per-sample attention pairs."""

from __future__ import annotations

import types

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.support.samples import PHOTOS, SAMPLES
from trainer.config import load_config
from trainer.data.packing import collate
from trainer.data.render import render_sample
from trainer.flops import ModelFlops, _attention_layers, _table_peak, causal_pairs, peak_tflops
from trainer.models.registry import get_adapter


def trainer_model(path, overrides: list[str]):
    """The tiny checkpoint as the trainer holds it on CPU: its attention backend, LoRA, freezing."""
    from trainer.lora import apply_lora, lora_config
    from trainer.model import freeze

    cfg = load_config(None, [f"model.path={path}", "data.shards=unused", *overrides])
    adapter = get_adapter(path)
    model = adapter.load_model(dtype=torch.float32, attn_implementation=adapter.attn_implementation())
    if cfg.finetune.method == "lora":
        model = apply_lora(model, lora_config(adapter, model, cfg.finetune))
    freeze(model, adapter, cfg)
    return model.train(), adapter, cfg


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("qwen2_vl", []),
        ("llava", []),
        ("qwen2_vl", ["finetune.freeze_vision=false"]),
        # tied embedding and lm_head: the gradient starts there
        ("qwen2_vl", ["finetune.freeze_projector=true"]),
        ("llava", ["finetune.method=lora"]),
    ],
)
def test_step_flops_equal_torch_flop_counter(tiny, family: str, overrides: list[str]) -> None:
    from trainer.loop import micro_batch_loss

    model, adapter, cfg = trainer_model(tiny(family), overrides)
    pack = collate(adapter, [render_sample(adapter, s, PHOTOS) for s in SAMPLES])
    counter = FlopCounterMode(display=False)
    # The math kernel spells attention out as bmm, which the counter sees (the fused kernels it does not).
    with sdpa_kernel(SDPBackend.MATH), counter:
        micro_batch_loss(model, adapter, pack, torch.device("cpu"), chunk=cfg.train.loss_chunk).backward()
    counted = {str(k): v for k, v in counter.flop_counts["Global"].items()}
    flops = ModelFlops.of(model, adapter)
    parts = flops.forward_flops(pack)
    vision_trains = any(
        p.requires_grad for n, p in model.named_parameters() if adapter.param_group(n) == "vision"
    )
    assert flops.attention_backward["vision"] == vision_trains
    attention = 3 * parts["llm_attention"] + (3 if vision_trains else 1) * parts["vision_attention"]
    matmuls = sum(
        counted.get(f"aten.{op}", 0) for op in ("mm", "addmm", "convolution", "convolution_backward")
    )
    # Tolerance 0: the counts are integers and every matmul of the step is one the model must compute.
    assert matmuls == flops.step([pack]) - attention, (matmuls, flops.step([pack]) - attention)
    # The math kernel computes each sample's whole L x L square; the model's work is its causal half.
    text = adapter.config.get_text_config()
    square = 4 * sum(n * n for n in pack.lengths) * flops.text_width * text.num_hidden_layers
    assert counted["aten.bmm"] == 3 * square + (3 if vision_trains else 1) * parts["vision_attention"]
    assert (
        parts["llm_attention"]
        == 4 * sum(n * (n + 1) // 2 for n in pack.lengths) * flops.text_width * text.num_hidden_layers
    )
    assert parts["vision_attention"] > 0 and parts["projector"] > 0


def test_a_text_only_pack_counts_no_vision_work(tiny) -> None:
    model, adapter, _ = trainer_model(tiny("qwen2_vl"), [])
    text_only = collate(adapter, [render_sample(adapter, SAMPLES[1], PHOTOS)])
    assert text_only.dummy  # it carries the grey image, which is not the model's work
    flops = ModelFlops.of(model, adapter)
    parts = flops.forward_flops(text_only)
    assert parts["vision_linear"] == parts["vision_attention"] == parts["projector"] == 0
    assert parts["llm_linear"] == 2 * flops.forward["llm"] * text_only.tokens
    both = collate(adapter, [render_sample(adapter, s, PHOTOS) for s in SAMPLES])
    assert flops.step([both, text_only]) == flops.step([both]) + flops.step([text_only])


def test_peak_tflops_by_device_name_or_override() -> None:
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 123.0) == 123.0
    assert _table_peak("NVIDIA H100 80GB HBM3") == 989.4 and _table_peak("NVIDIA H100 PCIe") == 756.0
    assert _table_peak("NVIDIA A100-SXM4-80GB") == 312.0 and _table_peak("NVIDIA GeForce RTX 4090") is None


def test_attention_pairs_per_sample_and_window() -> None:
    for length in (1, 5, 17):
        for window in (None, 1, 4, 17, 40):
            brute = sum(min(i + 1, window or length) for i in range(length))
            assert causal_pairs(length, window) == brute, (length, window)
    gemma_like = types.SimpleNamespace(
        layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=512
    )
    assert _attention_layers(gemma_like) == ((1, None), (5, 512))
    mllama_like = types.SimpleNamespace(layer_types=None, num_hidden_layers=10, cross_attention_layers=[3, 8])
    assert _attention_layers(mllama_like) == ((8, None),)


def test_step_flops_count_wider_full_layers_and_patchified_pictures(tiny) -> None:
    """trainer/flops.py reads Gemma 4's per-layer head widths (the global head_dim is refused) and
    counts the vision tower on its patch tensors: the step's matmul FLOPs are exactly torch's count,
    and attention counts each layer type's causal pairs at its own width."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.data.packing import collate
    from trainer.data.render import render_sample
    from trainer.flops import ModelFlops, causal_pairs
    from trainer.loop import micro_batch_loss

    model, adapter, cfg = trainer_model(tiny("gemma4"), [])
    pack = collate(adapter, [render_sample(adapter, s, PHOTOS) for s in SAMPLES])
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        micro_batch_loss(model, adapter, pack, torch.device("cpu"), chunk=cfg.train.loss_chunk).backward()
    counted = {str(k): v for k, v in counter.flop_counts["Global"].items()}
    flops = ModelFlops.of(model, adapter)
    parts = flops.forward_flops(pack)
    assert not flops.attention_backward["vision"]  # the tower is frozen
    attention = 3 * parts["llm_attention"] + parts["vision_attention"]
    assert counted["aten.mm"] == flops.step([pack]) - attention
    text = adapter.config.get_text_config()
    widths = [layer.num_attention_heads * layer.head_dim for layer in text.per_layer_config]
    assert widths == [4 * 16, 4 * 32]  # sliding, full
    pairs = {
        kind: sum(
            causal_pairs(n, text.sliding_window if kind == "sliding_attention" else None)
            for n in pack.lengths
        )
        for kind in text.layer_types
    }
    assert parts["llm_attention"] == 4 * sum(pairs[k] * w for k, w in zip(text.layer_types, widths))
    # Each picture's 2520 patches (padding included, which the tower computes under its mask).
    assert parts["vision_attention"] == 4 * 3 * 2520**2 * 32 * 2
