"""`lmprune run RECIPE` end to end on the tiny planted model: every stage, the report and the
model card; a rerun skips every stage; `--set` reruns one stage and those after it; bad recipes
are refused before any output; a run killed with SIGKILL completes when run again."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from planted import PLANTED, planted_share, write_run_inputs
from safetensors.torch import load_file

from lmprune.cli import main
from lmprune.core.errors import LmpruneError
from lmprune.run.recipe import apply_overrides, load_recipe

# tiny models run far faster on one thread when other work shares the 2 cores
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The planted model (a real module to find), its corpora, prompts and clean text."""
    return write_run_inputs(tmp_path_factory.mktemp("pipeline"))


def recipe_values(inputs: Path, out: Path) -> dict:
    evaluation = dict(prompts=str(inputs / "prompts.txt"), limit=4, samples=3,
                      max_new_tokens=5, bootstrap=50, ppl_data=str(inputs / "wiki.txt"),
                      ppl_max_tokens=400, ppl_max_length=64, ppl_stride=32, progress=False)
    return {
        "model": str(inputs / "model"), "out": str(out), "device": "cpu",
        "collect": dict(offensive=str(inputs / "off.txt"), clean=str(inputs / "clean.txt"),
                        max_docs=40, coact_token_fraction=1.0, top_k_global=16,
                        checkpoint_every=1),
        "locate": dict(k=6, knn=7, heldout_docs=20, exact=4, controls=5, exact_controls=1,
                       shuffles=3, clusterability_layers=1, general_docs=8),
        "prune": dict(select="top:1", min_selectivity=0.5),
        "control": dict(seeds=[1]),
        "eval": evaluation,
        "transfer": dict(prompts=[str(inputs / "prompts.txt")], limit=3),
        "finetune": dict(data=str(inputs / "wiki.txt"), max_steps=4, batch_size=2, seq_len=32,
                         lr=1e-3, eval_every=2, eval_prompts=str(inputs / "prompts.txt"),
                         eval_limit=2, eval_samples=2, eval_max_new_tokens=4,
                         ppl_data=str(inputs / "wiki.txt"), ppl_max_tokens=200,
                         ppl_max_length=64, ppl_stride=32, checkpoint_every=2),
    }


