"""`lmprune run RECIPE`: collect -> locate -> prune (+ random controls) -> evaluate -> fine-tune ->
evaluate -> report, in one run folder. The recipe and the folder: lmprune/run/recipe.py; the runner
that skips what is up to date and resumes what was killed: lmprune/run/runner.py.
"""

from __future__ import annotations

import dataclasses
import sys

from lmprune.core.io import check_out_dir
from lmprune.core.lock import folder_lock
from lmprune.evaluate.command import SKIP, gate_failures
from lmprune.evaluate.results import read_result
from lmprune.run.recipe import (
    Recipe,
    RunFolder,
    eval_targets,
    final_target,
    like_targets,
    load_recipe,
    transfer_name,
)
from lmprune.run.report import write_run_report
from lmprune.run.runner import (
    Stage,
    check_stages,
    duration,
    execute_stages,
    planner,
    record_recipe,
)


def plan_stages(recipe: Recipe, folder: RunFolder) -> list[Stage]:
    model = recipe.run.model
    replace = dataclasses.replace
    stage = planner(folder.root)

    stages = [
        stage("collect", replace(recipe.collect, model=model, out=str(folder.stats))),
        stage("locate", replace(recipe.locate, model=model, stats=str(folder.stats),
                                out=str(folder.modules))),
    ]
    prune_cfg = replace(recipe.prune, model=model, out=str(folder.pruned),
                        modules=str(folder.modules),
                        stats=recipe.prune.stats or str(folder.stats))
    stages.append(stage("prune", prune_cfg))
    for seed in recipe.control.seeds:
        stages.append(stage("prune", replace(prune_cfg, mode="random", like=str(folder.pruned),
                                             seed=seed, out=str(folder.control(seed))),
                            f"control-{seed}"))

    def eval_stage(target: str, target_model: str, **changes) -> Stage:
        final = target == final_target(recipe)
        cfg = replace(recipe.eval, model=target_model, json=str(folder.eval_json(target)),
                      fail_above=recipe.eval.fail_above if final else [],
                      fail_below=recipe.eval.fail_below if final else [], **changes)
        return stage("eval", cfg, f"eval:{target}")

    targets = eval_targets(recipe, folder)
    tuned_targets = [t for t in targets if t[0].endswith("finetuned")]
    for target in targets:
        if target not in tuned_targets:
            stages.append(eval_stage(*target))
    # the final model and its likes on the prompts the selection never saw
    by_name = dict(targets)
    transfers = []
    for prompts in recipe.transfer.prompts:
        for target in filter(None, like_targets(recipe).values()):
            transfers.append(eval_stage(transfer_name(target, prompts), by_name[target],
                                        prompts=prompts, limit=recipe.transfer.limit,
                                        perplexity=False, blimp=SKIP))

    if recipe.finetune is not None:
        pairs = [(str(folder.pruned), folder.finetuned, "finetune")]
        if recipe.control.finetune_base:
            pairs.append((model, folder.base_finetuned, "finetune:base"))
        if recipe.control.finetune:
            pairs += [(str(folder.control(s)), folder.control(s, True), f"finetune:control-{s}")
                      for s in recipe.control.seeds]
        for source, out, name in pairs:
            cfg = replace(recipe.finetune, model=source, out=str(out), base_model=model)
            if out != folder.finetuned:  # references: same training, no relearning curve
                cfg = replace(cfg, eval_every=0)
            stages.append(stage("finetune", cfg, name))
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


def run_pipeline(recipe: Recipe, overwrite: bool = False) -> int:
    """Run (or skip) every stage of the recipe; returns the exit code (1: a gate failed)."""
    folder = RunFolder(recipe.run.out)
    check_out_dir(folder.root, "run", overwrite)
    stages = plan_stages(recipe, folder)
    check_stages(stages)
    with folder_lock(folder.root):
        record_recipe(folder, recipe.values)
        seconds = execute_stages(stages, folder)
    print(f"lmprune run: finished in {duration(seconds)}; report: {folder.report}", flush=True)
    final = read_result(folder.eval_json(final_target(recipe)), required=True)
    failures = gate_failures(final)
    for message in failures:
        print(f"lmprune: {message}", file=sys.stderr)
    return 1 if failures else 0


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
