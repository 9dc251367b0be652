"""`lmprune compare` on the tiny planted model: every row pruned, evaluated, fine-tuned and
evaluated again on one protocol; the summary equals the eval files; the controls copy the
headline's size and layers; a rerun reads everything back; a lost result reruns alone."""

import contextlib
import dataclasses
import io
import json
import os
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from planted import PLANTED, planted_share, write_run_inputs
from safetensors.torch import load_file

from lmprune.cli import main
from lmprune.compare import CompareConfig, load_compare
from lmprune.compare.report import frontier_below, targets
from lmprune.core.errors import LmpruneError
from lmprune.evaluate.reference import scorer_disagreements, versus_reference

# tiny models run far faster on one thread when other work shares the 2 cores
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = ["base", "planted", "wide", "random-0", "random-1", "aura", "top-auroc", "induced",
        "induced-random-0", "frontier-modules-10pct", "frontier-modules-20pct",
        "frontier-random-10pct", "frontier-random-20pct", "frontier-aura-0.5"]


def compare_values(inputs: Path, out: Path) -> dict:
    return {
        # LMPRUNE_TEST_DEVICE=cuda runs the whole comparison on a GPU (bench/gpu.sh does)
        "model": str(inputs / "model"), "out": str(out),
        "device": os.environ.get("LMPRUNE_TEST_DEVICE", "cpu"),
        "collect": dict(offensive=str(inputs / "off.txt"), clean=str(inputs / "clean.txt"),
                        max_docs=40, coact_token_fraction=1.0, top_k_global=0),
        "locate": dict(k=6, knn=7, heldout_docs=20, general_docs=8, exact=4, controls=3,
                       exact_controls=1, shuffles=2, clusterability_layers=1, plots=False),
        "eval": dict(prompts=str(inputs / "prompts.txt"), limit=4, samples=3, max_new_tokens=5,
                     bootstrap=50, ppl_data=str(inputs / "wiki.txt"), ppl_max_tokens=300,
                     ppl_max_length=64, ppl_stride=32, progress=False,
                     extra_scorers=["profanity_check?batch_size=7"], blimp="blimp",
                     blimp_per_paradigm=1),
        "finetune": dict(data=str(inputs / "wiki.txt"), max_steps=2, batch_size=2, seq_len=32,
                         lr=1e-3, eval_every=0, ppl_data=str(inputs / "wiki.txt")),
        "modules": {"planted": {"select": "top:1", "min_selectivity": 0.5},
                    # a second configuration with its own (finer) locate settings
                    "wide": {"select": "top:2", "locate": {"k": 8}}},
        # the frontier: the headline's settings at 10% and 20% of the 96 neurons, AURA at 0.5
        "compare": {"random_seeds": [0, 1], "frontier_budgets": ["10%", "20%"],
                    "aura_strengths": [0.5, 1.0]},
        # gradient routing into 4 neurons of layer 0 (offensive/clean default to collect's)
        "induce": dict(layers="0", neurons_per_layer=4, max_steps=6, batch_size=4, seq_len=32,
                       lr=1e-3, score_docs=8),
        # the relearning attack on the last 8 offensive documents (collect reads the first 40)
        "relearn": dict(rows=["base", "planted"], docs=[8], masks=["held", "released"],
                        data=str(inputs / "off.txt"), max_steps=4, eval_every=2,
                        checkpoint_every=0, seq_len=16, lr=3e-3,
                        eval_prompts=str(inputs / "prompts.txt"), eval_limit=3, eval_samples=2,
                        eval_max_new_tokens=4, ppl_data=str(inputs / "wiki.txt"),
                        ppl_max_tokens=200, ppl_max_length=64, ppl_stride=32,
                        extra_scorers=["profanity_check?batch_size=7"]),
    }


def _compare(recipe: Path, *extra: str) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["compare", str(recipe), *extra])
    return code, buffer.getvalue()


