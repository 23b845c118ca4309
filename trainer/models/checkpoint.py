"""What every part of a model adapter needs: the checkpoint, its config and its processor. The parts
each serve one caller: rendering.py the renderer (trainer/data/render.py), batching.py collate and the
packer (trainer/data/packing.py), building.py model building, LoRA/QLoRA and FSDP (trainer/model.py,
trainer/lora.py, trainer/parallel.py). adapter.py's ModelAdapter is all of them; a family subclasses
it in one file and overrides what differs."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar


class Checkpoint:
    family: ClassVar[str] = "generic"

    def __init__(self, path: str | Path, trust_remote_code: bool = False) -> None:
        self.path = str(path)
        self.trust_remote_code = trust_remote_code  # checked against model.code_revision by get_adapter

    def __getstate__(self) -> dict[str, Any]:
        # Dataloader workers get the path and load their own processor.
        return {"path": self.path, "trust_remote_code": self.trust_remote_code}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state.get("trust_remote_code", False))  # type: ignore[misc]

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every from_pretrained / from_config call for this checkpoint."""
        return {"trust_remote_code": True} if self.trust_remote_code else {}

    @cached_property
    def processor(self) -> Any:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(self.path, local_files_only=True, **self.load_kwargs)
        if getattr(proc, "chat_template", None) is None:
            raise ValueError(
                f"{self.path}: the processor has no chat template; mmloom renders conversations "
                f"with it. Add chat_template.jinja to the checkpoint."
            )
        return proc

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, local_files_only=True, **self.load_kwargs)
