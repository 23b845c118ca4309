"""Checkpoints: `run.dir/checkpoints/step-<N>/`, written with torch.distributed.checkpoint.

Model and optimizer are saved sharded (DCP); what differs per rank goes into `rank<r>.pt` beside
them: tensors, numbers, strings and containers only, read back with `torch.load(weights_only=True)`
(nothing is unpickled). The training loop (trainer/loop.py) writes

    {"train": TrainState.state_dict(),                  # step, epoch, counters: the same on every rank
     "data": {"loader": ..., "generation": ..., "world": ..., "workers": ...,
              "batches": EpochBatches.state_dict()},    # this rank's place in the epoch
     "rng": rng_state()}                                # added here

and `load` returns it in that layout, also from a checkpoint written before TrainState existed.
A checkpoint is written under `.step-<N>.tmp` and renamed once every rank has finished, so a
directory named `step-<N>` is always complete; resuming picks the newest one automatically.
With `checkpoint.async_save` (AsyncSaver) training waits only while the state is copied to host
memory; the files are written in the background, and a kill during that write leaves the previous
checkpoint the newest. DCP reshards model and optimizer for any number of ranks; a rank the checkpoint
did not have takes rank 0's counters (its data position comes from
trainer.data.pipeline.resume_generation, its RNG starts fresh).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import shutil
import threading
import time
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from trainer.parallel import unwrapped_name

if TYPE_CHECKING:
    from trainer.metrics import Metrics

logger = logging.getLogger(__name__)

_STEP = re.compile(r"step-(\d+)")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    # numpy's key array as a list: the rank files hold only what torch.load(weights_only=True) reads.
    name, keys, *rest = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), *rest),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclasses.dataclass(kw_only=True)
class TrainState:
    """Where the run is, the same on every rank. Saved and restored as one piece (rank file key
    "train"), so that a resumed run goes on counting from exactly where the checkpoint was."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch being trained
    total_steps: int = 0  # steps the LR schedule plans for (train.steps; 0 with train.epochs)
    samples: int = 0  # samples trained, over all ranks
    tokens: int = 0  # tokens trained (packed, media tokens included), over all ranks
    skipped_steps: int = 0  # steps skipped everywhere for a non-finite loss or gradient
    per_source: list[int] = dataclasses.field(default_factory=list)  # samples trained per source

    def state_dict(self) -> dict[str, Any]:
        # A copy: the rank file must hold the counts at save(), not a list that training goes on changing.
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        if set(state) != names:
            raise ValueError(
                f"the checkpoint's train state has keys {sorted(state)}, this mmloom expects "
                f"{sorted(names)}: resume with the version that wrote it"
            )
        for name in names:
            setattr(self, name, state[name])
        self.per_source = list(self.per_source)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None; rank 0 decides for all (shared filesystems can
    show ranks different directory listings for a moment)."""
    root = Path(run_dir) / "checkpoints"
    found = [
        (int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP.fullmatch(p.name)) and p.is_dir()
    ]
    choice = [str(max(found)[1]) if found else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def _trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state of the trained parameters only: frozen weights come from the base
    checkpoint (a LoRA checkpoint holds the adapters, not 7B frozen weights, and QLoRA's packed
    4-bit tensors are not DCP material)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trainable = {unwrapped_name(n) for n, p in model.named_parameters() if p.requires_grad}
    model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return model_sd, optim_sd


class AsyncSaver:
    """Writes checkpoints one at a time, in the background with `checkpoint.async_save`.

    save() is collective and blocks only to copy the trained state to host memory (pinned on CUDA,
    reused from one save to the next); DCP then writes it from a thread of its own, over a gloo
    group of its own so that its collectives never interleave with the training thread's. DCP's
    last step gathers every rank's write results on rank 0 before rank 0 writes `.metadata`: rank 0's
    write finishing means every rank's has, so rank 0 renames `.step-<N>.tmp` to `step-<N>` and drops
    the old ones right then, in that thread (file operations only, no collective). The next save()
    and wait() first wait for the write in flight.
    """

    def __init__(self, run_dir: str | Path, keep: int, background: bool = True) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.background = keep, background
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._group: dist.ProcessGroup | None = None
        self._stager: DefaultStager | None = None
        self._pending: _Write | None = None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        metrics: Metrics | None = None,
    ) -> None:
        """Start writing step-<step> (collective: every rank calls it); logs the previous write's times."""
        previous, start = self._pending, time.perf_counter()
        self.wait(metrics)
        waited = time.perf_counter() - start
        if previous is not None and waited > 1.0 and self.rank == 0:
            logger.warning(
                "step %d: the checkpoint of step %d was still being written; training waited "
                "%.1f s for it (raise checkpoint.every)",
                step,
                previous.step,
                waited,
            )
        start = time.perf_counter()
        tmp = self.root / f".step-{step}.tmp"
        if self.rank == 0:
            # Nothing is in flight now: any .tmp left is from a run killed while writing.
            for stale in self.root.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = _trainable_state(model, optimizer)
        torch.save({**extra, "rng": rng_state()}, tmp / f"rank{self.rank}.pt")
        state = {"model": model_sd, "optim": optim_sd}
        if self.background:
            if self._stager is None:
                self._stager = _stager()
                if dist.is_initialized():
                    # new_group is collective: made here, where every rank is. A long timeout, as the
                    # ranks wait in it for the slowest one's write.
                    self._group = dist.new_group(backend="gloo", timeout=timedelta(hours=2))
            future = dcp.async_save(
                state, checkpoint_id=str(tmp), process_group=self._group, async_stager=self._stager
            )
            assert isinstance(future, Future), type(future)  # staging is synchronous
        else:
            future = Future()
            future.set_result(dcp.save(state, checkpoint_id=str(tmp)))
        self._pending = _Write(self, step, tmp, start, blocking_s=time.perf_counter() - start)
        future.add_done_callback(self._pending.finish)

    def wait(self, metrics: Metrics | None = None) -> Path | None:
        """Wait for the write in flight; returns its `step-<N>` (on rank 0 renamed by then), or None
        when there was none. Logs its times to `metrics` (ckpt/save_blocking_s, ckpt/save_total_s)."""
        write, self._pending = self._pending, None
        if write is None:
            return None
        write.done.wait()
        if write.error is not None:
            raise RuntimeError(
                f"writing checkpoint {write.tmp} failed; the newest complete one in "
                f"{self.root} is still usable"
            ) from write.error
        if metrics is not None:
            metrics.log(
                write.step, {"ckpt/save_blocking_s": write.blocking_s, "ckpt/save_total_s": write.total_s}
            )
        return write.final

    def wait_after_error(self, timeout_s: float = 600.0) -> None:
        """On the way out after an error: let the write in flight finish, for at most `timeout_s`; never
        raises. Its collectives are on the checkpoint group, which the other ranks' writing threads
        serve even while their training threads are stuck in the failed step's collectives."""
        write = self._pending
        if write is None:
            return
        if write.done.wait(timeout_s) and write.error is None:
            self._pending = None
            if self.rank == 0:
                logger.warning("checkpoint %s was written before leaving on the error", write.final)
        else:
            logger.warning(
                "the checkpoint of step %d was not written (%s); the newest complete one in %s "
                "is still usable",
                write.step,
                write.error or "timed out",
                self.root,
            )

    def close(self) -> None:
        """Free the staging memory (after wait())."""
        assert self._pending is None, "close() with a checkpoint write in flight: wait() first"
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _finalize(self, write: _Write) -> None:
        """Rank 0: name the finished checkpoint `step-<N>` and drop old ones beyond checkpoint.keep."""
        if write.final.exists():
            shutil.rmtree(write.final)
        write.tmp.rename(write.final)
        old = sorted((int(m.group(1)), p) for p in self.root.glob("step-*") if (m := _STEP.fullmatch(p.name)))
        for _, p in old[: -self.keep]:
            shutil.rmtree(p, ignore_errors=True)
        logger.info(
            "saved checkpoint %s in %.1f s (%.1f s blocking)", write.final, write.total_s, write.blocking_s
        )


