"""Generate from an exported model with plain transformers (and peft for an adapter): what a user
of the finetuned model runs, nothing of mmloom's training code involved.

    python -m trainer.generate runs/my-run/hf --prompt "What is in this picture?" --image cat.jpg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="an export (run.dir/hf, or hf/merged)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, action="append", default=[], help="repeatable")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if (args.model / "adapter_config.json").exists():
        from peft import AutoPeftModelForImageTextToText

        model = AutoPeftModelForImageTextToText.from_pretrained(args.model)
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    content = [{"type": "image", "image": Image.open(i).convert("RGB")} for i in args.image]
    content.append({"type": "text", "text": args.prompt})
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
