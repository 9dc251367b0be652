"""`lmprune collect`: every statistic against a reference from stored activations, the histogram
path within its bound, padding side, resume after SIGKILL, several processes, bad input."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.metrics import roc_auc_score
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmprune.cli import main
from lmprune.collect import (
    CollectConfig,
    FirstPass,
    Plan,
    SymmetricGram,
    _layer_sums,
    auroc_from_hist,
    coact_token_mask,
)
from lmprune.core.data import load_corpus
from lmprune.core.hooks import NeuronHooks

ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 48


def _write_corpus(path: Path, seed: int, letters: str, n: int = 29) -> Path:
    rng = random.Random(seed)
    lines = ["".join(rng.choice(letters) for _ in range(rng.randint(4, 60))).strip() or "x"
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("collect")
    corpora = {"offensive": _write_corpus(root / "off.txt", 1, "abcdefg!?XYZ  "),
               "clean": _write_corpus(root / "clean.txt", 2, "hijklmnopq.,  ")}
    models = {t: save_tiny(t, root / t) for t in ("llama", "gpt2", "opt")}
    return root, corpora, models


def _collect(work, out, model="llama", *extra):
    root, corpora, models = work
    # LMPRUNE_TEST_DEVICE=cuda checks the GPU code (compiled sums) against the same references
    argv = ["collect", "--model", str(models[model]), "--offensive", str(corpora["offensive"]),
            "--clean", str(corpora["clean"]), "--out", str(out), "--batch-size", "4",
            "--device", os.environ.get("LMPRUNE_TEST_DEVICE", "cpu"), "--dtype", "float32",
            "--max-length", str(MAX_LENGTH), "--top-k-global", "24", *extra]
    assert main(argv) == 0
    return _read(out)


def _read(out: Path) -> dict:
    result = {"stats": load_file(out / "stats.safetensors"),
              "coact": load_file(out / "coact.safetensors"),
              "manifest": json.loads((out / "manifest.json").read_text())}
    for corpus in ("offensive", "clean"):
        for kind in ("max", "mean"):
            path = out / "pooled" / f"{corpus}.{kind}.npy"
            if path.exists():
                result[f"{corpus}.{kind}"] = np.load(path)
    return result


def _activations(folder: Path, spec: Path) -> list[np.ndarray]:
    """Each document alone (no padding): [L, T, W] float64 per document, on the device collect
    runs on (a GPU's float32 arithmetic differs from a CPU's in the last bits)."""
    device = os.environ.get("LMPRUNE_TEST_DEVICE", "cpu")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    tok = AutoTokenizer.from_pretrained(folder)
    docs = []
    for text in load_corpus(str(spec)).texts:
        ids = tok(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        layers = {}

        def keep(i, a, layers=layers):
            layers[i] = a[0]

        with torch.no_grad(), NeuronHooks(model, keep):
            model(torch.tensor([ids], device=device))
        docs.append(np.stack([layers[i].double().cpu().numpy() for i in sorted(layers)]))
    return docs


def _close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _corr(gram, total, n):
    cov = gram / n - np.outer(total / n, total / n)
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.outer(sd, sd)


@pytest.mark.parametrize("model,padding", [("llama", "right"), ("llama", "left"),
                                           ("gpt2", "right"), ("opt", "left")])
def test_every_statistic_matches_a_reference_from_stored_activations(work, tmp_path, model,
                                                                     padding):
    root, corpora, models = work
    got = _collect(work, tmp_path / "out", model, "--padding-side", padding,
                   "--coact-token-fraction", "0.5")
    stats, coact = got["stats"], got["coact"]
    acts = {c: _activations(models[model], corpora[c]) for c in corpora}
    L, _, W = acts["offensive"][0].shape
    gated = model == "llama"
    assert got["manifest"]["settings"]["fire_threshold"].startswith("|a| > 0.1" if gated else "> 0")

    # Firing threshold: 0, or 0.1 x max |a| over the first batch (the 4 longest offensive docs).
    lengths = [d.shape[1] for d in acts["offensive"]]
    first = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:4]
    threshold = (0.1 * np.max([np.abs(acts["offensive"][i]).max(1) for i in first], axis=0)
                 if gated else np.zeros((L, W)))
    _close(stats["fire_threshold"], threshold)

    pooled_max = {}
    for c, docs in acts.items():
        tokens = np.concatenate(docs, axis=1)  # [L, n, W]
        n = tokens.shape[1]
        assert stats[f"{c}.tokens"] == n and stats[f"{c}.documents"] == len(docs)
        _close(stats[f"{c}.mean"], tokens.mean(1))
        _close(stats[f"{c}.var"], tokens.var(1))
        fires = (np.abs(tokens) if gated else tokens) > threshold[:, None, :]
        _close(stats[f"{c}.fire_rate"], fires.mean(1))
        pooled_max[c] = np.stack([d.max(1) for d in docs])  # [docs, L, W]
        pooled_mean = np.stack([d.mean(1) for d in docs])
        _close(got[f"{c}.max"], pooled_max[c])
        _close(got[f"{c}.mean"], pooled_mean)
        _close(stats[f"{c}.pooled_max_mean"], pooled_max[c].mean(0))
        _close(stats[f"{c}.pooled_mean_mean"], pooled_mean.mean(0))

    # AUROC of the stored max-pooled values against sklearn, neuron by neuron.
    pos, neg = got["offensive.max"], got["clean.max"]
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    expected = np.array([[roc_auc_score(labels, np.r_[pos[:, i, j], neg[:, i, j]])
                          for j in range(W)] for i in range(L)])
    _close(stats["auroc"], expected)

    # Cohen's d with the pooled sample standard deviation.
    a, b = pooled_max["offensive"], pooled_max["clean"]
    pooled_sd = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1))
                        / (len(a) + len(b) - 2))
    with np.errstate(invalid="ignore", divide="ignore"):  # constant neurons (ReLU): d = 0
        d = np.where(pooled_sd > 0, (a.mean(0) - b.mean(0)) / pooled_sd, 0.0)
    _close(stats["effect_size"], d, rtol=1e-4)

    # Per-layer Gram over the seeded half of the tokens of both corpora.
    picked = [d[:, coact_token_mask(0, ci, di, d.shape[1], 0.5)]
              for ci, c in enumerate(("offensive", "clean")) for di, d in enumerate(acts[c])]
    sample = np.concatenate(picked, axis=1)  # [L, n, W]
    assert coact["tokens"] == sample.shape[1]
    _close(coact["sum"], sample.sum(1))
    for layer in range(L):
        x = sample[layer]
        _close(coact["gram"][layer], x.T @ x)
        live = x.std(0) > 0  # dead (ReLU) neurons have no correlation
        corr = _corr(coact["gram"][layer], coact["sum"][layer], coact["tokens"])
        _close(corr[live][:, live], np.corrcoef(x[:, live].T))

    # Global Gram: the 24 neurons of largest |d|, across layers, over every token.
    order = np.argsort(-np.abs(stats["effect_size"]).ravel(), kind="stable")[:24]
    np.testing.assert_array_equal(coact["global.index"],
                                  np.stack(np.divmod(np.sort(order), W), axis=1))
    every = np.concatenate([d for c in acts for d in acts[c]], axis=1)  # [L, n, W]
    cols = every[coact["global.index"][:, 0], :, coact["global.index"][:, 1]].T  # [n, K]
    assert coact["global.tokens"] == cols.shape[0]
    _close(coact["global.sum"], cols.sum(0))
    _close(coact["global.gram"], cols.T @ cols)


def test_document_limits_and_the_global_subsample(work, tmp_path):
    """--max-docs reads the first documents; --global-max-docs feeds the cross-layer Gram from a
    seeded subset of those, named in the manifest."""
    root, corpora, models = work
    got = _collect(work, tmp_path / "out", "llama", "--max-docs", "10", "--global-max-docs", "5")
    stats, coact = got["stats"], got["coact"]
    acts = {c: _activations(models["llama"], corpora[c])[:10] for c in corpora}
    chosen = got["manifest"]["coactivation"]["global"]["documents"]
    for c, docs in acts.items():
        tokens = np.concatenate(docs, axis=1)  # [L, n, W]
        assert stats[f"{c}.documents"] == 10 and stats[f"{c}.tokens"] == tokens.shape[1]
        _close(stats[f"{c}.mean"], tokens.mean(1))
        assert len(set(chosen[c])) == 5 and set(chosen[c]) <= set(range(10))
    index = coact["global.index"]
    every = np.concatenate([acts[c][i] for c in acts for i in chosen[c]], axis=1)  # [L, n, W]
    cols = every[index[:, 0], :, index[:, 1]].T  # [n, K]
    assert coact["global.tokens"] == cols.shape[0]
    _close(coact["global.sum"], cols.sum(0))
    _close(coact["global.gram"], cols.T @ cols)


def test_left_and_right_padding_give_the_same_result(work, tmp_path):
    right = _collect(work, tmp_path / "r", "llama", "--padding-side", "right")
    left = _collect(work, tmp_path / "l", "llama", "--padding-side", "left")
    for part in ("stats", "coact"):
        for key, value in right[part].items():
            _close(left[part][key], value)
    _close(left["offensive.max"], right["offensive.max"])


def test_histogram_auroc_is_within_its_bound(work, tmp_path):
    got = _collect(work, tmp_path / "h", "gpt2", "--exact-pooled-cap", "10",
                   "--histogram-bins", "512", "--calibration-docs", "8", "--top-k-global", "0")
    exact = _collect(work, tmp_path / "e", "gpt2", "--top-k-global", "0")
    stats = got["stats"]
    assert got["manifest"]["corpora"]["offensive"]["pooled"]["mode"] == "histogram"
    assert not (tmp_path / "h" / "pooled" / "offensive.max.npy").exists()
    hist = stats["offensive.pooled_max_hist"]
    assert (hist.sum(-1) == 29).all()
    bound = stats["auroc_error_bound"]
    err = np.abs(stats["auroc"] - exact["stats"]["auroc"])
    assert (err <= bound + 1e-6).all()
    assert bound.mean() < 0.01  # the bound is informative, not vacuous
    # Everything else does not depend on how pooled values are kept.
    for key in ("offensive.mean", "clean.var", "effect_size", "clean.pooled_max_mean"):
        _close(stats[key], exact["stats"][key])


def _first_pass_sums(fused, device="cpu", fire_mode="relative", pad_value=None):
    """One padded batch of random activations through FirstPass.hook: its per-layer buffers."""
    gen = torch.Generator().manual_seed(0)
    layers, width = 2, 16
    docs = [[5] * n for n in (11, 7, 3, 5)]
    plan = Plan([docs, docs], CollectConfig(batch_size=4), pad_id=0)
    batch = plan.make(0, [0, 1, 2, 3], 0.5)
    calibration = {"threshold": torch.rand(layers, width, generator=gen),
                   "shift": torch.randn(layers, width, generator=gen)}
    acc = FirstPass(layers, width, device, fire_mode, calibration, bins=8)
    acc.fused = fused
    acc.start(batch, device)
    for layer in range(layers):  # padding positions hold values too: they must not count
        acts = torch.randn(*batch.input_ids.shape, width, generator=gen)
        if pad_value is not None:
            acts[batch.attention_mask == 0] = pad_value
        acc.hook(layer, acts.to(device))
    return [b.cpu().clone() for b in (acc.b_sumsq, acc.b_fires, acc.b_docsum, acc.b_max)]


@pytest.mark.parametrize("fire_mode", ["relative", "zero"])
def test_fused_layer_sums_equal_the_eager_ones(fire_mode):
    """The function that torch.compile fuses on GPUs gives the eager hook's sums (here uncompiled;
    on a GPU, LMPRUNE_TEST_DEVICE=cuda runs the compiled one against the references)."""
    eager = _first_pass_sums(None, fire_mode=fire_mode)
    fused = _first_pass_sums(_layer_sums, fire_mode=fire_mode)
    not_finite_pads = _first_pass_sums(_layer_sums, fire_mode=fire_mode, pad_value=float("nan"))
    for got, nan_padded, want in zip(fused, not_finite_pads, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(nan_padded, want, rtol=1e-6, atol=1e-5)


def test_gram_buffers_rows_of_any_count_and_equals_x_transpose_x():
    gen = torch.Generator().manual_seed(0)
    gram, rows = SymmetricGram(3, 10, "cpu", blocks=3), []
    for n in (5, 40, 0, 17, 3000, 2):  # a batch larger than the buffer grows it
        x = torch.randn(3, n, 10, generator=gen)
        gram.add(x)
        rows.append(x.double())
    gram.flush()
    x = torch.cat(rows, dim=1)
    torch.testing.assert_close(gram.full(), x.transpose(1, 2) @ x, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision products need CUDA")
def test_half_precision_gram_on_gpu_is_exact_products_of_the_rounded_rows():
    gen = torch.Generator().manual_seed(0)
    gram = SymmetricGram(2, 64, "cuda")
    gram.set_precision(torch.bfloat16)
    x = torch.randn(2, 3000, 64, generator=gen)
    gram.add(x.cuda())
    gram.flush()
    rounded = x.bfloat16().double()
    torch.testing.assert_close(gram.full().cpu(), rounded.transpose(1, 2) @ rounded,
                               rtol=1e-5, atol=1e-3)


def test_auroc_from_histograms_on_a_known_case():
    pos = torch.tensor([[0, 2, 2]])  # bins 1, 2
    neg = torch.tensor([[2, 2, 0]])  # bins 0, 1
    auc, bound = auroc_from_hist(pos, neg)
    # pairs: pos in bin 2 beats every neg (0.5); pos in bin 1 beats bin-0 neg (0.25) and ties
    # with bin-1 neg (0.25 x 0.5)
    assert auc.item() == pytest.approx(0.5 + 0.25 + 0.125)
    assert bound.item() == pytest.approx(0.125)


SMALL_RUN = ("--batch-size", "3", "--top-k-global", "16", "--checkpoint-every", "2")


def _argv(work, out, extra=()):
    root, corpora, models = work
    return ["collect", "--model", str(models["llama"]), "--offensive", str(corpora["offensive"]),
            "--clean", str(corpora["clean"]), "--out", str(out), "--max-length", str(MAX_LENGTH),
            *SMALL_RUN, *extra]


def _subprocess(argv, launcher=(sys.executable, "-m", "lmprune.cli")):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(work, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(_argv(work, out)) == 0
    return _read(out)


def _identical(a: dict, b: dict):
    for part in ("stats", "coact"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            np.testing.assert_array_equal(a[part][key], b[part][key], err_msg=key)
    for key in ("offensive.max", "clean.mean"):
        np.testing.assert_array_equal(a[key], b[key])


# forward passes before the kill: the calibration pass, then 7 of the first pass's 2 x 10
# batches; or all of them and 4 of the global pass
@pytest.mark.slow
@pytest.mark.parametrize("kill_after, phase", [(8, "pass1"), (25, "pass2")])
def test_resume_after_kill_gives_identical_statistics(work, tmp_path, uninterrupted, kill_after,
                                                      phase):
    out = tmp_path / "out"
    killed = (sys.executable, str(ROOT / "tests" / "killed_cli.py"), str(kill_after))
    died = _subprocess(_argv(work, out), launcher=killed)
    assert died.returncode == -9, died.stderr
    assert not (out / "manifest.json").exists()
    assert json.loads((out / ".checkpoint" / "checkpoint.json").read_text())["phase"] == phase
    assert main(_argv(work, out)) == 0  # the same command again
    assert not (out / ".checkpoint").exists()
    _identical(_read(out), uninterrupted)


@pytest.mark.slow
def test_two_processes_equal_one(work, tmp_path, uninterrupted):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                "lmprune.cli")
    two = _subprocess(_argv(work, tmp_path / "two"), launcher=torchrun)
    assert two.returncode == 0, two.stderr
    got = _read(tmp_path / "two")
    assert got["manifest"]["settings"]["processes"] == 2
    for part in ("stats", "coact"):
        for key, value in uninterrupted[part].items():
            _close(got[part][key], value)
    np.testing.assert_array_equal(got["offensive.max"], uninterrupted["offensive.max"])


def test_bad_input_exits_2_with_one_line(work, tmp_path, capsys):
    root, corpora, models = work
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bloom").mkdir()
    from transformers import BloomConfig

    BloomConfig(n_layer=1, hidden_size=8, n_head=2).save_pretrained(tmp_path / "bloom")
    base = ["collect", "--model", str(models["gpt2"]), "--offensive", str(corpora["offensive"]),
            "--clean", str(corpora["clean"]), "--out", str(tmp_path / "o")]
    cases = {
        "empty corpus": (["--clean", str(tmp_path / "empty.txt")], "has no documents"),
        "missing file": (["--offensive", str(tmp_path / "nope.txt")], "corpus file not found"),
        "unsupported": (["--model", str(tmp_path / "bloom")], "unsupported model_type 'bloom'"),
        "missing model": (["--model", str(tmp_path / "none")], "model not found"),
        "fraction": (["--coact-token-fraction", "0"], "--coact-token-fraction"),
        "threshold": (["--fire-threshold", "relative:2"], "--fire-threshold"),
    }
    for case, (extra, message) in cases.items():
        code = main(base + extra)
        err = capsys.readouterr().err
        assert code == 2, case
        assert message in err and err.count("\n") == 1, (case, err)


def test_rerun_on_a_finished_folder(work, tmp_path, capsys):
    _collect(work, tmp_path / "o", "gpt2", "--top-k-global", "0")
    assert main(["collect", "--model", str(work[2]["gpt2"]), "--offensive",
                 str(work[1]["offensive"]), "--clean", str(work[1]["clean"]), "--out",
                 str(tmp_path / "o"), "--batch-size", "4", "--max-length", str(MAX_LENGTH),
                 "--top-k-global", "0"]) == 0
    assert "complete already" in capsys.readouterr().out
    code = main(["collect", "--model", str(work[2]["gpt2"]), "--offensive",
                 str(work[1]["offensive"]), "--clean", str(work[1]["clean"]), "--out",
                 str(tmp_path / "o"), "--max-docs", "5"])
    assert code == 2 and "another run" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_on_paradetox(tmp_path, smollm2):
    out = tmp_path / "s"
    assert main(["collect", "--model", "smollm2-135m", "--offensive", "paradetox:toxic",
                 "--clean", "paradetox:neutral", "--out", str(out), "--max-docs", "12",
                 "--max-length", "32", "--batch-size", "6", "--top-k-global", "64"]) == 0
    got = _read(out)
    manifest, stats, coact = got["manifest"], got["stats"], got["coact"]
    assert manifest["model"]["kind"] == "bundled" and manifest["num_layers"] == 30
    assert manifest["corpora"]["offensive"]["documents"] == 12
    assert stats["auroc"].shape == (30, 1536) and coact["gram"].shape == (30, 1536, 1536)
    assert ((stats["auroc"] >= 0) & (stats["auroc"] <= 1)).all()
    assert np.isfinite(stats["effect_size"]).all()
    assert coact["global.gram"].shape == (64, 64)
    # The Gram diagonal is the sum of squares over the sampled tokens: positive where alive.
    assert (np.diagonal(coact["gram"], axis1=1, axis2=2) >= 0).all()
