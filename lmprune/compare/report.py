"""The summary of `lmprune compare`: every number (compare.json), the table and the targets
(compare.md) and toxicity against perplexity (compare.png), read from the rows' eval files."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from lmprune.compare.recipe import (
    FRONTIER_FILE,
    PLOT_FILE,
    CompareFolder,
    CompareRecipe,
    frontier,
    relearn_attacks,
    row_names,
)
from lmprune.core.io import save_figure_atomic, write_json_atomic, write_text_atomic
from lmprune.core.lineage import read_lineage
from lmprune.evaluate.reference import (
    REFERENCE,
    STAGES,
    get_metric,
    row_metrics,
    scorer_disagreements,
    scorer_tps,
    versus_reference,
)
from lmprune.evaluate.results import read_result
from lmprune.finetune.relearn import attack_table, plot_attacks, read_attack

RELEARN_PLOT = "relearn.png"

# a row's numbers in the table, before and after fine-tuning (and spread over random seeds)
COLUMNS = ("toxicity_probability", "expected_max_toxicity", "perplexity", "fluency_perplexity",
           "blimp_accuracy", "distinct_2")


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _seconds(folder: CompareFolder, stage: str) -> float | None:
    marker = folder.read_marker(stage) or {}
    return marker.get("seconds") if marker.get("state") == "done" else None


def summarize(recipe: CompareRecipe, folder: CompareFolder) -> dict:
    """Every number of the comparison, the random controls' spread and the targets."""
    rows = {}
    for name in row_names(recipe):
        meta = read_lineage(folder.row_model(name)) or {}
        rows[name] = {
            "pruned": row_metrics(folder.row_eval(name, False), recipe.eval.scorer),
            "finetuned": row_metrics(folder.row_eval(name, True), recipe.eval.scorer),
            "neurons_zeroed": meta.get("num_pruned", 0 if name == "base" else None),
            "neurons_dampened": sum(len(v) for v in (meta.get("dampened_neurons") or {}).values()),
            "per_layer": {k: len(v) for k, v in (meta.get("pruned_neurons") or {}).items()},
            "seconds": {s: _seconds(folder, f"{s}:{name}") for s in ("prune", "finetune")},
        }
    if recipe.induce is not None:
        rows["induced"]["seconds"]["induce"] = _seconds(folder, "induce")
        rows["induced"]["routed"] = row_metrics(folder.induced_routed_eval, recipe.eval.scorer)
    random: dict = {}
    for group, prefix in (("random", "random-"), ("induced-random", "induced-random-")):
        members = [n for n in rows if n.startswith(prefix)]
        for stage in STAGES:
            for metric in COLUMNS:
                values = [rows[n][stage][metric] for n in members
                          if rows[n][stage] and rows[n][stage][metric] is not None]
                if values:
                    random.setdefault(group, {}).setdefault(stage, {})[metric] = _spread(values)
            by_scorer = {}
            for n in members:
                for spec, tp in scorer_tps(rows[n], stage).items():
                    by_scorer.setdefault(spec, []).append(tp)
            if by_scorer:
                random[group][stage]["toxicity_probability_by_scorer"] = {
                    spec: _spread(values) for spec, values in by_scorer.items()}
    first = next(iter(rows.values()))["pruned"] or {}
    points = frontier(recipe)
    return {"format": "lmprune.compare", "format_version": 1, "recipe": recipe.name,
            "model": recipe.run.model, "headline": recipe.headline.name,
            "protocol": _protocol(folder, recipe), "reference": REFERENCE, "rows": rows,
            "random": random, "versus_reference": versus_reference(rows),
            "scorer_disagreements": scorer_disagreements(rows),
            "frontier": {method: [{"strength": x, "row": name} for x, name in pts]
                         for method, pts in points.items()},
            "targets": targets(recipe, rows, random, points),
            "relearn": relearn_results(recipe, folder),
            "base_perplexity": first.get("perplexity")}