def write_recipe(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def stage_lines(out: str) -> dict[str, str]:
    """{stage: started|resumed|skipped} from the runner's progress lines (the first per stage;
    a stage that ran also prints "done in ...")."""
    states = {}
    for line in out.splitlines():
        if line.startswith("lmprune run: ["):
            stage, state = line.split("] ", 1)[1].split(": ", 1)
            states.setdefault(stage, state.split(" ")[0])
    return states


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    """One complete run, and the captured output of running it."""
    out = tmp_path_factory.mktemp("run") / "run"
    recipe = write_recipe(inputs / "recipe.yaml", recipe_values(inputs, out))
    code, text = _run_inline([str(recipe)])
    assert code == 0, text[-3000:]
    return recipe, out, text


def _run_inline(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["run", *argv])
    return code, buffer.getvalue()


STAGES = ["collect", "locate", "prune", "control-1", "eval:base", "eval:pruned",
          "eval:control-1", "finetune", "finetune:base", "eval:finetuned",
          "eval:base-finetuned", "eval:finetuned@prompts", "eval:base-finetuned@prompts",
          "report"]


def test_the_chain_runs_end_to_end_and_prunes_the_planted_module(finished):
    _, out, text = finished
    assert list(stage_lines(text)) == STAGES
    assert set(stage_lines(text).values()) == {"started"}
    assert text.count(": done in ") == len(STAGES)
    lineage = json.loads((out / "pruned" / "lmprune.json").read_text())
    pruned = lineage["pruned_neurons"]
    assert list(pruned) == ["1"] and set(PLANTED) <= set(pruned["1"]) \
        and len(pruned["1"]) <= len(PLANTED) + 2, "the planted module is what was pruned"
    assert lineage["modules"]["min_selectivity"] == 0.5
    # the control has the same per-layer count, other neurons
    control = json.loads((out / "control-1" / "lmprune.json").read_text())["pruned_neurons"]
    assert len(control["1"]) == len(pruned["1"]) and control["1"] != pruned["1"]
    # the fine-tuned weights keep the pruned neurons at exactly zero
    weights = load_file(out / "finetuned" / "model.safetensors")
    assert not weights["model.layers.1.mlp.down_proj.weight"][:, pruned["1"]].any()
    for name in ("base", "pruned", "control-1", "finetuned"):
        result = json.loads((out / "eval" / f"{name}.json").read_text())
        assert result["toxicity"]["num_prompts"] == 4 and result["perplexity"]["tokens"] == 400
    # each eval measured its own model: the planted behaviour goes with the module, stays with
    # the control and does not come back in fine-tuning
    share = {name: planted_share(out / "eval" / f"{name}.json")
             for name in ("base", "pruned", "control-1", "finetuned")}
    assert share["base"] > 0.9 and share["control-1"] > 0.5, share
    assert share["pruned"] < 0.1 and share["finetuned"] < 0.1, share
    # the base fine-tuned the same way (the fine-tuned model's like) keeps the behaviour
    assert planted_share(out / "eval" / "base-finetuned.json") > 0.9
    tuned = json.loads((out / "base-finetuned" / "lmprune.json").read_text())
    assert tuned["history"][-1]["stage"] == "finetune" and not tuned.get("pruned_neurons")


def test_report_has_the_table_plots_and_the_card(finished, inputs):
    _, out, _ = finished
    report = (out / "report.md").read_text()
    pruned = json.loads((out / "eval" / "pruned.json").read_text())
    tp = pruned["toxicity"]["toxicity_probability"]
    ppl = pruned["perplexity"]["sliding_window"]["token_perplexity"]
    row = next(line for line in report.splitlines() if line.startswith("| after pruning |"))
    assert f"{tp:.3f}" in row and f"{ppl:.2f}" in row
    for label in ("| base (unpruned) |", "| random control (seed 1) |",
                  "| after pruning + fine-tuning |", "| base + the same fine-tuning |"):
        assert label in report
    # each stage against its like, with the ratios computed from the two eval files
    tuned, base_tuned = (json.loads((out / "eval" / f"{n}.json").read_text())
                         for n in ("finetuned", "base-finetuned"))
    like = next(line for line in report.splitlines()
                if line.startswith("| after pruning + fine-tuning | the base model fine-tuned"))
    ratio = (tuned["perplexity"]["sliding_window"]["token_perplexity"]
             / base_tuned["perplexity"]["sliding_window"]["token_perplexity"])
    assert f"| {ratio:.3f} |" in like
    # the verdict comes first: the final model against the base and the control fine-tuned alike
    assert report.index("## Verdict") < report.index("## Results")
    tp_row = next(line for line in report.splitlines()
                  if line.startswith("| Toxicity Probability (profanity_check) |"))
    cells = [cell.strip() for cell in tp_row.split("|")[2:5]]
    for cell, ev in zip(cells, (tuned, base_tuned), strict=False):
        low, high = ev["toxicity"]["toxicity_probability_interval"]
        assert cell == f"{ev['toxicity']['toxicity_probability']:.3f} [{low:.3f}, {high:.3f}]"
    assert cells[2] == "–", "the control was not fine-tuned: it has no like to show"
    transfer = json.loads((out / "eval" / "finetuned@prompts.json").read_text())
    assert transfer["toxicity"]["num_prompts"] == 3 and not transfer.get("perplexity")
    assert any(line.startswith(f"| Toxicity Probability (profanity_check) on `{inputs}")
               for line in report.splitlines())
    holds = "holds" if ratio <= 1.05 else "**does not hold**"
    assert f"- perplexity within 5% of the base fine-tuned the same way: {holds}" \
        in report.splitlines()
    assert "profanity_check" in report and "4 prompts" in report and "x 3 sampled" in report
    assert "Content warning" in report and "**Prompt:**" in report
    for link in ("toxicity_vs_perplexity.png", "modules_specificity.png",
                 "finetuned/relearning.png"):
        assert f"]({link})" in report
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "finetuned" / "README.md").read_text()
    assert "model-index" in card and "Toxicity Probability" in card
    # the fine-tuned model's card sets it against its like, the base fine-tuned the same way
    assert "| metric (lower is better) | base + the same fine-tuning | this model |" in card
    like = json.loads((out / "eval" / "base-finetuned.json").read_text())["toxicity"]
    row = next(r for r in card.splitlines() if r.startswith("| Toxicity Probability |"))
    assert row.split("|")[2].strip().startswith(f"{like['toxicity_probability']:.3f} [")


