"""The plan of `lmprune compare`: each row's stages (prune or make it, evaluate, fine-tune,
evaluate again, attack), run by lmprune/run/runner.py, then the summary (lmprune/compare/report.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmprune.compare.recipe import (
    CompareFolder,
    CompareRecipe,
    act_config,
    aura_row,
    budget_rows,
    dpo_config,
    load_compare,
    profs_config,
    relearn_attacks,
    row_names,
)
from lmprune.compare.report import table, write_summary
from lmprune.core.config import build_config
from lmprune.core.io import check_out_dir
from lmprune.core.lock import folder_lock
from lmprune.induce.command import InduceConfig
from lmprune.prune.command import PruneConfig
from lmprune.run.runner import (
    Stage,
    check_stages,
    duration,
    execute_stages,
    planner,
    record_recipe,
)


def plan_compare(recipe: CompareRecipe, folder: CompareFolder) -> list[Stage]:
    model = recipe.run.model
    replace = dataclasses.replace
    stage = planner(folder.root)

    stages = [stage("collect", replace(recipe.collect, model=model, out=str(folder.stats)))]

    module_maps: dict[str, Path] = {}
    for row in recipe.modules:
        path = folder.modules_for(row.locate, recipe.locate)
        module_maps[row.name] = path
        if any(s.outputs == [path] for s in stages):
            continue
        cfg = replace(row.locate, model=model, stats=str(folder.stats), out=str(path))
        stages.append(stage("locate", cfg, f"locate:{path.stem}"))

    # rows: (name, prune config or None for the base)
    headline = recipe.headline
    headline_model = folder.row_model(headline.name)
    prunes: list[tuple[str, PruneConfig | None]] = [("base", None)]
    for row in recipe.modules:
        cfg = replace(row.prune, model=model, out=str(folder.row_model(row.name)),
                      modules=str(module_maps[row.name]), stats=str(folder.stats))
        prunes.append((row.name, cfg))
    headline_cfg = next(c for n, c in prunes if n == headline.name)
    for seed in recipe.compare.random_seeds:
        prunes.append((f"random-{seed}", replace(
            headline_cfg, mode="random", like=str(headline_model), seed=seed,
            out=str(folder.row_model(f"random-{seed}")))))
    if recipe.compare.aura:
        prunes.append(("aura", PruneConfig(model=model, mode="dampen", stats=str(folder.stats),
                                           out=str(folder.row_model("aura")),
                                           device=headline_cfg.device)))
    if recipe.compare.top_auroc:
        prunes.append(("top-auroc", replace(headline_cfg, mode="neurons",
                                            out=str(folder.row_model("top-auroc")))))

    made = {name for name, _ in prunes}
    first_seed = (recipe.compare.random_seeds or [0])[0]
    for budget in recipe.compare.frontier_budgets:
        name, random_name = budget_rows(recipe, budget)
        if name in made:
            continue
        cfg = replace(headline_cfg, select=f"budget:{budget.strip()}",
                      out=str(folder.row_model(name)))
        prunes.append((name, cfg))
        prunes.append((random_name, replace(
            headline_cfg, mode="random", like=str(folder.row_model(name)), seed=first_seed,
            out=str(folder.row_model(random_name)))))
    for alpha in recipe.compare.aura_strengths:
        name = aura_row(recipe, alpha)
        if name not in made:
            prunes.append((name, PruneConfig(model=model, mode="dampen", strength=alpha,
                                             stats=str(folder.stats),
                                             out=str(folder.row_model(name)),
                                             device=headline_cfg.device)))

    if recipe.induce is not None:
        stages += _induce_stages(recipe, folder, prunes)

    stages += [stage("prune", cfg, f"prune:{name}") for name, cfg in prunes if cfg is not None]
    if recipe.compare.profs:  # named like the rows' prune stages: the summary times prune:ROW
        cfg = profs_config(recipe.compare, model, str(folder.row_model("profs")),
                           headline_cfg.device)
        stages.append(stage("profs", cfg, "prune:profs"))
    if recipe.compare.act:
        cfg = act_config(recipe, model, str(folder.row_model("act")), headline_cfg.device)
        stages.append(stage("act", cfg, "prune:act"))
    if recipe.compare.dpo:  # a training stage: on the fine-tuning's device
        cfg = dpo_config(recipe.compare, model, str(folder.row_model("dpo")),
                         recipe.finetune.device)
        stages.append(stage("dpo", cfg, "prune:dpo"))

    def target_model(name: str) -> str:
        return model if name == "base" else str(folder.row_model(name))

    def eval_stage(name: str, path: str, json_path: Path) -> Stage:
        return stage("eval", replace(recipe.eval, model=path, json=str(json_path)), name)

    names = row_names(recipe)
    if recipe.induce is not None:  # the routed model before its module is ablated
        routed = folder.induced_routed
        stages.append(eval_stage("eval:induced-routed", str(routed), folder.induced_routed_eval))
    stages += [eval_stage(f"eval:{name}", target_model(name), folder.row_eval(name, False))
               for name in names]
    curve_rows = {headline.name, "induced"}
    # fine-tune the rows the targets read first, so a partial comparison answers them
    searched = [m.name for m in recipe.modules if m.name != headline.name]
    for name in sorted(names, key=lambda n: (n != "base", n != headline.name)):
        out = folder.row(name) / "finetuned"
        cfg = replace(recipe.finetune, model=target_model(name), out=str(out), base_model=model)
        if name not in curve_rows:  # the relearning curve only where the targets look
            cfg = replace(cfg, eval_every=0)
        stages.append(stage("finetune", cfg, f"finetune:{name}"))
        stages.append(eval_stage(f"eval:{name}+ft", str(out), folder.row_eval(name, True)))

    for name, docs, masks in relearn_attacks(recipe):
        cfg = replace(recipe.relearn.config, model=target_model(name), docs=docs, masks=masks,
                      out=str(folder.relearn(name, docs, masks)), base_model=model)
        stages.append(stage("relearn", cfg, f"relearn:{name}@{docs}-{masks}"))

    # the induced rows (routing is the longest stage) after the others, the fine-tuning of the
    # other searched configurations, then the relearning attacks last; order kept within
    searched_tuning = {f"{kind}:{n}{tail}" for n in searched
                       for kind, tail in (("finetune", ""), ("eval", "+ft"))}

    def phase(stage: Stage) -> int:
        row = stage.name.partition(":")[2]
        if stage.name.startswith("relearn:"):
            return 4
        if stage.name == "induce" or row.startswith("induced"):
            return 1
        if row.startswith("frontier-"):  # its evaluations first, its fine-tuning last
            return 3 if stage.name.startswith("finetune") or row.endswith("+ft") else 2
        return 2 if stage.name in searched_tuning else 0

    stages.sort(key=phase)
    return stages


def _induce_stages(recipe: CompareRecipe, folder: CompareFolder, prunes: list) -> list[Stage]:
    """Gradient routing into a designated module (its own stage, timed), then the prune rows."""

    routed = folder.induced_routed
    values = {**recipe.induce, "model": recipe.run.model, "out": str(routed)}
    values.setdefault("offensive", recipe.collect.offensive)
    values.setdefault("clean", recipe.collect.clean)
    cfg = build_config(InduceConfig, values, where="induce")
    stage = planner(folder.root)("induce", cfg)
    designated = str(routed / "modules.json")
    device = recipe.headline.prune.device
    prunes.append(("induced", PruneConfig(model=str(routed), mode="modules", modules=designated,
                                          select="ids:0", out=str(folder.row_model("induced")),
                                          device=device)))
    for seed in recipe.compare.induced_random_seeds:
        name = f"induced-random-{seed}"
        prunes.append((name, PruneConfig(model=str(routed), mode="random", like=designated,
                                         select="ids:0", seed=seed,
                                         out=str(folder.row_model(name)), device=device)))
    return [stage]


# --------------------------------------------------------------------------------------------
# CLI


def run_compare(recipe: CompareRecipe, overwrite: bool = False) -> int:

    folder = CompareFolder(recipe.run.out)
    check_out_dir(folder.root, "run", overwrite)
    stages = plan_compare(recipe, folder)
    check_stages(stages)
    with folder_lock(folder.root):
        record_recipe(folder, recipe.values)
        seconds = execute_stages(stages, folder, command="compare")
        # derived from the rows' files in seconds: always rewritten, so it follows the code
        summary = write_summary(recipe, folder)
    print("\n".join(table(summary)))
    print(f"lmprune compare: finished in {duration(seconds)}; {folder.root / 'compare.md'}",
          flush=True)
    return 0


def cmd_compare(args) -> int:
    return run_compare(load_compare(args.recipe, args.set or [], args.out), args.overwrite)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="Module pruning against random controls, AURA and top-AUROC neurons "
                        "(and induced modules), each before and after the same fine-tuning.",
        description="Run a comparison recipe (YAML: model, out, collect, locate, eval, finetune, "
                    "`modules:` named prune settings, `compare:` rows and targets, optional "
                    "`induce:`); cached per stage, so a killed comparison resumes.")
    parser.add_argument("recipe", metavar="RECIPE", help="Comparison YAML (see recipes/).")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="Override a value, e.g. eval.samples=25 or "
                             "modules.modules-1pct.select=budget:2%% (read as YAML).")
    parser.add_argument("--out", default=None, help="Output folder (overrides the recipe's).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Write into an existing --out folder that is not an lmprune run "
                             "folder.")
    parser.set_defaults(func=cmd_compare)
