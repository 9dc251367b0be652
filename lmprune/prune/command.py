"""Prune: choose neurons (modules of a module map, single neurons by AUROC, AURA dampening or a
random control), zero their weights and save a normal checkpoint plus `lmprune.json`.

The zeros are kept as a `lmprune.core.masks.PruneMask`, recorded in the lineage
(`lmprune.core.lineage`), so that fine-tuning and every later stage hold them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmprune.core.arch import NeuronMap
from lmprune.core.config import StageSpec, option
from lmprune.core.errors import LmpruneError, warn
from lmprune.core.io import check_out_dir
from lmprune.core.lineage import LINEAGE_FILE, command_line, read_lineage, stamp, utc_now
from lmprune.core.masks import (
    NeuronSet,
    PruneMask,
    count_neurons,
    neurons_to_json,
    normalize_neurons,
)
from lmprune.core.models import check_identity
from lmprune.core.module_map import check_module_map, module_neurons, read_module_map
from lmprune.core.specs import WeightEditSpec
from lmprune.core.stats_folder import MANIFEST_FILE, STATS_FILE, read_manifest, read_tensors

MODES = ["modules", "neurons", "dampen", "random"]

# --------------------------------------------------------------------------------------------
# Selection


@dataclass(frozen=True)
class Selection:
    """A parsed `--select`: kind is top, budget, ids or target."""

    kind: str
    value: float
    percent: bool = False
    ids: tuple[int, ...] = ()


def parse_select(spec: str) -> Selection:
    kind, _, arg = spec.partition(":")
    usage = "--select must be top:N, budget:P%, budget:N, ids:3,7,9 or target:X"
    try:
        if kind == "top":
            value = int(arg)
            if value < 1:
                raise ValueError
            return Selection("top", value)
        if kind == "budget":
            percent = arg.endswith("%")
            value = float(arg[:-1]) if percent else int(arg)
            if not value > 0 or (percent and value > 100):  # NaN is not > 0
                raise ValueError
            return Selection("budget", value, percent)
        if kind == "ids":
            ids = tuple(int(x) for x in arg.split(","))
            return Selection("ids", len(ids), ids=ids)
        if kind == "target":
            value = float(arg)
            if not math.isfinite(value):
                raise ValueError
            return Selection("target", value)
    except ValueError:
        raise LmpruneError(f"{usage}, not '{spec}'") from None
    raise LmpruneError(f"{usage}, not '{spec}'")


def map_rule(mmap: dict) -> str:
    """The score a module map ranks its modules by (`causal` for maps from before the rule)."""
    return (mmap.get("rule") or {}).get("score", "causal")


def rank_modules(modules: list[dict], rank_by: str) -> list[dict]:
    """Modules by `scores[rank_by]`, highest first (ties keep file order)."""
    missing = [m["id"] for m in modules if rank_by not in (m.get("scores") or {})]
    if missing:
        raise LmpruneError(f"modules {missing[:5]} have no score '{rank_by}'; choose another "
                           f"with --rank-by")
    return sorted(modules, key=lambda m: -float(m["scores"][rank_by]))


def select_modules(ranked: list[dict], selection: Selection, total_neurons: int,
                   gap_fn=None, rank_by: str = "causal") -> tuple[list[dict], dict]:
    """The chosen modules (in rank order) and what the rule saw.

    top:N       the first N modules;
    budget      modules in rank order while their union stays within the budget (a module that
                would overshoot ends the selection) and their `rank_by` score is positive (a
                module whose general damage outweighs its offensive effect is never worth it);
    ids         exactly these ids;
    target:X    modules in rank order until `gap_fn(neurons)` (offensive-vs-clean loss gap of
                the pruned model) reaches X.
    """
    if selection.kind == "top":
        return ranked[: int(selection.value)], {}
    if selection.kind == "ids":
        by_id = {m["id"]: m for m in ranked}
        unknown = [i for i in selection.ids if i not in by_id]
        if unknown:
            raise LmpruneError(f"module ids {unknown} are not in the module map")
        wanted = set(selection.ids)
        return [m for m in ranked if m["id"] in wanted], {}
    if selection.kind == "budget":
        limit = (selection.value / 100 * total_neurons if selection.percent
                 else selection.value)
        chosen: list[dict] = []
        for module in ranked:
            if (count_neurons(module_neurons(chosen + [module])) > limit
                    or float(module["scores"][rank_by]) <= 0):
                break
            chosen.append(module)
        return chosen, {"budget_neurons": int(limit)}
    if gap_fn is None:
        raise LmpruneError("--select target:X needs held-out texts: --offensive SPEC --clean SPEC")
    chosen, trace = [], []
    for module in ranked:
        chosen.append(module)
        gap = gap_fn(module_neurons(chosen))
        trace.append({"id": module["id"], "gap": gap})
        if gap >= selection.value:
            return chosen, {"target": selection.value, "reached": True, "trace": trace}
    warn(f"target gap {selection.value} not reached with all {len(ranked)} modules (last gap "
         f"{trace[-1]['gap']:.4f})")
    return chosen, {"target": selection.value, "reached": False, "trace": trace}


# --------------------------------------------------------------------------------------------
# Losses for target:X


def make_gap_fn(model: nn.Module, tokenizer, offensive: list[str], clean: list[str],
                batch_size: int = 8, max_length: int = 128):
    """gap(neurons) = (loss_off(pruned) - loss_off(base)) - (loss_clean(pruned) - loss_clean(base)),
    with the neurons silenced by zeroing their activations (same output as zeroed weights)."""
    from lmprune.core.ablation import CausalScorer, TokenBatches

    device = str(next(model.parameters()).device)
    scorer = CausalScorer(
        model,
        TokenBatches.build(tokenizer, offensive, max_length, batch_size, device),
        TokenBatches.build(tokenizer, clean, max_length, batch_size, device),
    )
    return lambda neurons: scorer.effect(neurons)["causal"]


# --------------------------------------------------------------------------------------------
# The other modes


def load_auroc(stats_dir: str | Path, identity: dict, nmap: NeuronMap) -> torch.Tensor:
    """AUROC per neuron [L, W] from a collect folder, checked against the loaded model."""
    stats_dir = Path(stats_dir)
    path = stats_dir / STATS_FILE
    if not path.is_file():
        raise LmpruneError(f"no {STATS_FILE} in {stats_dir} (write it with `lmprune collect`)")
    if (stats_dir / MANIFEST_FILE).is_file():  # a bare stats file is checked by shape alone
        meta = read_manifest(stats_dir)
        recorded = dict(meta.get("model") or {}, num_layers=meta.get("num_layers"),
                        neurons_per_layer=meta.get("neurons_per_layer"))
        check_identity(recorded, identity, nmap, f"stats {stats_dir}")
    tensors = read_tensors(stats_dir, STATS_FILE)
    if "auroc" not in tensors:
        raise LmpruneError(f"{path} has no 'auroc' tensor")
    auroc = tensors["auroc"].float()
    if tuple(auroc.shape) != (nmap.num_layers, nmap.width(0)):
        raise LmpruneError(f"{path}: auroc has shape {tuple(auroc.shape)}, the model needs "
                           f"({nmap.num_layers}, {nmap.width(0)})")
    return auroc


def top_auroc_neurons(auroc: torch.Tensor, k: int) -> NeuronSet:
    """The k neurons with the highest AUROC (ties: lower layer, then lower index first)."""
    if not 0 < k <= auroc.numel():
        raise LmpruneError(f"--count must be between 1 and {auroc.numel()}, not {k}")
    order = torch.sort(auroc.flatten(), descending=True, stable=True).indices[:k]
    width = auroc.shape[1]
    neurons: dict[int, list[int]] = defaultdict(list)
    for flat in order.tolist():
        neurons[flat // width].append(flat % width)
    return normalize_neurons(neurons)


def aura_factors(auroc: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """AURA's dampening: 1 - 2(AUROC - 0.5) where AUROC > 0.5, else 1. [L, W]

    `strength` alpha scales the cut, 1 - alpha * 2(AUROC - 0.5): 1 is the published rule, 0
    leaves the model as it is; a sweep over alpha gives AURA's toxicity-fluency frontier."""
    cut = strength * 2 * (auroc - 0.5)
    return torch.where(auroc > 0.5, 1 - cut, torch.ones_like(auroc)).clamp(0, 1)


