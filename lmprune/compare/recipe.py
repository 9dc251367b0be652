"""The recipe of `lmprune compare`: its sections and rows, validated before any work, and the
comparison folder (one sub-folder per row). What the rows are: lmprune/compare/__init__.py."""


from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from lmprune.collect import CollectConfig
from lmprune.core.config import build_config, option
from lmprune.core.errors import ConfigError, LmpruneError
from lmprune.evaluate.command import EvalConfig
from lmprune.finetune.command import FinetuneConfig
from lmprune.finetune.relearn import RelearnConfig
from lmprune.locate.command import LocateConfig
from lmprune.methods.act import ActConfig
from lmprune.methods.dpo import DpoConfig
from lmprune.methods.profs import ProfsConfig
from lmprune.prune.command import PruneConfig
from lmprune.run.recipe import (
    RunConfig,
    RunFolder,
    general_from_finetune,
    hold_out_general,
    load_recipe,
)
from lmprune.run.runner import digest
from lmprune.stages import STAGES

SECTIONS = ("collect", "locate", "eval", "finetune", "compare", "modules", "induce", "relearn")
PLOT_FILE = "compare.png"
FRONTIER_FILE = "frontier.png"


@dataclass
class CompareConfig:
    """`compare:` which control and baseline rows run beside the module pruning."""

    headline: str | None = option(None, "The `modules:` entry the controls copy (neuron count "
                                  "and per-layer counts) and the targets judge (default: the "
                                  "first).")
    random_seeds: list[int] = option([0, 1, 2, 3, 4], "Seeds of the random same-size controls.")
    aura: bool = option(True, "Add AURA dampening (by the collected AUROCs).")
    top_auroc: bool = option(True, "Add the top single neurons by AUROC, as many as the headline.")
    profs: bool = option(False, "Add ProFS: a toxic subspace of paired embeddings projected out "
                         "of the MLP output weights (lmprune profs).")
    profs_pairs: str = option("paradetox", "ProFS's paired texts (an offensive text and its "
                              "clean rewrite; lmprune profs --pairs).")
    profs_max_pairs: int = option(500, "Pairs ProFS uses (the paper: 500).")
    profs_rank: int = option(2, "Dimensions of ProFS's toxic subspace (the paper: 2 on GPT-2).")
    profs_layers: str = option("upper", "Layers ProFS edits: upper (the upper half), all, 3,4,5 "
                               "or 10-20.")
    act: bool = option(False, "Add Linear-AcT: each MLP neuron's activations transported from "
                       "offensive to clean text by an affine map folded into the weights "
                       "(lmprune act).")
    act_offensive: str | None = option(None, "Linear-AcT's source corpus (default: "
                                       "collect.offensive; lmprune act --offensive).")
    act_clean: str | None = option(None, "Linear-AcT's target corpus (default: collect.clean).")
    act_max_docs: int = option(512, "Documents of each corpus Linear-AcT fits on.")
    act_strength: float = option(1.0, "Linear-AcT's strength lambda in [0, 1] (the paper's "
                                 "default: 1).")
    act_layers: str = option("all", "Layers Linear-AcT transports: all, 3,4,5 or 10-20.")
    dpo: bool = option(False, "Add DPO: trained to prefer clean paraphrases over their toxic "
                       "originals (lmprune dpo).")
    dpo_pairs: str = option("paradetox", "DPO's paired texts (rejected: the offensive text, "
                            "chosen: its clean rewrite; lmprune dpo --pairs).")
    dpo_max_pairs: int = option(128, "Pairs DPO trains on.")
    dpo_beta: float = option(0.1, "DPO's beta (Lee et al.: 0.1).")
    dpo_lr: float = option(1e-5, "DPO's learning rate (Lee et al.: 1e-6, over thousands of "
                           "steps).")
    dpo_max_steps: int = option(32, "DPO's optimizer steps.")
    dpo_batch_size: int = option(4, "Pairs per DPO step (Lee et al.: 4).")
    induced_random_seeds: list[int] = option([0], "Seeds of the random controls of the induced "
                                             "row (ablated in the same routed model).")
    frontier_budgets: list[str] = option([], "Module budgets of the toxicity-fluency frontier "
                                         "(e.g. 0.25%, 0.5%, 1%, 2%): the headline's settings "
                                         "with `select: budget:P%` at each, and a random "
                                         "same-size set at each (seed: the first random "
                                         "seed).")
    aura_strengths: list[float] = option([], "AURA strengths alpha of the frontier, factor 1 - "
                                         "alpha x 2(AUROC - 0.5) (e.g. 0.5, 1, 2); alpha 1 is "
                                         "the `aura` row.")
    tp_reduction: float = option(3.0, "Target: the fine-tuned base's Toxicity Probability / the "
                                 "fine-tuned headline's, with every scorer.")
    ppl_tolerance: float = option(0.05, "Target: headline perplexity after fine-tuning at most "
                                  "(1 + this) x the fine-tuned base's.")
    fluency_tolerance: float = option(0.05, "Target: headline generation fluency (perplexity of "
                                      "its continuations under the judge) after fine-tuning at "
                                      "most (1 + this) x the fine-tuned base's.")
    blimp_tolerance: float = option(0.05, "Target: headline BLiMP accuracy after fine-tuning at "
                                    "least (1 - this) x the fine-tuned base's.")
    relearning_tolerance: float = option(0.10, "Target: toxicity after fine-tuning at most "
                                         "(1 + this) x after pruning.")
    random_tolerance: float = option(0.20, "Target: random controls' mean Toxicity Probability "
                                     "at least (1 - this) x the base model's.")


