"""What building the model needs (trainer/model.py, trainer/lora.py, trainer/parallel.py): the model
class and its loading, the parameter groups (vision, projector, language model) that freezing,
learning rates and LoRA use, the modules QLoRA leaves unquantized, FSDP's root blocks, and the
attention implementation."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from trainer.models.checkpoint import Checkpoint


class Building(Checkpoint):
    # What a mixture of experts' routers record for output_router_logits (trainer/moe.py): "logits",
    # or "probabilities" (Gemma 4's router records its softmax).
    router_outputs: ClassVar[str] = "logits"
    # Parameter-name fragments of each module group, checked in this order (projector first: in
    # Qwen2-VL the merger sits inside the vision tower). Anything else is the language model.
    group_patterns: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (
        ("projector", ("multi_modal_projector.", "connector.", "visual.merger.", "mm_projector.", "merger.")),
        ("vision", ("vision_tower.", "visual.", "vision_model.", "vision_encoder.", "image_encoder.")),
    )

    def load_model(self, **kwargs: Any) -> Any:
        """The checkpoint's model through transformers' from_pretrained (remote code if trusted)."""
        return self.prepare(
            self.model_class().from_pretrained(self.path, local_files_only=True, **self.load_kwargs, **kwargs)
        )

    def model_from_config(self, **kwargs: Any) -> Any:
        """The checkpoint's architecture with fresh weights (under torch.device("meta"): no memory)."""
        return self.prepare(self.model_class().from_config(self.config, **self.load_kwargs, **kwargs))

    def prepare(self, model: Any) -> Any:
        """`model`, made to take this family's packs: where `model_inputs` hands it `mmloom_mask`, a
        hook turns that into `attention_masks` for the model's attention implementation, once per
        forward (on the device the pack is on)."""
        if self.block_masks():  # type: ignore[attr-defined]
            model.register_forward_pre_hook(self._masks_hook, with_kwargs=True)
        return model

    def _masks_hook(self, model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.pop("mmloom_mask", None)
        if ids is not None:
            backend = model.config.get_text_config()._attn_implementation
            kwargs["attention_mask"] = self.attention_masks(ids, backend)  # type: ignore[attr-defined]
        return args, kwargs

    def model_class(self) -> Any:
        """auto_class(); for trusted remote code, the auto class its config.json's auto_map names."""
        if self.trust_remote_code:
            import transformers

            auto_map = getattr(self.config, "auto_map", None) or {}
            for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
                if name in auto_map and hasattr(transformers, name):
                    return getattr(transformers, name)
        return self.auto_class()

    @classmethod
    def auto_class(cls) -> Any:
        """The transformers auto class that loads the family (from_pretrained / from_config)."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def param_group(self, name: str) -> str:
        """'vision', 'projector' or 'llm' (lm_head and embeddings included) for a parameter name."""
        for group, fragments in self.group_patterns:
            if any(f in name for f in fragments):
                return group
        return "llm"

    def fsdp_root_block(self, name: str) -> bool:
        """Whether the transformer block list `name` stays in the root FSDP unit instead of making units
        of its own. FSDP2 gathers a unit's parameters at every call: a tower that one forward may call
        more than once, depending on the pack (LLaVA-NeXT-Video encodes images and videos in two
        calls), would have ranks whose packs hold different media issue different collectives. In the
        root unit it is gathered once per forward and once per backward, however often it runs."""
        return False

    def attention_backend(self, device: torch.device) -> str:
        """The packed-attention backend trainer/attention.py picks for this family's language model on
        `device`: flex_attention or SDPA where packs carry bidirectional blocks, else by its layers."""
        from trainer import attention

        if self.block_masks():  # type: ignore[attr-defined]
            return attention.choose_masked(device)
        model_class = (
            None if self.trust_remote_code else self.auto_class()._model_mapping.get(type(self.config), None)
        )
        return attention.choose(self.config, model_class, device)

    def attn_implementation(self) -> str | dict[str, str]:
        """transformers' attn_implementation: `attention_backend` on this machine for the language
        model, SDPA for the vision tower. Logged once."""
        from trainer import attention

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backend = self.attention_backend(device)
        attention.log_once(f"attention: {backend} for the {self.family} language model on {device.type}")
        return attention.per_module(self.config, backend)

    def quant_skip_modules(self) -> list[str]:
        """Full names of the modules QLoRA leaves unquantized: vision tower, projector, lm_head."""
        with torch.device("meta"):
            skeleton = self.model_from_config()
        names: list[str] = ["lm_head"]
        for name, module in skeleton.named_modules():
            params = [n for n, _ in module.named_parameters(prefix=name)]
            if (
                params
                and all(self.param_group(n) != "llm" for n in params)
                and not any(name.startswith(parent + ".") for parent in names)
            ):
                names.append(name)
        return names
