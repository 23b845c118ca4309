"""Mixture-of-experts language models (Qwen3-VL-MoE, Qwen3.5-MoE, GLM-4.5V, Llama 4): the router's
load-balancing loss, expert load metrics, and which parameters are experts.

The router loss. transformers adds it (`router_aux_loss_coef` x `load_balancing_loss_func`) only when the
model computes the loss itself, which mmloom's loop does not (trainer/loop.py: chunked cross-entropy on
the captured hidden states), and never for Llama 4, whose config carries a coefficient (0.001) all the
same: mmloom applies every checkpoint's coefficient alike (`train.router_aux_loss_coef=0` is
transformers' Llama 4 behaviour). So the loop asks the model for its router logits (`output_router_logits`,
transformers' own recording of every MoE layer's router) and adds, per micro-batch,

    coef x (tokens of the micro-batch / tokens of the step over all ranks) x balance(router logits)

where `balance` is transformers' Switch-Transformer loss over all the micro-batch's MoE layers:
E x sum_e f_e x P_e, f_e the share of top-k assignments to expert e and P_e its mean router
probability, both over layers and tokens. Each micro-batch's loss is weighted by its share of the
step's tokens, so the step's loss is the same however the micro-batches are spread over ranks and
accumulation (1 rank x 4 micro-batches == 2 ranks x 2), as the cross-entropy's per-token mean is.
`coef` is the checkpoint's `router_aux_loss_coef` unless `train.router_aux_loss_coef` sets it.

Logged per step (trainer/metrics.py): `train/router_aux_loss` (the step's token-weighted balance loss,
before the coefficient) and, per MoE layer, the tokens routed to its least and most loaded expert,
over all ranks (`moe/layer_NN/tokens_min`, `moe/layer_NN/tokens_max`).

The experts themselves are 3-D parameters ([experts, out, in]) of their decoder layer: FSDP2 shards them
with the layer's unit (trainer/parallel.py makes one unit per block), LoRA reaches them through peft's
`target_parameters` with `finetune.lora.experts` (trainer/lora.py), and transformers runs them as one
grouped GEMM (`experts_implementation="grouped_mm"`) where torch has it, else its per-expert loop.
QLoRA is refused for them (`refuse_quantized_experts`): bitsandbytes would leave the experts in 16 bits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def router_classes(model: nn.Module) -> tuple[type, ...]:
    """The router module classes whose logits the model records for `output_router_logits`, of those
    the model holds: Gemma 4's text model names its router class whether or not the checkpoint has
    MoE blocks (only 26B-A4B does)."""
    found: set[type] = set()
    for module in model.modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(recorder, "target_class", recorder)
        if isinstance(target, type):
            found.add(target)
    return tuple(c for c in found if any(isinstance(m, c) for m in model.modules()))


def expert_parameters(model: nn.Module) -> list[str]:
    """Names of the experts' 3-D weights ([experts, out, in]) inside the language model's blocks."""
    return [name for name, p in model.named_parameters() if p.ndim == 3 and ".experts." in f".{name}"]


def experts_implementation(model: nn.Module) -> str | None:
    """How transformers runs the experts ("grouped_mm", "batched_mm", "eager"), None without experts."""
    if not expert_parameters(model):
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "_experts_implementation", None) or "eager"


def balance_loss(
    router_logits: tuple[torch.Tensor, ...], top_k: int, probabilities: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' load-balancing loss over the MoE layers' router logits ([tokens, experts] each; with
    `probabilities`, the router's softmax already), and the tokens routed to each expert per layer
    ([layers, experts], no gradient)."""
    experts = router_logits[0].shape[-1]
    counts, prob_sum, rows = [], 0.0, 0
    for logits in router_logits:
        probs = logits.float() if probabilities else F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        counts.append(torch.bincount(chosen.flatten(), minlength=experts).float())
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    load = torch.stack(counts)
    loss = experts * torch.sum(load.sum(dim=0) / rows * (prob_sum / rows))
    return loss, load


