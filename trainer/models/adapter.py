"""Model adapters: what mmloom knows about a model family, in one small object.

The generic adapter works for any `AutoModelForImageTextToText` checkpoint whose processor has
a chat template: processor media outputs are concatenated along their first dimension, positions
are 1-D and restart per sample. A family overrides only what differs (3-D rope indices, media
tensors with a batch dimension, end-of-turn tokens, video decoding).

    adapter = get_adapter("/ckpt/qwen2-vl-2b")        # family from the checkpoint's model_type
    out = adapter.process(text, images, videos, first=True)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch

IGNORE = -100       # the label of a position the loss skips (transformers' ignore_index)


@dataclass
class VideoFrames:
    """One video as a video-native family's processor gets it: the frames data_tools.video already
    sampled, with the metadata transformers' VideoMetadata holds (the video's fps and frame count,
    which frames these are), so the processor neither samples again nor guesses the frame rate:
    Qwen2.5-VL's temporal rope spacing and Qwen3-VL's timestamps come from the real sampled frames."""

    frames: Any                          # uint8 [T, H, W, 3]
    metadata: dict[str, Any]

    @classmethod
    def of(cls, clip: Any) -> VideoFrames:
        """From a data_tools.video.Clip. A clip of unknown frame rate counts as one sampled frame a
        second (Clip.sample_fps), so VideoMetadata.sampled_fps equals clip.sample_fps either way."""
        indices = [int(i) for i in clip.indices]
        total = max(int(clip.total_frames), max(indices) + 1)
        fps = float(clip.fps) if clip.fps and clip.fps > 0 else total / len(indices)
        height, width = clip.frames.shape[1:3]
        return cls(frames=clip.frames, metadata={"total_num_frames": total, "fps": fps, "frames_indices": indices,
                                                 "duration": total / fps, "height": height, "width": width})


class ModelAdapter:
    family: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()        # transformers model_type values this adapter serves
    media_keys: ClassVar[tuple[str, ...]] = ("pixel_values", "image_sizes", "pixel_values_videos")
    media_cat_dim: ClassVar[dict[str, int]] = {}       # processor outputs not concatenated on dim 0
    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ()  # besides the tokenizer's eos token
    media_token_pattern: ClassVar[str] = ""             # added tokens that wrap media, besides the processor's
    rope_dims: ClassVar[int] = 1                        # 4 for Qwen-VL style multimodal rope (text + 3)
    # Parameter-name fragments of each module group, checked in this order (projector first: in
    # Qwen2-VL the merger sits inside the vision tower). Anything else is the language model.
    group_patterns: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (
        ("projector", ("multi_modal_projector.", "connector.", "visual.merger.", "mm_projector.", "merger.")),
        ("vision", ("vision_tower.", "visual.", "vision_model.", "vision_encoder.", "image_encoder.")),
    )

    # What the family supports, read by `python -m trainer.models --list` (the README's table).
    example: ClassVar[str] = ""              # a real Hugging Face checkpoint of the family
    multi_image: ClassVar[bool] = True       # several images in one sample
    video: ClassVar[str] = "frames"          # "native" (the model takes videos), "frames" (the sampled frames
                                             # become images), "" (videos are skipped, counted)
    packing: ClassVar[bool] = True           # several samples in one sequence with exact per-sample loss
    lora_vision: ClassVar[bool] = True       # finetune.lora.vision=true
    qlora: ClassVar[bool] = True             # finetune.method=qlora

    def __init__(self, path: str | Path, trust_remote_code: bool = False) -> None:
        self.path = str(path)
        self.trust_remote_code = trust_remote_code   # checked against model.code_revision by get_adapter

    def __getstate__(self) -> dict[str, Any]:
        # Dataloader workers get the path and load their own processor.
        return {"path": self.path, "trust_remote_code": self.trust_remote_code}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state.get("trust_remote_code", False))  # type: ignore[misc]

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every from_pretrained / from_config call for this checkpoint."""
        return {"trust_remote_code": True} if self.trust_remote_code else {}

    # --- loading -------------------------------------------------------------------------

    @cached_property
    def processor(self) -> Any:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(self.path, local_files_only=True, **self.load_kwargs)
        if getattr(proc, "chat_template", None) is None:
            raise ValueError(f"{self.path}: the processor has no chat template; mmloom renders conversations "
                             f"with it. Add chat_template.jinja to the checkpoint.")
        return proc

    @cached_property
    def config(self) -> Any:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, local_files_only=True, **self.load_kwargs)

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @cached_property
    def image_token(self) -> str | None:
        return getattr(self.processor, "image_token", None)

    @cached_property
    def video_token(self) -> str | None:
        return getattr(self.processor, "video_token", None)

    @cached_property
    def end_of_turn_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        for t in self.end_of_turn_tokens:
            ids.add(tok.convert_tokens_to_ids(t))
        return ids

    @cached_property
    def media_token_ids(self) -> set[int]:
        """Tokens that stand for media or wrap them (<image>, <|vision_start|>, <row_1_col_1>, ...):
        never trained on, even when an image sits inside an answer."""
        tok, proc = self.tokenizer, self.processor
        names = {v for k, v in vars(proc).items() if k.endswith("_token") and isinstance(v, str)}
        if self.media_token_pattern:
            names |= {t for t in tok.get_added_vocab() if re.fullmatch(self.media_token_pattern, t)}
        ids = {tok.convert_tokens_to_ids(t) for t in names if t in tok.get_added_vocab()}
        return ids - self.end_of_turn_ids - {tok.bos_token_id, tok.pad_token_id}

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # --- rendering -----------------------------------------------------------------------

    def chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def process(self, text: str, images: list, videos: list, first: bool, sample_images: int = 0) -> Any:
        """Tokenize one segment with its media, as the processor does at inference. `sample_images`:
        the images of the whole sample (LLaVA-OneVision shows an image differently when it has company)."""
        bos = self.tokenizer.bos_token
        # Like processor.apply_chat_template: special tokens only at the very start, and not
        # when the template already wrote the BOS token itself.
        special = first and not (bos is not None and text.startswith(bos))
        if not images and not videos and not any(t and t in text for t in (self.image_token, self.video_token)):
            # Nothing for the processor to expand: its tokenizer alone, at a third of the cost.
            return self.tokenizer([text], return_tensors="pt", add_special_tokens=special)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": special}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [v.frames if isinstance(v, VideoFrames) else v for v in videos]
            metadata = [v.metadata for v in videos if isinstance(v, VideoFrames)]
            if metadata:   # frames already sampled by data_tools.video: none sampled again
                kwargs.update(video_metadata=metadata, do_sample_frames=False)
        return self.processor(**kwargs)

    def media_of(self, out: Any) -> dict[str, torch.Tensor]:
        return {k: out[k] for k in self.media_keys if k in out and out[k] is not None}

    def collate_media(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate media tensors of segments (or of packed samples), in order."""
        keys = {k for p in parts for k in p}
        return {k: torch.cat([p[k] for p in parts if k in p], dim=self.media_cat_dim.get(k, 0))
                for k in sorted(keys)}

    def position_ids(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.arange(input_ids.shape[0], dtype=torch.int64)

    def video_input(self, clip: Any) -> Any:
        """What `process` gets for one decoded video (a data_tools.video.Clip) of a family with
        video = "native": its frames and their metadata."""
        return VideoFrames.of(clip)

    def packs_with(self, pack: list[Any], sample: Any) -> bool:
        """Whether rendered `sample` can join the rendered samples of `pack` in one micro-batch (the
        packer asks; a sample alone always packs). LLaVA-OneVision cannot batch videos of different
        frame counts."""
        return True

    def fsdp_root_block(self, name: str) -> bool:
        """Whether the transformer block list `name` stays in the root FSDP unit instead of making units
        of its own. FSDP2 gathers a unit's parameters at every call: a tower that one forward may call
        more than once, depending on the pack (LLaVA-NeXT-Video encodes images and videos in two
        calls), would have ranks whose packs hold different media issue different collectives. In the
        root unit it is gathered once per forward and once per backward, however often it runs."""
        return False

    # --- the model ---------------------------------------------------------------------------

    def load_model(self, **kwargs: Any) -> Any:
        """The checkpoint's model through transformers' from_pretrained (remote code if trusted)."""
        return self.prepare(self.model_class().from_pretrained(self.path, local_files_only=True,
                                                               **self.load_kwargs, **kwargs))

    def model_from_config(self, **kwargs: Any) -> Any:
        """The checkpoint's architecture with fresh weights (under torch.device("meta"): no memory)."""
        return self.prepare(self.model_class().from_config(self.config, **self.load_kwargs, **kwargs))

    def prepare(self, model: Any) -> Any:
        """`model`, made to take this family's packs: where `model_inputs` hands it `mmloom_mask`, a
        hook turns that into `attention_masks` for the model's attention implementation, once per
        forward (on the device the pack is on)."""
        if type(self).attention_masks is not ModelAdapter.attention_masks:
            model.register_forward_pre_hook(self._masks_hook, with_kwargs=True)
        return model

    def _masks_hook(self, model: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.pop("mmloom_mask", None)
        if ids is not None:
            kwargs["attention_mask"] = self.attention_masks(ids, model.config.get_text_config()._attn_implementation)
        return args, kwargs

    def attention_masks(self, ids: torch.Tensor, backend: str) -> Any:
        """For families whose `model_inputs` give `mmloom_mask` (trainer/attention.py's `block_causal`
        ids): the `attention_mask` the model takes."""
        raise NotImplementedError

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

    def has_vision_inputs(self, media: dict[str, torch.Tensor]) -> bool:
        return "pixel_values" in media or "pixel_values_videos" in media

    dummy_kwargs: ClassVar[dict[str, Any]] = {}

    @cached_property
    def dummy_image(self) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(input_ids, media, position_ids) of one small grey image, as the processor renders it."""
        from PIL import Image

        out = self.processor(text=[self.image_token], images=[Image.new("RGB", (64, 64), (128, 128, 128))],
                             return_tensors="pt", add_special_tokens=False, **self.dummy_kwargs)
        ids = out["input_ids"][0].to(torch.int64)
        media = self.media_of(out)
        return ids, media, self.position_ids(ids, media)

    def attn_implementation(self) -> str | dict[str, str]:
        """transformers' attn_implementation: the packed-attention backend trainer/attention.py picks
        for this family's language model on this machine, SDPA for the vision tower. Logged once."""
        from trainer import attention

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model_class = None if self.trust_remote_code else self.auto_class()._model_mapping.get(type(self.config), None)
        backend = attention.choose(self.config, model_class, device)
        attention.log_once(f"attention: {backend} for the {self.family} language model on {device.type}")
        return attention.per_module(self.config, backend)

    def quant_skip_modules(self) -> list[str]:
        """Full names of the modules QLoRA leaves unquantized: vision tower, projector, lm_head."""
        with torch.device("meta"):
            skeleton = self.model_from_config()
        names: list[str] = ["lm_head"]
        for name, module in skeleton.named_modules():
            params = [n for n, _ in module.named_parameters(prefix=name)]
            if (params and all(self.param_group(n) != "llm" for n in params)
                    and not any(name.startswith(parent + ".") for parent in names)):
                names.append(name)
        return names

    # --- a packed micro-batch -> model inputs -------------------------------------------------

    def model_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                     media: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs for model(**inputs) from a packed sequence ([L] ids, positions [L] or [3, L])."""
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
                **media}


_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS[cls.family] = cls
    return cls


def load_families() -> dict[str, type[ModelAdapter]]:
    """Import every family module of trainer.models (each registers its adapter); family -> class."""
    import trainer.models

    for _, name, _ in sorted(pkgutil.iter_modules(trainer.models.__path__)):
        if name not in ("adapter", "__main__"):
            importlib.import_module(f"trainer.models.{name}")
    return dict(sorted(_ADAPTERS.items()))


def code_revision(path: str | Path) -> str:
    """The pin of a checkpoint's own code: sha256 over its *.py files (names and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def get_adapter(path: str | Path, family: str | None = None, trust_remote_code: bool = False,
                revision: str | None = None) -> ModelAdapter:
    """The adapter for a checkpoint: by name, else by the checkpoint's model_type, else generic.

    A checkpoint that ships its own modeling code (an `auto_map` in config.json: InternLM-XComposer2,
    Phi-3-Vision, older MiniCPM-V) runs that code only with trust_remote_code and a `revision`
    pinning it: the 16-digit code_revision() of its *.py files, or the Hub commit of a snapshot
    directory (.../snapshots/<commit>), so code that changed since it was reviewed never runs."""
    load_families()
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: model.path must be a local Hugging Face checkpoint directory")
    meta = json.loads(config.read_text())
    if trust_remote_code:
        pins = {code_revision(path)} | ({Path(path).name} if Path(path).parent.name == "snapshots" else set())
        if revision not in pins:
            raise ValueError(f"model.trust_remote_code=true runs the Python files in {path}; review them, then pin "
                             f"them with model.code_revision={code_revision(path)} (got {revision!r})")
    elif meta.get("auto_map"):
        raise ValueError(f"{config} names its own modeling code (auto_map): mmloom does not run it unless you set "
                         f"model.trust_remote_code=true and pin it with model.code_revision (see README)")
    if family is not None:
        if family not in _ADAPTERS and family != "generic":
            raise ValueError(f"model.family={family!r} is unknown; known: generic, {', '.join(sorted(_ADAPTERS))}")
        return _ADAPTERS.get(family, ModelAdapter)(path, trust_remote_code)
    for cls in _ADAPTERS.values():
        if meta.get("model_type") in cls.model_types:
            return cls(path, trust_remote_code)
    return ModelAdapter(path, trust_remote_code)


def adapter_for(model_cfg: Any) -> ModelAdapter:
    """get_adapter for a config's `model` section."""
    return get_adapter(model_cfg.path, model_cfg.family, model_cfg.trust_remote_code, model_cfg.code_revision)
