"""The training loop: load or resume, then step, log, checkpoint; export at the end.

One optimizer step takes `train.grad_accum` packed micro-batches on every rank. Before any
backward the ranks add up the step's target tokens, and each micro-batch's summed token loss is
divided by that global count, so the update is the same whatever the split over ranks and
micro-batches (FSDP sums, not averages, the gradients). A non-finite loss or gradient norm on any
rank makes every rank skip the step (or stop, `train.nonfinite=abort`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data_tools.plan import Generation
from trainer import checkpoint, flops
from trainer.config import Config, dump_config
from trainer.data.packing import PACKED_KWARGS, Pack
from trainer.data.pipeline import PREEMPTION, EpochBatches, build_loader, resume_generation
from trainer.data.render import IGNORE
from trainer.loss import linear_cross_entropy
from trainer.metrics import Metrics, StepStats, step_scalars
from trainer.model import build_model
from trainer.models.adapter import ModelAdapter
from trainer.models.registry import adapter_for
from trainer.moe import RouterBalance
from trainer.optim import build_optimizer, set_lr, step_progress
from trainer.order import OrderLog
from trainer.parallel import CompileStats

logger = logging.getLogger(__name__)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    """The names forward() takes; "**" when it takes any keyword."""
    params = inspect.signature(cls.forward).parameters.values()
    return frozenset("**" if p.kind is inspect.Parameter.VAR_KEYWORD else p.name for p in params)


def _takes(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward takes `name`: transformers' models take `logits_to_keep` and the
    packed-sequence kwargs; remote code may not (peft wrappers pass them on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = _forward_parameters(type(base))
    return name in params or (name != "logits_to_keep" and "**" in params)


def micro_batch_loss(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    pack: Pack,
    device: torch.device,
    per_source: torch.Tensor | None = None,
    chunk: int = 0,
    router: RouterBalance | None = None,
) -> torch.Tensor:
    """Summed cross-entropy over the pack's target tokens (fp32), `chunk` target positions at a time
    (trainer/loss.py; 0 = all at once). With `per_source` ([sources, 2]), adds each source's summed
    loss and target count into it; with `router`, hands it the model's router logits."""
    inputs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in pack.inputs.items()
        if k not in PACKED_KWARGS or _takes(model, k)
    }
    if router is not None:
        inputs["output_router_logits"] = True
    # Position t predicts token t+1: logits only where that token is a target. Most of a multimodal
    # pack is image tokens and prompts, and the rest would cost a [tokens, vocab] matmul and fp32
    # logits (5 GiB for 8192 tokens of a 152k vocabulary) for nothing.
    labels = inputs.pop("labels")[0, 1:]
    keep = torch.nonzero(pack.inputs["labels"][0, 1:] != IGNORE).flatten().to(device)  # found on the host
    head = _chunkable_head(model) if chunk and _takes(model, "logits_to_keep") else None
    if head is not None:
        inputs["logits_to_keep"] = keep
        with _head_inputs(head) as hidden:  # the model stops short of the projection
            out = model(**inputs, use_cache=False)
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        total, token_loss = linear_cross_entropy(
            hidden[0][0], head.weight, labels[keep], chunk, getattr(text, "final_logit_softcapping", None)
        )
    else:
        if _takes(model, "logits_to_keep"):
            inputs["logits_to_keep"] = keep
        out = model(**inputs, use_cache=False)
        logits = out.logits[0]
        if logits.shape[0] != len(keep):  # remote code that computes every position's logits
            logits = logits[keep]
        token_loss = F.cross_entropy(logits.float(), labels[keep], reduction="none")
        total = token_loss.sum()
    if router is not None:
        router.observe(out.router_logits)
    if per_source is not None and pack.sources:
        # Target token t+1 belongs to the sample whose span holds t+1.
        owner = torch.repeat_interleave(
            torch.tensor(pack.sources, device=device), torch.tensor(pack.lengths, device=device)
        )[1:][keep]
        per_source[:, 0].index_add_(0, owner, token_loss.detach().to(per_source.dtype))
        per_source[:, 1].index_add_(0, owner, torch.ones_like(owner, dtype=per_source.dtype))
    return total


