"""google/paligemma-3b-pt-224: "<image>"*256 + "<bos>prompt\\n" (the prefix, bidirectional), answer + "<eos>"
(the suffix, causal); SigLIP at 224 px, 256 tokens per image; positions count from 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.families.oracles import FamilyOracles
from tests.support.samples import PHOTOS, SAMPLES, sample


def loss_sum(model, inputs: dict) -> torch.Tensor:
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits[0]
    return F.cross_entropy(logits[:-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")


class TestPaliGemma(FamilyOracles):
    FAMILY = "paligemma"
    SPECIAL_TOKENS = [
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        "<image>",
        "<loc0000>",
        "<loc1023>",
        "<seg000>",
        "<seg127>",
    ]
    TOKENIZER_ROLES = ("<bos>", "<eos>", "<pad>", True)
    # The template leaves <bos> and the "\n" that ends the prompt to the processor (see the tiny builder).
    FULL_RENDER = "<image>You are terse.\nWhat is this?\nAn astronaut.<eos>\n<image>And this?\nA palace.<eos>"
    GENERATION_PROMPT = ""
    ASSISTANT_TEXT = "An astronaut.<eos>A palace.<eos>"
    TEXT_ONLY_RENDER = "Hi\nHello.<eos>\nab"

    def expected_image_tokens(self, image) -> int:
        return (224 // 14) ** 2

    def check_geometry(self, config, processor) -> None:
        assert (config.vision_config.image_size, config.vision_config.patch_size) == (224, 14)
        assert config.text_config.num_image_tokens == 256 and processor.image_seq_length == 256
        assert processor.image_processor.size == {"height": 224, "width": 224}
        assert (
            list(processor.image_processor.image_mean)
            == list(processor.image_processor.image_std)
            == [0.5] * 3
        )
        assert config.projection_dim == config.text_config.hidden_size

    @pytest.mark.xfail(
        strict=True,
        reason="PaliGemmaProcessor writes <bos> behind the last image (here the one "
        "of turn 2), so the ids start with an image token and return_assistant_tokens_mask, which "
        "does not know of that inserted <bos>, marks the second answer 5 characters early",
    )
    def test_processor_and_model_on_real_images(self, path, images) -> None:
        super().test_processor_and_model_on_real_images(path, images)

    def test_processor_and_model_on_one_real_image(self, path) -> None:
        """The layout PaliGemma knows: the prompt through the stock processor is the real format, and
        render_sample gives those tokens and pixels, then the answer."""
        from transformers import AutoProcessor

        from trainer.data.packing import collate
        from trainer.data.render import decode_image, render_sample
        from trainer.models.registry import get_adapter

        proc = AutoProcessor.from_pretrained(path)
        messages = [{"role": "user", "content": [{"type": "text", "text": "caption en"}, {"type": "image"}]}]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
        assert prompt == "<image>caption en"
        photo = decode_image(PHOTOS["img0.jpg"])
        out = proc(text=prompt, images=[photo], return_tensors="pt")
        assert proc.tokenizer.decode(out["input_ids"][0]) == "<image>" * 256 + "<bos>caption en\n"
        assert out["token_type_ids"].sum() == 0 and out["pixel_values"].shape == (1, 3, 224, 224)

        adapter = get_adapter(path)
        one = sample("x", [("user", ["caption en", "img0.jpg"]), ("assistant", ["a palace"])])
        r = render_sample(adapter, one, PHOTOS)
        n = out["input_ids"].shape[1]
        assert torch.equal(r.input_ids[:n], out["input_ids"][0])
        assert torch.equal(r.media["pixel_values"], out["pixel_values"])
        assert adapter.tokenizer.decode(r.input_ids[n:]) == "a palace<eos>\n"
        assert adapter.tokenizer.decode(r.input_ids[r.labels != -100]) == "a palace<eos>"
        model = adapter.load_model()
        with torch.no_grad():
            loss = loss_sum(model, collate(adapter, [r]).inputs)
        assert torch.isfinite(loss) and loss > 0

    def test_packed_loss_is_the_processors_prefix_lm_loss(self, path) -> None:
        """Packed, each single-turn sample's loss is the one transformers computes for it alone from the
        processor's finetuning inputs (processor(text, suffix=...): token_type_ids 0 on the prefix)."""
        from trainer.data.packing import collate
        from trainer.data.render import decode_image, render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa")
        model.eval()
        single = [SAMPLES[0], SAMPLES[2]]  # "What is it?" on a photo; two images, a system prompt
        rendered = [render_sample(adapter, s, PHOTOS) for s in single]
        proc = adapter.processor
        native = []
        with torch.no_grad():
            for text, members, answer in (
                ("What is it?", ["img0.jpg"], "A roof."),
                ("Be brief.\nAnd this?", ["img1.png", "img0.jpg"], "Coffee, then a roof."),
            ):
                out = proc(
                    text="<image>" * len(members) + text,
                    images=[decode_image(PHOTOS[m]) for m in members],
                    suffix=answer,
                    return_tensors="pt",
                )
                labels = torch.where(out["token_type_ids"].bool(), out["input_ids"], -100)
                native.append(
                    loss_sum(
                        model,
                        {
                            "input_ids": out["input_ids"],
                            "pixel_values": out["pixel_values"],
                            "token_type_ids": out["token_type_ids"],
                            "labels": labels,
                        },
                    )
                )
            packed = loss_sum(model, dict(collate(adapter, rendered).inputs))
        expected = sum(n.item() for n in native)
        assert abs(packed.item() - expected) <= 1e-5 * expected, (packed.item(), expected)

    def test_prefix_attends_ahead_within_its_sample_only(self, path) -> None:
        """Packed: the first image token sees the last token of its prompt ("\n"), but not the answer
        after it, and nothing of the other samples."""
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa")
        rendered = [render_sample(adapter, s, PHOTOS) for s in SAMPLES]
        inputs = dict(collate(adapter, rendered).inputs)
        labels = inputs.pop("labels")[0]
        start = rendered[0].length + rendered[1].length  # sample 3, opening with its images
        answer = start + int((labels[start:] != -100).nonzero()[0])
        newline = answer - 1  # "?\n": the prompt's last token
        assert adapter.tokenizer.decode(inputs["input_ids"][0, newline]).endswith("\n")
        captured = {}

        def keep(module, args, kwargs):
            # The embeddings as the language model gets them, image features scattered in.
            captured["embeds"] = kwargs["inputs_embeds"].detach().requires_grad_()
            return args, {**kwargs, "inputs_embeds": captured["embeds"]}

        hook = model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
        model(**inputs, use_cache=False).logits[0, start].sum().backward()
        hook.remove()
        grad = captured["embeds"].grad[0].abs().sum(-1)
        assert grad[newline] > 0  # the end of its own prefix
        assert grad[answer:].sum() == 0  # its answer, and anything after
        assert grad[:start].sum() == 0  # the samples packed before it

    def test_images_after_the_first_prompt_expand_behind_its_bos(self, path) -> None:
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter = get_adapter(path)
        later = sample(
            "y",
            [
                ("user", ["img0.jpg", "Where?"]),
                ("assistant", ["China."]),
                ("user", ["And this?", "img1.png"]),
                ("assistant", ["Coffee."]),
            ],
        )
        r = render_sample(adapter, later, PHOTOS)
        text = adapter.tokenizer.decode(r.input_ids).replace("<image>" * 256, "<I>")
        assert text == "<I><bos>Where?\nChina.<eos>\n<I>And this?\nCoffee.<eos>\n"
        assert r.media["pixel_values"].shape == (2, 3, 224, 224)
