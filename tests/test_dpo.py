"""`lmprune dpo` (DPO, Rafailov et al. 2023, against toxicity as Lee et al. 2024) on tiny random
models: TRL's loss and reward margins equal a hand computation from the policy's and the
reference's summed log-probabilities; in a planted setting (every rejected text holds a 'q')
training raises the held-out margin and lowers the probability of 'q' more than of any other
letter, while the KL to the reference stays small, and smaller with a larger beta; a pruned
input keeps its masks; lineage, reload and the one-line refusals; the prompt."""

import copy
import json
import random
import tempfile

import pytest
import torch
import torch.nn.functional as F
from checkpoints import randomly_pruned
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

from lmprune.cli import main
from lmprune.core.data import Pairs
from lmprune.core.masks import PruneMask
from lmprune.core.models import load_model
from lmprune.methods.dpo import (
    DpoConfig,
    build_trainer,
    dpo_train,
    hold_masks_callback,
    prompt_text,
    read_pairs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "abcdefghijklmnoprstuvwxy"  # no 'q': the planted token


def planted_pairs(n: int, seed: int) -> Pairs:
    """(offensive, clean): a random letter string, and the same string with one letter 'q'."""
    rng = random.Random(seed)
    offensive, clean = [], []
    for _ in range(n):
        text = "".join(rng.choice(LETTERS + " ") for _ in range(rng.randint(6, 14)))
        at = rng.randrange(len(text))
        offensive.append(text[:at] + "q" + text[at + 1:])
        clean.append(text)
    return Pairs("planted", "planted", offensive, clean)


def write_pairs(path, pairs: Pairs, header=("offensive", "clean")):
    rows = zip(pairs.offensive, pairs.clean, strict=True)
    path.write_text("\t".join(header) + "\n" + "".join(f"{o}\t{c}\n" for o, c in rows))
    return path


@torch.no_grad()
def summed_logps(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Each text's log-probability after BOS, its closing EOS included, one text per forward
    pass (no padding). [len(texts)]"""
    out = []
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text).input_ids,
                             tokenizer.eos_token_id]])  # [1, pos]
        logps = F.log_softmax(model(ids).logits[0, :-1].float(), -1)  # [pos - 1, vocab]
        out.append(logps.gather(1, ids[0, 1:, None]).sum())
    return torch.stack(out)


def train_planted(beta: float, steps: int = 30, lr: float = 3e-4):
    """(trained model, its untouched start) after DPO on 8 fresh planted pairs per step."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    start = copy.deepcopy(model)
    config = DpoConfig(beta=beta, lr=lr, max_steps=steps, batch_size=8, warmup_steps=0,
                       device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = build_trainer(config, model, tok, planted_pairs(8 * steps, seed=1), None,
                                scratch)
        trainer.train()
    model.__dict__.pop("forward", None)
    return model.eval(), start


# --------------------------------------------------------------------------------------------
# The loss


def test_the_loss_and_margins_are_the_hand_computed_dpo_ones(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    reference = copy.deepcopy(model)
    pairs = planted_pairs(6, seed=0)
    beta = 0.3
    config = DpoConfig(beta=beta, batch_size=6, max_steps=1, device="cpu")
    trainer = build_trainer(config, model, tok, pairs, None, str(tmp_path))
    with torch.no_grad():  # the policy moves off the reference: the log-ratios are not zero
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)

    policy_c, policy_r = (summed_logps(model, tok, pairs.clean),
                          summed_logps(model, tok, pairs.offensive))
    ref_c, ref_r = (summed_logps(reference, tok, pairs.clean),
                    summed_logps(reference, tok, pairs.offensive))
    logits = (policy_c - ref_c) - (policy_r - ref_r)  # [pairs]
    assert float(logits.abs().min()) > 0.1
    expected = -F.logsigmoid(beta * logits).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    metrics = trainer._metrics["eval"]  # the model is in eval mode
    assert metrics["rewards/margins"][-1] == pytest.approx(float((beta * logits).mean()),
                                                           abs=1e-5)
    assert metrics["rewards/chosen"][-1] == pytest.approx(float(beta * (policy_c - ref_c).mean()),
                                                          abs=1e-5)


def test_the_prompt_is_one_start_token_unless_the_tokenizer_adds_its_own():
    tok = tiny_tokenizer()
    assert prompt_text(tok) == "<s>"
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("ab")["input_ids"][0] == 1 and prompt_text(tok) == ""


# --------------------------------------------------------------------------------------------
# Properties from the paper


def test_training_prefers_the_clean_text_on_held_out_pairs_with_the_kl_bounded():
    """Every rejected text holds a 'q' its chosen twin lacks: on held-out pairs the implicit
    reward margin turns positive, the policy's log-ratio to the reference falls for the rejected
    texts, and the next-token probability of 'q' drops more than that of any other letter; the
    KL to the reference stays small, and a larger beta keeps it smaller (beta's role)."""
    tok = tiny_tokenizer()
    held = planted_pairs(48, seed=99)
    q = tok.convert_tokens_to_ids("q")
    letters = tok.convert_tokens_to_ids(list(LETTERS))
    enc = tok(held.clean, padding=True, return_tensors="pt", padding_side="right")
    ids = torch.cat([torch.ones(len(held), 1, dtype=torch.long), enc.input_ids], 1)  # BOS first
    mask = torch.cat([torch.ones(len(held), 1, dtype=torch.long), enc.attention_mask], 1).bool()

    kl = {}
    for beta in (0.1, 1.0):
        model, reference = train_planted(beta)
        ratio_c = summed_logps(model, tok, held.clean) - summed_logps(reference, tok, held.clean)
        ratio_r = (summed_logps(model, tok, held.offensive)
                   - summed_logps(reference, tok, held.offensive))
        margins = beta * (ratio_c - ratio_r)  # [pairs]
        assert float((margins > 0).float().mean()) > 0.9 and float(ratio_r.mean()) < 0
        with torch.no_grad():
            policy = F.log_softmax(model(ids, attention_mask=mask).logits, -1)[mask]
            ref = F.log_softmax(reference(ids, attention_mask=mask).logits, -1)[mask]
        shift = (policy - ref).mean(0)  # mean log-probability change per token [vocab]
        assert float(shift[q]) < 0 and float(shift[q]) < float(shift[letters].min()) - 0.2
        kl[beta] = float((policy.exp() * (policy - ref)).sum(-1).mean())  # nats per position
    assert kl[0.1] < 0.5 and kl[1.0] < kl[0.1] / 2, kl


# --------------------------------------------------------------------------------------------
# The stage: lineage, reload, masks, refusals


def _dpo(capsys, *argv):
    code = main(["dpo", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_a_checkpoint_that_reloads_with_identical_logits(tmp_path, capsys):
    # an earlier pruning: its zeroed neurons must stay zero through the training
    randomly_pruned(tmp_path / "m", {0: [1, 5], 1: [7]})
    pairs = write_pairs(tmp_path / "p.tsv", planted_pairs(40, seed=2))
    argv = ["--model", str(tmp_path / "m"), "--pairs", str(pairs), "--out", str(tmp_path / "o"),
            "--max-steps", "3", "--batch-size", "4", "--max-pairs", "12", "--eval-pairs", "8",
            "--lr", "1e-3", "--device", "cpu"]
    code, out, err = _dpo(capsys, *argv)
    assert code == 0, err
    assert "DPO: 3 steps on 12 pairs" in out and "held-out margin" in out
    meta = json.loads((tmp_path / "o" / "lmprune.json").read_text())
    assert meta["mode"] == "dpo" and meta["base_model"]["name"] == "tiny"
    assert meta["pruned_neurons"] == {"0": [1, 5], "1": [7]} and meta["num_pruned"] == 3
    assert [h["stage"] for h in meta["history"]] == ["prune", "dpo"]
    record = meta["dpo"]
    assert (record["beta"], record["lr"], record["max_steps"], record["batch_size"],
            record["optimizer"], record["prompt"]) == (0.1, 1e-3, 3, 4, "rmsprop", "<s>")
    assert record["pairs"]["pairs"] == 12 and record["held_out"]["pairs"] == 8
    assert record["pairs"]["spec"] == str(pairs)
    for summary in (record["train"]["last"], record["eval"]):
        assert set(summary) == {"loss", "reward_chosen", "reward_rejected", "reward_margin",
                                "reward_accuracy"}
        assert summary["reward_margin"] == pytest.approx(
            summary["reward_chosen"] - summary["reward_rejected"], abs=1e-5)
    assert record["train"]["mean_loss"] > 0 and record["seconds"] >= 0

    # the same training in memory gives the saved model's logits exactly
    config = DpoConfig(model=str(tmp_path / "m"), pairs=str(pairs), max_steps=3, batch_size=4,
                       max_pairs=12, eval_pairs=8, lr=1e-3, device="cpu")
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    dpo_train(config, loaded, *read_pairs(config))
    reloaded = load_model(str(tmp_path / "o"), dtype="float32")
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    base = load_model(str(tmp_path / "m")).model
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reloaded.model(ids).logits)
        assert not torch.equal(base(ids).logits, reloaded.model(ids).logits)
    PruneMask.from_checkpoint(reloaded.model, tmp_path / "o").check(reloaded.model)


def test_the_callback_zeroes_pruned_gradients_and_weights():
    model = tiny_model("gpt2")
    mask = PruneMask(model, {1: [0, 3]})
    callback = hold_masks_callback(mask)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    callback.on_pre_optimizer_step(None, None, None, model=model)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, full in mask.as_tensors(model).items():
        assert not grads[name][full].any() and grads[name][~full].eq(1).all()
    assert mask.nonzero_count(model) > 0
    callback.on_optimizer_step(None, None, None, model=model)
    mask.check(model)


def test_held_out_pairs_never_train_and_the_draw_is_seeded(tmp_path):
    pairs = write_pairs(tmp_path / "p.tsv", planted_pairs(30, seed=4))
    config = DpoConfig(pairs=str(pairs), max_pairs=10, eval_pairs=8, batch_size=4)
    train, held = read_pairs(config)
    assert len(train) == 10 and len(held) == 8
    assert not set(train.offensive) & set(held.offensive)
    again, _ = read_pairs(config)
    assert again.offensive == train.offensive
    index = dict(zip(planted_pairs(30, seed=4).offensive, planted_pairs(30, seed=4).clean,
                     strict=True))
    assert all(index[o] == c for o, c in zip(train.offensive, train.clean, strict=True))


def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    save_tiny("llama", tmp_path / "m")
    good = str(write_pairs(tmp_path / "p.tsv", planted_pairs(40, seed=0)))
    capsys.readouterr()  # the save's progress bar
    cases = [
        (["--pairs", str(write_pairs(tmp_path / "t.tsv", planted_pairs(3, 0),
                                     ("toxic", "neutral")))],
         "has no column 'offensive' (columns: toxic, neutral)"),
        (["--pairs", str(write_pairs(tmp_path / "few.tsv", planted_pairs(10, 0))),
          "--batch-size", "8", "--eval-pairs", "4"],
         "has 6 training pair(s) after holding 4 out (--eval-pairs): a batch needs "
         "--batch-size 8"),
        (["--pairs", str(tmp_path / "none.tsv")], "pairs file not found"),
        (["--pairs", good, "--model", str(tmp_path / "nowhere")], str(tmp_path / "nowhere")),
        (["--pairs", good, "--beta", "0"], "--beta must be above 0, not 0.0"),
        (["--pairs", good, "--beta", "-0.1"], "--beta must be above 0, not -0.1"),
        (["--pairs", good, "--lr", "nan"], "--lr must be a finite number"),
        (["--pairs", good, "--max-steps", "0"], "--max-steps must be at least 1, not 0"),
        (["--pairs", good, "--device", "tpu"], "--device 'tpu' is not one of auto, cpu, cuda"),
    ]
    for extra, message in cases:
        argv = ["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--max-pairs", "8",
                "--eval-pairs", "4", *extra]
        code, _, err = _dpo(capsys, *argv)
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and err.startswith("lmprune: error: "), (extra, err)
        assert message in err, (extra, err)
        assert not (tmp_path / "o").exists()
