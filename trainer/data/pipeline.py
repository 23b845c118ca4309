"""The streaming pipeline: epoch plan -> shard reads -> shuffle -> render -> pack, resumable.

Each (rank, dataloader worker) takes one slice of the epoch plan (data_tools/plan.py): a proportional,
contiguous part of every source's sequence, read in a random interleaving of the sources, so the stream
carries every source in its epoch proportion at every moment. Each source's part is read sequentially
(one open shard per source). Raw samples are shuffled in a buffer, rendered with the model's processor
and packed. The slice's whole position is a small state (how many samples it has read, the occurrence
ids held in the shuffle buffer and in the packer, the RNG state, skips not yet reported), saved by
torchdata's StatefulDataLoader with every micro-batch; on restore the held samples are read again and
the stream continues exactly where it was. On another number of ranks or workers the checkpoint's
states instead give the epoch's untrained occurrences, which become a new generation of the epoch,
split over the new slices (`resume_generation`).

    loader = build_loader(cfg.data, adapter, seed=cfg.train.seed, rank=rank, world=world)
    for epoch in range(cfg.train.epochs):
        loader.dataset.set_epoch(epoch)
        for pack in EpochBatches(loader, adapter, cfg.data.max_skip_fraction): ...  # as many on every rank
"""

from __future__ import annotations

import logging
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_tools.manifest import Manifest, load_manifest
from data_tools.plan import EpochPlan, Generation, plan_epoch, remaining, slice_ids, to_runs
from data_tools.sample import Sample
from trainer.config import DataConfig
from trainer.data.packing import Pack, Packer, collate, empty_pack
from trainer.data.reader import RawSample, Skip, read_occurrences, read_slice
from trainer.data.render import RenderError, render_sample
from trainer.models.adapter import ModelAdapter

logger = logging.getLogger(__name__)


STREAM = "mmloom_stream"  # marks a reader state inside torchdata's loader state


def plan_seed(manifest: Manifest, seed: int) -> int:
    """The plan's seed: the run's seed together with the one stored by shard.py."""
    return (manifest.seed << 32) + seed


