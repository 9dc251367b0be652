"""Training speed of a gradient-routed step (`lmprune.induce.command.routed_step`: a routed and
a clean pass, masked and clipped apart) against a plain fine-tuning step on the same blocks, in
the same run.

Two copies of one model train side by side on one batch (half of its blocks routed); each repeat
times a few steps of each, in alternating order, so load from other work on the machine hits
both alike. Prints JSON; the last line is
{"machine": ..., "ratios": {"routed_vs_plain_tokens_per_s": ...}, ...}.

    python bench/induce.py                       # small SmolLM2-shaped config (fast)
    python bench/induce.py --model smollm2-135m  # the bundled model (slow on CPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import add_training_arguments, base_model  # noqa: E402  (bench/finetune.py)


def main() -> None:
    from accelerate import Accelerator

    from lmprune.core.arch import NeuronMap
    from lmprune.core.masks import PruneMask
    from lmprune.core.training import make_optimizer, make_scheduler, train_step
    from lmprune.induce.command import Pass, routed_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=16, help="Designated neurons per layer.")
    add_training_arguments(parser, batch=8, seq=64, repeats=6,
                           batch_help="Blocks per step (half routed).")
    args = parser.parse_args()
    base = base_model(args)
    nmap = NeuronMap(base)
    gen = torch.Generator().manual_seed(0)
    designated = {layer: torch.randperm(nmap.width(layer), generator=gen)[: args.neurons]
                  .tolist() for layer in range(nmap.num_layers)}
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen)
    half = args.batch // 2
    every = torch.ones(half, args.seq - 1, dtype=torch.bool)
    offensive, clean = Pass(batch[:half], every), Pass(batch[half:], every)

    accelerator = Accelerator(cpu=True)
    runs = {}
    for name in ("routed", "plain"):
        model = copy.deepcopy(base).train()
        optimizer = make_optimizer(model, 1e-4, 0.01)
        scheduler = make_scheduler(optimizer, "constant", 0, 10_000)
        model, optimizer = accelerator.prepare(model, optimizer)
        runs[name] = (model, optimizer, scheduler)
    mask = PruneMask(accelerator.unwrap_model(runs["routed"][0]), designated)
    tokens = args.batch * args.seq * args.steps

    def timed(name: str) -> float:
        model, optimizer, scheduler = runs[name]
        start = time.perf_counter()
        for _ in range(args.steps):
            if name == "routed":
                routed_step(accelerator, model, optimizer, scheduler, mask, "rest", offensive,
                            clean, 1.0)
            else:
                train_step(accelerator, model, optimizer, scheduler, [batch], None, 1.0)
        return tokens / (time.perf_counter() - start)

    for name in runs:  # warm-up: allocator, AdamW state
        timed(name)
    speeds: dict[str, list[float]] = {"routed": [], "plain": []}
    for r in range(args.repeats):
        for name in (("routed", "plain") if r % 2 == 0 else ("plain", "routed")):
            speeds[name].append(timed(name))
    ratios = [a / b for a, b in zip(speeds["routed"], speeds["plain"], strict=True)]
    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}, CPU",
        "model": args.model or "llama 4x(576->1536), vocab 4096",
        "designated_neurons": args.neurons * nmap.num_layers,
        "tokens_per_step": args.batch * args.seq,
        "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in speeds.items()},
        "ms_per_step": {k: round(1000 * args.batch * args.seq / statistics.median(vs), 1)
                        for k, vs in speeds.items()},
        "ratios": {"routed_vs_plain_tokens_per_s": round(statistics.median(ratios), 4)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