# A row name is a folder name inside OUT/rows: nothing that climbs out (`..`, `/`) or hides.
ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Settings a `modules:` entry may not set: prune's wired keys and those the rows set.
MODULE_WIRED = STAGES["prune"].wired_keys | {"stats", "mode", "count"}


@dataclass
class ModulesRow:
    """One `modules:` entry: its prune settings and the locate settings it needs."""

    name: str
    prune: PruneConfig
    locate: LocateConfig


@dataclass
class RelearnSection:
    """`relearn:` the attack's settings (RelearnConfig's) and which attacks run."""

    rows: list[str] | None
    """Rows attacked (None: base, the headline, aura, the first random control, induced)."""
    docs: list[int]
    masks: list[str]
    config: RelearnConfig


@dataclass
class CompareRecipe:
    name: str
    run: RunConfig
    collect: CollectConfig
    locate: LocateConfig
    eval: EvalConfig
    finetune: FinetuneConfig
    compare: CompareConfig
    modules: list[ModulesRow]
    induce: dict | None
    values: dict
    relearn: RelearnSection | None = None

    @property
    def headline(self) -> ModulesRow:
        return next(m for m in self.modules if m.name == (self.compare.headline
                                                           or self.modules[0].name))


def _section(values: dict, name: str) -> dict:
    given = values.get(name, {})
    if not isinstance(given, dict):
        raise LmpruneError(f"{name}: expected a mapping of settings, got {type(given).__name__}")
    return given


