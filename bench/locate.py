"""Benchmark: `lmprune locate` on all 46,080 neurons of the bundled SmolLM2 (layer scope) and on
the global top-4,096 candidates, with the graph build, clustering, clusterability and scoring
parts timed separately.

Targets (issue 4, this 2-core CPU): the layer scope (graphs + clustering) under 2 minutes; the
causal scoring of 50 modules plus controls under 10 minutes; (issue 16) the whole locate of the
comparison recipe's headline row (general-text guard, matched tokens, candidates) under 15
minutes. The ratio measured in the same run is the cost of one ablation against one plain forward
pass over the same held-out tokens (1.0 means the hooks cost nothing).

    python bench/locate.py                      # collects stats once into runs/bench-locate
    python bench/locate.py --docs 300 --exact 50 --controls 20 --exact-controls 5
    python bench/locate.py --only-recipe --row guarded-1pct   # one row's locate alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmprune.cli import main as lmprune_main  # noqa: E402
from lmprune.compare import load_compare  # noqa: E402
from lmprune.core.ablation import TokenBatches, summed_nll  # noqa: E402
from lmprune.core.models import load_model  # noqa: E402
from lmprune.locate.command import LocateConfig, locate  # noqa: E402


def collect_once(out: Path, docs: int) -> None:
    if (out / "manifest.json").is_file():
        return
    code = lmprune_main(["collect", "--model", "smollm2-135m", "--offensive", "paradetox:toxic",
                         "--clean", "paradetox:neutral", "--out", str(out), "--max-docs",
                         str(docs), "--top-k-global", "4096"])
    if code != 0:
        raise SystemExit(f"collect failed with exit code {code}")


def plain_forward_seconds(result: dict, repeats: int = 3) -> float:
    """One plain forward pass over the held-out texts the scores used (offensive, clean and,
    where scored, general)."""
    from lmprune.core.data import load_corpus

    loaded = load_model("smollm2-135m")
    settings, heldout = result["settings"], result["heldout"]
    batches = []
    for corpus in ("offensive", "clean", "general"):
        info = heldout.get(corpus)
        if info is None:
            continue
        texts = load_corpus(info["spec"]).texts[info["first"]:info["first"] + info["documents"]]
        batches.append(TokenBatches.build(loaded.tokenizer, texts, settings["max_length"],
                                          settings["batch_size"], "cpu"))
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            for data in batches:
                for ids, mask, labels in data.batches:
                    summed_nll(loaded.model, ids, mask, labels)
            times.append(time.perf_counter() - start)
    return min(times)


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}")


def recipe_locate(path: str, row_name: str | None, out: Path) -> dict:
    """A comparison recipe's row (default its headline), located on the benchmark's stats: wall
    time against the 15-minute target, and its parts."""
    recipe = load_compare(path)
    row = next(r for r in recipe.modules if r.name == row_name) if row_name else recipe.headline
    cfg = replace(row.locate, stats=str(out / "stats"), out=str(out / "modules-recipe.json"),
                  model="smollm2-135m", plots=False)
    started = time.perf_counter()
    result = locate(cfg)
    wall = time.perf_counter() - started
    return {"row": row.name, "modules": len(result["modules"]),
            "heldout_tokens": result["heldout"]["tokens"],
            "timings_s": {k: round(v, 2) for k, v in result["timings"].items()},
            "wall_s": round(wall, 1), "wall_vs_15min_target": round(wall / 900, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-locate")
    parser.add_argument("--docs", type=int, default=300, help="Documents per corpus to collect.")
    parser.add_argument("--exact", type=int, default=50)
    parser.add_argument("--controls", type=int, default=20)
    parser.add_argument("--exact-controls", type=int, default=5)
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--recipe", default="recipes/compare-smollm2.yaml",
                        help="Comparison recipe whose headline row's locate is timed.")
    parser.add_argument("--row", help="The recipe's row to time (default: its headline).")
    parser.add_argument("--only-recipe", action="store_true",
                        help="Time the recipe's locate only (not the two scopes).")
    args = parser.parse_args()
    out = Path(args.out)
    collect_once(out / "stats", args.docs)
    recipe = recipe_locate(args.recipe, args.row, out)
    if args.only_recipe:
        print(json.dumps({"bench": "locate", "machine": machine(), "recipe": recipe}))
        return

    runs = {}
    for scope in ("layer", "global"):
        cfg = LocateConfig(stats=str(out / "stats"), out=str(out / f"modules-{scope}.json"),
                           scope=scope, k=12 if scope == "layer" else 40, exact=args.exact,
                           controls=args.controls, exact_controls=args.exact_controls,
                           shuffles=args.shuffles, plots=False)
        started = time.perf_counter()
        result = locate(cfg)
        timings = dict(result["timings"], wall_s=time.perf_counter() - started)
        ablations = (min(args.exact, len(result["modules"]))
                     + min(args.exact_controls, args.exact) * args.controls)
        runs[scope] = {"modules": len(result["modules"]), "ablations": ablations,
                       "timings_s": {k: round(v, 2) for k, v in timings.items()},
                       "clusterability_z": result["clusterability"].get("z")}
        last = result
    forward_s = plain_forward_seconds(last)
    layer, glob = runs["layer"]["timings_s"], runs["global"]["timings_s"]
    per_ablation = layer["scoring_s"] / max(runs["layer"]["ablations"], 1)
    report = {
        "bench": "locate",
        "machine": machine(),
        "neurons": 46080,
        "runs": runs,
        "recipe": recipe,
        "plain_forward_heldout_s": round(forward_s, 3),
        "ratios": {
            "ablation_vs_plain_forward": round(per_ablation / forward_s, 3),
            "layer_graph_and_clustering_vs_2min_target":
                round((layer["graph_s"] + layer["cluster_s"]) / 120, 3),
            "layer_scoring_vs_10min_target": round(layer["scoring_s"] / 600, 3),
            "global_graph_and_clustering_vs_2min_target":
                round((glob["graph_s"] + glob["cluster_s"]) / 120, 3),
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
