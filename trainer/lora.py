"""LoRA and QLoRA through peft: which modules get adapters, and wrapping the model.

Targets default to every linear layer of the language model's blocks (and of the vision tower's
with `finetune.lora.vision`), a mixture of experts' routers and scalar gates left out;
`finetune.lora.targets` narrows them to module names ending in one of the given names (e.g.
[q_proj, v_proj]). The experts of a mixture-of-experts model are 3-D parameters, not linear layers:
`finetune.lora.experts` gives each expert its own adapter through peft's `target_parameters`
(attention and shared layers only, without it; peft takes no dropout there).
"""

from __future__ import annotations

from torch import nn

from trainer.config import FinetuneConfig
from trainer.models.building import Building
from trainer.moe import expert_parameters, router_classes
from trainer.parallel import BLOCK_LISTS


def lora_targets(adapter: Building, model: nn.Module, ft: FinetuneConfig) -> list[str]:
    """Full names of the linear layers that get LoRA adapters."""
    groups = {"llm"} | ({"vision"} if ft.lora.vision else set())
    routers = router_classes(model)  # Llama 4's is an nn.Linear: it routes, it is not adapted
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and type(module).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        if isinstance(module, routers) or getattr(module, "out_features", 0) == 1:
            continue  # a router, or a scalar gate (Qwen3.5-MoE's shared_expert_gate): nothing to adapt
        if adapter.param_group(name + ".weight") not in groups:
            continue
        if not any(f".{lst}." in f".{name}." for lst in BLOCK_LISTS):
            continue  # embeddings, heads, mergers: not inside blocks
        if ft.lora.targets and not any(name == t or name.endswith("." + t) for t in ft.lora.targets):
            continue
        names.append(name)
    if not names:
        raise ValueError(
            f"finetune.lora.targets={ft.lora.targets} matches no linear layer inside the "
            f"{' and '.join(sorted(groups))} blocks"
        )
    return names


def expert_targets(adapter: Building, model: nn.Module, ft: FinetuneConfig) -> list[str]:
    """Full names of the language model's expert weights that get LoRA (`finetune.lora.experts`)."""
    if not ft.lora.experts:
        return []
    names = [n for n in expert_parameters(model) if adapter.param_group(n) == "llm"]
    if not names:
        raise ValueError(
            f"finetune.lora.experts=true, but {type(model).__name__} has no mixture-of-experts weights "
            f"(3-D expert parameters) in its language model"
        )
    return names


def projector_modules(adapter: Building, model: nn.Module) -> list[str]:
    """Names of the outermost modules that make up the projector."""
    names = []
    for name, module in model.named_modules():
        params = [n for n, _ in module.named_parameters(prefix=name)]
        if params and all(adapter.param_group(n) == "projector" for n in params):
            if not any(name.startswith(parent + ".") for parent in names):
                names.append(name)
    return names


def lora_config(adapter: Building, model: nn.Module, ft: FinetuneConfig):
    from peft import LoraConfig

    # A trained projector is saved with the adapter (peft's modules_to_save), so the adapter
    # alone reproduces the finetuned model.
    keep = projector_modules(adapter, model) if not ft.freeze_projector else None
    return LoraConfig(
        r=ft.lora.r,
        lora_alpha=ft.lora.alpha,
        lora_dropout=ft.lora.dropout,
        target_modules=lora_targets(adapter, model, ft),
        target_parameters=expert_targets(adapter, model, ft) or None,
        modules_to_save=keep,
        bias="none",
    )


def apply_lora(model: nn.Module, config) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, config)
