"""Compose a new LLaVA-style LMM from parts: a vision encoder checkpoint, a language model checkpoint
and a fresh two-layer MLP projector (the MM-LLaMA / LLaVA recipe). The result is a plain
`LlavaForConditionalGeneration` checkpoint with its `LlavaProcessor`, so stage 1 (projector only),
stage 2 (projector + LLM, full or LoRA) and the export all take the ordinary path, and the exported
model loads with `AutoModelForImageTextToText`.

    python -m trainer.compose --vision /ckpt/clip-vit-large-patch14-336 --llm /ckpt/vicuna-7b-v1.5 --out base/

or in a training config (composed by rank 0 into model.path on first use):

    model:
      path: runs/mm-llama/base
      compose: {vision: /ckpt/clip-vit-large-patch14-336, llm: /ckpt/Llama-3.1-8B-Instruct}

The vision checkpoint may be a vision model (CLIPVisionModel, SiglipVisionModel) or a dual encoder
(CLIPModel, SiglipModel), whose vision half is used; the LLM any `AutoModelForCausalLM` checkpoint
with its tokenizer. The tokenizer gains an `<image>` token (and `<pad>` if it has no padding
token), the embeddings grow to match with new rows at the mean of the old ones. Image features
are taken, as in LLaVA-1.5, from the second-to-last layer, without the CLS token where the
encoder has one. The chat format is the LLM's own "chatml" when its tokenizer has <|im_start|>,
else LLaVA-1.5's "vicuna" turns; `template` chooses explicitly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

# Both templates put a message's images first, one "<image>\n" each, then its text, as LLaVA does;
# `{% generation %}` marks what is trained (answer + end of turn). One line: see trainer/tiny/common.py.
TEMPLATES = {
    # LLaVA-1.5 (vicuna_v1): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>".
    "vicuna": (
        "{% macro body(content) %}{% if content is string %}{{ content }}{% else %}"
        "{{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}"
        "{{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
        "{% endif %}{% endmacro %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ body(message['content']) + ' ' }}"
        "{% elif message['role'] == 'user' %}{{ 'USER: ' + body(message['content']) + ' ' }}"
        "{% else %}{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + body(message['content']) + eos_token }}"
        "{% endgeneration %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # ChatML (Qwen, LLaVA-OneVision):
    # "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n".
    "chatml": (
        "{% macro body(content) %}{% if content is string %}{{ content }}{% else %}"
        "{{ '<image>\\n' * (content | selectattr('type', 'equalto', 'image') | list | length) }}"
        "{{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
        "{% endif %}{% endmacro %}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ body(message['content']) + '<|im_end|>' }}"
        "{% endgeneration %}{% else %}{{ body(message['content']) + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def fingerprint(vision: str | Path, llm: str | Path, template: str | None) -> str:
    """What a composed checkpoint was made from: the parts' configs and weight file sizes."""
    h = hashlib.sha256(f"template={template}".encode())
    for part in (Path(vision), Path(llm)):
        for f in sorted(part.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".model"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _vision_part(path: Path):
    """(vision config, vision model) of a vision or dual-encoder checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if getattr(config, "vision_config", None) is not None:  # CLIPModel, SiglipModel: take the tower
        vision_config = config.vision_config
        tower = AutoModel.from_config(vision_config)
        tower.load_state_dict(model.vision_model.state_dict())
        return vision_config, tower
    return config, model


def compose(vision: str | Path, llm: str | Path, out: str | Path, template: str | None = None) -> Path:
    """Write a LLaVA-style checkpoint (model + processor) made of `vision`, `llm` and a fresh projector."""
    import torch
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision, llm, out = Path(vision), Path(llm), Path(out)
    for part, what in ((vision, "model.compose.vision"), (llm, "model.compose.llm")):
        if not (part / "config.json").is_file():
            raise FileNotFoundError(
                f"{what}={part}: no config.json there; it must be a local Hugging Face checkpoint"
            )
    tokenizer = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    if template is None:
        template = "chatml" if "<|im_start|>" in tokenizer.get_vocab() else "vicuna"
    if template not in TEMPLATES:
        raise ValueError(f"model.compose.template={template!r}: choose one of {', '.join(TEMPLATES)}")
    added = [IMAGE_TOKEN] + (["<pad>"] if tokenizer.pad_token is None else [])
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})

    vision_config, tower = _vision_part(vision)
    language = AutoModelForCausalLM.from_pretrained(llm, local_files_only=True, dtype=torch.float32)
    language.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    text_config = language.config
    text_config.pad_token_id = tokenizer.pad_token_id
    has_cls = vision_config.model_type.startswith("clip")  # SigLIP has no CLS token
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        vision_feature_select_strategy="default" if has_cls else "full",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)  # the projector's initial weights
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(language.get_decoder().state_dict())
    model.lm_head.load_state_dict(language.get_output_embeddings().state_dict())
    model.tie_weights()
    model.generation_config = language.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    image_processor = AutoImageProcessor.from_pretrained(vision, local_files_only=True)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=int(has_cls),
        chat_template=TEMPLATES[template],
        image_token=IMAGE_TOKEN,
    )
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "composed_from.json").write_text(
        json.dumps(
            {
                "vision": str(vision),
                "llm": str(llm),
                "template": template,
                "added_tokens": added,
                "fingerprint": fingerprint(vision, llm, template),
            },
            indent=1,
        )
    )
    tmp.rename(out)
    logger.info("composed %s + %s (%s turns) -> %s", vision, llm, template, out)
    return out


def ensure_composed(model_cfg, rank: int) -> None:
    """For a config with model.compose: rank 0 composes into model.path unless it holds this very
    composition already; every rank waits for it. Without model.compose: nothing."""
    import torch.distributed as dist

    c = model_cfg.compose
    if not c.vision:
        return
    out = Path(model_cfg.path)
    if rank == 0:
        record = out / "composed_from.json"
        if record.is_file():
            made = json.loads(record.read_text())
            if made["fingerprint"] != fingerprint(c.vision, c.llm, c.template or made["template"]):
                raise ValueError(
                    f"{out} was composed from {made['vision']} + {made['llm']}, not from "
                    f"model.compose {c.vision} + {c.llm}: choose another model.path or delete it"
                )
        elif out.exists():
            raise FileExistsError(
                f"model.path={out} exists and is not a composed checkpoint; with model.compose "
                f"it is where the composed model is written: choose an empty path"
            )
        else:
            compose(c.vision, c.llm, out, c.template)
    if dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.compose", description=__doc__.split("\n\n")[0])
    p.add_argument("--vision", required=True, help="vision encoder checkpoint directory")
    p.add_argument("--llm", required=True, help="language model checkpoint directory (with its tokenizer)")
    p.add_argument("--out", required=True, type=Path, help="directory to write the composed checkpoint to")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="chat format (default: from the tokenizer)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out.exists():
        p.error(f"{args.out} exists")
    compose(args.vision, args.llm, args.out, args.template)
    print(f"composed {args.vision} + {args.llm} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