@dataclass
class RouterBalance:
    """One step's router loss and expert load on this rank (trainer/loop.py feeds it micro-batches)."""

    coef: float
    top_k: int
    probabilities: bool = False  # the model records router probabilities, not logits (Gemma 4)
    aux: torch.Tensor | float = 0.0  # this rank's step balance loss (token-weighted, no coefficient)
    load: torch.Tensor | None = None  # [layers, experts] tokens routed this step on this rank
    layers: int = 0  # MoE layers of the model (known after the first micro-batch)
    pending: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model: nn.Module, coef: float | None, probabilities: bool = False) -> RouterBalance | None:
        """The balance of `model`: the checkpoint's `router_aux_loss_coef` unless `coef`
        (train.router_aux_loss_coef) is given. None for a model without routers, or whose checkpoint
        names no coefficient when `coef` names none either (Gemma 4's MoE: transformers adds none)."""
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if not router_classes(model):
            if coef:
                raise ValueError(
                    f"train.router_aux_loss_coef={coef}, but {type(model).__name__} records no router "
                    f"logits (output_router_logits): it is not a mixture-of-experts model mmloom knows"
                )
            return None
        if coef is None and not getattr(text, "router_aux_loss_coef", None):
            logger.info("mixture of experts without a router loss: the checkpoint names no coefficient")
            return None
        coef = text.router_aux_loss_coef if coef is None else coef
        top_k = getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k_experts", None)
        if top_k is None:
            raise ValueError(f"{type(model).__name__}'s text config names no experts per token")
        logger.info(
            "mixture of experts: router loss coefficient %g, top-%d routing, experts run as %s",
            coef,
            top_k,
            experts_implementation(model),
        )
        return cls(coef=float(coef), top_k=int(top_k), probabilities=probabilities)

    def observe(self, router_logits: tuple[torch.Tensor, ...] | None) -> None:
        """The router logits of the micro-batch just run forward (the model's output)."""
        if not router_logits:
            raise RuntimeError("the model returned no router logits for output_router_logits=True")
        self.pending = tuple(router_logits)

    def loss(self, weight: float) -> torch.Tensor:
        """coef x weight x the pending micro-batch's balance loss; `weight` is its share of the step's
        tokens over all ranks. Adds to the step's aux loss and expert load."""
        assert self.pending is not None, "observe() the micro-batch's router logits first"
        loss, load = balance_loss(self.pending, self.top_k, self.probabilities)
        self.pending = None
        self.aux = self.aux + loss.detach().double() * weight  # no host sync
        self.load = load if self.load is None else self.load + load
        self.layers = load.shape[0]
        return self.coef * weight * loss

    def take(self, device: torch.device) -> torch.Tensor:
        """This rank's step figures as one float64 vector (aux, then the load row by row), to be summed
        over ranks; starts the next step."""
        aux = torch.as_tensor(self.aux, dtype=torch.float64, device=device).reshape(1)
        load = self.load.flatten().to(device, torch.float64) if self.load is not None else aux[:0]
        self.aux, self.load = 0.0, None
        return torch.cat([aux, load])

    def scalars(self, summed: list[float]) -> dict[str, float]:
        """Tensorboard scalars from `take()` summed over ranks."""
        aux, load = summed[0], torch.tensor(summed[1:], dtype=torch.float64)
        values = {"train/router_aux_loss": aux}
        for i, row in enumerate(load.view(self.layers, -1) if self.layers else []):
            values[f"moe/layer_{i:02d}/tokens_min"] = float(row.min())
            values[f"moe/layer_{i:02d}/tokens_max"] = float(row.max())
        return values


def refuse_quantized_experts(adapter: Any) -> None:
    """QLoRA's 4-bit base is bitsandbytes' Linear4bit, which transformers swaps in for nn.Linear layers
    only: a mixture of experts' 3-D expert weights, most of its parameters, would stay in 16 bits, so
    QLoRA would cost nearly LoRA's memory while claiming 4 bits. mmloom refuses it with the figures."""
    with torch.device("meta"):
        model = adapter.model_from_config()
    experts = set(expert_parameters(model))
    if not experts:
        return
    counts = {n: p.numel() for n, p in model.named_parameters()}
    share = sum(counts[n] for n in experts) / sum(counts.values())
    raise ValueError(
        f"finetune.method=qlora cannot quantize {adapter.path}: its experts ({share:.0%} of the weights) "
        f"are 3-D parameters, and bitsandbytes' 4-bit layers replace nn.Linear layers only, so they would "
        f"stay in 16 bits. Use finetune.method=lora: FSDP2 shards the experts over the GPUs, and "
        f"finetune.lora.experts=true adapts them too"
    )