@torch.no_grad()
def dampen(model: nn.Module, factors: torch.Tensor) -> None:
    """Scale each neuron's output-projection column (Conv1D: row) by its factor [L, W].

    The same as scaling the activation (AURA), but it keeps a plain checkpoint.
    """
    nmap = NeuronMap(model)
    out_dim = 0 if nmap.layout.conv1d else 1
    for layer in range(nmap.num_layers):
        weight = nmap.output_projection(layer).weight  # Linear [d_model, W]; Conv1D [W, d_model]
        shape = [1, 1]
        shape[out_dim] = -1
        weight.mul_(factors[layer].to(weight).view(shape))


def random_like(reference: NeuronSet, widths: list[int], seed: int) -> NeuronSet:
    """Random neurons with the same count per layer as `reference` (a seeded control)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, idx in sorted(reference.items()):
        out[layer] = sorted(torch.randperm(widths[layer], generator=gen)[: len(idx)].tolist())
    return normalize_neurons(out)


# --------------------------------------------------------------------------------------------
# Physical removal


@torch.no_grad()
def remove_neurons(model: nn.Module, neurons: NeuronSet) -> None:
    """Slice the neurons out of every layer and shrink the config's width key.

    Only loadable when every layer loses the same number (one width per config); refused
    otherwise.
    """
    nmap = NeuronMap(model)
    counts = [len(neurons.get(layer, [])) for layer in range(nmap.num_layers)]
    if len(set(counts)) != 1 or counts[0] == 0:
        raise LmpruneError(f"--physical needs every layer to lose the same number of neurons "
                           f"(per layer: {counts}); save zeroed weights instead (drop --physical)")
    for layer in range(nmap.num_layers):
        width = nmap.width(layer)
        pruned = set(neurons[layer])
        keep = torch.tensor([j for j in range(width) if j not in pruned], dtype=torch.long)
        offsets: dict[tuple[str, int], list[int]] = defaultdict(list)
        for s in nmap.weight_slices(layer):
            offsets[(s.name, s.dim)].append(s.offset)
        mlp = nmap.mlps[layer]
        for (name, dim), offs in offsets.items():
            owner_name, attr = name.rsplit(".", 1)
            owner = mlp.get_submodule(owner_name)
            param = getattr(owner, attr)
            index = torch.cat([keep + off for off in offs]).to(param.device)
            setattr(owner, attr, nn.Parameter(param.index_select(dim, index).clone(),
                                              requires_grad=param.requires_grad))
        for owner_name in {name.rsplit(".", 1)[0] for name, _ in offsets}:
            _sync_features(mlp.get_submodule(owner_name))
    config, key = nmap.width_config(model.config)
    setattr(config, key, nmap.width(0))


def _sync_features(module: nn.Module) -> None:
    """Keep a projection's size attributes in line with its (sliced) weight."""
    if hasattr(module, "nf"):  # GPT-2 Conv1D: weight [nx, nf]; forward reads nf
        module.nx, module.nf = module.weight.shape
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


