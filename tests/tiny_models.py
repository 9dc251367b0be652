"""Tiny random models built from configs, one per supported architecture (no download)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
_DECODER = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GEMMA = dict(_DECODER, head_dim=16)

TINY_CONFIGS: dict[str, dict] = {
    "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_inner=40, vocab_size=VOCAB, n_positions=128,
                 bos_token_id=1, eos_token_id=2),
    "gptj": dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128, rotary_dim=8,
                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(_DECODER, intermediate_size=44),
    "opt": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=36,
                vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=128,
                bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": dict(_DECODER, head_dim=16),
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": dict(text_config=_GEMMA,
                   vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, image_size=28, patch_size=14)),
    "phi": _DECODER,
    "phi3": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "granite": _DECODER,
}
# Layer biases on: the weight slices must cover them too.
_BIASED = {"gpt_neox", "opt", "phi", "gpt2", "gptj"}


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model in eval mode; biases randomised so zeroing them is checked."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and model_type in _BIASED:
                p.normal_(0, 0.5)
    return model


def random_batch(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


_CHARS = (" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
          ".,!?'\"-:;()*&%$#@/")


def tiny_tokenizer():
    """A character-level fast tokenizer with VOCAB ids (0 pad, 1 bos, 2 eos, 3 unk): offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in _CHARS[: VOCAB - len(vocab)]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_tiny(model_type: str, folder, seed: int = 0):
    """A tiny model plus tokenizer saved as a normal checkpoint folder."""
    from lmprune.core.models import save_model

    return save_model(tiny_model(model_type, seed), tiny_tokenizer(), folder)


@torch.no_grad()
def mean_token_nll(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 8,
                   max_length: int = 128) -> float:
    """Reference: mean next-token NLL over all real tokens of `texts` (padding masked)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, padding_side="right")
        ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits.float()  # [batch, pos, vocab]
        targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
        nll = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                          ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("no tokens to score")
    return total / count


@torch.no_grad()
def zero_neurons(model: nn.Module, neurons: dict[int, list[int]]) -> None:
    """Zero every weight slice of the given neurons ({layer: [neuron, ...]}) in place: the
    tests' reference for what PruneMask and prune do."""
    from lmprune.core.arch import NeuronMap

    nmap = NeuronMap(model)
    for layer, idx in neurons.items():
        index = torch.as_tensor(sorted(idx), dtype=torch.long)
        for s in nmap.weight_slices(layer):
            s.param.index_fill_(s.dim, (index + s.offset).to(s.param.device), 0.0)
