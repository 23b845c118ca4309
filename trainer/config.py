"""The run configuration: one tree of dataclasses is the schema; YAML files mirror it.

    cfg = load_config("configs/tiny-llava.yaml", ["data.packing.max_tokens=4096", "train.seed=1"])

Unknown keys and values of the wrong type are errors that name the key; the resolved config is
written into the run directory by the trainer (`dump_config`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass(kw_only=True)
class ModelConfig:
    path: str = ""                      # a local Hugging Face checkpoint directory (no hub downloads)
    family: str | None = None           # adapter name; None = from the checkpoint's model_type

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("model.path is required: a local checkpoint directory, e.g. model.path=/ckpt/llava")


@dataclass(kw_only=True)
class PackingConfig:
    max_tokens: int = 8192              # tokens per packed sequence, media tokens included
    buffer: int = 128                   # rendered samples held while choosing packs
    overlong: Literal["trim", "drop"] = "trim"   # a sample over max_tokens: cut at a turn boundary, or drop it

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError(f"data.packing.max_tokens must be > 0, got {self.max_tokens}")
        if self.buffer <= 0:
            raise ValueError(f"data.packing.buffer must be > 0, got {self.buffer}")


@dataclass(kw_only=True)
class DataConfig:
    shards: str = ""                    # a directory written by data_tools/shard.py
    workers: int = 2                    # dataloader worker processes per rank (0 = in the main process)
    shuffle_buffer: int = 1000          # raw samples held for sample-level shuffling
    max_skip_fraction: float = 0.01     # abort when more than this share of an epoch's samples is skipped
    packing: PackingConfig = field(default_factory=PackingConfig)

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
    seed: int = 0                       # with the manifest seed, decides every epoch's mix and order
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")


@dataclass(kw_only=True)
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "run"                   # run directory name under runs/


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
        for section, key in (("model", "path"), ("data", "shards")):
            value = tree.get(section, {}).get(key) if isinstance(tree.get(section), dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                tree[section][key] = str(Path(path).resolve().parent / value)
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


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; known keys under "
                         f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
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
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{key} must be {tp.__name__}, got {value!r}")
    return value