class PackedStream(IterableDataset):
    """Packed micro-batches of one rank for one epoch (`set_epoch`), split over its workers."""

    def __init__(
        self, cfg: DataConfig, adapter: ModelAdapter, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        super().__init__()
        self.cfg, self.adapter, self.rank, self.world = cfg, adapter, rank, world
        self.root = Path(cfg.shards)
        self.manifest = load_manifest(self.root)
        self.seed = plan_seed(self.manifest, seed)
        self.epoch = 0
        self.generation = Generation(epoch=0)

    def set_epoch(self, epoch: int) -> None:
        """The loop owns the epoch; a restored stream state applies only to the epoch it is from."""
        self.epoch = epoch
        if self.generation.epoch != epoch:
            self.generation = Generation(epoch=epoch)

    def part(self) -> tuple[int, int]:
        """(this worker's slice index, number of slices) over all ranks and workers."""
        info = get_worker_info()
        workers = max(1, self.cfg.workers)
        worker = info.id if info is not None else 0
        return self.rank * workers + worker, self.world * workers

    def epoch_occurrences(self) -> int:
        return sum(s.epoch_samples for s in self.manifest.sources)  # the plan's length, exactly

    def rank_occurrences(self) -> int:
        """Occurrences of this epoch's generation planned for this rank (all its workers)."""
        n = self.generation.size(self.epoch_occurrences())
        workers = max(1, self.cfg.workers)
        parts = self.world * workers
        first = self.rank * workers
        return (first + workers) * n // parts - first * n // parts

    def __iter__(self) -> Iterator[Pack]:
        return _StreamIter(self)


class _StreamIter:
    """One worker's pass over its slice; stateful so StatefulDataLoader can save and restore it."""

    def __init__(self, ds: PackedStream) -> None:
        self.ds = ds
        self.epoch = ds.epoch
        self.generation = ds.generation
        self.part, self.parts = ds.part()
        self.plan: EpochPlan = plan_epoch(ds.manifest, ds.seed, self.epoch)
        # Per source the ids this slice reads, and the sources in the order it reads them.
        self.ids, self.order = slice_ids(self.plan, self.generation, ds.seed, self.part, self.parts)
        self.cursor = 0  # samples read so far (entries of self.order)
        self.rng = np.random.default_rng(
            [ds.seed & 0xFFFFFFFF, ds.seed >> 32, self.epoch, self.generation.index, self.part, 0x5B0F]
        )
        self.shuffle: list[RawSample] = []
        self.reserve = len(ds.adapter.dummy_image[0])
        self.packer = Packer(
            ds.cfg.packing.max_tokens,
            ds.cfg.packing.buffer,
            reserve=self.reserve,
            compatible=ds.adapter.packs_with,
        )
        self.skips: Counter[str] = Counter()
        self._restore: dict[str, Any] | None = None
        self._gen: Iterator[Pack] | None = None

    # --- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            STREAM: 1,
            "epoch": self.epoch,
            "generation": self.generation.index,
            "part": self.part,
            "parts": self.parts,
            "cursor": self.cursor,
            "shuffle": [r.occurrence for r in self.shuffle],
            "pool": [s.occurrence for s in self.packer.pool],
            "rng": self.rng.bit_generator.state,
            "skips": dict(self.skips),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["epoch"] != self.epoch:
            # Saved in an earlier epoch (its end): this epoch starts from its beginning.
            logger.info("data state is from epoch %d; epoch %d starts fresh", state["epoch"], self.epoch)
            return
        if (state["part"], state["parts"], state.get("generation", 0)) != (
            self.part,
            self.parts,
            self.generation.index,
        ):
            raise ValueError(
                f"data state is for slice {state['part']}/{state['parts']} of generation "
                f"{state.get('generation', 0)} but this worker reads {self.part}/{self.parts} "
                f"of generation {self.generation.index}: other ranks or workers resume "
                f"through resume_generation"
            )
        self._restore = state

    # --- the stream ------------------------------------------------------------------------

    def __iter__(self) -> _StreamIter:
        return self

    def __next__(self) -> Pack:
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen)

    def _run(self) -> Iterator[Pack]:
        if self._restore is not None:
            self._resume(self._restore)
        reader = read_slice(self.ds.root, self.plan, self.ids, self.order, self.cursor)
        for self.cursor, item in enumerate(reader, self.cursor + 1):  # samples read, this one included
            if isinstance(item, Skip):
                self._skip(item.reason, item.source, item.detail)
                continue
            self.shuffle.append(item)
            if len(self.shuffle) >= self.ds.cfg.shuffle_buffer:
                yield from self._pack(self._draw())
        while self.shuffle:
            yield from self._pack(self._draw())
        for samples in self.packer.flush():
            yield self._emit(samples)
        if self.skips:
            yield empty_pack(self.ds.adapter, self._take_skips())

    def _resume(self, state: dict[str, Any]) -> None:
        self.cursor = state["cursor"]
        self.rng.bit_generator.state = state["rng"]
        self.skips = Counter(state["skips"])
        held = sorted(set(state["shuffle"]) | set(state["pool"]))
        raw = {r.occurrence: r for r in read_occurrences(self.ds.root, self.plan, held)}
        self.shuffle = [raw[o] for o in state["shuffle"] if isinstance(raw.get(o), RawSample)]
        for occ in state["pool"]:
            item = raw.get(occ)
            if isinstance(item, RawSample) and (rendered := self._render(item)) is not None:
                self.packer.pool.append(rendered)
        for o in held:
            if isinstance(raw.get(o), Skip):
                self._skip(raw[o].reason, raw[o].source, raw[o].detail)  # the shard broke since
        self._restore = None

    def _draw(self) -> RawSample:
        i = int(self.rng.integers(len(self.shuffle)))
        self.shuffle[i], self.shuffle[-1] = self.shuffle[-1], self.shuffle[i]
        return self.shuffle.pop()

    def _render(self, raw: RawSample) -> Any:
        try:
            if "json" not in raw.members:
                raise RenderError("corrupt_sample", f"{raw.shard} key {raw.key} has no .json member")
            try:
                sample = Sample.from_json(raw.members["json"])
            except (ValueError, KeyError, TypeError) as e:
                raise RenderError("corrupt_sample", f"{raw.shard} key {raw.key}: {e}") from None
            # A sample without media must leave room for the grey image its pack will carry.
            limit = self.ds.cfg.packing.max_tokens - (0 if sample.media else self.reserve)
            rendered = render_sample(
                self.ds.adapter, sample, raw.members, limit, self.ds.cfg.packing.overlong, self.ds.cfg.video
            )
        except RenderError as e:
            self._skip(e.reason, raw.source, f"{raw.shard} key {raw.key}: {e.detail}")
            return None
        except Exception as e:  # noqa: BLE001 - the processor or template failing on one sample
            logger.exception("rendering %s key %s failed", raw.shard, raw.key)
            self._skip("render_error", raw.source, f"{raw.shard} key {raw.key}: {e!r}")
            return None
        rendered.source, rendered.occurrence = raw.source, raw.occurrence
        rendered.id = sample.id or sample.key
        return rendered

    def _pack(self, raw: RawSample) -> Iterator[Pack]:
        rendered = self._render(raw)
        if rendered is not None:
            for samples in self.packer.add(rendered):
                yield self._emit(samples)

    def _emit(self, samples: list) -> Pack:
        pack = collate(self.ds.adapter, samples)
        assert pack.length <= self.ds.cfg.packing.max_tokens, (pack.length, pack.lengths)
        pack.skips = self._take_skips()
        return pack

    def _skip(self, reason: str, source: int, detail: str) -> None:
        logger.warning("skipped (%s): %s", reason, detail)
        self.skips[f"{reason}:{source}"] += 1

    def _take_skips(self) -> dict[str, int]:
        skips, self.skips = dict(self.skips), Counter()
        return skips