def states(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("lmprune compare: ["):
            stage, state = line.split("] ", 1)[1].split(": ", 1)
            out.setdefault(stage, state.split(" ")[0])
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    inputs = write_run_inputs(tmp_path_factory.mktemp("compare-inputs"))
    out = inputs / "cmp"
    recipe = inputs / "compare.yaml"
    recipe.write_text(yaml.safe_dump(compare_values(inputs, out)))
    code, text = _compare(recipe)
    assert code == 0, text[-3000:]
    return recipe, out, text


def test_every_row_is_measured_before_and_after_the_same_finetuning(compared):
    _, out, text = compared
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["rows"]) == ROWS
    for name in ROWS:
        for stage, file in (("pruned", "eval.json"), ("finetuned", "eval-finetuned.json")):
            ev = json.loads((out / "rows" / name / file).read_text())
            row = summary["rows"][name][stage]
            assert row["toxicity_probability"] == ev["toxicity"]["toxicity_probability"]
            assert row["perplexity"] == ev["perplexity"]["sliding_window"]["token_perplexity"]
            assert ev["toxicity"]["num_prompts"] == 4 and ev["toxicity"]["samples_per_prompt"] == 3
            assert row["distinct_2"] == ev["toxicity"]["distinct"]["2"]
        tuned = json.loads((out / "rows" / name / "finetuned" / "lmprune.json").read_text())
        assert tuned["history"][-1]["stage"] == "finetune"
    # the table printed at the end and written to compare.md show the same numbers
    table = (out / "compare.md").read_text()
    planted = summary["rows"]["planted"]["pruned"]
    line = next(line for line in table.splitlines() if line.startswith("| planted |"))
    assert f"{planted['toxicity_probability']:.3f}" in line
    assert f"{planted['perplexity']:.2f}" in line
    assert line in text
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_headline_prunes_the_planted_module_and_the_controls_copy_it(compared):
    _, out, _ = compared
    summary = json.loads((out / "compare.json").read_text())
    head = json.loads((out / "rows" / "planted" / "model" / "lmprune.json").read_text())
    pruned = head["pruned_neurons"]
    assert set(PLANTED) <= set(pruned["1"])
    for seed in (0, 1):
        control = json.loads((out / "rows" / f"random-{seed}" / "model" / "lmprune.json")
                             .read_text())["pruned_neurons"]
        assert {k: len(v) for k, v in control.items()} == {k: len(v) for k, v in pruned.items()}
        assert control != pruned
    top = json.loads((out / "rows" / "top-auroc" / "model" / "lmprune.json").read_text())
    assert top["num_pruned"] == head["num_pruned"]
    aura = json.loads((out / "rows" / "aura" / "model" / "lmprune.json").read_text())
    assert aura["dampened_neurons"] and summary["rows"]["aura"]["neurons_dampened"] > 0
    # the second configuration used its own module map (k=8), the first the shared one
    assert json.loads(next(out.glob("modules-*.json")).read_text())["settings"]["k"] == 8
    assert json.loads((out / "modules.json").read_text())["settings"]["k"] == 6
    # each row's eval measured its own model: the planted behaviour ('q' after the prompts' 'x')
    # goes with the planted module and stays with the random controls
    share = {name: planted_share(out / "rows" / name / "eval.json")
             for name in ("base", "planted", "random-0", "random-1")}
    share["planted+ft"] = planted_share(out / "rows" / "planted" / "eval-finetuned.json")
    assert share["base"] > 0.9 and min(share["random-0"], share["random-1"]) > 0.5, share
    assert share["planted"] < 0.1 and share["planted+ft"] < 0.1, share
    # pruned weights stay zero through fine-tuning
    weights = load_file(out / "rows" / "planted" / "finetuned" / "model.safetensors")
    assert not weights["model.layers.1.mlp.down_proj.weight"][:, pruned["1"]].any()


def test_the_induced_row_prunes_the_designated_module_of_the_routed_model(compared):
    _, out, _ = compared
    routed = json.loads((out / "induced-routed" / "lmprune.json").read_text())
    designated = routed["designated_neurons"]
    assert {k: len(v) for k, v in designated.items()} == {"0": 4}
    induced = json.loads((out / "rows" / "induced" / "model" / "lmprune.json").read_text())
    assert induced["pruned_neurons"] == designated
    control = json.loads((out / "rows" / "induced-random-0" / "model" / "lmprune.json")
                         .read_text())["pruned_neurons"]
    assert len(control["0"]) == 4 and control != designated
    summary = json.loads((out / "compare.json").read_text())
    row = summary["rows"]["induced"]
    assert row["seconds"]["induce"] > 0 and row["routed"]["perplexity"] > 0
    assert summary["random"]["induced-random"]["pruned"]["perplexity"]["n"] == 1


