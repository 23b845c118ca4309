"""What batching needs (trainer/data/packing.py): which rendered samples may share a pack, the media of
packed samples concatenated, the dummy image a text-only pack carries, and the model's inputs from a
packed sequence (ready-made attention masks where sample boundaries are not enough). The dummy image
is rendered, hence on top of Rendering."""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Any, ClassVar

import torch

from trainer import attention
from trainer.models.rendering import Rendering


class Batching(Rendering):
    media_cat_dim: ClassVar[dict[str, int]] = {}  # processor outputs not concatenated on dim 0
    dummy_kwargs: ClassVar[dict[str, Any]] = {}

    def packs_with(self, pack: list[Any], sample: Any) -> bool:
        """Whether rendered `sample` can join the rendered samples of `pack` in one micro-batch (the
        packer asks; a sample alone always packs). Never in a model whose layers would let packed
        samples see each other (`packs_isolated`); LLaVA-OneVision cannot batch videos of different
        frame counts."""
        return not pack or self.packs_isolated

    @cached_property
    def packs_isolated(self) -> bool:
        """Whether packed samples stay apart in every layer of the language model. Where they would not
        (trainer/attention.py's `packing_leaks`: linear attention, state-space layers, unknown layer
        types), packing is off for the run, said once in the log: one sample per micro-batch."""
        why = attention.packing_leaks(self.config)
        if why:
            attention.log_once(
                f"packing is off for {self.path} ({self.family} adapter): {why}, so packed samples would "
                f"see each other; each micro-batch holds one sample",
                logging.WARNING,
            )
        return not why

    def collate_media(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate media tensors of segments (or of packed samples), in order."""
        keys = {k for p in parts for k in p}
        return {
            k: torch.cat([p[k] for p in parts if k in p], dim=self.media_cat_dim.get(k, 0))
            for k in sorted(keys)
        }

    def has_vision_inputs(self, media: dict[str, torch.Tensor]) -> bool:
        return "pixel_values" in media or "pixel_values_videos" in media

    @cached_property
    def dummy_image(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(input_ids, media, position_ids) of one small grey image, as the processor renders it."""
        from PIL import Image

        out = self.processor(
            text=[self.image_token],
            images=[Image.new("RGB", (64, 64), (128, 128, 128))],
            return_tensors="pt",
            add_special_tokens=False,
            **self.dummy_kwargs,
        )
        ids = out["input_ids"][0].to(torch.int64)
        media = self.media_of(out)
        return ids, media, self.position_ids(ids, media)

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Inputs for model(**inputs) from a packed sequence ([L] ids, positions [L] or [3, L])."""
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            **media,
        }

    @classmethod
    def block_masks(cls) -> bool:
        """Whether the family's `model_inputs` hand the model `mmloom_mask` for `attention_masks`."""
        return cls.attention_masks is not Batching.attention_masks

    def attention_masks(self, ids: torch.Tensor, backend: str) -> Any:
        """For families whose `model_inputs` give `mmloom_mask` (trainer/attention.py's `block_causal`
        ids): the `attention_mask` the model takes."""
        raise NotImplementedError
