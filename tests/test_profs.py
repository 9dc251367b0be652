"""`lmprune profs` (ProFS, Uppaal et al. 2025) on tiny random models: the edit equals (I - U U^T) W
with U computed by hand from the models' hidden states; a planted direction is recovered and
projected out, the orthogonal complement untouched; centering removes a shared mean direction
that would otherwise lead the SVD; lineage, reload and the one-line refusals; the compare row."""

import json
import random

import pytest
import torch
from checkpoints import randomly_pruned
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

from lmprune.cli import main
from lmprune.core.arch import NeuronMap
from lmprune.core.data import load_pairs
from lmprune.core.errors import LmpruneError
from lmprune.core.masks import PruneMask
from lmprune.core.models import load_model, save_model
from lmprune.methods.profs import (
    ProfsConfig,
    edit_layers,
    profs_edit,
    project_out,
    read_pairs,
    sentence_embeddings,
    toxic_subspace,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LETTERS = "abcdefghijklmnopqrstuvwxy"


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(offensive, clean): a random word string and the same string with one letter made 'z'."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        clean = "".join(rng.choice(LETTERS + " ") for _ in range(rng.randint(6, 20)))
        at = rng.randrange(len(clean))
        pairs.append((clean[:at] + "z" + clean[at + 1:], clean))
    return pairs


def write_pairs(path, pairs, header=("offensive", "clean")):
    path.write_text("\t".join(header) + "\n" + "".join(f"{o}\t{c}\n" for o, c in pairs))
    return path


def unit(gen: torch.Generator, d: int, *against: torch.Tensor) -> torch.Tensor:
    v = torch.randn(d, generator=gen)
    for a in against:
        v -= (v @ a) * a
    return v / v.norm()


# --------------------------------------------------------------------------------------------
# Pairs


def test_pairs_stay_aligned_and_bad_files_are_named(tmp_path):
    path = write_pairs(tmp_path / "p.tsv", [("bad one", "good one"), ("", "lonely"),
                                             ("bad two", "good two"), ("bad three", " ")])
    pairs = load_pairs(str(path))
    assert pairs.offensive == ["bad one", "bad two"] and pairs.clean == ["good one", "good two"]
    assert pairs.dropped == 2 and pairs.describe()["pairs"] == 2
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"a": {"t": "x1"}, "c": "y1"}\n{"a": {"t": "x2"}, "c": "y2"}\n')
    pairs = load_pairs(f"{jsonl}?offensive=a.t&clean=c")
    assert list(zip(pairs.offensive, pairs.clean, strict=True)) == [("x1", "y1"), ("x2", "y2")]
    many = load_pairs(str(write_pairs(tmp_path / "m.tsv", random_pairs(50))))
    drawn = many.sample(10, seed=3)
    assert drawn.offensive == many.sample(10, seed=3).offensive and len(drawn) == 10
    index = {o: i for i, o in enumerate(many.offensive)}
    assert all(many.clean[index[o]] == c for o, c in zip(drawn.offensive, drawn.clean,
                                                         strict=True))
    with pytest.raises(LmpruneError, match=r"no column 'offensive' \(columns: toxic, neutral\)"):
        load_pairs(str(write_pairs(tmp_path / "t.tsv", [("a", "b")], ("toxic", "neutral"))))
    with pytest.raises(LmpruneError, match="line 1 of .* has no text field 'clean'"):
        load_pairs(f"{jsonl}?offensive=a.t")
    with pytest.raises(LmpruneError, match="no pair with both texts"):
        load_pairs(str(write_pairs(tmp_path / "e.tsv", [])))
    with pytest.raises(LmpruneError, match="unknown option"):
        load_pairs(f"{path}?column=x")


def test_the_paradetox_shortcut_reads_its_toxic_and_first_neutral_column():
    pairs = load_pairs("paradetox")
    assert len(pairs) == 11927 and pairs.dropped == 0
    assert pairs.offensive[0] == "he had steel balls too !"
    assert pairs.clean[0] == "he was brave too!"