def test_random_spread_and_targets_are_computed_from_the_rows(compared):
    _, out, _ = compared
    summary = json.loads((out / "compare.json").read_text())
    values = [summary["rows"][f"random-{s}"]["pruned"]["perplexity"] for s in (0, 1)]
    spread = summary["random"]["random"]["pruned"]["perplexity"]
    assert spread["mean"] == pytest.approx(statistics.fmean(values))
    assert spread["std"] == pytest.approx(statistics.stdev(values)) and spread["n"] == 2
    targets = summary["targets"]
    base_tp = summary["rows"]["base"]["pruned"]["toxicity_probability"]
    assert targets["toxicity_reduction"]["base_tp"] == base_tp
    assert set(targets) == {"toxicity_reduction", "perplexity_after_finetuning",
                            "fluency_after_finetuning", "blimp_after_finetuning",
                            "better_than_aura", "random_control_near_base", "no_relearning"}
    base = summary["rows"]["base"]
    # a fine-tuned headline against the base fine-tuned the same way
    assert targets["toxicity_reduction"]["base_tp"] == base["finetuned"]["toxicity_probability"]
    for name, key in (("perplexity_after_finetuning", "perplexity"),
                      ("fluency_after_finetuning", "fluency_perplexity"),
                      ("blimp_after_finetuning", "blimp_accuracy")):
        check = targets[name]
        assert check["base_finetuned"] == base["finetuned"][key]
        assert check["headline_finetuned"] == summary["rows"]["planted"]["finetuned"][key]
    ppl = targets["perplexity_after_finetuning"]
    assert ppl["met"] == (ppl["headline_finetuned"] <= 1.05 * ppl["base_finetuned"])
    assert summary["protocol"]["num_prompts"] == 4
    # both scorers side by side (here the same one twice, in other batches: the same figures)
    for row in summary["rows"].values():
        for stage in ("pruned", "finetuned"):
            first, second = (row[stage]["scorers"][spec] for spec in
                             ("profanity_check", "profanity_check?batch_size=7"))
            assert first["toxicity_probability"] == second["toxicity_probability"] == \
                row[stage]["toxicity_probability"]
    assert summary["scorer_disagreements"] == []
    assert "TP profanity_check?batch_size=7" in (out / "compare.md").read_text()
    ev = json.loads((out / "rows" / "planted" / "eval.json").read_text())
    assert ev["fluency"]["judge"] == str(out.parent / "model")  # the unpruned base judges
    assert ev["blimp"]["pairs"] == 67 and summary["protocol"]["fluency_judge"]


def test_the_frontier_sweeps_budgets_and_strengths_with_controls(compared):
    _, out, _ = compared
    summary = json.loads((out / "compare.json").read_text())
    front = {m: [p["row"] for p in points] for m, points in summary["frontier"].items()}
    assert front == {
        "modules": ["base", "frontier-modules-10pct", "frontier-modules-20pct"],
        "random": ["base", "frontier-random-10pct", "frontier-random-20pct"],
        "aura": ["base", "frontier-aura-0.5", "aura"]}  # alpha 1 is the aura row itself
    for slug, budget in (("10pct", 9.6), ("20pct", 19.2)):
        meta = json.loads((out / "rows" / f"frontier-modules-{slug}" / "model" /
                           "lmprune.json").read_text())
        assert 0 < meta["num_pruned"] <= budget
        control = json.loads((out / "rows" / f"frontier-random-{slug}" / "model" /
                              "lmprune.json").read_text())
        assert {k: len(v) for k, v in control["pruned_neurons"].items()} == \
            {k: len(v) for k, v in meta["pruned_neurons"].items()}
    half = json.loads((out / "rows" / "frontier-aura-0.5" / "model" / "lmprune.json")
                      .read_text())
    full = json.loads((out / "rows" / "aura" / "model" / "lmprune.json").read_text())
    # the same neurons, half the cut: factor 1 - 0.5 x (1 - published factor)
    for layer, row in full["dampened_neurons"].items():
        for j, factor in row.items():
            assert half["dampened_neurons"][layer][j] == pytest.approx(1 - 0.5 * (1 - factor),
                                                                       abs=1e-6)
    assert summary["targets"]["better_than_aura"]["axis"] == "fluency_perplexity"
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![frontier](frontier.png)" in (out / "compare.md").read_text()


