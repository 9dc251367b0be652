"""The recipe of `lmprune run`: top-level settings and one section per stage, validated before
any work; the run folder's paths; which evaluations a run makes and which it sets side by side.

A recipe is YAML: top-level `model` and `out` (and optionally `device`, applied to every stage
that has one), and one section per stage whose keys are that stage's config fields (the flags of
`lmprune STAGE --help`, with underscores). The runner fills in the fields that wire the stages
together (model, out, stats, module and checkpoint paths); a recipe may not set those.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmprune.collect import CollectConfig
from lmprune.core.config import build_config, corpus_fields, load_yaml, option
from lmprune.core.errors import LmpruneError
from lmprune.evaluate.command import EvalConfig
from lmprune.finetune.command import FinetuneConfig
from lmprune.locate.command import LocateConfig
from lmprune.prune.command import PruneConfig
from lmprune.run.runner import StageFolder
from lmprune.stages import STAGES


@dataclass
class RunConfig:
    """Top-level keys of a recipe."""

    model: str = option("smollm2-135m", "Model: Hub id, local folder, .gguf file or bundled "
                        "alias.")
    out: str | None = option(None, "Run folder (default: runs/<recipe name>).")
    device: str | None = option(None, "Device for every stage that has one (a section's own "
                                "`device` wins).")
    title: str | None = option(None, "Title of the report.")


@dataclass
class ControlConfig:
    """`control:` the random same-size controls (per-layer counts of the pruned model)."""

    seeds: list[int] = option([0], "One random control checkpoint per seed ([] for none).")
    finetune: bool = option(False, "Fine-tune the controls too, with the `finetune:` settings "
                            "(without the relearning curve).")
    finetune_base: bool = option(True, "Fine-tune the unpruned base model too, with the same "
                                 "`finetune:` settings: the reference the fine-tuned model is "
                                 "measured against (fine-tuning alone moves toxicity and "
                                 "perplexity).")


@dataclass
class ReportConfig:
    """`report:` what the report shows."""

    examples: int = option(3, "Prompts shown with their continuations before and after.")
    toxicity_factor: float = option(3.0, "Verdict target: the final model's Toxicity "
                                    "Probability at least this many times below the base "
                                    "treated the same way, per scorer.")
    fluency_tolerance: float = option(0.05, "Verdict target: perplexity, generation fluency and "
                                      "BLiMP within this share of the base treated the same "
                                      "way.")


@dataclass
class TransferConfig:
    """`transfer:` prompt sets beyond the dev prompts the selection was tuned on."""

    prompts: list[str] = option([], "Prompt corpora the final model, the base treated the same "
                                "way and the first random control treated the same way are also "
                                "evaluated on (toxicity and generation fluency, the `eval:` "
                                "protocol otherwise), e.g. rtp:nontoxic.", corpus=True)
    limit: int | None = option(100, "Prompts of each set used (the first N).")


# the registered stages a run chains (lmprune/stages.py), and its other sections
SECTIONS: dict[str, type] = {
    "collect": STAGES["collect"].config, "locate": STAGES["locate"].config,
    "prune": STAGES["prune"].config, "control": ControlConfig, "eval": STAGES["eval"].config,
    "finetune": STAGES["finetune"].config, "report": ReportConfig, "transfer": TransferConfig,
}
# Fields the runner sets (each stage's wired keys); a recipe that sets them is refused.
WIRED: dict[str, set[str]] = {name: STAGES[name].wired_keys for name in SECTIONS
                              if name in STAGES}


# --------------------------------------------------------------------------------------------
# Recipes


@dataclass
class Recipe:
    """A validated recipe: top-level settings and one config per stage section."""

    name: str
    run: RunConfig
    collect: CollectConfig
    locate: LocateConfig
    prune: PruneConfig
    control: ControlConfig
    eval: EvalConfig
    finetune: FinetuneConfig | None
    report: ReportConfig
    transfer: TransferConfig
    values: dict = field(default_factory=dict)
    """The recipe after --set overrides, as read (for the record in the run folder)."""


def apply_overrides(values: dict, overrides: list[str], sections=SECTIONS) -> dict:
    """`key=value` (top level) or `section.key=value`, at any depth (a comparison's
    `modules.NAME.select=top:2`); values read as YAML. A section left empty (null) becomes one."""
    values = copy.deepcopy(values)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = [part.strip() for part in key.split(".")]
        if not sep or not all(parts):
            raise LmpruneError(f"--set '{item}': expected KEY=VALUE, e.g. collect.max_docs=200")
        if len(parts) > 1 and parts[0] not in sections:
            raise LmpruneError(f"--set {key}: unknown section '{parts[0]}'; sections: "
                               f"{', '.join(sections)}")
        target = values
        for part in parts[:-1]:
            if target.get(part) is None:
                target[part] = {}
            target = target[part]
            if not isinstance(target, dict):
                raise LmpruneError(f"--set {key}: '{part}' is not a section")
        try:
            target[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            target[parts[-1]] = text
    return values


def parse_recipe(values: dict, name: str) -> Recipe:
    """Check keys and types of every section (naming the key that is wrong) and wire nothing."""
    top = {k: v for k, v in values.items() if k not in SECTIONS}
    run = build_config(RunConfig, top, where="recipe")
    configs = {}
    for section, cls in SECTIONS.items():
        given = values.get(section, {})
        if given is None and section == "finetune":
            configs[section] = None
            continue
        if not isinstance(given, dict):
            raise LmpruneError(f"{section}: expected a mapping of settings, got "
                               f"{type(given).__name__}")
        wired = sorted(WIRED.get(section, set()) & set(given))
        if wired:
            raise LmpruneError(f"{section}.{wired[0]}: set by `lmprune run` (it wires the stages "
                               f"together); remove it from the recipe")
        if run.device and "device" in {f.name for f in dataclasses.fields(cls)}:
            given = {"device": run.device, **given}
        if section == "locate":
            given = general_from_finetune(given, values.get("finetune"))
        configs[section] = build_config(cls, given, where=section)
    if "finetune" not in values:
        configs["finetune"] = None
    configs["finetune"] = hold_out_general(configs["finetune"], values.get("finetune"),
                                           [configs["locate"]])
    _check_options(configs["prune"], configs["eval"])
    return Recipe(name=name, run=run, values=values, **configs)


def general_from_finetune(locate: dict, finetune: dict | None) -> dict:
    """locate's settings with `general` defaulting to the fine-tuning corpus: general damage
    is measured on the text the model is then tuned on."""
    if isinstance(finetune, dict) and finetune.get("data"):
        return {"general": finetune["data"], **locate}
    return locate


def hold_out_general(finetune: FinetuneConfig | None, given: dict | None,
                     locates: list[LocateConfig]) -> FinetuneConfig | None:
    """Fine-tuning leaves out the general-text documents `locate` scored modules on (the last
    `general_docs` of the fine-tuning corpus), unless the recipe says otherwise."""
    if finetune is None or "holdout_last" in (given or {}):
        return finetune
    scored = [cfg.general_docs for cfg in locates if cfg.general == finetune.data]
    return dataclasses.replace(finetune, holdout_last=max(scored, default=0))


def _check_options(prune: PruneConfig, evaluation: EvalConfig) -> None:
    """Values the stages would refuse only once they start."""
    from lmprune.evaluate.command import parse_gates
    from lmprune.prune.command import parse_select

    if prune.mode == "random":
        raise LmpruneError("prune.mode: random is the control; set `control.seeds` instead")
    if prune.mode == "modules" and not prune.select:
        raise LmpruneError("prune.select: needed (e.g. top:3 or budget:1%)")
    if prune.select:
        try:
            parse_select(prune.select)
        except LmpruneError as err:
            raise LmpruneError(f"prune.select: {err}") from None
    try:
        parse_gates(evaluation.fail_above, evaluation.fail_below)
    except LmpruneError as err:
        raise LmpruneError(f"eval: {err}") from None


def check_inputs(recipe: Recipe) -> None:
    """Refuse a missing model or local corpus file, and bad stage options, before any work."""
    from lmprune.core.models import load_config
    from lmprune.evaluate.command import SKIP

    try:
        load_config(recipe.run.model, recipe.collect.revision, recipe.collect.trust_remote_code)
    except LmpruneError as err:
        raise LmpruneError(f"model: {err}") from None
    for section in SECTIONS:
        config = getattr(recipe, section, None)  # a comparison has no prune section
        if config is None:
            continue
        for key in corpus_fields(type(config)):
            specs = getattr(config, key)
            for spec in specs if isinstance(specs, list) else [specs]:
                if spec and spec.lower() != SKIP:
                    _check_corpus(f"{section}.{key}", spec)


def _check_corpus(where: str, spec: str) -> None:
    from lmprune.core.data import NAMED, mix_parts, resolve_spec

    for part in mix_parts(spec):
        source = resolve_spec(part).partition("?")[0]
        if source.startswith("hf:"):
            continue
        if not Path(source).expanduser().is_file():
            hint = (" (set LMPRUNE_DATA_DIR to the folder of the shared data sets)"
                    if part.partition("?")[0] in NAMED else "")
            raise LmpruneError(f"{where}: corpus file not found: {source}{hint}")


def load_recipe(path: str | Path, overrides: list[str] = (), out: str | None = None,
                check_files: bool = True, parse=None, sections=SECTIONS) -> Recipe:
    """Read, override, validate. `check_files=False` checks keys and types only (no model or
    corpus lookups: for recipes meant for the Hub). `parse` and `sections` are `lmprune run`'s
    unless given (`lmprune compare` gives its own)."""
    path = Path(path)
    values = apply_overrides(load_yaml(path), list(overrides), sections)
    if out is not None:
        values["out"] = out
    recipe = (parse or parse_recipe)(values, path.stem)
    if recipe.run.out is None:
        recipe.run.out = str(Path("runs") / path.stem)
    if check_files:
        check_inputs(recipe)
    return recipe


# --------------------------------------------------------------------------------------------
# The run folder and its evaluations


class RunFolder(StageFolder):
    """Paths of one run and its stage markers."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self.stats = self.root / "stats"
        self.modules = self.root / "modules.json"
        self.pruned = self.root / "pruned"
        self.finetuned = self.root / "finetuned"
        self.base_finetuned = self.root / "base-finetuned"
        self.evals = self.root / "eval"
        self.report = self.root / "report.md"

    def control(self, seed: int, tuned: bool = False) -> Path:
        return self.root / (f"control-{seed}" + ("-finetuned" if tuned else ""))

    def eval_json(self, target: str) -> Path:
        return self.evals / f"{target}.json"