def parse_compare(values: dict, name: str) -> CompareRecipe:
    """Check every section by key and type (naming what is wrong) before any work."""
    top = {k: v for k, v in values.items() if k not in SECTIONS}
    run = build_config(RunConfig, top, where="recipe")

    def stage(kind: str, section: str, given: dict, wired: set[str] | None = None):
        cls = STAGES[kind].config
        bad = sorted((STAGES[kind].wired_keys if wired is None else wired) & set(given))
        if bad:
            raise LmpruneError(f"{section}.{bad[0]}: set by `lmprune compare`; remove it")
        if run.device and "device" in {f.name for f in dataclasses.fields(cls)}:
            given = {"device": run.device, **given}
        return build_config(cls, given, where=section)

    collect = stage("collect", "collect", _section(values, "collect"))
    finetune_values = values.get("finetune")
    locate_values = general_from_finetune(_section(values, "locate"), finetune_values)
    locate = stage("locate", "locate", locate_values)
    evaluation = stage("eval", "eval", _section(values, "eval"))
    if evaluation.fail_above or evaluation.fail_below:
        raise LmpruneError("eval.fail_above/fail_below: gates belong to `lmprune eval` and "
                           "`lmprune run`, not to a comparison")
    finetune = stage("finetune", "finetune", _section(values, "finetune"))
    compare = build_config(CompareConfig, _section(values, "compare"), where="compare")

    entries = _section(values, "modules")
    if not entries:
        raise LmpruneError("modules: name at least one module-pruning configuration, e.g. "
                           "`modules: {budget-1pct: {select: budget:1%}}`")
    rows = []
    for row_name, given in entries.items():
        where = f"modules.{row_name}"
        if not ROW_NAME.fullmatch(str(row_name)):
            raise LmpruneError(f"{where}: a row name becomes a folder under rows/: use letters, "
                               f"digits, '.', '_' and '-', starting with a letter or digit")
        if not isinstance(given, dict):
            raise LmpruneError(f"{where}: expected a mapping of prune settings")
        given = dict(given)
        overrides = given.pop("locate", None) or {}
        if not isinstance(overrides, dict):
            raise LmpruneError(f"{where}.locate: expected a mapping of locate settings")
        if not given.get("select"):
            raise LmpruneError(f"{where}.select: needed (e.g. budget:1% or top:3)")
        prune = stage("prune", where, given, MODULE_WIRED)
        row_locate = stage("locate", f"{where}.locate", {**locate_values, **overrides})
        rows.append(ModulesRow(str(row_name), dataclasses.replace(prune, mode="modules"),
                               row_locate))
    finetune = hold_out_general(finetune, finetune_values, [locate] + [r.locate for r in rows])
    names = [r.name for r in rows]
    if compare.headline is not None and compare.headline not in names:
        raise LmpruneError(f"compare.headline: '{compare.headline}' is not one of the modules: "
                           f"entries ({', '.join(names)})")
    for budget in compare.frontier_budgets:
        budget_share(budget)
    bad = [a for a in compare.aura_strengths if not 0 < a <= 2]  # also refuses NaN
    if bad:
        raise LmpruneError(f"compare.aura_strengths: {bad[0]} is not in (0, 2]")
    _check_profs_settings(compare)
    _check_act_settings(compare)
    _check_dpo_settings(compare)
    reserved = {"base", "aura", "top-auroc", "profs", "act", "dpo", "induced"}
    clash = [n for n in names if n in reserved or n.startswith(("random-", "frontier-"))]
    if clash:
        raise LmpruneError(f"modules.{clash[0]}: that row name is taken by a control; rename it")
    induce = values.get("induce")
    if induce is not None:
        induce = _check_induce(induce, run)
    recipe = CompareRecipe(name, run, collect, locate, evaluation, finetune, compare, rows,
                           induce, values)
    if values.get("relearn") is not None:
        recipe.relearn = _check_relearn(_section(values, "relearn"), run, recipe)
    return recipe


def _check_relearn(given: dict, run: RunConfig, recipe: CompareRecipe) -> RelearnSection:
    """The attack settings by key and type; rows, docs and masks as lists."""
    given = dict(given)
    wired = sorted(STAGES["relearn"].wired_keys & set(given))
    if wired:
        raise LmpruneError(f"relearn.{wired[0]}: set by `lmprune compare`; remove it")
    lists = {key: given.pop(key) for key in ("rows", "docs", "masks") if key in given}
    if run.device:
        given = {"device": run.device, **given}
    config = build_config(RelearnConfig, {**given, "model": "-", "out": "-"}, where="relearn")
    docs = lists.get("docs", [config.docs])
    masks = lists.get("masks", [config.masks])
    rows = lists.get("rows")
    for key, value in (("docs", docs), ("masks", masks), ("rows", rows)):
        if value is not None and (not isinstance(value, list) or not value):
            raise LmpruneError(f"relearn.{key}: expected a non-empty list")
    for n in docs:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise LmpruneError(f"relearn.docs: {n!r} is not a document count (at least 1)")
    for m in masks:
        if m not in ("held", "released"):
            raise LmpruneError(f"relearn.masks: '{m}' is not held or released")
    known = row_names(recipe)
    unknown = [r for r in rows or [] if r not in known]
    if unknown:
        raise LmpruneError(f"relearn.rows: '{unknown[0]}' is not a row of this comparison "
                           f"({', '.join(known)})")
    return RelearnSection(rows, docs, masks, config)


UNMASKED = {"base", "aura", "profs", "act", "dpo"}  # rows that zero no neuron


def relearn_rows(recipe: CompareRecipe) -> list[str]:
    """The rows the attack runs on, in table order."""
    section = recipe.relearn
    if section is None:
        return []
    if section.rows is not None:
        return section.rows
    names = row_names(recipe)
    wanted = {"base", recipe.headline.name, "aura", "profs", "act", "dpo", "induced",
              *[f"random-{s}" for s in recipe.compare.random_seeds[:1]]}
    return [n for n in names if n in wanted]


def relearn_attacks(recipe: CompareRecipe) -> list[tuple[str, int, str]]:
    """(row, docs, masks) of every attack; released masks only where neurons were zeroed (the
    base, AURA, ProFS, Linear-AcT and DPO have none to release)."""
    if recipe.relearn is None:
        return []
    return [(row, n, masks) for row in relearn_rows(recipe) for n in recipe.relearn.docs
            for masks in recipe.relearn.masks
            if masks == "held" or row not in UNMASKED and not row.startswith("frontier-aura")]


