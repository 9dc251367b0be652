"""Benchmark of the evaluate stage: lmprune's sampler against HF `generate`, scorer speed, the
fluency judge against the sampling it scores, and BLiMP's wall time.

Both generators get the same model, prompts (RTP challenging), k, top-p, temperature and
max_new_tokens, and the same number of rows per call, in the same run (so machine load affects
both). New tokens are counted up to (not including) EOS for both.

    python bench/eval.py                      # CPU: bundled SmolLM2, 50 prompts x 25 samples
    python bench/eval.py --prompts 8 --samples 5
    python bench/eval.py --gpu                # random-weight Qwen2.5-1.5B config, bf16, 598 x 25
    python bench/eval.py --gpu --sharpen-top1 0.28 --score-texts 0

Random weights give a nearly uniform next-token distribution (top-1 probability ~2e-4 over 152K
tokens: the nucleus is most of the vocabulary), which no trained model has; SmolLM2's mean top-1
probability after these prompts is 0.28 (median nucleus 191 tokens). `--sharpen-top1 P` scales the
random model's final norm so that its mean top-1 probability after the first prompts is P. HF's
sampler costs the same either way (it sorts the vocabulary every step); lmprune's depends on the
nucleus, so both figures are worth reporting. Each run states the top-1 probability and nucleus
size of its workload.

The fluency judge (the same model, scoring each continuation given its prompt) is timed on the
continuations the sampler made for the first `--judge-prompts` prompts, against that sampling:
`fluency_judge_vs_sampling` (aim: at most 0.3). BLiMP runs `--blimp-per-paradigm` pairs of each of
the 67 paradigms (100: the issue's budget, under 5 minutes on the 2-core CPU; 0 skips it).

Prints JSON lines; the last is {"machine": ..., "ratios": {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lmprune.core.data import load_corpus
from lmprune.core.errors import LmpruneError
from lmprune.core.models import load_model
from lmprune.evaluate.generate import eos_token_ids, sample_continuations, sample_token_ids
from lmprune.evaluate.registry import load_scorer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def qwen_1p5b(device: str, tokenizer_path: str | None):
    """Qwen2.5-1.5B's configuration with random weights (bf16), SmolLM2's tokenizer (the bundled
    one, or a saved copy at `tokenizer_path` where the bundle is not installed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    config = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if tokenizer_path:
        return model, AutoTokenizer.from_pretrained(tokenizer_path)
    return model, load_model("smollm2-135m", device="cpu").tokenizer


@torch.inference_mode()
def first_step_stats(model, tokenizer, prompts: list[str], top_p: float) -> dict:
    """Mean top-1 probability and median nucleus size of the next token after these prompts."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt").to(device)
    logits = model(**enc, logits_to_keep=1).logits[:, -1].float()
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    nucleus = ((probs.double().cumsum(-1) - probs) < top_p).sum(-1).float()
    return {"mean_top1_probability": round(probs[:, 0].mean().item(), 4),
            "median_nucleus_tokens": int(nucleus.median().item())}


@torch.inference_mode()
def sharpen(model, tokenizer, prompts: list[str], top1: float, top_p: float) -> float:
    """Scale the final norm's weight so that the mean top-1 probability is `top1` (bisection on
    the log of the scale); returns the scale."""
    weight = model.get_decoder().norm.weight
    base = weight.clone()
    low, high = 0.0, 6.0  # log2 of the scale
    for _ in range(16):
        mid = (low + high) / 2
        weight.copy_(base * 2 ** mid)
        if first_step_stats(model, tokenizer, prompts, top_p)["mean_top1_probability"] < top1:
            low = mid
        else:
            high = mid
    weight.copy_(base * 2 ** high)
    return 2 ** high


def hf_generate(model, tokenizer, prompts, samples, args, rows_per_call, device) -> int:
    """HF generate with do_sample/top_p and num_return_sequences=k; returns new tokens."""
    eos = eos_token_ids(model, tokenizer)
    per_call = max(1, rows_per_call // samples)
    new_tokens = 0
    for start in range(0, len(prompts), per_call):
        enc = tokenizer(prompts[start:start + per_call], padding=True, padding_side="left",
                        return_tensors="pt").to(device)
        out = model.generate(**enc, do_sample=True, top_p=args.top_p, top_k=0,
                             temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                             num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), len(row))
            new_tokens += stop
    return new_tokens


def detoxify_like_checkpoint(folder: Path) -> str:
    """A BERT-base-sized random classifier in Detoxify's checkpoint format (offline stand-in
    for detoxify:original: same architecture, so the same speed)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w.lower() for w in load_corpus("wikitext2:valid", limit=400).texts[0].split()}
                   | {"the", "a", "you", "and", "of"})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    config = BertConfig(vocab_size=len(words) + 5, num_labels=6)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)  # also usable as an hf: classifier
    torch.save({"config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                             "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer",
                                             "num_classes": 6}},
                           "dataset": {"args": {"classes": ["toxic", "severe_toxic", "obscene",
                                                            "threat", "insult",
                                                            "identity_hate"]}}},
                "state_dict": model.state_dict()}, folder / "model.ckpt")
    return str(folder)