def eval_targets(recipe: Recipe, folder: RunFolder) -> list[tuple[str, str]]:
    """(name, model) of every evaluation, in order; the last is the final one."""
    seeds = recipe.control.seeds
    targets = [("base", recipe.run.model), ("pruned", str(folder.pruned))]
    targets += [(f"control-{s}", str(folder.control(s))) for s in seeds]
    if recipe.finetune is not None:
        targets.append(("finetuned", str(folder.finetuned)))
        if recipe.control.finetune_base:
            targets.append(("base-finetuned", str(folder.base_finetuned)))
        if recipe.control.finetune:
            targets += [(f"control-{s}-finetuned", str(folder.control(s, True))) for s in seeds]
    return targets


def final_target(recipe: Recipe) -> str:
    return "finetuned" if recipe.finetune is not None else "pruned"


def like_targets(recipe: Recipe) -> dict[str, str | None]:
    """The final model and its likes, treated the same way: {role: eval target name}."""
    final = final_target(recipe)
    tuned = "-finetuned" if final == "finetuned" else ""
    seeds = recipe.control.seeds
    if tuned:  # the likes exist only where the recipe fine-tunes them too
        base = "base-finetuned" if recipe.control.finetune_base else None
        control = f"control-{seeds[0]}{tuned}" if seeds and recipe.control.finetune else None
    else:
        base, control = "base", f"control-{seeds[0]}" if seeds else None
    return {"result": final, "base": base, "control": control}


def transfer_name(target: str, prompts: str) -> str:
    """The eval target name of `target` on another prompt set (a file-name-safe slug)."""
    name = Path(prompts.partition("?")[0]).name  # a file's or dataset's own name
    name = Path(name).stem if Path(name).suffix in {".txt", ".jsonl", ".tsv", ".csv"} else name
    return f"{target}@{''.join(c if c.isalnum() else '-' for c in name).strip('-')}"
