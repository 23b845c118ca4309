"""Rendering through the processor: prompts are token-for-token what inference sees, labels cover
exactly the answers and their end-of-turn token, for llava, qwen2_vl and idefics3."""

from __future__ import annotations

import pytest
import torch

from data_tools.sample import Sample, Turn
from tests.support import family_params
from tests.support.samples import CONVERSATIONS, PHOTOS, answer_text, image, images_of, text
from trainer.data.render import IGNORE, RenderError, decode_image, render_sample, to_messages
from trainer.models.registry import get_adapter
from trainer.tiny import FAMILIES as TINY_FAMILIES

FAMILIES = sorted(TINY_FAMILIES)


# LLaVA-OneVision shows an image alone with AnyRes tiles and the images of a multi-image sample without
# (processor and original training alike); mmloom renders a sample as inference renders the whole
# conversation. Strict xfails: they fail loudly if the gap ever closes.
ONEVISION_FIRST_PROMPT = (
    "llava_onevision: before the first answer inference has seen one image and tiles it, "
    "but the sample holds two, shown untiled (tests/families/test_llava_onevision.py)"
)
ONEVISION_TRIM = (
    "llava_onevision: trimmed to its first turn the sample keeps one image, which then gets tiles "
    "and more tokens than both had, so it cannot fit (tests/families/test_llava_onevision.py)"
)


# PaliGemma's processor refuses a prompt without images and writes <bos> behind the last image of the
# text, so a later turn's image moves it: earlier prompts are then no prefix of later ones. mmloom keeps
# <bos> after the images that open the conversation (trainer/models/paligemma.py). Strict xfails.
PALIGEMMA_NO_INFERENCE = {
    "text_only": "paligemma: PaliGemmaProcessor raises on a prompt without images",
    "multi_turn_multi_image_system": "paligemma: the processor writes <bos> behind the image of the second "
    "prompt, so the first prompt is no prefix of it",
}


@pytest.mark.parametrize("family", family_params(FAMILIES))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompts_match_inference_and_labels_cover_answers(tiny, family: str, name: str, request) -> None:
    if (family, name) == ("llava_onevision", "multi_turn_multi_image_system"):
        request.applymarker(pytest.mark.xfail(strict=True, reason=ONEVISION_FIRST_PROMPT))
    if family == "paligemma" and name in PALIGEMMA_NO_INFERENCE:
        request.applymarker(pytest.mark.xfail(strict=True, reason=PALIGEMMA_NO_INFERENCE[name]))
    adapter = get_adapter(tiny(family))
    sample = CONVERSATIONS[name]
    r = render_sample(adapter, sample, PHOTOS)
    messages = to_messages(sample)
    images = images_of(sample)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for a in answers:
        n_images = sum(c["type"] == "image" for m in messages[:a] for c in m["content"])
        kwargs = {"processor_kwargs": {"images": images[:n_images]}} if n_images else {}
        ref = adapter.processor.apply_chat_template(
            messages[:a],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **kwargs,
        )
        prompt = ref["input_ids"][0]
        assert torch.equal(r.input_ids[: len(prompt)], prompt), f"turn {a}: prompt differs from inference"
        spans.append(len(prompt))
    # Labels: exactly the answer tokens after each prompt, through the end-of-turn token.
    labelled = (r.labels != IGNORE).nonzero().flatten().tolist()
    expected = []
    for a, start in zip(answers, spans):
        text_of_answer = messages[a]["content"][0]["text"]
        eot = next(i for i in range(start, r.length) if int(r.input_ids[i]) in adapter.end_of_turn_ids)
        expected += list(range(start, eot + 1))
        decoded = adapter.tokenizer.decode(r.input_ids[start:eot])
        assert answer_text(decoded) == text_of_answer
    assert labelled == expected
    assert torch.equal(r.labels[labelled], r.input_ids[labelled])


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_media_tensors_match_the_processor(tiny, family: str, request) -> None:
    if family == "paligemma":
        reason = PALIGEMMA_NO_INFERENCE["multi_turn_multi_image_system"]
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    adapter = get_adapter(tiny(family))
    sample = CONVERSATIONS["multi_turn_multi_image_system"]
    r = render_sample(adapter, sample, PHOTOS)
    ref = adapter.processor.apply_chat_template(
        to_messages(sample),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"images": images_of(sample)},
    )
    assert torch.equal(r.input_ids, ref["input_ids"][0])
    for key, value in r.media.items():
        assert torch.equal(value, ref[key]), key
    image_token = adapter.tokenizer.convert_tokens_to_ids(adapter.image_token)
    assert int((r.input_ids == image_token).sum()) == int((ref["input_ids"] == image_token).sum()) > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_positions_are_the_models_3d_rope(tiny, family: str) -> None:
    from transformers import AutoModelForImageTextToText

    adapter = get_adapter(tiny(family))
    sample = CONVERSATIONS["single"]
    r = render_sample(adapter, sample, PHOTOS)
    model = AutoModelForImageTextToText.from_pretrained(tiny(family))
    kinds = torch.zeros_like(r.input_ids)[None]
    kinds[0, r.input_ids == model.config.image_token_id] = 1
    ref, _ = model.model.get_rope_index(r.input_ids[None], kinds, image_grid_thw=r.media["image_grid_thw"])
    assert torch.equal(r.position_ids[1:], ref[:, 0])
    assert torch.equal(r.position_ids[0], torch.arange(r.length))
    assert r.position_ids[1:].max() < r.length - 1  # 3-D rope compresses the image block


