"""benchmarks/memory.py's accounting against what real objects allocate: a tiny Qwen2.5-VL on CPU in the
trainer's dtype plan (trained parameters fp32, frozen bf16, QLoRA's base 4-bit), one real AdamW step;
the bytes of its parameters by dtype, gradients and AdamW states equal the prediction for one rank, and
the meta-device build picks the same trained and quantized parameters as the real model."""

from __future__ import annotations

import re
import types

import pytest
import torch

from benchmarks.memory import (
    GIB,
    NF4_BITS,
    RUNS,
    Run,
    activation_bytes,
    build,
    config_dir,
    measure,
    state_bytes,
    working_bytes,
)
from trainer.config import FinetuneConfig, LoraConfig, OptimConfig
from trainer.lora import apply_lora, lora_config
from trainer.model import freeze
from trainer.models.registry import get_adapter
from trainer.moe import expert_parameters
from trainer.optim import build_optimizer


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def real_model(adapter, method: str) -> torch.nn.Module:
    """The tiny checkpoint as the trainer holds it for `method`: trained fp32, frozen bf16 (or 4-bit)."""
    kwargs = {}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs = {
            "device_map": {"": "cpu"},
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=adapter.quant_skip_modules(),
            ),
        }
    model = adapter.load_model(dtype=torch.bfloat16, attn_implementation="sdpa", **kwargs)
    ft = FinetuneConfig(method=method, lora=LoraConfig(r=8, alpha=16))
    if method != "full":
        model = apply_lora(model, lora_config(adapter, model, ft))
    freeze(model, adapter, types.SimpleNamespace(finetune=ft))
    for p in model.parameters():
        if type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    return model.train()


def meta_build(adapter, method: str) -> tuple:
    return build(adapter, Run(model="tiny", method=method, gpus=1, grad_accum=1, shard_group=1, lora_r=8))


def real_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    out = dict.fromkeys(("params_fp32", "params_bf16", "params_4bit", "gradients", "optimizer"), 0)
    for p in model.parameters():
        if type(p).__name__ == "Params4bit":
            # The packed codes and the double-quantized absmax (the code tables are per tensor, ~1 KiB).
            state = p.quant_state
            out["params_4bit"] += sum(map(tensor_bytes, (p, state.absmax, state.state2.absmax)))
        else:
            out[{torch.float32: "params_fp32", torch.bfloat16: "params_bf16"}[p.dtype]] += tensor_bytes(p)
        if p.grad is not None:
            out["gradients"] += tensor_bytes(p.grad)
    for state in optimizer.state.values() if optimizer else ():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"].numel() == 1
        out["optimizer"] += tensor_bytes(state["exp_avg"]) + tensor_bytes(state["exp_avg_sq"])
    return out


def one_step(model: torch.nn.Module, adapter) -> torch.optim.Optimizer:
    """Forward and backward on one image and its caption (bf16 compute, as FSDP's policy), one AdamW step."""
    ids, media, _ = adapter.dummy_image
    text = torch.tensor(adapter.tokenizer("A grey square, nothing else.").input_ids)
    ids = torch.cat([ids, text])
    labels = torch.where(torch.arange(len(ids)) < len(ids) - len(text), -100, ids)
    inputs = adapter.model_inputs(ids, labels, adapter.position_ids(ids, media), media)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs, use_cache=False).loss
    loss.backward()
    optimizer = build_optimizer(model, adapter, OptimConfig(), fused=False)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("method", ["full", "lora"])
def test_predicted_bytes_equal_a_real_step(tiny, method: str) -> None:
    adapter = get_adapter(tiny("qwen2_5_vl"))
    model = real_model(adapter, method)
    optimizer = one_step(model, adapter)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert all(named[n].grad is not None for n in trainable)  # the image reached the merger
    real = real_bytes(model, optimizer)
    assert state_bytes(model, trainable, set(), shard=1) == real
    assert real["params_fp32"] > 0 and real["params_bf16"] > 0
    # The meta build of the same checkpoint trains the same parameters (names and all).
    meta, meta_trainable, quantized, base, _ = meta_build(adapter, method)
    assert meta_trainable == trainable and not quantized
    assert state_bytes(meta, meta_trainable, set()) == real
    added = ("lora_", "modules_to_save.")  # peft's: not in the checkpoint
    assert base == sum(p.numel() for n, p in named.items() if not any(a in n for a in added))
    # FSDP units by name: the root gathers all outside `layers.N.` / `blocks.N.`, and the biggest block twice.
    units: dict[str, list[str]] = {}
    for n in named:
        found = re.search(r"^(.*\.(layers|blocks)\.\d+)\.", n)
        units.setdefault(found.group(1) if found else "", []).append(n)
    gathered = {u: sum(named[n].numel() for n in ns) for u, ns in units.items()}
    grads = {u: sum(named[n].numel() for n in ns if n in trainable) for u, ns in units.items()}
    blocks = [u for u in units if u]
    assert working_bytes(model, trainable, set(), adapter) == {
        "params": 2 * (gathered[""] + 2 * max(gathered[u] for u in blocks)),
        "gradients": 6 * (grads[""] + max(grads[u] for u in blocks)),
    }
    # Two ranks: every trained tensor's fp32 master, gradient and states split in two (dim 0 padded).
    halves = state_bytes(model, trainable, set(), shard=2)
    padding = 8 * sum(named[n][0].numel() for n in trainable if named[n].dim() > 0)
    assert real["optimizer"] / 2 <= halves["optimizer"] <= real["optimizer"] / 2 + padding