PREEMPTION = (signal.SIGUSR2, signal.SIGTERM)  # the training process checkpoints, then exits


def _ignore_preemption(worker_id: int) -> None:
    # Preemption signals are for the training process (checkpoint, then exit); a worker must not die
    # of one. The parent blocks them while starting workers (see EpochBatches), so none arrives before
    # this; the workers end with the training process.
    for sig in PREEMPTION:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(PREEMPTION))


def build_loader(
    cfg: DataConfig, adapter: ModelAdapter, seed: int, rank: int = 0, world: int = 1
) -> StatefulDataLoader:
    """A StatefulDataLoader yielding this rank's packs (batch_size=None: packing made the batch)."""
    dataset = PackedStream(cfg, adapter, seed, rank, world)
    adapter.packs_isolated  # decided here, and said once when packing is off, not in each worker
    # Its own generator: each iter() of a DataLoader otherwise draws a seed from the global torch
    # RNG, and a resumed run (fewer iter() calls) would then see other dropout masks.
    return StatefulDataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.workers,
        multiprocessing_context="spawn" if cfg.workers else None,
        prefetch_factor=2 if cfg.workers else None,
        worker_init_fn=_ignore_preemption if cfg.workers else None,
        generator=torch.Generator().manual_seed(seed),
    )


def stream_states(loader_state: Any) -> list[dict[str, Any]]:
    """The reader states (one per worker that had started) inside a StatefulDataLoader's state."""
    found: list[dict[str, Any]] = []
    if isinstance(loader_state, dict):
        if loader_state.get(STREAM) == 1:
            return [loader_state]
        for value in loader_state.values():
            found += stream_states(value)
    elif isinstance(loader_state, (list, tuple)):
        for value in loader_state:
            found += stream_states(value)
    return found


def resume_generation(
    manifest: Manifest, seed: int, generation: Generation, loader_states: list[Any]
) -> Generation:
    """The next generation of `generation`'s epoch: every occurrence that no slice of the checkpoint had
    trained (read but held in a shuffle or packing buffer counts as untrained), to be split over another
    number of ranks or workers. `loader_states`: every rank's loader state from the checkpoint."""
    states, parts = {}, None
    for state in (s for ls in loader_states for s in stream_states(ls)):
        if state["epoch"] != generation.epoch:
            continue  # saved before this epoch began: that slice had read nothing of it
        if state.get("generation", 0) != generation.index:
            raise ValueError(
                f"a data state of the checkpoint is from generation "
                f"{state.get('generation', 0)} of epoch {generation.epoch}, the checkpoint's "
                f"generation is {generation.index}"
            )
        parts = state["parts"]
        states[state["part"]] = {"cursor": state["cursor"], "held": [*state["shuffle"], *state["pool"]]}
    plan = plan_epoch(manifest, seed, generation.epoch)
    if parts is None:  # no slice had started the epoch
        return Generation(epoch=generation.epoch, index=generation.index, runs=generation.runs)
    left = remaining(plan, generation, seed, parts, states)
    return Generation(epoch=generation.epoch, index=generation.index + 1, runs=to_runs(left))