def test_qwen2_5_vl_video_positions_keep_time(tiny) -> None:
    # Qwen2.5-VL spaces a video's temporal rope positions by tokens_per_second * second_per_grid_ts:
    # at 1 frame/s, 2 frames per temporal patch and 2 tokens per second, 4 positions per patch.
    import numpy as np
    from transformers import AutoModelForImageTextToText

    adapter = get_adapter(tiny("qwen2_5_vl"))
    frame = np.asarray(decode_image(PHOTOS["img0.jpg"]).resize((112, 112)))
    video = np.stack([frame, frame[::-1], frame[:, ::-1], frame])
    out = adapter.processor(
        text=["<|vision_start|><|video_pad|><|vision_end|>What?"],
        videos=[video],
        video_metadata=[{"fps": 1, "total_num_frames": 4}],
        return_tensors="pt",
    )
    ids, media = out["input_ids"][0], adapter.media_of(out)
    assert media["second_per_grid_ts"].tolist() == [2.0]
    positions = adapter.position_ids(ids, media)
    model = AutoModelForImageTextToText.from_pretrained(tiny("qwen2_5_vl"))
    ref, _ = model.model.get_rope_index(
        ids[None],
        out["mm_token_type_ids"],
        video_grid_thw=media["video_grid_thw"],
        second_per_grid_ts=media["second_per_grid_ts"],
    )
    assert torch.equal(positions[1:], ref[:, 0])
    video_t = positions[1, ids == model.config.video_token_id]
    assert video_t.unique().tolist() == [1, 5]  # after <|vision_start|> at 0


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_overlong_samples_are_trimmed_at_a_turn_boundary_or_dropped(tiny, family: str, request) -> None:
    if family == "llava_onevision":
        request.applymarker(pytest.mark.xfail(strict=True, reason=ONEVISION_TRIM))
    adapter = get_adapter(tiny(family))
    sample = CONVERSATIONS["multi_turn_multi_image_system"]
    full = render_sample(adapter, sample, PHOTOS)
    first_answer_end = int((full.labels != IGNORE).nonzero()[0]) + 1
    first = render_sample(
        adapter, Sample(key="x", source="s", index=0, system=sample.system, turns=sample.turns[:2]), PHOTOS
    )
    trimmed = render_sample(adapter, sample, PHOTOS, max_tokens=full.length - 1)
    assert trimmed.trimmed and torch.equal(trimmed.input_ids, first.input_ids)
    assert trimmed.length >= first_answer_end
    for key, value in first.media.items():  # the second image went with its turn
        assert torch.equal(trimmed.media[key], value)
    with pytest.raises(RenderError, match="too_long"):
        render_sample(adapter, sample, PHOTOS, max_tokens=full.length - 1, overlong="drop")
    with pytest.raises(RenderError, match="too_long"):
        render_sample(adapter, sample, PHOTOS, max_tokens=first.length - 1)


