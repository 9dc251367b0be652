"""Training speed with pruning masks held (gradients masked, weights re-zeroed every step)
against the same loop without masks, in the same run.

Two copies of one model (same pruned starting weights) train side by side with
`lmprune.core.training.train_step`; each repeat times a few steps of each, in alternating order, so
load from other work on the machine hits both alike. Prints JSON; the last line is
{"machine": ..., "ratios": {"masked_vs_plain_tokens_per_s": ...}, ...}.

    python bench/finetune.py                       # small SmolLM2-shaped config (fast)
    python bench/finetune.py --model smollm2-135m  # the bundled model (slow on CPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch


def small_model():
    """SmolLM2's MLP shape (576 -> 1536) with fewer layers and a small vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=4096,
                         max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config)


def add_training_arguments(parser: argparse.ArgumentParser, batch: int, seq: int, repeats: int,
                           batch_help: str = "Sequences per step.") -> None:
    """The flags this benchmark shares with bench/induce.py."""
    parser.add_argument("--model", default=None, help="Model to load (default: small config).")
    parser.add_argument("--batch", type=int, default=batch, help=batch_help)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--steps", type=int, default=2, help="Steps per timed run.")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1,
                        help="Torch threads (1 is steadier when other work shares the cores).")


def base_model(args: argparse.Namespace):
    """The model of --model (float32), or the small config; torch threads set from --threads."""
    torch.set_num_threads(args.threads)
    if args.model:
        from lmprune.core.models import load_model

        return load_model(args.model, dtype="float32").model
    return small_model()


def main() -> None:
    from accelerate import Accelerator

    from lmprune.core.arch import NeuronMap
    from lmprune.core.masks import PruneMask
    from lmprune.core.training import make_optimizer, make_scheduler, train_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1, help="Neurons pruned per layer.")
    add_training_arguments(parser, batch=4, seq=128, repeats=8)
    args = parser.parse_args()
    base = base_model(args)
    nmap = NeuronMap(base)
    gen = torch.Generator().manual_seed(0)
    pruned = {layer: torch.randperm(nmap.width(layer), generator=gen)
              [: int(args.fraction * nmap.width(layer))].sort().values.tolist()
              for layer in range(nmap.num_layers)}
    PruneMask(base, pruned).apply(base)

    accelerator = Accelerator(cpu=True)
    runs = {}
    for name in ("masked", "plain"):
        model = copy.deepcopy(base).train()
        optimizer = make_optimizer(model, 1e-4, 0.01)
        scheduler = make_scheduler(optimizer, "constant", 0, 10_000)
        model, optimizer = accelerator.prepare(model, optimizer)
        mask = PruneMask(model, pruned) if name == "masked" else None
        runs[name] = (model, optimizer, scheduler, mask)
    vocab = base.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
    tokens = args.batch * args.seq * args.steps

    def timed(name: str) -> float:
        model, optimizer, scheduler, mask = runs[name]
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(accelerator, model, optimizer, scheduler, [batch], mask, 1.0)
        return tokens / (time.perf_counter() - start)

    for name in runs:  # warm-up: allocator, AdamW state
        timed(name)
    speeds: dict[str, list[float]] = {"masked": [], "plain": []}
    for r in range(args.repeats):
        for name in (("masked", "plain") if r % 2 == 0 else ("plain", "masked")):
            speeds[name].append(timed(name))
    ratios = [m / p for m, p in zip(speeds["masked"], speeds["plain"], strict=True)]
    masked_model, _, _, mask = runs["masked"]
    assert mask.nonzero_count(masked_model) == 0
    # The mask's own work, timed alone: far steadier under load than the end-to-end ratio.
    train_step(accelerator, masked_model, *runs["masked"][1:3], [batch], None, 1.0)
    start = time.perf_counter()
    for _ in range(20):
        mask.mask_gradients(masked_model)
        mask.apply(masked_model)
    mask_ms = (time.perf_counter() - start) / 20 * 1000
    step_ms = 1000 * args.batch * args.seq / statistics.median(speeds["plain"])
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}, CPU",
        "model": args.model or "llama 4x(576->1536), vocab 4096",
        "pruned_neurons": sum(len(v) for v in pruned.values()),
        "tokens_per_step": args.batch * args.seq,
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in speeds.items()},
        "ratios": {"masked_vs_plain_tokens_per_s": round(statistics.median(ratios), 4)},
        "overhead_percent": round(100 * (1 - statistics.median(ratios)), 2),
        "mask_ms_per_step": round(mask_ms, 3),
        "plain_ms_per_step": round(step_ms, 1),
    }
    result["ratios"]["mask_work_vs_step_time"] = round(mask_ms / step_ms, 5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