# --------------------------------------------------------------------------------------------
# The stage


@dataclass
class PruneConfig(WeightEditSpec):
    """lmprune prune: choose neurons, zero them, save a checkpoint with lmprune.json."""

    mode: str = option("modules", "What to prune: the selected modules, the top single neurons "
                       "by AUROC, AURA dampening, or a random control.", choices=MODES)
    modules: str | None = option(None, "Module map (modules.json from `lmprune locate`).")
    select: str | None = option(None, "Which modules: top:N, budget:P% (of all neurons), "
                                "budget:N, ids:3,7,9, or target:X (loss gap; needs "
                                "--offensive/--clean).")
    rank_by: str = option("rule", "Module score (key of `scores`) that ranks the modules; "
                          "rule: the module map's own rule (`guarded` where locate scored "
                          "general text, else `causal`).")
    general_weight: float | None = option(None, "Rank by offensive_effect - W x "
                                          "general_damage, recomputed from the map's scores "
                                          "(another exchange rate than the map's own "
                                          "locate --general-weight, without locating again).")
    min_selectivity: float | None = option(None, "Only modules whose scores.selectivity (in "
                                           "[-1, 1]: 1 when only the offensive loss moves) is at "
                                           "least this; modules not ablated exactly have none "
                                           "and are left out.")
    stats: str | None = option(None, "Collect folder with stats.safetensors (neurons, dampen).")
    count: int | None = option(None, "neurons mode: how many neurons (default: as many as the "
                               "module selection holds).")
    like: str | None = option(None, "random mode: a checkpoint folder or a modules.json (with "
                              "--select) whose per-layer counts to copy (default: --modules "
                              "with --select).")
    seed: int = option(0, "Seed of the random control.")
    strength: float = option(1.0, "dampen mode: AURA's strength alpha, factor 1 - alpha x "
                             "2(AUROC - 0.5) (1: as published; 0 to 2: a frontier sweep).")
    offensive: str | None = option(None, "target:X: held-out offensive texts (corpus spec).",
                                   corpus=True)
    clean: str | None = option(None, "target:X: held-out clean texts (corpus spec).", corpus=True)
    target_docs: int = option(64, "target:X: documents read from each held-out corpus.")
    batch_size: int = option(8, "target:X: batch size of the loss evaluation.")
    max_length: int = option(128, "target:X: tokens per text in the loss evaluation.")
    physical: bool = option(False, "Remove the neurons (smaller MLP width) instead of zeroing; "
                            "only when every layer loses the same number.")
    overwrite: bool = option(False, "Replace an existing --out folder that is not an lmprune "
                             "checkpoint (its files are lost).", stage_key=False)