def test_bad_members_are_counted_skips(tiny) -> None:
    adapter = get_adapter(tiny("llava"))
    with pytest.raises(RenderError) as e:
        render_sample(adapter, CONVERSATIONS["single"], {"img0.jpg": b"not a jpeg"})
    assert e.value.reason == "bad_image"
    with pytest.raises(RenderError) as e:
        render_sample(adapter, CONVERSATIONS["single"], {})
    assert e.value.reason == "missing_member"


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_media_inside_an_answer_is_never_a_label(tiny, family: str) -> None:
    adapter = get_adapter(tiny(family))
    sample = Sample(
        key="9",
        source="s",
        index=9,
        turns=[
            Turn(role="user", parts=[text("Show me.")]),
            Turn(role="assistant", parts=[text("Here:"), image("img0.jpg"), text("a roof.")]),
        ],
    )
    r = render_sample(adapter, sample, PHOTOS)
    labelled = r.input_ids[r.labels != IGNORE].tolist()
    assert labelled and not set(labelled) & adapter.media_token_ids
    image_token = adapter.tokenizer.convert_tokens_to_ids(adapter.image_token)
    assert (r.input_ids == image_token).sum() > 0


def test_an_answer_without_end_of_turn_gets_eos(tiny) -> None:
    # llava-hf's published template closes answers with a space, no </s>: mmloom appends EOS.
    adapter = get_adapter(tiny("llava"))
    adapter.processor.chat_template = adapter.processor.chat_template.replace("+ '</s>'", "+ ' '")
    sample = CONVERSATIONS["text_only"]
    r = render_sample(adapter, sample, PHOTOS)
    eos = adapter.tokenizer.eos_token_id
    labelled = r.input_ids[r.labels != IGNORE].tolist()
    assert labelled.count(eos) == 2 and labelled[-1] == eos
    first_prompt = adapter.processor.apply_chat_template(
        to_messages(sample)[:1],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert torch.equal(r.input_ids[: first_prompt["input_ids"].shape[1]], first_prompt["input_ids"][0])


@pytest.mark.parametrize("family", family_params(FAMILIES))
def test_the_whole_conversation_path_gives_the_same_result(tiny, family: str, monkeypatch) -> None:
    # Tokenizers that mark word starts at the start of every call (SentencePiece) cannot be split
    # per turn; they take the slower whole-conversation path, which must agree exactly.
    import trainer.data.render as render

    adapter = get_adapter(tiny(family))
    for name, sample in CONVERSATIONS.items():
        fast = render_sample(adapter, sample, PHOTOS)
        monkeypatch.setattr(render, "_splits_cleanly", lambda *a: False)
        whole = render_sample(adapter, sample, PHOTOS)
        monkeypatch.undo()
        assert torch.equal(fast.input_ids, whole.input_ids) and torch.equal(fast.labels, whole.labels), name
        assert torch.equal(fast.position_ids, whole.position_ids)
        assert fast.media.keys() == whole.media.keys()
        assert all(torch.equal(fast.media[k], whole.media[k]) for k in fast.media)


def test_a_sentencepiece_style_tokenizer_still_matches_inference(tiny) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Llama-2 / Mistral style: a word-start marker prepended at the start of every call.
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.train_from_iterator(
        ["USER: Hello ASSISTANT: Hi there. USER: Bye ASSISTANT: Bye. 2+2? 4 你好！"] * 20,
        trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>", "<image>", "<pad>"]),
    )
    adapter = get_adapter(tiny("llava"))
    adapter.processor.tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    vars(adapter).pop("end_of_turn_ids", None)
    vars(adapter).pop("media_token_ids", None)
    sample = CONVERSATIONS["text_only"]
    r = render_sample(adapter, sample, PHOTOS)
    messages = to_messages(sample)
    for a in (1, 3):
        prompt = adapter.processor.apply_chat_template(
            messages[:a], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"][0]
        assert torch.equal(r.input_ids[: len(prompt)], prompt), a
    assert (r.labels != IGNORE).sum() > 0
