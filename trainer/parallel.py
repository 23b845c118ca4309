"""Everything that shards or checkpoints modules: FSDP2 units, mixed precision, activation
checkpointing, torch.compile. The only file that calls `fully_shard` or the checkpoint wrappers.

Units are the transformer blocks: every element of a ModuleList named `layers`, `blocks` or `layer`
(the language model's decoder layers and the vision tower's encoder blocks; InternViT, like BEiT,
names its list `layer`), then the root.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)

BLOCK_LISTS = ("layers", "blocks", "layer")


def transformer_blocks(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """(parent ModuleList, its name, index) of every transformer block, in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            found.extend((module, name, i) for i in range(len(module)))
    return found


def unwrapped_name(name: str) -> str:
    """A parameter's or buffer's name as the unwrapped model has it: without the checkpoint wrappers'
    and torch.compile's module levels."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute each block's activations in backward ("full"), or every other block ("selective")."""
    if mode == "none":
        return
    for n, (parent, _, i) in enumerate(transformer_blocks(model)):
        if mode == "full" or n % 2 == 0:
            parent[i] = checkpoint_wrapper(
                parent[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True
            )


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block separately (whole-model compile breaks on multimodal merging), before
    activation checkpointing wraps it, with dynamic shapes: a pack of another length or make-up
    reuses the graphs."""
    for parent, _, i in transformer_blocks(model):
        parent[i] = torch.compile(parent[i], fullgraph=False, dynamic=True)
        parent[i].register_forward_pre_hook(_without_python_lengths, with_kwargs=True)


class CompileStats:
    """What Dynamo compiled from here on, for the training run's final JSON line: graphs, graph breaks,
    and recompiles: frames compiled during a phase ("train", "eval") after its first call, which
    compiles each kind of block (a vision block and a decoder block share transformers' checkpointing
    frame, one entry each). Later compiles are packs of another length or make-up that did not reuse
    the graphs."""

    def __init__(self) -> None:
        from torch._dynamo.utils import counters

        self._counters, self.recompiles = counters, 0
        self._start, self._phase, self._seen = self._counts(), "", set()
        torch._dynamo.callback_handler.register_start_callback(self._started)

    def _counts(self) -> tuple[int, int]:
        return self._counters["stats"]["unique_graphs"], sum(self._counters["graph_break"].values())

    def _started(self, args: Any) -> None:
        from torch._dynamo.callback import CallbackTrigger

        if args.callback_trigger == CallbackTrigger.DYNAMO and self._phase in self._seen:
            self.recompiles += 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._phase = name
        try:
            yield
        finally:
            self._phase = ""
            self._seen.add(name)

    def summary(self) -> dict[str, int]:
        (graphs, breaks), (graphs0, breaks0) = self._counts(), self._start
        return {"graphs": graphs - graphs0, "graph_breaks": breaks - breaks0, "recompiles": self.recompiles}

    def close(self) -> None:
        torch._dynamo.callback_handler.remove_start_callback(self._started)


def _without_python_lengths(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    # A tuple of ints would be guarded value by value: a recompile for every pack make-up.
    kwargs.pop("mmloom_segments", None)
    return args, kwargs


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    ignored: set[nn.Parameter] = frozenset(),
    root_block: Callable[[str], bool] | None = None,
) -> None:
    """fully_shard every block, then the root: computing in `param_dtype`, reducing gradients in
    `reduce_dtype`. A 2-D mesh (replicate, shard) is HSDP. Blocks of a list for which
    `root_block(name)` holds stay in the root unit (adapter.fsdp_root_block)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = [b for b in transformer_blocks(model) if root_block is None or not root_block(b[1])]
    for n, (parent, _, i) in enumerate(blocks):
        # The last block's parameters are needed right away in backward: no point resharding them.
        fully_shard(
            parent[i],
            mesh=mesh,
            mp_policy=mp,
            reshard_after_forward=n < len(blocks) - 1,
            ignored_params=ignored & set(parent[i].parameters()) or None,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=set(ignored) or None)
    logger.info(
        "FSDP2: %d blocks + root on a mesh of %s (%s), computing in %s, reducing in %s",
        len(blocks),
        tuple(mesh.shape),
        ", ".join(mesh.mesh_dim_names or ()),
        param_dtype,
        reduce_dtype,
    )
