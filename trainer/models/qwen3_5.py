"""Qwen3.5 (dense: Qwen3.5-27B and the small 0.8B-9B; MoE: Qwen3.5-35B-A3B and larger): Qwen3-VL's
media tensors, [4, L] packed positions and native videos, on a hybrid language model.

What differs from Qwen3-VL, and why:
- Three of every four decoder layers are Gated DeltaNet linear attention (a causal short convolution
  over the sequence, then the gated delta rule, a recurrence over all earlier tokens), every fourth is
  full attention (with a sigmoid gate on its output, rope over the first quarter of each head). The
  restarting positions and per-sample attention keep packed samples apart in the full-attention layers
  only; `prepare` makes every linear-attention layer run once per packed sample, from zeros
  (trainer/linear_attention.py), so these families pack (`packs_isolated`) where the generic adapter
  turns packing off for any model with such layers (trainer/attention.py's `packing_leaks`).
- The full-attention layers are plain causal self-attention, so they take the trainer's packed backend
  (trainer/attention.py: per-sample SDPA on CPU, varlen flash kernels on CUDA), which transformers' rule
  for a model with other layer types would leave to SDPA over a dense [tokens, tokens] mask.
- No DeepStack: the vision tower feeds the language model only through `visual.merger`, the projector
  group. The rope index is the model's own `get_rope_index` (Qwen3-VL's: one timestamped vision block
  per temporal patch of a video).
- The chat template thinks by default: the generation prompt is "<|im_start|>assistant\\n<think>\\n", an
  answer after the last user query opens with its think block, and earlier answers lose theirs (see
  trainer/tiny/qwen3_5.py). No single token sequence is then what inference saw before every answer,
  and an answer without reasoning cannot be trained in thinking mode at all: its empty reasoning
  "\\n</think>" follows the prompt's "<think>\\n", and tokenized as one text the two newlines are one
  token, so the prompt inference sees is no token prefix of the conversation. The adapter's processor
  therefore renders with the published template changed in two places (`training_template`): thinking
  off unless the caller turns it on (enable_thinking=true), so the prompt ends with the empty think
  block "<think>\\n\\n</think>\\n\\n" and the answer alone is trained; and every answer keeps the think
  block it had as the last turn, so earlier turns read as when they were answered and every prompt is
  a prefix of the conversation. The exported checkpoint's processor carries that template, so the
  finetuned model answers in the mode it was trained in. Answers that carry their own reasoning
  ("<think>...</think>" in the text) are not trained yet: in non-thinking mode the template writes their
  reasoning where the prompt already closed the think block, and render skips them
  (template_not_prefix_consistent).
- Qwen3.5-MoE: every decoder layer is a mixture of experts with a shared expert behind a scalar gate.
  The experts are 3-D parameters (trainer/moe.py): LoRA reaches the attention, linear-attention and
  shared-expert layers by default, the experts with finetune.lora.experts; QLoRA is refused.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import nn

from trainer.linear_attention import apply_per_sample
from trainer.models.qwen3_vl import Qwen3VLAdapter
from trainer.models.registry import register

# Marks a template `training_template` made, so a checkpoint exported by mmloom is not changed twice.
TEMPLATE_MARK = "{#- mmloom: trainer/models/qwen3_5.py training_template -#}"
NON_THINKING_DEFAULT = (
    "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}"
)
# The published template's test for "this answer is after the last user query" (the only answers with a
# think block); Qwen3.6's adds a `preserve_thinking` switch before it.
DROPS_EARLIER_THINKING = "loop.index0 > ns.last_query_index"


def training_template(template: str) -> str:
    """The chat template mmloom renders Qwen3.5 conversations with (the module docstring): thinking off
    unless enable_thinking is given, every answer with the think block it had as the last turn."""
    if template.startswith(TEMPLATE_MARK):
        return template
    return TEMPLATE_MARK + NON_THINKING_DEFAULT + template.replace(DROPS_EARLIER_THINKING, "true")


@register
class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)
    example = "Qwen/Qwen3.5-27B"

    def _model_class(self) -> Any:
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model

        return Qwen3_5Model

    def _linear_attention_class(self) -> type[nn.Module]:
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

        return Qwen3_5GatedDeltaNet

    @cached_property
    def processor(self) -> Any:
        proc = super().processor
        proc.chat_template = training_template(proc.chat_template)
        if getattr(proc.tokenizer, "chat_template", None):  # saved beside the processor's on export
            proc.tokenizer.chat_template = training_template(proc.tokenizer.chat_template)
        return proc

    @property
    def packs_isolated(self) -> bool:
        """Packed samples stay apart in every layer: attention by the pack's boundaries, the
        linear-attention layers because `prepare` runs them once per sample."""
        return True

    def attention_backend(self, device: torch.device) -> str:
        """By the full-attention layers alone: the linear-attention ones take no backend."""
        from trainer import attention

        model_class = self.auto_class()._model_mapping.get(type(self.config), None)
        return attention.choose_hybrid(self.config, model_class, device)

    def prepare(self, model: Any) -> Any:
        """`model` (Building.prepare), its linear-attention layers made to run once per packed sample."""
        model = super().prepare(model)
        layer = self._linear_attention_class()
        apply_per_sample(model, lambda module: isinstance(module, layer))
        return model


@register
class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
    example = "Qwen/Qwen3.5-35B-A3B"

    def _model_class(self) -> Any:
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeModel

        return Qwen3_5MoeModel

    def _linear_attention_class(self) -> type[nn.Module]:
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet

        return Qwen3_5MoeGatedDeltaNet
