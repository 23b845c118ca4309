"""Building the training model: load, freeze, LoRA/QLoRA, dtypes, activation checkpointing, FSDP2.

The torchtune order: every rank builds the module tree on the meta device (no memory) and shards it;
rank 0 alone loads the checkpoint with `from_pretrained` (so every key conversion transformers knows
applies), in the checkpoint's own dtype, and its tensors are broadcast one at a time into the shards.
A node holds about one copy of the checkpoint in host RAM, on rank 0's node only; the other ranks
wait for rank 0 on the rendezvous store, not inside a collective with a watchdog.

Dtypes: trained parameters are fp32 master weights; frozen ones stay in the checkpoint's dtype (a
LoRA base, a frozen vision tower); FSDP's mixed-precision policy computes in `train.dtype` (bf16 on
GPU, fp32 on CPU) and reduces gradients in `train.reduce_dtype`. Without FSDP, CPU runs hold
everything in fp32 (nothing else would cast the frozen bf16 weights for fp32 compute).

QLoRA keeps the 4-bit frozen base weights out of sharding (bitsandbytes' packed Params4bit are not
DTensor-shardable); each rank quantizes its own copy, and only the LoRA weights and the unquantized
parameters are sharded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from trainer.config import Config
from trainer.dist import wait_for_rank0
from trainer.lora import apply_lora, lora_config
from trainer.models.building import Building
from trainer.moe import refuse_quantized_experts
from trainer.parallel import apply_activation_checkpointing, apply_compile, apply_fsdp, unwrapped_name

logger = logging.getLogger(__name__)


@dataclass
class Built:
    model: nn.Module
    mesh: DeviceMesh | None
    device: torch.device
    compute_dtype: torch.dtype


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.train.dtype]


def checkpoint_dtype(adapter: Building) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (config.json's `dtype`; fp32 when unset)."""
    value = getattr(adapter.config, "dtype", None) or getattr(adapter.config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def load_pretrained(adapter: Building, cfg: Config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The checkpoint through transformers' own loading path, in the checkpoint's dtype; QLoRA
    quantizes the base to 4 bits on `device` as it loads, computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    kwargs: dict = {"dtype": checkpoint_dtype(adapter), "attn_implementation": adapter.attn_implementation()}
    if cfg.finetune.method == "qlora":
        refuse_quantized_experts(adapter)
        q = cfg.finetune.qlora
        compute = dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype]
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=adapter.quant_skip_modules(),
        )
        kwargs["device_map"] = {"": device}
    return adapter.load_model(**kwargs)


def freeze(model: nn.Module, adapter: Building, cfg: Config) -> dict[str, int]:
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


def set_dtypes(model: nn.Module, frozen_dtype: torch.dtype | None = None) -> None:
    """Trained parameters to fp32 (master weights); frozen floating-point ones to `frozen_dtype`, or
    left as loaded when None. Quantized weights are never touched."""
    for p in model.parameters():
        want = torch.float32 if p.requires_grad else frozen_dtype
        if want is not None and p.is_floating_point() and p.dtype != want and not _is_quantized(p):
            p.data = p.data.to(want)


def _prepare(model: nn.Module, adapter: Building, cfg: Config) -> tuple[nn.Module, dict[str, int]]:
    """LoRA adapters and the freeze flags, the same on a loaded and on a meta-device model."""
    if cfg.finetune.method in ("lora", "qlora"):
        model = apply_lora(model, lora_config(adapter, model, cfg.finetune))
    counts = freeze(model, adapter, cfg)
    model.train()  # from_pretrained returns eval mode: no dropout
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model, counts


def build_mesh(cfg: Config, device: torch.device, world: int) -> DeviceMesh | None:
    """FSDP over all ranks, or HSDP (train.shard_group): shard within groups, replicate across them."""
    if world == 1:
        return None
    group = cfg.train.shard_group or world
    if world % group:
        raise ValueError(f"train.shard_group={group} does not divide the {world} ranks")
    if group == world:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))


