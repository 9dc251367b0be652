"""Fine-tuning: pruned weights stay exactly zero (1 and 2 processes), the rest trains, a run
killed with SIGKILL resumes to the same weights, and the relearning curve records what an
evaluator measured on the base, the pruned start and every N steps."""

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import pruned_base_pair
from safetensors.torch import load_file
from tiny_models import mean_token_nll, random_batch, save_tiny, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmprune.core.data import load_corpus
from lmprune.core.errors import LmpruneError
from lmprune.core.masks import PruneMask
from lmprune.core.models import load_model
from lmprune.core.training import (
    BlockOrder,
    distillation_loss,
    make_optimizer,
    make_scheduler,
    pack_blocks,
    train_step,
)
from lmprune.finetune.command import FinetuneConfig, build_evaluator, finetune, training_corpus

ROOT = Path(__file__).resolve().parents[1]
PRUNED = {0: [1, 4, 9, 17], 1: [0, 2, 30]}
OFFENSIVE = ["you stupid idiot!", "shut up, fool", "what a dumb jerk"]
CLEAN = ["the weather is nice", "we went to the park", "read a good book"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny GPT-2 (it has dropout: RNG state matters), a pruned checkpoint, a corpus."""
    root = tmp_path_factory.mktemp("ft")
    pruned_base_pair(root, PRUNED)
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog, again and again."
             for i in range(120)]
    (root / "train.txt").write_text("\n".join(lines))
    return root


def _config(setup, out, **kw):
    values = dict(model=str(setup / "pruned"), data=str(setup / "train.txt"), out=str(out),
                  max_steps=6, batch_size=4, seq_len=32, lr=3e-3, weight_decay=0.1,
                  warmup_steps=1, device="cpu")
    return FinetuneConfig(**{**values, **kw})


def _env():
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
            "OMP_NUM_THREADS": "1"}


def _assert_held_and_trained(setup, out):
    start = AutoModelForCausalLM.from_pretrained(setup / "pruned")
    tuned = AutoModelForCausalLM.from_pretrained(out)
    mask = PruneMask.from_checkpoint(tuned, out)
    assert mask.num_neurons == 7
    assert mask.nonzero_count(tuned) == 0, "a pruned weight is not exactly zero"
    for name, pruned in mask.as_tensors(tuned).items():
        before, after = start.get_parameter(name), tuned.get_parameter(name)
        changed = (before != after)[~pruned].float().mean()
        assert changed > 0.9, f"{name}: unpruned weights did not train ({changed:.0%} changed)"


def test_pack_blocks_and_block_order():
    tok = tiny_tokenizer()
    blocks = pack_blocks(tok, ["abc", "de"], 3)  # a b c </s> d e </s> -> 2 blocks of 3
    assert blocks.tolist() == [tok.convert_tokens_to_ids(list("abc")),
                               tok.convert_tokens_to_ids(["</s>", "d", "e"])]
    order = BlockOrder(5, seed=0)
    first, second = order.take(0, 5), order.take(5, 5)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(5))
    assert not torch.equal(first, second)
    assert torch.equal(BlockOrder(5, seed=0).take(3, 4), torch.cat([first, second])[3:7])
    with pytest.raises(LmpruneError, match="fewer than one block"):
        pack_blocks(tok, ["ab"], 10)


def test_train_step_masks_gradients_moments_and_weights():
    """From weights that are not yet zero, so the pruned slices do get gradients (a fully
    zeroed neuron is a stationary point: its gradients are exactly zero anyway)."""
    from accelerate import Accelerator

    model = tiny_model("llama").train()
    mask = PruneMask(model, PRUNED)
    optimizer = make_optimizer(model, 1e-2, 0.1)
    scheduler = make_scheduler(optimizer, "constant", 0, 10)
    batches = [random_batch(4, 16, seed=0), random_batch(4, 16, seed=1)]
    train_step(Accelerator(cpu=True), model, optimizer, scheduler, batches, mask, 1.0)
    assert mask.nonzero_count(model) == 0
    for name, pruned in mask.as_tensors(model).items():
        state = optimizer.state[model.get_parameter(name)]
        assert not state["exp_avg"][pruned].any() and not state["exp_avg_sq"][pruned].any()
        assert state["exp_avg"][~pruned].abs().sum() > 0


def test_masks_listed_in_the_checkpoint_are_applied_before_training(setup, tmp_path):
    """A checkpoint whose lmprune.json lists neurons that its weights still carry (edited by hand,
    or pruned by another tool): fine-tuning zeroes them first and holds them, mid-run too."""
    listed = tmp_path / "listed"
    shutil.copytree(setup / "base", listed)
    meta = json.loads((setup / "pruned" / "lmprune.json").read_text())
    (listed / "lmprune.json").write_text(json.dumps(meta))
    start = AutoModelForCausalLM.from_pretrained(listed)
    assert PruneMask(start, PRUNED).nonzero_count(start) > 0
    out = finetune(_config(setup, tmp_path / "out", model=str(listed), checkpoint_every=2,
                           max_steps=4))
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert PruneMask.from_checkpoint(tuned, out).nonzero_count(tuned) == 0
    assert json.loads((out / "lmprune.json").read_text())["pruned_neurons"] == \
        meta["pruned_neurons"]


def test_masks_hold_exactly_and_the_rest_trains(setup, tmp_path):
    out = finetune(_config(setup, tmp_path / "out", grad_accum=2, schedule="cosine"))
    _assert_held_and_trained(setup, out)
    meta = json.loads((out / "lmprune.json").read_text())
    assert meta["pruned_neurons"] == {str(k): v for k, v in PRUNED.items()}
    entry = meta["history"][-1]
    assert [h["stage"] for h in meta["history"]] == ["prune", "finetune"]
    assert entry["steps"] == 6 and entry["lr"] == 3e-3 and entry["num_processes"] == 1
    assert entry["data"]["sha256"] == load_corpus(str(setup / "train.txt")).sha256
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_masks_hold_with_two_processes(setup, tmp_path):
    out = tmp_path / "out2"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "lmprune.cli",
           "finetune", "--model", str(setup / "pruned"), "--data", str(setup / "train.txt"),
           "--out", str(out), "--max-steps", "4", "--batch-size", "2", "--seq-len", "32",
           "--lr", "3e-3", "--weight-decay", "0.1", "--device", "cpu"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_held_and_trained(setup, out)
    history = json.loads((out / "lmprune.json").read_text())["history"]
    assert history[-1]["num_processes"] == 2


@pytest.mark.slow
def test_two_processes_and_accumulation_take_the_same_steps_as_one_batch(setup, tmp_path):
    """Batch 4 in one process, 2 x 2 accumulated, and 2 processes x 2 see the same blocks per
    step and average the same gradients: the weights agree (LLaMA: no dropout to differ)."""
    save_tiny("llama", tmp_path / "llama")
    common = ["--model", str(tmp_path / "llama"), "--data", str(setup / "train.txt"),
              "--max-steps", "3", "--seq-len", "32", "--lr", "3e-3", "--device", "cpu"]
    one = finetune(_config(setup, tmp_path / "one", model=str(tmp_path / "llama"), max_steps=3,
                           batch_size=4, weight_decay=0.0, warmup_steps=0))
    accumulated = finetune(_config(setup, tmp_path / "acc", model=str(tmp_path / "llama"),
                                   max_steps=3, batch_size=2, grad_accum=2, weight_decay=0.0,
                                   warmup_steps=0))
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "lmprune.cli", "finetune",
           *common, "--out", str(tmp_path / "two"), "--batch-size", "2", "--weight-decay", "0",
           "--warmup-steps", "0"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = load_file(tmp_path / "llama" / "model.safetensors")
    reference = load_file(one / "model.safetensors")
    assert any(not torch.equal(start[k], v) for k, v in reference.items()), "nothing trained"
    for other in (accumulated, tmp_path / "two"):
        weights = load_file(other / "model.safetensors")
        for name, value in reference.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _deterministic_evaluator(model, tokenizer, step):
    """Stands in for toxicity/perplexity: losses on fixed texts (deterministic)."""
    return {"offensive_loss": mean_token_nll(model, tokenizer, OFFENSIVE),
            "perplexity": math.exp(mean_token_nll(model, tokenizer, CLEAN))}


def test_relearning_curve_has_base_start_and_every_n_steps(setup, tmp_path, monkeypatch):
    step_losses = []  # each optimizer step's mean micro-batch loss

    def recording_step(*args):
        total = train_step(*args)
        step_losses.append(total / len(args[4]))
        return total

    monkeypatch.setattr("lmprune.finetune.command.train_step", recording_step)
    out = finetune(_config(setup, tmp_path / "curve", max_steps=5, eval_every=2, grad_accum=2),
                   _deterministic_evaluator)
    curve = json.loads((out / "relearning.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4, 5]
    tok = tiny_tokenizer()

    def measured(folder):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        return _deterministic_evaluator(model, tok, 0)

    for got, want in [(curve["base"], measured(setup / "base")),
                      (curve["points"][0]["metrics"], measured(setup / "pruned")),
                      (curve["points"][-1]["metrics"], measured(out))]:
        assert got == pytest.approx(want, rel=1e-5)
    # each point's training loss: the mean over the steps since the previous point
    for point, steps in zip(curve["points"][1:], ([0, 1], [2, 3], [4]), strict=True):
        assert point["train_loss"] == pytest.approx(statistics.fmean(step_losses[i] for i in steps))
    assert (out / "relearning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_RESUME_CONFIG = dict(max_steps=6, checkpoint_every=2, eval_every=1, base_model="none")
_RESUME_SCRIPT = f"""
import sys, time
from lmprune.finetune.command import FinetuneConfig, finetune

def slow_evaluator(model, tokenizer, step):  # leaves time to kill the run between steps
    time.sleep(0.4)
    return {{"weight_sum": float(sum(p.sum() for p in model.parameters()))}}

model, data, out = sys.argv[1:]
finetune(FinetuneConfig(model=model, data=data, out=out, batch_size=4, seq_len=32, lr=3e-3,
                        weight_decay=0.1, warmup_steps=1, device="cpu", **{_RESUME_CONFIG!r}),
         slow_evaluator)
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(setup, tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(_RESUME_SCRIPT)
    command = [sys.executable, str(script), str(setup / "pruned"), str(setup / "train.txt"),
               str(tmp_path / "run")]
    killed = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    deadline = time.time() + 120
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "run" / "lmprune.json").exists(), "killed too late: it had finished"

    # Rerun (here, in this process: same settings, same single thread), and the reference.
    def fast_evaluator(model, tokenizer, step):
        return {"weight_sum": 0.0}

    finetune(_config(setup, tmp_path / "run", **_RESUME_CONFIG), fast_evaluator)
    assert "resuming from" in capsys.readouterr().out
    reference = finetune(_config(setup, tmp_path / "ref", **_RESUME_CONFIG), fast_evaluator)
    want = load_file(reference / "model.safetensors")
    got = load_file(tmp_path / "run" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs after resuming"
    curve = json.loads((tmp_path / "run" / "relearning.json").read_text())
    assert [p["step"] for p in curve["points"]] == list(range(7))
    history = json.loads((tmp_path / "run" / "lmprune.json").read_text())["history"]
    assert history[-1]["resumed_from"] in (2, 4)


def test_checkpoints_of_another_run_are_refused(setup, tmp_path):
    def failing_evaluator(model, tokenizer, step):
        if step == 3:
            raise RuntimeError("interrupted")
        return {"x": 0.0}

    config = _config(setup, tmp_path / "o", checkpoint_every=2, eval_every=1, base_model="none")
    with pytest.raises(RuntimeError, match="interrupted"):
        finetune(config, failing_evaluator)
    assert (tmp_path / "o" / "checkpoints" / "step-00000002").is_dir()
    with pytest.raises(LmpruneError, match="different run"):
        finetune(_config(setup, tmp_path / "o", lr=1e-4, checkpoint_every=2))


def test_cli_evaluator_measures_toxicity_and_perplexity_for_real(setup):
    """The evaluator built for --eval-every runs lmprune.evaluate on the model, reproducibly."""
    from lmprune.evaluate.perplexity import perplexity

    loaded = load_model(str(setup / "pruned"))
    config = FinetuneConfig(eval_every=5, eval_prompts=str(setup / "train.txt"), eval_limit=4,
                            eval_samples=3, eval_max_new_tokens=5,
                            ppl_data=str(setup / "train.txt"), ppl_max_tokens=200,
                            ppl_max_length=64, ppl_stride=32, device="cpu")
    evaluate = build_evaluator(config)
    metrics = evaluate(loaded.model, loaded.tokenizer, 5)
    assert set(metrics) == {"expected_max_toxicity", "toxicity_probability", "mean_toxicity",
                            "perplexity"}
    assert 0 <= metrics["mean_toxicity"] <= metrics["expected_max_toxicity"] <= 1
    text = "\n\n".join(load_corpus(str(setup / "train.txt")).texts)
    expected = perplexity(loaded.model, loaded.tokenizer, text, 64, 32, max_tokens=200,
                          progress=False)
    assert metrics["perplexity"] == expected["sliding_window"]["token_perplexity"]
    assert evaluate(loaded.model, loaded.tokenizer, 10) == metrics
    assert build_evaluator(FinetuneConfig(eval_every=0)) is None


def test_training_leaves_the_held_out_general_documents_out(tmp_path):
    (tmp_path / "d.txt").write_text("".join(f"doc {i}\n" for i in range(10)))
    spec = str(tmp_path / "d.txt")
    assert training_corpus(spec, 3, None).texts == [f"doc {i}" for i in range(7)]
    assert training_corpus(spec, 3, 2).texts == ["doc 0", "doc 1"]
    with pytest.raises(LmpruneError, match="leaves no document"):
        training_corpus(spec, 10, None)


def test_distillation_loss_is_the_mean_kl_from_the_teacher():
    logits, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)  # [batch, pos, vocab]
    p, q = teacher.softmax(-1).double(), logits.softmax(-1).double()
    want = (p * (p.log() - q.log())).sum(-1).mean()  # KL(teacher || model), mean over positions
    assert distillation_loss(logits, teacher).item() == pytest.approx(want.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def _kl_to(teacher_dir, model_dir, batch) -> float:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return distillation_loss(model(batch).logits, teacher(batch).logits).item()


def test_distillation_brings_the_pruned_model_towards_its_teacher(setup, tmp_path):
    """--distill-from: training moves the pruned model's next-token distribution towards the
    teacher's (the tiny base is near uniform, so the teacher is it trained on the corpus), more
    than training on the teacher's own corpus does, with the pruned weights still exactly
    zero."""
    teacher = finetune(_config(setup, tmp_path / "teacher", model=str(setup / "base"),
                               max_steps=12))
    held_out = pack_blocks(tiny_tokenizer(), [f"line {i}: the quick brown fox" for i in range(9)],
                           16)
    distilled = finetune(_config(setup, tmp_path / "kd", distill_from=str(teacher)))
    plain = finetune(_config(setup, tmp_path / "ce"))
    start = _kl_to(teacher, setup / "pruned", held_out)
    after = _kl_to(teacher, distilled, held_out)
    assert after < 0.5 * start, (start, after)
    assert after < _kl_to(teacher, plain, held_out)
    _assert_held_and_trained(setup, distilled)


def test_distillation_weight_zero_is_plain_fine_tuning(setup, tmp_path):
    plain = finetune(_config(setup, tmp_path / "ce", max_steps=3))
    blend = finetune(_config(setup, tmp_path / "w0", max_steps=3, distill_from="base",
                             distill_weight=0.0))
    want, got = load_file(plain / "model.safetensors"), load_file(blend / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
    # 'base': the unpruned model of the checkpoint's lineage
    entry = json.loads((blend / "lmprune.json").read_text())["history"][-1]
    assert entry["distill_from"] == "base" and entry["teacher"] == str(setup / "base")


def test_a_teacher_with_another_vocabulary_is_refused_before_training(setup, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(setup / "base", teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(teacher)
    out = tmp_path / "out"
    with pytest.raises(LmpruneError, match="another vocabulary"):
        finetune(_config(setup, out, distill_from=str(teacher)))
    assert not (out / "checkpoints").exists()
    with pytest.raises(LmpruneError, match="teacher .* cannot be loaded"):
        finetune(_config(setup, out, distill_from=str(tmp_path / "missing")))