def relearn_results(recipe: CompareRecipe, folder: CompareFolder) -> dict:
    """The finished relearning attacks by name (`row @ docs, masks`), with their seconds."""
    found = {}
    for row, docs, masks in relearn_attacks(recipe):
        attack = read_attack(folder.relearn(row, docs, masks))
        if attack is not None:
            found[f"{row} @ {docs} docs, {masks}"] = {
                "row": row, **attack, "seconds": _seconds(folder, f"relearn:{row}@{docs}-{masks}")}
    return found


def _protocol(folder: CompareFolder, recipe: CompareRecipe) -> dict:
    path = folder.row_eval("base", False)
    ev = read_result(path) or {}
    tox, ppl = ev.get("toxicity") or {}, ev.get("perplexity") or {}
    return {"scorer": tox.get("scorer"), "scorers": {
                recipe.eval.scorer: tox.get("scorer"),
                **{spec: o.get("scorer") for spec, o in (tox.get("by_scorer") or {}).items()}},
            "fluency_judge": (ev.get("fluency") or {}).get("judge"),
            "blimp": (ev.get("blimp") or {}).get("source"), "prompts": tox.get("prompts"),
            "num_prompts": tox.get("num_prompts"), "samples_per_prompt":
            tox.get("samples_per_prompt"), "decoding": tox.get("decoding"),
            "perplexity": {k: ppl.get(k) for k in ("corpus", "tokens")},
            "finetune": {k: getattr(recipe.finetune, k) for k in
                         ("data", "max_steps", "lr", "batch_size", "seq_len", "seed")}}


NOTHING_TO_REDUCE = ("the base model gave no toxic continuation under this protocol: there is "
                     "nothing to reduce, so the target is not judged met")


def frontier_below(ours: list[tuple[float, float]], theirs: list[tuple[float, float]]) -> dict:
    """Whether the frontier `ours` (x, TP) lies below `theirs` over the x range both cover:
    both interpolated (linearly in log x) at every point of either inside the overlap, except
    the point they share (the base, every method's strength 0), which decides nothing."""
    ours, theirs = sorted(ours), sorted(theirs)
    if len(ours) < 2 or len(theirs) < 2:
        return {"met": False, "note": "a frontier needs at least two measured points"}
    low, high = max(ours[0][0], theirs[0][0]), min(ours[-1][0], theirs[-1][0])
    shared = set(ours) & set(theirs)
    at = sorted({x for x, y in ours + theirs if low <= x <= high and (x, y) not in shared})
    if high <= low or not at:
        return {"met": False, "overlap": [low, high],
                "note": "the two frontiers cover no common range of this measure"}

    def interp(points):
        xs, ys = zip(*points, strict=True)
        return np.interp(np.log(at), np.log(xs), ys)

    mine, other = interp(ours), interp(theirs)
    return {"overlap": [low, high], "at": at, "ours": mine.tolist(), "theirs": other.tolist(),
            "met": bool(np.all(mine < other))}


def _frontier_points(rows: dict, names: list[tuple[float, str]], stage: str, x_key: str,
                     scorer: str | None = None) -> list[tuple[float, float]]:
    points = []
    for _, name in names:
        row = rows.get(name) or {}
        x = get_metric(row, stage, x_key)
        y = scorer_tps(row, stage).get(scorer) if scorer else get_metric(row, stage,
                                                                     "toxicity_probability")
        if None not in (x, y):
            points.append((x, y))
    return points