def score_speeds(texts: list[str], device: str) -> dict[str, float]:
    """Texts per second of each scorer on these texts (those that cannot load are skipped)."""
    scoring = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = detoxify_like_checkpoint(Path(tmp))
        specs = {"profanity_check": "profanity_check", "minilm": "minilm",
                 "detoxify (BERT-base size, random)": f"detoxify:{folder}/model.ckpt?config="
                                                      f"{folder}",
                 "hf (BERT-base size, random)": f"hf:{folder}"}
        for label, spec in specs.items():
            try:
                scorer = load_scorer(spec, device=device)
            except LmpruneError as err:
                print(json.dumps({"scorer": label, "skipped": str(err)}))
                continue
            scorer.score(texts[:8])  # warm-up
            started = time.perf_counter()
            scorer.score(texts)
            sync(device)
            scoring[label] = len(texts) / (time.perf_counter() - started)
            print(json.dumps({"scorer": label, "texts": len(texts),
                              "texts_per_s": round(scoring[label], 1)}))
    return scoring


def time_fluency_judge(model, tokenizer, prompts: list[str], settings: dict, rows: int,
                       device: str) -> dict:
    """Seconds of the sampling of these prompts and of the judge scoring what it wrote."""
    from lmprune.evaluate.fluency import judge_fluency

    sync(device)
    started = time.perf_counter()
    continuations = sample_continuations(model, tokenizer, prompts, batch_size=rows,
                                         progress=False, **settings)
    sync(device)
    sampling_s = time.perf_counter() - started
    # the judge's own batch size, as `lmprune eval` runs it
    result = judge_fluency(model, tokenizer, prompts, continuations, {"name": "self"},
                           progress=False)
    sync(device)
    judge_s = time.perf_counter() - started - sampling_s
    out = {"prompts": len(prompts), "sampling_s": round(sampling_s, 2),
           "judge_s": round(judge_s, 2), "ratio": judge_s / sampling_s,
           "token_perplexity": result["token_perplexity"], "tokens": result["tokens"]}
    print(json.dumps({"fluency_judge": out}))
    return out


