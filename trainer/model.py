"""Building the training model: load, freeze, LoRA/QLoRA, activation checkpointing, FSDP2, weights.

The torchtune order: rank 0 loads the checkpoint with `from_pretrained` (so every key conversion
transformers knows applies), the other ranks build the same module tree on the meta device (no
memory), everyone shards, and the full weights are broadcast from rank 0 into the shards. A node
holds about one copy of the weights in host RAM however many ranks it runs.

QLoRA keeps the 4-bit frozen base weights out of sharding (bitsandbytes' packed Params4bit are not
DTensor-shardable); each rank quantizes its own copy, and only the LoRA weights and the unquantized
parameters are sharded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import Config
from trainer.lora import apply_lora, lora_config
from trainer.models.adapter import ModelAdapter
from trainer.parallel import apply_activation_checkpointing, apply_compile, apply_fsdp

logger = logging.getLogger(__name__)


@dataclass
class Built:
    model: nn.Module
    mesh: DeviceMesh | None
    device: torch.device
    compute_dtype: torch.dtype


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.dtype]


def load_pretrained(adapter: ModelAdapter, cfg: Config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The checkpoint through transformers' own loading path (fp32 master weights)."""
    from transformers import BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32, "attn_implementation": adapter.attn_implementation()}
    if cfg.finetune.method == "qlora":
        q = cfg.finetune.qlora
        compute = dtype if q.compute_dtype == "auto" else {"bf16": torch.bfloat16, "fp32": torch.float32}[q.compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=adapter.quant_skip_modules())
        kwargs["device_map"] = {"": device}
    return adapter.load_model(**kwargs)


def freeze(model: nn.Module, adapter: ModelAdapter, cfg: Config) -> dict[str, int]:
    """Apply finetune.freeze_*; LoRA/QLoRA freeze the base and train only adapters (plus the
    projector unless frozen). Returns trainable parameter counts per group."""
    ft = cfg.finetune
    frozen = {"vision": ft.freeze_vision, "projector": ft.freeze_projector, "llm": ft.freeze_llm}
    counts = {"vision": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters():
        group = adapter.param_group(name)
        if ft.method == "full":
            train = not frozen[group]
        else:
            # Adapters train unless their whole group is frozen; base weights never do. A trained
            # projector is peft's modules_to_save copy (LLaVA stage 2 trains it fully with LoRA).
            train = ("lora_" in name or "modules_to_save." in name) and not frozen[group]
        p.requires_grad_(train)
        counts[group] += p.numel() if train else 0
    if not any(counts.values()):
        raise ValueError("no parameter is trainable with these finetune.* settings")
    return counts


def build_model(adapter: ModelAdapter, cfg: Config, rank: int, world: int) -> Built:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = compute_dtype(cfg, device)
    mesh = init_device_mesh(device.type, (world,)) if world > 1 else None
    quantized = cfg.finetune.method == "qlora"
    torch.manual_seed(cfg.train.seed)         # LoRA initialisation is the same on every rank
    if rank == 0 or quantized or mesh is None:
        model = load_pretrained(adapter, cfg, device if quantized else torch.device("cpu"), dtype)
    else:
        with torch.device("meta"):
            model = adapter.model_from_config(dtype=torch.float32, attn_implementation=adapter.attn_implementation())
    if cfg.finetune.method in ("lora", "qlora"):
        model = apply_lora(model, lora_config(adapter, model, cfg.finetune))
    counts = freeze(model, adapter, cfg)
    logger.info("trainable parameters: %s", {k: f"{v:,}" for k, v in counts.items()})
    model.train()                             # from_pretrained returns eval mode: no dropout
    if hasattr(model, "config"):
        model.config.use_cache = False
    # Rank 0's full weights, keyed as the state dict of the sharded model will be: before
    # checkpoint wrappers and torch.compile rename modules.
    full = model.state_dict() if rank == 0 and mesh is not None and not quantized else None
    buffers = _non_persistent_buffers(model) if mesh is not None else []
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if cfg.train.compile and device.type == "cuda":
        apply_compile(model)
    if mesh is None:
        return Built(model=model.to(device), mesh=None, device=device, compute_dtype=dtype)

    ignored = {p for n, p in model.named_parameters() if quantized and _is_quantized(p)}
    apply_fsdp(model, mesh, param_dtype=dtype, ignored=ignored, root_block=adapter.fsdp_root_block)
    _sum_gradients(model)
    if not quantized:
        model.to_empty(device=device) if rank != 0 else model.to(device)
        set_model_state_dict(model, full or {}, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True))
        for name in buffers:                    # not in the state dict: rank 0's are the truth
            buf = _get_buffer(model, name)
            dist.broadcast(buf.data, src=0)
    return Built(model=model, mesh=mesh, device=device, compute_dtype=dtype)


def _sum_gradients(model: nn.Module) -> None:
    # The loss is already normalised by the global number of target tokens, so FSDP must sum
    # gradients over ranks instead of averaging them.
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)   # plain SUM: gloo has no pre-multiplied sum


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    names = []
    for mod_name, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            names.append(f"{mod_name}.{b}" if mod_name else b)
    return names


def _get_buffer(model: nn.Module, name: str) -> torch.Tensor:
    # The name was taken before wrapping: look through checkpoint wrappers and compiled modules.
    by_plain = {n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): b
                for n, b in model.named_buffers()}
    return by_plain[name]


def _is_quantized(p: nn.Parameter) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")