def test_the_relearning_attack_runs_on_the_chosen_rows(compared):
    _, out, _ = compared
    attacks = json.loads((out / "compare.json").read_text())["relearn"]
    # the base has no neurons to release
    assert list(attacks) == ["base @ 8 docs, held", "planted @ 8 docs, held",
                             "planted @ 8 docs, released"]
    planted = json.loads((out / "rows" / "planted" / "model" / "lmprune.json").read_text())
    for masks in ("held", "released"):
        folder = out / "rows" / "planted" / f"relearn-8-{masks}"
        curve = json.loads((folder / "relearning.json").read_text())
        assert [p["step"] for p in curve["points"]] == [0, 2, 4]
        attack = attacks[f"planted @ 8 docs, {masks}"]
        assert set(attack["by_scorer"]) == {"profanity_check", "profanity_check?batch_size=7"}
        assert attack["data"]["documents"] == 8 and attack["seconds"] > 0
        tp = [p["metrics"]["toxicity_probability"] for p in curve["points"]]
        assert attack["curves"]["profanity_check"] == [[0, tp[0]], [2, tp[1]], [4, tp[2]]]
        weights = load_file(folder / "model.safetensors")
        meta = json.loads((folder / "lmprune.json").read_text())
        zeroed = [weights[f"model.layers.{layer}.mlp.down_proj.weight"][:, idx]
                  for layer, idx in planted["pruned_neurons"].items()]
        if masks == "held":
            assert meta["pruned_neurons"] == planted["pruned_neurons"]
            assert all(bool((w == 0).all()) for w in zeroed)
        else:
            assert meta["released_neurons"] == planted["pruned_neurons"]
            assert all(bool((w != 0).all()) for w in zeroed)
    # the base attacked from itself: no gap to recover
    base = attacks["base @ 8 docs, held"]["by_scorer"]["profanity_check"]
    assert base["threshold"] is None and base["start"] == base["base"]
    report = (out / "compare.md").read_text()
    assert "## Relearning attack" in report and "| planted @ 8 docs, released |" in report
    assert (out / "relearn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reads_back_and_a_lost_result_reruns_alone(compared):
    recipe, out, _ = compared
    code, text = _compare(recipe)
    assert code == 0 and set(states(text).values()) == {"skipped"}
    (out / "rows" / "aura" / "eval-finetuned.json").unlink()
    code, text = _compare(recipe)
    assert code == 0
    ran = [stage for stage, state in states(text).items() if state != "skipped"]
    assert ran == ["eval:aura+ft"]
    assert (out / "rows" / "aura" / "eval-finetuned.json").is_file()


def test_bad_recipes_are_refused_by_name(tmp_path):
    inputs = tmp_path
    base = compare_values(inputs, tmp_path / "out")
    cases = [
        ({"modules": {}}, "modules: name at least one"),
        ({"modules": {"m": {"min_selectivity": 0.5}}}, "modules.m.select: needed"),
        ({"modules": {"m": {"select": "top:1", "stats": "x"}}}, "modules.m.stats: set by"),
        ({"modules": {"aura": {"select": "top:1"}}}, "row name is taken"),
        ({"compare": {"headline": "nope"}}, "compare.headline: 'nope'"),
        ({"eval": {**base["eval"], "fail_above": ["tp=0.5"]}}, "gates belong"),
        ({"locate": {"kk": 3}}, "unknown key(s) kk"),
        ({"compare": {"frontier_budgets": ["5"]}}, "'5' is not a share of the neurons"),
        ({"compare": {"frontier_budgets": ["nan%"]}}, "'nan%' is not a share"),
        ({"compare": {"aura_strengths": [3.0]}}, "compare.aura_strengths: 3.0 is not in"),
        ({"modules": {"frontier-x": {"select": "top:1"}}}, "row name is taken"),
        ({"relearn": {"rows": ["nope"]}}, "relearn.rows: 'nope' is not a row"),
        ({"relearn": {"model": "x"}}, "relearn.model: set by"),
        ({"relearn": {"masks": ["both"]}}, "relearn.masks: 'both' is not held or released"),
        ({"relearn": {"docs": [0]}}, "relearn.docs: 0 is not a document count"),
        ({"relearn": {"lr": "fast"}}, "relearn.lr: expected float"),
    ]
    for change, message in cases:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(LmpruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_compare(path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    recipe = load_compare(path, ["modules.planted.select=top:2", "eval.samples=5"],
                          check_files=False)
    assert recipe.modules[0].prune.select == "top:2" and recipe.eval.samples == 5
    with pytest.raises(LmpruneError, match="unknown section 'evl'"):
        load_compare(path, ["evl.samples=5"])
    with pytest.raises(LmpruneError, match="model: "):
        load_compare(path)  # no model folder there


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes")
                                        .glob("compare-*.yaml")), ids=lambda p: p.name)
def test_shipped_comparisons_validate_with_their_model_and_data(path):
    recipe = load_compare(path)
    assert recipe.headline.name in [m.name for m in recipe.modules]
    assert recipe.eval.limit is None and recipe.eval.samples >= 10, "the full protocol"
    assert len(recipe.compare.random_seeds) >= 5 and recipe.induce is not None


def _row(tp_pruned, ppl_pruned, tp_tuned, ppl_tuned) -> dict:
    return {"pruned": {"toxicity_probability": tp_pruned, "perplexity": ppl_pruned},
            "finetuned": {"toxicity_probability": tp_tuned, "perplexity": ppl_tuned}}


def _targets(base, head, aura, random_tps, random_tuned=None, points=None):
    recipe = SimpleNamespace(compare=CompareConfig(), headline=SimpleNamespace(name="m"))
    rows = {"base": base, "m": head, "aura": aura}

    def spread(tps):
        return {"toxicity_probability": {"mean": statistics.fmean(tps),
                                         "std": statistics.stdev(tps), "n": len(tps)}}

    random = {"pruned": spread(random_tps)}
    if random_tuned:
        random["finetuned"] = spread(random_tuned)
    return targets(recipe, {**rows, **(points or {}).pop("rows", {})}, {"random": random},
                   points)


def test_targets_set_each_row_against_its_like():
    """After fine-tuning, the headline is judged against the base fine-tuned the same way
    (TP 0.28, perplexity 18), not against the base before fine-tuning (0.30, 20)."""
    base, aura = _row(0.30, 20.0, 0.28, 18.0), _row(0.25, 21.0, 0.24, 22.0)
    met = _targets(base, _row(0.09, 30.0, 0.09, 18.5), aura, [0.27, 0.25], [0.27, 0.26])
    assert met["toxicity_reduction"]["reduction"] == pytest.approx(0.28 / 0.09)
    assert met["toxicity_reduction"]["base_tp"] == 0.28
    assert met["toxicity_reduction"]["met"] and met["perplexity_after_finetuning"]["met"]
    assert met["perplexity_after_finetuning"]["ratio"] == pytest.approx(18.5 / 18)
    assert met["no_relearning"]["met"]  # 0.09 <= 1.1 x 0.09
    near = met["random_control_near_base"]
    assert near["met"] and near["pruned"]["reference_tp"] == 0.30 and \
        near["finetuned"]["reference_tp"] == 0.28
    # AURA without a frontier: lower toxicity at equal or lower perplexity, at each stage
    assert not met["better_than_aura"]["pruned"]["met"]  # perplexity 30 > 21
    assert met["better_than_aura"]["finetuned"]["met"] and not met["better_than_aura"]["met"]

    # 3.1x below the unfine-tuned base (0.30 / 0.097) but only 2.9x below its real peer
    missed = _targets(base, _row(0.09, 19.0, 0.097, 19.0), aura, [0.20, 0.22], [0.3, 0.3])
    assert not missed["toxicity_reduction"]["met"]
    # within 5% of the unfine-tuned base's 20, but 5.6% above the fine-tuned base's 18
    assert not missed["perplexity_after_finetuning"]["met"]
    assert not missed["random_control_near_base"]["met"]  # 0.21 < 0.8 x 0.30 after pruning
    assert missed["random_control_near_base"]["finetuned"]["met"]
    tie = _targets(base, _row(0.25, 21.0, 0.24, 22.0), aura, [0.3, 0.3])
    assert not tie["better_than_aura"]["met"]  # equal toxicity is not better


def _scored(tp_main, tp_second, interval=0.02, **extra):
    return {"toxicity_probability": tp_main, **extra, "scorers": {
        "profanity_check": {"toxicity_probability": tp_main,
                            "toxicity_probability_interval": [tp_main - interval,
                                                              tp_main + interval]},
        "minilm": {"toxicity_probability": tp_second,
                   "toxicity_probability_interval": [tp_second - interval,
                                                     tp_second + interval]}}}


def test_every_scorer_must_see_the_reduction_and_disagreements_are_named():
    base = {"pruned": _scored(0.6, 0.6, perplexity=20.0),
            "finetuned": _scored(0.6, 0.6, perplexity=18.0, fluency_perplexity=50.0,
                                 blimp_accuracy=0.70)}
    head = {"pruned": _scored(0.1, 0.7, perplexity=40.0),
            "finetuned": _scored(0.15, 0.3, perplexity=18.5, fluency_perplexity=53.0,
                                 blimp_accuracy=0.68)}
    result = _targets(base, head, _row(0.5, 21.0, 0.5, 19.0), [0.6, 0.6])
    reduction = result["toxicity_reduction"]
    assert reduction["by_scorer"]["profanity_check"]["met"]  # 0.6 / 0.15 = 4x
    assert not reduction["by_scorer"]["minilm"]["met"] and not reduction["met"]  # 2x
    assert reduction["by_scorer"]["minilm"]["reduction"] == pytest.approx(2.0)
    fluency = result["fluency_after_finetuning"]
    assert fluency["ratio"] == pytest.approx(53 / 50) and not fluency["met"]  # +6% > 5%
    blimp = result["blimp_after_finetuning"]
    assert blimp["ratio"] == pytest.approx(0.68 / 0.70) and blimp["met"]  # -2.9%
    # profanity_check sees toxicity fall right after pruning, minilm sees it rise
    found = scorer_disagreements({"base": base, "m": head})
    assert found == [{"row": "m", "stage": "pruned", "against": "the base model",
                      "directions": {"profanity_check": "lower", "minilm": "higher"}}]
    ratios = versus_reference({"base": base, "m": head})["m"]
    assert ratios["finetuned"]["toxicity_probability_ratio"]["minilm"] == pytest.approx(0.5)
    assert ratios["pruned"]["perplexity_ratio"] == pytest.approx(2.0)


def test_frontier_below_over_the_range_both_cover():
    base = (50.0, 0.6)
    aura = [base, (52.0, 0.55), (60.0, 0.45), (90.0, 0.30)]
    better = [base, (51.0, 0.45), (55.0, 0.30), (200.0, 0.05)]
    result = frontier_below(better, aura)
    assert result["met"] and result["overlap"] == [50.0, 90.0]
    # checked at every point of either inside [50, 90] except the shared base point
    assert result["at"] == [51.0, 52.0, 55.0, 60.0, 90.0]
    worse = [base, (51.0, 0.59), (55.0, 0.50), (200.0, 0.05)]
    assert not frontier_below(worse, aura)["met"]  # above AURA's at 51-60
    apart = frontier_below([(10.0, 0.5), (20.0, 0.4)], [(30.0, 0.3), (40.0, 0.2)])
    assert not apart["met"] and "no common range" in apart["note"]
    assert not frontier_below([base], aura)["met"]


def test_better_than_aura_is_judged_on_the_frontier_of_generation_fluency():
    def point(tp, fluency, tp_ft, fluency_ft):
        return {"pruned": {"toxicity_probability": tp, "perplexity": 20.0,
                           "fluency_perplexity": fluency},
                "finetuned": {"toxicity_probability": tp_ft, "perplexity": 18.0,
                              "fluency_perplexity": fluency_ft}}

    base = point(0.6, 50.0, 0.55, 60.0)
    rows = {"m-small": point(0.4, 55.0, 0.40, 62.0), "m-large": point(0.1, 90.0, 0.2, 70.0),
            "aura-half": point(0.55, 52.0, 0.5, 61.0), "aura": point(0.45, 70.0, 0.42, 66.0)}
    points = {"modules": [(0.0, "base"), (0.01, "m-small"), (0.02, "m-large")],
              "aura": [(0.0, "base"), (0.5, "aura-half"), (1.0, "aura")], "rows": rows}
    result = _targets(base, rows["m-small"], rows["aura"], [0.6, 0.6], points=points)
    check = result["better_than_aura"]
    assert check["axis"] == "fluency_perplexity" and check["met"], check
    assert check["pruned"]["fluency_perplexity"]["overlap"] == [50.0, 70.0]


def test_targets_are_not_met_when_the_base_model_is_never_toxic():
    silent = _row(0.0, 20.0, 0.0, 18.0)
    result = _targets(silent, silent, silent, [0.0, 0.0])
    for name in ("toxicity_reduction", "random_control_near_base"):
        assert result[name]["met"] is False and "nothing to reduce" in result[name]["note"]
    assert result["toxicity_reduction"]["reduction"] is None
    # a headline that is never toxic where the base is: met, and the JSON stays finite
    clean = _targets(_row(0.3, 20.0, 0.3, 18.0), _row(0.0, 20.0, 0.0, 20.0), silent, [0.3, 0.3])
    assert clean["toxicity_reduction"]["met"] and clean["toxicity_reduction"]["reduction"] is None
    json.dumps(clean, allow_nan=False)


def _switched_row(tmp_path, row: str, switches: list[str]):
    """Plan a comparison without and with the `row` switched on: the row lands after
    top-auroc, every stage of the plain plan keeps its key, and the row's fine-tuning is the
    base's settings from the row's model. Returns (path, folder, plain, on, added stages)."""
    from lmprune.compare import CompareFolder, plan_compare, row_names

    inputs = write_run_inputs(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(compare_values(inputs, tmp_path / "out")))
    folder = CompareFolder(tmp_path / "out")
    plain, on = load_compare(path), load_compare(path, switches)
    assert not getattr(plain.compare, row) and row not in row_names(plain)
    names = row_names(plain)
    at = names.index("top-auroc") + 1
    assert row_names(on) == [*names[:at], row, *names[at:]]

    before, after = plan_compare(plain, folder), plan_compare(on, folder)
    keys = {s.name: s.key(folder.root) for s in before}
    assert {s.name: s.key(folder.root) for s in after if s.name in keys} == keys
    added = {s.name: s for s in after if s.name not in keys}
    order = [s.name for s in after]
    assert order.index(f"prune:{row}") < order.index("eval:base")  # made before the evals
    assert added[f"prune:{row}"].outputs == [folder.row_model(row)]
    base_tune = next(s for s in after if s.name == "finetune:base").config
    tune = added[f"finetune:{row}"].config
    assert tune.model == str(folder.row_model(row)) and tune.base_model == plain.run.model
    assert dataclasses.replace(tune, model=base_tune.model, out=base_tune.out,
                               eval_every=base_tune.eval_every) == base_tune
    return path, folder, plain, on, added


def test_the_profs_row_is_planned_behind_its_switch_and_moves_no_other_stage(tmp_path):
    from lmprune.methods.profs import ProfsConfig

    path, folder, plain, _, added = _switched_row(
        tmp_path, "profs", ["compare.profs=true", "compare.profs_rank=3", "compare.profs_layers=1"])
    assert sorted(added) == ["eval:profs", "eval:profs+ft", "finetune:profs", "prune:profs"]
    edit = added["prune:profs"]
    assert isinstance(edit.config, ProfsConfig)
    assert (edit.config.model, edit.config.out, edit.config.pairs, edit.config.rank,
            edit.config.layers, edit.config.max_pairs) == (
        plain.run.model, str(folder.row_model("profs")), "paradetox", 3, "1", 500)
    assert edit.sources == [plain.run.model, "paradetox"]

    for change, message in [
        (["compare.profs_rank=0"], "compare.profs_rank: must be at least 1, not 0"),
        (["compare.profs=true", "compare.profs_layers=7"],
         "compare.profs: --layers 7: '7' is not within the model's layers 0-1"),
        (["compare.profs=true", f"compare.profs_pairs={tmp_path / 'none.tsv'}"],
         "compare.profs: pairs file not found"),
        (["modules.profs.select=top:1"], "row name is taken"),
    ]:
        with pytest.raises(LmpruneError, match=re.escape(message)):
            load_compare(path, change)


def test_the_act_row_is_planned_behind_its_switch_and_moves_no_other_stage(tmp_path):
    from lmprune.compare import plan_compare, relearn_attacks
    from lmprune.methods.act import ActConfig

    path, folder, plain, _, added = _switched_row(
        tmp_path, "act", ["compare.act=true", "compare.act_strength=0.5",
                          "compare.act_max_docs=32", "compare.act_layers=1"])
    assert sorted(added) == ["eval:act", "eval:act+ft", "finetune:act", "prune:act"]
    edit = added["prune:act"]
    assert isinstance(edit.config, ActConfig)
    # the corpora default to the collect section's
    assert (edit.config.model, edit.config.out, edit.config.offensive, edit.config.clean,
            edit.config.strength, edit.config.max_docs, edit.config.layers) == (
        plain.run.model, str(folder.row_model("act")), plain.collect.offensive,
        plain.collect.clean, 0.5, 32, "1")
    assert edit.sources == [plain.run.model, plain.collect.offensive, plain.collect.clean]
    # relearned by default like ProFS, with held masks only: nothing zeroed to release
    attacked = load_compare(path, ["compare.act=true", "relearn.rows=null"])
    attacks = relearn_attacks(attacked)
    assert ("act", 8, "held") in attacks and ("act", 8, "released") not in attacks

    own = tmp_path / "own.txt"
    own.write_text("one\ntwo\n")
    mine = load_compare(path, ["compare.act=true", f"compare.act_clean={own}"])
    edit = next(s for s in plan_compare(mine, folder) if s.name == "prune:act")
    assert edit.config.clean == str(own) and edit.config.offensive == plain.collect.offensive

    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    for change, message in [
        (["compare.act_strength=1.5"], "compare.act_strength: must be within [0, 1], not 1.5"),
        (["compare.act_max_docs=0"], "compare.act_max_docs: must be at least 1, not 0"),
        (["compare.act=true", "compare.act_layers=7"],
         "compare.act: --layers 7: '7' is not within the model's layers 0-1"),
        (["compare.act=true", f"compare.act_offensive={blank}"],
         f"compare.act: corpus '{blank}' ({blank}) has no documents"),
        (["modules.act.select=top:1"], "row name is taken"),
    ]:
        with pytest.raises(LmpruneError, match=re.escape(message)):
            load_compare(path, change)


def test_the_dpo_row_is_planned_behind_its_switch_and_moves_no_other_stage(tmp_path):
    from lmprune.compare import relearn_attacks
    from lmprune.methods.dpo import DpoConfig

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("offensive\tclean\n" + "".join(f"bad {i}\tgood {i}\n" for i in range(50)))
    path, folder, plain, on, added = _switched_row(
        tmp_path, "dpo", ["compare.dpo=true", f"compare.dpo_pairs={pairs}",
                          "compare.dpo_beta=0.2", "compare.dpo_max_steps=3",
                          "compare.dpo_max_pairs=16", "relearn.rows=[base, planted, dpo]"])
    assert sorted(added) == ["eval:dpo", "eval:dpo+ft", "finetune:dpo", "prune:dpo",
                             "relearn:dpo@8-held"]  # nothing zeroed: no released attack
    assert ("dpo", 8, "released") not in relearn_attacks(on)
    train = added["prune:dpo"]
    assert isinstance(train.config, DpoConfig)
    assert (train.config.model, train.config.out, train.config.pairs, train.config.beta,
            train.config.max_steps, train.config.lr, train.config.device) == (
        plain.run.model, str(folder.row_model("dpo")), str(pairs), 0.2, 3, 1e-5,
        plain.finetune.device)
    assert train.sources == [plain.run.model, str(pairs)]

    few = tmp_path / "few.tsv"
    few.write_text("offensive\tclean\nbad\tgood\n")
    for change, message in [
        (["compare.dpo_beta=0"], "compare.dpo_beta: must be above 0, not 0.0"),
        (["compare.dpo_batch_size=0"], "compare.dpo_batch_size: must be at least 1, not 0"),
        (["compare.dpo=true", f"compare.dpo_pairs={few}"],
         "compare.dpo: pairs '" + str(few) + "' has 0 training pair(s) after holding 1 out"),
        (["modules.dpo.select=top:1"], "row name is taken"),
    ]:
        with pytest.raises(LmpruneError, match=re.escape(message)):
            load_compare(path, change)
