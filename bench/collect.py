"""Benchmark: `lmprune collect` throughput against a plain forward pass, measured in one run.

What "collection" means here is the per-batch work of collect's first pass
(`lmprune.collect.FirstPass`): every per-neuron statistic on all tokens (count, sum, shifted sum
of squares, firing count, max and mean pooling per document), the per-layer co-activation Gram
matrix of all neurons on a `--coact-token-fraction` token subsample (upper block triangle, rows
buffered and multiplied every few batches with float32 sums folded into float64; bf16 rows on a
GPU, see `SymmetricGram`), and the pooled values copied to host memory. Collection stops the
forward pass after the last MLP's hook (no logits are needed); `collect_vs_truncated_forward`
compares with a forward pass stopped at the same point, so the gain from skipping the LM head is
visible separately.

The three measurements are interleaved, repeat after repeat, so load from other processes hits
them alike; ratios of mean times (the mean carries the amortized products and float64 flush of
the Gram matrices, every 4-8 batches) and of medians are reported. Peak memory beyond the model:
CUDA, peak allocated minus the model's weights; CPU, growth of the process's peak RSS while
collecting, past the peak of the plain forward passes that ran before.

    python bench/collect.py                                   # CPU, bundled SmolLM2, 8 x 128
    python bench/collect.py --config-name qwen2.5-1.5b --device cuda --dtype bfloat16 --batch 32 \\
        --length 512 --repeats 32                             # as bench/gpu.sh runs it
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmprune.collect import CollectConfig, FirstPass, Plan, forward_batch, stopping_hooks  # noqa: E402
from lmprune.core.arch import NeuronMap  # noqa: E402

# Real sizes, random weights (no download).
CONFIGS = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   max_position_embeddings=8192, rope_theta=100000.0,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2,
                                   vocab_size=151936, max_position_embeddings=32768,
                                   rope_theta=1000000.0, tie_word_embeddings=True,
                                   rms_norm_eps=1e-6)),
}


def build_model(name: str, dtype: torch.dtype, device: str):
    if name == "bundled":
        from lmprune.core.models import load_model

        return load_model("smollm2-135m", dtype=str(dtype).replace("torch.", ""),
                          device=device).model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, sizes = CONFIGS[name]
    config = AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="bundled", choices=["bundled", *CONFIGS])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8,
                        help="A multiple of the Gram flush interval (8), so the mean carries its "
                             "amortized cost.")
    parser.add_argument("--coact-token-fraction", type=float, default=0.25)
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    cuda = device.startswith("cuda")

    with torch.inference_mode():
        model = build_model(args.config_name, dtype, device)
        nmap = NeuronMap(model)
        L, W = nmap.num_layers, nmap.width(0)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        vocab = model.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(0)
        docs = torch.randint(3, vocab, (args.batch, args.length), generator=gen).tolist()
        cfg = CollectConfig(batch_size=args.batch, max_length=args.length)
        plan = Plan([docs, docs], cfg, pad_id=0)
        batch = plan.make(0, list(range(args.batch)), args.coact_token_fraction)
        tokens = batch.tokens

        def plain():
            forward_batch(model, batch, device)

        truncated_hooks = stopping_hooks(model, nmap, lambda layer, acts: None)

        def truncated():
            with truncated_hooks:
                forward_batch(model, batch, device)

        calibration = {"threshold": torch.zeros(L, W), "shift": torch.zeros(L, W)}
        for fn in (plain, truncated):  # warm-up, and the forward's own peak memory
            fn()
        sync(device)
        rss_forward = peak_rss_bytes()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            plain()
            forward_peak = torch.cuda.max_memory_allocated() - model_bytes
            torch.cuda.reset_peak_memory_stats()

        acc = FirstPass(L, W, device, "relative", calibration, bins=256, acts_dtype=dtype)
        collect_hooks = stopping_hooks(model, nmap, acc.hook)

        def collect():
            with collect_hooks:
                acc.start(batch, device)
                forward_batch(model, batch, device)
                pooled_max, pooled_mean = acc.finish()
                acc.to_host("max", pooled_max), acc.to_host("mean", pooled_mean)

        collect()
        sync(device)
        times = {"forward": [], "truncated_forward": [], "collect": []}
        for _ in range(args.repeats):
            for name, fn in (("forward", plain), ("truncated_forward", truncated),
                             ("collect", collect)):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
        acc.gram.flush()
        accumulator_bytes = sum(t.numel() * t.element_size()
                                for t in [*acc.state.values(), acc.gram.total, acc.gram.rows])
        memory = {"model_bytes": model_bytes, "accumulator_bytes": accumulator_bytes}
        if cuda:
            memory["collect_peak_beyond_model_bytes"] = (torch.cuda.max_memory_allocated()
                                                         - model_bytes)
            memory["forward_peak_beyond_model_bytes"] = forward_peak
        else:
            memory["collect_peak_rss_growth_bytes"] = peak_rss_bytes() - rss_forward

    mean = {k: statistics.fmean(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    tok_s = {k: round(tokens / v, 1) for k, v in mean.items()}
    machine = (f"{torch.cuda.get_device_name(device)}" if cuda else
               f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
               f"{torch.get_num_threads()} (shared with other jobs)")
    result = {
        "machine": machine,
        "ratios": {
            "collect_vs_forward": round(mean["forward"] / mean["collect"], 3),
            "collect_vs_truncated_forward": round(mean["truncated_forward"] / mean["collect"], 3),
            "collect_vs_forward_median": round(median["forward"] / median["collect"], 3),
        },
        "tokens_per_second": tok_s,
        "seconds_per_batch": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "memory": memory,
        "settings": {"config": args.config_name, "device": device, "dtype": args.dtype,
                     "batch": args.batch, "length": args.length, "repeats": args.repeats,
                     "coact_token_fraction": args.coact_token_fraction, "layers": L,
                     "neurons_per_layer": W, "torch": torch.__version__},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
