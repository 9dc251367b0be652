"""`lmprune run RECIPE`: collect -> locate -> prune (+ random controls) -> evaluate -> fine-tune ->
evaluate -> report, in one run folder.

A recipe is YAML: top-level `model` and `out` (and optionally `device`, applied to every stage
that has one), and one section per stage whose keys are that stage's config fields (the flags of
`lmprune STAGE --help`, with underscores). The runner fills in the fields that wire the stages
together (model, out, stats, module and checkpoint paths); a recipe may not set those.

Every stage leaves a marker `OUT/.stages/NAME.json`: written "started" (with the stage's key)
before it runs and "done" after, atomically. The key hashes the stage's config and its inputs
(corpus files, upstream manifests, module maps, checkpoint weights). A stage whose marker is done
with the same key, and whose outputs exist, is skipped. A stage that was killed reruns; collect
and fine-tune resume from their own checkpoints when the key is unchanged, and start over when it
changed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmprune.collect import CollectConfig
from lmprune.config import build_config, load_yaml, option
from lmprune.errors import ConfigError, LmpruneError
from lmprune.evaluate.command import EvalConfig
from lmprune.finetune import FinetuneConfig
from lmprune.io import check_out_dir, write_text_atomic
from lmprune.locate.run import LocateConfig
from lmprune.lock import folder_lock
from lmprune.prune import PruneConfig

MARKERS = ".stages"
# Settings that change how a stage treats its output path, not what it computes.
UNHASHED = {"overwrite"}


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
                                "protocol otherwise), e.g. rtp:nontoxic.")
    limit: int | None = option(100, "Prompts of each set used (the first N).")


SECTIONS: dict[str, type] = {
    "collect": CollectConfig, "locate": LocateConfig, "prune": PruneConfig,
    "control": ControlConfig, "eval": EvalConfig, "finetune": FinetuneConfig,
    "report": ReportConfig, "transfer": TransferConfig,
}
# Fields the runner sets; a recipe that sets them is refused.
WIRED: dict[str, set[str]] = {
    "collect": {"model", "out", "resume"},
    "locate": {"model", "stats", "out"},
    "prune": {"model", "out", "modules", "like", "seed"},
    "eval": {"model", "json"},
    "finetune": {"model", "out", "base_model"},
}
# Corpus specs a recipe names, checked before any work starts.
CORPUS_KEYS: dict[str, list[str]] = {
    "collect": ["offensive", "clean"],
    "locate": ["general"],
    "prune": ["offensive", "clean"],
    "eval": ["prompts", "ppl_data"],
    "finetune": ["data", "eval_prompts", "ppl_data"],
    "transfer": ["prompts"],
}


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
    from lmprune.prune import parse_select

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
    from lmprune.evaluate.command import SKIP
    from lmprune.models import load_config

    try:
        load_config(recipe.run.model, recipe.collect.revision, recipe.collect.trust_remote_code)
    except LmpruneError as err:
        raise LmpruneError(f"model: {err}") from None
    for section, keys in CORPUS_KEYS.items():
        config = getattr(recipe, section, None)  # a comparison has no prune section
        if config is None:
            continue
        for key in keys:
            specs = getattr(config, key)
            for spec in specs if isinstance(specs, list) else [specs]:
                if spec and spec.lower() != SKIP:
                    _check_corpus(f"{section}.{key}", spec)


def _check_corpus(where: str, spec: str) -> None:
    from lmprune.data import NAMED, mix_parts, resolve_spec

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
# Hashes of inputs


def digest(payload) -> str:
    """The sha256 of a JSON-able value (keys sorted): stage keys and content-named files."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def path_hash(path: str | Path) -> str:
    """A file's content hash; for a stats folder its manifest; for a checkpoint its weights and
    lmprune.json."""
    from lmprune.models import file_sha256, folder_weights_sha256

    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if (path / "manifest.json").is_file():
        return file_sha256(path / "manifest.json")
    if (path / "config.json").is_file():
        lineage = path / "lmprune.json"
        files = sorted(p for p in path.iterdir() if p.is_file())
        # Weights are hashed once per process and version of the files (several stages read
        # the same checkpoint).
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if stamp not in _WEIGHT_HASHES:
            _WEIGHT_HASHES[stamp] = digest([folder_weights_sha256(path),
                                             file_sha256(lineage) if lineage.is_file() else None])
        return _WEIGHT_HASHES[stamp]
    return "missing"


