"""Mixture of experts (trainer/moe.py): the router loss is transformers' own load-balancing loss of the
model's own router logits, with the checkpoint's coefficient; the experts run as one grouped GEMM and
give the per-expert loop's losses and gradients. The micro-batch split invariance runs on 2 gloo ranks
in tests/distributed/test_train_dist.py."""

from __future__ import annotations

import pytest
import torch

from tests.support.samples import PHOTOS, SAMPLES
from trainer.data.packing import collate
from trainer.data.render import render_sample
from trainer.loop import micro_batch_loss
from trainer.models.registry import get_adapter
from trainer.moe import RouterBalance, balance_loss, expert_parameters, experts_implementation


def test_balance_loss_is_transformers_load_balancing_loss() -> None:
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(37, 8, generator=g) * 3 for _ in range(3))
    loss, load = balance_loss(logits, top_k=2)
    assert torch.allclose(loss, load_balancing_loss_func(logits, 8, 2), rtol=1e-6, atol=0)
    assert load.shape == (3, 8) and load.sum(dim=1).tolist() == [74.0] * 3
    assert load[0].tolist() == torch.bincount(logits[0].topk(2).indices.flatten(), minlength=8).tolist()
    # Routers that record their softmax (Gemma 4) give the same loss from it.
    softmaxed = tuple(torch.softmax(x, dim=-1) for x in logits)
    assert torch.allclose(balance_loss(softmaxed, 2, probabilities=True)[0], loss, rtol=1e-6)
    # A router that cannot tell experts apart: f_e sums to top_k, P_e = 1/E, so the loss is top_k.
    uniform, _ = balance_loss((torch.zeros(10, 8),), top_k=2)
    assert uniform.item() == pytest.approx(2.0)
    # All tokens on one expert with certainty: E x 1 x 1.
    skewed, _ = balance_loss((torch.tensor([[30.0, 0, 0, 0]]).repeat(5, 1),), top_k=1)
    assert skewed.item() == pytest.approx(4.0)


@pytest.fixture(scope="module")
def moe(tiny):
    path = tiny("qwen3_vl_moe")
    adapter = get_adapter(path)
    model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa")
    rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
    return adapter, model, collate(adapter, rendered)


def test_the_router_loss_is_the_models_own_with_its_coefficient(moe) -> None:
    adapter, model, pack = moe
    router = RouterBalance.of(model, None)
    assert router is not None and (router.coef, router.top_k) == (0.001, 2)
    micro_batch_loss(model, adapter, pack, torch.device("cpu"), chunk=16, router=router)
    ours = router.pending
    inputs = {k: v for k, v in pack.inputs.items() if k != "labels" and isinstance(v, torch.Tensor)}
    out = model(**inputs, output_router_logits=True, use_cache=False)
    assert len(ours) == len(out.router_logits) == model.config.text_config.num_hidden_layers
    for a, b in zip(ours, out.router_logits):
        assert a.shape == (pack.length, 8) and torch.allclose(a, b, atol=1e-6)
    term = router.loss(weight=0.25)
    assert torch.allclose(term, 0.001 * 0.25 * out.aux_loss, rtol=1e-6)
    assert term.requires_grad
    summed = router.take(torch.device("cpu"))
    assert summed[0].item() == pytest.approx(0.25 * out.aux_loss.item(), rel=1e-6)
    assert summed[1:].view(2, 8).sum(dim=1).tolist() == [2.0 * pack.length] * 2  # top-2 of every token
    scalars = router.scalars(summed.tolist())
    assert set(scalars) == {"train/router_aux_loss"} | {
        f"moe/layer_0{i}/tokens_{m}" for i in (0, 1) for m in ("min", "max")
    }
    assert scalars["moe/layer_00/tokens_min"] <= 2 * pack.length / 8 <= scalars["moe/layer_00/tokens_max"]


