"""Packed attention per backend: time per decoder layer and host reads inside the layers.

    python benchmarks/attention.py [--tokens 8192] [--samples 12 48] [--repeats 3]

One JSON line per backend and pack make-up: {"benchmark": "attention", "backend", "samples_per_pack",
"tokens", "fwd_ms_per_layer", "bwd_ms_per_layer", "host_reads_per_forward", "trainer_path"}. The
model is a Qwen2 decoder (2 layers of hidden 256, 4 query and 2 key-value heads, random weights;
1536 hidden and 12 heads on a GPU) fed one packed row of `--tokens` tokens cut into `--samples`
samples of random lengths, with collate's boundaries (cu_seq_lens, max_length, the lengths). Backends:
- the one trainer/attention.py picks on this device (`"trainer_path": true`; its host reads must be 0):
  mmloom_packed on CPU, mmloom_varlen (or flash_attention_2) on CUDA;
- "per_layer_boundaries": the same per-sample attention, finding the boundaries from the position ids
  in every layer (the path before boundaries came once per pack);
- "sdpa": transformers' SDPA over the packed row with its block-diagonal mask (every pair computed);
- on CUDA also mmloom_varlen and flash_attention_2 where they run.
Host reads are `.item()`, `.tolist()`, `nonzero`, a tensor's truth value (trainer/attention.py's
`count_host_reads`), counted over one forward of all layers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import attention  # noqa: E402

PER_LAYER = "per_layer_boundaries"


def per_layer_boundaries(module, query, key, value, mask, **kwargs):
    """The per-sample attention with the boundaries found from the position ids in the layer."""
    positions = kwargs["position_ids"].reshape(-1, query.shape[2])[0]
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().add(1).tolist()
    bounds = [0, *starts, query.shape[2]]
    kwargs["mmloom_segments"] = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    return attention.packed_attention(module, query, key, value, mask, **kwargs)


def packed_inputs(tokens: int, samples: int, vocab: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(samples)
    cuts = sorted(torch.randperm(tokens - 1, generator=gen)[: samples - 1].add(1).tolist())
    sizes = tuple(b - a for a, b in zip([0, *cuts], [*cuts, tokens]))
    cu = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device=device)
    return {
        "input_ids": torch.randint(0, vocab, (1, tokens), generator=gen).to(device),
        "position_ids": torch.cat([torch.arange(n) for n in sizes])[None].to(device),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(sizes),
        "max_length_k": max(sizes),
        "mmloom_segments": sizes,
    }


def measure(
    model: torch.nn.Module, inputs: dict, repeats: int, device: torch.device
) -> tuple[float, float, int]:
    """(ms per layer forward, ms per layer backward, host reads in one forward), medians of `repeats`."""
    layers = len(model.layers)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fwd, bwd = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        out = model(**inputs, use_cache=False).last_hidden_state
        sync()
        middle = time.perf_counter()
        out.float().square().mean().backward()
        sync()
        fwd.append((middle - start) * 1e3 / layers)
        bwd.append((time.perf_counter() - middle) * 1e3 / layers)
    with torch.no_grad(), attention.count_host_reads(model.layers) as reads:
        model(**inputs, use_cache=False)
    return statistics.median(fwd[1:]), statistics.median(bwd[1:]), len(reads)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--samples", type=int, nargs="+", default=[12, 48])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from transformers import AttentionInterface, Qwen2Config, Qwen2Model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    wide = device.type == "cuda"
    config = Qwen2Config(
        hidden_size=1536 if wide else 256,
        intermediate_size=4096 if wide else 512,
        num_hidden_layers=2,
        num_attention_heads=12 if wide else 4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=args.tokens,
    )
    AttentionInterface.register(PER_LAYER, per_layer_boundaries)
    chosen = attention.choose(config, Qwen2Model, device)
    backends = [chosen, PER_LAYER, "sdpa"]
    if device.type == "cuda":
        backends += [b for b in (attention.VARLEN, "flash_attention_2") if b not in backends]
    for samples, backend in itertools.product(args.samples, backends):
        line = {
            "benchmark": "attention",
            "backend": backend,
            "samples_per_pack": samples,
            "tokens": args.tokens,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "trainer_path": backend == chosen,
        }
        try:
            config._attn_implementation = backend
            model = Qwen2Model(config).to(device, dtype)
            inputs = packed_inputs(args.tokens, samples, config.vocab_size, device)
            fwd, bwd, reads = measure(model, inputs, args.repeats, device)
            line.update(
                fwd_ms_per_layer=round(fwd, 2), bwd_ms_per_layer=round(bwd, 2), host_reads_per_forward=reads
            )
        except Exception as e:  # a backend this machine cannot run
            line["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
