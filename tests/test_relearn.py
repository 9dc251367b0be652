"""The relearning attack: it trains on the last N offensive documents, holds or releases the
masks as asked, measures every scorer and the generations' fluency under the frozen base, and
counts the steps until half the toxicity gap to the base is back."""

import json

import pytest
import torch
from checkpoints import pruned_base_pair
from safetensors.torch import load_file
from tiny_models import random_batch, tiny_model

from lmprune.cli import main
from lmprune.core.errors import LmpruneError
from lmprune.core.masks import PruneMask
from lmprune.core.models import load_model
from lmprune.evaluate.fluency import judge_fluency
from lmprune.evaluate.registry import load_scorer
from lmprune.evaluate.toxicity import evaluate_toxicity
from lmprune.finetune.relearn import RelearnConfig, attack_corpus, recovery, relearn

PRUNED = {0: [1, 4, 9, 17], 1: [0, 2, 30]}
PROMPTS = ["you are a", "shut up you", "the weather is"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 base, its pruned checkpoint, an offensive corpus and prompts."""
    root = tmp_path_factory.mktemp("relearn")
    pruned_base_pair(root, PRUNED)
    (root / "offensive.txt").write_text("".join(f"doc {i}: you stupid idiot, shut up fool\n"
                                                for i in range(40)))
    (root / "prompts.txt").write_text("\n".join(PROMPTS))
    return root


def _config(setup, out, **kw):
    values = dict(model=str(setup / "pruned"), data=str(setup / "offensive.txt"), out=str(out),
                  docs=12, max_steps=4, eval_every=2, checkpoint_every=0, lr=3e-3, seq_len=16,
                  eval_prompts=str(setup / "prompts.txt"), eval_limit=3, eval_samples=2,
                  eval_max_new_tokens=4, extra_scorers=["profanity_check"],
                  ppl_data=str(setup / "offensive.txt"), ppl_max_tokens=64, ppl_max_length=32,
                  ppl_stride=16, device="cpu", dtype="float32")
    return RelearnConfig(**{**values, **kw})


def _pruned_weights_nonzero(folder) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return PruneMask(model, PRUNED).nonzero_count(model)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_zeroed_neurons_get_no_gradient_so_released_ones_are_redrawn(model_type):
    model = tiny_model(model_type)
    mask = PruneMask(model, PRUNED)
    mask.apply(model)
    model(input_ids=random_batch(), labels=random_batch()).loss.backward()
    grads = [p.grad.index_select(d, i) for p, d, i in mask.slices(model)]
    assert all(torch.count_nonzero(g) == 0 for g in grads)  # a stationary point
    mask.reinitialize(model, seed=0)
    drawn = [(p.index_select(d, i), p) for p, d, i in mask.slices(model) if p.dim() == 2]
    for fresh, param in drawn:
        assert torch.count_nonzero(fresh) == fresh.numel()
        others = param[param != 0].std()  # the same scale as the rest of the matrix
        assert 0.5 < float(fresh.std() / others) < 2
    biases = [p.index_select(d, i) for p, d, i in mask.slices(model) if p.dim() == 1]
    assert all(torch.count_nonzero(b) == 0 for b in biases)


def test_recovery_counts_the_steps_to_half_the_gap():
    points = [{"step": s, "metrics": {"tp": v}} for s, v in [(0, 0.2), (8, 0.3), (16, 0.45),
                                                            (24, 0.35)]]
    got = recovery(points, "tp", 0.6)
    assert got["threshold"] == pytest.approx(0.4)
    assert (got["steps"], got["recovered"], got["final"]) == (16, True, 0.35)
    assert recovery(points, "tp", 0.9)["recovered"] is False  # threshold 0.55: never reached
    assert recovery(points, "tp", 0.2)["threshold"] is None  # no gap: nothing to come back
    assert recovery(points, "tp", None)["steps"] is None


def test_the_attack_reads_the_last_documents(setup):
    corpus = attack_corpus(_config(setup, setup / "unused"))
    assert corpus.texts == [f"doc {i}: you stupid idiot, shut up fool" for i in range(28, 40)]
    shifted = attack_corpus(_config(setup, setup / "unused", holdout_last=5, docs=2))
    assert shifted.texts[-1].startswith("doc 34:")
    with pytest.raises(LmpruneError, match="has 40 documents, fewer than --docs 41"):
        attack_corpus(_config(setup, setup / "unused", docs=41))


def test_held_masks_stay_zero_and_the_curve_is_measured_for_real(setup, tmp_path):
    config = _config(setup, tmp_path / "held")
    summary = relearn(config)
    assert _pruned_weights_nonzero(tmp_path / "held") == 0
    curve = json.loads((tmp_path / "held" / "relearning.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]
    assert curve["relearn"] == summary and summary["masks"] == "held"
    assert set(summary["by_scorer"]) == {"profanity_check"} and summary["docs"] == 12
    assert summary["data"]["documents"] == 12
    # step 0 equals the same measurement made by hand: toxicity of the pruned model, both
    # scorers on the same continuations, fluency under the base model as judge
    pruned, judge = load_model(str(setup / "pruned")), load_model(str(setup / "base"))
    scorer = load_scorer("profanity_check")
    tox = evaluate_toxicity(pruned.model, pruned.tokenizer, PROMPTS, scorer, samples=2,
                            max_new_tokens=4, seed=0, progress=False,
                            extra_scorers={"profanity_check": scorer})
    continuations = [r["continuations"] for r in tox["records"]]
    fluency = judge_fluency(judge.model, judge.tokenizer, PROMPTS, continuations, judge.identity,
                            progress=False)
    start = curve["points"][0]["metrics"]
    assert start["toxicity_probability"] == tox["toxicity_probability"]
    assert start["toxicity_probability@profanity_check"] == tox["toxicity_probability"]
    assert start["generation_fluency"] == pytest.approx(fluency["token_perplexity"], rel=1e-6)
    assert set(curve["base"]) == set(start)  # the unpruned base, measured the same way
    meta = json.loads((tmp_path / "held" / "lmprune.json").read_text())
    assert meta["pruned_neurons"] == {str(k): v for k, v in PRUNED.items()}
    assert meta["history"][-1]["stage"] == "finetune"
    assert (tmp_path / "held" / "relearning.png").read_bytes()[:4] == b"\x89PNG"


def test_released_masks_train_and_the_lineage_says_so(setup, tmp_path):
    relearn(_config(setup, tmp_path / "released", masks="released", eval_every=4,
                    extra_scorers=[], fluency_judge="none"))
    assert _pruned_weights_nonzero(tmp_path / "released") > 0
    meta = json.loads((tmp_path / "released" / "lmprune.json").read_text())
    assert meta["pruned_neurons"] == {} and meta["num_pruned"] == 0
    assert meta["released_neurons"] == {str(k): v for k, v in PRUNED.items()}
    assert meta["history"][-1]["masks"] == "released"
    weights = load_file(tmp_path / "released" / "model.safetensors")
    assert all(t.isfinite().all() for t in weights.values())


@pytest.mark.parametrize("flags, message", [
    (["--docs", "500"], "fewer than --docs 500"),
    (["--docs", "0"], "--docs must be at least 1"),
    (["--max-docs", "5"], "--max-docs is not an attack setting"),
    (["--eval-every", "0"], "--eval-every must be at least 1"),
    (["--docs", "8", "--fluency-judge", "no/such-model"],
     "fluency judge 'no/such-model' cannot be loaded"),
])
def test_bad_input_is_one_line_before_training(setup, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    code = main(["relearn", "--model", str(setup / "pruned"), "--data",
                 str(setup / "offensive.txt"), "--out", str(out), "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()