def _stager() -> DefaultStager:
    # Staging in the calling thread (then training may change the weights), into host buffers kept
    # for the next save: pinned on CUDA, where pinning anew each time would cost seconds a save.
    cuda = torch.cuda.is_available()
    return DefaultStager(
        StagingOptions(
            use_pinned_memory=cuda,
            use_shared_memory=False,
            use_async_staging=False,
            use_non_blocking_copy=cuda,
        )
    )


class _Write:
    """One checkpoint write; finish() runs when this rank's DCP write is done (in DCP's thread)."""

    def __init__(self, saver: AsyncSaver, step: int, tmp: Path, start: float, blocking_s: float) -> None:
        self.saver, self.step, self.tmp, self.start, self.blocking_s = saver, step, tmp, start, blocking_s
        self.final = tmp.parent / f"step-{step}"
        self.total_s = 0.0
        self.error: BaseException | None = None
        self.done = threading.Event()

    def finish(self, future: Future) -> None:
        try:
            future.result()
            self.total_s = time.perf_counter() - self.start
            if self.saver.rank == 0:
                self.saver._finalize(self)
        except BaseException as e:  # raised in the training thread by wait()
            self.error = e
        finally:
            self.done.set()


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG from `path`; returns this rank's extra state (without RNG)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    model_sd, optim_sd = _trainable_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    # A fresh optimizer lists state for every trainable parameter; a saved one only for those that
    # ever had a gradient (LLaVA never uses its vision tower's last layer). The rest keep the fresh
    # zero state, which AdamW never touches while they get no gradient.
    dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )
    rank_file = path / f"rank{rank}.pt"
    if rank_file.exists():
        extra = torch.load(rank_file, weights_only=True)
        set_rng_state(extra.pop("rng"))
    else:
        logger.warning(
            "%s has no rank%d.pt (it was written by %d ranks): this rank starts from rank 0's "
            "counters and a fresh RNG",
            path,
            rank,
            saved_ranks(path),
        )
        extra = torch.load(path / "rank0.pt", weights_only=True)
        extra.pop("rng")
    logger.info("resumed from %s", path)
    return _upgrade(extra)