def _chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The vocabulary projection when it is a plain bias-free linear layer (not quantized, not wrapped)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if type(head) is torch.nn.Linear and head.bias is None else None


@contextlib.contextmanager
def _head_inputs(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While inside, `head` records its input and returns no logits (an empty last dimension)."""
    seen: list[torch.Tensor] = []

    def record(hidden: torch.Tensor) -> torch.Tensor:
        seen.append(hidden)
        return hidden[..., :0]

    head.forward = record
    try:
        yield seen
    finally:
        del head.forward


@dataclasses.dataclass
class StepLoss:
    """What backward() learnt of one step's loss, for step(): summed over ranks but `by_source`."""

    total: float  # summed token loss (0.0 when some rank's was not finite)
    targets: float  # target tokens
    finite: bool  # every rank's loss was finite
    by_source: torch.Tensor  # [sources, 2] float64: this rank's summed token loss and targets per source
    router: torch.Tensor | None = None  # this rank's RouterBalance.take() (mixture-of-experts models)

    @property
    def mean(self) -> float:
        return self.total / max(self.targets, 1.0)


class Trainer:
    def __init__(self, cfg: Config, rank: int, world: int, order_out: Path | None = None) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.run_dir = Path(cfg.run.dir)
        self.adapter = adapter_for(cfg.model)
        built = build_model(self.adapter, cfg, rank, world)
        self.model, self.device, self.fsdp = built.model, built.device, built.mesh is not None
        # FSDP's mixed-precision policy casts for bf16 compute; a single unsharded GPU uses autocast.
        self.autocast = not self.fsdp and built.compute_dtype != torch.float32
        reduce = cfg.train.grad_reduce
        # Unsharded gradients of LoRA weights only; an adapter on every expert is billions of them.
        small = cfg.finetune.method in ("lora", "qlora") and not cfg.finetune.lora.experts
        self.reduce_per_step = reduce == "step" or (reduce == "auto" and small)
        self.compute_dtype = built.compute_dtype
        self.router = RouterBalance.of(
            self.model, cfg.train.router_aux_loss_coef, self.adapter.router_outputs == "probabilities"
        )
        self.optimizer = build_optimizer(
            self.model, self.adapter, cfg.optim, fused=self.device.type == "cuda"
        )
        self.loader = build_loader(cfg.data, self.adapter, cfg.train.seed, rank, world)
        self.eval_loader = None
        if cfg.data.eval_shards:
            eval_cfg = dataclasses.replace(cfg.data, shards=cfg.data.eval_shards)
            self.eval_loader = build_loader(eval_cfg, self.adapter, cfg.train.seed, rank, world)
        sources = self.loader.dataset.manifest.sources
        self.state = checkpoint.TrainState(total_steps=cfg.train.steps, per_source=[0] * len(sources))
        self.metrics: Metrics | None = None
        self.order = (
            None
            if order_out is None
            else OrderLog(order_out, rank, [s.path for s in sources], cfg.train.grad_accum)
        )
        self.batches: EpochBatches | None = None  # the epoch's; resume() makes the resumed one
        self.eval_loss: float | None = None
        self.saver: checkpoint.AsyncSaver | None = None  # made by the first save()
        self.stop_requested = False  # set by SIGUSR2 or SIGTERM: preemption or the time limit is near

    # --- set-up ----------------------------------------------------------------------------

    def resume(self) -> bool:
        """Restore the newest checkpoint, if there is one: weights, optimizer, RNG, the train state and
        this rank's place in the data. Returns whether there was one."""
        path = checkpoint.latest(self.run_dir)
        if path is None:
            return False
        extra = checkpoint.load(path, self.model, self.optimizer)
        self.state.load_state_dict(extra["train"])
        self._resume_data(path, extra["data"])
        planned = self.state.total_steps
        if self.cfg.train.steps and self.cfg.train.steps != planned:
            logger.warning(
                "train.steps is now %d (the checkpoint planned %d): the schedule follows the new value",
                self.cfg.train.steps,
                planned,
            )
            self.state.total_steps = self.cfg.train.steps
        return True

    def _resume_data(self, path: Path, data: dict[str, Any]) -> None:
        """The epoch's generation, the loader's position and the epoch's batches as saved, or, when the
        checkpoint is from another number of ranks or workers, the epoch's rest split over this run's."""
        ds = self.loader.dataset
        ds.set_epoch(self.state.epoch)
        if data["generation"]["epoch"] == self.state.epoch:
            ds.generation = Generation.from_state(data["generation"])
        if (data["world"], data["workers"]) == (self.world, self.cfg.data.workers):
            self.loader.load_state_dict(data["loader"])
            batches = data["batches"]
        else:
            batches = self._resume_data_elastically(path, data["world"], data["workers"])
        # After the generation is known: the batches count the epoch's progress against it.
        self.batches = self._epoch_batches()
        self.batches.load_state_dict(batches)

    def _resume_data_elastically(self, path: Path, world: int, workers: int) -> dict[str, Any]:
        """The checkpoint is from another number of ranks or workers: this epoch goes on with exactly the
        occurrences no rank had trained, split over the new ranks and workers (a new generation).
        Returns this rank's EpochBatches state."""
        ds = self.loader.dataset
        payload: list[Any] = [None, None]
        if self.rank == 0:
            extras = checkpoint.rank_extras(path)
            generation = resume_generation(
                ds.manifest, ds.seed, ds.generation, [e["data"]["loader"] for e in extras]
            )
            payload = [generation.to_state(), [e["data"]["batches"]["skips"] for e in extras]]
        if dist.is_initialized():
            dist.broadcast_object_list(payload, src=0)
        before = ds.generation
        ds.generation = Generation.from_state(payload[0])
        # Skip counts stay with the epoch: old rank r's go to new rank r mod world.
        skips: dict[str, int] = {}
        for old, old_skips in enumerate(payload[1]):
            if old % self.world == self.rank:
                for key, n in old_skips.items():
                    skips[key] = skips.get(key, 0) + n
        total = ds.epoch_occurrences()
        logger.warning(
            "resumed elastically: %s was written by %d ranks x %d data.workers, this run has "
            "%d x %d; %d of epoch %d's %d occurrences had not been trained (%d at generation %d) "
            "and are split over the new slices as generation %d",
            path,
            world,
            workers,
            self.world,
            self.cfg.data.workers,
            ds.generation.size(total),
            ds.epoch,
            total,
            before.size(total),
            before.index,
            ds.generation.index,
        )
        # The new generation is unread on every rank, and its progress counts from what earlier
        # generations consumed (EpochBatches.before).
        return {"exhausted": False, "skips": skips, "consumed": 0}

    def save(self) -> None:
        """Checkpoint this step (collective). With checkpoint.async_save it is written in the background:
        the next save, or the end of fit(), waits for it."""
        if self.saver is None:
            ckpt = self.cfg.checkpoint
            self.saver = checkpoint.AsyncSaver(self.run_dir, ckpt.keep, background=ckpt.async_save)
        extra = {"train": self.state.state_dict(), "data": self._data_state()}
        self.saver.save(self.state.step, self.model, self.optimizer, extra, self.metrics)

    def _data_state(self) -> dict[str, Any]:
        """This rank's place in the data; the ranks and workers it was read with decide whether a resume
        can restore it as it is (_resume_data)."""
        assert self.batches is not None, "save() before the loop made the epoch's batches"
        return {
            "loader": self.loader.state_dict(),
            "generation": self.loader.dataset.generation.to_state(),
            "world": self.world,
            "workers": self.cfg.data.workers,
            "batches": self.batches.state_dict(),
        }

    def progress(self) -> float:
        """The fraction of the run after warmup that is done, for the LR schedule: by optimizer steps
        with train.steps, else by the data consumed over train.epochs (exact, where any estimate of
        an epoch's steps in packs is not)."""
        cfg = self.cfg
        if cfg.train.steps:
            return step_progress(self.state.step, self.state.total_steps, cfg.optim)
        done = self.state.epoch + (self.batches.progress if self.batches else 0.0)
        return done / cfg.train.epochs

    # --- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Resume or start, then step, evaluate, checkpoint until the run is done or preempted; export."""
        cfg = self.cfg
        resumed = self._start()
        compiled = CompileStats()
        if self.order is not None:
            self.order.resume(self.state.step)  # a fresh run starts a new file
        # A resumed run continues the same curves; points after the checkpoint are replaced.
        self.metrics = Metrics(self.run_dir / "tb", enabled=self.rank == 0, purge_step=self.state.step + 1)
        bar = self._progress_bar()
        losses: list[float] = []
        preempted = False
        skipped_in_a_row = 0
        self._catch_preemption()
        for packs, wait in self._step_packs():
            with compiled.phase("train"):
                loss = self.step(packs, wait)
            if loss is None:
                skipped_in_a_row += 1
                if skipped_in_a_row >= 20:
                    raise FloatingPointError(
                        "20 steps in a row had a non-finite loss or gradient; "
                        "lower optim.lr or check the data"
                    )
                continue  # no step was taken: nothing to evaluate or save
            skipped_in_a_row = 0
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1 if cfg.train.steps else self.progress() * cfg.train.epochs - bar.n)
            if self._eval_due():
                with compiled.phase("eval"):
                    self.eval_loss = self.evaluate()
                self.metrics.log(self.state.step, {"eval/loss": self.eval_loss})
                logger.info("step %d: eval loss %.4f", self.state.step, self.eval_loss)
            if self._checkpoint_due():
                self.save()
            if self._agree_to_stop():
                preempted = True
                break
        bar.close()
        self._finish(preempted)
        result = self._result(resumed, losses, preempted)
        if cfg.train.compile:
            result["compile"] = compiled.summary()
        compiled.close()
        return result

    def _start(self) -> bool:
        """Write the resolved config into the run directory, then resume; returns whether it did."""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        return self.resume()

    def _progress_bar(self) -> tqdm:
        """Rank 0's bar: steps for train.steps; epochs (fractional, from the data consumed) for
        train.epochs."""
        cfg = self.cfg
        by_epochs = "{l_bar}{bar}| {n:.2f}/{total:.0f} epochs [{elapsed}<{remaining}{postfix}]"
        return tqdm(
            total=self.state.total_steps or cfg.train.epochs,
            initial=self.state.step if cfg.train.steps else 0,
            disable=self.rank != 0,
            desc="train",
            unit="step" if cfg.train.steps else "epoch",
            dynamic_ncols=True,
            bar_format=None if cfg.train.steps else by_epochs,
        )

    def _step_packs(self) -> Iterator[tuple[list[Pack], float]]:
        """Each optimizer step's micro-batches and the seconds spent waiting for them, epoch after epoch,
        from the epoch resume() restored, until train.steps or train.epochs is reached."""
        cfg = self.cfg
        if self.batches is None:  # a fresh run
            self.batches = self._epoch_batches()
        while True:
            it = iter(self.batches)
            while True:
                if cfg.train.steps and self.state.step >= self.state.total_steps:
                    return  # also when resuming a run that had finished its steps
                wait = time.perf_counter()
                packs = [p for _, p in zip(range(cfg.train.grad_accum), it)]
                wait = time.perf_counter() - wait
                if not packs:
                    break
                yield packs, wait
            self.state.epoch += 1
            if not cfg.train.steps and self.state.epoch >= cfg.train.epochs:
                return
            self.batches = self._epoch_batches()

    def _epoch_batches(self) -> EpochBatches:
        """The batches of epoch `state.epoch`, fresh."""
        self.loader.dataset.set_epoch(self.state.epoch)
        return EpochBatches(self.loader, self.adapter, self.cfg.data.max_skip_fraction)

    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every
        return self.eval_loader is not None and bool(every) and self.state.step % every == 0

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and self.state.step % every == 0

    def _finish(self, preempted: bool) -> None:
        """The last checkpoint (unless this step's was just saved), then a requeue or the export."""
        if not self._checkpoint_due():
            self.save()
        if self.saver is not None:
            # The last checkpoint is complete and named step-N before the export reads the weights and
            # before a preempted run exits for its requeue.
            self.saver.wait(self.metrics)
            self.saver.close()
        if preempted:
            self._request_requeue()
        elif self.cfg.run.export:
            from trainer.export import export

            export(
                self.model,
                self.adapter,
                self.cfg,
                self.run_dir / "hf",
                merge=self.cfg.run.merge_lora,
                max_shard_gib=self.cfg.run.export_shard_gib,
            )
        self.metrics.close()

    def _result(self, resumed: bool, losses: list[float], preempted: bool) -> dict[str, Any]:
        """fit()'s answer, printed as the run's final JSON line (tests and launchers parse it)."""
        sources = self.loader.dataset.manifest.sources
        return {
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "resumed": resumed,
            "per_source": {s.path: n for s, n in zip(sources, self.state.per_source)},
            "final_loss": losses[-1] if losses else None,
            "losses": losses,
            "eval_loss": self.eval_loss,
            "skipped_steps": self.state.skipped_steps,
            "preempted": preempted,
        }

    # --- preemption ---------------------------------------------------------------------------

    def _catch_preemption(self) -> None:
        if threading.current_thread() is threading.main_thread():
            # SLURM's --signal=USR2@margin before the time limit; SIGTERM from a preemption
            # (PreemptMode=REQUEUE with a GraceTime), `scancel`, or torchrun passing one on.
            for sig in PREEMPTION:
                signal.signal(sig, self._on_preempt)

    def _on_preempt(self, signum: int, frame: Any) -> None:
        # Only a flag: the ranks agree at the next step boundary, then checkpoint together.
        if not self.stop_requested:
            logger.warning("%s received: checkpointing after this step", signal.Signals(signum).name)
        self.stop_requested = True

    def _agree_to_stop(self) -> bool:
        (stop,) = all_sum([float(self.stop_requested)], self.device)
        if stop:
            logger.warning("step %d: preemption signal received, checkpointing and exiting", self.state.step)
        return bool(stop)

    def _request_requeue(self) -> None:
        """Tell the launcher to requeue the job: slurm/train.sbatch and launch.py read this file."""
        marker = os.environ.get("MMLOOM_REQUEUE_FILE")
        if marker and self.rank == 0:
            Path(marker).write_text(f"{self.state.step}\n")

    # --- one step ----------------------------------------------------------------------------

    def backward(self, packs: list[Pack]) -> StepLoss:
        """Gradients of the step's loss (summed over ranks), and that loss. A mixture-of-experts model's
        router loss (trainer/moe.py) joins each micro-batch's by its share of the step's tokens."""
        targets, routed = all_sum([sum(p.targets for p in packs), sum(p.length for p in packs)], self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        by_source = torch.zeros(
            (len(self.loader.dataset.manifest.sources), 2), dtype=torch.float64, device=self.device
        )
        for i, pack in enumerate(packs):
            if self.fsdp and self.reduce_per_step:
                # Reduce-scatter once per step, after the last micro-batch's backward; until then every
                # rank holds the unsharded gradients (train.grad_reduce).
                self.model.set_requires_gradient_sync(i == len(packs) - 1)
            with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast):
                loss = micro_batch_loss(
                    self.model,
                    self.adapter,
                    pack,
                    self.device,
                    by_source,
                    self.cfg.train.loss_chunk,
                    self.router,
                )
            objective = loss / max(targets, 1.0)
            if self.router is not None:
                objective = objective + self.router.loss(pack.length / routed)
            objective.backward()
            loss_sum += loss.detach().double()
        finite = math.isfinite(loss_sum.item())
        total_loss, bad = all_sum([loss_sum.item() if finite else 0.0, float(not finite)], self.device)
        router = self.router.take(self.device) if self.router is not None else None
        return StepLoss(total=total_loss, targets=targets, finite=not bad, by_source=by_source, router=router)

    def step(self, packs: list[Pack], wait: float) -> float | None:
        """One optimizer step over these micro-batches; returns the mean loss per target token, or None
        when the step was skipped for a non-finite loss or gradient."""
        start = time.perf_counter()
        loss = self.backward(packs)
        grad_norm = float(self._clip()) if loss.finite else None  # the global norm: the same everywhere
        if grad_norm is None or not math.isfinite(grad_norm):
            self._skip_step()
            return None
        set_lr(self.optimizer, self.state.step, self.progress(), self.cfg.optim)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.order is not None:
            self.order.log(self.state.epoch, self.state.step, packs)
        self.state.step += 1
        tokens, samples = self._count_trained(packs)
        if self.state.step % self.cfg.train.log_every == 0:
            self._log_step(packs, loss, grad_norm, tokens, samples, time.perf_counter() - start + wait, wait)
        return loss.mean

    def _skip_step(self) -> None:
        """Drop the step's gradients on every rank (they all saw the same non-finite value), or abort."""
        step = self.state.step
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        if self.cfg.train.nonfinite == "abort":
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} on some rank; "
                f"lower optim.lr or set train.nonfinite=skip"
            )
        logger.warning("step %d: non-finite loss or gradient on some rank, skipped everywhere", step)

    def _count_trained(self, packs: list[Pack]) -> tuple[float, float]:
        """Add the step's tokens, samples and samples per source over all ranks to the train state;
        returns (tokens, samples)."""
        per_source = [0] * len(self.state.per_source)
        for pack in packs:
            for source in pack.sources:
                per_source[source] += 1
        tokens, samples, *per_source = all_sum(
            [sum(p.tokens for p in packs), sum(len(p.sources) for p in packs), *per_source], self.device
        )
        self.state.tokens += int(tokens)
        self.state.samples += int(samples)
        self.state.per_source = [a + int(b) for a, b in zip(self.state.per_source, per_source)]
        return tokens, samples

    def _log_step(
        self,
        packs: list[Pack],
        loss: StepLoss,
        grad_norm: float,
        tokens: float,
        samples: float,
        seconds: float,
        wait: float,
    ) -> None:
        """Log the step's scalars (trainer/metrics.py); collective, as every rank logs the same steps."""
        # The step's model FLOPs (trainer/flops.py: host arithmetic on the packs) and a mixture of
        # experts' router figures ride with the per-source losses: one all-reduce and one read.
        step_flops = flops.counter(self.model, self.adapter).step(packs)
        flops_t = torch.full((1,), step_flops, dtype=torch.float64, device=self.device)
        router = [loss.router] if loss.router is not None else []
        reduced = torch.cat([loss.by_source.flatten(), flops_t, *router])
        if dist.is_initialized():
            dist.all_reduce(reduced)
        summed = reduced.tolist()
        *by_source, step_flops = summed[: loss.by_source.numel() + 1]
        names = [s.name for s in self.loader.dataset.manifest.sources]
        cfg = self.cfg
        stats = StepStats(
            loss=loss.mean,
            grad_norm=grad_norm,
            lrs={group["name"]: group["lr"] for group in self.optimizer.param_groups},
            tokens=tokens,
            samples=samples,
            budget=len(packs) * self.world * cfg.data.packing.max_tokens,
            seconds=seconds,
            wait=wait,
            flops=step_flops,
            world=self.world,
            by_source=list(zip(names, by_source[::2], by_source[1::2])),
            skipped=sum(self.batches.skips.values()) if self.batches is not None else None,
            peak_tflops=flops.peak_tflops(self.device, cfg.train.peak_tflops),
        )
        scalars = step_scalars(stats)
        if self.router is not None:
            scalars.update(self.router.scalars(summed[loss.by_source.numel() + 1 :]))
        self.metrics.log(self.state.step, scalars)

    def evaluate(self) -> float:
        """Mean loss per target token over one pass of the eval shards (all ranks)."""
        assert self.eval_loader is not None
        self.model.eval()
        self.eval_loader.dataset.set_epoch(0)
        total = targets = 0.0
        # The training step's autocast too: a single GPU holds fp32 masters beside bf16 frozen weights.
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast),
        ):
            for pack in EpochBatches(self.eval_loader, self.adapter, self.cfg.data.max_skip_fraction):
                total += float(
                    micro_batch_loss(
                        self.model, self.adapter, pack, self.device, chunk=self.cfg.train.loss_chunk
                    )
                )
                targets += pack.targets
        self.model.train()
        total, targets = all_sum([total, targets], self.device)
        return total / max(targets, 1.0)

    def _clip(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train(cfg: Config, order_out: Path | None = None) -> dict[str, Any]:
    from trainer.dist import init_distributed

    rank, world = init_distributed(cfg.train.dist_timeout_s)
    trainer = Trainer(cfg, rank, world, order_out)
    try:
        result = trainer.fit()
    except Exception:
        if trainer.saver is not None:  # a checkpoint staged before the error is still written
            trainer.saver.wait_after_error()
        raise
    if rank == 0:
        logger.info("done: %s", json.dumps({k: v for k, v in result.items() if k != "losses"}))
    return result