@dataclass
class PrunePlan:
    """What a config resolves to: the neurons to zero and what to record about the choice."""

    pruned: NeuronSet
    factors: torch.Tensor | None = None
    record: dict | None = None


def _selected(config: PruneConfig, loaded, nmap: NeuronMap, modules_path: str | None
              ) -> tuple[list[dict], dict]:
    """Modules chosen by --select from a module map, plus the record of that choice."""
    if not modules_path or not config.select:
        raise LmpruneError(f"mode {config.mode} needs --modules modules.json and --select")
    mmap = read_module_map(modules_path)
    check_module_map(mmap, loaded.identity, nmap, f"module map {modules_path}")
    selection = parse_select(config.select)
    gap_fn = None
    if selection.kind == "target":
        gap_fn = _target_gap_fn(config, loaded)
    modules = selective_modules(mmap["modules"], config.min_selectivity)
    rank_by = map_rule(mmap) if config.rank_by == "rule" else config.rank_by
    if config.general_weight is not None:
        modules, rank_by = reweighted(modules, config.general_weight), "guarded_reweighted"
    ranked = rank_modules(modules, rank_by)
    chosen, info = select_modules(ranked, selection, sum(nmap.widths), gap_fn, rank_by)
    from lmprune.core.models import file_sha256

    record = {"path": str(modules_path), "sha256": file_sha256(modules_path),
              "ids": [m["id"] for m in chosen], "select": config.select,
              "rank_by": rank_by, **info}
    if config.min_selectivity is not None:
        record.update(min_selectivity=config.min_selectivity, eligible=len(modules))
    if config.general_weight is not None:
        record["general_weight"] = config.general_weight
    return chosen, record