# --------------------------------------------------------------------------------------------
# The reference computation


def _final_norm_off(model: torch.nn.Module) -> None:
    """HF's hidden_states end with the final norm applied; ProFS reads the blocks' own outputs."""
    if model.config.model_type == "gpt2":
        model.transformer.ln_f = torch.nn.Identity()
    else:
        model.model.norm = torch.nn.Identity()


@torch.no_grad()
def _by_hand(model, tokenizer, pairs, layer: int, rank: int) -> torch.Tensor:
    """U U^T of one layer, one text per forward pass (no padding), final norm removed."""
    model = _final_norm_off_copy(model)

    def embed(text):
        ids = tokenizer(text, return_tensors="pt").input_ids
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
        return hidden[0].mean(0)  # [d_model]

    off = torch.stack([embed(o) for o, _ in pairs])  # [n_pairs, d_model]
    clean = torch.stack([embed(c) for _, c in pairs])
    prefs = (off - clean) / 2
    top = torch.linalg.svd(clean).Vh[0]  # the clean embeddings' leading direction
    prefs = prefs @ (torch.eye(len(top)) - torch.outer(top, top))
    u = torch.linalg.svd(prefs).Vh[:rank].T  # [d_model, rank]
    return u @ u.T


def _final_norm_off_copy(model):
    import copy

    model = copy.deepcopy(model)
    _final_norm_off(model)
    return model