def targets(recipe: CompareRecipe, rows: dict, random: dict,
            points: dict | None = None) -> dict:
    """The issue's targets, each with the values it compares and whether it holds. A
    fine-tuned headline is judged against the base fine-tuned the same way."""
    cfg = recipe.compare
    base, head = rows["base"], rows[recipe.headline.name]
    out = {}
    b_tp, h_tp = get_metric(base, "finetuned", "toxicity_probability"), \
        get_metric(head, "finetuned", "toxicity_probability")
    if None not in (b_tp, h_tp):
        scorers = {}
        b_all, h_all = scorer_tps(base, "finetuned"), scorer_tps(head, "finetuned")
        for spec in b_all.keys() & h_all.keys() or {"main": None}:
            b, h = b_all.get(spec, b_tp), h_all.get(spec, h_tp)
            # a ratio exists only where both are toxic sometimes (and JSON has no infinity)
            scorers[spec] = {"base_finetuned_tp": b, "headline_finetuned_tp": h,
                             "reduction": b / h if b > 0 and h > 0 else None,
                             "met": b > 0 and (h == 0 or b / h >= cfg.tp_reduction)}
        out["toxicity_reduction"] = {
            "against": REFERENCE["finetuned"], "base_tp": b_tp, "headline_tp_finetuned": h_tp,
            "reduction": b_tp / h_tp if b_tp > 0 and h_tp > 0 else None,
            "target": cfg.tp_reduction, "by_scorer": scorers,
            "met": all(c["met"] for c in scorers.values())}
        if b_tp == 0:
            out["toxicity_reduction"]["note"] = NOTHING_TO_REDUCE
    for name, key, tolerance, higher_is_better in (
            ("perplexity_after_finetuning", "perplexity", cfg.ppl_tolerance, False),
            ("fluency_after_finetuning", "fluency_perplexity", cfg.fluency_tolerance, False),
            ("blimp_after_finetuning", "blimp_accuracy", cfg.blimp_tolerance, True)):
        b, h = get_metric(base, "finetuned", key), get_metric(head, "finetuned", key)
        if None in (b, h) or not b:
            continue
        bound = 1 - tolerance if higher_is_better else 1 + tolerance
        out[name] = {"against": REFERENCE["finetuned"], "base_finetuned": b,
                     "headline_finetuned": h, "ratio": h / b, "target_ratio": bound,
                     "met": h / b >= bound if higher_is_better else h / b <= bound,
                     "base": get_metric(base, "pruned", key),
                     "headline_pruned": get_metric(head, "pruned", key)}
    if points and "modules" in points and "aura" in points:
        checks = {}
        for stage in STAGES:
            for axis in ("fluency_perplexity", "perplexity"):
                ours = _frontier_points(rows, points["modules"], stage, axis)
                theirs = _frontier_points(rows, points["aura"], stage, axis)
                checks.setdefault(stage, {})[axis] = frontier_below(ours, theirs)
        # judged on generation fluency where it was measured, else on perplexity
        measured = any(get_metric(base, stage, "fluency_perplexity") for stage in STAGES)
        axis = "fluency_perplexity" if measured else "perplexity"
        out["better_than_aura"] = {
            "rule": "module pruning's frontier below AURA's over the range of the fluency "
                    "measure both cover", "axis": axis, **checks,
            "met": all(checks[s][axis]["met"] for s in STAGES)}
    elif "aura" in rows:
        aura, checks = rows["aura"], {}
        for stage in STAGES:
            a_tp, a_ppl = get_metric(aura, stage, "toxicity_probability"), get_metric(aura, stage,
                                                                          "perplexity")
            m_tp, m_ppl = get_metric(head, stage, "toxicity_probability"), get_metric(head, stage,
                                                                          "perplexity")
            if None not in (a_tp, a_ppl, m_tp, m_ppl):
                checks[stage] = {"aura_tp": a_tp, "aura_ppl": a_ppl, "headline_tp": m_tp,
                                 "headline_ppl": m_ppl, "met": m_tp < a_tp and m_ppl <= a_ppl}
        if checks:
            out["better_than_aura"] = {**checks, "met": all(c["met"] for c in checks.values())}
    near = {}
    for stage in STAGES:
        rand = (random.get("random") or {}).get(stage, {}).get("toxicity_probability")
        ref = get_metric(base, stage, "toxicity_probability")
        if rand and ref is not None:
            near[stage] = {"against": REFERENCE[stage], "reference_tp": ref,
                           "random_tp_mean": rand["mean"], "random_tp_std": rand["std"],
                           "seeds": rand["n"],
                           "met": ref > 0 and rand["mean"] >= (1 - cfg.random_tolerance) * ref}
    if near:
        out["random_control_near_base"] = {
            "target": f">= (1 - {cfg.random_tolerance}) x reference", **near,
            "met": all(c["met"] for c in near.values())}
        if not any(c["reference_tp"] for c in near.values()):
            out["random_control_near_base"]["note"] = NOTHING_TO_REDUCE
    p_tp = get_metric(head, "pruned", "toxicity_probability")
    if None not in (p_tp, h_tp):
        out["no_relearning"] = {
            "tp_after_pruning": p_tp, "tp_after_finetuning": h_tp,
            "target": f"<= (1 + {cfg.relearning_tolerance}) x after pruning",
            "met": h_tp <= (1 + cfg.relearning_tolerance) * p_tp + 1e-12}
    return out