_WEIGHT_HASHES: dict[tuple, str] = {}


def source_hash(spec: str) -> str:
    """A model name or corpus spec: its local file's hash where it has one, else the text."""
    from lmprune.data import resolve_spec

    source = Path(resolve_spec(spec).partition("?")[0]).expanduser()
    return digest([spec, path_hash(source)]) if source.exists() else spec


# --------------------------------------------------------------------------------------------
# Stages


@dataclass
class Stage:
    name: str
    config: object
    action: Callable[[bool], object]
    """Runs the stage; its argument says whether a killed run with the same key may resume."""
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    """Upstream outputs (hashed into the key when the stage is reached)."""
    sources: list[str] = field(default_factory=list)
    """Model names and corpus specs (hashed by content where local)."""

    def key(self, root: Path) -> str:
        """Hash of the settings and inputs. Paths inside the run folder count relative to it,
        so a moved or copied run folder is still up to date."""
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) \
            else self.config
        config = {k: v for k, v in config.items() if k not in UNHASHED}
        text = json.dumps({"stage": self.name, "config": config}, sort_keys=True, default=str)
        return digest({"settings": text.replace(str(root), "<run>"),
                        "inputs": [path_hash(p) for p in self.inputs],
                        "sources": [source_hash(s) for s in self.sources]})


