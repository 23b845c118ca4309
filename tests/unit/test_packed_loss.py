"""Packing is exact: the loss of a packed micro-batch equals the sum of its samples' losses
computed one by one (fp32, relative 1e-6) for every family on every backend that runs on CPU
(flex_attention's block masks too, for Gemma 3: see `backends`), and no gradient flows between
packed samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.support import family_params
from tests.support.samples import PHOTOS, SAMPLES, assert_packed_equals_alone, cropped_photo, summed_loss
from trainer import attention
from trainer.data.packing import collate
from trainer.data.render import render_sample
from trainer.models.registry import get_adapter, load_families
from trainer.tiny import FAMILIES


def backends(family: str) -> list[str]:
    """SDPA over the masked row and the trainer's pick on CPU (trainer/attention.py), which for the
    families with block masks is that same SDPA; for Gemma 3 also the flex_attention BlockMasks the
    trainer picks on CUDA. Flex compiles for a minute a family on CPU, and every family's BlockMasks
    come from the one rule `block_causal` gives SDPA too (test_attention.py checks them tile by tile);
    Llama 4's family tests run its chunked masks through flex as well."""
    if not load_families()[family].block_masks():
        return ["sdpa", "trainer"]
    return ["sdpa", *([attention.FLEX] if family == "gemma3" else [])]


@pytest.mark.parametrize(
    ("family", "backend"),
    [
        pytest.param(*p.values, b, marks=p.marks)
        for p in family_params(sorted(FAMILIES))
        for b in backends(p.values[0])
    ],
)
def test_packed_loss_equals_per_sample_losses(tiny, family: str, backend: str) -> None:
    """On each backend that runs on CPU (see `backends`)."""
    torch.manual_seed(0)
    if backend == attention.FLEX:
        # Each family's flex kernels compile afresh: a second family's shapes would make inductor
        # recompile flex_attention with dynamic shapes, which torch 2.14 miscompiles for CPU (a C++
        # error in its template; CUDA's Triton kernels, what training uses, are another code path).
        torch._dynamo.reset()
    path = tiny(family)
    adapter = get_adapter(path)
    implementation = {"sdpa": "sdpa", "trainer": adapter.attn_implementation()}.get(
        backend
    ) or attention.per_module(adapter.config, backend)
    model = adapter.load_model(dtype=torch.float32, attn_implementation=implementation)
    model.eval()
    rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
    with torch.no_grad():
        alone = sum(summed_loss(model, dict(collate(adapter, [r]).inputs)) for r in rendered)
        packed = summed_loss(model, dict(collate(adapter, rendered).inputs))
    assert torch.isfinite(packed)
    assert abs(packed.item() - alone.item()) <= 1e-6 * abs(alone.item()), (packed.item(), alone.item())


@pytest.mark.parametrize("family", family_params(sorted(FAMILIES)))
def test_no_gradient_crosses_packed_samples(tiny, family: str) -> None:
    path = tiny(family)
    adapter = get_adapter(path)
    model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa")
    rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
    inputs = dict(collate(adapter, rendered).inputs)
    # Loss of the middle sample only; gradients reach the token embeddings of every position.
    start = rendered[0].length
    end = start + rendered[1].length
    labels = torch.full_like(inputs["labels"], -100)
    labels[0, start:end] = inputs["labels"][0, start:end]
    inputs["labels"] = labels
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["embeds"] = output

    hook = model.get_input_embeddings().register_forward_hook(keep)
    summed_loss(model, inputs).backward()
    hook.remove()
    grad = captured["embeds"].grad[0].abs().sum(-1)
    assert grad[start:end].sum() > 0
    assert grad[:start].sum() == 0 and grad[end:].sum() == 0


def test_llava_next_packs_images_with_different_view_counts(tiny) -> None:
    # A tall crop picks the 672x336 pinpoint (3 views), the photos 672x672 (5 views): packed, the
    # view dimension is zero-padded as the processor pads it, and the loss is still the per-sample sum.
    path = tiny("llava_next")
    adapter = get_adapter(path)
    tall_sample, photos = cropped_photo((0, 0, 140, 427), "A strip.")
    rendered = [render_sample(adapter, s, photos) for s in (tall_sample, SAMPLES[0])]
    assert [r.media["pixel_values"].shape[1] for r in rendered] == [3, 5]
    pack = collate(adapter, rendered).inputs
    assert pack["pixel_values"].shape == (2, 5, 3, 336, 336) and pack["pixel_values"][0, 3:].abs().sum() == 0
    assert pack["image_sizes"].tolist() == [[427, 140], [427, 640]]
    assert_packed_equals_alone(path, adapter, rendered, pack)


