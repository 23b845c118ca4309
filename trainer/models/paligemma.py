"""PaliGemma: a prefix-LM. The images, <bos>, the prompt and its "\n" (the prefix) attend to each other
both ways; the answer and <eos> (the suffix) are causal. Positions count from 1.

Rendering: the processor, given images, writes <bos> after the last "<image>" of the text and appends
"\n" (the tiny builder's chat template explains why it leaves both to it). The adapter's `chat_text`
applies those two steps to the rendered conversation, so render_sample cuts segments of the text the
model reads, and `process` tokenizes them as they are (expanding each "<image>"). <bos> goes after the
images that open the conversation, which is where the processor puts it for the only layout PaliGemma
was trained on (images, then one prompt): those samples are token for token what inference sees.
Images anywhere else (a later turn, an answer) expand in place behind that <bos>; the processor alone
would move <bos> behind the last image and cannot keep earlier turns a prefix of later ones. A sample
without images is "<bos>prompt\n..." (the processor refuses text without images).

Packing: transformers marks the prefix with token_type_ids == 0 and turns every such token of the
row into one bidirectional block, so packed samples would attend to each other's prefixes (the block
overlay is OR-ed after the packed-sequence mask). The adapter hands the model a ready-made mask
instead (which the model takes as is): causal inside each sample, both ways among the sample's tokens
before its first answer token (exactly the processor's token_type_ids 0 for a single-turn sample;
later turns of a multi-turn sample stay causal). As for Gemma 3, collate gives the sample and prefix
ids (`mmloom_mask`) and the adapter's hook builds the mask on the device: a flex_attention BlockMask on
CUDA, a dense boolean one for SDPA elsewhere. PaliGemma 2 checkpoints share the model_type but not
this: their Gemma 2 soft-caps attention logits, which SDPA cannot do (see `attn_implementation`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from trainer.attention import block_causal
from trainer.models.adapter import IGNORE, ModelAdapter
from trainer.models.gemma3 import mask_ids
from trainer.models.registry import register


@register
class PaliGemmaAdapter(ModelAdapter):
    family = "paligemma"
    model_types = ("paligemma",)
    example = "google/paligemma-3b-pt-224"
    media_keys = ("pixel_values",)
    video = ""

    def attn_implementation(self) -> str | dict[str, str]:
        if self.config.text_config.model_type != "gemma":
            # PaliGemma 2 (Gemma 2 inside) soft-caps attention logits, which SDPA cannot do, and eager
            # attention would need the mask as additive floats: not done yet.
            raise ValueError(
                f"{self.path}: PaliGemma with a {self.config.text_config.model_type} text model "
                f"(PaliGemma 2) is not supported yet; use a PaliGemma (Gemma) checkpoint"
            )
        return super().attn_implementation()

    # --- rendering -----------------------------------------------------------------------------------

    def chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The rendered conversation as the model reads it: <bos> after the opening images, "\n" at
        the end."""
        text = super().chat_text(messages, add_generation_prompt)
        image = re.escape(self.image_token)
        opening = re.match(f"(?:{image})*", text).end()
        return text[:opening] + self.tokenizer.bos_token + text[opening:] + "\n"

    def process(self, text: str, images: list, videos: list, first: bool, sample_images: int = 0) -> Any:
        """Tokenize a piece of `chat_text` as it is (its <bos> is written in it), each "<image>" expanded."""
        proc = self.processor
        expanded = text.replace(self.image_token, self.image_token * proc.image_seq_length)
        out = dict(proc.tokenizer(expanded, add_special_tokens=False, return_tensors="pt"))
        if images:
            out["pixel_values"] = proc.image_processor(images, return_tensors="pt")["pixel_values"]
        return out

    def position_ids(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.arange(1, input_ids.shape[0] + 1, dtype=torch.int64)  # as PaliGemma counts at inference

    # --- the model ---------------------------------------------------------------------------------------

    def model_inputs(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        index = torch.arange(len(input_ids))
        sample = (torch.diff(position_ids, prepend=position_ids[:1] - 1) != 1).cumsum(0)
        answer = labels != IGNORE
        first_answer = torch.full((int(sample[-1]) + 1,), len(input_ids))
        first_answer.scatter_reduce_(0, sample[answer], index[answer], reduce="amin")
        prefix = torch.where(index < first_answer[sample], sample, -1)
        return {
            "input_ids": input_ids[None],
            "labels": labels[None],
            "position_ids": position_ids[None],
            "mmloom_mask": mask_ids(position_ids, prefix),
            **media,
        }

    def attention_masks(self, ids: torch.Tensor, backend: str) -> Any:
        return block_causal(ids, None, backend)