def _cell(metrics: dict | None, key: str, digits: int) -> str:
    if not metrics or metrics.get(key) is None:
        return "–"
    return f"{metrics[key]:.{digits}f}"


# the table's columns after the Toxicity Probability of each scorer: (metric, digits)
TABLE_VALUES = (("expected_max_toxicity", 3), ("perplexity", 2), ("fluency_perplexity", 2),
                ("blimp_accuracy", 3), ("distinct_2", 3))


def _scorer_specs(summary: dict) -> list[str]:
    return list((summary["protocol"].get("scorers") or {}) or ["main"])


def _stage_cells(metrics: dict | None, specs: list[str]) -> list[str]:
    scorers = (metrics or {}).get("scorers") or {}
    cells = [_cell(scorers.get(spec), "toxicity_probability", 3) for spec in specs]
    if not scorers:
        cells[0] = _cell(metrics, "toxicity_probability", 3)
    return cells + [_cell(metrics, key, digits) for key, digits in TABLE_VALUES]


def table(summary: dict) -> list[str]:
    """Two tables: every row right after pruning (against the base), then after fine-tuning
    (against the base fine-tuned the same way: its `base` line)."""
    specs = _scorer_specs(summary)
    header = ("| row | neurons zeroed | " + " | ".join(f"TP {s}" for s in specs)
              + " | EMT | perplexity | fluency | BLiMP | distinct-2 |")
    rule = "|---|---:|" + "---:|" * (len(specs) + 5)
    lines = []
    for stage, title in (("pruned", "After pruning (reference: `base`, the model itself)"),
                         ("finetuned", "After the same fine-tuning (reference: `base`, "
                                       "fine-tuned the same way)")):
        lines += [f"**{title}**", "", header, rule]
        for name, row in summary["rows"].items():
            zeroed = "–" if row["neurons_zeroed"] is None else f"{row['neurons_zeroed']:,}"
            if row["neurons_dampened"]:
                zeroed += f" (+{row['neurons_dampened']:,} dampened)"
            lines.append(f"| {name} | {zeroed} | " + " | ".join(
                _stage_cells(row[stage], specs)) + " |")
        for group, stats in summary["random"].items():
            spread = stats.get(stage) or {}
            n = (spread.get("toxicity_probability") or {}).get("n", 0)
            if n < 2:  # one seed: its own row above says it all
                continue
            by_scorer = spread.get("toxicity_probability_by_scorer") or {
                specs[0]: spread.get("toxicity_probability")}
            items = [(by_scorer.get(spec), 3) for spec in specs] + [
                (spread.get(key), digits) for key, digits in TABLE_VALUES]
            cells = ["–" if item is None else
                     f"{item['mean']:.{digits}f} ± {item['std']:.{digits}f}"
                     for item, digits in items]
            lines.append(f"| {group} (mean ± sd, {n} seeds) | | " + " | ".join(cells) + " |")
        lines.append("")
    return lines[:-1]


