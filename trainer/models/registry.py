"""The families: each module of trainer.models registers its adapter class here; `get_adapter` picks
one for a checkpoint (by name, else by the checkpoint's model_type, else the generic adapter) and
guards checkpoints that ship their own modeling code."""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
from pathlib import Path
from typing import Any

from trainer.models.adapter import ModelAdapter

PARTS = ("adapter", "batching", "building", "checkpoint", "registry", "rendering", "__main__")  # not families


_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS[cls.family] = cls
    return cls


def load_families() -> dict[str, type[ModelAdapter]]:
    """Import every family module of trainer.models (each registers its adapter); family -> class."""
    import trainer.models

    for _, name, _ in sorted(pkgutil.iter_modules(trainer.models.__path__)):
        if name not in PARTS:
            importlib.import_module(f"trainer.models.{name}")
    return dict(sorted(_ADAPTERS.items()))


def code_revision(path: str | Path) -> str:
    """The pin of a checkpoint's own code: sha256 over its *.py files (names and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def get_adapter(
    path: str | Path, family: str | None = None, trust_remote_code: bool = False, revision: str | None = None
) -> ModelAdapter:
    """The adapter for a checkpoint: by name, else by the checkpoint's model_type, else generic.

    A checkpoint that ships its own modeling code (an `auto_map` in config.json: InternLM-XComposer2,
    Phi-3-Vision, older MiniCPM-V) runs that code only with trust_remote_code and a `revision`
    pinning it: the 16-digit code_revision() of its *.py files, or the Hub commit of a snapshot
    directory (.../snapshots/<commit>), so code that changed since it was reviewed never runs."""
    load_families()
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} not found: model.path must be a local Hugging Face checkpoint directory"
        )
    meta = json.loads(config.read_text())
    if trust_remote_code:
        pins = {code_revision(path)} | ({Path(path).name} if Path(path).parent.name == "snapshots" else set())
        if revision not in pins:
            raise ValueError(
                f"model.trust_remote_code=true runs the Python files in {path}; review them, then pin "
                f"them with model.code_revision={code_revision(path)} (got {revision!r})"
            )
    elif meta.get("auto_map"):
        raise ValueError(
            f"{config} names its own modeling code (auto_map): mmloom does not run it unless you set "
            f"model.trust_remote_code=true and pin it with model.code_revision (see docs/families.md)"
        )
    if family is not None:
        if family not in _ADAPTERS and family != "generic":
            raise ValueError(
                f"model.family={family!r} is unknown; known: generic, {', '.join(sorted(_ADAPTERS))}"
            )
        return _ADAPTERS.get(family, ModelAdapter)(path, trust_remote_code)
    for cls in _ADAPTERS.values():
        if meta.get("model_type") in cls.model_types:
            return cls(path, trust_remote_code)
    return ModelAdapter(path, trust_remote_code)


def adapter_for(model_cfg: Any) -> ModelAdapter:
    """get_adapter for a config's `model` section."""
    return get_adapter(model_cfg.path, model_cfg.family, model_cfg.trust_remote_code, model_cfg.code_revision)
