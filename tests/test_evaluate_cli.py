"""`lmprune eval` end to end on a tiny saved model: JSON fields, records, gates, bad input."""

import json
import statistics

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmprune.cli import main
from tests.test_evaluate_perplexity import TEXT, guide_perplexity
from tests.tiny_models import save_tiny

PROMPTS = ["hello there", "The quick brown fox", "xyz 123!", "what a day"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_tiny("llama", root / "model")
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": {"text": p}}) + "\n" for p in PROMPTS))
    (root / "wiki.txt").write_text(TEXT.replace(". ", ".\n"))
    return root


def lmprune_lines(err: str) -> list[str]:
    """Our messages on stderr (transformers' weight-loading progress bar goes there too)."""
    return [line for line in err.splitlines() if line.startswith("lmprune")]


def run(setup, *extra):
    return main(["eval", "--model", str(setup / "model"), "--device", "cpu",
                 "--prompts", f"{setup / 'prompts.jsonl'}?field=prompt.text",
                 "--ppl-data", str(setup / "wiki.txt"), "--ppl-max-length", "64",
                 "--ppl-stride", "32", "--samples", "3", "--max-new-tokens", "5",
                 "--bootstrap", "100", "--no-progress", *extra])


def test_json_records_and_determinism(setup, capsys):
    out = setup / "res" / "eval.json"
    assert run(setup, "--json", str(out)) == 0
    result = json.loads(out.read_text())
    tox, ppl = result["toxicity"], result["perplexity"]
    for name in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
        low, high = tox[f"{name}_interval"]
        assert low <= tox[name] <= high
    assert tox["scorer"].startswith("profanity_check (alt-profanity-check ")
    assert tox["num_prompts"] == 4 and tox["samples_per_prompt"] == 3
    assert tox["prompts"]["sha256"] == tox["prompts_sha256"]
    assert set(ppl) >= {"sliding_window", "non_overlapping"}
    assert ppl["sliding_window"]["token_perplexity"] > 1
    records = [json.loads(line) for line in
               (out.parent / "eval.continuations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS
    assert all(len(r["continuations"]) == 3 == len(r["scores"]) for r in records)
    # the metrics, recomputed from the records by their definitions (Gehman et al. 2020)
    scores = [r["scores"] for r in records]  # [prompts][samples]
    assert [r["max_score"] for r in records] == [max(s) for s in scores]
    assert tox["expected_max_toxicity"] == pytest.approx(statistics.fmean(map(max, scores)))
    assert tox["toxicity_probability"] == pytest.approx(
        statistics.fmean(any(x >= 0.5 for x in s) for s in scores))
    assert tox["mean_toxicity"] == pytest.approx(statistics.fmean(x for s in scores for x in s))
    # perplexity: the documents joined by blank lines, as the Hugging Face guide computes it
    docs = [line for line in (setup / "wiki.txt").read_text().splitlines() if line.strip()]
    model = AutoModelForCausalLM.from_pretrained(setup / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(setup / "model")
    assert ppl["sliding_window"]["token_perplexity"] == pytest.approx(
        guide_perplexity(model, tokenizer, "\n\n".join(docs), 64, 32), rel=1e-4)
    # same seed: same continuations, same numbers
    again = setup / "res" / "again.json"
    assert run(setup, "--json", str(again)) == 0
    assert (setup / "res" / "again.continuations.jsonl").read_text() == \
        (out.parent / "eval.continuations.jsonl").read_text()
    second = json.loads(again.read_text())
    assert second["toxicity"]["expected_max_toxicity"] == tox["expected_max_toxicity"]
    assert second["perplexity"]["sliding_window"] == ppl["sliding_window"]


def test_gates(setup, capsys):
    out = setup / "gate.json"
    assert run(setup, "--json", str(out), "--prompts", "none",
               "--fail-above", "perplexity=1000000", "--fail-below", "perplexity=1") == 0
    ppl = json.loads(out.read_text())["perplexity"]["sliding_window"]["token_perplexity"]
    capsys.readouterr()
    code = run(setup, "--json", str(out), "--prompts", "none", "--fail-above", "perplexity=2")
    assert code == 1
    err = lmprune_lines(capsys.readouterr().err)
    assert err == [f"lmprune: gate failed: perplexity.sliding_window.token_perplexity = "
                   f"{ppl:.6g} > 2"]
    gates = json.loads(out.read_text())["gates"]  # the result is written before the gate
    assert gates == [{"metric": "perplexity.sliding_window.token_perplexity",
                      "fails_if": "> 2", "value": ppl, "passed": False}]
    # dotted path, and a below-gate
    assert run(setup, "--prompts", "none",
               "--fail-below", "perplexity.non_overlapping.token_perplexity=1e9") == 1
    assert "perplexity.non_overlapping.token_perplexity" in capsys.readouterr().err
    # toxicity gates: TP is in [0, 1], so > 1.5 never fails and < -1 never fails
    assert run(setup, "--ppl-data", "none", "--fail-above", "toxicity_probability=1.5",
               "--fail-below", "expected_max_toxicity=-1") == 0


@pytest.mark.parametrize("args,message", [
    (["--fail-above", "toxicity=0.3"], "unknown metric 'toxicity'"),
    (["--fail-above", "perplexity"], "expected METRIC=VALUE"),
    (["--ppl-data", "none", "--fail-above", "perplexity=3"], "not in the result"),
    (["--scorer", "hf:/no/such/model"], "sequence-classification model"),
    (["--scorer", "detoxify:original"], "config"),
    (["--prompts", "none", "--ppl-data", "none"], "nothing to evaluate"),
    (["--fluency-judge", "/no/such/judge"], "fluency judge '/no/such/judge' (--fluency-judge)"),
    (["--extra-scorers", "nonsense"], "unknown scorer 'nonsense'"),
    (["--blimp", "/no/such/blimp.jsonl"], "blimp"),
])
def test_bad_input_exits_2(setup, capsys, args, message):
    assert run(setup, *args) == 2
    lines = lmprune_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("lmprune: error: ") and message in lines[0]


def test_prompt_file_without_field_and_empty(setup, capsys, tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    assert run(setup, "--prompts", f"{tmp_path / 'p.jsonl'}?field=prompt.text") == 2
    assert "no text field 'prompt.text'" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert run(setup, "--prompts", str(tmp_path / "empty.jsonl")) == 2
    assert "has no documents" in capsys.readouterr().err


def test_fluency_judge_is_the_lineage_base_and_scorers_side_by_side(setup, tmp_path):
    """A checkpoint whose lineage names a base model is judged by that base; a second scorer
    scores the very same continuations (here the same scorer twice: identical figures)."""
    import shutil

    from lmprune.evaluate.fluency import judge_fluency

    pruned = tmp_path / "pruned"
    save_tiny("llama", pruned, seed=1)  # other weights than the base
    (pruned / "lmprune.json").write_text(json.dumps(
        {"format": "lmprune.checkpoint", "base_model": {"name": str(setup / "model"),
                                                        "kind": "folder"}}))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(pruned), "--device", "cpu",
                 "--prompts", f"{setup / 'prompts.jsonl'}?field=prompt.text",
                 "--ppl-data", "none", "--samples", "3", "--max-new-tokens", "5",
                 "--bootstrap", "100", "--no-progress", "--json", str(out),
                 "--extra-scorers", "profanity_check"]) == 0
    result = json.loads(out.read_text())
    fluency, tox = result["fluency"], result["toxicity"]
    assert fluency["judge"] == str(setup / "model")
    records = [json.loads(line) for line in
               (tmp_path / "eval.continuations.jsonl").read_text().splitlines()]
    base = AutoModelForCausalLM.from_pretrained(setup / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(setup / "model")
    expected = judge_fluency(base, tokenizer, PROMPTS, [r["continuations"] for r in records],
                             {"name": "base"}, bootstrap=100, progress=False)
    assert fluency["token_perplexity"] == pytest.approx(expected["token_perplexity"], rel=1e-5)
    assert [x for r in records for x in r["fluency_perplexity"]] == pytest.approx(
        [x for row in expected["per_continuation"] for x in row], rel=1e-5)
    other = tox["by_scorer"]["profanity_check"]
    for name in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
        assert other[name] == tox[name]
    assert all(r["scores_by_scorer"]["profanity_check"] == r["scores"] for r in records)
    # judged by the checkpoint itself instead: another figure (other weights)
    shutil.rmtree(tmp_path / "again", ignore_errors=True)
    assert main(["eval", "--model", str(pruned), "--device", "cpu", "--json",
                 str(tmp_path / "again" / "e.json"), "--fluency-judge", str(pruned),
                 "--prompts", f"{setup / 'prompts.jsonl'}?field=prompt.text",
                 "--ppl-data", "none", "--samples", "3", "--max-new-tokens", "5",
                 "--bootstrap", "100", "--no-progress"]) == 0
    itself = json.loads((tmp_path / "again" / "e.json").read_text())["fluency"]
    assert itself["judge"] == str(pruned)
    assert itself["token_perplexity"] != pytest.approx(fluency["token_perplexity"], rel=1e-3)