def test_the_coefficient_can_be_set_and_a_dense_model_takes_none(moe, tiny) -> None:
    _, model, _ = moe
    assert RouterBalance.of(model, 0.02).coef == 0.02
    dense = get_adapter(tiny("qwen3_vl")).load_model(dtype=torch.float32)
    assert RouterBalance.of(dense, None) is None
    with pytest.raises(ValueError, match="train.router_aux_loss_coef=0.1"):
        RouterBalance.of(dense, 0.1)


def test_experts_run_as_one_grouped_gemm_with_the_loops_losses_and_gradients(moe) -> None:
    adapter, grouped, pack = moe
    assert experts_implementation(grouped) == "grouped_mm"
    assert expert_parameters(grouped) == [
        f"model.language_model.layers.{i}.mlp.experts.{w}"
        for i in (0, 1)
        for w in ("gate_up_proj", "down_proj")
    ]
    loop = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa", experts_implementation="eager")
    assert experts_implementation(loop) == "eager"
    losses, grads = [], []
    for model in (grouped, loop):
        model.zero_grad()
        loss = micro_batch_loss(model, adapter, pack, torch.device("cpu"))
        loss.backward()
        losses.append(loss.detach())
        grads.append(
            {n: p.grad.clone() for n, p in model.named_parameters() if n in expert_parameters(model)}
        )
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for name, g in grads[0].items():
        assert g.abs().sum() > 0, name
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name


def test_lora_reaches_the_experts_only_when_asked(moe, tiny) -> None:
    from trainer.config import FinetuneConfig, LoraConfig
    from trainer.lora import lora_config

    adapter, model, _ = moe
    default = lora_config(adapter, model, FinetuneConfig(method="lora"))
    assert default.target_parameters is None
    assert not any(".experts" in t or t.endswith(".gate") for t in default.target_modules)
    assert any(t.endswith("layers.0.self_attn.q_proj") for t in default.target_modules)
    with pytest.raises(ValueError, match="finetune.lora.experts=true needs finetune.lora.dropout=0"):
        LoraConfig(experts=True)  # peft's ParamWrapper refuses dropout
    on = LoraConfig(experts=True, dropout=0.0)
    experts = lora_config(adapter, model, FinetuneConfig(method="lora", lora=on))
    assert experts.target_parameters == expert_parameters(model)
    assert experts.target_modules == default.target_modules
    dense = get_adapter(tiny("qwen3_vl"))
    with pytest.raises(ValueError, match="finetune.lora.experts=true, but .* has no mixture-of-experts"):
        lora_config(dense, dense.load_model(), FinetuneConfig(method="lora", lora=on))


@pytest.mark.parametrize("family", ["qwen3_5_moe", "glm4v_moe"])
def test_a_full_export_converts_the_experts_as_save_pretrained_does(tiny, family: str, tmp_path) -> None:
    """Qwen3.5-MoE and GLM-4.5V checkpoints store one tensor per expert, transformers one 3-D tensor
    per layer: the streamed export (trainer/export.py) converts a block at a time, in files of at most
    run.export_shard_gib, to exactly what save_pretrained writes, and reloads to the same weights."""
    from safetensors.torch import load_file

    from trainer.export import write_full

    adapter = get_adapter(tiny(family))
    model = adapter.load_model(dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # not the stored weights
    write_full(model.state_dict(), adapter, tmp_path / "ours", rank=0, max_shard_gib=0.0005)
    model.save_pretrained(tmp_path / "reference")

    def tensors(path):
        return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}

    ours, reference = tensors(tmp_path / "ours"), tensors(tmp_path / "reference")
    assert len(list((tmp_path / "ours").glob("*.safetensors"))) > 1
    assert ours.keys() == reference.keys() and any(".experts.1." in k for k in ours)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    reloaded = adapter.auto_class().from_pretrained(tmp_path / "ours").state_dict()
    assert all(torch.equal(t, reloaded[k]) for k, t in model.state_dict().items())