class RunFolder:
    """Paths of one run and its stage markers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
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

    def marker(self, stage: str) -> Path:
        return self.root / MARKERS / f"{stage.replace(':', '-')}.json"

    def read_marker(self, stage: str) -> dict | None:
        path = self.marker(stage)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    def write_marker(self, stage: str, payload: dict) -> None:
        write_text_atomic(self.marker(stage), json.dumps(payload, indent=1, default=str) + "\n")


def _exists(path: Path) -> bool:
    if path.suffix:  # a file
        return path.is_file()
    return (path / "manifest.json").is_file() or (path / "config.json").is_file()


def eval_targets(recipe: Recipe, folder: RunFolder) -> list[tuple[str, str, list[Path]]]:
    """(name, model, upstream paths) of every evaluation, in order; the last is the final one."""
    seeds = recipe.control.seeds
    targets = [("base", recipe.run.model, []), ("pruned", str(folder.pruned), [folder.pruned])]
    targets += [(f"control-{s}", str(folder.control(s)), [folder.control(s)]) for s in seeds]
    if recipe.finetune is not None:
        targets.append(("finetuned", str(folder.finetuned), [folder.finetuned]))
        if recipe.control.finetune_base:
            targets.append(("base-finetuned", str(folder.base_finetuned),
                            [folder.base_finetuned]))
        if recipe.control.finetune:
            targets += [(f"control-{s}-finetuned", str(folder.control(s, True)),
                         [folder.control(s, True)]) for s in seeds]
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


def plan_stages(recipe: Recipe, folder: RunFolder) -> list[Stage]:
    from lmprune.collect import run_collect
    from lmprune.evaluate.command import SKIP, evaluate, summary
    from lmprune.finetune import build_evaluator, finetune
    from lmprune.locate.run import run as run_locate
    from lmprune.prune import run as run_prune
    from lmprune.report import write_run_report

    model = recipe.run.model
    replace = dataclasses.replace
    stages = []

    collect = replace(recipe.collect, model=model, out=str(folder.stats))
    stages.append(Stage(
        "collect", collect, lambda resume: run_collect(replace(collect, resume=resume)),
        [folder.stats], sources=[model, collect.offensive, collect.clean]))

    locate_cfg = replace(recipe.locate, model=model, stats=str(folder.stats),
                         out=str(folder.modules))
    stages.append(Stage("locate", locate_cfg, lambda resume: run_locate(locate_cfg),
                        [folder.modules], [folder.stats], [model]))

    prune_cfg = replace(recipe.prune, model=model, out=str(folder.pruned),
                        modules=str(folder.modules),
                        stats=recipe.prune.stats or str(folder.stats))
    prune_sources = [model] + [s for s in (prune_cfg.offensive, prune_cfg.clean) if s]
    stages.append(Stage("prune", prune_cfg, lambda resume: run_prune(prune_cfg),
                        [folder.pruned], [folder.modules, folder.stats], prune_sources))

    for seed in recipe.control.seeds:
        control = replace(prune_cfg, mode="random", like=str(folder.pruned), seed=seed,
                          out=str(folder.control(seed)))
        stages.append(Stage(f"control-{seed}", control,
                            lambda resume, c=control: run_prune(c),
                            [folder.control(seed)], [folder.pruned], [model]))

    def eval_stage(target: str, target_model: str, upstream: list[Path], **changes) -> Stage:
        final = target == final_target(recipe)
        cfg = replace(recipe.eval, model=target_model, json=str(folder.eval_json(target)),
                      fail_above=recipe.eval.fail_above if final else [],
                      fail_below=recipe.eval.fail_below if final else [], **changes)

        def action(resume: bool):
            print(summary(evaluate(cfg)))

        # a run-folder checkpoint is an input (hashed by content); the base model a source
        models = [] if upstream else [target_model]
        return Stage(f"eval:{target}", cfg, action, [folder.eval_json(target)], upstream,
                     [*models, cfg.prompts, cfg.ppl_data])

    targets = eval_targets(recipe, folder)
    tuned_targets = [t for t in targets if t[0].endswith("finetuned")]
    for target in targets:
        if target not in tuned_targets:
            stages.append(eval_stage(*target))
    # the final model and its likes on the prompts the selection never saw
    by_name = {name: (target_model, upstream) for name, target_model, upstream in targets}
    transfers = []
    for prompts in recipe.transfer.prompts:
        for target in filter(None, like_targets(recipe).values()):
            transfers.append(eval_stage(transfer_name(target, prompts), *by_name[target],
                                        prompts=prompts, limit=recipe.transfer.limit,
                                        perplexity=False, blimp=SKIP))

    if recipe.finetune is not None:
        # (model, out, stage, upstream): the base model is a source, the checkpoints inputs
        pairs = [(str(folder.pruned), folder.finetuned, "finetune", [folder.pruned])]
        if recipe.control.finetune_base:
            pairs.append((model, folder.base_finetuned, "finetune:base", []))
        if recipe.control.finetune:
            pairs += [(str(folder.control(s)), folder.control(s, True), f"finetune:control-{s}",
                       [folder.control(s)]) for s in recipe.control.seeds]
        for source, out, name, upstream in pairs:
            cfg = replace(recipe.finetune, model=source, out=str(out), base_model=model)
            if out != folder.finetuned:  # references: same training, no relearning curve
                cfg = replace(cfg, eval_every=0)

            def tune(resume: bool, cfg=cfg):
                if not resume:  # other settings than the killed run: start over
                    shutil.rmtree(Path(cfg.out) / "checkpoints", ignore_errors=True)
                finetune(cfg, build_evaluator(cfg))

            stages.append(Stage(name, cfg, tune, [out], upstream,
                                [model, cfg.data, cfg.eval_prompts, cfg.ppl_data]))
        for target in tuned_targets:
            stages.append(eval_stage(*target))
    stages += transfers

    report_inputs = ([folder.eval_json(t[0]) for t in targets] + [folder.modules, folder.pruned]
                     + [stage.outputs[0] for stage in transfers])
    if recipe.finetune is not None:
        report_inputs.append(folder.finetuned)
    stages.append(Stage(
        "report", {"report": dataclasses.asdict(recipe.report), "title": recipe.run.title},
        lambda resume: write_run_report(folder, recipe), [folder.report], report_inputs))
    return stages


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def execute_stages(stages: list[Stage], folder: RunFolder, command: str = "run") -> float:
    """Run each stage whose marker is not done with the same key; returns the wall seconds."""
    started_all = time.time()
    for number, stage in enumerate(stages, 1):
        tag = f"[{number}/{len(stages)}] {stage.name}"
        key = stage.key(folder.root)
        marker = folder.read_marker(stage.name) or {}
        if (marker.get("state") == "done" and marker.get("key") == key
                and all(_exists(p) for p in stage.outputs)):
            print(f"lmprune {command}: {tag}: skipped (up to date)", flush=True)
            continue
        resume = marker.get("state") == "started" and marker.get("key") == key
        folder.write_marker(stage.name, {"stage": stage.name, "state": "started", "key": key,
                                         "time": _now()})
        print(f"lmprune {command}: {tag}: {'resumed' if resume else 'started'}", flush=True)
        t0 = time.time()
        stage.action(resume)
        seconds = time.time() - t0
        folder.write_marker(stage.name, {
            "stage": stage.name, "state": "done", "key": key, "time": _now(),
            "seconds": round(seconds, 1), "outputs": [str(p) for p in stage.outputs],
            "config": dataclasses.asdict(stage.config) if dataclasses.is_dataclass(stage.config)
            else stage.config})
        print(f"lmprune {command}: {tag}: done in {duration(seconds)}", flush=True)
    return time.time() - started_all


def check_stages(stages: list[Stage]) -> None:
    """What the stages would refuse only once they are reached, checked before the first: each
    fine-tuning's and evaluation's settings (named by recipe key, `finetune.batch_size`), and
    every scorer and fluency judge they name, loaded once."""
    from lmprune.evaluate import command as evaluate
    from lmprune.evaluate.fluency import BASE_JUDGE
    from lmprune.evaluate.scorers import load_scorer
    from lmprune.finetune import check_finetune_config
    from lmprune.models import load_config, resolve_device

    scorers: dict[tuple[str, str], str] = {}  # (spec, device) -> recipe key
    judges: dict[str, str] = {}
    for stage in stages:
        section, cfg = stage.name.partition(":")[0], stage.config
        try:
            if isinstance(cfg, FinetuneConfig):
                check_finetune_config(cfg)
                if cfg.eval_every > 0:
                    scorers.setdefault((cfg.scorer, cfg.device), f"{section}.scorer")
            elif isinstance(cfg, EvalConfig):
                evaluate.check_config(cfg)
                if cfg.toxicity and cfg.prompts.lower() != evaluate.SKIP:
                    for spec in [cfg.scorer, *cfg.extra_scorers]:
                        key = "scorer" if spec == cfg.scorer else "extra_scorers"
                        scorers.setdefault((spec, cfg.device), f"{section}.{key}")
                    if cfg.fluency_judge.lower() not in (evaluate.SKIP, BASE_JUDGE):
                        judges.setdefault(cfg.fluency_judge, f"{section}.fluency_judge")
        except ConfigError as err:
            raise LmpruneError(err.recipe_message(section)) from None
        except LmpruneError as err:
            raise LmpruneError(f"{section}: {err}") from None
    for (spec, device), key in scorers.items():
        try:
            load_scorer(spec, device=resolve_device(device))
        except LmpruneError as err:
            raise LmpruneError(f"{key}: scorer '{spec}' cannot be loaded: {err}") from None
    for name, key in judges.items():
        try:
            load_config(name)
        except LmpruneError as err:
            raise LmpruneError(f"{key}: {err}") from None


def record_recipe(folder: RunFolder, values: dict) -> None:
    """The recipe as run (after overrides), beside the results."""
    folder.root.mkdir(parents=True, exist_ok=True)
    record = folder.root / "recipe.yaml"
    text = yaml.safe_dump(values, sort_keys=False)
    if not record.is_file() or record.read_text(encoding="utf-8") != text:
        write_text_atomic(record, text)


def run_pipeline(recipe: Recipe, overwrite: bool = False) -> int:
    """Run (or skip) every stage of the recipe; returns the exit code (1: a gate failed)."""
    from lmprune.evaluate.command import gate_failures

    folder = RunFolder(recipe.run.out)
    check_out_dir(folder.root, "run", overwrite)
    stages = plan_stages(recipe, folder)
    check_stages(stages)
    with folder_lock(folder.root):
        record_recipe(folder, recipe.values)
        seconds = execute_stages(stages, folder)
    print(f"lmprune run: finished in {duration(seconds)}; report: {folder.report}", flush=True)
    final = json.loads(folder.eval_json(final_target(recipe)).read_text())
    failures = gate_failures(final)
    for message in failures:
        print(f"lmprune: {message}", file=sys.stderr)
    return 1 if failures else 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------
# CLI


def cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, args.set or [], args.out)
    return run_pipeline(recipe, args.overwrite)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="Run a recipe: collect, locate, prune, evaluate, fine-tune, report.",
        description="Run a recipe (YAML: top-level model and out, one section per stage with "
                    "that stage's settings) end to end; stages whose inputs and settings are "
                    "unchanged are skipped, and a killed run resumes.")
    parser.add_argument("recipe", metavar="RECIPE", help="Recipe YAML file (see recipes/).")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="Override a recipe value, e.g. collect.max_docs=200 or out=runs/x "
                             "(the value is read as YAML; repeatable).")
    parser.add_argument("--out", default=None, help="Run folder (overrides the recipe's out).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Write into an existing --out folder that is not an lmprune run "
                             "folder.")
    parser.set_defaults(func=cmd_run)