def time_blimp(model, tokenizer, per_paradigm: int) -> dict:
    from lmprune.evaluate.blimp import blimp_accuracy, load_blimp

    pairs, _ = load_blimp("blimp", per_paradigm)
    started = time.perf_counter()
    result = blimp_accuracy(model, tokenizer, pairs, progress=False)
    out = {"pairs": len(pairs), "seconds": round(time.perf_counter() - started, 1),
           "accuracy": result["accuracy"]}
    print(json.dumps({"blimp": out}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-1.5B config on CUDA, bf16.")
    parser.add_argument("--prompts", type=int, default=None, help="Prompts (50 CPU, 598 GPU: all).")
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Rows per call for both generators (200 CPU, 2048 GPU).")
    parser.add_argument("--score-texts", type=int, default=500,
                        help="Continuations scored per scorer.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads.")
    parser.add_argument("--sharpen-top1", type=float, default=None,
                        help="With --gpu: scale the final norm to this mean top-1 probability.")
    parser.add_argument("--static", action="store_true",
                        help="lmprune's fixed-shape decoder (static cache; a CUDA graph on GPUs).")
    parser.add_argument("--judge-prompts", type=int, default=20,
                        help="Prompts whose continuations the fluency judge scores (0: skip).")
    parser.add_argument("--blimp-per-paradigm", type=int, default=100,
                        help="BLiMP pairs per paradigm to time (0: skip).")
    parser.add_argument("--tokenizer", default=None,
                        help="With --gpu: a saved SmolLM2 tokenizer folder instead of the bundle.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("LMPRUNE_DATA_DIR", str(Path(__file__).resolve().parents[2] /
                                                  "shared" / "data"))
    device = "cuda" if args.gpu else "cpu"
    num_prompts = args.prompts or (600 if args.gpu else 50)
    rows = args.batch_size or (2048 if args.gpu else 200)
    if args.gpu:
        model, tokenizer = qwen_1p5b(device, args.tokenizer)
        model_name = "Qwen2.5-1.5B config, random weights, bf16"
    else:
        loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
        model, tokenizer = loaded.model, loaded.tokenizer
        model_name = "SmolLM2-135M-Instruct (bundled), float32"
    prompts = load_corpus("rtp:challenging", limit=num_prompts).texts
    settings = dict(samples=args.samples, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                    temperature=args.temperature)
    per_call = max(1, rows // args.samples)
    if args.sharpen_top1:
        scale = sharpen(model, tokenizer, prompts[:64], args.sharpen_top1, args.top_p)
        model_name += f", final norm x{scale:.2f}"
    distribution = first_step_stats(model, tokenizer, prompts[:64], args.top_p)
    print(json.dumps({"model": model_name, "next_token_after_prompts": distribution}))

    # Warm both up (kernels, allocator, caches), then alternate them chunk by chunk, so that load
    # changes hit both alike.
    sample_token_ids(model, tokenizer, prompts[:per_call], batch_size=rows, progress=False,
                     static=args.static, **settings)
    hf_generate(model, tokenizer, prompts[:per_call], args.samples, args, rows, device)
    ours_s = hf_s = 0.0
    ours_tokens = hf_tokens = 0
    torch.manual_seed(0)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        sync(device)
        started = time.perf_counter()
        ids = sample_token_ids(model, tokenizer, chunk, batch_size=rows, progress=False,
                               index_offset=start, static=args.static, **settings)
        sync(device)
        ours_s += time.perf_counter() - started
        ours_tokens += sum(len(r) for p in ids for r in p)
        started = time.perf_counter()
        hf_tokens += hf_generate(model, tokenizer, chunk, args.samples, args, rows, device)
        sync(device)
        hf_s += time.perf_counter() - started
    for name, seconds, tokens in (("lmprune", ours_s, ours_tokens),
                                  ("hf_generate", hf_s, hf_tokens)):
        print(json.dumps({"generator": name, "seconds": round(seconds, 2), "new_tokens": tokens,
                          "new_tokens_per_s": tokens / seconds}))

    score_prompts = prompts[:args.score_texts // args.samples]
    continuations = sample_continuations(model, tokenizer, score_prompts, batch_size=rows,
                                         progress=False, **settings) if score_prompts else []
    texts = [text for per_prompt in continuations for text in per_prompt]
    scoring = score_speeds(texts, device) if texts else {}

    judge = time_fluency_judge(model, tokenizer, prompts[:args.judge_prompts], settings, rows,
                               device) if args.judge_prompts else {}
    blimp = time_blimp(model, tokenizer, args.blimp_per_paradigm) \
        if args.blimp_per_paradigm else {}

    gpu = torch.cuda.get_device_name() if args.gpu else None
    machine = gpu or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
                     f"torch {torch.get_num_threads()} threads"
    print(json.dumps({
        "machine": machine,
        "model": model_name,
        "workload": {"prompts": num_prompts, "rows_per_call": rows, **settings,
                     "lmprune_decoder": "static" if args.static else "dynamic",
                     "next_token_after_prompts": distribution},
        "new_tokens_per_s": {"lmprune": ours_tokens / ours_s, "hf_generate": hf_tokens / hf_s},
        "scoring_texts_per_s": scoring,
        "fluency_judge": judge, "blimp": blimp,
        "ratios": {"generate_vs_hf_new_tokens_per_s": (ours_tokens / ours_s)
                   / (hf_tokens / hf_s),
                   **({"fluency_judge_vs_sampling": judge["ratio"]} if judge else {}),
                   **({"minilm_vs_profanity_check_texts_per_s": scoring["minilm"]
                       / scoring["profanity_check"]}
                      if {"minilm", "profanity_check"} <= set(scoring) else {})},
    }))


if __name__ == "__main__":
    main()
