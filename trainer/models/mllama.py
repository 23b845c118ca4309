"""Llama 3.2 Vision (mllama): each image is one <|image|> token in the text and up to four 560-px tiles
that the language model reads through separate cross-attention layers, steered by a per-token
`cross_attention_mask` [batch, tokens, images, 4 tiles] instead of image tokens in the sequence.

Media carry a batch dimension ([1, images, 4, 3, 560, 560], aspect-ratio ids [1, images] and tile masks
[1, images, 4]), so segments and packed samples are concatenated along the image dimension; every image is
padded to 4 tiles by the processor, so no padding is needed.

The cross-attention mask is built per pack in `model_inputs`, sample by sample, so that a sample's tokens
see only its own images:
- a token at or after one of its sample's images attends to that image's tiles exactly as the processor
  decides for the sample alone (an image covers the tokens up to the next one, the last one to the end of
  its sample, consecutive images all of those);
- transformers 5.23-5.25 turns a row with no image at all (the tokens before a sample's first image) into
  one that attends to every tile in the batch row, zeroing only its MLP output (not the attention's:
  huggingface/transformers#39379; a strict xfail in tests/families/test_mllama.py fails once a release
  fixes it, and this mask must then follow). Packed, "every tile" would be every sample's images, so
  such a row attends to every tile of its own sample's images instead: the attention the sample alone
  gets, but with the MLP output kept, since a row that attends to anything is not zeroed. A sample
  without images attends to the grey image (see trainer/data/packing.py) appended to the pack for it.
Packed loss is therefore exactly the sum of per-sample losses, and no sample depends on another's image.

Inside transformers the mask grows to tokens x images x 4 x 1601 vision tokens: it is built here as
uint8 (the processor's int64 would take 8x the memory there); keep that product in mind when choosing
data.packing.max_tokens for image-dense data.

Text-only packs still run the vision tower and the cross-attention layers (on the grey image): with no
pixel values transformers skips those layers, and FSDP ranks would then issue different collectives.
"""

from __future__ import annotations

import itertools
from functools import cached_property
from typing import Any

import torch

from trainer.models.adapter import ModelAdapter
from trainer.models.registry import register

IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")


@register
class MllamaAdapter(ModelAdapter):
    family = "mllama"
    model_types = ("mllama",)
    example = "meta-llama/Llama-3.2-11B-Vision-Instruct"
    media_keys = IMAGE_KEYS
    media_cat_dim = {k: 1 for k in IMAGE_KEYS}
    end_of_turn_tokens = ("<|eot_id|>",)
    # group_patterns: the defaults name its vision_model. and multi_modal_projector.

    @cached_property
    def media_token_ids(self) -> set[int]:
        # The processor also names <|python_tag|>, a token the model writes for tool calls: not media.
        return {self.tokenizer.convert_tokens_to_ids(self.image_token)}

    def process(self, text: str, images: list, videos: list, first: bool, sample_images: int = 0) -> Any:
        """Tokenize one segment and process its images apart: MllamaProcessor writes a BOS into every
        text that has none, which would put one at the start of every later segment."""
        bos = self.tokenizer.bos_token
        special = first and not (bos is not None and text.startswith(bos))
        out = dict(self.tokenizer([text], return_tensors="pt", add_special_tokens=special))
        if images:
            pixels = self.processor(images=[images], return_tensors="pt")
            out.update({k: pixels[k] for k in IMAGE_KEYS})
        return out

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

        image_id = self.config.image_token_index
        starts = (position_ids == 0).nonzero().flatten().tolist() + [input_ids.shape[0]]
        samples = list(itertools.pairwise(starts))
        grey = any(not bool((input_ids[a:b] == image_id).any()) for a, b in samples)
        if grey:
            media = self.collate_media([media, self.dummy_image[1]])  # the last image: the grey one
        images, max_tiles = media["aspect_ratio_mask"].shape[1:]
        tiles = media["aspect_ratio_mask"][0].sum(-1).tolist()
        mask = torch.zeros((1, input_ids.shape[0], images, max_tiles), dtype=torch.uint8)
        first = 0  # index of the sample's first image in the pack
        for a, b in samples:
            spans = get_cross_attention_token_mask(input_ids[a:b].tolist(), image_id)
            if not spans:
                mask[0, a:b, images - 1] = 1
                continue
            mask[0, a : a + spans[0][0], first : first + len(spans)] = 1
            for k, (s, e) in enumerate(spans):
                e = b - a if e == -1 else e
                mask[0, a + s : a + e, first + k, : tiles[first + k]] = 1
            first += len(spans)
        assert first + grey == images, "every image of a pack has its <|image|> token"
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "cross_attention_mask": mask,
            **media,
        }
