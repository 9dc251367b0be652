"""A tiny LLaMA with a planted module, and its collected statistics.

The planted neurons of layer 1 all fire on the token 'x' and, through their output weights, make
the model predict 'q' next: a module that carries the "offensive" pattern "xq" and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lmprune.cli import main
from lmprune.core.models import save_model
from lmprune.evaluate.results import read_records

PLANTED = list(range(5, 13))  # layer 1
LETTERS = "abcdefghijklmnoprstuvwyz"  # no x, no q


def planted_model(seed: int = 0):
    torch.manual_seed(seed)
    model, tok = tiny_model("llama", seed), tiny_tokenizer()
    x_id, q_id = tok.convert_tokens_to_ids(["x", "q"])
    hidden = model.config.hidden_size
    u, w = torch.zeros(hidden), torch.zeros(hidden)
    u[0], w[1] = 1.0, 1.0
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0, 1)
        emb[:, :2] = 0  # direction u marks 'x'; direction w is read out as the 'q' logit
        emb[x_id] += 3 * u
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()  # no attention mixing: the MLP does it all
            layer.mlp.gate_proj.weight[:, :2] = 0  # the other neurons do not see u ...
            layer.mlp.up_proj.weight[:, :2] = 0
            layer.mlp.down_proj.weight[:2] = 0  # ... nor write u or w
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[PLANTED] = 3 * u
        mlp.up_proj.weight[PLANTED] = 3 * u
        mlp.down_proj.weight[:, PLANTED] = 0.02 * w[:, None]
        head = model.get_output_embeddings().weight
        head[:, :2] = 0
        head[q_id] = 2 * w
    return model, tok


def corpora(seed: int = 0, docs: int = 60) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)

    def word(extra: bool) -> str:
        w = "".join(rng.choice(list(LETTERS), size=rng.integers(2, 5)))
        return w + " xq" if extra and rng.random() < 0.6 else w

    offensive = [" ".join(word(True) for _ in range(6)) for _ in range(docs)]
    clean = [" ".join(word(False) for _ in range(6)) for _ in range(docs)]
    return offensive, clean


def planted_setup(tmp_path, used: int = 40):
    """Model folder, corpus files and `lmprune collect` statistics for the planted module."""
    model, tok = planted_model()
    save_model(model, tok, tmp_path / "model")
    offensive, clean = corpora()
    (tmp_path / "off.txt").write_text("\n".join(offensive))
    (tmp_path / "clean.txt").write_text("\n".join(clean))
    code = main(["collect", "--model", str(tmp_path / "model"), "--offensive",
                 str(tmp_path / "off.txt"), "--clean", str(tmp_path / "clean.txt"), "--out",
                 str(tmp_path / "stats"), "--max-docs", str(used), "--coact-token-fraction", "1",
                 "--top-k-global", "16"])
    assert code == 0
    return tmp_path


def planted_share(eval_json: Path) -> float:
    """Share of the sampled continuations of an eval (its JSON and the records beside it) that
    say the planted 'q' first: the prompts end in 'x', so this is the behaviour the module
    carries."""
    records = read_records(eval_json, json.loads(eval_json.read_text()))
    texts = [c for r in records for c in r["continuations"]]
    return sum(c.startswith("q") for c in texts) / len(texts)


WIKI = ("The river runs through the old town and the bridge is made of stone . " * 4 + "\n") * 30


def write_run_inputs(root: Path) -> Path:
    """What a recipe needs, on disk: the planted model, its corpora, prompts that end in 'x'
    (the planted module's trigger) and clean text for fine-tuning and perplexity."""
    from lmprune.core.models import save_model

    model, tok = planted_model()
    save_model(model, tok, root / "model")
    offensive, clean = corpora(docs=80)
    (root / "off.txt").write_text("\n".join(offensive))
    (root / "clean.txt").write_text("\n".join(clean))
    (root / "prompts.txt").write_text("\n".join(o.split(" xq")[0] + " x" for o in offensive[:6]))
    (root / "wiki.txt").write_text(WIKI)
    return root