def test_second_run_skips_every_stage(finished):
    recipe, out, _ = finished
    before = mtimes(out)
    code, text = _run_inline([str(recipe)])
    assert code == 0
    assert stage_lines(text) == {stage: "skipped" for stage in STAGES}
    assert mtimes(out) == before, "a skipped stage rewrote a file"
    # a copied run folder is up to date too (paths inside it count relative to it)
    copy = out.parent / "copy"
    shutil.copytree(out, copy)
    code, text = _run_inline([str(recipe), "--out", str(copy)])
    assert code == 0
    assert stage_lines(text) == {stage: "skipped" for stage in STAGES}


def test_set_reruns_that_stage_and_the_later_ones_only(finished, tmp_path):
    recipe, out, _ = finished
    code, text = _run_inline([str(recipe), "--set", "eval.samples=2"])
    assert code == 0
    states = stage_lines(text)
    assert [s for s in STAGES if states[s] == "skipped"] == [
        "collect", "locate", "prune", "control-1", "finetune", "finetune:base"]
    assert [s for s in STAGES if states[s] == "started"] == [
        "eval:base", "eval:pruned", "eval:control-1", "eval:finetuned", "eval:base-finetuned",
        "eval:finetuned@prompts", "eval:base-finetuned@prompts", "report"]
    assert json.loads((out / "eval" / "base.json").read_text())["toxicity"][
        "samples_per_prompt"] == 2
    assert "x 2 sampled" in (out / "report.md").read_text()


def _env(**extra):
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
            "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_killed_run_completes_when_run_again(inputs, tmp_path, finished):
    """SIGKILL inside collect (tests/killed_cli.py), then during fine-tuning; each rerun goes on,
    and the resumed statistics are those of the run that was never interrupted."""
    out = tmp_path / "run"
    values = recipe_values(inputs, out)
    values["finetune"]["max_steps"] = 40
    values["finetune"]["eval_every"] = 1
    values["control"]["seeds"] = []
    recipe = write_recipe(tmp_path / "recipe.yaml", values)
    command = [sys.executable, "-m", "lmprune.cli", "run", str(recipe)]
    killed = [sys.executable, str(ROOT / "tests" / "killed_cli.py"), "4", *command[3:]]
    died = subprocess.run(killed, env=_env(), capture_output=True, text=True, timeout=240)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert (out / "stats" / ".checkpoint").is_dir()
    assert not (out / "stats" / "manifest.json").exists()

    second = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    checkpoint = out / "finetuned" / "checkpoints" / "step-00000002"
    deadline = time.time() + 240
    while not checkpoint.exists() and second.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(second.pid, signal.SIGKILL)
    text = second.communicate()[0]
    assert stage_lines(text)["collect"] == "resumed"
    assert stage_lines(text)["finetune"] == "started", "killed too late: it had finished"

    code, text = _run_inline([str(recipe)])
    assert code == 0
    states = stage_lines(text)
    assert states["collect"] == states["locate"] == states["eval:base"] == "skipped"
    assert states["finetune"] == "resumed" and states["report"] == "started"
    history = json.loads((out / "finetuned" / "lmprune.json").read_text())["history"]
    assert history[-1]["resumed_from"] >= 2
    assert (out / "report.md").is_file()
    _, whole, _ = finished
    files = sorted(p.name for p in (whole / "stats").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (out / "stats").glob("*.safetensors"))
    for name in files:
        resumed, reference = load_file(out / "stats" / name), load_file(whole / "stats" / name)
        assert resumed.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=f"{name}:{key}")


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["collect"].update(max_doc=10), "collect: unknown key(s) max_doc"),
    (lambda v: v["locate"].update(k="twelve"), "locate.k: expected int"),
    (lambda v: v["collect"].update(offensive="/nowhere/off.txt"),
     "collect.offensive: corpus file not found: /nowhere/off.txt"),
    (lambda v: v["finetune"].update(out="elsewhere"), "finetune.out: set by `lmprune run`"),
    (lambda v: v.update(model="/nowhere/model"), "model: model not found"),
    (lambda v: v.update(colect={}), "recipe: unknown key(s) colect"),
    (lambda v: v["prune"].update(select="best:3"), "prune.select: --select must be"),
    (lambda v: v["eval"].update(fail_above=["toxicity=0.3"]), "eval: --fail-above"),
    (lambda v: v["eval"].update(blimp="skip"), "eval: BLiMP file not found: skip"),
])
def test_bad_recipe_is_refused_before_any_output(inputs, tmp_path, capsys, edit, message):
    values = recipe_values(inputs, tmp_path / "run")
    edit(values)
    recipe = write_recipe(tmp_path / "recipe.yaml", values)
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_bad_set_values_are_refused(inputs, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_values(inputs, tmp_path / "run"))
    assert main(["run", str(recipe), "--set", "collect.max_docs=many"]) == 2
    assert "collect.max_docs: expected int" in capsys.readouterr().err
    assert main(["run", str(recipe), "--set", "colect.max_docs=3"]) == 2
    assert "unknown section 'colect'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_set_reaches_any_depth_and_fills_an_empty_section():
    values = {"finetune": None, "locate": {"k": 4}}
    got = apply_overrides(values, ["finetune.max_steps=3", "locate.k=8", "out=x"])
    assert got == {"finetune": {"max_steps": 3}, "locate": {"k": 8}, "out": "x"}
    assert values == {"finetune": None, "locate": {"k": 4}}  # the recipe as read is kept
    with pytest.raises(LmpruneError, match="'k' is not a section"):
        apply_overrides(values, ["locate.k.x=1"])


RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml")
                 if not p.name.startswith("compare-"))  # comparisons: tests/test_compare.py


def test_general_text_is_the_finetuning_corpus_and_held_out_of_it(inputs, tmp_path):
    """locate's general damage is measured on the last documents of the fine-tuning corpus,
    and fine-tuning (of the pruned model, the base and the controls) leaves them out."""
    from lmprune.compare import parse_compare
    from lmprune.run.recipe import parse_recipe

    values = recipe_values(inputs, tmp_path / "run")
    recipe = parse_recipe(values, "r")
    assert recipe.locate.general == str(inputs / "wiki.txt")
    assert recipe.finetune.holdout_last == 8
    values["locate"]["general"] = "none"
    assert parse_recipe(values, "r").finetune.holdout_last == 0
    values["locate"]["general"] = str(inputs / "clean.txt")  # another text: nothing to hold out
    assert parse_recipe(values, "r").finetune.holdout_last == 0
    values = {k: v for k, v in recipe_values(inputs, tmp_path / "c").items()
              if k not in ("prune", "control", "transfer")}
    values["modules"] = {"a": {"select": "top:1"}, "b": {"select": "top:1",
                                                         "locate": {"general_docs": 12}}}
    comparison = parse_compare(values, "c")
    assert comparison.locate.general == str(inputs / "wiki.txt")
    assert comparison.finetune.holdout_last == 12


def test_the_default_recipe_and_the_hub_one_are_shipped():
    assert {p.name for p in RECIPES} >= {"smollm2-paradetox.yaml", "gpt2-large-rtp.yaml",
                                         "gemma3-270m-paradetox.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    """Keys and types of every recipe; for the offline ones (a bundled model), also that the
    model and every local data file are there."""
    import importlib.util

    from lmprune.core.models import BUNDLED
    from lmprune.run.recipe import check_inputs

    recipe = load_recipe(path, check_files=False)
    # a module selection that guards against modules that raise every loss: by selectivity, by
    # general text, or among the most causal candidate neurons
    assert recipe.prune.select and (recipe.prune.min_selectivity is not None
                                    or recipe.locate.general.lower() != "none"
                                    or recipe.locate.candidates > 0)
    bundled = BUNDLED.get(recipe.run.model)
    if bundled is None:  # a Hub model: keys and types only, no network here
        return
    if importlib.util.find_spec(bundled.package) is None:
        pytest.skip(f"{recipe.run.model} is not installed ({bundled.install})")
    check_inputs(recipe)