def profs_config(compare: CompareConfig, model: str, out: str, device: str) -> ProfsConfig:
    """The `profs` row's settings: `compare.profs_KEY` is `lmprune profs --KEY`."""
    return ProfsConfig(model=model, out=out, pairs=compare.profs_pairs,
                       max_pairs=compare.profs_max_pairs, rank=compare.profs_rank,
                       layers=compare.profs_layers, device=device)


def _row_errors(row: str, check) -> None:
    """Run `check`, naming a bad setting as its recipe key (compare.profs_rank, ...)."""
    try:
        check()
    except ConfigError as err:
        raise LmpruneError(f"compare.{row}_{err.key}: {err.problem}") from None
    except LmpruneError as err:
        raise LmpruneError(f"compare.{row}: {err}") from None


def _check_profs_settings(compare: CompareConfig) -> None:
    from lmprune.methods.profs import check_config

    _row_errors("profs", lambda: check_config(profs_config(compare, "-", "-", "cpu")))


def _check_profs_inputs(recipe: CompareRecipe) -> None:
    """The pairs, layers and rank of the `profs` row against the model's config (no weights)."""
    from lmprune.core.arch import NeuronMap
    from lmprune.core.models import skeleton
    from lmprune.methods.profs import check_model, read_pairs

    cfg = profs_config(recipe.compare, recipe.run.model, "-", "cpu")
    _row_errors("profs", lambda: (read_pairs(cfg),
                                  check_model(cfg, NeuronMap(skeleton(cfg.model)))))


def act_config(recipe: CompareRecipe, model: str, out: str, device: str) -> ActConfig:
    """The `act` row's settings: `compare.act_KEY` is `lmprune act --KEY`; the corpora default to
    the collect section's."""
    compare = recipe.compare
    return ActConfig(model=model, out=out, offensive=compare.act_offensive or
                     recipe.collect.offensive, clean=compare.act_clean or recipe.collect.clean,
                     max_docs=compare.act_max_docs, strength=compare.act_strength,
                     layers=compare.act_layers, device=device)


def _check_act_settings(compare: CompareConfig) -> None:
    from lmprune.methods.act import check_config

    _row_errors("act", lambda: check_config(ActConfig(
        model="-", out="-", max_docs=compare.act_max_docs, strength=compare.act_strength,
        layers=compare.act_layers)))


def _check_act_inputs(recipe: CompareRecipe) -> None:
    """The corpora, layers and architecture of the `act` row against the model's config (no
    weights)."""
    from lmprune.core.arch import NeuronMap
    from lmprune.core.models import skeleton
    from lmprune.methods.act import check_model, read_corpora

    cfg = act_config(recipe, recipe.run.model, "-", "cpu")
    _row_errors("act", lambda: (check_model(cfg, NeuronMap(skeleton(cfg.model))),
                                read_corpora(cfg, quiet=True)))


def dpo_config(compare: CompareConfig, model: str, out: str, device: str) -> DpoConfig:
    """The `dpo` row's settings: `compare.dpo_KEY` is `lmprune dpo --KEY`."""
    return DpoConfig(model=model, out=out, pairs=compare.dpo_pairs,
                     max_pairs=compare.dpo_max_pairs, beta=compare.dpo_beta, lr=compare.dpo_lr,
                     max_steps=compare.dpo_max_steps, batch_size=compare.dpo_batch_size,
                     device=device)


def _check_dpo_settings(compare: CompareConfig) -> None:
    from lmprune.methods.dpo import check_config

    _row_errors("dpo", lambda: check_config(dpo_config(compare, "-", "-", "cpu")))


def _check_dpo_inputs(recipe: CompareRecipe) -> None:
    """The pairs of the `dpo` row: enough for a batch beside the held-out ones."""
    from lmprune.methods.dpo import read_pairs

    _row_errors("dpo", lambda: read_pairs(dpo_config(recipe.compare, recipe.run.model, "-",
                                                     "cpu")))


def _check_induce(given, run: RunConfig) -> dict:
    from lmprune.induce.command import InduceConfig

    if not isinstance(given, dict):
        raise LmpruneError("induce: expected a mapping of `lmprune induce` settings")
    wired = sorted(STAGES["induce"].wired_keys & set(given))
    if wired:
        raise LmpruneError(f"induce.{wired[0]}: set by `lmprune compare`; remove it")
    if run.device and "device" in {f.name for f in dataclasses.fields(InduceConfig)}:
        given = {"device": run.device, **given}
    build_config(InduceConfig, {**given, "model": run.model, "out": "-"}, where="induce")
    return given


