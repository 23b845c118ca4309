"""`python -m trainer.models --list`: the supported model families and what each can do, worked out by
the code that enforces it, on each family's model as its tiny builder configures it (trainer/tiny: the
real layer layout, experts and attention, shrunk), so the table cannot claim what the trainer would
refuse. docs/families.md's table is this output. The columns:

- video: how videos reach the model (the adapter's `video`: native video inputs, or sampled frames);
- packing: whether several samples share a micro-batch (Batching.packs_isolated: never where a layer
  would carry state from one packed sample into the next);
- attention on CUDA: trainer/attention.py's choice for packed sequences;
- experts: a mixture of experts' router loss coefficient (trainer/moe.py), "-" for a dense model;
- QLoRA: "no" where bitsandbytes cannot quantize the weights (a mixture of experts' 3-D experts).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from trainer import attention
from trainer.models.adapter import ModelAdapter
from trainer.models.registry import load_families
from trainer.moe import expert_parameters, router_classes

COLUMNS = ("family", "example checkpoint", "video", "packing", "attention on CUDA", "experts", "QLoRA")
GENERIC = (
    "`generic`",
    "any AutoModelForImageTextToText with a chat template",
    "frames",
    "yes, unless a layer carries state",
    "varlen, or SDPA",
    "-",
    "yes, unless MoE",
)


def capabilities(family: str, cls: type[ModelAdapter]) -> tuple[str, ...]:
    """The family's row, from its tiny builder's config."""
    from trainer.tiny import FAMILIES

    adapter = cls(f"tiny {family}")
    adapter.config = FAMILIES[family]()[0]  # the processor is not needed
    with torch.device("meta"):
        model = cls.auto_class().from_config(adapter.config)
    logging.disable(logging.WARNING)  # packs_isolated says why packing is off: the table does too
    try:
        packing = "yes" if adapter.packs_isolated else "no: one sample per micro-batch"
    finally:
        logging.disable(logging.NOTSET)
    return (
        f"`{family}`",
        cls.example,
        cls.video or "no",
        packing,
        attention_on_cuda(adapter),
        experts(model),
        "no: 3-D experts" if expert_parameters(model) else "yes",
    )


def attention_on_cuda(adapter: ModelAdapter) -> str:
    backend = adapter.attention_backend(torch.device("cuda"))
    if backend == attention.FLEX:
        return "flex_attention, block masks"
    if backend == "sdpa":
        return "SDPA, masked"
    return "varlen (flash-attn 2 if installed)"


def experts(model: Any) -> str:
    """A mixture of experts' router loss coefficient (the published one: the tiny builders keep it)."""
    if not expert_parameters(model):
        return "-"
    if not router_classes(model):
        return "yes, no router logits"
    return f"yes, router loss x{getattr(model.config.get_text_config(), 'router_aux_loss_coef', 0.0):g}"


def table() -> str:
    rows = [COLUMNS, tuple("---" for _ in COLUMNS)]
    rows += [capabilities(family, cls) for family, cls in load_families().items()]
    rows.append(GENERIC)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.models", description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the table of supported families")
    args = parser.parse_args(argv)
    if not args.list:
        parser.error("nothing to do: pass --list")
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