def test_predicted_4bit_bytes_equal_the_quantized_model(tiny) -> None:
    adapter = get_adapter(tiny("qwen2_5_vl"))
    model = real_model(adapter, "qlora")
    quantized = {n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(quantized) == 7 * adapter.config.text_config.num_hidden_layers  # q k v o gate up down
    predicted = state_bytes(model, trainable, quantized)
    real = real_bytes(model, None)
    assert predicted["params_4bit"] == pytest.approx(real["params_4bit"], rel=0.01)
    assert predicted["params_fp32"] == real["params_fp32"] and predicted["params_bf16"] == real["params_bf16"]
    # The meta build quantizes and trains exactly these parameters.
    _, meta_trainable, meta_quantized, _, _ = meta_build(adapter, "qlora")
    assert (meta_trainable, meta_quantized) == (trainable, quantized)
    # Every rank holds the whole 4-bit base, however many ranks shard the rest.
    assert state_bytes(model, trainable, quantized, shard=4)["params_4bit"] == predicted["params_4bit"]
    assert NF4_BITS == pytest.approx(4.127, abs=1e-3)


# The mixture-of-experts rows: the published sizes on the meta device, the experts sharded with their layer.
MOE = {
    # name: (decoder layers, experts, routed per token, moe_intermediate_size, hidden size)
    "Qwen/Qwen3-VL-30B-A3B-Instruct": (48, 128, 8, 768, 2048),
    "Qwen/Qwen3.5-35B-A3B": (40, 256, 8, 512, 2048),
}


@pytest.fixture(scope="module")
def moe_adapters(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    return {name: get_adapter(config_dir(name, root / name.split("/")[1])) for name in MOE}


@pytest.fixture(scope="module")
def moe_rows(moe_adapters) -> dict:
    """benchmarks/memory.py's JSON line of every MoE run, by (model, method, gpus, lora_experts)."""
    runs = [run for run in RUNS if run.model in MOE]
    return {
        (run.model, run.method, run.gpus, run.lora_experts): measure(moe_adapters[run.model], run, 8192)
        for run in runs
    }


def test_moe_rows_full_and_lora_on_8_gpus_and_the_smallest_count_that_fits(moe_rows) -> None:
    for name in MOE:
        rows = {key[1:]: row for key, row in moe_rows.items() if key[0] == name}
        assert set(rows) == {("full", 8, False), ("full", 16, False), ("lora", 8, False), ("lora", 8, True)}
        # Full finetuning does not fit on 8 GPUs (kept for comparison); 16, sharded over all, does.
        on8, on16 = rows["full", 8, False], rows["full", 16, False]
        assert not on8["required"] and not on8["fits_80gb"]
        assert on16["required"] and on16["fits_80gb"] and on16["shard_group"] == 16
        # The fp32 master, gradient and two AdamW states of every trained weight: half as much per rank on 16.
        assert on8["per_rank_gib"]["optimizer"] == pytest.approx(on8["trainable_params"] / GIB, rel=0.01)
        assert on16["per_rank_gib"]["optimizer"] == pytest.approx(
            on8["per_rank_gib"]["optimizer"] / 2, abs=0.01
        )
        for key in (("lora", 8, False), ("lora", 8, True)):
            lora = rows[key]
            assert lora["required"] and lora["fits_80gb"] and lora["assumptions"]["lora_r"] == 64
            # The frozen bf16 base, experts included, sharded over the 8 ranks.
            assert lora["per_rank_gib"]["params_bf16"] == pytest.approx(
                lora["bf16_checkpoint_gib"] / 8, rel=0.02
            )
    assert not any(run.method == "qlora" for run in RUNS if run.model in MOE)  # refused for MoE models


@pytest.mark.parametrize("name", list(MOE))
def test_moe_parameters_match_the_published_sizes_and_experts_shard_over_8_ranks(moe_adapters, name) -> None:
    adapter = moe_adapters[name]
    layers, experts_per_layer, top_k, inter, hidden = MOE[name]
    run = next(r for r in RUNS if r.model == name and r.method == "full" and r.gpus == 8)
    model, trainable, _, base, _ = build(adapter, run)
    named = dict(model.named_parameters())
    experts = set(expert_parameters(model))
    expert_params = sum(named[n].numel() for n in experts)
    # gate_up [experts, 2 x inter, hidden] and down [experts, hidden, inter] in every decoder layer.
    assert expert_params == layers * experts_per_layer * 3 * inter * hidden
    llm = sum(p.numel() for n, p in named.items() if adapter.param_group(n) == "llm")
    active = llm - expert_params + expert_params * top_k // experts_per_layer
    if name == "Qwen/Qwen3-VL-30B-A3B-Instruct":
        # Qwen3-30B-A3B's text model: 30.5B total, 3.3B active (its model card); keras-hub lists the same
        # backbone (Qwen3-Omni's thinker) at 30,532,122,624. The checkpoint: 31.07B with the vision tower.
        assert llm == 30_532_122_624
        assert 3.3e9 < active < 3.4e9
        assert 31.0e9 < base < 31.1e9
    else:
        # "35B total / 3B active" (transformers' docs); the checkpoint's MTP layer is not built.
        assert 34.5e9 < base < 35.5e9
        assert 3.0e9 < active < 3.6e9
    # Full finetuning trains the experts: their fp32 master, gradient and AdamW states, 1/8 on each rank
    # (dim 0, the experts, splits evenly).
    with_experts = state_bytes(model, trainable, set(), shard=8)
    without = state_bytes(model, trainable - experts, set(), shard=8)
    assert experts <= trainable
    assert with_experts["params_fp32"] - without["params_fp32"] == 4 * expert_params // 8
    assert with_experts["optimizer"] - without["optimizer"] == 8 * expert_params // 8
    assert without["params_bf16"] - with_experts["params_bf16"] == 2 * expert_params // 8
    # Gathered for compute, a decoder layer holds all its experts: the biggest unit, twice with prefetch.
    units: dict[str, int] = {}
    for n, p in named.items():
        found = re.search(r"^(.*\.(layers|blocks)\.\d+)\.", n)
        unit = found.group(1) if found else ""
        units[unit] = units.get(unit, 0) + p.numel()
    biggest = max(v for u, v in units.items() if u)
    assert biggest > experts_per_layer * 3 * inter * hidden
    assert working_bytes(model, trainable, set(), adapter)["params"] == 2 * (units[""] + 2 * biggest)


@pytest.mark.parametrize("name", list(MOE))
def test_lora_on_the_experts_adds_an_adapter_per_expert(moe_adapters, moe_rows, name) -> None:
    layers, experts_per_layer, _, inter, hidden = MOE[name]
    plain, with_experts = moe_rows[name, "lora", 8, False], moe_rows[name, "lora", 8, True]
    assert not plain["lora_experts"] and with_experts["lora_experts"]
    # peft's target_parameters: r x experts rows for gate_up (hidden -> 2 inter) and down (inter -> hidden).
    per_layer = 64 * experts_per_layer * ((hidden + 2 * inter) + (inter + hidden))
    assert with_experts["trainable_params"] - plain["trainable_params"] == layers * per_layer
    assert (
        plain["expert_params"]
        == with_experts["expert_params"]
        == layers * experts_per_layer * 3 * inter * hidden
    )
    # The default LoRA leaves the experts and the router alone: attention, DeltaNet and shared layers only.
    assert plain["trainable_params"] < 0.005 * plain["params"]
    # peft folds W + BA per expert weight: merged weights and a gradient, full size, in each block's backward.
    config = moe_adapters[name].config
    merged = 2 * 3 * experts_per_layer * inter * hidden * (1 + 2 / 3)
    peaks = [activation_bytes(config, 8192, False, True, expert_lora=e)["block_peak"] for e in (False, True)]
    assert peaks[1] - peaks[0] == pytest.approx(merged, abs=1)
    assert with_experts["activations_gib"]["block_peak"] > plain["activations_gib"]["block_peak"]