def load_compare(path: str | Path, overrides: list[str] = (), out: str | None = None,
                 check_files: bool = True) -> CompareRecipe:
    """Read, override, validate; `check_files` also looks up the model and local corpora."""

    recipe = load_recipe(path, overrides, out, check_files, parse=parse_compare,
                         sections=SECTIONS)
    if check_files and recipe.compare.profs:
        _check_profs_inputs(recipe)
    if check_files and recipe.compare.act:
        _check_act_inputs(recipe)
    if check_files and recipe.compare.dpo:
        _check_dpo_inputs(recipe)
    return recipe


# --------------------------------------------------------------------------------------------
# Stages


class CompareFolder(RunFolder):
    """A run folder with one sub-folder per row: model/, eval.json, finetuned/, eval-ft.json."""

    def row(self, name: str) -> Path:
        return self.root / "rows" / name

    def row_model(self, name: str) -> Path:
        return self.row(name) / "model"

    def row_eval(self, name: str, tuned: bool) -> Path:
        return self.row(name) / ("eval-finetuned.json" if tuned else "eval.json")

    def relearn(self, name: str, docs: int, masks: str) -> Path:
        return self.row(name) / f"relearn-{docs}-{masks}"

    @property
    def induced_routed(self) -> Path:
        return self.root / "induced-routed"

    @property
    def induced_routed_eval(self) -> Path:
        return self.root / "induced-routed-eval.json"

    def modules_for(self, locate: LocateConfig, default: LocateConfig) -> Path:
        if locate == default:
            return self.modules
        return self.root / f"modules-{digest(dataclasses.asdict(locate))[:10]}.json"


def budget_rows(recipe: CompareRecipe, budget: str) -> tuple[str, str | None]:
    """(module row, random row) of one frontier budget: the headline and its first random
    control where the budget is the headline's own, new frontier rows otherwise."""
    seeds = recipe.compare.random_seeds
    if f"budget:{budget.strip()}" == recipe.headline.prune.select:
        return recipe.headline.name, (f"random-{seeds[0]}" if seeds else None)
    slug = budget.strip().replace("%", "pct")
    return f"frontier-modules-{slug}", f"frontier-random-{slug}"


def aura_row(recipe: CompareRecipe, alpha: float) -> str:
    return "aura" if alpha == 1 and recipe.compare.aura else f"frontier-aura-{alpha:g}"


def frontier(recipe: CompareRecipe) -> dict[str, list[tuple[float, str]]]:
    """Each method's frontier points as (strength, row name), weakest first: module budgets and
    random sets as shares of the neurons, AURA by alpha; the base is every method's strength-0
    point. Points that coincide with a table row reuse it."""
    points: dict[str, list[tuple[float, str]]] = {"modules": [], "random": [], "aura": []}
    for budget in recipe.compare.frontier_budgets:
        modules, random = budget_rows(recipe, budget)
        points["modules"].append((budget_share(budget), modules))
        if random is not None:
            points["random"].append((budget_share(budget), random))
    points["aura"] = [(alpha, aura_row(recipe, alpha)) for alpha in recipe.compare.aura_strengths]
    return {method: [(0.0, "base"), *sorted(p)] for method, p in points.items() if p}


def budget_share(budget: str) -> float:
    """A frontier budget as a share of all MLP neurons ('0.5%' -> 0.005)."""
    text = budget.strip()
    try:
        value = float(text.removesuffix("%"))
    except ValueError:
        value = float("nan")
    if not text.endswith("%") or not 0 < value <= 100:  # also refuses NaN
        raise LmpruneError(f"compare.frontier_budgets: '{budget}' is not a share of the "
                           f"neurons such as 0.5%")
    return value / 100


def row_names(recipe: CompareRecipe) -> list[str]:
    """Every row in table order."""
    names = ["base", *(m.name for m in recipe.modules)]
    names += [f"random-{s}" for s in recipe.compare.random_seeds]
    if recipe.compare.aura:
        names.append("aura")
    if recipe.compare.top_auroc:
        names.append("top-auroc")
    if recipe.compare.profs:
        names.append("profs")
    if recipe.compare.act:
        names.append("act")
    if recipe.compare.dpo:
        names.append("dpo")
    if recipe.induce is not None:
        names += ["induced", *(f"induced-random-{s}" for s in recipe.compare.induced_random_seeds)]
    for points in frontier(recipe).values():
        names += [name for _, name in points if name not in names]
    return names
