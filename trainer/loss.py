"""Cross-entropy of the vocabulary projection, a chunk of target positions at a time.

    total, per_token = linear_cross_entropy(hidden, lm_head.weight, labels, chunk=1024)

The plain loss materialises [targets, vocab] logits in fp32 and keeps them, their softmax and their
gradient alive into backward: about 10 GB for a text-heavy 8192-token pack with a 152k vocabulary.
Here each chunk's logits live only inside the loop: the loss and its gradients (with respect to the
hidden states and the projection weight) are computed together in forward, and backward scales them.
Peak memory is about three [chunk, vocab] fp32 buffers, plus a gradient the size of the weight when
the weight is trained. The same loss and gradients as `F.cross_entropy(F.linear(h, w).float(), y)`,
summed in another order; with `softcap`, of the logits `softcap * tanh(logits / softcap)` (Gemma 2's
final_logit_softcapping).
"""

from __future__ import annotations

import torch


def _chunk_loss(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None, grads: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token losses of one chunk, and the gradient of their sum with respect to the logits
    before the cap (in the compute dtype, as autograd would hand it to the projection)."""
    logits = (h @ weight.T).float()
    tanh = None
    if softcap:
        tanh = torch.tanh(logits / softcap)
        logits = tanh * softcap
    lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, y[:, None]).squeeze(1)
    if not grads:
        return loss, None
    g = logits.sub_(lse[:, None]).exp_()  # the softmax, in the logits' memory
    g[torch.arange(len(y), device=y.device), y] -= 1
    if tanh is not None:  # d(c tanh(z/c))/dz = 1 - tanh(z/c)^2
        g.mul_(1 - tanh.square_())
    return loss, g.to(h.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, softcap):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)  # a no-op under FSDP, which computes in the weight's dtype
        losses = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, len(labels), chunk):
            h = hidden[start : start + chunk]
            losses[start : start + chunk], g = _chunk_loss(
                h, w, labels[start : start + chunk], softcap, want_h or want_w
            )
            if want_h:
                grad_h[start : start + chunk] = g @ w
            if want_w:
                grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_total.to(grad_w.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, per-token losses without gradient) of the logits `hidden @ weight.T` against
    `labels` (every one a target), `chunk` positions at a time. hidden: [N, H]; weight: [V, H]."""
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        w = weight.to(hidden.dtype)
        with torch.no_grad():
            losses = [
                _chunk_loss(hidden[s : s + chunk], w, labels[s : s + chunk], softcap, False)[0]
                for s in range(0, len(labels), chunk)
            ]
        losses = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)
        return losses.sum(), losses
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, softcap)