def _linear_weight(nmap: NeuronMap, layer: int) -> torch.Tensor:
    """The output projection as a map d_mlp -> d_model: [d_model, d_mlp]."""
    weight = nmap.output_projection(layer).weight.detach().clone()
    return weight.T if nmap.layout.conv1d else weight


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_the_edit_is_the_projection_computed_by_hand(tmp_path, model_type):
    save_tiny(model_type, tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    pairs = random_pairs(24)
    config = ProfsConfig(model=str(tmp_path / "m"), out=str(tmp_path / "o"), layers="all",
                         rank=3, batch_size=5,
                         pairs=str(write_pairs(tmp_path / "p.tsv", pairs)))
    nmap = NeuronMap(loaded.model)
    before = [_linear_weight(nmap, layer) for layer in range(nmap.num_layers)]
    bias_before = nmap.output_projection(0).bias
    bias_before = None if bias_before is None else bias_before.detach().clone()
    projections = [_by_hand(loaded.model, loaded.tokenizer, pairs, layer, 3)
                   for layer in range(nmap.num_layers)]
    meta = profs_edit(config, loaded, read_pairs(config))
    for layer, p in enumerate(projections):
        expected = (torch.eye(len(p)) - p) @ before[layer]
        torch.testing.assert_close(_linear_weight(nmap, layer), expected, atol=1e-5, rtol=1e-4)
    if bias_before is not None:  # the reference edits weights only
        assert torch.equal(nmap.output_projection(0).bias, bias_before)
    assert meta["profs"]["layers"] == [0, 1] and meta["mode"] == "profs"


def test_embeddings_ignore_padding_and_batching():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["ab", "a much longer text here", "mid length"]
    together = sentence_embeddings(model, tok, texts, [0, 1], batch_size=3)
    alone = torch.cat([sentence_embeddings(model, tok, [t], [0, 1], batch_size=1)
                       for t in texts], dim=1)
    assert together.shape == (2, 3, 32)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_the_first_token_can_be_left_out_of_the_mean():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model = _final_norm_off_copy(model)
    texts = ["a much longer text here", "mid length", "x"]
    got = sentence_embeddings(model, tok, texts, [1], batch_size=3, first_token=False)[0]
    with torch.no_grad():
        for row, text in zip(got, texts, strict=True):
            ids = tok(text, return_tensors="pt").input_ids
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
            want = hidden[1:].mean(0) if len(hidden) > 1 else hidden[0]  # one token: kept
            torch.testing.assert_close(row, want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Properties from the paper


def test_a_planted_direction_is_recovered_and_projected_out_of_the_mlp():
    """Token 'z' carries a large planted direction v: offensive texts (one letter made 'z')
    differ from their pair along v at every layer, so ProFS recovers v and the edited MLP can
    no longer write along it, while its output in the complement of v is unchanged."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    gen = torch.Generator().manual_seed(1)
    v = unit(gen, 32)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("z")] += 5 * v
    pairs = random_pairs(60, seed=2)
    layers = [0, 1]
    off = sentence_embeddings(model, tok, [o for o, _ in pairs], layers)
    clean = sentence_embeddings(model, tok, [c for _, c in pairs], layers)
    for k in range(len(layers)):
        basis, _ = toxic_subspace(off[k], clean[k], rank=1)
        assert abs(float(basis[:, 0] @ v)) > 0.9
    nmap = NeuronMap(model)
    proj = nmap.output_projection(0)
    h = torch.randn(200, nmap.width(0), generator=gen)  # neuron activations [n, d_mlp]
    with torch.no_grad():
        out_before = proj(h)  # [n, d_model]
        basis, _ = toxic_subspace(off[0], clean[0], rank=1)
        project_out(nmap, 0, basis)
        out_after = proj(h)
    assert float((out_after @ basis).abs().max()) < 1e-5
    rest = torch.eye(32) - basis @ basis.T  # the orthogonal complement
    torch.testing.assert_close(out_after @ rest, out_before @ rest, atol=1e-5, rtol=1e-5)


def test_conv1d_bias_is_projected_only_when_asked():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 2, generator=gen)).Q  # [d_model, 2] orthonormal
    h = torch.randn(50, 40, generator=gen)
    for bias in (False, True):
        model = tiny_model("gpt2")
        nmap = NeuronMap(model)
        proj = nmap.output_projection(1)
        with torch.no_grad():
            before = proj(h)
            project_out(nmap, 1, basis, bias=bias)
            after = proj(h)
        kept = proj.bias.detach() if not bias else torch.zeros(32)
        assert float(((after - kept) @ basis).abs().max()) < 1e-5
        other = unit(gen, 32, *basis.T)
        torch.testing.assert_close(after @ other, before @ other, atol=1e-5, rtol=1e-5)


def test_centering_removes_a_shared_mean_that_would_lead_the_svd():
    """Every embedding carries a large shared direction m whose weight varies from sentence to
    sentence (length, stopwords), more than the toxic signal v separates a pair: the raw
    preference matrix is led by m, the centered one by v."""
    gen = torch.Generator().manual_seed(0)
    d, n = 64, 300
    m = unit(gen, d)
    v = unit(gen, d, m)
    clean = (10 * (1 + 0.3 * torch.randn(n, 1, generator=gen)) * m
             + 0.1 * torch.randn(n, d, generator=gen))
    off = (10 * (1 + 0.3 * torch.randn(n, 1, generator=gen)) * m
           + (1 + 0.2 * torch.randn(n, 1, generator=gen)) * v
           + 0.1 * torch.randn(n, d, generator=gen))
    raw, _ = toxic_subspace(off, clean, rank=1, centering=False)
    centered, _ = toxic_subspace(off, clean, rank=1, centering=True)
    assert abs(float(raw[:, 0] @ m)) > 0.9 and abs(float(raw[:, 0] @ v)) < 0.5
    assert abs(float(centered[:, 0] @ v)) > 0.9 and abs(float(centered[:, 0] @ m)) < 1e-3


# --------------------------------------------------------------------------------------------
# The stage: lineage, reload, refusals


def _profs(capsys, *argv):
    code = main(["profs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_a_checkpoint_that_reloads_with_identical_logits(tmp_path, capsys):
    # an earlier pruning: its zeroed neurons must stay zero through the edit
    randomly_pruned(tmp_path / "m", {0: [1, 5], 1: [7]})
    pairs = write_pairs(tmp_path / "p.tsv", random_pairs(30))
    code, out, err = _profs(capsys, "--model", str(tmp_path / "m"), "--pairs", str(pairs),
                            "--out", str(tmp_path / "o"), "--layers", "1", "--max-pairs", "20")
    assert code == 0, err
    assert "rank-2 toxic subspace" in out
    meta = json.loads((tmp_path / "o" / "lmprune.json").read_text())
    assert meta["mode"] == "profs" and meta["base_model"]["name"] == "tiny"
    assert meta["pruned_neurons"] == {"0": [1, 5], "1": [7]} and meta["num_pruned"] == 3
    assert [h["stage"] for h in meta["history"]] == ["prune", "profs"]
    record = meta["profs"]
    assert record["rank"] == 2 and record["layers"] == [1] and record["centering"]
    assert record["pairs"]["pairs"] == 20 and record["pairs"]["spec"] == str(pairs)
    values = record["per_layer"]["1"]["singular_values"]
    assert values == sorted(values, reverse=True) and 0 < record["per_layer"]["1"]["explained"] <= 1

    # the same edit in memory gives the saved model's logits exactly
    loaded = load_model(str(tmp_path / "m"), dtype="float32")
    config = ProfsConfig(model=str(tmp_path / "m"), pairs=str(pairs), layers="1", max_pairs=20)
    profs_edit(config, loaded, read_pairs(config))
    reloaded = load_model(str(tmp_path / "o"), dtype="float32")
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    base = load_model(str(tmp_path / "m")).model
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reloaded.model(ids).logits)
        assert not torch.equal(base(ids).logits, reloaded.model(ids).logits)
    PruneMask.from_checkpoint(reloaded.model, tmp_path / "o").check(reloaded.model)


def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, capsys):
    save_tiny("llama", tmp_path / "m")
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(n_layer=1, hidden_size=8, n_head=2,
                                                         vocab_size=96))
    save_model(bloom, tiny_tokenizer(), tmp_path / "bloom")
    good = str(write_pairs(tmp_path / "p.tsv", random_pairs(40)))
    capsys.readouterr()  # the saves' progress bars
    cases = [
        (["--pairs", str(write_pairs(tmp_path / "t.tsv", [("a", "b")], ("toxic", "neutral")))],
         "has no column 'offensive' (columns: toxic, neutral)"),
        (["--pairs", str(write_pairs(tmp_path / "e.tsv", []))], "has no pair with both texts"),
        (["--pairs", str(write_pairs(tmp_path / "one.tsv", [("a", "b")]))],
         "has 1 pair(s): a rank-2 subspace needs at least 2"),
        (["--pairs", str(tmp_path / "none.tsv")], "pairs file not found"),
        (["--pairs", good, "--rank", "0"], "--rank must be at least 1, not 0"),
        (["--pairs", good, "--rank", "32"], "--rank 32 is larger than the hidden size (32, "
                                            "less the centering direction): at most 31"),
        (["--pairs", good, "--layers", "2"], "'2' is not within the model's layers 0-1"),
        (["--pairs", good, "--model", str(tmp_path / "bloom")], "unsupported model_type 'bloom'"),
    ]
    for extra, message in cases:
        argv = ["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), *extra]
        code, _, err = _profs(capsys, *argv)
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and err.startswith("lmprune: error: "), (extra, err)
        assert message in err, (extra, err)
        assert not (tmp_path / "o").exists()


def test_layer_specs():
    assert edit_layers("upper", 24) == list(range(12, 24))
    assert edit_layers("upper", 3) == [1, 2]
    assert edit_layers("all", 2) == [0, 1] and edit_layers("10-12,3", 24) == [3, 10, 11, 12]
    with pytest.raises(LmpruneError, match="not within the model's layers 0-23"):
        edit_layers("20-24", 24)
