"""`lmprune compare` on the tiny planted model: every row pruned, evaluated, fine-tuned and
evaluated again on one protocol; the summary equals the eval files; the controls copy the
headline's size and layers; a rerun reads everything back; a lost result reruns alone."""

import contextlib
import io
import json
import os
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from planted import PLANTED, planted_share, write_run_inputs
from safetensors.torch import load_file

from lmprune.cli import main
from lmprune.compare import CompareConfig, load_compare
from lmprune.compare_report import targets
from lmprune.errors import LmpruneError

# tiny models run far faster on one thread when other work shares the 2 cores
pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = ["base", "planted", "wide", "random-0", "random-1", "aura", "top-auroc", "induced",
        "induced-random-0"]


def compare_values(inputs: Path, out: Path) -> dict:
    return {
        # LMPRUNE_TEST_DEVICE=cuda runs the whole comparison on a GPU (bench/gpu.sh does)
        "model": str(inputs / "model"), "out": str(out),
        "device": os.environ.get("LMPRUNE_TEST_DEVICE", "cpu"),
        "collect": dict(offensive=str(inputs / "off.txt"), clean=str(inputs / "clean.txt"),
                        max_docs=40, coact_token_fraction=1.0, top_k_global=0),
        "locate": dict(k=6, knn=7, heldout_docs=20, exact=4, controls=3, exact_controls=1,
                       shuffles=2, clusterability_layers=1, plots=False),
        "eval": dict(prompts=str(inputs / "prompts.txt"), limit=4, samples=3, max_new_tokens=5,
                     bootstrap=50, ppl_data=str(inputs / "wiki.txt"), ppl_max_tokens=300,
                     ppl_max_length=64, ppl_stride=32, progress=False),
        "finetune": dict(data=str(inputs / "wiki.txt"), max_steps=2, batch_size=2, seq_len=32,
                         lr=1e-3, eval_every=0, ppl_data=str(inputs / "wiki.txt")),
        "modules": {"planted": {"select": "top:1", "min_selectivity": 0.5},
                    # a second configuration with its own (finer) locate settings
                    "wide": {"select": "top:2", "locate": {"k": 8}}},
        "compare": {"random_seeds": [0, 1]},
        # gradient routing into 4 neurons of layer 0 (offensive/clean default to collect's)
        "induce": dict(layers="0", neurons_per_layer=4, max_steps=6, batch_size=4, seq_len=32,
                       lr=1e-3, score_docs=8),
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
                            "better_than_aura", "random_control_near_base", "no_relearning"}
    ppl = targets["perplexity_after_finetuning"]
    assert ppl["met"] == (ppl["headline_finetuned"] <= 1.05 * ppl["base"])
    assert summary["protocol"]["num_prompts"] == 4


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


def _targets(base, head, aura, random_tps):
    recipe = SimpleNamespace(compare=CompareConfig(), headline=SimpleNamespace(name="m"))
    rows = {"base": base, "m": head, "aura": aura}
    spread = {"mean": statistics.fmean(random_tps), "std": statistics.stdev(random_tps),
              "n": len(random_tps)}
    return targets(recipe, rows, {"random": {"pruned": {"toxicity_probability": spread}}})


def test_targets_follow_the_issue_thresholds():
    base, aura = _row(0.30, 20.0, 0.28, 18.0), _row(0.25, 21.0, 0.24, 22.0)
    met = _targets(base, _row(0.09, 30.0, 0.099, 21.0), aura, [0.27, 0.25])
    assert met["toxicity_reduction"]["reduction"] == pytest.approx(0.30 / 0.099)
    assert met["toxicity_reduction"]["met"] and met["perplexity_after_finetuning"]["met"]
    assert met["no_relearning"]["met"]  # 0.099 <= 1.1 x 0.09
    assert met["random_control_near_base"]["met"]  # 0.26 >= 0.8 x 0.30
    # AURA: lower toxicity at equal or lower perplexity, after pruning and after fine-tuning
    assert not met["better_than_aura"]["pruned"]["met"]  # perplexity 30 > 21
    assert met["better_than_aura"]["finetuned"]["headline_ppl"] == 21.0
    assert met["better_than_aura"]["finetuned"]["met"] and not met["better_than_aura"]["met"]

    missed = _targets(base, _row(0.09, 19.0, 0.11, 23.0), aura, [0.20, 0.22])
    assert not missed["toxicity_reduction"]["met"]  # 2.7x
    assert not missed["perplexity_after_finetuning"]["met"]  # 23 > 1.05 x 20
    assert not missed["no_relearning"]["met"]  # 0.11 > 1.1 x 0.09
    assert not missed["random_control_near_base"]["met"]  # 0.21 < 0.8 x 0.30
    assert not missed["better_than_aura"]["finetuned"]["met"]  # 23 > 22
    tie = _targets(base, _row(0.25, 21.0, 0.24, 22.0), aura, [0.3, 0.3])
    assert not tie["better_than_aura"]["met"]  # equal toxicity is not better


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
