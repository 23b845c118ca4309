"""The run configuration: one tree of dataclasses is the schema; YAML files mirror it.

    cfg = load_config("configs/tiny-llava.yaml", ["data.packing.max_tokens=4096", "train.seed=1"])

Unknown keys and values of the wrong type are errors that name the key, and so are settings that
contradict each other; the resolved config is written into the run directory by the trainer
(`dump_config`). Each field's comment is its doc: `python -m trainer.train --help-config` prints them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import logging
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_tools.video import VideoPolicy

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ComposeConfig:
    """A new LLaVA-style model from parts (trainer/compose.py), written to model.path on first use."""

    vision: str | None = None  # vision encoder checkpoint (CLIP, SigLIP; vision-only or dual)
    llm: str | None = None  # language model checkpoint with its tokenizer
    template: Literal["vicuna", "chatml"] | None = None  # None: chatml if the tokenizer has <|im_start|>

    def __post_init__(self) -> None:
        if bool(self.vision) != bool(self.llm):
            raise ValueError("model.compose needs both model.compose.vision and model.compose.llm")


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""  # a local Hugging Face checkpoint directory (no hub downloads)
    family: str | None = None  # adapter name; None = from the checkpoint's model_type
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    trust_remote_code: bool = False  # run the checkpoint's own *.py modeling code (needs code_revision)
    code_revision: str | None = None  # pins that code; without it the error message gives the value

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(
                "model.path is required: a local checkpoint directory, e.g. model.path=/ckpt/llava"
            )


@dataclass(kw_only=True)
class PackingConfig:
    max_tokens: int = 8192  # tokens per packed sequence, media tokens included
    buffer: int = 64  # rendered samples held while choosing packs (their pixels too)
    overlong: Literal["trim", "drop"] = "trim"  # a sample over max_tokens: cut at a turn boundary, or drop it

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"data.packing.max_tokens must be > 0, got {self.max_tokens}")
        if self.buffer <= 0:
            raise ValueError(f"data.packing.buffer must be > 0, got {self.buffer}")


@dataclass(kw_only=True)
class DataConfig:
    shards: str = ""  # a directory written by data_tools/shard.py
    eval_shards: str | None = None  # another one, for the eval loss (train.eval_every)
    workers: int = 2  # dataloader worker processes per rank (0 = in the main process)
    shuffle_buffer: int = 1000  # raw samples held for sample-level shuffling
    max_skip_fraction: float = 0.01  # abort when more than this share of an epoch's samples is skipped
    packing: PackingConfig = field(default_factory=PackingConfig)
    video: VideoPolicy = field(default_factory=VideoPolicy)  # frame sampling (data_tools/video.py)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("data.shards is required: the --out directory of data_tools/shard.py")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")


@dataclass(kw_only=True)
class TrainConfig:
    seed: int = 0  # with the manifest seed, decides every epoch's mix and order
    epochs: int = 1  # used when steps is 0
    steps: int = 0  # optimizer steps in all; 0 = as many as `epochs` take
    grad_accum: int = 1  # micro-batches (packs) per optimizer step on each rank
    # FSDP with grad_accum > 1: "micro_batch" reduce-scatters after every micro-batch, so gradients
    # stay sharded (otherwise a rank holds the whole model's fp32 gradients between micro-batches:
    # +30 GB for a 7B full finetune); "step" once per step (less communication); "auto": "step" for
    # LoRA/QLoRA, whose trained weights are small (not with finetune.lora.experts), else "micro_batch".
    grad_reduce: Literal["auto", "micro_batch", "step"] = "auto"
    # Compute dtype (auto: bf16 on GPU, fp32 on CPU). Weights are held as loaded: trained ones in fp32
    # (master weights), frozen ones in the checkpoint's dtype (4-bit for QLoRA's base).
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # FSDP's gradient reduce-scatter / all-reduce
    # HSDP: shard parameters, gradients and optimizer state within groups of this many ranks (e.g. a
    # node's 8 GPUs) and replicate across groups; 0 = shard over all ranks (FSDP).
    shard_group: int = 0
    loss_chunk: int = 1024  # target positions per cross-entropy chunk (bounds memory); 0 = all
    # Mixture-of-experts models: the weight of the router's load-balancing loss (trainer/moe.py);
    # null = the checkpoint's router_aux_loss_coef, 0 = none.
    router_aux_loss_coef: float | None = None
    dist_timeout_s: int = 1800  # collective timeout; how long ranks wait for rank 0's load or export
    # Recompute activations in backward: each block's ("full"), or every other block's ("selective").
    activation_checkpointing: Literal["none", "full", "selective"] = "full"
    compile: bool = False  # torch.compile each block, inside activation checkpointing
    # A NaN/inf loss on any rank: skip the step everywhere, or stop.
    nonfinite: Literal["skip", "abort"] = "skip"
    log_every: int = 1  # optimizer steps between metric logs
    # The device's dense bf16 peak in TFLOP/s, for perf/mfu; 0 = the table of known GPUs in
    # trainer/flops.py (without a figure, only perf/model_tflops_per_s is logged).
    peak_tflops: float = 0.0
    eval_every: int = 0  # steps between eval-loss passes over data.eval_shards; 0 = never

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.steps < 0:
            raise ValueError(f"train.steps must be >= 0 (0 = run train.epochs), got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.log_every < 1 or self.eval_every < 0:
            raise ValueError("train.log_every must be >= 1 and train.eval_every >= 0")
        if self.peak_tflops < 0:
            raise ValueError(
                f"train.peak_tflops must be >= 0 (0 = from the device name), got {self.peak_tflops}"
            )
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"train.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.shard_group < 0 or self.loss_chunk < 0 or self.dist_timeout_s < 1:
            raise ValueError(
                f"train.shard_group and train.loss_chunk must be >= 0 and train.dist_timeout_s "
                f">= 1, got {self.shard_group}, {self.loss_chunk}, {self.dist_timeout_s}"
            )


@dataclass(kw_only=True)
class LoraConfig:
    r: int = 16  # rank of the adapters
    alpha: int = 32  # scale: the adapter's update is multiplied by alpha / r
    dropout: float = 0.05  # on the adapters' input
    targets: list[str] | None = None  # module name patterns; None = the family's default
    vision: bool = False  # LoRA on the vision tower too
    # Mixture of experts: LoRA on every expert's weights too (trainer/lora.py; needs dropout 0).
    experts: bool = False

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(
                f"finetune.lora.r and finetune.lora.alpha must be >= 1, got {self.r}, {self.alpha}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"finetune.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.experts and self.dropout:
            raise ValueError(
                f"finetune.lora.experts=true needs finetune.lora.dropout=0 (peft's LoRA on the experts' "
                f"3-D weights takes no dropout), got {self.dropout}"
            )


@dataclass(kw_only=True)
class QuantConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"  # the frozen base's 4-bit format (bitsandbytes)
    double_quant: bool = True  # quantize the quantization constants too
    compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # dequantized matmuls; auto = train.dtype


# The freeze flags each finetune.stage sets; without a stage, flags left unset take the defaults.
FREEZE_DEFAULTS = {"freeze_vision": True, "freeze_projector": False, "freeze_llm": False}
STAGES = {1: {**FREEZE_DEFAULTS, "freeze_llm": True}, 2: FREEZE_DEFAULTS}
PARTS = {
    "freeze_vision": "the vision tower",
    "freeze_projector": "the projector",
    "freeze_llm": "the language model",
}


@dataclass(kw_only=True)
class FinetuneConfig:
    method: Literal["full", "lora", "qlora"] = "full"  # train the unfrozen parts, or LoRA adapters on them
    # stage 1 (LLaVA pre-training): projector only; stage 2: projector + language model (full or
    # LoRA), vision frozen. A stage sets the three freeze flags; a flag given too must agree with it.
    stage: Literal[1, 2] | None = None
    # The freeze flags are None until resolved, so that a flag given beside finetune.stage can be told
    # from one the stage sets: after loading they are always true or false.
    freeze_vision: bool | None = None  # the vision tower; unset: as finetune.stage says, else true
    freeze_projector: bool | None = None  # the projector; unset: as finetune.stage says, else false
    freeze_llm: bool | None = None  # the language model; unset: as finetune.stage says, else false
    lora: LoraConfig = field(default_factory=LoraConfig)
    qlora: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if self.stage == 1 and self.method != "full":
            raise ValueError("finetune.stage=1 trains the projector only: use finetune.method=full")
        for key, frozen in (STAGES[self.stage] if self.stage else FREEZE_DEFAULTS).items():
            given = getattr(self, key)
            if given is None:
                setattr(self, key, frozen)
            elif self.stage and given != frozen:
                does = "freezes" if frozen else "trains"
                raise ValueError(
                    f"finetune.{key}={str(given).lower()} contradicts "
                    f"finetune.stage={self.stage} (which {does} {PARTS[key]}); drop one of them"
                )
        if self.lora.vision and self.method == "full":
            raise ValueError(
                "finetune.lora.vision=true puts LoRA on the vision tower, but "
                "finetune.method=full has no LoRA: set finetune.method=lora (or qlora), or drop "
                "finetune.lora.vision (full finetuning trains the whole tower with "
                "finetune.freeze_vision=false)"
            )
        if self.lora.vision and self.freeze_vision:
            if self.stage:
                raise ValueError(
                    f"finetune.lora.vision=true contradicts finetune.stage={self.stage} (which "
                    f"freezes the vision tower); drop one of them"
                )
            raise ValueError(
                "finetune.lora.vision=true puts LoRA on the vision tower, but "
                "finetune.freeze_vision=true freezes it: set finetune.freeze_vision=false"
            )
        # With LoRA, the vision tower trains only through finetune.lora.vision.
        vision_trains = not self.freeze_vision and (self.method == "full" or self.lora.vision)
        if self.freeze_projector and self.freeze_llm and not vision_trains:
            if self.method == "full":
                raise ValueError("finetune.freeze_* freeze everything: nothing would train")
            raise ValueError(
                f"finetune.freeze_projector=true and finetune.freeze_llm=true leave nothing for "
                f"finetune.method={self.method} to train: unfreeze one, or set "
                f"finetune.lora.vision=true with finetune.freeze_vision=false"
            )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 2e-5  # language model (and lm_head)
    vision_lr: float | None = None  # None = lr
    projector_lr: float | None = None  # None = lr
    weight_decay: float = 0.0  # never on norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's
    eps: float = 1e-8  # AdamW's
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # the decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to each group's LR
    min_lr_ratio: float = 0.0  # the schedule ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 = no clipping

    def __post_init__(self) -> None:
        for key in ("lr", "vision_lr", "projector_lr"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"optim.{key} must be >= 0, got {value}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.max_grad_norm < 0:
            raise ValueError(
                "optim.warmup_steps >= 0, optim.min_lr_ratio in [0, 1], optim.max_grad_norm >= 0"
            )


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 500  # optimizer steps between checkpoints; 0 = only at the end
    keep: int = 2  # newest checkpoints kept
    # Training waits only while the state is copied to host memory (pinned on CUDA, kept between saves:
    # about 12 bytes per trained parameter / ranks); the files are written in the background, and the
    # next save or the end of the run waits for that write. false: every save blocks until written.
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ValueError(
                f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got {self.every}, {self.keep}"
            )


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/run"  # checkpoints/, tb/, hf/ and config.yaml go here
    export: bool = True  # save_pretrained into run.dir/hf at the end
    merge_lora: bool = False  # with LoRA: also write a merged full model to run.dir/hf/merged
    export_shard_gib: float = 5.0  # largest safetensors file of the export (bigger tensors get their own)

    def __post_init__(self) -> None:
        if self.export_shard_gib <= 0:
            raise ValueError(f"run.export_shard_gib must be > 0, got {self.export_shard_gib}")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig
    data: DataConfig
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        """Settings of different sections that contradict each other."""
        if self.train.eval_every and not self.data.eval_shards:
            raise ValueError(
                f"train.eval_every={self.train.eval_every} evaluates on data.eval_shards, "
                f"which is not set: set data.eval_shards (a data_tools/shard.py --out "
                f"directory) or train.eval_every=0"
            )
        if self.data.eval_shards and not self.train.eval_every:
            raise ValueError(
                "data.eval_shards is set, but train.eval_every=0 never evaluates: set "
                "train.eval_every (steps between eval passes) or drop data.eval_shards"
            )
        # A run shorter than its warmup or its eval interval is a mistake in a real run, but not in a
        # few-step smoke test of a real config, so these only warn.
        steps = self.train.steps
        if steps and self.optim.warmup_steps >= steps:
            logger.warning(
                "optim.warmup_steps=%d >= train.steps=%d: the whole run is warmup, and the LR "
                "never decays; lower optim.warmup_steps unless this is a smoke test",
                self.optim.warmup_steps,
                steps,
            )
        if steps and self.train.eval_every > steps:
            logger.warning(
                "train.eval_every=%d > train.steps=%d: no eval pass will run; lower "
                "train.eval_every unless this is a smoke test",
                self.train.eval_every,
                steps,
            )


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Read YAML (if given), apply `a.b=c` overrides, and build the validated Config."""
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level")
        tree = loaded or {}
        # Relative paths in a config file are relative to that file, so configs travel with their
        # data; relative paths given as overrides are relative to the current directory.
        for keys in (
            ("model", "path"),
            ("data", "shards"),
            ("data", "eval_shards"),
            ("model", "compose", "vision"),
            ("model", "compose", "llm"),
        ):
            *parents, key = keys
            node = tree
            for k in parents:
                node = node.get(k) if isinstance(node, dict) else None
            value = node.get(key) if isinstance(node, dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                node[key] = str(Path(path).resolve().parent / value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value) if value else ""
    return _build(Config, tree, "")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def config_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every settable key under `cls` as (dotted key, default, doc), docs from `field_docs`."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            keys.append((prefix + f.name, default, docs.get(f.name, "")))
    return keys


def config_help() -> str:
    """What `--help-config` prints: one line per key, `key = default  # doc`, the default written as
    an override takes it (JSON is YAML)."""
    rows = [(f"{key} = {json.dumps(default)}", doc) for key, default, doc in config_keys()]
    width = max(len(left) for left, _ in rows)
    return "\n".join(f"{left:<{width}}  # {doc}" for left, doc in rows)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source, on one line: the comment ending the field's line,
    else the comment lines just above it. Read from the source so that the docs cannot drift."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    docs = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if node.end_lineno in comments:
            docs[node.target.id] = comments[node.end_lineno]
            continue
        row, above = node.lineno - 1, []
        while row in comments and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        docs[node.target.id] = " ".join(above)
    return docs


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key {prefix}{unknown[0]}; known keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name in tree:
            kwargs[name] = _coerce(hints[name], tree[name], key)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, key + ".")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise ValueError(f"{key} must be {tp.__name__}, got {value!r}")
    return value