def plot(summary: dict, path: Path) -> Path | None:
    """Toxicity Probability against perplexity: each row an arrow from after pruning to after
    fine-tuning; the random controls as mean ± sd."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    drawn = 0
    for name, row in summary["rows"].items():
        if name.startswith(("random-", "induced-random-")):
            continue
        points = {s: (row[s]["perplexity"], row[s]["toxicity_probability"])
                  for s in ("pruned", "finetuned")
                  if row[s] and row[s]["perplexity"] is not None}
        if not points:
            continue
        color = f"C{drawn % 10}"
        if "pruned" in points:
            ax.plot(*points["pruned"], "o", mfc="none", color=color,
                    label=None if "finetuned" in points else name)
        if "finetuned" in points:
            if "pruned" in points:
                ax.annotate("", xy=points["finetuned"], xytext=points["pruned"],
                            arrowprops={"arrowstyle": "->", "color": color})
            ax.plot(*points["finetuned"], "o", color=color, label=name)
        drawn += 1
    for j, (group, stats) in enumerate(summary["random"].items()):
        for stage, fill in (("pruned", "none"), ("finetuned", None)):
            s = stats.get(stage) or {}
            if "perplexity" in s and "toxicity_probability" in s:
                ax.errorbar(s["perplexity"]["mean"], s["toxicity_probability"]["mean"],
                            xerr=s["perplexity"]["std"], yerr=s["toxicity_probability"]["std"],
                            fmt="s", mfc=fill, color="gray" if j == 0 else "black", capsize=3,
                            label=f"{group} (mean ± sd)" if stage == "finetuned" else None)
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    proto = summary["protocol"]
    ax.set_xscale("log")
    ax.set_xlabel("token perplexity (log scale)")
    ax.set_ylabel("Toxicity Probability")
    ax.set_title(f"{summary['model']}: {proto.get('num_prompts')} prompts x "
                 f"{proto.get('samples_per_prompt')}, {str(proto.get('scorer')).split(' ')[0]}"
                 f"\nhollow: after pruning, filled: after fine-tuning", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the data
    return save_figure_atomic(fig, path)


METHOD_STYLE = {"modules": ("C3", "module pruning"), "random": ("gray", "random neurons"),
                "aura": ("C0", "AURA (strength alpha)")}


def plot_frontier(summary: dict, path: Path) -> Path | None:
    """Toxicity Probability against generation fluency and against perplexity, each method's
    points (weakest to strongest, from the base) joined as its frontier; dashed and hollow right
    after pruning, solid and filled after fine-tuning; one row of panels per scorer."""
    points = summary.get("frontier") or {}
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    specs = _scorer_specs(summary)
    axes_keys = (("fluency_perplexity", "generation fluency: perplexity of the continuations "
                                        "under the judge"),
                 ("perplexity", "token perplexity of the fixed text"))
    fig, axes = plt.subplots(len(specs), 2, figsize=(12, 4.2 * len(specs)), squeeze=False)
    drawn = 0
    for r, spec in enumerate(specs):
        for c, (x_key, x_label) in enumerate(axes_keys):
            ax = axes[r][c]
            for method, members in points.items():
                color, label = METHOD_STYLE.get(method, ("black", method))
                names = [(m["strength"], m["row"]) for m in members]
                for stage, style, fill in (("pruned", "--", "none"), ("finetuned", "-", None)):
                    xy = _frontier_points(summary["rows"], names, stage, x_key,
                                          spec if spec != "main" else None)
                    if len(xy) < 2:
                        continue
                    xs, ys = zip(*xy, strict=True)
                    ax.plot(xs, ys, style, marker="o", mfc=fill, color=color,
                            label=f"{label}, {'after fine-tuning' if fill is None else 'pruned'}")
                    drawn += 1
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())  # 20, 30, not 2 x 10^1
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="x", which="both", labelsize="x-small")
            ax.set_xlabel(x_label + " (log scale)", fontsize="small")
            ax.set_ylabel(f"Toxicity Probability ({spec})", fontsize="small")
            ax.grid(alpha=0.3, which="both")
    if not drawn:
        plt.close(fig)
        return None
    proto = summary["protocol"]
    fig.suptitle(f"{summary['model']}: toxicity-fluency frontiers, {proto.get('num_prompts')} "
                 f"prompts x {proto.get('samples_per_prompt')}; judge "
                 f"{proto.get('fluency_judge')}; each line starts at the base (strength 0)",
                 fontsize="medium")
    # beside the panels, not over the points (an axes legend: the layout makes room for it)
    axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure_atomic(fig, path)


def _disagreement_lines(summary: dict) -> list[str]:
    found = summary.get("scorer_disagreements") or []
    if len(_scorer_specs(summary)) < 2:
        return []
    if not found:
        return ["", "The scorers agree on the direction of every row's change against its "
                "reference (lower, higher or within noise: the row's 95% interval against the "
                "reference's value)."]
    lines = ["", "## Where the scorers disagree", "",
             "Direction of each row's Toxicity Probability against its reference (beyond the "
             "row's 95% interval, or within noise):", ""]
    for item in found:
        said = ", ".join(f"{spec}: {d}" for spec, d in item["directions"].items())
        lines.append(f"- `{item['row']}` {item['stage']} (against {item['against']}): {said}")
    return lines


def write_summary(recipe: CompareRecipe, folder: CompareFolder) -> dict:
    summary = summarize(recipe, folder)
    write_json_atomic(folder.root / "compare.json", summary)
    lines = [f"# Comparison: {recipe.run.title or recipe.name}", "", *table(summary), ""]
    proto = summary["protocol"]
    scorers = "; ".join(f"`{spec}` = {name}" for spec, name in (proto["scorers"] or {}).items())
    lines += [f"Scorers: {scorers or proto['scorer']}; {proto['num_prompts']} prompts of "
              f"`{(proto['prompts'] or {}).get('spec')}` x {proto['samples_per_prompt']} "
              f"samples; perplexity over {(proto['perplexity'] or {}).get('tokens')} tokens of "
              f"`{((proto['perplexity'] or {}).get('corpus') or {}).get('spec')}`; fluency: "
              f"perplexity of the continuations under `{proto.get('fluency_judge')}`; BLiMP: "
              f"{(proto.get('blimp') or {}).get('pairs', '–')} pairs; every row fine-tuned with "
              f"the same settings ({proto['finetune']}). Headline: `{summary['headline']}`.",
              "", "## Targets", "",
              "A fine-tuned row is judged against the base fine-tuned the same way, a pruned "
              "row against the base.", ""]
    for name, check in summary["targets"].items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in check.items()
                 if k != "met"}
        lines.append(f"- {name}: **{'met' if check['met'] else 'not met'}** {shown}")
    lines += _disagreement_lines(summary)
    if plot_frontier(summary, folder.root / FRONTIER_FILE):
        lines += ["", "## Toxicity-fluency frontier", "", f"![frontier]({FRONTIER_FILE})"]
    if plot(summary, folder.root / PLOT_FILE):
        lines += ["", f"![toxicity vs perplexity]({PLOT_FILE})"]
    if summary["relearn"]:
        attack = next(iter(summary["relearn"].values()))
        lines += ["", "## Relearning attack", "",
                  f"Each row fine-tuned from its pruned model on unseen offensive documents "
                  f"(`{attack['data']['spec']}`, lr {attack['lr']}, measured every "
                  f"{attack['eval_every']} steps on {attack['prompts']['limit']} prompts of "
                  f"`{attack['prompts']['spec']}` x {attack['prompts']['samples']}); steps until "
                  f"Toxicity Probability is back half-way to the base's.", "",
                  *attack_table(summary["relearn"])]
        if plot_attacks(summary["relearn"], folder.root / RELEARN_PLOT):
            lines += ["", f"![relearning attack]({RELEARN_PLOT})"]
    curve = folder.row(summary["headline"]) / "finetuned" / "relearning.png"
    if curve.is_file():
        lines += ["", "Relearning curve of the headline (toxicity and perplexity during "
                  "fine-tuning):", "", f"![relearning]({curve.relative_to(folder.root)})"]
    write_text_atomic(folder.root / "compare.md", "\n".join(lines) + "\n")
    return summary
