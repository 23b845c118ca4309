"""The chunked cross-entropy (trainer/loss.py) equals the plain one, F.cross_entropy of the full fp32
logits: loss, per-token losses and both gradients within 1e-6 in fp32, with and without Gemma 2's
logit soft-capping, for a frozen and a trained projection, and under no_grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import linear_cross_entropy


def plain(hidden, weight, labels, softcap):
    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, reduction="none")


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("train_weight", [True, False])
def test_chunked_equals_plain(softcap: float | None, chunk: int, train_weight: bool) -> None:
    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(61, 24, generator=gen, requires_grad=True)
    weight = (torch.randn(301, 24, generator=gen) / 3).requires_grad_(train_weight)
    labels = torch.randint(0, 301, (61,), generator=gen)
    expected = plain(hidden, weight, labels, softcap)
    (expected.sum() * 0.37).backward()
    grads = [hidden.grad.clone(), None if weight.grad is None else weight.grad.clone()]
    hidden.grad = weight.grad = None

    total, per_token = linear_cross_entropy(hidden, weight, labels, chunk, softcap)
    (total * 0.37).backward()
    assert not per_token.requires_grad
    assert torch.allclose(per_token, expected.detach(), rtol=1e-6, atol=1e-6)
    assert abs(total.item() - expected.sum().item()) <= 1e-6 * expected.sum().item()
    assert torch.allclose(hidden.grad, grads[0], rtol=1e-5, atol=1e-6 * grads[0].abs().max().item())
    if train_weight:
        assert torch.allclose(weight.grad, grads[1], rtol=1e-5, atol=1e-6 * grads[1].abs().max().item())
    else:
        assert weight.grad is None
    with torch.no_grad():
        total_ng, per_ng = linear_cross_entropy(hidden, weight, labels, chunk, softcap)
    assert torch.equal(per_ng, per_token) and total_ng.item() == total.item()


def test_memory_is_bounded_by_the_chunk() -> None:
    """A wrong implementation that builds the whole [targets, vocab] logits would allocate 8 MB here;
    the chunked one's largest buffer is [16, vocab] fp32."""
    hidden = torch.randn(2048, 8, requires_grad=True)
    weight = torch.randn(1024, 8, requires_grad=True)
    labels = torch.randint(0, 1024, (2048,))
    largest = 0

    def note(t: torch.Tensor) -> None:
        nonlocal largest
        largest = max(largest, t.numel() * t.element_size())

    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    note(t)
            return out

    with Watch():
        total, _ = linear_cross_entropy(hidden, weight, labels, chunk=16)
        total.backward()
    assert largest <= max(16 * 1024 * 4, 2048 * 8 * 4, 1024 * 8 * 4)