@pytest.mark.parametrize("family", family_params(sorted(FAMILIES)))
def test_the_trainers_attention_gives_the_masked_sdpa_logits(tiny, family: str) -> None:
    """What the trainer runs on CPU (trainer/attention.py: per-sample SDPA where the model allows it)
    gives the logits of SDPA over the block-diagonal mask, on a pack of three samples."""
    from trainer import attention

    path = tiny(family)
    adapter = get_adapter(path)
    implementation = adapter.attn_implementation()
    if not adapter.block_masks() and attention.plain_layers(adapter.config):
        assert implementation == attention.per_module(adapter.config, attention.PACKED)
    inputs = dict(collate(adapter, [render_sample(adapter, s, PHOTOS) for s in SAMPLES]).inputs)
    inputs.pop("labels")
    logits = []
    for name in (implementation, "sdpa"):
        model = adapter.load_model(dtype=torch.float32, attn_implementation=name).eval()
        with torch.no_grad():
            logits.append(model(**inputs, use_cache=False).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5, rtol=1e-5), float(
        (logits[0] - logits[1]).abs().max()
    )


@pytest.mark.parametrize("family", family_params(sorted(FAMILIES)))
def test_the_trainers_loss_computes_logits_only_for_targets(tiny, family: str) -> None:
    """trainer.loop.micro_batch_loss projects only the positions that predict a target onto the
    vocabulary, 5 at a time (trainer/loss.py); its loss, per-source sums and gradients are those of
    the full logits, for a pack of three samples and for a text-only pack (which carries the grey image)."""
    from trainer.loop import micro_batch_loss

    path = tiny(family)
    adapter = get_adapter(path)
    model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa")
    rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
    for i, r in enumerate(rendered):
        r.source = i
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[-2])
    )
    recurrent = bool(attention.packing_leaks(adapter.config))  # linear-attention layers (Qwen3.5's)
    for group in (rendered, rendered[1:2]):
        pack = collate(adapter, group)
        per_source = torch.zeros(len(rendered), 2, dtype=torch.float64)
        model.zero_grad()
        loss = micro_batch_loss(model, adapter, pack, torch.device("cpu"), per_source, chunk=5)
        loss.backward()
        assert pack.targets > 5  # several chunks
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert seen.pop() == pack.targets  # only the targets reach the vocabulary projection

        model.zero_grad()
        inputs = dict(pack.inputs)
        labels = inputs.pop("labels")[0, 1:]
        logits = model(**inputs, use_cache=False).logits[0, :-1]
        token_loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
        token_loss.sum().backward()
        assert seen.pop() == pack.length
        assert abs(loss.item() - token_loss.sum().item()) <= 1e-6 * token_loss.sum().item()
        owner = torch.repeat_interleave(torch.tensor(pack.sources), torch.tensor(pack.lengths))[1:]
        for source in range(len(rendered)):
            mine = (owner == source) & (labels[: len(owner)] != -100)
            assert per_source[source, 1] == mine.sum()
            expected = token_loss[: len(owner)][mine].sum().item()
            assert abs(per_source[source, 0] - expected) <= 1e-6 * (abs(expected) + 1)
        for name, param in model.named_parameters():
            # A key projection's bias cancels out of the softmax: its gradient is rounding noise.
            if param.grad is not None and not name.endswith("k_proj.bias"):
                # fp32 sums in another order: within 1e-6 of the parameter's largest gradient. A Gated
                # DeltaNet's per-head decay (Qwen3.5's A_log, dt_bias) sums opposing contributions of every
                # token of the pack: a few 1e-6 of its largest. Its chunked fp32 recurrence also amplifies
                # the rounding of what flows back through it (8x) into a media encoder below it: MiniCPM-V
                # 4.6's tower, up to 2e-5 of the largest (its first query projection).
                scale = float(param.grad.abs().max())
                if name.endswith((".A_log", ".dt_bias")):
                    scale *= 10
                elif recurrent and adapter.param_group(name) in ("vision", "projector"):
                    scale *= 100
                assert torch.allclose(grads[name], param.grad, atol=1e-6 * scale, rtol=1e-5), (
                    name,
                    float((grads[name] - param.grad).abs().max()),
                    scale,
                )
    hook.remove()


def test_the_trainers_loss_works_for_models_without_logits_to_keep(tiny) -> None:
    """Remote code whose forward takes no `logits_to_keep` gets every position's logits; the loss
    picks the targets' (the same loss, which the chunked loss gives too)."""
    from transformers import LlavaForConditionalGeneration

    from trainer.loop import micro_batch_loss

    class OldRemoteCode(LlavaForConditionalGeneration):
        def forward(self, input_ids=None, pixel_values=None, position_ids=None, use_cache=None):
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, position_ids=position_ids, use_cache=use_cache
            )

    path = tiny("llava")
    adapter = get_adapter(path)
    pack = collate(adapter, [render_sample(adapter, s, PHOTOS) for s in SAMPLES])
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    )
    losses = []
    for cls, chunk in (
        (LlavaForConditionalGeneration, 0),
        (OldRemoteCode, 4),
        (LlavaForConditionalGeneration, 4),
    ):
        model.__class__ = cls
        with torch.no_grad():
            losses.append(
                micro_batch_loss(model.eval(), adapter, pack, torch.device("cpu"), chunk=chunk).item()
            )
    assert max(losses) - min(losses) <= 1e-6 * losses[0], losses