def reweighted(modules: list[dict], weight: float) -> list[dict]:
    """The modules with `scores.guarded_reweighted` = offensive_effect - weight x
    general_damage (the guarded rule at another exchange rate)."""
    missing = [m["id"] for m in modules if not {"offensive_effect", "general_damage"}
               <= set(m.get("scores") or {})]
    if missing:
        raise LmpruneError(f"--general-weight needs scores.offensive_effect and general_damage; "
                           f"modules {missing[:5]} have none: locate with --general SPEC")
    from lmprune.core.ablation import guarded_score

    return [{**m, "scores": {**m["scores"], "guarded_reweighted": guarded_score(
        m["scores"]["offensive_effect"], m["scores"]["general_damage"], weight)}}
            for m in modules]


def selective_modules(modules: list[dict], min_selectivity: float | None) -> list[dict]:
    """The modules whose `scores.selectivity` reaches `min_selectivity` (all when None).

    Ranking by causal effect alone favours modules that raise every loss, a bit more on
    offensive text: removing them wrecks the model. Selectivity keeps the ones that move the
    offensive loss and little else.
    """
    if min_selectivity is None:
        return modules
    kept = [m for m in modules
            if float((m.get("scores") or {}).get("selectivity", -math.inf)) >= min_selectivity]
    if not kept:
        raise LmpruneError(f"no module has scores.selectivity >= {min_selectivity} (only modules "
                           f"ablated exactly have one: raise `lmprune locate --exact`, or lower "
                           f"--min-selectivity)")
    return kept


def _target_gap_fn(config: PruneConfig, loaded):
    from lmprune.core.data import load_corpus

    if not (config.offensive and config.clean):
        raise LmpruneError("--select target:X needs held-out texts: --offensive SPEC --clean SPEC")
    off = load_corpus(config.offensive, config.target_docs).texts
    clean = load_corpus(config.clean, config.target_docs).texts
    return make_gap_fn(loaded.model, loaded.tokenizer, off, clean, config.batch_size,
                       config.max_length)


def plan(config: PruneConfig, loaded) -> PrunePlan:
    """Resolve the mode and selection of `config` against the loaded model."""
    nmap = NeuronMap(loaded.model)
    if config.mode == "modules":
        chosen, record = _selected(config, loaded, nmap, config.modules)
        if not chosen:
            raise LmpruneError(f"--select {config.select} chose no module (the best ranked one "
                               f"is larger than the budget): raise the budget or use top:N")
        return PrunePlan(module_neurons(chosen), record=record)
    if config.mode in ("neurons", "dampen"):
        if not config.stats:
            raise LmpruneError(f"mode {config.mode} needs --stats DIR (from `lmprune collect`)")
        auroc = load_auroc(config.stats, loaded.identity, nmap)
        if config.mode == "dampen":
            if not 0 <= config.strength <= 2:  # also refuses NaN
                raise LmpruneError(f"--strength must be between 0 and 2, not {config.strength}")
            factors = aura_factors(auroc, config.strength)
            rule = "1 - 2(AUROC - 0.5)" if config.strength == 1 else \
                f"1 - {config.strength:g} x 2(AUROC - 0.5)"
            return PrunePlan(_fully_silenced(factors), factors=factors,
                             record={"stats": config.stats, "rule": rule,
                                     "strength": config.strength})
        record = {"stats": config.stats}
        if config.count is not None:
            k = config.count
        else:
            chosen, record["like_modules"] = _selected(config, loaded, nmap, config.modules)
            k = count_neurons(module_neurons(chosen))
        return PrunePlan(top_auroc_neurons(auroc, k), record=record)
    # random: the per-layer counts of a reference selection
    like = config.like
    if like and Path(like).is_dir():
        meta = read_lineage(like)
        if meta is None:
            raise LmpruneError(f"--like {like}: no {LINEAGE_FILE} in that folder")
        reference = normalize_neurons(meta["pruned_neurons"])
        record = {"like": like}
    else:
        chosen, record = _selected(config, loaded, nmap, like or config.modules)
        reference = module_neurons(chosen)
    record["seed"] = config.seed
    return PrunePlan(random_like(reference, nmap.widths, config.seed), record=record)


