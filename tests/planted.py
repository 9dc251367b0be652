"""A tiny LLaMA with a planted module, and reference statistics computed from stored activations.

The planted neurons of layer 1 all fire on the token 'x' and, through their output weights, make
the model predict 'q' next: a module that carries the "offensive" pattern "xq" and nothing else.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score
from tiny_models import tiny_model, tiny_tokenizer

from lmprune.arch import NeuronMap
from lmprune.hooks import NeuronHooks
from lmprune.models import load_model, save_model

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


def _activations(model, tok, texts):
    """Per document: {layer: [tokens, d_mlp]} of non-padding tokens."""
    out = []
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        acts = {}
        def keep(layer, a, acts=acts):
            acts[layer] = a[0].clone()

        with torch.no_grad(), NeuronHooks(model, keep):
            model(ids)
        out.append(acts)
    return out


def write_reference_stats(folder, model_dir, offensive_path, clean_path, used: int,
                          top_k: int = 16) -> dict:
    """The collect output format (docs/formats.md), computed the slow obvious way."""
    loaded = load_model(str(model_dir))
    model, tok = loaded.model, loaded.tokenizer
    nmap = NeuronMap(model)
    L, W = nmap.num_layers, nmap.width(0)
    texts = {c: p.read_text().splitlines()[:used]
             for c, p in (("offensive", offensive_path), ("clean", clean_path))}
    acts = {c: _activations(model, tok, t) for c, t in texts.items()}
    stats, pooled = {}, {}
    for c, docs in acts.items():
        tokens = torch.cat([torch.stack([d[i] for i in range(L)], 1) for d in docs])  # [T, L, W]
        tokens = tokens.double()
        stats[f"{c}.tokens"] = torch.tensor(tokens.shape[0])
        stats[f"{c}.documents"] = torch.tensor(len(docs))
        stats[f"{c}.sum"], stats[f"{c}.sumsq"] = tokens.sum(0), (tokens ** 2).sum(0)
        stats[f"{c}.mean"], stats[f"{c}.var"] = tokens.mean(0), tokens.var(0, unbiased=False)
        stats[f"{c}.fire_rate"] = (tokens > 0).double().mean(0)
        pooled[c] = torch.stack([torch.stack([d[i].max(0).values for i in range(L)])
                                 for d in docs]).double()  # [docs, L, W]
        stats[f"{c}.pooled_max_mean"] = pooled[c].mean(0)
    y = np.r_[np.ones(len(pooled["offensive"])), np.zeros(len(pooled["clean"]))]
    both = torch.cat([pooled["offensive"], pooled["clean"]]).numpy()
    stats["auroc"] = torch.tensor([[roc_auc_score(y, both[:, i, j]) for j in range(W)]
                                   for i in range(L)], dtype=torch.float32)
    diff = pooled["offensive"].mean(0) - pooled["clean"].mean(0)
    pooled_sd = ((pooled["offensive"].var(0) + pooled["clean"].var(0)) / 2).sqrt()
    stats["effect_size"] = (diff / pooled_sd.clamp_min(1e-12)).float()
    stats["fire_threshold"] = torch.zeros(L, W)
    all_tokens = torch.cat([torch.cat([torch.stack([d[i] for i in range(L)], 1) for d in docs])
                            for docs in acts.values()]).double()  # [T, L, W]
    coact = {"tokens": torch.tensor(all_tokens.shape[0]), "sum": all_tokens.sum(0),
             "gram": torch.einsum("tli,tlj->lij", all_tokens, all_tokens)}
    flat = stats["effect_size"].abs().flatten()
    top = torch.argsort(flat, descending=True)[:top_k]
    index = torch.stack([top // W, top % W], 1)
    cand = all_tokens[:, index[:, 0], index[:, 1]]  # [T, K]
    coact.update({"global.index": index, "global.sum": cand.sum(0),
                  "global.gram": cand.T @ cand, "global.tokens": torch.tensor(cand.shape[0])})
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in stats.items()}, folder / "stats.safetensors")
    save_file({k: v.contiguous() for k, v in coact.items()}, folder / "coact.safetensors")
    manifest = {
        "format": "lmprune.stats", "format_version": 1, "model": loaded.identity,
        "num_layers": L, "neurons_per_layer": W, "hook_points": nmap.hook_points,
        "corpora": {"offensive": {"spec": str(offensive_path), "documents": used},
                    "clean": {"spec": str(clean_path), "documents": used}},
        "complete": True,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def planted_setup(tmp_path, used: int = 40):
    """Model folder, corpus files and reference stats for the planted module."""
    model, tok = planted_model()
    save_model(model, tok, tmp_path / "model")
    offensive, clean = corpora()
    (tmp_path / "off.txt").write_text("\n".join(offensive))
    (tmp_path / "clean.txt").write_text("\n".join(clean))
    write_reference_stats(tmp_path / "stats", tmp_path / "model", tmp_path / "off.txt",
                          tmp_path / "clean.txt", used)
    return tmp_path