class SkipLimitExceeded(RuntimeError):
    pass


class EpochBatches:
    """Iterate one epoch of packs with the same number of micro-batches on every rank.

    Each step the ranks agree (one all-reduce of four numbers) whether anyone still has data,
    whether anyone exceeded the skip limit or failed, and how far through the epoch the furthest
    rank is; a rank that ran dry yields zero-weight empty packs until all are done, so no rank
    leaves a collective early. Skip counts reported by the workers are accumulated in `skips` as
    {"reason:source index": n}; samples per source in `per_source`; `progress` is the fraction of
    the epoch's planned occurrences consumed (trained on or skipped), by the furthest rank, the same
    on every rank, reaching 1.0 at the end of the epoch (a resumed generation counts what earlier ones
    consumed).

    The loader keeps its own position; what a checkpoint needs besides it is `state_dict()`, given back
    to a new EpochBatches of the same epoch by `load_state_dict()` before it is iterated.
    """

    def __init__(
        self, loader: StatefulDataLoader, adapter: ModelAdapter, max_skip_fraction: float, group: Any = None
    ) -> None:
        self.loader, self.adapter, self.group = loader, adapter, group
        # True once this rank's loader has ended this epoch. A checkpoint stores it: resuming a
        # rank that had run dry must not iterate its (finished) loader again.
        self.exhausted = False
        self.max_skip_fraction = max_skip_fraction
        ds: PackedStream = loader.dataset  # type: ignore[assignment]
        self.planned = ds.rank_occurrences()
        # The share of the epoch earlier generations consumed (0 in the first one).
        epoch_total = max(ds.epoch_occurrences(), 1)
        self.before = 1 - ds.generation.size(epoch_total) / epoch_total
        self.share = epoch_total / ds.world  # the skip limit counts against a rank's share of the epoch
        self.skips: Counter[str] = Counter()
        self.per_source: Counter[int] = Counter()
        self.consumed = 0  # occurrences trained on or skipped this epoch, for `progress`
        self.progress = 0.0
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        """This rank's state in the epoch besides the loader's position; the skip counts are kept so
        that the skip limit holds for the whole epoch across requeues."""
        return {"exhausted": self.exhausted, "skips": dict(self.skips), "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from `state_dict()` of the same epoch; before iterating."""
        self.exhausted = bool(state["exhausted"])
        self.skips = Counter(state["skips"])
        self.consumed = int(state["consumed"])

    def __iter__(self) -> Iterator[Pack]:
        # Workers start with the parent's signal mask: keep the preemption signals blocked until they
        # have set them to ignored, else one arriving during their start-up would kill them.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set(PREEMPTION))
        try:
            it = iter(self.loader) if not self.exhausted else iter(())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        while True:
            pack, error = None, None
            while not self.exhausted and pack is None and error is None:
                try:
                    p = next(it)
                except StopIteration:
                    self.exhausted = True
                    break
                except Exception as e:  # noqa: BLE001 - a worker died: every rank must hear of it
                    error = e
                    break
                self.skips.update(p.skips)
                self.consumed += sum(p.skips.values())
                pack = None if p.empty else p
            if pack is not None:
                self.consumed += len(pack.sources)
            over = sum(self.skips.values()) > self.max_skip_fraction * max(self.share, 1)
            mine = 1.0 if self.exhausted else min(self.consumed / max(self.planned, 1), 1.0)
            done = int((self.before + (1 - self.before) * mine) * 1_000_000)
            flags = torch.tensor([pack is not None, over, error is not None, done], dtype=torch.int64)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            if flags[2]:
                raise RuntimeError(
                    "the data pipeline failed on " + ("this rank" if error is not None else "another rank")
                ) from error
            if flags[1]:
                raise SkipLimitExceeded(
                    f"more than data.max_skip_fraction={self.max_skip_fraction} of the epoch's samples were "
                    f"skipped on some rank (this rank: {dict(self.skips)} of {round(self.share)}); see the "
                    f"warnings "
                    f"above, fix the data, or raise data.max_skip_fraction"
                )
            if not flags[0]:
                return
            self.progress = min(int(flags[3]), 1_000_000) / 1_000_000
            self.steps += 1
            if pack is None:
                yield empty_pack(self.adapter)
            else:
                self.per_source.update(pack.sources)
                yield pack