def _fully_silenced(factors: torch.Tensor) -> NeuronSet:
    """Neurons whose factor is 0 (AUROC 1): their output is gone, so prune them entirely."""
    layers, idx = torch.nonzero(factors == 0, as_tuple=True)
    neurons: dict[int, list[int]] = defaultdict(list)
    for layer, j in zip(layers.tolist(), idx.tolist(), strict=True):
        neurons[layer].append(j)
    return normalize_neurons(neurons)


def prune_model(config: PruneConfig, loaded) -> dict:
    """Apply `config` to `loaded.model` in place; returns the lmprune.json to save with it."""
    nmap = NeuronMap(loaded.model)
    chosen = plan(config, loaded)
    previous = read_lineage(loaded.source.path) if loaded.source.kind == "folder" else None
    previous = previous or {}
    if chosen.factors is not None:
        dampen(loaded.model, chosen.factors)
    pruned = normalize_neurons({
        layer: set(previous.get("pruned_neurons", {}).get(str(layer), []))
        | set(chosen.pruned.get(layer, []))
        for layer in range(nmap.num_layers)})
    PruneMask(loaded.model, pruned).apply(loaded.model)
    total = sum(nmap.widths)
    meta = {
        **stamp(),
        "base_model": loaded.identity.get("base_model") or loaded.identity,
        "source_model": loaded.identity,
        "mode": config.mode,
        "pruned_neurons": neurons_to_json(pruned),
        "num_pruned": count_neurons(pruned),
        "fraction_pruned": count_neurons(pruned) / total,
        "command": command_line(),
        "history": [*previous.get("history", []), {
            "stage": "prune", "mode": config.mode, "neurons": count_neurons(chosen.pruned),
            "time": utc_now()}],
    }
    if chosen.factors is not None:
        meta["dampened_neurons"] = {
            str(layer): {str(j): float(row[j]) for j in torch.nonzero(row < 1).flatten().tolist()}
            for layer, row in enumerate(chosen.factors)
            if bool((row < 1).any())}
    if chosen.record is not None:
        meta["modules" if config.mode == "modules" else "selection"] = chosen.record
    if config.physical:
        remove_neurons(loaded.model, pruned)
        meta["physically_removed"] = meta["pruned_neurons"]
        meta["original_width"] = total // nmap.num_layers
        meta["pruned_neurons"] = {}
    return meta


def run(config: PruneConfig) -> int:
    from lmprune.core.models import save_model

    if not config.out:
        raise LmpruneError("--out DIR is required (the folder of the pruned checkpoint)")
    check_out_dir(config.out, "checkpoint", config.overwrite)
    loaded = config.load()
    meta = prune_model(config, loaded)
    save_model(loaded.model, loaded.tokenizer, config.out,
               extra_files={LINEAGE_FILE: meta}, overwrite=config.overwrite)
    what = ("removed" if config.physical else "zeroed")
    print(f"{what} {meta['num_pruned']:,} neurons ({meta['fraction_pruned']:.2%}) "
          f"[{config.mode}] -> {config.out}")
    return 0


STAGE = StageSpec(
    "prune", PruneConfig, run,
    help="Zero (or remove, or dampen) MLP neurons chosen from a module map or statistics; save "
         "a checkpoint with its masks.",
    inputs=("modules", "like"), wired=("model", "seed"), sources=("stats",))
register = STAGE.register