def saved_ranks(path: Path) -> int:
    """How many ranks wrote the checkpoint at `path`."""
    return len(list(path.glob("rank*.pt")))


def rank_extras(path: Path) -> list[dict[str, Any]]:
    """Every rank's extra state in the checkpoint at `path`, in rank order (without RNG states)."""
    extras = []
    for rank in range(saved_ranks(path)):
        extra = torch.load(path / f"rank{rank}.pt", weights_only=True)
        extra.pop("rng", None)
        extras.append(_upgrade(extra))
    return extras


def _upgrade(extra: dict[str, Any]) -> dict[str, Any]:
    """A rank file's extra state in the layout of the module docstring. Files written before TrainState
    (flat keys: "state", "total_steps", "data", "data_generation", "data_world", "data_workers",
    "data_exhausted", "data_skips", "data_consumed") still resume: a requeued job may find one."""
    if "data_exhausted" not in extra:
        return extra
    # micro_batches_in_epoch was saved but never counted: nothing reads it.
    train = {k: v for k, v in extra["state"].items() if k != "micro_batches_in_epoch"}
    batches = {
        "exhausted": extra["data_exhausted"],
        "skips": extra["data_skips"],
        "consumed": extra["data_consumed"],
    }
    return {
        "train": {**train, "total_steps": extra["total_steps"]},
        "data": {
            "loader": extra["data"],
            "generation": extra["data_generation"],
            "world": extra["data_world"],
            "workers": extra["data_workers"],
            "batches": batches,
        },
    }