def build_model(adapter: Building, cfg: Config, rank: int, world: int) -> Built:
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    dtype = compute_dtype(cfg, device)
    mesh = build_mesh(cfg, device, world)
    quantized = cfg.finetune.method == "qlora"
    torch.manual_seed(cfg.train.seed)  # LoRA initialisation is the same on every rank
    full: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    if quantized or mesh is None:
        model = load_pretrained(adapter, cfg, device if quantized else torch.device("cpu"), dtype)
    else:
        if rank == 0:
            # The weights to broadcast, keyed as the sharded model's state dict will be (after LoRA,
            # before checkpoint wrappers and torch.compile rename modules).
            start = time.perf_counter()
            loaded, _ = _prepare(load_pretrained(adapter, cfg, torch.device("cpu"), dtype), adapter, cfg)
            full = loaded.state_dict()
            transient = set(_non_persistent_buffers(loaded))
            buffers = {name: buf for name, buf in loaded.named_buffers() if name in transient}
            del loaded
            logger.info(
                "rank 0 loaded %s in %.0f s (%.1f GiB in host memory)",
                adapter.path,
                time.perf_counter() - start,
                sum(t.nbytes for t in full.values()) / 2**30,
            )
        wait_for_rank0("loading the checkpoint", cfg.train.dist_timeout_s)
        with torch.device("meta"):
            model = adapter.model_from_config(
                dtype=checkpoint_dtype(adapter), attn_implementation=adapter.attn_implementation()
            )
    model, counts = _prepare(model, adapter, cfg)
    logger.info("trainable parameters: %s", {k: f"{v:,}" for k, v in counts.items()})
    # Without FSDP's mixed-precision policy nothing casts bf16 frozen weights for fp32 compute.
    set_dtypes(model, frozen_dtype=torch.float32 if mesh is None and dtype == torch.float32 else None)
    if cfg.train.compile:  # inside the checkpoint wrappers: Dynamo never meets them
        apply_compile(model)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    if mesh is None:
        return Built(model=model.to(device), mesh=None, device=device, compute_dtype=dtype)

    ignored = {p for n, p in model.named_parameters() if quantized and _is_quantized(p)}
    apply_fsdp(
        model,
        mesh,
        param_dtype=dtype,
        reduce_dtype=DTYPES[cfg.train.reduce_dtype],
        ignored=ignored,
        root_block=adapter.fsdp_root_block,
    )
    _sum_gradients(model)
    if not quantized:
        model.to_empty(device=device)
        broadcast_weights(model, {**full, **buffers}, rank, device)  # non-persistent buffers too
        del full, buffers
    return Built(model=model, mesh=mesh, device=device, compute_dtype=dtype)


def broadcast_weights(
    model: nn.Module, full: dict[str, torch.Tensor], rank: int, device: torch.device
) -> None:
    """Rank 0's full tensors (`full`, emptied as it goes) into every rank's shards, one tensor at a
    time: staged through one pinned buffer on CUDA, cast on the device to the parameter's dtype
    (fp32 masters from a bf16 checkpoint), broadcast, and each rank keeps its slice."""
    targets = [(unwrapped_name(n), t) for n, t in [*model.named_parameters(), *model.named_buffers()]]
    missing = [[n for n, _ in targets if n not in full] if rank == 0 else None]
    dist.broadcast_object_list(missing, src=0)
    if missing[0]:
        raise RuntimeError(f"the checkpoint lacks {len(missing[0])} weights of the model: {missing[0][:5]}")
    staging = None
    if rank == 0 and device.type == "cuda":
        staging = torch.empty(max(t.nbytes for t in full.values()), dtype=torch.uint8, pin_memory=True)
    for name, target in targets:
        if rank == 0:
            source = full.pop(name)
            if staging is not None:
                source = staging[: source.nbytes].view(source.dtype).view(source.shape).copy_(source)
            tensor = source.to(device, non_blocking=True)
            if staging is not None:
                torch.cuda.current_stream().synchronize()  # the staging buffer is free again
            tensor = tensor.to(target.dtype)
        else:
            tensor = torch.empty(target.shape, dtype=target.dtype, device=device)
        dist.broadcast(tensor, src=0)
        if isinstance(target, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                tensor.shape, target.device_mesh, target.placements
            )
            tensor = tensor[tuple(slice(o, o + n) for n, o in zip(shape, offset))]
            target = target.to_local()
        with torch.no_grad():
            target.copy_(tensor)


def _sum_gradients(model: nn.Module) -> None:
    # The loss is already normalised by the global number of target tokens, so FSDP must sum
    # gradients over ranks instead of averaging them.
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    names = []
    for mod_name, module in model.named_modules():
        for b in getattr(module, "_non_persistent_buffers_set", ()):
            names.append(f"{mod_name}.{b}" if mod_name else b)
    return names


def _is_quantized(p: nn.Parameter) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")
